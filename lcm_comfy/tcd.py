"""The TCD sampler on ComfyUI: ``sample_tcd(model, positive, negative, latent, config) -> (LATENT, SamplingStats)``.

TCD's member of the family's one sampler path (:mod:`.run`), with two differences from LCM:

- the sampling clone's model sampling is :class:`~.model_sampling.DiffusersModelSampling`: plain epsilon over
  the full 1000-step schedule, no boundary condition. A MODEL from Load LCM UNet or Apply LCM-LoRA carries
  LCM's 50-entry model sampling; the clone replaces it (the input MODEL is never changed), so such a MODEL and a
  plain one (Load Checkpoint, LoraLoader) sample the same way. The sampler feeds it exact table sigmas only;
- the loop's step is :func:`lcm_core.step.tcd_step` (``TCDScheduler.step``), and a step draws noise only where
  :func:`lcm_core.step.step_draws_noise` says diffusers does.

Semantics are those of diffusers' ``StableDiffusion(XL)Pipeline`` / ``StableDiffusion(XL)Img2ImgPipeline`` driving
``TCDScheduler`` with ``eta=gamma``; the same seed gives the same latents as the pipeline called with
``generator=torch.Generator("cpu").manual_seed(seed)``.
"""

from __future__ import annotations

from functools import partial

import torch

from ..lcm_core.config import SamplingStats, TCDConfig
from ..lcm_core.step import step_draws_noise, tcd_step
from .model_sampling import DiffusersModelSampling
from .run import LoopMethod, LoopStep, run_sampler

CLONE_KEY = ("tcd",)


def tcd_loop_step(s: LoopStep, gamma: float) -> torch.Tensor:
    """``TCDScheduler.step(eps, t, x_t, eta=gamma)``, with ``eps`` recovered from ComfyUI's ``denoised = x - sigma eps``."""
    return tcd_step((s.x - s.denoised) / s.sigma, s.t, s.x_t, s.t_prev, gamma, s.alphas_cumprod, s.noise).prev_sample


def tcd_method(gamma: float) -> LoopMethod:
    """TCD's part of the loop at stochasticity ``gamma``."""
    return LoopMethod(step=partial(tcd_loop_step, gamma=gamma), draws_noise=partial(step_draws_noise, gamma))


def sample_tcd(model, positive: list, negative: list | None, latent: dict, config: TCDConfig) -> tuple[dict, SamplingStats]:
    """Run TCD sampling on a ComfyUI MODEL; returns a new LATENT and the run's statistics (the input is not changed).

    Guidance as diffusers' SD/SDXL pipelines: ``config.guidance_scale > 1`` is classifier-free guidance with
    ``negative`` (zeros when none is connected), cond and uncond in one batched forward; a UNet with LCM's guidance
    embedding gets the scale there instead. ``config.strength < 1`` starts from ``latent`` noised to the first
    planned timestep (image-to-image), otherwise from pure noise. One run per MODEL at a time (the clone's run lock).
    """
    return run_sampler(model, positive, negative, latent, config, "TCD Sampler", CLONE_KEY, DiffusersModelSampling,
                       tcd_method(config.gamma))
