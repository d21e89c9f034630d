"""The README's first command as a newcomer meets it (issue #11 items 1-5): a fresh copy of this checkout, the
documented `bash scripts/quickstart`, a real ComfyUI started by it.

- installed in a ComfyUI's custom_nodes/ with no weights: the smoke test runs the chosen workflow's graph, names
  the missing files with their full folders and sources, honours --width/--height, writes nothing into that
  ComfyUI's models/ (or input/, output/), and leaves the checkout's `git status` empty;
- a second checkout, after the first one was deleted (its link still in the shared quickstart folder): --download
  from a local stand-in of the Hub, a real run, this checkout's code loaded and nobody else's.

The copy's __init__.py gets two lines that record which checkout ComfyUI imported (LCM_TEST_LOADED_MARK). Each
picture the quickstart writes is compared with the same prompt run by the in-process ComfyUI on the same model files
(the prompt written out here, not built by the quickstart's code).
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from comfy_harness import REPO, assert_same_picture, in_process_pixels
from PIL import Image

from lcm_tools.releases import RELEASES
from lcm_tools.workflows import API_DIR

MARK_LINES = ('\nimport os as _lcm_test_os  # test_quickstart: which checkout did ComfyUI import?\n'
              'if _lcm_test_os.environ.get("LCM_TEST_LOADED_MARK"): open(_lcm_test_os.environ["LCM_TEST_LOADED_MARK"], "a")'
              '.write(_lcm_test_os.path.realpath(__file__) + "\\n")\n')
GIT = ["git", "-c", "user.name=newcomer", "-c", "user.email=newcomer@example.invalid", "-c", "init.defaultBranch=main"]


def copy_checkout(dest: Path) -> Path:
    """This working tree as a fresh clone would have it (tracked and new files, nothing ignored), committed."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True)
    for rel in files.stdout.splitlines():
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    with open(dest / "__init__.py", "a") as f:
        f.write(MARK_LINES)
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "fresh clone"]):
        subprocess.run([*GIT, *cmd], cwd=dest, check=True, capture_output=True)
    return dest


def git_status(checkout: Path) -> str:
    return subprocess.run(["git", "status", "--porcelain"], cwd=checkout, capture_output=True, text=True, check=True).stdout


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def real_comfy(comfy):
    from comfy_harness import find_comfyui

    return Path(find_comfyui()[0])


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory, real_comfy):
    """The pack's cache folder of these tests, smoke models built in it once (as the quickstart builds them)."""
    cache = tmp_path_factory.mktemp("xdg-cache")
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(cache)
    try:
        from lcm_tools import smoke

        smoke.ensure_models(real_comfy)
    finally:
        if old is None:
            del os.environ["XDG_CACHE_HOME"]
        else:
            os.environ["XDG_CACHE_HOME"] = old
    return cache


@pytest.fixture(scope="module")
def smoke_run(runner, comfy_base, shared_cache):
    """pixels(workflow, width, height, **{class_type: {input: value}}): the in-process picture of a bundled workflow
    with the given inputs set, the smoke models made visible to the in-process ComfyUI under their own names."""
    smoke = shared_cache / "lcm-nodes" / "smoke-models" / "v1"
    links = [comfy_base / "models" / rel for rel in json.loads((smoke / "MANIFEST.json").read_text()).values()]
    for link in links:
        link.symlink_to(smoke / link.relative_to(comfy_base / "models"))

    def pixels(workflow: str, width: int, height: int, **fields: dict):
        api = json.loads((API_DIR / f"{workflow}.api.json").read_text())
        fields.setdefault("EmptyLatentImage", {}).update(width=width, height=height)
        for node in api.values():
            node["inputs"].update(fields.get(node["class_type"], {}))
        return in_process_pixels(runner, api)[0]

    yield pixels
    for link in links:  # the cache folder goes with this module: leave no dangling link in the session's models
        link.unlink()


def run_quickstart(checkout: Path, cwd: Path, cache: Path, mark: Path, *args: str, comfyui: Path | None = None,
                   env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, XDG_CACHE_HOME=str(cache), LCM_VENV=sys.prefix, LCM_TEST_LOADED_MARK=str(mark), **(env_extra or {}))
    env.pop("COMFYUI_PATH", None)
    env.pop("LCM_QUICKSTART_DIR", None)
    if comfyui is not None:
        env["COMFYUI_PATH"] = str(comfyui)
    return subprocess.run(["bash", str(checkout / "scripts" / "quickstart"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


def test_smoke_run_inside_a_comfyui_names_the_files_and_writes_nothing_there(tmp_path, real_comfy, shared_cache, smoke_run):
    comfy = tmp_path / "ComfyUI"
    shutil.copytree(real_comfy, comfy, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.safetensors", "user", "temp"))
    checkout = copy_checkout(comfy / "custom_nodes" / "lcm-nodes")
    before = {d: files_under(comfy / d) for d in ("models", "input", "output")}
    caller, mark = tmp_path / "somewhere", tmp_path / "loaded.txt"
    caller.mkdir()
    r = run_quickstart(checkout, caller, shared_cache, mark, "--workflow", "lcm-sdxl-unet-txt2img", "--width", "64", "--height", "96",
                       "--output", "out")
    assert r.returncode == 0, r.stderr[-4000:]
    # item 1: the chosen workflow's files, their full folders, where each comes from, and what ran instead
    unet = RELEASES["lcm-sdxl.safetensors"]
    assert f"{comfy / 'models' / 'diffusion_models'}/\n      lcm-sdxl.safetensors   ({unet.size}" in r.stderr
    assert f"https://huggingface.co/{unet.repo}  file {unet.file}, saved as lcm-sdxl.safetensors" in r.stderr
    assert f"{comfy / 'models' / 'checkpoints'}/\n      sd_xl_base_1.0.safetensors" in r.stderr
    assert "SMOKE TEST" in r.stderr and "'lcm-sdxl-unet-txt2img'" in r.stderr and "ran its graph on SD1.5-shaped models" in r.stderr
    # item 5: --output is the caller's, the size asked for is honoured
    images = sorted((caller / "out").glob("*.png"))
    assert [p.name for p in images] == ["lcm-sdxl-unet-txt2img-smoke_00000.png"]
    with Image.open(images[0]) as img:
        assert img.size == (64, 96) and any(lo != hi for lo, hi in img.getextrema())
    # the workflow's own graph, prompt, seed and steps, on the smoke checkpoint and LCM UNet
    expected = smoke_run("lcm-sdxl-unet-txt2img", 64, 96, CheckpointLoaderSimple={"ckpt_name": "lcm-smoke-sd15.safetensors"},
                         LCMLoadUNet={"unet_name": "lcm-smoke-sd15-lcm-unet.safetensors"})
    assert_same_picture(images[0], expected, "smoke test")
    # item 3: that ComfyUI's folders are untouched; the smoke models live in the pack's cache
    assert {d: files_under(comfy / d) for d in before} == before
    assert (shared_cache / "lcm-nodes" / "smoke-models").is_dir()
    # item 4: ComfyUI imported this checkout, once
    assert mark.read_text().splitlines() == [str(checkout.resolve() / "__init__.py")]
    assert git_status(checkout) == ""


def test_second_checkout_runs_its_own_code_and_downloads_what_is_missing(tmp_path, real_comfy, shared_cache, smoke_run):
    cache = tmp_path / "cache"  # a user's cache where an older quickstart linked a first clone, since deleted
    stale = cache / "lcm-nodes" / "quickstart" / "custom_nodes" / "lcm_nodes"
    stale.parent.mkdir(parents=True)
    stale.symlink_to(tmp_path / "first-clone-deleted", target_is_directory=True)
    shutil.copytree(shared_cache / "lcm-nodes" / "smoke-models", cache / "lcm-nodes" / "smoke-models")
    smoke = cache / "lcm-nodes" / "smoke-models" / "v1"
    hub = tmp_path / "hub"  # the Hub's URL layout: <repo>/resolve/main/<file>
    served = {"v1-5-pruned-emaonly.safetensors": smoke / "checkpoints" / "lcm-smoke-sd15.safetensors",
              "lcm-lora-sdv1-5.safetensors": smoke / "loras" / "lcm-smoke-sd15-lora.safetensors"}
    for local, src in served.items():
        rel = RELEASES[local]
        (hub / rel.repo / "resolve" / "main").mkdir(parents=True)
        os.link(src, hub / rel.repo / "resolve" / "main" / rel.file)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(hub))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    checkout, mark = copy_checkout(tmp_path / "second-clone"), tmp_path / "loaded.txt"
    try:
        r = run_quickstart(checkout, checkout, cache, mark, "--download", "--width", "64", "--height", "64", comfyui=real_comfy,
                           env_extra={"HF_ENDPOINT": f"http://127.0.0.1:{httpd.server_address[1]}"})
    finally:
        httpd.shutdown()
    assert r.returncode == 0, r.stderr[-4000:]
    assert "SMOKE TEST" not in r.stderr
    assert not stale.is_symlink() and "left by an older quickstart" in r.stderr
    assert mark.read_text().splitlines() == [str(checkout.resolve() / "__init__.py")]
    models = cache / "lcm-nodes" / "quickstart" / "models"
    for local, src in served.items():
        assert (models / RELEASES[local].folder / local).read_bytes() == src.read_bytes()
    images = sorted((checkout / "lcm-output").glob("*.png"))
    assert [p.name for p in images] == ["sd15-lcm-lora-txt2img_00000.png"]
    # a real run: the downloaded files (the smoke models' bytes under the releases' names), the workflow's settings
    expected = smoke_run("sd15-lcm-lora-txt2img", 64, 64, CheckpointLoaderSimple={"ckpt_name": "lcm-smoke-sd15.safetensors"},
                         LCMApplyLoRA={"lora_name": "lcm-smoke-sd15-lora.safetensors"})
    assert_same_picture(images[0], expected, "downloaded models")
    assert git_status(checkout) == ""  # lcm-output/ is ignored: the quickstart leaves the checkout clean

    # item 2: the README's runner command, in the checkout, starts a ComfyUI of its own that has the pack
    base = cache / "lcm-nodes" / "quickstart"
    env = dict(os.environ, LCM_TEST_LOADED_MARK=str(mark), COMFYUI_PATH=str(real_comfy))
    r = subprocess.run([sys.executable, "-m", "lcm_tools", "run", "sd15-lcm-lora-txt2img", "--base-dir", str(base), "--width", "64",
                        "--height", "64", "--seed", "7", "--output", "out/", "--quiet", "--", "--preview-method", "none"],
                       cwd=checkout, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    assert [p.name for p in (checkout / "out").glob("*.png")] == ["sd15-lcm-lora-txt2img_00000.png"]
    assert mark.read_text().splitlines() == [str(checkout.resolve() / "__init__.py")] * 2
