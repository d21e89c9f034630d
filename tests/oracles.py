"""Test oracles: translation between ComfyUI's LATENT / CONDITIONING and diffusers' pipeline arguments, and
diffusers' LCM noise sequence drawn in one go.

The pack itself never needs these (it runs on ComfyUI's objects); the tests use them to call diffusers on the
same inputs as a node.

ComfyUI keeps raw VAE latents in ``LATENT["samples"]`` and scales them by the model's latent format
on the way into the UNet; diffusers pipelines take and return latents already multiplied by the VAE's
``scaling_factor``. ComfyUI CONDITIONING is a list of ``[cond, options]`` pairs where SDXL keeps the
pooled CLIP-G output and the size/crop micro-conditioning in ``options``; diffusers wants
``prompt_embeds``, ``pooled_prompt_embeds`` and ``add_time_ids``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lcm_core.errors import LCMInputError
from lcm_core.noise import SeededNoise, check_seed

#: ``scaling_factor`` of the VAE each model family was trained with.
LATENT_SCALE_FACTORS: dict[str, float] = {"sd15": 0.18215, "sd2": 0.18215, "sdxl": 0.13025}


def latent_to_diffusers(samples: torch.Tensor, scale_factor: float) -> torch.Tensor:
    """ComfyUI raw VAE latent -> diffusers' scaled latent (``samples * scale_factor``)."""
    return samples * scale_factor


def latent_from_diffusers(latents: torch.Tensor, scale_factor: float) -> torch.Tensor:
    """diffusers' scaled latent -> ComfyUI raw VAE latent (``latents / scale_factor``)."""
    return latents / scale_factor


@dataclass(frozen=True)
class DiffusersConditioning:
    """What a diffusers SD/SDXL pipeline takes for one prompt batch.

    ``pooled_prompt_embeds`` and ``add_time_ids`` are ``None`` for SD1.x/2.x.
    ``add_time_ids`` is ``[B, 6]``: original (h, w), crop (top, left), target (h, w), in pixels.
    """

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor | None = None
    add_time_ids: torch.Tensor | None = None


def _unpack_conditioning(conditioning: Any, name: str) -> tuple[torch.Tensor, dict]:
    if not isinstance(conditioning, (list, tuple)) or not conditioning:
        raise LCMInputError(f"{name} is not a CONDITIONING (a non-empty list of [tensor, dict]); connect a text encoder output.")
    entry = conditioning[0]
    if not isinstance(entry, (list, tuple)) or len(entry) < 2 or not isinstance(entry[0], torch.Tensor) or not isinstance(entry[1], dict):
        raise LCMInputError(f"{name} entry 0 is not [tensor, dict]: connect a CLIP Text Encode output.")
    if len(conditioning) > 1:
        raise LCMInputError(
            f"{name} holds {len(conditioning)} conditioning entries; only one maps onto a diffusers call. Combine them first."
        )
    return entry[0], entry[1]


def conditioning_to_diffusers(
    conditioning: list, latent_size: tuple[int, int] | None = None, downscale: int = 8
) -> DiffusersConditioning:
    """ComfyUI CONDITIONING (one entry) -> :class:`DiffusersConditioning`.

    For SDXL (``pooled_output`` present with ``cond`` of width 2048) the micro-conditioning is read from
    ``width``/``height``/``crop_w``/``crop_h``/``target_width``/``target_height``, defaulting like ComfyUI
    does to the latent's size times ``downscale`` (``latent_size`` is ``(h, w)`` in latent pixels).
    """
    cond, opts = _unpack_conditioning(conditioning, "conditioning")
    pooled = opts.get("pooled_output")
    if cond.shape[-1] != 2048 or pooled is None:
        return DiffusersConditioning(prompt_embeds=cond)
    if latent_size is None:
        default_h = default_w = None
    else:
        default_h, default_w = latent_size[0] * downscale, latent_size[1] * downscale
    height = opts.get("height", default_h)
    width = opts.get("width", default_w)
    if height is None or width is None:
        raise LCMInputError("SDXL conditioning has no width/height and no latent_size was given to default them from.")
    ids = [
        height,
        width,
        opts.get("crop_h", 0),
        opts.get("crop_w", 0),
        opts.get("target_height", height),
        opts.get("target_width", width),
    ]
    add_time_ids = torch.tensor([ids], dtype=cond.dtype).repeat(cond.shape[0], 1)
    return DiffusersConditioning(prompt_embeds=cond, pooled_prompt_embeds=pooled, add_time_ids=add_time_ids)


def diffusers_to_conditioning(
    prompt_embeds: torch.Tensor,
    pooled_prompt_embeds: torch.Tensor | None = None,
    add_time_ids: torch.Tensor | None = None,
) -> list:
    """diffusers prompt embeddings -> ComfyUI CONDITIONING (the inverse of :func:`conditioning_to_diffusers`)."""
    opts: dict[str, Any] = {}
    if pooled_prompt_embeds is not None:
        opts["pooled_output"] = pooled_prompt_embeds
    if add_time_ids is not None:
        ids = [int(round(float(v))) for v in add_time_ids[0].tolist()]
        if len(ids) != 6:
            raise LCMInputError(f"add_time_ids must have 6 entries per row (SDXL), got {len(ids)}.")
        keys = ("height", "width", "crop_h", "crop_w", "target_height", "target_width")
        opts.update(dict(zip(keys, ids, strict=True)))
    return [[prompt_embeds, opts]]


@dataclass(frozen=True)
class NoiseStream:
    """Initial and per-step noise for one sampling run (``steps[i]`` re-noises after step ``i``)."""

    initial: torch.Tensor
    steps: tuple[torch.Tensor, ...]


def draw_noise(seed: int, shape: tuple[int, ...], num_steps: int, dtype: torch.dtype = torch.float32) -> NoiseStream:
    """The noise diffusers' LCM pipelines draw for ``num_steps`` steps on a latent of ``shape``, in one go."""
    check_seed(seed)
    if num_steps < 1:
        raise LCMInputError(f"num_steps={num_steps} must be at least 1.")
    noise = SeededNoise(seed, shape, dtype)
    initial = noise.draw()
    return NoiseStream(initial=initial, steps=tuple(noise.draw() for _ in range(num_steps - 1)))
