"""Smoke-test models: tiny random-weight SD1.5-family files that let a bundled workflow's graph run without weights.

They live in the pack's own cache (``${XDG_CACHE_HOME:-~/.cache}/lcm-nodes/smoke-models``), built once by
``_smoke_build.py`` in a subprocess, and are shown to the ComfyUI the quickstart starts through an extra
model-paths file: a user's ``models/`` folder is never written.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .client import RunnerError
from .locate import cache_root
from .workflows import Overrides

#: Bump when _smoke_build.py changes what it writes: old builds are then rebuilt, not reused.
SMOKE_VERSION = 1
NAMES = {"ckpt": "lcm-smoke-sd15.safetensors", "unet": "lcm-smoke-sd15-lcm-unet.safetensors", "lora": "lcm-smoke-sd15-lora.safetensors"}
#: Size of a smoke image unless --width/--height say otherwise: small, so the CPU finishes in seconds.
DEFAULT_SIZE = 128


def smoke_dir() -> Path:
    return cache_root() / "smoke-models" / f"v{SMOKE_VERSION}"


def ensure_models(comfy: Path) -> Path:
    """The smoke-model folder, built first when missing (about 500 MB, half a minute on two cores)."""
    dest = smoke_dir()
    if (dest / "MANIFEST.json").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    print(f"building the smoke-test models in {dest} (once; about 500 MB)", file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix="build-", dir=dest.parent))
    try:
        r = subprocess.run([sys.executable, str(Path(__file__).with_name("_smoke_build.py")), str(comfy), str(tmp)],
                           capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            raise RunnerError(f"building the smoke-test models failed:\n{r.stderr[-3000:]}")
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)  # all or nothing: a half-built folder is never taken for a finished one
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    manifest = json.loads((dest / "MANIFEST.json").read_text())
    missing = [p for p in manifest.values() if not (dest / p).is_file()]
    if missing:
        raise RunnerError(f"the smoke-test build in {dest} lacks {missing}; delete the folder and run again")
    return dest


def model_paths_config(models: Path, work: Path) -> Path:
    """An extra_model_paths.yaml that adds the smoke models' folders to ComfyUI's model lists."""
    config = work / "lcm_smoke_paths.yaml"
    config.write_text("lcm_smoke_models:\n"
                      f"  base_path: {models}\n"
                      "  checkpoints: checkpoints\n  diffusion_models: diffusion_models\n  loras: loras\n", encoding="utf-8")
    return config


def smoke_overrides(api: dict, o: Overrides) -> Overrides:
    """``o`` with every model the workflow names replaced by a smoke model, and DEFAULT_SIZE where no size was asked for.

    img2img workflows get the size too: their input is scaled to it (see apply_overrides).
    """
    kinds = {n.get("class_type") for n in api.values()}
    values = {k: getattr(o, k) for k in Overrides.field_names()}
    values.update(width=o.width or DEFAULT_SIZE, height=o.height or DEFAULT_SIZE)
    if "CheckpointLoaderSimple" in kinds:
        values["ckpt"] = NAMES["ckpt"]
    if kinds & {"LCMLoadUNet", "UNETLoader"}:
        values["unet"] = NAMES["unet"]
    if kinds & {"LCMApplyLoRA", "LoraLoader", "LoraLoaderModelOnly"}:
        values["lora"] = NAMES["lora"]
    return Overrides(**values)


def family(api: dict) -> str:
    """'SDXL' or 'SD1.5', from the model names the workflow uses."""
    names = " ".join(str(v) for n in api.values() for v in n.get("inputs", {}).values() if isinstance(v, str)).lower()
    return "SDXL" if "xl" in names else "SD1.5"
