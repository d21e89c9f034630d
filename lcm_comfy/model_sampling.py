"""The family's model sampling on ComfyUI, the guidance embedding wrapper, and setting a MODEL up for LCM.

:class:`DiffusersModelSampling` is ComfyUI's discrete epsilon schedule with diffusers' float32 ``alphas_cumprod``
and a deterministic sigma -> timestep rule (TCD samples with it as it is); :class:`LCMModelSampling` adds LCM's
consistency boundary condition: its ``calculate_denoised`` is :func:`lcm_core.step.consistency_denoise`.
:func:`setup_lcm` is idempotent: whatever chain of our nodes a MODEL passes through, it carries one
LCMModelSampling and at most one guidance wrapper (key :data:`GUIDANCE_WRAPPER_KEY`), and that wrapper is the
outermost of our DIFFUSION_MODEL wrappers (the fast path's graph wrapper, added per run, sits inside it).
"""

from __future__ import annotations

import comfy.model_sampling
import comfy.patcher_extension
import torch

from ..lcm_core.errors import LCMInputError, LCMModelError
from ..lcm_core.guidance import guidance_embedding, guidance_w
from ..lcm_core.schedule import NoiseSchedule, nearest_timestep_index
from ..lcm_core.step import consistency_denoise

GUIDANCE_OPTION = "lcm_nodes_guidance_scale"
GUIDANCE_WRAPPER_KEY = "lcm_nodes_guidance_embedding"
DIFFUSION_MODEL = comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL
DEFAULT_LCM_GUIDANCE = 8.0


def noise_schedule_of(model_config) -> NoiseSchedule:
    """The training schedule of a ComfyUI model config, or LCMModelError when it is not SD's scaled-linear one."""
    settings = getattr(model_config, "sampling_settings", {}) or {}
    if settings.get("beta_schedule", "linear") != "linear" or settings.get("zsnr", False):
        raise LCMModelError(
            f"the model's noise schedule ({settings}) is not Stable Diffusion's scaled-linear one: LCM sampling "
            "supports SD1.x/2.x/SDXL-family models."
        )
    # ComfyUI's "linear" is linspace(sqrt(start), sqrt(end))^2, i.e. diffusers' "scaled_linear".
    return NoiseSchedule(
        num_train_timesteps=int(settings.get("timesteps", 1000)),
        beta_start=float(settings.get("linear_start", 0.00085)),
        beta_end=float(settings.get("linear_end", 0.012)),
        beta_schedule="scaled_linear",
    )


class DiffusersModelSampling(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.EPS):
    """ComfyUI's discrete epsilon model sampling on diffusers' float32 schedule, the family's shared base.

    Only the table differs from ComfyUI's: float32 ``alphas_cumprod`` computed as diffusers does
    (:attr:`alphas_cumprod`, for the steps), so timesteps and sigmas agree with diffusers' schedulers exactly.
    With ``skip`` > 1 only every ``skip``-th entry is kept (``skip - 1, 2 skip - 1, ...``: LCM's distillation
    timesteps, as ComfyUI's own ``ModelSamplingDiscreteDistilled``). :meth:`timestep` picks the nearest entry
    by :func:`lcm_core.schedule.nearest_timestep_index`, whose fixed tie rule makes ComfyUI's own schedulers
    land on the same timestep on every device, and :meth:`sigma` snaps to an entry by the same rule (the model
    knows only its table's timesteps). ``calculate_denoised`` is ComfyUI's epsilon one
    (``x0 = x - sigma eps`` on ``x = x_t / sqrt(a_t)``).
    """

    def __init__(self, model_config=None, skip: int = 1):
        super().__init__(model_config)
        self.schedule = noise_schedule_of(model_config)
        self.alphas_cumprod = self.schedule.alphas_cumprod()
        self.skip = int(skip)
        sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        self.set_sigmas(sigmas[self.skip - 1 :: self.skip])

    def set_sigmas(self, sigmas):
        super().set_sigmas(sigmas)
        self.register_buffer("log_sigmas_f64", self.sigmas.double().log())

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        index = nearest_timestep_index(self.log_sigmas_f64, sigma).to(sigma.device)
        return index * self.skip + (self.skip - 1)

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        """The table sigma of the entry nearest ``timestep`` (a half-way timestep takes the lower entry, as
        :meth:`timestep` does). ComfyUI interpolates between entries; snapping keeps ``sigma`` and ``timestep``
        consistent, so a scheduler such as ``sgm_uniform`` hands the model exactly the table sigma of the
        timestep it is told (diffusers' ``alphas_cumprod[t]``), not a sigma between two entries."""
        position = (timestep.float() - (self.skip - 1)) / self.skip
        return super().sigma(torch.ceil(position - 0.5))

    def percent_to_sigma(self, percent: float) -> float:
        """ComfyUI's own start/end percent (ControlNet, conditioning ranges): interpolated between entries as
        ComfyUI does, not snapped, so a percent keeps the meaning it has on any other MODEL."""
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        position = ((1.0 - percent) * 999.0 - (self.skip - 1)) / self.skip
        return super().sigma(torch.tensor(position)).item()


class LCMModelSampling(DiffusersModelSampling):
    """ComfyUI model sampling for LCM: diffusers' float32 schedule and the exact consistency boundary condition.

    ComfyUI's sampler state is ``x = x_t / sqrt(a_t)`` (variance exploding, ``sigma^2 = (1 - a_t) / a_t``);
    ``calculate_denoised`` converts back to diffusers' ``x_t`` and applies :func:`consistency_denoise`. With
    ``original_inference_steps`` set, only the distillation timesteps are kept, so that KSampler with sampler
    ``lcm`` picks LCM timesteps.
    """

    def __init__(self, model_config=None, timestep_scaling: float = 10.0, original_inference_steps: int | None = None):
        timesteps = int((getattr(model_config, "sampling_settings", None) or {}).get("timesteps", 1000))
        super().__init__(model_config, timesteps // original_inference_steps if original_inference_steps else 1)
        self.timestep_scaling = float(timestep_scaling)

    def calculate_denoised(self, sigma, model_output, model_input):
        shape = sigma.shape[:1] + (1,) * (model_output.ndim - 1)
        t = self.timestep(sigma).view(shape).to(model_output.dtype)
        alpha_prod_t = 1.0 / (sigma.view(shape) ** 2 + 1.0)
        x_t = model_input * alpha_prod_t.sqrt()
        return consistency_denoise(x_t, model_output, t, alpha_prod_t, self.timestep_scaling)


def is_lcm_sampling(model_sampling) -> bool:
    """True for our model sampling, also when ComfyUI loaded a second copy of this module (checked by name)."""
    return type(model_sampling).__name__ == LCMModelSampling.__name__ and hasattr(model_sampling, "timestep_scaling")


def _guidance_wrapper(executor, x, timesteps, context, y, control, transformer_options, **kwargs):
    """DIFFUSION_MODEL wrapper: feed the guidance embedding to the UNet's guided time embedding."""
    time_embed = getattr(executor.class_obj, "time_embed", None)
    scale = transformer_options.get(GUIDANCE_OPTION, DEFAULT_LCM_GUIDANCE)
    if time_embed is None or not hasattr(time_embed, "cond_proj"):
        return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
    time_embed.set_condition(embedding_on(time_embed, float(scale), x.device))
    try:
        return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
    finally:
        time_embed.set_condition(None)


def embedding_on(time_embed, scale: float, device) -> torch.Tensor:
    """The guidance embedding for ``scale`` on ``device``, computed once and kept beside the UNet.

    Building it on the CPU at every step would cost a host-to-device copy per step, and a copy from
    ordinary (pageable) host memory makes the CPU wait for all queued GPU work first.
    """
    cache = time_embed.__dict__.setdefault("_lcm_nodes_embeddings", {})
    key = (scale, str(device))
    emb = cache.get(key)
    if emb is None:
        if len(cache) >= 16:
            cache.clear()
        with torch.no_grad():
            emb = guidance_embedding(torch.tensor([guidance_w(scale)]), time_embed.cond_dim).to(device)
        cache[key] = emb
    return emb


def has_guidance_embedding(model) -> bool:
    """True when the MODEL's UNet carries LCM's guidance (w) embedding."""
    diffusion_model = getattr(model.model, "diffusion_model", None)
    return hasattr(getattr(diffusion_model, "time_embed", None), "cond_proj")


def install_guidance_wrapper(m) -> None:
    """Give the clone ``m`` exactly one guidance wrapper, placed before any other of its DIFFUSION_MODEL wrappers."""
    m.remove_wrappers_with_key(DIFFUSION_MODEL, GUIDANCE_WRAPPER_KEY)
    others = m.wrappers.get(DIFFUSION_MODEL, {})
    m.wrappers[DIFFUSION_MODEL] = {GUIDANCE_WRAPPER_KEY: [_guidance_wrapper], **others}


def check_eps_model(model) -> None:
    """LCMInputError unless ``model`` is a ComfyUI MODEL; LCMModelError unless it predicts epsilon."""
    if not hasattr(model, "model") or not hasattr(model, "clone"):
        raise LCMInputError(f"model is a {type(model).__name__}, not a ComfyUI MODEL: connect a model loader's MODEL output.")
    model_type = getattr(model.model, "model_type", None)
    if model_type is not None and model_type.name not in ("EPS",):
        raise LCMModelError(
            f"the model predicts {model_type.name}, but LCM sampling here supports epsilon-prediction models "
            "(SD1.5, SDXL, SSD-1B, LCM UNets)."
        )


def setup_lcm(model, guidance_scale: float | None = None, original_inference_steps: int | None = 50, timestep_scaling: float = 10.0):
    """Return a clone of ``model`` set up for LCM sampling (the input is never changed). Idempotent.

    Installs :class:`LCMModelSampling` (replacing any earlier one) and, for UNets with a guidance embedding,
    exactly one guidance wrapper and the guidance value ComfyUI's own samplers (KSampler, sampler ``lcm``) use;
    ``guidance_scale=None`` keeps the value the model already carries.
    """
    check_eps_model(model)
    m = model.clone()
    m.add_object_patch("model_sampling", LCMModelSampling(m.model.model_config, timestep_scaling, original_inference_steps))
    if has_guidance_embedding(m):
        install_guidance_wrapper(m)
        if guidance_scale is not None:
            m.model_options.setdefault("transformer_options", {})[GUIDANCE_OPTION] = float(guidance_scale)
    return m
