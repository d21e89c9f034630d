"""Checks of the MODEL, CONDITIONING and LATENT a sampler is given, shared by the LCM and TCD samplers.

Each check raises :class:`~lcm_core.errors.LCMInputError` naming the input, the bad value and the fix, before
any model work starts.
"""

from __future__ import annotations

from typing import Any

import torch

from ..lcm_core.errors import LCMInputError


def model_family(model) -> str:
    """The ComfyUI model config's class name (``SD15``, ``SDXL``, ``SSD1B``, ...), for messages."""
    return type(model.model.model_config).__name__


def check_latent(latent: Any, model) -> torch.Tensor:
    """The LATENT's samples, or LCMInputError naming what is wrong (shape, channels, NaN/Inf) and the fix."""
    if not isinstance(latent, dict) or not isinstance(latent.get("samples"), torch.Tensor):
        raise LCMInputError("latent_image is not a LATENT ({'samples': tensor}): connect Empty Latent Image or VAE Encode.")
    samples = latent["samples"]
    if samples.ndim != 4:
        raise LCMInputError(f"latent_image has shape {tuple(samples.shape)}; an image latent is 4-D [batch, channels, h, w].")
    if samples.shape[0] < 1 or samples.shape[2] < 1 or samples.shape[3] < 1:
        raise LCMInputError(f"latent_image has an empty dimension: shape {tuple(samples.shape)}.")
    channels = model.get_model_object("latent_format").latent_channels
    if samples.shape[1] != channels and torch.count_nonzero(samples) > 0:
        raise LCMInputError(
            f"latent_image has {samples.shape[1]} channels but this model works on {channels}: it was encoded by "
            "another model family's VAE; encode the image with this model's VAE."
        )
    if not torch.isfinite(samples).all():
        raise LCMInputError("latent_image contains NaN or Inf values: re-encode the image (an fp16 VAE overflow is the usual cause).")
    return samples


def check_conditioning(cond: Any, name: str, model, batch: int) -> None:
    """LCMInputError unless ``cond`` is a CONDITIONING this model can use for a latent batch of ``batch``."""
    if not isinstance(cond, list) or not cond:
        raise LCMInputError(f"{name} is not a CONDITIONING: connect a CLIP Text Encode output.")
    unet_config = model.model.model_config.unet_config
    context_dim = unet_config.get("context_dim")
    for i, entry in enumerate(cond):
        if not isinstance(entry, (list, tuple)) or len(entry) < 2 or not isinstance(entry[0], torch.Tensor):
            raise LCMInputError(f"{name} entry {i} is not [tensor, dict]: connect a CLIP Text Encode output.")
        emb = entry[0]
        if context_dim is not None and emb.shape[-1] != context_dim:
            raise LCMInputError(
                f"{name} has text embeddings of width {emb.shape[-1]} but the model expects {context_dim} "
                f"({model_family(model)}): encode the prompt with the CLIP of this model's checkpoint."
            )
        if emb.shape[0] not in (1, batch) and batch % emb.shape[0] != 0:
            raise LCMInputError(
                f"{name} has batch {emb.shape[0]} but latent_image has batch {batch}: use one prompt, or as many as latents."
            )
        if not torch.isfinite(emb).all():
            raise LCMInputError(f"{name} contains NaN or Inf values.")
        if unet_config.get("adm_in_channels") == 2816 and entry[1].get("pooled_output") is None:
            raise LCMInputError(f"{name} has no pooled_output, which SDXL needs: encode it with an SDXL CLIP.")


def zero_conditioning(cond: list) -> list:
    """``cond`` with every tensor zeroed: the negative diffusers' SDXL pipeline uses when none is given."""
    out = []
    for emb, opts in cond:
        opts = dict(opts)
        if opts.get("pooled_output") is not None:
            opts["pooled_output"] = torch.zeros_like(opts["pooled_output"])
        out.append([torch.zeros_like(emb), opts])
    return out
