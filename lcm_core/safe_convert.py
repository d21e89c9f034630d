"""Convert a pickled weights file (.ckpt/.pt/.bin/.pth) to .safetensors without running code from it.

The pack itself only reads ``.safetensors``. Older releases ship pickles, and unpickling can execute
anything the file's author put in it, so this reads them with ``torch.load(weights_only=True)``: PyTorch's
restricted unpickler that builds tensors and plain containers and refuses everything else.

    python -m lcm_core.runner convert models/loras/old-lora.ckpt
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import LCMModelError

PICKLE_EXTS = (".ckpt", ".pt", ".pth", ".bin")


def convert_to_safetensors(path: str | os.PathLike, out: str | os.PathLike | None = None) -> tuple[Path, int, int]:
    """Write ``path``'s tensors to ``out`` (default: the same name with ``.safetensors``).

    Returns (written file, tensors written, non-tensor entries dropped). Never overwrites a file and never
    unpickles code: a file that needs more than tensors and plain containers is refused with LCMModelError.
    """
    from safetensors.torch import save_file

    src = Path(path)
    if src.suffix.lower() not in PICKLE_EXTS:
        raise LCMModelError(f"{src.name!r} is not a pickled weights file ({', '.join(PICKLE_EXTS)}); nothing to convert.")
    if not src.is_file():
        raise LCMModelError(f"{src} does not exist.")
    dst = Path(out) if out is not None else src.with_suffix(".safetensors")
    if dst.exists():
        raise LCMModelError(f"{dst} already exists; remove it or choose another output name.")
    try:
        obj = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError for refused globals; others for broken files
        raise LCMModelError(
            f"{src.name!r} was refused: it is not a plain tensor file ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). "
            "It may contain code; do not load it with an unrestricted torch.load. Get the .safetensors release instead."
        ) from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):  # Lightning/original-SD checkpoints
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise LCMModelError(f"{src.name!r} holds a {type(obj).__name__}, not a dict of named tensors.")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise LCMModelError(f"{src.name!r} holds no tensors.")
    dropped = len(obj) - len(tensors)
    # safetensors stores each tensor once: give views and shared storages their own memory
    tensors = {k: v.detach().clone().contiguous() for k, v in tensors.items()}
    tmp = dst.with_name(dst.name + ".partial")
    save_file(tensors, str(tmp), metadata={"converted_from": src.name})
    os.replace(tmp, dst)
    return dst, len(tensors), dropped
