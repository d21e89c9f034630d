"""Workflows end to end through a real ComfyUI HTTP server on 127.0.0.1, driven by the headless runner; and
what a newcomer sees of the pack in that server (issue #11 items 8, 9): the Templates browser's list and
thumbnails, each node's help page and tooltips, fetched the way the frontend fetches them.

Model names in the bundled workflows are pointed at tiny test models through the runner's flags: the
SDXL workflows run here on SD1.5-family tiny models (the SDXL graphs themselves are proven exact in
test_nodes_exact.py); sizes are overridden to 64x64 so the CPU finishes quickly. Each picture the server makes is
compared, pixel for pixel, with the same prompt run by the in-process ComfyUI (the ``runner`` fixture), the prompt
written out here field by field rather than by the runner's override code.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
import torch
from comfy_harness import REPO, assert_same_picture, in_process_pixels
from conftest import TINY
from models import random_lora, save_unet, tiny_sd15_unet
from PIL import Image
from safetensors.torch import load_file, save_file

from lcm_tools import run as lcm_run
from lcm_tools.client import ComfyClient
from lcm_tools.workflows import API_DIR, Overrides, apply_overrides, bundled_names, load_workflow

WORKFLOWS = REPO / "workflows"
SAMPLER_NODES = ("LCMSampler", "LCMImg2Img", "TCDSampler")


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


def tiny_api(name: str, seed: int = 3, unet: str = TINY["unet"]) -> dict:
    """What ``run NAME *tiny_flags(NAME)`` should queue, set field by field: the tiny models, 64x64 (an img2img input
    scaled to it by an ImageScale node, as the runner documents), the seed."""
    api = json.loads((API_DIR / f"{name}.api.json").read_text())
    fields = {"CheckpointLoaderSimple": {"ckpt_name": TINY["ckpt"]}, "LCMLoadUNet": {"unet_name": unet},
              "LCMApplyLoRA": {"lora_name": TINY["lora"]}, "EmptyLatentImage": {"width": 64, "height": 64},
              **{s: {"seed": seed} for s in SAMPLER_NODES}}
    for node_id, node in list(api.items()):
        node["inputs"].update(fields.get(node["class_type"], {}))
        if node["class_type"] == "VAEEncode":
            api[f"scale{node_id}"] = {"class_type": "ImageScale", "inputs": {"image": node["inputs"]["pixels"], "upscale_method": "bilinear",
                                                                             "width": 64, "height": 64, "crop": "center"}}
            node["inputs"]["pixels"] = [f"scale{node_id}", 0]
    return api


@pytest.mark.parametrize("name", bundled_names())
def test_workflow_end_to_end_over_http(server, runner, tmp_path, name):
    out = tmp_path / "out"
    r = runner_cli("run", str(API_DIR / f"{name}.api.json"), "--server", server, "--output", str(out), "--quiet", *tiny_flags(name))
    assert r.returncode == 0, r.stderr
    files = sorted(out.glob("*.png"))
    assert len(files) == 1
    with Image.open(files[0]) as img:
        assert img.size == (64, 64)
        assert any(lo != hi for lo, hi in img.getextrema())  # a real picture, not a flat fill
    assert_same_picture(files[0], in_process_pixels(runner, tiny_api(name))[0], name)


def unet_choices(client: ComfyClient) -> list[str]:
    """The files Load LCM UNet offers (a V3 combo: ["COMBO", {"options": [...]}])."""
    kind, spec = client.request("/object_info/LCMLoadUNet")["LCMLoadUNet"]["input"]["required"]["unet_name"][:2]
    return kind if isinstance(kind, list) else spec["options"]


def test_a_pickled_dmd2_unet_converts_loads_and_samples(server, runner, comfy_base, tmp_path):
    """README's DMD2 recipe end to end: a diffusers UNet state dict pickled in fp16 as DMD2 ships it (.bin), `python -m
    lcm_tools convert`, then the dmd2 workflow (Load LCM UNet -> LCM Sampler 999/749/499/249) over HTTP. Its picture is
    the one the same tensors give when saved as .safetensors directly (run in-process): the conversion kept every tensor."""
    folder = comfy_base / "models" / "diffusion_models"
    unet = tiny_sd15_unet(time_cond_proj_dim=None, seed=33)  # DMD2 has no guidance embedding
    pickled = folder / "tiny-dmd2_4step_unet_fp16.bin"
    torch.save({k: v.to(torch.float16) for k, v in unet.state_dict().items()}, pickled)
    save_unet(unet, folder / "tiny-dmd2-direct.safetensors", dtype=torch.float16)
    client = ComfyClient(server)
    assert pickled.name not in unet_choices(client)  # a pickle is never offered (it could run code)

    r = subprocess.run([sys.executable, "-m", "lcm_tools", "convert", str(pickled)], cwd=REPO, capture_output=True, text=True, timeout=120)
    converted = folder / "tiny-dmd2_4step_unet_fp16.safetensors"
    assert r.returncode == 0 and f"wrote {converted} ({len(unet.state_dict())} tensors)" in r.stdout, r.stdout + r.stderr
    written = load_file(str(converted))
    assert written.keys() == unet.state_dict().keys()
    assert all(torch.equal(written[k], v.to(torch.float16)) and written[k].dtype == torch.float16 for k, v in unet.state_dict().items())
    listed = unet_choices(client)
    assert converted.name in listed and pickled.name not in listed

    out = tmp_path / "out"
    r = runner_cli("run", "dmd2-sdxl-txt2img", "--server", server, "--output", str(out), "--quiet", "--unet", converted.name,
                   "--ckpt", TINY["ckpt"], "--width", "64", "--height", "64", "--seed", "3")
    assert r.returncode == 0, r.stderr
    [png] = sorted(out.glob("*.png"))
    assert_same_picture(png, in_process_pixels(runner, tiny_api("dmd2-sdxl-txt2img", unet="tiny-dmd2-direct.safetensors"))[0], "dmd2")


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
    assert "LCMLoRAError" in r.stderr and "does not fit this SD1.5 model" in r.stderr


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


def test_runner_refuses_a_ui_format_workflow_and_names_its_api_twin(tmp_path):
    """A UI-format file (what the page saves) is refused before any server is asked, pointing at the API twin."""
    r = runner_cli("run", str(WORKFLOWS / "sd15-lcm-lora-txt2img.json"), "--server", "http://127.0.0.1:9", "--output", str(tmp_path))
    assert r.returncode == 1
    assert "UI-format workflow" in r.stderr and str(API_DIR / "sd15-lcm-lora-txt2img.api.json") in r.stderr


# ------------------------------------------------------------------ in ComfyUI's page (issue #11 items 8, 9)

UI_NAMES = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
# README's node table, written out: every node of the pack has a help page
DOCUMENTED = ("LCMLoadUNet", "LCMApplyLoRA", "LCMSampler", "LCMImg2Img", "LCMVAEDecode", "LCMSaveImage", "TCDSampler")


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


def test_the_documented_nodes_are_all_the_packs_nodes_each_with_one_page(server, pack_module):
    info = ComfyClient(server).request("/object_info")
    ours = sorted(n for n, i in info.items() if i["python_module"].split(".")[:2] == ["custom_nodes", pack_module])
    assert ours == sorted(DOCUMENTED)
    assert sorted(p.stem for p in (REPO / "web" / "docs").glob("*.md")) == sorted(DOCUMENTED)


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
