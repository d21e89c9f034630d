"""The LCM multi-step consistency step: the one copy production runs.

``LCMScheduler.step`` (Luo et al. 2023, Algorithm 3) in three named pieces, in the paper's symbols:

1. ``x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)``                      :func:`predicted_original`
2. ``denoised = c_out(t) x0 + c_skip(t) x_t``                            :func:`consistency_denoise`
   with the boundary condition ``(c_skip, c_out)`` of :func:`boundary_scalings`
3. ``x_prev = sqrt(a_prev) denoised + sqrt(1 - a_prev) z``, ``z ~ N(0, I)``, skipped after the last step
                                                                         :func:`renoise`

:func:`lcm_step` composes them on diffusers' inputs and is tested against ``diffusers.LCMScheduler.step``
per step. The ComfyUI sampler runs the same functions: :func:`consistency_denoise` inside its model sampling
(``lcm_comfy.model_sampling.LCMModelSampling.calculate_denoised``) and :func:`renoise` in its loop
(``lcm_comfy.sampler``). Pure torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def boundary_scalings(timestep: torch.Tensor | float, timestep_scaling: float = 10.0, sigma_data: float = 0.5):
    """Consistency-model boundary condition ``(c_skip, c_out)`` at a discrete timestep.

    ``c_skip = sigma_data^2 / ((s t)^2 + sigma_data^2)`` and ``c_out = s t / sqrt((s t)^2 + sigma_data^2)``
    with ``s = timestep_scaling`` (10 for every public LCM); c_skip -> 1, c_out -> 0 as t -> 0.
    """
    scaled = timestep * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def _as(value: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(value, dtype=like.dtype, device=like.device)


def predicted_original(sample: torch.Tensor, eps: torch.Tensor, alpha_prod_t: torch.Tensor | float) -> torch.Tensor:
    """x0 from an epsilon prediction: ``(x_t - sqrt(1 - a_t) eps) / sqrt(a_t)``."""
    alpha = _as(alpha_prod_t, sample)
    return (sample - (1 - alpha).sqrt() * eps) / alpha.sqrt()


def consistency_denoise(
    sample: torch.Tensor,
    eps: torch.Tensor,
    timestep: torch.Tensor | int,
    alpha_prod_t: torch.Tensor | float,
    timestep_scaling: float = 10.0,
) -> torch.Tensor:
    """The consistency function ``f(x_t, t) = c_skip x_t + c_out x0``: ``LCMScheduler.step``'s ``denoised``."""
    c_skip, c_out = boundary_scalings(timestep, timestep_scaling)
    return c_out * predicted_original(sample, eps, alpha_prod_t) + c_skip * sample


def renoise(denoised: torch.Tensor, noise: torch.Tensor, alpha_prod_next: torch.Tensor | float) -> torch.Tensor:
    """Forward-diffuse a clean estimate to the next timestep: ``sqrt(a) x0 + sqrt(1 - a) noise``."""
    alpha = _as(alpha_prod_next, denoised)
    return alpha.sqrt() * denoised + (1 - alpha).sqrt() * noise


@dataclass(frozen=True)
class StepOutput:
    """``prev_sample`` is the next loop state; ``denoised`` the step's clean estimate (the final image latent)."""

    prev_sample: torch.Tensor
    denoised: torch.Tensor


def lcm_step(
    eps: torch.Tensor,
    timestep: int,
    sample: torch.Tensor,
    alpha_prod_t: torch.Tensor | float,
    alpha_prod_prev: torch.Tensor | float,
    noise: torch.Tensor | None,
    timestep_scaling: float = 10.0,
) -> StepOutput:
    """One LCM step on diffusers' variance-preserving latents (``LCMScheduler.step``).

    ``noise`` is ``None`` on the last step (diffusers then returns ``denoised`` as ``prev_sample``);
    ``alpha_prod_prev`` is the next timestep's ``alphas_cumprod`` (diffusers' ``final_alpha_cumprod`` after the last).
    """
    denoised = consistency_denoise(sample, eps, timestep, alpha_prod_t, timestep_scaling)
    if noise is None:
        return StepOutput(prev_sample=denoised, denoised=denoised)
    return StepOutput(prev_sample=renoise(denoised, noise, alpha_prod_prev), denoised=denoised)
