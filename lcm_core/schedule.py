"""The consistency-model family's schedules: one module for LCM and TCD (and any later member).

What it holds, each matching diffusers' ``LCMScheduler`` / ``TCDScheduler`` exactly (``tests/test_core_parity.py`` and
``tests/test_tcd.py`` use diffusers as the oracle):

- :class:`NoiseSchedule`: the DDPM training schedule (float32 ``alphas_cumprod``, computed as diffusers does);
- :func:`origin_timesteps`: the ascending schedule a run picks from: the distillation schedule ``k-1, 2k-1, ...``,
  or every training timestep (``every_train_timestep``, what ``TCDScheduler.set_timesteps`` uses when it is
  called with ``original_inference_steps``);
- :func:`pick_timesteps` (:func:`lcm_timesteps`): ``steps`` evenly spaced picks from it, descending;
- :func:`check_custom_timesteps`: user-given timesteps, checked and cut by strength;
- :func:`plan_timesteps`: the timesteps a run visits, for both img2img strength semantics;
- :func:`nearest_timestep_index`: the table entry nearest a sigma, with one fixed rule at exact ties (so that
  ComfyUI's own schedulers land on the same timestep on every device).

The pack keeps its own copy because the samplers need plain integer lists they can hand to ComfyUI and to a
captured GPU loop, and because every bad value must produce an :class:`~lcm_core.errors.LCMInputError`
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

MAX_STEPS = 50  # the LCM Sampler node's step limit (LCM's distillation schedule has 50 entries)
STRENGTH_MODES = ("lcm", "truncate")

# An exact half-way tie between two table entries, seen through float rounding, is any sigma whose log lies
# within this much of the mid-point (plus the input dtype's own precision): the float32 interpolation and exp()
# ComfyUI computes a sigma with are good to a few 1e-7 in log-sigma, while the closest two entries of the
# 1000-entry table lie 0.0033 apart (t = 421, 422). The band never exceeds a quarter of the local gap.
TIE_LOG_TOLERANCE = 1e-5


@dataclass(frozen=True)
class NoiseSchedule:
    """The DDPM training schedule a consistency model was distilled on.

    Defaults are those of Stable Diffusion 1.x/2.x/XL and of ``LCMScheduler`` / ``TCDScheduler``:
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


# --------------------------------------------------------------------------------------------- checks


def check_whole(name: str, value: object, low: int, high: int, hint: str) -> int:
    """``value`` if it is a whole number in ``low..high`` (not a bool), else LCMInputError naming it, the range and ``hint``."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise LCMInputError(f"{name}={value!r} is out of range: it must be a whole number from {low} to {high} ({hint}).")
    return value


def check_fraction(name: str, value: object, hint: str, *, zero_allowed: bool = False) -> float:
    """``value`` as a float in (0, 1] (``[0, 1]`` with ``zero_allowed``), else LCMInputError naming it, the range and ``hint``."""
    interval = "[0, 1]" if zero_allowed else "(0, 1]"
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise LCMInputError(f"{name}={value!r} is not a number: give a value in {interval} ({hint}).") from None
    low_ok = number >= 0.0 if zero_allowed else number > 0.0
    if not (low_ok and number <= 1.0):  # also rejects NaN
        raise LCMInputError(f"{name}={value!r} is out of range: it must be in {interval} ({hint}).")
    return number


def check_strength(strength: float) -> float:
    """Return ``strength`` as a float if it lies in (0, 1], else raise LCMInputError."""
    return check_fraction("strength", strength, "1.0 ignores the input image, small values change it little; e.g. 0.5")


def check_steps(steps: int, original_inference_steps: int, num_train_timesteps: int = 1000) -> None:
    """diffusers' rule for both schedulers: ``1 <= steps <= original_inference_steps <= num_train_timesteps``."""
    check_whole("original_inference_steps", original_inference_steps, 1, num_train_timesteps,
                "the length of the distillation schedule; 50 for every public LCM and TCD model")
    if isinstance(steps, int) and not isinstance(steps, bool) and steps > original_inference_steps >= 1:
        raise LCMInputError(
            f"steps={steps} exceeds original_inference_steps={original_inference_steps}: use at most "
            f"{original_inference_steps} steps or raise original_inference_steps."
        )
    check_whole("steps", steps, 1, original_inference_steps, "4 is typical")


# ------------------------------------------------------------------------------------------- schedules


def origin_timesteps(
    original_inference_steps: int = 50,
    strength: float = 1.0,
    num_train_timesteps: int = 1000,
    every_train_timestep: bool = False,
) -> list[int]:
    """The ascending schedule a run picks its steps from, cut by ``strength`` as diffusers cuts it.

    Normally the distillation schedule ``k-1, 2k-1, ...`` with ``k = T // original_inference_steps``, its first
    ``int(original_inference_steps * strength)`` entries. With ``every_train_timestep`` it is every training
    timestep ``0 .. int(T * strength) - 1``: what ``TCDScheduler.set_timesteps`` uses when it is *called with*
    ``original_inference_steps`` (the pipelines never do; they leave it to the scheduler's config).
    """
    if every_train_timestep:
        return list(range(int(num_train_timesteps * strength)))
    k = num_train_timesteps // original_inference_steps
    return [i * k - 1 for i in range(1, int(original_inference_steps * strength) + 1)]


def pick_timesteps(
    steps: int,
    original_inference_steps: int = 50,
    strength: float = 1.0,
    num_train_timesteps: int = 1000,
    every_train_timestep: bool = False,
) -> list[int]:
    """Inference timesteps, descending: ``LCMScheduler`` / ``TCDScheduler(original_inference_steps=...)``'s
    ``set_timesteps(steps, strength=...)``.

    Args:
        steps: number of steps, 1 .. ``original_inference_steps`` (4 is typical).
        original_inference_steps: length of the distillation schedule (default 50).
        strength: (0, 1]; below 1 the origin schedule is first cut to its first ``int(original_inference_steps *
            strength)`` entries (LCM's own img2img semantics, ``LatentConsistencyModelImg2ImgPipeline``; the
            SD/SDXL img2img pipelines instead drop the first steps of the full schedule: :func:`truncate_for_strength`).
        num_train_timesteps: training schedule length (1000 for Stable Diffusion).
        every_train_timestep: pick from every training timestep (:func:`origin_timesteps`).

    Examples: 4 steps give 999, 759, 499, 259; with ``every_train_timestep`` 999, 749, 499, 249.
    """
    check_steps(steps, original_inference_steps, num_train_timesteps)
    strength = check_strength(strength)
    origin = origin_timesteps(original_inference_steps, strength, num_train_timesteps, every_train_timestep)
    if len(origin) < steps:
        fewer = f"lower steps to {len(origin)} or " if origin else ""
        raise LCMInputError(
            f"strength={strength} leaves {len(origin)} of the {original_inference_steps} distillation timesteps, "
            f"fewer than steps={steps}: {fewer}raise strength to at least "
            f"{least_strength(steps, original_inference_steps if not every_train_timestep else num_train_timesteps)}."
        )
    origin = origin[::-1]
    # Evenly spaced indices into the descending schedule: i * (L / steps) in float64, floored, exactly as
    # diffusers' np.floor(np.linspace(0, L, steps, endpoint=False)) rounds them.
    spacing = len(origin) / steps
    return [origin[math.floor(i * spacing)] for i in range(steps)]


lcm_timesteps = pick_timesteps  # the name LCM's code and users know


def truncate_for_strength(timesteps: Sequence[int], strength: float, other_fix: str = "") -> list[int]:
    """The last ``int(len * strength)`` timesteps: how diffusers applies strength to a built schedule.

    That is the SD/SDXL img2img pipelines' ``get_timesteps`` (``strength_mode`` 'truncate'), and every scheduler's
    ``set_timesteps(timesteps=..., strength=...)`` for custom timesteps. Keeping none is an error naming the fix
    (diffusers would go on with an empty schedule); ``other_fix`` adds the caller's own way out to its message.
    """
    strength = check_strength(strength)
    n = len(timesteps)
    keep = min(int(n * strength), n)
    if keep < 1:
        raise LCMInputError(
            f"strength={strength} keeps int({n} x {strength}) = 0 of the {n} timesteps: raise strength to at least "
            f"{least_strength(1, n)}{other_fix}."
        )
    return list(timesteps[n - keep :])


def least_strength(needed: int, of: int) -> float:
    """The smallest strength on the nodes' 0.01 grid with ``int(of * strength) >= needed`` (what an error suggests:
    a value that then passes, in the same float arithmetic diffusers uses)."""
    strength = min(math.ceil(needed / of * 100) / 100, 1.0)
    while int(of * strength) < needed and strength < 1.0:
        strength = min(round(strength + 0.01, 2), 1.0)
    return strength


# ------------------------------------------------------------------------------------- custom timesteps


def parse_timesteps(text: str) -> list[int] | None:
    """Parse a custom timestep string such as ``"999, 759, 499, 259"``; empty means none.

    Only ASCII digits are accepted (Python's ``int`` would also read full-width or other scripts' digits, which a
    saved workflow should never silently carry). Raises LCMInputError naming the first entry that is not a
    whole number.
    """
    if text is None or not str(text).strip():
        return None
    values: list[int] = []
    for part in str(text).replace(";", ",").replace(" ", ",").split(","):
        part = part.strip()
        if not part:
            continue
        digits = part[1:] if part[:1] in "+-" else part
        if not (digits.isascii() and digits.isdigit()):
            raise LCMInputError(
                f"timesteps entry {part!r} is not a whole number written in ASCII digits 0-9: write descending integers "
                "separated by commas, e.g. '999, 759, 499, 259'."
            )
        values.append(int(part))
    return values or None


def check_timestep_order(ts: Sequence[int], num_train_timesteps: int, strength: float) -> None:
    """Strictly descending and inside ``0..T-1``, else LCMInputError; a warning, as diffusers gives, when a
    full-strength schedule does not start at ``T - 1``."""
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
    every_train_timestep: bool = False,
    other_fix: str = "",
) -> list[int]:
    """Validate user-given timesteps as diffusers does, and apply ``strength`` the way diffusers does for them
    (:func:`truncate_for_strength`: the last ``int(n * strength)``).

    Errors: empty, not strictly descending, outside ``0 .. T-1``, or ``strength`` keeping none (diffusers would
    run an empty schedule). Warnings (logged, as in diffusers): a schedule that does not start at ``T - 1`` with
    strength 1, timesteps off the origin schedule, and more timesteps than ``original_inference_steps``.
    """
    ts = [int(t) for t in timesteps]
    if not ts:
        raise LCMInputError("timesteps is empty: give at least one timestep, e.g. '999, 759, 499, 259'.")
    check_whole("original_inference_steps", original_inference_steps, 1, num_train_timesteps,
                "the length of the distillation schedule; 50 for every public LCM and TCD model")
    strength = check_strength(strength)
    check_timestep_order(ts, num_train_timesteps, strength)
    origin = set(origin_timesteps(original_inference_steps, strength, num_train_timesteps, every_train_timestep))
    off = [t for t in ts[1:] if t not in origin]
    if off:
        log.warning("Custom timesteps %s are not on the distillation schedule: results may be unexpected.", off)
    if len(ts) > original_inference_steps:
        log.warning("%d custom timesteps exceed original_inference_steps=%d: results may be unexpected.", len(ts),
                    original_inference_steps)
    return truncate_for_strength(ts, strength, other_fix)


# ---------------------------------------------------------------------------------------------- plans


def plan_timesteps(
    steps: int,
    original_inference_steps: int = 50,
    custom_timesteps: Sequence[int] | None = None,
    strength: float = 1.0,
    strength_mode: str = "lcm",
    num_train_timesteps: int = 1000,
    other_fix: str = "",
) -> list[int]:
    """The timesteps a run visits, with diffusers' semantics for each ``strength_mode`` (LCM and TCD alike).

    ``"lcm"``: ``LatentConsistencyModel(Img2Img)Pipeline``, strength shortens the distillation schedule before the
    steps are picked, and custom timesteps keep their last ``int(n * strength)`` (``set_timesteps(timesteps=...,
    strength=...)``). ``"truncate"``: the SD/SDXL img2img pipelines, the full schedule (or the custom timesteps,
    checked at strength 1 as those pipelines set them) is built and its first steps dropped
    (:func:`truncate_for_strength`). A strength that keeps no step is an error naming the fix, in both modes and
    for both samplers (``other_fix``: the caller's own way out, added to the message).
    """
    if strength_mode not in STRENGTH_MODES:
        raise LCMInputError(f"strength_mode={strength_mode!r} is not one of {list(STRENGTH_MODES)}: pick one of those.")
    strength = check_strength(strength)
    more = ", or give more timesteps" if custom_timesteps else ", or raise steps"
    if strength_mode == "lcm":
        if custom_timesteps:
            return check_custom_timesteps(custom_timesteps, original_inference_steps, strength, num_train_timesteps,
                                          other_fix=more + other_fix)
        return pick_timesteps(steps, original_inference_steps, strength, num_train_timesteps)
    if custom_timesteps:
        full = check_custom_timesteps(custom_timesteps, original_inference_steps, 1.0, num_train_timesteps)
    else:
        full = pick_timesteps(steps, original_inference_steps, 1.0, num_train_timesteps)
    return truncate_for_strength(full, strength, more + other_fix)


# ------------------------------------------------------------------------------- sigma -> table index


def nearest_timestep_index(log_sigmas: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Index of the table entry nearest ``sigma`` in log-sigma; an exact half-way tie goes to the LOWER index.

    ``log_sigmas`` is the ascending float64 table. The comparison is made in float64, and a tie is any sigma
    within ``TIE_LOG_TOLERANCE`` plus its own dtype's precision of a mid-point: float rounding there differs
    between CPUs and GPUs (ComfyUI's own ``argmin`` picked 519 on one CPU and 499 on another for the same
    mid-point), so the rule, not the rounding, decides. Runs on the table's device with no host sync.
    """
    flat = sigma.detach().reshape(-1).to(device=log_sigmas.device, dtype=torch.float64).log()
    n = log_sigmas.shape[0]
    hi = torch.searchsorted(log_sigmas, flat).clamp(1, n - 1)
    lo = hi - 1
    d_lo = flat - log_sigmas[lo]
    d_hi = log_sigmas[hi] - flat
    tolerance = TIE_LOG_TOLERANCE + (torch.finfo(sigma.dtype).eps if sigma.is_floating_point() else 0.0)
    tolerance = torch.clamp(0.25 * (d_lo + d_hi), max=tolerance)  # a coarse dtype (bfloat16) never swallows a gap
    index = torch.where(d_hi < d_lo - tolerance, hi, lo)
    return index.view(sigma.shape)
