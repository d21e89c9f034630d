"""The LCM sampler on ComfyUI: ``sample(model, positive, negative, latent, config) -> (LATENT, SamplingStats)``.

A LATENT's path through one run, top to bottom:

1. :func:`sample` checks the inputs (:mod:`.checks`) against the MODEL; ``config`` was validated when it was made.
2. It picks the guidance: the UNet's guidance embedding, or classifier-free guidance with the negative prompt.
3. It takes the MODEL's sampling clone (:mod:`.fastpath`: LCM model sampling, graph wrapper) and holds its run lock.
4. The seeded noise (:class:`lcm_core.noise.SeededNoise`, diffusers' CPU generator) gives the initial noise;
   the sigmas of ``config.planned`` come from the clone's model sampling.
5. ``comfy.sample.sample_custom`` runs :func:`lcm_loop` through ComfyUI's guider (conditioning, CFG, model
   loading, ControlNet, previews, cancel); each model call ends in ``LCMModelSampling.calculate_denoised``
   (:func:`lcm_core.step.consistency_denoise`) and the loop renoises with :func:`lcm_core.step.renoise`.
6. The graphs are kept or freed (:func:`.fastpath.finish_run`) and the new LATENT is returned with the stats.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable

import comfy.model_management
import comfy.sample
import comfy.samplers
import latent_preview
import torch

from ..lcm_core.config import SamplingConfig, SamplingStats
from ..lcm_core.noise import SeededNoise
from ..lcm_core.step import renoise
from .checks import check_conditioning, check_latent, zero_conditioning
from .fastpath import finish_run as _finish_fast_path
from .fastpath import sampling_clone
from .model_sampling import GUIDANCE_OPTION, LCMModelSampling, check_eps_model, has_guidance_embedding

log = logging.getLogger("lcm_nodes")


def sample(model, positive: list, negative: list | None, latent: dict, config: SamplingConfig) -> tuple[dict, SamplingStats]:
    """Run LCM multi-step consistency sampling on a ComfyUI MODEL; returns a new LATENT and the run's statistics.

    Guidance: with a guidance embedding ``config.guidance_scale`` feeds it (w = guidance_scale - 1) and the
    negative prompt is not used; otherwise ``guidance_scale > 1`` is classifier-free guidance with ``negative``
    (zeros when none is connected, as diffusers' SDXL pipeline does), cond and uncond in one batched forward.
    The same ``config.seed`` reproduces diffusers' pipeline called with ``torch.Generator("cpu").manual_seed(seed)``.
    One run per MODEL at a time: concurrent calls on one MODEL wait for each other (the clone's run lock).
    """
    return run_sampler(
        model, positive, negative, latent, config, "LCM Sampler", ("lcm", config.timestep_scaling),
        lambda model_config: LCMModelSampling(model_config, config.timestep_scaling), lcm_loop,
        lambda noise, model_sampling: {"noise": noise, "from_image": config.from_image},
    )


def run_sampler(model, positive: list, negative: list | None, latent: dict, config, who: str, clone_key: tuple,
                model_sampling: Callable[[object], object], loop: Callable, loop_options: Callable[[SeededNoise, object], dict],
                ) -> tuple[dict, SamplingStats]:
    """Steps 1-6 above, shared by the pack's samplers (LCM here, TCD in :mod:`.tcd`).

    ``config`` has ``seed``, ``guidance_scale``, ``planned``, ``fast``, ``keep_graphs``, ``progress`` and ``compile`` (a
    :class:`SamplingConfig` or :class:`lcm_core.tcd.TCDConfig`); ``model_sampling(model_config)`` is the sampling
    clone's model sampling (made once per ``clone_key``); ``loop`` is the KSAMPLER function and
    ``loop_options(noise, model_sampling)`` its extra options; ``who`` names the node in log lines.
    """
    started = time.perf_counter()
    check_eps_model(model)
    samples = check_latent(latent, model)
    batch = samples.shape[0]
    check_conditioning(positive, "positive", model, batch)
    guided = has_guidance_embedding(model)
    cfg, negative = guidance_choice(config.guidance_scale, guided, positive, negative, model, batch, who)

    clone = sampling_clone(model, clone_key, model_sampling, config.fast)
    with clone.lock:
        clone.record = type(clone.record)(compile=config.compile)  # the wrapper reads the run's request here
        m = clone.model
        if guided:
            m.model_options.setdefault("transformer_options", {})[GUIDANCE_OPTION] = config.guidance_scale
        latent_image = comfy.sample.fix_empty_latent_channels(m, samples)
        noise = SeededNoise(config.seed, tuple(latent_image.shape), dtype=noise_dtype(m))
        initial = noise.draw().float()
        ms = m.object_patches["model_sampling"]
        sampler = comfy.samplers.KSAMPLER(loop, extra_options=loop_options(noise, ms))
        out_samples = comfy.sample.sample_custom(
            m, initial, cfg, sampler, sigmas_for(ms, config.planned), positive, negative, latent_image,
            noise_mask=latent.get("noise_mask"), callback=latent_preview.prepare_callback(m, len(config.planned)),
            disable_pbar=not config.progress, seed=config.seed,
        )
        stats = run_stats(clone, config.planned, started)
        stats.released_after_run = _finish_fast_path(clone, config.keep_graphs)
    out = latent.copy()
    out.pop("downscale_ratio_spacial", None)
    out["samples"] = out_samples
    return out, stats


def guidance_choice(guidance_scale: float, guided: bool, positive: list, negative: list | None, model, batch: int,
                    who: str = "LCM Sampler"):
    """The CFG scale ComfyUI's guider gets (1 = one forward per step) and the negative it is given (shared by the
    LCM and TCD samplers; ``who`` names the node in log lines)."""
    cfg = 1.0 if guided or guidance_scale <= 1.0 else guidance_scale
    if cfg > 1.0:
        if negative is None:
            log.info("%s: no negative prompt connected; using zeroed conditioning for classifier-free guidance.", who)
            negative = zero_conditioning(positive)
        check_conditioning(negative, "negative", model, batch)
    elif negative is None:
        negative = zero_conditioning(positive)  # unused at cfg 1, but ComfyUI's guider expects one
    elif guided:
        log.info("%s: the model has a guidance embedding; the negative prompt has no effect.", who)
    return cfg, negative


def noise_dtype(model) -> torch.dtype:
    """The dtype diffusers would draw noise in: the model's (its ``prompt_embeds`` dtype), float32 otherwise."""
    dtype = model.model_dtype()
    return dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32


def sigmas_for(model_sampling, timesteps: tuple[int, ...]) -> torch.Tensor:
    """ComfyUI sigmas for ``timesteps`` from a full 1000-entry table, with the final 0 appended."""
    table = model_sampling.sigmas.detach().float().cpu()
    return torch.cat([table[torch.tensor(timesteps, dtype=torch.long)], table.new_zeros(1)])


def run_stats(clone, timesteps, started: float) -> SamplingStats:
    """The statistics of the run that just ended on ``clone`` (started at ``started``, ``time.perf_counter``)."""
    record, cache = clone.record, clone.graphs
    return SamplingStats(
        timesteps=list(timesteps), graph_calls=record.graph_calls, eager_calls=record.eager_calls,
        fast_path_off=record.fast_path_off, graphs=len(cache) if cache else 0,
        graph_pool_bytes=cache.pool_bytes if cache else 0,
        capture_seconds=list(cache.capture_seconds) if cache else [],
        capture_warmups=list(cache.capture_warmups) if cache else [],
        host_ms_before_first_forward=(record.first_forward_at - started) * 1000 if record.first_forward_at else None,
    )


# ------------------------------------------------------------------------------------------ the loop


def lcm_loop(model, x, sigmas, extra_args=None, callback=None, disable=None, noise: SeededNoise | None = None,
             from_image: bool = False):
    """ComfyUI KSAMPLER function: LCM's multi-step consistency loop (``LCMScheduler`` in diffusers' pipelines).

    The loop state is diffusers' ``x_t`` (``a_i = 1 / (1 + sigma_i^2)`` is ``alphas_cumprod`` at step i's
    timestep); ComfyUI's model takes ``x_t / sqrt(a_i)`` and returns the consistency ``denoised``. ``noise`` has
    had its initial draw taken (``model.noise``); one more is drawn per re-noising, in diffusers' order.
    """
    if noise is None:
        raise TypeError("lcm_loop needs the run's SeededNoise (extra_options['noise'])")
    extra_args = {} if extra_args is None else extra_args
    n = len(sigmas) - 1
    alphas = 1.0 / (sigmas * sigmas + 1.0)
    initial = model.noise.to(x)
    if from_image:  # diffusers' add_noise: sqrt(a) x0 + sqrt(1 - a) noise
        x_t = renoise(model.latent_image.to(x), initial, alphas[0])
    else:  # pure noise, whatever the first timestep
        x_t = initial
    inputs_to_device(getattr(model, "inner_model", None), x.device)
    s_in = x.new_ones([x.shape[0]])
    for i in range(n):
        comfy.model_management.throw_exception_if_processing_interrupted()
        x = x_t / alphas[i].sqrt()
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        # drawn on the CPU (diffusers' generator) while the GPU computes this step, and copied without a host sync
        step_noise = to_device_async(noise.draw().float(), x) if i + 1 < n else None
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x_t = renoise(denoised, step_noise, alphas[i + 1]) if step_noise is not None else denoised
    return x_t


def to_device_async(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t.to(like)`` that does not make the CPU wait for queued GPU work (pinned source, non-blocking copy)."""
    if like.is_cuda:
        return t.pin_memory().to(device=like.device, dtype=like.dtype, non_blocking=True)
    return t.to(like)


def inputs_to_device(guider, device: torch.device) -> None:
    """Move this run's encoded conditioning and our model sampling's tables to the sampling device, once.

    ComfyUI keeps encoded conditioning on the CPU and copies it to the GPU inside every model call; a
    copy from pageable host memory waits for all queued GPU work, so each step's Python ran while the
    GPU sat idle. Moved here once, those per-step copies become no-ops and the CPU can queue the next
    step while the GPU computes this one. Only the guider's own per-run copies are changed (the COND
    objects are copied, never the user's CONDITIONING); values are unchanged, so results are identical.
    """
    if guider is None:
        return
    conds = getattr(guider, "conds", None)
    entries = [e for group in conds.values() if isinstance(group, list) for e in group] if isinstance(conds, dict) else []
    for entry in entries:
        if isinstance(entry, dict) and entry.get("model_conds"):
            entry["model_conds"] = {name: _cond_on(cond, device) for name, cond in entry["model_conds"].items()}
    model_sampling = getattr(getattr(guider, "inner_model", None), "model_sampling", None)
    if getattr(model_sampling, "lcm_nodes_owned", False) and model_sampling.sigmas.device != device:
        model_sampling.to(device)  # ours (an object patch of the sampling clone): timestep() then never leaves the GPU


def _cond_on(cond, device: torch.device):
    """A copy of one of ComfyUI's COND objects whose tensor is on ``device`` (the object itself when it already is)."""
    tensor = getattr(cond, "cond", None)
    if not isinstance(tensor, torch.Tensor) or tensor.device == device:
        return cond
    moved = copy.copy(cond)
    moved.cond = tensor.to(device)
    return moved
