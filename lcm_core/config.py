"""The configuration of one sampling run, validated before any model work, and the statistics it returns.

:class:`SamplingConfig` is frozen: a node builds it from its inputs, construction checks every value (raising
:class:`~lcm_core.errors.LCMInputError` with the value, the allowed range and the fix) and fixes the timesteps
the run visits, and the sampler reads it without changing it. :class:`ConsistencyRun` holds what every member of
the family shares; :class:`SamplingConfig` (LCM) and :class:`TCDConfig` add their own. :class:`SamplingStats` is
what a run reports back (the sampler returns it; no out-parameters).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import LCMInputError
from .graphs import keep_graphs_mode
from .noise import check_seed
from .schedule import check_strength, plan_timesteps
from .step import DEFAULT_GAMMA, check_gamma

MAX_GUIDANCE = 100.0


def check_guidance(value: object, hint: str, name: str = "guidance_scale") -> float:
    """``value`` as a finite float in [0, MAX_GUIDANCE], else LCMInputError naming the input ``name``, the value, the
    range and ``hint`` (typical values)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0.0 <= value <= MAX_GUIDANCE:
        raise LCMInputError(f"{name}={value!r} is out of range: use a finite number from 0 to {MAX_GUIDANCE:g} ({hint}).")
    return float(value)


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """How a sampling run runs on ComfyUI, shared by every run config (keyword-only: they follow each
    config's own fields).

    Attributes:
        fast: allow the GPU fast path (CUDA-graph replay) where it is safe.
        keep_graphs: what happens to the fast path's graphs after the run (:data:`~lcm_core.graphs.KEEP_GRAPHS_MODES`;
            ``True``/``False`` are read as "always"/"never").
        progress: show ComfyUI's progress bar.
        compile: the opt-in faster-kernel mode: on the fast path, the UNet compiled with
            ``torch.compile`` inside the CUDA graph; results differ from the exact path by rounding.
    """

    fast: bool = True
    keep_graphs: str = "while queued"
    progress: bool = True
    compile: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "keep_graphs", keep_graphs_mode(self.keep_graphs))


@dataclass(frozen=True)
class ConsistencyRun(RunOptions):
    """The fields and checks every member of the family shares (LCM's :class:`SamplingConfig`, :class:`TCDConfig`).

    Attributes:
        seed: 0..2**64-1; with the same weights, the same latents as diffusers' pipeline called with
            ``generator=torch.Generator("cpu").manual_seed(seed)``.
        steps: 1 .. ``original_inference_steps`` (ignored when ``timesteps`` is given).
        guidance_scale: 0..100. With a guidance-embedding UNet it feeds the embedding (w = guidance_scale - 1);
            otherwise ``> 1`` is classifier-free guidance with the negative prompt.
        original_inference_steps: length of the distillation schedule the steps are picked from (50).
        timesteps: custom descending timesteps, overriding ``steps``.
        strength: (0, 1]; below 1 with :attr:`from_image` it is image-to-image, with :attr:`strength_mode`'s semantics.
        fast / keep_graphs / progress / compile: see :class:`RunOptions`.
        planned: the timesteps the run visits (derived, :func:`~lcm_core.schedule.plan_timesteps`).
    """

    seed: int
    steps: int = 4
    guidance_scale: float = 1.0
    original_inference_steps: int = 50
    timesteps: tuple[int, ...] | None = None
    strength: float = 1.0
    planned: tuple[int, ...] = field(init=False, repr=False)

    GUIDANCE_HINT = ""  # typical values, for the guidance error

    def __post_init__(self) -> None:
        super().__post_init__()
        check_seed(self.seed)
        object.__setattr__(self, "guidance_scale", check_guidance(self.guidance_scale, self.GUIDANCE_HINT))
        object.__setattr__(self, "timesteps", tuple(int(t) for t in self.timesteps) if self.timesteps else None)
        planned = plan_timesteps(self.steps, self.original_inference_steps, self.timesteps, self.strength,
                                 self.strength_mode, other_fix=self.strength_fix())
        object.__setattr__(self, "strength", check_strength(self.strength))
        object.__setattr__(self, "planned", tuple(planned))

    # Members may make these two fields of their own (SamplingConfig does, with defaults).
    @property
    def strength_mode(self) -> str:
        """How ``strength`` < 1 shortens the schedule (:data:`~lcm_core.schedule.STRENGTH_MODES`)."""
        return "truncate"

    @property
    def from_image(self) -> bool:
        """Image-to-image: start from ``latent_image`` noised to the first timestep, not from pure noise."""
        return self.strength < 1.0

    def strength_fix(self) -> str:
        """The member's own way out, beyond raising strength, when strength keeps no step."""
        return ""


@dataclass(frozen=True)
class SamplingConfig(ConsistencyRun):
    """Everything an LCM sampling run is asked to do, apart from the model and the tensors.

    Attributes (beyond :class:`ConsistencyRun`'s):
        strength_mode: ``"lcm"`` (LCM's img2img pipeline) or ``"truncate"`` (the SD/SDXL img2img pipelines).
        from_image: start from ``latent_image`` noised to the first timestep (img2img) instead of pure noise.
        timestep_scaling: the boundary condition's scaling (10 for every public LCM).
    """

    strength_mode: str = "lcm"
    from_image: bool = False
    timestep_scaling: float = 10.0

    GUIDANCE_HINT = "8 for LCM UNets, 1-2 or 0 for LCM-LoRA"

    def __post_init__(self) -> None:
        s = self.timestep_scaling
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0:
            raise LCMInputError(f"timestep_scaling={s!r} must be a positive number (10 for every public LCM).")
        object.__setattr__(self, "timestep_scaling", float(s))
        super().__post_init__()

    def strength_fix(self) -> str:
        return ", or use strength_mode 'lcm'" if self.strength_mode == "truncate" and not self.timesteps else ""


@dataclass(frozen=True)
class TCDConfig(ConsistencyRun):
    """Everything a TCD sampling run is asked to do, apart from the model and the tensors; checked when made.

    It drives a run the way diffusers' ``StableDiffusion(XL)Pipeline`` / ``StableDiffusion(XL)Img2ImgPipeline``
    drive ``TCDScheduler(original_inference_steps=...)`` when called with ``eta=gamma``: ``strength`` below 1 is
    image-to-image as the SD/SDXL img2img pipelines (the full schedule built and its first steps dropped,
    ``int(n * strength)`` steps run from the input latent noised to the first of them).

    Attributes (beyond :class:`ConsistencyRun`'s):
        gamma: stochasticity in [0, 1] (the pipelines' ``eta``); 0.3 at 4 steps, lower for more steps.
    """

    gamma: float = DEFAULT_GAMMA

    GUIDANCE_HINT = "<= 1 is no guidance, as TCD-LoRAs are usually run; 1-2 is classifier-free guidance with the negative prompt"

    def __post_init__(self) -> None:
        object.__setattr__(self, "gamma", check_gamma(self.gamma))
        super().__post_init__()


@dataclass
class SamplingStats:
    """What one run did, returned by the sampler beside its LATENT.

    Attributes:
        timesteps: the timesteps visited.
        graph_calls / eager_calls: UNet forwards served by a CUDA graph / by the ordinary path.
        fast_path_off: why the fast path was off for this run (None when it ran or was not asked for).
        graphs, graph_pool_bytes: captured graphs of the model after the run, and the GPU memory they hold.
        capture_seconds, capture_warmups: the model's recent capture times and warm-up forwards.
        released_after_run: the graphs were freed at the end of the run (``keep_graphs`` or memory pressure).
        host_ms_before_first_forward: host time from the call to the first UNet forward (fast path only).
    """

    timesteps: list[int] = field(default_factory=list)
    graph_calls: int = 0
    eager_calls: int = 0
    fast_path_off: str | None = None
    graphs: int = 0
    graph_pool_bytes: int = 0
    capture_seconds: list[float] = field(default_factory=list)
    capture_warmups: list[int] = field(default_factory=list)
    released_after_run: bool = False
    host_ms_before_first_forward: float | None = None
