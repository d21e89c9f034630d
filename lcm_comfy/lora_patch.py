"""Apply LCM-LoRA: a LoRA file onto a ComfyUI MODEL, every module landing or a clear error, then LCM setup.

Parsing and matching are :mod:`lcm_core.lora`'s (any circulating format; a :class:`~lcm_core.lora.LoRAReport`
of what landed); this module supplies ComfyUI's side: the model's LoRA key map (ComfyUI's own plus every
diffusers name of the model's layout), the weight shapes, ``comfy.lora.load_lora`` and ``ModelPatcher.add_patches``.
"""

from __future__ import annotations

import logging
import math
import os

import comfy.lora
import comfy.utils

from ..lcm_core.errors import LCMInputError, LCMLoRAError
from ..lcm_core.lora import LoRAReport, check_fit, group_lora_modules, match_lora
from ..lcm_core.unet_format import classify_state_dict
from ..lcm_core.weights import load_safetensors
from .checks import model_family
from .model_sampling import has_guidance_embedding, setup_lcm

log = logging.getLogger("lcm_nodes")


def lora_key_map(model) -> dict[str, str]:
    """Module name -> model weight key, for every name a LoRA may use for this model's UNet layers."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    unet_config = model.model.model_config.unet_config
    for dkey, ldm in comfy.utils.unet_to_diffusers(unet_config).items():
        if dkey.endswith(".weight"):
            target = f"diffusion_model.{ldm}"
            base = dkey[: -len(".weight")]
            key_map.setdefault(base, target)
            key_map.setdefault("unet." + base, target)
    if has_guidance_embedding(model):
        key_map.setdefault("time_embedding.cond_proj", "diffusion_model.time_embed.cond_proj.weight")
    return key_map


def apply_lcm_lora(model, lora_path: str, strength: float = 1.0, allow_partial: bool = False):
    """Apply a LoRA file to a clone of ``model`` and set it up for LCM. Returns ``(model, LoRAReport)``.

    Every UNet module of the file must land on a layer of matching shape, or LCMLoRAError names the file,
    the model family and what did not fit (``allow_partial`` applies what fits and warns instead).
    """
    if not math.isfinite(strength):
        raise LCMInputError(f"strength={strength} is not a finite number: use 1.0 (what LCM-LoRAs are made for).")
    name = os.path.basename(lora_path)
    sd, _ = load_safetensors(lora_path, "LoRA")
    kind = classify_state_dict(sd.keys())
    if kind != "lora":
        raise LCMLoRAError(
            f"{name!r} is not a LoRA (it looks like a {kind.replace('_', ' ')}); pick an LCM-LoRA such as lcm-lora-sdxl.safetensors."
        )
    try:
        groups = group_lora_modules(sd)
    except LCMLoRAError as exc:
        raise LCMLoRAError(f"LoRA {name!r}: {exc}") from None
    shapes = {k: tuple(v.shape) for k, v in model.model.state_dict().items()}
    match = match_lora(groups, lora_key_map(model), shapes)
    report: LoRAReport = match.report
    family = model_family(model)
    check_fit(report, name, family, allow_partial)
    patches = comfy.lora.load_lora(match.tensors, match.targets, log_missing=False)
    if len(patches) != report.landed:
        raise LCMLoRAError(f"LoRA {name!r}: ComfyUI accepted {len(patches)} of {report.landed} matched modules.")
    m = model.clone()
    m.add_patches(patches, strength)
    log.info("LoRA %r on %s: %s at strength %s.", name, family, report.summary(), strength)
    patched = setup_lcm(m, guidance_scale=None)
    # ComfyUI hands a loaded model's slot to its parent when the model is freed, so that the next clone of
    # the same network finds and replaces it. The intermediate clone ``m`` dies with ``patched``; the slot
    # must go to the MODEL that was passed in (as with ComfyUI's own LoraLoader), not to a dead parent.
    patched.parent = model
    return patched, report
