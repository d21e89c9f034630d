"""Where things are: this checkout, the pack's cache folder, and a ComfyUI v0.8.0 tree to run (no ComfyUI import)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

COMFYUI_TAG = "v0.8.0"
COMFYUI_COMMIT = "fc0cb10bcbee6e73ed3caf34c27f7bde4559a07f"
COMFYUI_REPO = "https://github.com/comfyanonymous/ComfyUI"
#: The checkout these tools belong to: the pack a ComfyUI started by them loads.
PACK_DIR = Path(__file__).resolve().parents[1]


def cache_root() -> Path:
    """``${XDG_CACHE_HOME:-~/.cache}/lcm-nodes``: the pack's own folder for ComfyUI, smoke models and logs."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lcm-nodes"


def cache_dir() -> Path:
    """``${XDG_CACHE_HOME:-~/.cache}/lcm-nodes/ComfyUI-v0.8.0``, where a missing ComfyUI is cloned."""
    return cache_root() / f"ComfyUI-{COMFYUI_TAG}"


def installed_in() -> Path | None:
    """The ComfyUI whose ``custom_nodes/`` holds this checkout, or None."""
    parent = PACK_DIR.parent
    if parent.name == "custom_nodes" and (parent.parent / "main.py").is_file():
        return parent.parent
    return None


def find_comfyui(clone: bool = False) -> tuple[Path | None, str]:
    """Locate ComfyUI: ``$COMFYUI_PATH``, the ComfyUI above ``custom_nodes/`` holding this pack, then the cache.

    With ``clone`` a missing cache is filled by a shallow clone of v0.8.0 (needs the network).
    Returns ``(path, how it was found)`` or ``(None, why not)``; "parent of custom_nodes" means the pack is
    installed in that ComfyUI, whose own folders (models, input, output) then serve.
    """
    env = os.environ.get("COMFYUI_PATH")
    if env:
        p = Path(env).expanduser()
        return (p, "COMFYUI_PATH") if (p / "main.py").is_file() else (None, f"COMFYUI_PATH={env} has no main.py; point it at a ComfyUI folder")
    parent = installed_in()
    if parent is not None:
        return parent, "parent of custom_nodes"
    cached = cache_dir()
    if (cached / "main.py").is_file():
        return cached, "cache"
    if not clone:
        return None, f"no ComfyUI at $COMFYUI_PATH, above this pack, or at {cached}"
    cached.parent.mkdir(parents=True, exist_ok=True)
    try:
        r = subprocess.run(
            ["git", "clone", "--quiet", "--depth", "1", "--branch", COMFYUI_TAG, COMFYUI_REPO, str(cached)],
            capture_output=True, text=True, timeout=600,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"no ComfyUI at $COMFYUI_PATH or {cached}, and cloning {COMFYUI_TAG} failed: {exc}"
    if r.returncode == 0 and (cached / "main.py").is_file():
        return cached, "cloned"
    return None, f"no ComfyUI at $COMFYUI_PATH or {cached}, and cloning {COMFYUI_TAG} failed: {r.stderr.strip()[:300]}"
