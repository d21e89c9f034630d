"""The family's one sampler path on ComfyUI: ``run_sampler`` and the one loop skeleton, shared by LCM and TCD.

A LATENT's path through one run, top to bottom (:func:`run_sampler`):

1. The inputs are checked (:mod:`.checks`) against the MODEL; the run's config was validated when it was made.
2. The guidance is picked: the UNet's guidance embedding, or classifier-free guidance with the negative prompt.
3. The MODEL's sampling clone (:mod:`.fastpath`: the member's model sampling, the graph wrapper) is taken and
   its run lock held.
4. The seeded noise (:class:`lcm_core.noise.SeededNoise`, diffusers' CPU generator) gives the initial noise; the
   sigmas of ``config.planned`` come from the clone's model sampling.
5. ``comfy.sample.sample_custom`` runs :func:`consistency_loop` through ComfyUI's guider (conditioning, CFG,
   model loading, ControlNet, previews, cancel). The loop is the same for every member; only its
   :class:`LoopMethod` (the per-step function and when a step draws noise) differs, in the manner of
   ComfyUI's ``generic_step_sampler``.
6. The graphs are kept or freed (:func:`.fastpath.finish_run`) and the new LATENT is returned with the stats.

The members: LCM (:mod:`.sampler`) and TCD (:mod:`.tcd`).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import comfy.model_management
import comfy.sample
import comfy.samplers
import latent_preview
import torch

from ..lcm_core.config import ConsistencyRun, SamplingStats
from ..lcm_core.noise import SeededNoise
from ..lcm_core.step import renoise
from .checks import check_conditioning, check_latent, zero_conditioning
from .fastpath import finish_run as _finish_fast_path
from .fastpath import sampling_clone
from .model_sampling import GUIDANCE_OPTION, check_eps_model, has_guidance_embedding

log = logging.getLogger("lcm_nodes")


class LoopStep(NamedTuple):
    """What a member's step function gets at one step of :func:`consistency_loop`.

    ``x_t`` is diffusers' latent at timestep ``t``; ``x = x_t / sqrt(a_t)`` is what ComfyUI's model was given at
    ``sigma`` and ``denoised`` what it returned; ``t_prev`` is the next timestep (0 after the last); ``noise`` is
    this step's fresh draw (``None`` where :attr:`LoopMethod.draws_noise` says none); ``alphas_cumprod`` is the
    float32 training table on the latent's device.
    """

    t: int
    t_prev: int
    sigma: torch.Tensor
    x_t: torch.Tensor
    x: torch.Tensor
    denoised: torch.Tensor
    noise: torch.Tensor | None
    alphas_cumprod: torch.Tensor


@dataclass(frozen=True)
class LoopMethod:
    """A member's part of the loop: ``step(LoopStep) -> next x_t`` and ``draws_noise(is_last_step) -> bool``."""

    step: Callable[[LoopStep], torch.Tensor]
    draws_noise: Callable[[bool], bool]


def run_sampler(model, positive: list, negative: list | None, latent: dict, config: ConsistencyRun, who: str,
                clone_key: tuple, model_sampling: Callable[[object], object], method: LoopMethod,
                ) -> tuple[dict, SamplingStats]:
    """Steps 1-6 above, for any member of the family.

    ``config`` is the member's :class:`~lcm_core.config.ConsistencyRun` (``planned``, ``from_image`` and the run
    options); ``model_sampling(model_config)`` is the sampling clone's model sampling (made once per ``clone_key``;
    it has the float32 ``alphas_cumprod`` table); ``method`` is the member's step; ``who`` names the node in log lines.
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
        sampler = comfy.samplers.KSAMPLER(consistency_loop, extra_options={
            "noise": noise, "from_image": config.from_image, "timesteps": config.planned,
            "alphas_cumprod": ms.alphas_cumprod, "method": method})
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
    if getattr(model_sampling, "skip", 1) != 1:
        raise ValueError("sigmas_for needs a model sampling with every training timestep (skip 1)")
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


@torch.no_grad()  # as ComfyUI's own samplers: a library call outside inference mode records no autograd history
def consistency_loop(model, x, sigmas, extra_args=None, callback=None, disable=None, noise: SeededNoise | None = None,
                     from_image: bool = False, timesteps: tuple[int, ...] = (), alphas_cumprod: torch.Tensor | None = None,
                     method: LoopMethod | None = None):
    """ComfyUI KSAMPLER function: the family's one loop, diffusers' pipeline loop with the member's step.

    The loop state is diffusers' ``x_t``; ComfyUI's model takes ``x = x_t / sqrt(a_t)`` (``a_t = 1 / (1 + sigma^2)``)
    and returns its ``denoised``. ``noise`` has had its initial draw taken (``model.noise``); one more is drawn
    per step where ``method.draws_noise`` says so, after the step's model call, in diffusers' order (on the CPU
    while the GPU computes the step, copied without a host sync). img2img starts from the image latent noised
    to the first timestep (diffusers' ``add_noise``); text-to-image from the pure noise, whatever that timestep.
    The member's last step returns the final latent.
    """
    if noise is None or alphas_cumprod is None or method is None or len(timesteps) != len(sigmas) - 1:
        raise TypeError("consistency_loop needs the run's SeededNoise, alphas_cumprod, method and one timestep per sigma "
                        "(extra_options)")
    extra_args = {} if extra_args is None else extra_args
    n = len(timesteps)
    acp = alphas_cumprod.to(x.device)  # once: indexing it then stays on the device (no per-step host copy)
    alphas = 1.0 / (sigmas * sigmas + 1.0)  # a_t as ComfyUI's model sampling sees it: x = x_t / sqrt(a_t)
    initial = model.noise.to(x)
    x_t = renoise(model.latent_image.to(x), initial, acp[timesteps[0]]) if from_image else initial
    inputs_to_device(getattr(model, "inner_model", None), x.device)
    s_in = x.new_ones([x.shape[0]])
    for i, t in enumerate(timesteps):
        comfy.model_management.throw_exception_if_processing_interrupted()
        x = x_t / alphas[i].sqrt()
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        last = i + 1 == n
        z = to_device_async(noise.draw().float(), x) if method.draws_noise(last) else None
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        t_prev = 0 if last else int(timesteps[i + 1])
        x_t = method.step(LoopStep(int(t), t_prev, sigmas[i], x_t, x, denoised, z, acp))
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
