"""Weights I/O: reading .safetensors files, finding a UNet's files, and converting pickles without running them.

The pack reads only ``.safetensors``: unpickling (``.ckpt``, ``.pt``, ``.bin``, ``.pth``) can run code. Old
pickled releases are converted once by :func:`convert_to_safetensors`, which reads them with
``torch.load(weights_only=True)`` (PyTorch's restricted unpickler: tensors and plain containers, nothing else).
Every error names the file and the fix. torch + safetensors only.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import LCMModelError

PICKLE_EXTS = (".ckpt", ".pt", ".pth", ".bin")

# diffusers' file names for a UNet, the one place the pack spells them: ``<model>/unet/`` (or the folder itself)
# holds the weights, full precision or the fp16 variant (tried in this order), beside the model's ``config.json``.
DIFFUSERS_UNET_SUBFOLDER = "unet"
DIFFUSERS_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
DIFFUSERS_WEIGHTS_NAME_FP16 = "diffusion_pytorch_model.fp16.safetensors"
DIFFUSERS_WEIGHTS_NAMES = (DIFFUSERS_WEIGHTS_NAME, DIFFUSERS_WEIGHTS_NAME_FP16)
DIFFUSERS_CONFIG_NAME = "config.json"


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


def load_safetensors(path: str, what: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a ``.safetensors`` file (tensors and metadata), or raise LCMModelError naming the file.

    Pickle-based formats (``.ckpt``, ``.pt``, ``.bin``, ``.pth``) are refused: unpickling can run code.
    """
    name = os.path.basename(path)
    ext = os.path.splitext(path)[1].lower()
    if ext != ".safetensors":
        raise LCMModelError(
            f"{what} {name!r} is a {ext or 'extensionless'} file; only .safetensors is read, because pickled "
            "formats (.ckpt/.pt/.bin) can run code when loaded. Convert it once, from the lcm-nodes folder, with "
            f"`python -m lcm_tools convert {path}` (reads tensors only, never code) or download the .safetensors release."
        )
    if not os.path.isfile(path):
        raise LCMModelError(f"{what} {name!r} does not exist at {path}.")
    if os.path.getsize(path) == 0:
        raise LCMModelError(f"{what} {name!r} is empty (0 bytes): the download or copy failed; fetch it again.")
    try:
        from safetensors import safe_open

        tensors: dict[str, torch.Tensor] = {}
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    except Exception as exc:  # safetensors raises its own SafetensorError / OSError types
        raise LCMModelError(
            f"{what} {name!r} is not a readable safetensors file ({type(exc).__name__}: {exc}); "
            "it is probably truncated or corrupt: download it again."
        ) from exc
    if not tensors:
        raise LCMModelError(f"{what} {name!r} holds no tensors.")
    return tensors, metadata


def diffusers_unet_files(folder: str | os.PathLike) -> tuple[str, str | None] | None:
    """The UNet of a diffusers model folder: (weights file, its config.json or None), or None when it has none.

    Looks in ``folder/unet/`` first (a whole pipeline's folder), then in ``folder`` itself (a UNet's own folder),
    for :data:`DIFFUSERS_WEIGHTS_NAMES` in that order.
    """
    for sub in (os.path.join(folder, DIFFUSERS_UNET_SUBFOLDER), os.fspath(folder)):
        for fname in DIFFUSERS_WEIGHTS_NAMES:
            weights = os.path.join(sub, fname)
            if os.path.isfile(weights):
                cfg = os.path.join(sub, DIFFUSERS_CONFIG_NAME)
                return weights, cfg if os.path.isfile(cfg) else None
    return None


def resolve_unet_files(path: str) -> tuple[str, str | None]:
    """For a UNet path (a file, or a diffusers model folder), return (weights file, config.json or None)."""
    if os.path.isdir(path):
        found = diffusers_unet_files(path)
        if found is None:
            raise LCMModelError(
                f"diffusers folder {os.path.basename(path.rstrip(os.sep))!r} has no {' or '.join(DIFFUSERS_WEIGHTS_NAMES)} "
                f"(in it or in its {DIFFUSERS_UNET_SUBFOLDER}/ sub-folder): download the model's {DIFFUSERS_UNET_SUBFOLDER} "
                "weights in .safetensors form into it."
            )
        return found
    base = os.path.splitext(path)[0]
    for cfg in (base + ".json", base.replace(".fp16", "") + ".json", os.path.join(os.path.dirname(path), DIFFUSERS_CONFIG_NAME)):
        if os.path.isfile(cfg):
            return path, cfg
    return path, None
