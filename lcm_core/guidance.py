"""The guidance-scale (w) embedding of LCM-distilled UNets.

LCM UNets distilled with guidance (``latent-consistency/lcm-sdxl``, ``LCM_Dreamshaper_v7``) take the
guidance scale as an extra embedding added inside the timestep MLP, through a ``time_embedding.cond_proj``
linear layer (diffusers config ``time_cond_proj_dim``, 256 for every public LCM). ComfyUI's UNet has no such
layer and drops the weight; :class:`GuidedTimeEmbedding` puts it back without changing any existing key.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def guidance_embedding(w: torch.Tensor, embedding_dim: int = 256, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sinusoidal embedding of guidance weights ``w`` (shape ``[B]``) into ``[B, embedding_dim]``.

    The same formula as diffusers' ``get_guidance_scale_embedding`` (VDM, Kingma et al.): ``w`` is scaled by
    1000, half the channels hold ``sin(w f_i)`` and half ``cos(w f_i)`` with ``f_i = 10000^(-i / (half - 1))``;
    an odd ``embedding_dim`` is zero-padded. LCM pipelines call it with ``w = guidance_scale - 1``.
    """
    if w.ndim != 1:
        raise ValueError(f"w must be 1-D [batch], got shape {tuple(w.shape)}")
    if embedding_dim < 4:
        raise ValueError(f"embedding_dim must be at least 4, got {embedding_dim}")
    w = w * 1000.0
    half = embedding_dim // 2
    step = torch.log(torch.tensor(10000.0)) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=dtype) * -step)
    angles = w.to(dtype)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if embedding_dim % 2 == 1:
        emb = nn.functional.pad(emb, (0, 1))
    return emb


def guidance_w(guidance_scale: float) -> float:
    """The ``w`` LCM pipelines embed for a user-facing guidance scale: ``guidance_scale - 1``."""
    if not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale must be finite, got {guidance_scale}")
    return float(guidance_scale) - 1.0


class GuidedTimeEmbedding(nn.Sequential):
    """A ComfyUI ``time_embed`` (Linear, SiLU, Linear) with the LCM guidance projection added back.

    ``forward(t_emb)`` computes ``linear_2(act(linear_1(t_emb + cond_proj(c))))`` where ``c`` is the
    guidance embedding held in :attr:`condition` (``[1, dim]`` or ``[B, dim]``), exactly diffusers'
    ``TimestepEmbedding`` with ``timestep_cond``. With :attr:`condition` ``None`` it is the plain MLP.
    Sub-modules keep the names ``0``, ``1``, ``2`` so every existing state-dict and LoRA key still lands;
    the new weight is ``cond_proj.weight``.
    """

    def __init__(self, time_embed: nn.Sequential, cond_proj: nn.Module):
        super().__init__(*time_embed)
        self.cond_proj = cond_proj
        self.condition: torch.Tensor | None = None

    @property
    def cond_dim(self) -> int:
        return int(self.cond_proj.weight.shape[1])

    def set_condition(self, condition: torch.Tensor | None) -> None:
        """Set the guidance embedding, copying it into a persistent buffer when shapes allow.

        Keeping one buffer means a CUDA graph captured with the embedding reads the new value on replay.
        """
        if condition is None:
            self.condition = None
            return
        buf = getattr(self, "_condition_buffer", None)
        if buf is None or buf.shape != condition.shape or buf.device != condition.device or buf.dtype != condition.dtype:
            buf = condition.clone()
            self._condition_buffer = buf
        else:
            # a buffer made inside ComfyUI's inference mode is updated in that mode, also from a library call made
            # outside it (updating it in place keeps a captured graph reading the new value)
            with torch.inference_mode(buf.is_inference()):
                buf.copy_(condition)
        self.condition = buf

    def forward(self, t_emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if self.condition is not None:
            t_emb = t_emb + self.cond_proj(self.condition.to(device=t_emb.device, dtype=t_emb.dtype))
        return self[2](self[1](self[0](t_emb)))
