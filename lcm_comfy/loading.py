"""Load LCM UNet: the model files it offers, and a UNet file or diffusers folder as a ComfyUI MODEL set up for LCM,
guidance embedding kept.

The files are found in ComfyUI's model folders (``folder_paths``: ``diffusion_models`` and ``diffusers``), read
by :mod:`lcm_core.weights` (safetensors only), the layout by :mod:`lcm_core.unet_format`; the model is built by
ComfyUI (``comfy.utils.unet_to_diffusers`` for the renaming, ``comfy.sd.load_diffusion_model_state_dict``), and
the guidance projection ComfyUI's UNet lacks is put back as a :class:`~lcm_core.guidance.GuidedTimeEmbedding`.
"""

from __future__ import annotations

import os

import comfy.sd
import comfy.utils
import folder_paths
import torch

from ..lcm_core.config import check_guidance
from ..lcm_core.errors import LCMInputError, LCMModelError
from ..lcm_core.guidance import GuidedTimeEmbedding
from ..lcm_core.unet_format import COND_PROJ_KEY, check_unet_config, classify_state_dict, diffusers_unet_layout
from ..lcm_core.weights import DIFFUSERS_WEIGHTS_NAME, diffusers_unet_files, load_safetensors, resolve_unet_files
from .model_sampling import DEFAULT_LCM_GUIDANCE, setup_lcm

# Load LCM UNet's weight_dtype choices, in the order the node shows them; None lets ComfyUI pick for the device.
WEIGHT_DTYPES: dict[str, torch.dtype | None] = {"default": None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

# How a diffusers model folder appears among the UNet choices: "diffusers/<folder name>".
DIFFUSERS_PREFIX = "diffusers/"


# ------------------------------------------------------------------------------------------ finding the files


def safe_name(name: str, what: str) -> str:
    """``name`` (a model list entry) if it stays inside ComfyUI's model folders, else LCMInputError naming ``what``."""
    if not isinstance(name, str) or not name:
        raise LCMInputError(f"{what} is empty: pick a file from the list.")
    norm = name.replace("\\", "/")
    if os.path.isabs(name) or norm.startswith("/") or ".." in norm.split("/"):
        raise LCMInputError(f"{what} {name!r} leaves ComfyUI's model folders; pick a file from the list (absolute paths and '..' are refused).")
    return name


def diffusers_unet_folders() -> list[str]:
    """The diffusers model folders with a UNet under ComfyUI's ``diffusers`` model folders, as ``diffusers/<name>``."""
    names = []
    for root in folder_paths.get_folder_paths("diffusers"):
        if not os.path.isdir(root):
            continue
        for entry in sorted(os.listdir(root)):
            if diffusers_unet_files(os.path.join(root, entry)) is not None:
                names.append(DIFFUSERS_PREFIX + entry)
    return names


def unet_choices() -> list[str]:
    """Load LCM UNet's ``unet_name`` list: the .safetensors files in ``diffusion_models``, then the diffusers folders."""
    files = [f for f in folder_paths.get_filename_list("diffusion_models") if f.lower().endswith(".safetensors")]
    return files + diffusers_unet_folders()


def lora_choices() -> list[str]:
    """Apply LCM-LoRA's ``lora_name`` list: the .safetensors files in ``loras``."""
    return [f for f in folder_paths.get_filename_list("loras") if f.lower().endswith(".safetensors")]


def resolve_unet(name: str) -> str:
    """The path of a ``unet_name`` entry (a file, or a diffusers folder), or an error naming it and where it was looked for."""
    safe_name(name, "unet_name")
    if name.startswith(DIFFUSERS_PREFIX):
        folder = name[len(DIFFUSERS_PREFIX):]
        for root in folder_paths.get_folder_paths("diffusers"):
            path = os.path.join(root, folder)
            if os.path.isdir(path):
                return path
        raise LCMInputError(f"diffusers folder {folder!r} was not found under {folder_paths.get_folder_paths('diffusers')}.")
    return folder_paths.get_full_path_or_raise("diffusion_models", name)


def resolve_lora(name: str) -> str:
    """The path of a ``lora_name`` entry in ComfyUI's ``loras`` folders."""
    safe_name(name, "lora_name")
    return folder_paths.get_full_path_or_raise("loras", name)


# ------------------------------------------------------------------------------------------ checks


def check_weight_dtype(weight_dtype: object) -> torch.dtype | None:
    """The torch dtype of a ``weight_dtype`` choice (None: ComfyUI's choice), else LCMInputError listing the choices."""
    if not isinstance(weight_dtype, str) or weight_dtype not in WEIGHT_DTYPES:
        raise LCMInputError(f"weight_dtype={weight_dtype!r} is not one of {list(WEIGHT_DTYPES)}: pick one from the list.")
    return WEIGHT_DTYPES[weight_dtype]


def check_default_guidance(value: object) -> float:
    """``default_guidance`` as a float in [0, MAX_GUIDANCE], else LCMInputError with the value, the range and the fix."""
    return check_guidance(value, f"{DEFAULT_LCM_GUIDANCE:g} is what LCM UNets are made for", "default_guidance")


# ------------------------------------------------------------------------------------------ loading


def _attach_guidance_embedding(patcher, weight: torch.Tensor) -> None:
    diffusion_model = patcher.model.diffusion_model
    time_embed = diffusion_model.time_embed
    first = time_embed[0]
    out_features, in_features = weight.shape
    if out_features != first.weight.shape[1]:
        raise LCMModelError(
            f"time_embedding.cond_proj maps to {out_features} channels but the timestep embedding has "
            f"{first.weight.shape[1]}: the file is inconsistent."
        )
    cond_proj = type(first)(in_features, out_features, bias=False, dtype=first.weight.dtype, device=first.weight.device)
    with torch.no_grad():
        cond_proj.weight.copy_(weight.to(first.weight.dtype))
    cond_proj.weight.requires_grad_(first.weight.requires_grad)  # as ComfyUI's own weights (inference only)
    diffusion_model.time_embed = GuidedTimeEmbedding(time_embed, cond_proj)


def load_lcm_unet(path: str, weight_dtype: str = "default", default_guidance: float = DEFAULT_LCM_GUIDANCE):
    """Load a UNet file or diffusers folder as a ComfyUI MODEL set up for LCM sampling.

    diffusers-format weights are renamed to ComfyUI's layout with ``comfy.utils.unet_to_diffusers``
    (the layout read from the weights, so shapes outside ComfyUI's fixed list load too); ldm-format
    UNets and full checkpoints go straight to ``comfy.sd.load_diffusion_model_state_dict``. The guidance
    embedding (``time_embedding.cond_proj``) is kept when present.
    """
    check_weight_dtype(weight_dtype)
    check_default_guidance(default_guidance)
    weights_path, config_path = resolve_unet_files(path)
    sd, _ = load_safetensors(weights_path, "UNet")
    return load_lcm_unet_state_dict(sd, os.path.basename(path.rstrip(os.sep)), weight_dtype, default_guidance, config_path)


def load_lcm_unet_state_dict(sd: dict, name: str, weight_dtype: str = "default",
                             default_guidance: float = DEFAULT_LCM_GUIDANCE, config_path: str | None = None):
    """:func:`load_lcm_unet` for weights already in memory (``sd`` is consumed)."""
    dtype = check_weight_dtype(weight_dtype)
    default_guidance = check_default_guidance(default_guidance)
    kind = classify_state_dict(sd.keys())
    cond_weight = None
    if kind == "diffusers_unet":
        layout = diffusers_unet_layout(sd)
        check_unet_config(config_path, layout)
        cond_weight = sd.pop(COND_PROJ_KEY, None)
        key_map = comfy.utils.unet_to_diffusers(layout.comfy_unet_config())
        # The map also names optional weights (conv_shortcut only exists where channels change): take what is there.
        ldm_sd = {key_map[k]: sd.pop(k) for k in list(key_map) if k in sd}
        if sd:
            raise LCMModelError(
                f"UNet {name!r} has {len(sd)} weight(s) ComfyUI's UNet has no place for (e.g. {next(iter(sd))!r}): "
                "this UNet2DConditionModel variant cannot run in ComfyUI."
            )
        sd = ldm_sd
    elif kind in ("ldm_unet", "checkpoint"):
        for key in [k for k in sd if k.endswith(("time_embed.cond_proj.weight", "time_embedding.cond_proj.weight"))]:
            cond_weight = sd.pop(key)
    else:
        hint = {
            "vae": "it is a VAE; load it with Load VAE",
            "text_encoder": "it is a text encoder; load it with Load CLIP",
            "lora": "it is a LoRA; apply it with Apply LCM-LoRA",
            "controlnet": "it is a ControlNet; load it with Load ControlNet Model",
        }.get(kind, "it holds no UNet weights")
        raise LCMModelError(f"{name!r} is not a UNet: {hint}. Pick a UNet file (e.g. lcm-sdxl's {DIFFUSERS_WEIGHTS_NAME}).")
    try:
        patcher = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": dtype} if dtype else {})
    except Exception as exc:
        raise LCMModelError(f"ComfyUI could not build a model from UNet {name!r}: {type(exc).__name__}: {exc}") from exc
    if patcher is None:
        raise LCMModelError(
            f"ComfyUI does not recognise the shape of UNet {name!r} (model_channels, context_dim or adm size "
            "match no supported SD1.x/SD2.x/SDXL family), so it cannot run it."
        )
    if cond_weight is not None:
        _attach_guidance_embedding(patcher, cond_weight)
    return setup_lcm(patcher, guidance_scale=default_guidance)
