"""Trajectory Consistency Distillation (TCD) sampling: its timestep schedule and its step. Pure torch.

TCD (Zheng et al. 2024, "Trajectory Consistency Distillation") samples an epsilon-prediction model with
*strategic stochastic sampling*: from ``x_t`` it predicts the clean latent, jumps along the predicted
trajectory to an intermediate timestep ``s = floor((1 - gamma) t_prev)``, and adds back just enough fresh
noise to land on the next timestep ``t_prev``:

1. ``x0  = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)``                               :func:`~lcm_core.step.predicted_original`
2. ``s   = floor((1 - gamma) t_prev)``                                           :func:`intermediate_timestep`
3. ``x_s = sqrt(a_s) x0 + sqrt(1 - a_s) eps``                                    :func:`predicted_noised_sample`
4. ``x_prev = sqrt(a_prev / a_s) x_s + sqrt(1 - a_prev / a_s) z``, ``z ~ N(0, I)``  :func:`forward_diffuse`

``gamma`` (diffusers calls it ``eta``) is the stochasticity: 0 is deterministic (``s = t_prev``, no noise is
drawn at all), 1 jumps to ``s = 0`` and re-noises fully as LCM does. Step 4 and its noise draw are skipped
on the last step and whenever ``gamma == 0`` (:func:`step_draws_noise`); after the last step ``t_prev`` is
0, so the result is ``x_s`` at ``s = 0`` (``a_0 = 0.99915``, not 1: a trace of ``eps`` stays, as in diffusers).

Unlike LCM there is no boundary condition: the model output is used as plain epsilon at every timestep.

Everything here reproduces ``diffusers.TCDScheduler`` (``set_timesteps`` and ``step``) exactly;
``tests/test_tcd.py`` checks it per step against diffusers. The pack keeps its own copy for the same reasons
as :mod:`lcm_core.schedule`: plain integer schedules for ComfyUI and a captured GPU loop, and errors that name
the value and the fix (:class:`~lcm_core.errors.LCMInputError`) instead of a bare ``assert``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .config import RunOptions, check_guidance
from .errors import LCMInputError
from .noise import check_seed
from .schedule import check_strength, check_timestep_order, truncate_for_strength
from .step import predicted_original

log = logging.getLogger("lcm_nodes")

DEFAULT_GAMMA = 0.3


# --------------------------------------------------------------------------------------------------
# Schedule (TCDScheduler.set_timesteps)


def _check_int(name: str, value: int, low: int, high: int, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise LCMInputError(f"{name}={value!r} is out of range: it must be a whole number from {low} to {high} ({hint}).")
    return value


def tcd_origin_timesteps(
    original_inference_steps: int = 50,
    strength: float = 1.0,
    num_train_timesteps: int = 1000,
    every_train_timestep: bool = False,
) -> list[int]:
    """The ascending schedule TCD picks its steps from.

    Normally the distillation schedule ``k-1, 2k-1, ...`` with ``k = T // original_inference_steps``, cut to its
    first ``int(original_inference_steps * strength)`` entries (as LCM). With ``every_train_timestep`` it is every
    training timestep ``0 .. int(T * strength) - 1``: what ``TCDScheduler.set_timesteps`` uses when it is *called
    with* ``original_inference_steps`` (the pipelines never do; they leave it to the scheduler's config).
    """
    if every_train_timestep:
        return list(range(int(num_train_timesteps * strength)))
    k = num_train_timesteps // original_inference_steps
    return [i * k - 1 for i in range(1, int(original_inference_steps * strength) + 1)]


def tcd_timesteps(
    steps: int,
    original_inference_steps: int = 50,
    strength: float = 1.0,
    num_train_timesteps: int = 1000,
    every_train_timestep: bool = False,
) -> list[int]:
    """TCD inference timesteps, descending: ``TCDScheduler(original_inference_steps=...).set_timesteps(steps, strength=...)``.

    Args:
        steps: number of steps, 1 .. ``original_inference_steps`` (4 is typical; TCD stays good at 8-16 with a lower gamma).
        original_inference_steps: length of the distillation schedule (default 50, as ``TCDScheduler``'s config).
            ``steps`` may not exceed it.
        strength: (0, 1]; below 1 the origin schedule is first cut by strength (``set_timesteps``' own strength;
            the SD/SDXL img2img pipelines instead drop the first steps of the full schedule:
            :func:`~lcm_core.schedule.truncate_for_strength`).
        num_train_timesteps: training schedule length (1000 for Stable Diffusion).
        every_train_timestep: pick from every training timestep rather than the distillation schedule, as
            ``set_timesteps(..., original_inference_steps=N)`` does when the argument is given explicitly (N then only
            bounds ``steps``); see :func:`tcd_origin_timesteps`.

    Examples: 4 steps give 999, 759, 499, 259; with ``every_train_timestep`` 999, 749, 499, 249.
    """
    _check_int("original_inference_steps", original_inference_steps, 1, num_train_timesteps,
               "the TCD distillation schedule; 50 for every public TCD/Hyper-SD model")
    _check_int("steps", steps, 1, original_inference_steps,
               f"at most original_inference_steps={original_inference_steps}; 4 is typical")
    strength = check_strength(strength)
    origin = tcd_origin_timesteps(original_inference_steps, strength, num_train_timesteps, every_train_timestep)
    if len(origin) < steps:  # diffusers: skipping_step = len(origin) // steps < 1
        raise LCMInputError(
            f"strength={strength} leaves {len(origin)} timesteps to pick from, fewer than steps={steps}: lower steps to at "
            f"most {max(len(origin), 1)} or raise strength to at least {steps / original_inference_steps:.3g}."
        )
    origin = origin[::-1]
    # np.floor(np.linspace(0, L, steps, endpoint=False)) in float64, as diffusers computes the indices.
    spacing = len(origin) / steps
    return [origin[math.floor(i * spacing)] for i in range(steps)]


def check_tcd_custom_timesteps(
    timesteps: Sequence[int],
    original_inference_steps: int = 50,
    strength: float = 1.0,
    num_train_timesteps: int = 1000,
    every_train_timestep: bool = False,
) -> list[int]:
    """Validate user-given TCD timesteps and apply ``strength`` as ``TCDScheduler.set_timesteps(timesteps=...)`` does.

    Errors (diffusers' own, plus a negative or empty result): empty, not strictly descending, outside
    ``0 .. T-1``, or ``strength`` keeping none. Warnings (logged, as diffusers): first timestep not ``T - 1`` at
    strength 1, timesteps off the origin schedule, more timesteps than ``original_inference_steps``.
    Returns the last ``int(n * strength)`` timesteps.
    """
    ts = [int(t) for t in timesteps]
    if not ts:
        raise LCMInputError("timesteps is empty: give at least one timestep, e.g. '999, 759, 499, 259'.")
    _check_int("original_inference_steps", original_inference_steps, 1, num_train_timesteps,
               "the TCD distillation schedule; 50 for every public TCD/Hyper-SD model")
    strength = check_strength(strength)
    check_timestep_order(ts, num_train_timesteps, strength)
    origin = set(tcd_origin_timesteps(original_inference_steps, strength, num_train_timesteps, every_train_timestep))
    off = [t for t in ts[1:] if t not in origin]
    if off:
        log.warning("Custom timesteps %s are not on the TCD distillation schedule: results may be unexpected.", off)
    if len(ts) > original_inference_steps:
        log.warning("%d custom timesteps exceed original_inference_steps=%d: results may be unexpected.", len(ts), original_inference_steps)
    n = len(ts)
    keep = min(int(n * strength), n)
    if keep < 1:
        raise LCMInputError(
            f"strength={strength} keeps int({n} x {strength}) = 0 of the {n} custom timesteps: raise strength to at least "
            f"{1 / n:.3g} or give more timesteps."
        )
    return ts[n - keep :]


# --------------------------------------------------------------------------------------------------
# Step (TCDScheduler.step)


def check_gamma(gamma: float) -> float:
    """Return ``gamma`` as a float if it lies in [0, 1], else raise LCMInputError."""
    try:
        value = float(gamma)
    except (TypeError, ValueError):
        raise LCMInputError(f"gamma={gamma!r} is not a number: give a value in [0, 1], e.g. {DEFAULT_GAMMA}.") from None
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise LCMInputError(
            f"gamma={gamma!r} is out of range: it must be in [0, 1] ({DEFAULT_GAMMA} at 4 steps, lower for more steps; "
            "0 is deterministic)."
        )
    return value


def previous_timestep(timesteps: Sequence[int], index: int) -> int:
    """The timestep step ``index`` moves to, ``t_prev``: the next one of the schedule, 0 after the last (diffusers)."""
    return int(timesteps[index + 1]) if index + 1 < len(timesteps) else 0


def intermediate_timestep(prev_timestep: int, gamma: float) -> int:
    """``s = floor((1 - gamma) t_prev)``: how far along the trajectory a step jumps before re-noising to ``t_prev``.

    Computed as diffusers does (a float32 product of ``1 - gamma`` and the integer timestep), so the floor
    lands on the same integer even where the real product is a whole number.
    """
    return int(torch.floor((1 - gamma) * torch.tensor(prev_timestep, dtype=torch.long)).to(torch.long))


def step_draws_noise(gamma: float, is_last_step: bool) -> bool:
    """Whether a TCD step draws fresh noise: only when ``gamma > 0`` and it is not the schedule's last step.

    The draw happens inside the step, after the model call, so a seeded generator's sequence is: the initial
    noise, then one tensor of the latent's shape per noising step.
    """
    return gamma > 0 and not is_last_step


def predicted_noised_sample(x0: torch.Tensor, eps: torch.Tensor, alpha_prod_s: torch.Tensor) -> torch.Tensor:
    """``x_s = sqrt(a_s) x0 + sqrt(1 - a_s) eps``: the sample at the intermediate timestep on the predicted trajectory."""
    return alpha_prod_s.sqrt() * x0 + (1 - alpha_prod_s).sqrt() * eps


def forward_diffuse(x_s: torch.Tensor, noise: torch.Tensor, alpha_prod_prev: torch.Tensor, alpha_prod_s: torch.Tensor) -> torch.Tensor:
    """``x_prev = sqrt(a_prev / a_s) x_s + sqrt(1 - a_prev / a_s) z``: re-noise from ``s`` forward to ``t_prev``."""
    ratio = alpha_prod_prev / alpha_prod_s
    return ratio.sqrt() * x_s + (1 - ratio).sqrt() * noise


@dataclass(frozen=True)
class TCDStepOutput:
    """``prev_sample`` is the next loop state (the final latent after the last step); ``pred_noised_sample`` is ``x_s``."""

    prev_sample: torch.Tensor
    pred_noised_sample: torch.Tensor


def tcd_step(
    eps: torch.Tensor,
    timestep: int,
    sample: torch.Tensor,
    prev_timestep: int,
    gamma: float,
    alphas_cumprod: torch.Tensor,
    noise: torch.Tensor | None,
) -> TCDStepOutput:
    """One TCD step on diffusers' variance-preserving latents: ``TCDScheduler.step(eps, timestep, sample, eta=gamma)``.

    Args:
        eps: the model's (guided) epsilon prediction at ``timestep``.
        timestep: the current timestep ``t``.
        sample: ``x_t``.
        prev_timestep: ``t_prev`` (:func:`previous_timestep`: 0 after the last step).
        gamma: stochasticity in [0, 1] (diffusers' ``eta``).
        alphas_cumprod: the training schedule's cumulative alphas, float32
            (:meth:`~lcm_core.schedule.NoiseSchedule.alphas_cumprod`).
        noise: ``z`` for step 4, drawn by the caller exactly when :func:`step_draws_noise` says so; ``None`` skips
            the re-noising (``prev_sample`` is then ``x_s``).
    """
    gamma = check_gamma(gamma)
    s = intermediate_timestep(prev_timestep, gamma)
    alpha_prod_t = alphas_cumprod[timestep]
    alpha_prod_prev = alphas_cumprod[prev_timestep]
    alpha_prod_s = alphas_cumprod[s]
    x0 = predicted_original(sample, eps, alpha_prod_t)
    x_s = predicted_noised_sample(x0, eps, alpha_prod_s)
    if noise is None:
        return TCDStepOutput(prev_sample=x_s, pred_noised_sample=x_s)
    return TCDStepOutput(prev_sample=forward_diffuse(x_s, noise, alpha_prod_prev, alpha_prod_s), pred_noised_sample=x_s)


# --------------------------------------------------------------------------------------------------
# A run's configuration


@dataclass(frozen=True)
class TCDConfig(RunOptions):
    """Everything a TCD sampling run is asked to do, apart from the model and the tensors; checked when made.

    It drives a run the way diffusers' ``StableDiffusion(XL)Pipeline`` / ``StableDiffusion(XL)Img2ImgPipeline``
    drive ``TCDScheduler(original_inference_steps=...)`` when called with ``eta=gamma``.

    Attributes:
        seed: 0..2**64-1; the same latents as the pipeline called with ``generator=torch.Generator("cpu").manual_seed(seed)``.
        steps: 1 .. ``original_inference_steps`` (ignored when ``timesteps`` is given).
        guidance_scale: 0..100; ``<= 1`` is no guidance, ``> 1`` classifier-free guidance with the negative prompt
            (a UNet with LCM's guidance embedding gets it there instead, as the pipelines do).
        gamma: stochasticity in [0, 1] (the pipelines' ``eta``); 0.3 at 4 steps, lower for more steps.
        original_inference_steps: length of the distillation schedule the steps are picked from (50).
        timesteps: custom descending timesteps, overriding ``steps``.
        strength: (0, 1]. 1 is text-to-image (pure noise); below 1 image-to-image as the SD/SDXL img2img pipelines:
            the full schedule is built and its first steps dropped, ``int(n * strength)`` steps run from the
            input latent noised to the first of them.
        fast / keep_graphs / progress / compile: see :class:`lcm_core.config.RunOptions`.
        planned: the timesteps the run visits (derived).
    """

    seed: int
    steps: int = 4
    guidance_scale: float = 1.0
    gamma: float = DEFAULT_GAMMA
    original_inference_steps: int = 50
    timesteps: tuple[int, ...] | None = None
    strength: float = 1.0
    planned: tuple[int, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_seed(self.seed)
        g = check_guidance(self.guidance_scale, "<= 1 is no guidance, as TCD-LoRAs are usually run; 1-2 is classifier-free "
                           "guidance with the negative prompt")
        custom = tuple(int(t) for t in self.timesteps) if self.timesteps else None
        object.__setattr__(self, "timesteps", custom)
        object.__setattr__(self, "guidance_scale", g)
        object.__setattr__(self, "gamma", check_gamma(self.gamma))
        object.__setattr__(self, "strength", check_strength(self.strength))
        if custom:
            full = check_tcd_custom_timesteps(custom, self.original_inference_steps)
        else:
            full = tcd_timesteps(self.steps, self.original_inference_steps)
        if int(len(full) * self.strength) < 1:
            raise LCMInputError(
                f"strength={self.strength} with {len(full)} steps keeps int({len(full)} x {self.strength}) = 0 steps (the SD/SDXL "
                f"img2img pipelines drop the first steps by strength): raise strength to at least {1 / len(full):.3g} or raise steps."
            )
        object.__setattr__(self, "planned", tuple(truncate_for_strength(full, self.strength)))

    @property
    def from_image(self) -> bool:
        """Image-to-image: start from ``latent_image`` noised to the first timestep, not from pure noise."""
        return self.strength < 1.0
