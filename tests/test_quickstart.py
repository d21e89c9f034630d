"""The README's first command: smoke run without weights, the missing-files message, and --download (local stand-in)."""

from __future__ import annotations

import functools
import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

from comfy_harness import REPO
from models import random_lora, tiny_sd15_checkpoint, tiny_sd15_unet
from safetensors.torch import save_file


def quickstart(tmp_path: Path, *args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), **(env_extra or {}))
    from comfy_harness import find_comfyui

    env["COMFYUI_PATH"] = str(find_comfyui()[0])
    return subprocess.run([sys.executable, "-m", "lcm_core.quickstart", "--output", str(tmp_path / "out"), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def test_smoke_run_without_any_weights(comfy, tmp_path):
    r = quickstart(tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "SMOKE TEST" in r.stderr and "noise, not art" in r.stderr
    pngs = list((tmp_path / "out").glob("*.png"))
    assert len(pngs) == 1 and pngs[0].stat().st_size > 0


def test_missing_files_are_named_with_where_to_put_them(comfy, tmp_path):
    models = tmp_path / "cache" / "lcm-nodes" / "quickstart" / "models" / "checkpoints"
    models.mkdir(parents=True)
    (models / "v1-5-pruned-emaonly.safetensors").write_bytes(b"x")
    r = quickstart(tmp_path)
    assert r.returncode == 2
    assert "loras/lcm-lora-sdv1-5.safetensors" in r.stderr and "latent-consistency/lcm-lora-sdv1-5" in r.stderr
    assert "v1-5-pruned-emaonly" not in r.stderr.split("missing")[1]


def test_download_from_a_local_stand_in_then_generate(comfy, tmp_path):
    hub = tmp_path / "hub"
    ckpt = hub / "stable-diffusion-v1-5" / "stable-diffusion-v1-5" / "resolve" / "main" / "v1-5-pruned-emaonly.safetensors"
    lora = hub / "latent-consistency" / "lcm-lora-sdv1-5" / "resolve" / "main" / "pytorch_lora_weights.safetensors"
    tiny_sd15_checkpoint(ckpt)
    lora.parent.mkdir(parents=True)
    save_file(random_lora(tiny_sd15_unet(time_cond_proj_dim=None, seed=21), "kohya"), str(lora))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(hub))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        r = quickstart(tmp_path, "--download", "--width", "64", "--height", "64",
                       env_extra={"HF_ENDPOINT": f"http://127.0.0.1:{httpd.server_address[1]}"})
    finally:
        httpd.shutdown()
    assert r.returncode == 0, r.stderr[-3000:]
    assert "SMOKE TEST" not in r.stderr
    models = tmp_path / "cache" / "lcm-nodes" / "quickstart" / "models"
    assert (models / "checkpoints" / "v1-5-pruned-emaonly.safetensors").read_bytes() == ckpt.read_bytes()
    assert (models / "loras" / "lcm-lora-sdv1-5.safetensors").stat().st_size == lora.stat().st_size
    assert len(list((tmp_path / "out").glob("*.png"))) == 1
