"""The TCD sampler on ComfyUI: ``sample_tcd(model, positive, negative, latent, config) -> (LATENT, SamplingStats)``.

It takes the LCM sampler's path (:mod:`.sampler`: the same input checks, guidance choice, sampling clone with
its run lock and fast-path wrapper, seeded noise and graph keep/release policy) with two differences:

- the sampling clone's model sampling is :class:`TCDModelSampling`: plain epsilon over the full 1000-step
  schedule, no boundary condition. A MODEL from Load LCM UNet or Apply LCM-LoRA carries LCM's 50-entry model
  sampling; the clone replaces it (the input MODEL is never changed), so such a MODEL and a plain one
  (Load Checkpoint, LoraLoader) sample the same way;
- the loop is :func:`tcd_loop`, which runs :func:`lcm_core.tcd.tcd_step` (``TCDScheduler.step``) on
  diffusers' ``x_t`` and draws the per-step noise inside the step, after the model call, only where
  :func:`lcm_core.tcd.step_draws_noise` says diffusers does.

Semantics are those of diffusers' ``StableDiffusion(XL)Pipeline`` / ``StableDiffusion(XL)Img2ImgPipeline`` driving
``TCDScheduler`` with ``eta=gamma``; the same seed gives the same latents as the pipeline called with
``generator=torch.Generator("cpu").manual_seed(seed)``.
"""

from __future__ import annotations

import logging

import comfy.model_management
import comfy.model_sampling
import comfy.sample
import comfy.samplers
import torch

from ..lcm_core.config import SamplingStats
from ..lcm_core.noise import SeededNoise
from ..lcm_core.step import renoise
from ..lcm_core.tcd import TCDConfig, previous_timestep, step_draws_noise, tcd_step
from .model_sampling import noise_schedule_of
from .sampler import inputs_to_device, run_sampler, to_device_async

log = logging.getLogger("lcm_nodes")

CLONE_KEY = ("tcd",)


class TCDModelSampling(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.EPS):
    """ComfyUI model sampling for TCD: plain epsilon prediction on diffusers' float32 schedule, all 1000 timesteps.

    ``calculate_denoised`` is ComfyUI's own epsilon one (``x0 = x - sigma eps`` on ``x = x_t / sqrt(a_t)``); only
    the table differs from ComfyUI's (float32 ``alphas_cumprod`` computed as diffusers does, so timesteps and
    sigmas agree with ``TCDScheduler`` exactly). :attr:`alphas_cumprod` is that table, for the TCD step.
    """

    def __init__(self, model_config=None):
        super().__init__(model_config)
        self.schedule = noise_schedule_of(model_config)
        self.alphas_cumprod = self.schedule.alphas_cumprod()
        self.set_sigmas(((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5)


def sample_tcd(model, positive: list, negative: list | None, latent: dict, config: TCDConfig) -> tuple[dict, SamplingStats]:
    """Run TCD sampling on a ComfyUI MODEL; returns a new LATENT and the run's statistics (the input is not changed).

    Guidance as diffusers' SD/SDXL pipelines: ``config.guidance_scale > 1`` is classifier-free guidance with
    ``negative`` (zeros when none is connected), cond and uncond in one batched forward; a UNet with LCM's guidance
    embedding gets the scale there instead. ``config.strength < 1`` starts from ``latent`` noised to the first
    planned timestep (image-to-image), otherwise from pure noise. One run per MODEL at a time (the clone's run lock).
    """
    return run_sampler(
        model, positive, negative, latent, config, "TCD Sampler", CLONE_KEY, TCDModelSampling, tcd_loop,
        lambda noise, model_sampling: {"noise": noise, "from_image": config.from_image, "timesteps": config.planned,
                                       "gamma": config.gamma, "alphas_cumprod": model_sampling.alphas_cumprod},
    )


def tcd_loop(model, x, sigmas, extra_args=None, callback=None, disable=None, noise: SeededNoise | None = None,
             from_image: bool = False, timesteps: tuple[int, ...] = (), gamma: float = 0.3,
             alphas_cumprod: torch.Tensor | None = None):
    """ComfyUI KSAMPLER function: TCD's strategic stochastic sampling (``TCDScheduler`` in diffusers' pipelines).

    The loop state is diffusers' ``x_t``; ComfyUI's model takes ``x = x_t / sqrt(a_t)`` and returns
    ``denoised = x - sigma eps``, from which ``eps`` is recovered for :func:`~lcm_core.tcd.tcd_step`. ``noise`` has had
    its initial draw taken (``model.noise``); one more is drawn per noising step, after that step's model call, in
    diffusers' order. The final ``x_t`` (``x_s`` at ``s = 0``) is returned as the latent, as diffusers returns it.
    """
    if noise is None or alphas_cumprod is None or len(timesteps) != len(sigmas) - 1:
        raise TypeError("tcd_loop needs the run's SeededNoise, alphas_cumprod and one timestep per sigma (extra_options)")
    extra_args = {} if extra_args is None else extra_args
    n = len(timesteps)
    acp = alphas_cumprod.to(x.device)  # once: indexing it then stays on the device (no per-step host copy)
    alphas = 1.0 / (sigmas * sigmas + 1.0)  # a_t as ComfyUI's model sampling sees it: x = x_t / sqrt(a_t)
    initial = model.noise.to(x)
    if from_image:  # the img2img pipelines' add_noise: sqrt(a) x0 + sqrt(1 - a) noise
        x_t = renoise(model.latent_image.to(x), initial, acp[timesteps[0]])
    else:  # pure noise, whatever the first timestep
        x_t = initial
    inputs_to_device(getattr(model, "inner_model", None), x.device)
    s_in = x.new_ones([x.shape[0]])
    for i, t in enumerate(timesteps):
        comfy.model_management.throw_exception_if_processing_interrupted()
        x = x_t / alphas[i].sqrt()
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        eps = (x - denoised) / sigmas[i]
        # diffusers draws inside step(), after the model call: drawn on the CPU while the GPU computes this step
        z = to_device_async(noise.draw().float(), x) if step_draws_noise(gamma, i == n - 1) else None
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x_t = tcd_step(eps, t, x_t, previous_timestep(timesteps, i), gamma, acp, z).prev_sample
    return x_t
