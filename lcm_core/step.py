"""The consistency-model family's steps: LCM's and TCD's, the functions production runs. Pure torch.

Both start from the same prediction and end in the same noising function, in the papers' symbols:

- ``x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)``                                   :func:`predicted_original`
- ``noised(x, z, a) = sqrt(a) x + sqrt(1 - a) z``                                   :func:`renoise`

**LCM** (Luo et al. 2023, Algorithm 3; ``LCMScheduler.step``), :func:`lcm_step`:

1. ``denoised = c_out(t) x0 + c_skip(t) x_t``, the boundary condition of :func:`boundary_scalings`
   (:func:`consistency_denoise`);
2. ``x_prev = noised(denoised, z, a_prev)``, ``z ~ N(0, I)``, skipped after the last step.

**TCD** (Zheng et al. 2024, strategic stochastic sampling; ``TCDScheduler.step`` with ``eta = gamma``),
:func:`tcd_step`: no boundary condition, the model output is plain epsilon;

1. ``s = floor((1 - gamma) t_prev)``                                                :func:`intermediate_timestep`
2. ``x_s = noised(x0, eps, a_s)``: jump along the predicted trajectory to ``s``;
3. ``x_prev = noised(x_s, z, a_prev / a_s)``: re-noise forward to ``t_prev``; skipped on the last step and
   whenever ``gamma == 0`` (:func:`step_draws_noise`). After the last step ``t_prev`` is 0, so the result is
   ``x_s`` at ``s = 0`` (``a_0 = 0.99915``, not 1: a trace of ``eps`` stays, as in diffusers).

Scalars (``a_t``, the boundary scalings) are computed in their own precision (float32 for the schedule's
``alphas_cumprod``) and only then meet the latents, exactly as diffusers' schedulers do; an fp16 latent
therefore gets the same coefficients as diffusers gives it. Tested per step against ``LCMScheduler.step``
and ``TCDScheduler.step`` in float32 and float16. The ComfyUI samplers run these same functions: LCM's
:func:`consistency_denoise` inside its model sampling and :func:`renoise` in the adapter's loop step
(:func:`lcm_step` composes the two, for the per-step test), TCD's :func:`tcd_step` in the loop step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .schedule import check_fraction

DEFAULT_GAMMA = 0.3


def _scalar(value: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """``value`` on ``like``'s device in its own precision (a Python float becomes float32, as diffusers' tables)."""
    if isinstance(value, torch.Tensor):
        return value.to(like.device)
    return torch.tensor(value, dtype=torch.float32, device=like.device)


# ------------------------------------------------------------------------------------------ shared


def predicted_original(sample: torch.Tensor, eps: torch.Tensor, alpha_prod_t: torch.Tensor | float) -> torch.Tensor:
    """x0 from an epsilon prediction: ``(x_t - sqrt(1 - a_t) eps) / sqrt(a_t)``."""
    alpha = _scalar(alpha_prod_t, sample)
    return (sample - (1 - alpha).sqrt() * eps) / alpha.sqrt()


def renoise(x: torch.Tensor, noise: torch.Tensor, alpha_prod: torch.Tensor | float) -> torch.Tensor:
    """The family's one noising function: ``sqrt(a) x + sqrt(1 - a) noise``.

    LCM's re-noising (``x`` the denoised estimate, ``a = a_prev``), img2img's ``add_noise`` (``x`` the image
    latent, ``a = a_t``), TCD's ``x_s`` (``x = x0``, ``noise = eps``, ``a = a_s``) and TCD's forward step
    (``x = x_s``, ``a = a_prev / a_s``).
    """
    alpha = _scalar(alpha_prod, x)
    return alpha.sqrt() * x + (1 - alpha).sqrt() * noise


# --------------------------------------------------------------------------------------------- LCM


def boundary_scalings(timestep: torch.Tensor | float, timestep_scaling: float = 10.0, sigma_data: float = 0.5):
    """Consistency-model boundary condition ``(c_skip, c_out)`` at a discrete timestep.

    ``c_skip = sigma_data^2 / ((s t)^2 + sigma_data^2)`` and ``c_out = s t / sqrt((s t)^2 + sigma_data^2)``
    with ``s = timestep_scaling`` (10 for every public LCM); c_skip -> 1, c_out -> 0 as t -> 0.
    """
    scaled = timestep * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


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


@dataclass(frozen=True)
class StepOutput:
    """``prev_sample`` is the next loop state; ``denoised`` the step's clean estimate (LCM: the final image latent;
    TCD: ``x_s``, the sample at the intermediate timestep, diffusers' ``pred_noised_sample``)."""

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


# --------------------------------------------------------------------------------------------- TCD


def check_gamma(gamma: float) -> float:
    """Return ``gamma`` as a float if it lies in [0, 1], else raise LCMInputError."""
    return check_fraction("gamma", gamma, f"{DEFAULT_GAMMA} at 4 steps, lower for more steps; 0 is deterministic",
                          zero_allowed=True)


def previous_timestep(timesteps: Sequence[int], index: int) -> int:
    """The timestep step ``index`` moves to, ``t_prev``: the next one of the schedule, 0 after the last (diffusers)."""
    return int(timesteps[index + 1]) if index + 1 < len(timesteps) else 0


def intermediate_timestep(prev_timestep: int, gamma: float) -> int:
    """``s = floor((1 - gamma) t_prev)``: how far along the trajectory a step jumps before re-noising to ``t_prev``.

    Computed as diffusers does: one float32 multiplication of ``1 - gamma`` (rounded to float32) by the integer
    timestep, then the floor. A single IEEE multiplication is correctly rounded on every CPU and GPU, so the
    floor lands on the same integer everywhere, also where the real product is a whole number (tested for every
    ``t_prev`` at several gammas).
    """
    return int(torch.floor((1 - gamma) * torch.tensor(prev_timestep, dtype=torch.long)).to(torch.long))


def step_draws_noise(gamma: float, is_last_step: bool) -> bool:
    """Whether a TCD step draws fresh noise: only when ``gamma > 0`` and it is not the schedule's last step.

    The draw happens inside the step, after the model call, so a seeded generator's sequence is: the initial
    noise, then one tensor of the latent's shape per noising step.
    """
    return gamma > 0 and not is_last_step


def tcd_step(
    eps: torch.Tensor,
    timestep: int,
    sample: torch.Tensor,
    prev_timestep: int,
    gamma: float,
    alphas_cumprod: torch.Tensor,
    noise: torch.Tensor | None,
) -> StepOutput:
    """One TCD step on diffusers' variance-preserving latents: ``TCDScheduler.step(eps, timestep, sample, eta=gamma)``.

    Args:
        eps: the model's (guided) epsilon prediction at ``timestep``.
        timestep: the current timestep ``t``.
        sample: ``x_t``.
        prev_timestep: ``t_prev`` (:func:`previous_timestep`: 0 after the last step).
        gamma: stochasticity in [0, 1] (diffusers' ``eta``).
        alphas_cumprod: the training schedule's cumulative alphas, float32
            (:meth:`~lcm_core.schedule.NoiseSchedule.alphas_cumprod`).
        noise: ``z`` for the forward step, drawn by the caller exactly when :func:`step_draws_noise` says so;
            ``None`` skips the re-noising (``prev_sample`` is then ``x_s``).
    """
    s = intermediate_timestep(prev_timestep, check_gamma(gamma))
    alpha_prod_s = alphas_cumprod[s]
    x_s = renoise(predicted_original(sample, eps, alphas_cumprod[timestep]), eps, alpha_prod_s)
    if noise is None:
        return StepOutput(prev_sample=x_s, denoised=x_s)
    return StepOutput(prev_sample=renoise(x_s, noise, alphas_cumprod[prev_timestep] / alpha_prod_s), denoised=x_s)
