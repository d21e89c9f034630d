"""LCM noise schedule, timestep selection and run planning (which timesteps a run visits).

These follow the Latent Consistency Model paper (Luo et al. 2023) and match
``diffusers.LCMScheduler`` exactly (``tests/test_core_parity.py`` uses diffusers as the oracle). The pack keeps its own copy because the sampler needs
plain integer lists it can hand to ComfyUI and to a captured GPU loop, and
because every bad value must produce an :class:`~lcm_core.errors.LCMInputError`
naming the fix instead of a bare ``ValueError`` from deep inside a scheduler.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import LCMInputError

log = logging.getLogger("lcm_nodes")

MAX_STEPS = 50
STRENGTH_MODES = ("lcm", "truncate")


@dataclass(frozen=True)
class NoiseSchedule:
    """The DDPM training schedule an LCM was distilled on.

    Defaults are those of Stable Diffusion 1.x/2.x/XL and of ``LCMScheduler``:
    1000 training steps, ``scaled_linear`` betas from 0.00085 to 0.012.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"

    def alphas_cumprod(self) -> torch.Tensor:
        """Cumulative products of ``1 - beta`` in float32, computed as diffusers does."""
        n = self.num_train_timesteps
        if self.beta_schedule == "scaled_linear":
            betas = torch.linspace(self.beta_start**0.5, self.beta_end**0.5, n, dtype=torch.float32) ** 2
        elif self.beta_schedule == "linear":
            betas = torch.linspace(self.beta_start, self.beta_end, n, dtype=torch.float32)
        else:
            raise LCMInputError(
                f"beta_schedule {self.beta_schedule!r} is not supported; use 'scaled_linear' (Stable Diffusion) or 'linear'."
            )
        return torch.cumprod(1.0 - betas, dim=0)


def _check_steps(steps: int, original_inference_steps: int, num_train_timesteps: int) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= MAX_STEPS:
        raise LCMInputError(f"steps={steps!r} is out of range: LCM takes 1 to {MAX_STEPS} steps (4 is typical).")
    if (
        not isinstance(original_inference_steps, int)
        or isinstance(original_inference_steps, bool)
        or not 1 <= original_inference_steps <= num_train_timesteps
    ):
        raise LCMInputError(
            f"original_inference_steps={original_inference_steps!r} is out of range: it must be 1 to "
            f"{num_train_timesteps} (the LCM distillation schedule; 50 for every public LCM)."
        )


def check_strength(strength: float) -> float:
    """Return ``strength`` as a float if it lies in (0, 1], else raise LCMInputError."""
    try:
        value = float(strength)
    except (TypeError, ValueError):
        raise LCMInputError(f"strength={strength!r} is not a number: give a value in (0, 1], e.g. 0.5.") from None
    if not (0.0 < value <= 1.0):  # also rejects NaN
        raise LCMInputError(
            f"strength={strength!r} is out of range: it must be in (0, 1] "
            "(1.0 ignores the input image, small values change it little)."
        )
    return value


def origin_timesteps(original_inference_steps: int, strength: float = 1.0, num_train_timesteps: int = 1000) -> list[int]:
    """The LCM distillation schedule, ascending: ``k-1, 2k-1, ...`` with ``k = T // original_steps``.

    ``strength`` < 1 keeps only its first ``int(original_steps * strength)`` entries, as diffusers does.
    """
    k = num_train_timesteps // original_inference_steps
    return [i * k - 1 for i in range(1, int(original_inference_steps * strength) + 1)]


def lcm_timesteps(
    steps: int,
    original_inference_steps: int = 50,
    strength: float = 1.0,
    num_train_timesteps: int = 1000,
) -> list[int]:
    """LCM inference timesteps, descending; equal to ``LCMScheduler.set_timesteps(steps, strength=...)``.

    Args:
        steps: number of inference steps, 1..50.
        original_inference_steps: length of the distillation schedule (default 50); ``steps`` may not exceed it.
        strength: img2img strength in (0, 1]; below 1 the schedule is cut to its first
            ``int(original_inference_steps * strength)`` entries before ``steps`` are picked from it
            (LCM's own img2img semantics, ``LatentConsistencyModelImg2ImgPipeline``).
        num_train_timesteps: training schedule length (1000 for Stable Diffusion).
    """
    _check_steps(steps, original_inference_steps, num_train_timesteps)
    strength = check_strength(strength)
    if steps > original_inference_steps:
        raise LCMInputError(
            f"steps={steps} exceeds original_inference_steps={original_inference_steps}: "
            f"use at most {original_inference_steps} steps or raise original_inference_steps."
        )
    origin = origin_timesteps(original_inference_steps, strength, num_train_timesteps)
    if len(origin) < steps:
        lowest = steps / original_inference_steps
        raise LCMInputError(
            f"strength={strength} leaves only {len(origin)} of the {original_inference_steps} distillation timesteps, "
            f"fewer than steps={steps}: lower steps to {max(len(origin), 1) if origin else 1} or raise strength to at least {lowest:.3g}."
        )
    origin = origin[::-1]
    # Evenly spaced indices into the descending schedule: i * (L / steps) in float64, floored, exactly as
    # diffusers' np.linspace(0, L, steps, endpoint=False) + floor rounds them.
    spacing = len(origin) / steps
    indices = [math.floor(i * spacing) for i in range(steps)]
    return [origin[i] for i in indices]


def truncate_for_strength(timesteps: Sequence[int], strength: float) -> list[int]:
    """Drop the first steps of a schedule by ``strength``, as diffusers' SD/SDXL img2img pipelines do.

    Keeps the last ``int(len * strength)`` timesteps (``StableDiffusionXLImg2ImgPipeline.get_timesteps``).
    """
    strength = check_strength(strength)
    n = len(timesteps)
    keep = min(int(n * strength), n)
    if keep < 1:
        raise LCMInputError(
            f"strength={strength} with {n} steps keeps int({n} x {strength}) = 0 steps in 'truncate' mode: "
            f"raise strength to at least {1 / n:.3g}, raise steps, or use strength_mode 'lcm'."
        )
    return list(timesteps[n - keep :])


def parse_timesteps(text: str) -> list[int] | None:
    """Parse a custom timestep string such as ``"999, 759, 499, 259"``; empty means none.

    Raises LCMInputError naming the first entry that is not a whole number.
    """
    if text is None or not str(text).strip():
        return None
    values: list[int] = []
    for part in str(text).replace(";", ",").replace(" ", ",").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            values.append(int(part))
        except ValueError:
            raise LCMInputError(
                f"timesteps entry {part!r} is not a whole number: write descending integers separated by commas, "
                "e.g. '999, 759, 499, 259'."
            ) from None
    return values or None


def check_timestep_order(ts: Sequence[int], num_train_timesteps: int, strength: float) -> None:
    """Custom timesteps shared rules (LCM and TCD): strictly descending and inside 0..T-1, else LCMInputError;
    a warning, as diffusers gives, when a full-strength schedule does not start at ``T - 1``."""
    for prev, cur in zip(ts, ts[1:], strict=False):
        if cur >= prev:
            raise LCMInputError(
                f"custom timesteps must be strictly descending, but {cur} follows {prev} in {list(ts)}: sort them high to low."
            )
    if ts[0] >= num_train_timesteps or ts[-1] < 0:
        raise LCMInputError(
            f"custom timesteps {list(ts)} leave the range 0..{num_train_timesteps - 1}: every timestep must lie in it."
        )
    if strength == 1.0 and ts[0] != num_train_timesteps - 1:
        log.warning("The first custom timestep is %d, not %d: results may be unexpected.", ts[0], num_train_timesteps - 1)


def check_custom_timesteps(
    timesteps: Sequence[int],
    original_inference_steps: int = 50,
    strength: float = 1.0,
    num_train_timesteps: int = 1000,
) -> list[int]:
    """Validate user-given timesteps as diffusers does, and apply ``strength`` the way diffusers does for them.

    Errors: empty, not strictly descending, or first timestep >= ``num_train_timesteps`` (or negative).
    Warnings (logged, as in diffusers): a schedule that does not start at ``T - 1`` with strength 1, timesteps
    off the distillation schedule, and a schedule longer than ``original_inference_steps``.
    """
    ts = [int(t) for t in timesteps]
    if not ts:
        raise LCMInputError("timesteps is empty: give at least one timestep, e.g. '999, 759, 499, 259'.")
    if len(ts) > MAX_STEPS:
        raise LCMInputError(f"{len(ts)} custom timesteps given; at most {MAX_STEPS} are allowed.")
    _check_steps(len(ts), original_inference_steps, num_train_timesteps)
    strength = check_strength(strength)
    check_timestep_order(ts, num_train_timesteps, strength)
    train = set(origin_timesteps(original_inference_steps, strength, num_train_timesteps))
    off = [t for t in ts[1:] if t not in train]
    if off:
        log.warning("Custom timesteps %s are not on the LCM distillation schedule: results may be unexpected.", off)
    if len(ts) > original_inference_steps:
        log.warning(
            "%d custom timesteps exceed original_inference_steps=%d: results may be unexpected.", len(ts), original_inference_steps
        )
    n = len(ts)
    init = min(int(n * strength), n)
    return ts[max(n - init, 0) :]


def plan_timesteps(
    steps: int,
    original_inference_steps: int = 50,
    custom_timesteps: Sequence[int] | None = None,
    strength: float = 1.0,
    strength_mode: str = "lcm",
    num_train_timesteps: int = 1000,
) -> list[int]:
    """The timesteps a run visits, with diffusers' semantics for each ``strength_mode``.

    ``"lcm"``: ``LatentConsistencyModel(Img2Img)Pipeline``, strength shortens the distillation schedule before the
    steps are picked (custom timesteps: the last ``int(n * strength)`` are kept). ``"truncate"``: the SD/SDXL
    img2img pipelines, the full schedule is built and its first steps dropped (:func:`truncate_for_strength`).
    """
    if strength_mode not in STRENGTH_MODES:
        raise LCMInputError(f"strength_mode={strength_mode!r} is not one of {list(STRENGTH_MODES)}: pick one of those.")
    strength = check_strength(strength)
    if strength_mode == "lcm":
        if custom_timesteps:
            return check_custom_timesteps(custom_timesteps, original_inference_steps, strength, num_train_timesteps)
        return lcm_timesteps(steps, original_inference_steps, strength, num_train_timesteps)
    if custom_timesteps:
        full = check_custom_timesteps(custom_timesteps, original_inference_steps, 1.0, num_train_timesteps)
    else:
        full = lcm_timesteps(steps, original_inference_steps, 1.0, num_train_timesteps)
    return truncate_for_strength(full, strength)
