"""Checks of the MODEL, CONDITIONING and LATENT a sampler is given, shared by the LCM and TCD samplers.

Each check raises :class:`~lcm_core.errors.LCMInputError` naming the input, the bad value and the fix, before
any model work starts.
"""

from __future__ import annotations

from typing import Any

import torch

from ..lcm_core.errors import LCMInputError
from ..lcm_core.unet_format import SD15, SDXL

# ComfyUI's model config class names (comfy/supported_models.py) as the pack's messages spell the families.
FAMILY_NAMES = {
    "SD15": SD15, "SDXL": SDXL, "SSD1B": "SSD-1B", "SD20": "SD2.x", "SDXLRefiner": "SDXL Refiner",
    "Segmind_Vega": "Segmind Vega", "KOALA_700M": "KOALA-700M", "KOALA_1B": "KOALA-1B",
}

# The largest LATENT the samplers take, checked before anything is allocated for it. These are ComfyUI's own
# limits for an Empty Latent Image (nodes.py: width and height up to MAX_RESOLUTION = 16384 px, batch_size up to
# 4096): the latent pixels (batch x height x width) of one 16384 x 16384 px image at the 8x downscale of the
# SD1.5/SDXL VAEs, however a batch shares them, and at most 4096 latents. SDXL at 1024 x 1024 px, batch 8, is 1/32
# of the pixel limit; a 16384 x 16384 px batch of 64 is 64 times over it.
MAX_LATENT_PIXELS = 2048 * 2048
MAX_LATENT_BATCH = 4096


def model_family(model) -> str:
    """The MODEL's family as messages name it (``SD1.5``, ``SDXL``, ``SSD-1B``, ...), from ComfyUI's model config."""
    name = type(model.model.model_config).__name__
    return FAMILY_NAMES.get(name, name)


def check_latent_size(shape: tuple[int, ...]) -> None:
    """LCMInputError unless a [batch, channels, height, width] LATENT is within :data:`MAX_LATENT_BATCH` and
    :data:`MAX_LATENT_PIXELS`; reads the shape only."""
    batch, _, height, width = shape
    if batch > MAX_LATENT_BATCH:
        raise LCMInputError(
            f"latent_image has a batch of {batch} latents; the samplers take at most {MAX_LATENT_BATCH} (Empty Latent "
            "Image's largest batch_size): lower batch_size, or queue the batch in parts."
        )
    pixels = batch * height * width
    if pixels > MAX_LATENT_PIXELS:
        raise LCMInputError(
            f"latent_image is too large: {batch} latent(s) of {width} x {height} (width x height) is {pixels:,} latent "
            f"pixels; the samplers take at most {MAX_LATENT_PIXELS:,} (one 16384 x 16384 px image, ComfyUI's largest "
            "Empty Latent Image, however a batch shares them): lower the width, height or batch_size, or queue the batch "
            "in parts."
        )


def check_latent(latent: Any, model) -> torch.Tensor:
    """The LATENT's samples, or LCMInputError naming what is wrong (shape, size, channels, NaN/Inf) and the fix."""
    if not isinstance(latent, dict) or not isinstance(latent.get("samples"), torch.Tensor):
        raise LCMInputError("latent_image is not a LATENT ({'samples': tensor}): connect Empty Latent Image or VAE Encode.")
    samples = latent["samples"]
    if samples.ndim != 4:
        raise LCMInputError(f"latent_image has shape {tuple(samples.shape)}; an image latent is 4-D [batch, channels, h, w].")
    if samples.shape[0] < 1 or samples.shape[2] < 1 or samples.shape[3] < 1:
        raise LCMInputError(f"latent_image has an empty dimension: shape {tuple(samples.shape)}.")
    check_latent_size(tuple(samples.shape))  # before the checks below read (and allocate for) every value
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
