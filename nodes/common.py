"""What the node classes share: their menu category and the inputs the samplers have in common.

Each builder makes one input. A node passes its own tooltip (and default or limit where its method differs), so
an input has the same name, type and widget on every node that has it: saved workflows store widget values by
position and by name, and neither may change.
"""

from __future__ import annotations

from comfy_api.latest import io

from ..lcm_core.config import MAX_GUIDANCE
from ..lcm_core.graphs import KEEP_GRAPHS_MODES

CATEGORY = "sampling/lcm"  # every node of the pack, in ComfyUI's Add Node menu

MAX_SEED = 0xFFFFFFFFFFFFFFFF  # as ComfyUI's KSampler: any 64-bit seed


def seed_input(tooltip: str, default: int = 0) -> io.Int.Input:
    return io.Int.Input("seed", default=default, min=0, max=MAX_SEED, control_after_generate=True, tooltip=tooltip)


def steps_input(tooltip: str, max_steps: int, default: int = 4) -> io.Int.Input:
    return io.Int.Input("steps", default=default, min=1, max=max_steps, tooltip=tooltip)


def guidance_input(tooltip: str, default: float = 1.0) -> io.Float.Input:
    return io.Float.Input("guidance_scale", default=default, min=0.0, max=MAX_GUIDANCE, step=0.1, round=0.01, tooltip=tooltip)


def original_inference_steps_input(tooltip: str, default: int = 50) -> io.Int.Input:
    return io.Int.Input("original_inference_steps", default=default, min=1, max=1000, optional=True, tooltip=tooltip)


def timesteps_input() -> io.String.Input:
    return io.String.Input(
        "timesteps", default="", optional=True,
        tooltip="Custom timesteps, descending and comma-separated (e.g. '999, 759, 499, 259'); overrides steps when set.",
    )


def fast_input() -> io.Boolean.Input:
    return io.Boolean.Input(
        "fast", default=True, optional=True,
        tooltip="GPU fast path: replay the UNet as a CUDA graph (same result, much less overhead). It turns itself "
        "off where that is unsafe (CPU, ControlNet, attention patches, model partly offloaded). Off: ordinary path.",
    )


def keep_graphs_input() -> io.Combo.Input:
    # Appended after every other input: saved UI workflows list widget values by position, so new widgets go last.
    return io.Combo.Input(
        "keep_graphs", options=list(KEEP_GRAPHS_MODES), default=KEEP_GRAPHS_MODES[0], optional=True,
        tooltip="GPU fast path: what happens to the captured graphs (about 260 MiB of GPU memory) after this run. "
        "'while queued': kept while more prompts wait in the queue, so a queue pays the capture once and an idle "
        "ComfyUI holds nothing. 'always': kept while the model stays loaded (fastest for one prompt at a time). "
        "'never': freed after every run. ComfyUI unloading the model or GPU memory running short frees them anyway.",
    )


def compile_input() -> io.Boolean.Input:
    # compile mode: appended last (after keep_graphs), for the same reason.
    return io.Boolean.Input(
        "compile", default=False, optional=True,
        tooltip="Faster kernels (GPU fast path only): the UNet compiled with torch.compile inside the CUDA graph, about "
        "25% faster per step. The first run of each model, size and batch compiles (SDXL on an H200: about 85 s, 30 s "
        "when the disk cache has it). Needs ComfyUI started with --disable-cuda-malloc (otherwise it logs why and runs "
        "exact). Results differ from the exact path by rounding (see the README). Off: the exact kernels, the same "
        "latents as diffusers' pipeline.",
    )
