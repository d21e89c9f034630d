"""Workflows end to end through a real ComfyUI HTTP server on 127.0.0.1, driven by the headless runner; and
what a newcomer sees of the pack in that server (issue #11 items 8, 9): the Templates browser's list and
thumbnails, each node's help page and tooltips, fetched the way the frontend fetches them.

Model names in the bundled workflows are pointed at tiny test models through the runner's flags: the
SDXL workflows run here on SD1.5-family tiny models (the SDXL graphs themselves are proven exact in
test_nodes_exact.py); sizes are overridden to 64x64 so the CPU finishes quickly.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from comfy_harness import REPO
from conftest import TINY
from models import random_lora, tiny_sd15_unet
from PIL import Image
from safetensors.torch import save_file

from lcm_tools import run as lcm_run
from lcm_tools.client import ComfyClient
from lcm_tools.workflows import API_DIR, Overrides, apply_overrides, bundled_names, load_workflow

WORKFLOWS = REPO / "workflows"
def runner_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lcm_tools", *args], cwd=REPO, capture_output=True, text=True, timeout=600)


def tiny_flags(name: str) -> list[str]:
    flags = ["--ckpt", TINY["ckpt"], "--width", "64", "--height", "64", "--seed", "3"]
    api = load_workflow(API_DIR / f"{name}.api.json")
    kinds = {n["class_type"] for n in api.values()}
    if "LCMLoadUNet" in kinds:
        flags += ["--unet", TINY["unet"]]
    if "LCMApplyLoRA" in kinds:
        flags += ["--lora", TINY["lora"]]
    return flags


@pytest.mark.parametrize("name", bundled_names())
def test_workflow_end_to_end_over_http(server, tmp_path, name):
    out = tmp_path / "out"
    r = runner_cli("run", str(API_DIR / f"{name}.api.json"), "--server", server, "--output", str(out), "--quiet", *tiny_flags(name))
    assert r.returncode == 0, r.stderr
    files = sorted(out.glob("*.png"))
    assert len(files) == 1
    img = Image.open(files[0])
    assert img.size == (64, 64)
    assert any(lo != hi for lo, hi in img.getextrema())  # a real picture, not a flat fill


def test_progress_history_and_view(server, tmp_path):
    api = apply_overrides(load_workflow(str(API_DIR / "sd15-lcm-lora-txt2img.api.json")),
                          Overrides(ckpt=TINY["ckpt"], lora=TINY["lora"], width=64, height=64, steps=3, batch=2))
    client = ComfyClient(server)
    pid = client.queue(api)
    seen = []
    history = client.wait(pid, lambda v, m: seen.append((v, m)))
    assert (3, 3) in seen and (1, 3) in seen  # per-step progress over /ws
    images = history["outputs"]["9"]["images"]
    assert len(images) == 2
    png = client.view(images[0])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_runner_exits_with_comfy_validation_error(server, tmp_path):
    r = runner_cli("run", str(API_DIR / "sd15-lcm-lora-txt2img.api.json"), "--server", server, "--output", str(tmp_path),
                   "--ckpt", TINY["ckpt"], "--lora", "no-such-lora.safetensors", "--quiet")
    assert r.returncode == 1
    assert "Value not in list" in r.stderr and "no-such-lora.safetensors" in r.stderr


def test_runner_exits_with_execution_error(server, tmp_path, comfy_base):
    # a LoRA whose module names match no layer: passes validation, fails inside our node with our message
    bad = comfy_base / "models" / "loras" / "tiny-bad-rank.safetensors"
    lora = random_lora(tiny_sd15_unet(time_cond_proj_dim=None), "kohya")
    lora = {k.replace("lora_unet_", "lora_unet_zzz_"): v for k, v in lora.items()}
    save_file(lora, str(bad))
    r = runner_cli("run", str(API_DIR / "sd15-lcm-lora-txt2img.api.json"), "--server", server, "--output", str(tmp_path),
                   "--ckpt", TINY["ckpt"], "--lora", bad.name, "--width", "64", "--height", "64", "--quiet")
    assert r.returncode == 1
    assert "LCMLoRAError" in r.stderr and "does not fit this SD15 model" in r.stderr


def test_prompt_queue_runs_and_resumes(server, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\n# a comment\n{\"prompt\": \"a blue bird\", \"seed\": 9}\na green frog\n")
    out = tmp_path / "out"
    args = ["run", str(API_DIR / "sd15-lcm-lora-txt2img.api.json"), "--server", server, "--output", str(out),
            "--prompts", str(prompts), "--ckpt", TINY["ckpt"], "--lora", TINY["lora"], "--width", "64", "--height", "64", "--steps", "2"]
    r = runner_cli(*args)
    assert r.returncode == 0, r.stderr
    assert "3 done, 0 already done, 0 failed, of 3" in r.stdout
    files = sorted(out.glob("*.png"))
    assert len(files) == 3
    mtimes = {f.name: f.stat().st_mtime_ns for f in files}
    files[1].unlink()  # as if interrupted before this one was written
    state = json.loads((out / lcm_run.STATE_FILE).read_text())
    assert len(state) == 3
    r = runner_cli(*args)
    assert "1 done, 2 already done, 0 failed, of 3" in r.stdout, r.stdout + r.stderr
    for f in sorted(out.glob("*.png")):
        if f.name != files[1].name:
            assert f.stat().st_mtime_ns == mtimes[f.name]  # nothing already written was redone
    assert files[1].exists()


def test_runner_refuses_ui_format_through_the_old_command(tmp_path):
    """`python -m lcm_core.runner` (the command before issue #10) still runs the runner."""
    r = subprocess.run([sys.executable, "-m", "lcm_core.runner", "run", str(WORKFLOWS / "sd15-lcm-lora-txt2img.json"),
                        "--server", "http://127.0.0.1:9", "--output", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "UI-format workflow" in r.stderr and str(API_DIR / "sd15-lcm-lora-txt2img.api.json") in r.stderr


# ------------------------------------------------------------------ in ComfyUI's page (issue #11 items 8, 9)

UI_NAMES = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
DOCUMENTED = ("LCMLoadUNet", "LCMApplyLoRA", "LCMSampler", "LCMImg2Img")


def get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.headers.get_content_type(), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, "", b""


@pytest.fixture(scope="module")
def pack_module(server):
    """The pack's module name in this server: what template and docs URLs are built from (python_module's 2nd part)."""
    info = ComfyClient(server).request("/object_info/LCMSampler")["LCMSampler"]
    assert info["python_module"].startswith("custom_nodes.")
    return info["python_module"].split(".")[1]


def test_templates_list_only_the_ui_workflows_and_every_thumbnail_loads(server, pack_module):
    templates = ComfyClient(server).request("/workflow_templates")
    assert sorted(templates[pack_module]) == UI_NAMES
    assert not any(name.endswith(".api") for name in templates[pack_module])
    for name in UI_NAMES:  # the frontend's getTemplateThumbnailUrl and fetchTemplateJson for custom nodes
        status, ctype, body = get(f"{server}/api/workflow_templates/{pack_module}/{name}.jpg")
        assert status == 200 and ctype == "image/jpeg" and body[:3] == b"\xff\xd8\xff", (name, status, ctype)
        status, _, body = get(f"{server}/api/workflow_templates/{pack_module}/{name}.json")
        assert status == 200 and "nodes" in json.loads(body), name


@pytest.mark.parametrize("node_id", DOCUMENTED)
def test_each_node_has_a_help_page_the_frontend_finds(server, pack_module, node_id):
    """The frontend asks /extensions/<module>/docs/<NodeId>.md and refuses text/html (ComfyUI's 404 page)."""
    info = ComfyClient(server).request(f"/object_info/{node_id}")[node_id]
    status, ctype, body = get(f"{server}/extensions/{pack_module}/docs/{node_id}.md")
    assert status == 200 and ctype != "text/html", (status, ctype)
    text = body.decode("utf-8")
    assert text.startswith(f"# {info['display_name']}\n")
    for section in ("## Inputs", "## Output", "## Recommended settings", "## Common errors"):
        assert section in text, (node_id, section)
    for family in ("SDXL", "SD1.5"):
        assert family in text.split("## Recommended settings")[1].split("## Common errors")[0]


def test_outputs_have_tooltips_and_img2img_input_speaks_of_img2img(server):
    client = ComfyClient(server)
    for node_id in DOCUMENTED:
        info = client.request(f"/object_info/{node_id}")[node_id]
        tips = info.get("output_tooltips") or []
        assert len(tips) == len(info["output"]) and all(tips), (node_id, tips)
    img2img = client.request("/object_info/LCMImg2Img")["LCMImg2Img"]["input"]["required"]["latent_image"][1]["tooltip"]
    assert "VAE Encode" in img2img and not img2img.startswith("Empty Latent Image"), img2img
