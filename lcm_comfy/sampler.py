"""The LCM sampler on ComfyUI: ``sample(model, positive, negative, latent, config) -> (LATENT, SamplingStats)``.

LCM's member of the family's one sampler path (:mod:`.run`): the sampling clone's model sampling is
:class:`~.model_sampling.LCMModelSampling`, whose ``calculate_denoised`` applies the consistency boundary
condition (:func:`lcm_core.step.consistency_denoise`) at every model call, and the loop's step
(:func:`lcm_loop_step`) re-noises that estimate to the next timestep with :func:`lcm_core.step.renoise`.
Semantics are those of ``LCMScheduler`` in diffusers' pipelines; the same seed gives the same latents as the
pipeline called with ``generator=torch.Generator("cpu").manual_seed(seed)``.
"""

from __future__ import annotations

import torch

from ..lcm_core.config import SamplingConfig, SamplingStats
from ..lcm_core.step import renoise
from .model_sampling import LCMModelSampling
from .run import LoopMethod, LoopStep, run_sampler


def lcm_loop_step(s: LoopStep) -> torch.Tensor:
    """``LCMScheduler.step`` after the model call: the model sampling already gave the consistency ``denoised``;
    re-noise it to ``t_prev``, or return it after the last step."""
    return s.denoised if s.noise is None else renoise(s.denoised, s.noise, s.alphas_cumprod[s.t_prev])


def lcm_draws_noise(is_last_step: bool) -> bool:
    """LCM draws fresh noise for every step but the last."""
    return not is_last_step


LCM_METHOD = LoopMethod(step=lcm_loop_step, draws_noise=lcm_draws_noise)


def sample(model, positive: list, negative: list | None, latent: dict, config: SamplingConfig) -> tuple[dict, SamplingStats]:
    """Run LCM multi-step consistency sampling on a ComfyUI MODEL; returns a new LATENT and the run's statistics.

    Guidance: with a guidance embedding ``config.guidance_scale`` feeds it (w = guidance_scale - 1) and the
    negative prompt is not used; otherwise ``guidance_scale > 1`` is classifier-free guidance with ``negative``
    (zeros when none is connected, as diffusers' SDXL pipeline does), cond and uncond in one batched forward.
    One run per MODEL at a time: concurrent calls on one MODEL wait for each other (the clone's run lock).
    """
    return run_sampler(
        model, positive, negative, latent, config, "LCM Sampler", ("lcm", config.timestep_scaling),
        lambda model_config: LCMModelSampling(model_config, config.timestep_scaling), LCM_METHOD,
    )
