"""The sampler's opt-in faster-kernel mode: ComfyUI's UNet compiled with ``torch.compile`` inside the fast path's
CUDA graph, and the compile support LCM VAE Decode shares.

With the exact kernels the fast path is at the GPU's floor for them (an SDXL forward at 1024² is ~26 ms of
kernels on an H200); inductor's fused kernels take it to ~19 ms (SDXL sampler 120.6 -> 91.4 ms per prompt through
a server). The price: a compile per model, size and batch (SDXL on an H200: 84 s with nothing cached, 28 s from
the disk cache; then replayed from the graph), and results that differ from the exact path by rounding (the
numbers are in the README). The exact path stays the default and is untouched: without the request nothing here
runs. Under ComfyUI's default cudaMallocAsync allocator it stays off (see :func:`_blocker`).

How it hooks in. A sampling config's ``compile`` field (``SamplingConfig``, ``TCDConfig``) asks for it; the
sampler puts it on the run's record, which the fast path's graph wrapper (``lcm_comfy/fastpath.py``) reads. At
the run's first forward the wrapper asks :func:`decide` once whether the compiled UNet runs, and
:func:`fingerprint` for the key of its graph cache, so compiled and exact graphs never replay for each other;
when it runs, :func:`compiled_forward` gives the forward to capture: the compiled UNet, compiled right there
(outside any capture) the first time a size is seen. Compiling needs the UNet to be the innermost DIFFUSION_MODEL wrapper's target; any other wrapper inside
ours, a failed compile, or no Triton: the exact forward, with a log line saying why.

Compile artefacts (inductor's FX graph cache and Triton kernels) live in :func:`compile_cache_dir`, so a
restarted ComfyUI compiles again from disk in a fraction of the time (measured in bench/RESULTS.md).

State: per UNet module a :class:`CompileRecord` (sizes compiled, seconds, failure) in the module's ``__dict__``,
created under a lock; the compiled function itself is one per process and holds no model (the UNet is an
argument). Only the thread running a sampling run (which holds the model's run lock) touches a record.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field

import torch

from ..lcm_core.graphs import signature
from ..lcm_core.unet_format import SD15, SDXL

log = logging.getLogger("lcm_nodes")

_LOCK = threading.Lock()
_RECORD_ATTR = "_lcm_nodes_compile_record"
#: Rough cold-compile times on an H200 (bench/RESULTS.md), for the progress message.
EXPECTED_COLD_SECONDS = {SDXL: 85, SD15: 60}


# ------------------------------------------------------------------------------------------ shared support


def compile_cache_dir() -> str:
    """Where inductor keeps compiled artefacts (FX graph cache, Triton kernels), so restarts reuse them.

    ``TORCHINDUCTOR_CACHE_DIR`` when set; otherwise ``<ComfyUI user dir>/lcm_nodes/torch_compile`` (not ComfyUI's
    temp folder, which is emptied at every start), set for this process before the first compile.
    """
    with _LOCK:
        path = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        if not path:
            import folder_paths

            path = os.path.join(folder_paths.get_user_directory(), "lcm_nodes", "torch_compile")
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
            log.info("LCM Nodes: torch.compile artefacts are cached in %s (set TORCHINDUCTOR_CACHE_DIR to move them).", path)
        os.makedirs(path, exist_ok=True)
        return path


def compile_unavailable() -> str | None:
    """Why ``torch.compile`` (inductor on CUDA) cannot run in this process, or None when it can."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed (inductor needs it for CUDA kernels)"
    return None


def progress_text(text: str, node_id: str | None = None) -> None:
    """Log ``text`` and show it under the running node in ComfyUI's page, when a server runs this."""
    log.info("%s", text)
    try:
        if node_id is None:
            from comfy_execution.utils import get_executing_context

            context = get_executing_context()
            node_id = context.node_id if context is not None else None
        if node_id is None:
            return
        from server import PromptServer

        PromptServer.instance.send_progress_text(text, node_id)
    except Exception:  # noqa: BLE001 - no server (a library call, the test executor): the log line is enough
        pass


# ------------------------------------------------------------------------------------------ the compiled UNet


@dataclass
class CompileRecord:
    """What compiling did for one UNet: the input signatures compiled (with seconds) and a failure, if any."""

    seconds: dict[tuple, float] = field(default_factory=dict)
    failed: str | None = None
    why_not_logged: set[str] = field(default_factory=set)


def record_of(unet: torch.nn.Module) -> CompileRecord:
    with _LOCK:
        record = unet.__dict__.get(_RECORD_ATTR)
        if record is None:
            record = unet.__dict__[_RECORD_ATTR] = CompileRecord()
        return record


def _unet_call(unet, x, timesteps, context, y, transformer_options):
    # The UNet is an argument, not a closure: one compiled function serves every model and holds none.
    return unet._forward(x, timesteps, context, y, None, transformer_options)


def lazily_compiled(fn):
    """A function returning ``torch.compile(fn, dynamic=False)``, built on its first call (one per process, under
    a lock). ``fn`` takes its module as an argument, so the compiled function serves every model and holds none."""
    built = []

    def get():
        with _LOCK:
            if not built:
                built.append(torch.compile(fn, dynamic=False))
            return built[0]

    get.built = built  # [] until the first call (tests read it)
    return get


_compiled = lazily_compiled(_unet_call)


def _blocker(executor) -> str | None:
    """Why this forward runs exact although compiling was asked for, or None.

    ``executor`` is the one ComfyUI hands the fast path's wrapper: its ``idx`` is that wrapper's own position, so
    the wrapper is innermost (its ``executor(...)`` calls the UNet itself) when ``idx`` is the last position.
    """
    idx, wrappers = getattr(executor, "idx", None), getattr(executor, "wrappers", None)
    if idx is None or wrappers is None or idx + 1 != len(wrappers) or getattr(executor, "class_obj", None) is None:
        return "another DIFFUSION_MODEL wrapper sits inside the fast path's"
    unet = executor.class_obj
    if not callable(getattr(unet, "_forward", None)):
        return f"{type(unet).__name__} has no _forward to compile"
    failed = record_of(unet).failed
    if failed:
        return f"compiling this UNet failed earlier ({failed})"
    if torch.cuda.is_available() and torch.cuda.memory.get_allocator_backend() == "cudaMallocAsync":
        # Seen on an H200 with PyTorch 2.11: a compiled UNet captured in a CUDA graph under this allocator (ComfyUI's
        # default) ended the process with cudaErrorInvalidValue in CUDAMallocAsyncAllocator::free; still so with the
        # capture fix below in place (bench/probe_allocator.py lifts this check and aborts the same way).
        return ("ComfyUI runs PyTorch's cudaMallocAsync allocator, under which a compiled UNet inside a CUDA graph "
                "crashes; start ComfyUI with --disable-cuda-malloc to use compile mode")
    return compile_unavailable()


def decide(executor) -> bool:
    """Whether this run, which asked for compile mode, runs the compiled UNet (called once per run, at its first
    forward); when it cannot, says why in the log, once per reason and UNet."""
    why = _blocker(executor)
    if why is None:
        return True
    unet = getattr(executor, "class_obj", None)
    record = record_of(unet) if isinstance(unet, torch.nn.Module) else CompileRecord()
    if why not in record.why_not_logged:
        record.why_not_logged.add(why)
        log.info("LCM Nodes: compile mode off for this model: %s; the exact kernels run.", why)
    return False


def fingerprint(weights_fingerprint: int, compiled: bool) -> int:
    """The graph-cache key of this run: the weights' fingerprint, tagged when the compiled UNet will be captured.

    Compiled and exact graphs must never replay for each other (the exact path stays bit-identical); a run in
    the other mode changes the key, which drops the cached graphs and captures again.
    """
    return hash((weights_fingerprint, "lcm_nodes torch.compile")) if compiled else weights_fingerprint


def _family(unet) -> str:
    return SDXL if getattr(unet, "num_classes", None) == "sequential" else SD15  # SDXL's adm (pooled text + sizes)


def compiled_forward(exact_forward, executor, transformer_options: dict, tensors: dict[str, torch.Tensor | None]):
    """The forward the graph cache should capture for these inputs in a run :func:`decide` let compile: the compiled
    UNet, or ``exact_forward`` if compiling it fails.

    Called by the graph wrapper at every step of such a run, never inside a capture (a compile there would fail:
    autotuning synchronises). The first time
    a signature is seen it compiles (two calls of the compiled function on the real inputs, so that compiling,
    autotuning, kernel loading and any recompile all happen before the capture) and says so in the progress text.
    """
    unet = executor.class_obj
    compiled = _compiled()
    # The UNet writes into transformer_options (original_shape, block, transformer_index...). Each call gets a fresh
    # copy of the dict as it is now, so every call (the compile, the check below, the capture) meets the same guards:
    # a guard failing inside the capture would compile and autotune there, and autotuning synchronises, which a
    # capture forbids (seen on an H200: SDXL's capture failed with cudaErrorStreamCaptureUnsupported).
    options = dict(transformer_options)

    def run_compiled(x, timesteps, context, y):
        return compiled(unet, x, timesteps, context, y, dict(options))

    record = record_of(unet)
    key = signature(tensors)
    if key not in record.seconds:
        cache = compile_cache_dir()
        x = tensors["x"]
        family = _family(unet)
        progress_text(f"LCM Nodes: compiling the {family} UNet for {'x'.join(map(str, x.shape))} {str(x.dtype).replace('torch.', '')} "
                      f"latents with torch.compile: about {EXPECTED_COLD_SECONDS[family]} s on an H200 the first time, about a third "
                      f"of that when {cache} already holds it; once per model, size and batch.")
        start = time.perf_counter()
        try:
            with torch.no_grad():
                for _ in range(2):  # the first call compiles and autotunes; the second must meet no new guard
                    run_compiled(tensors["x"], tensors["timesteps"], tensors["context"], tensors["y"])
            torch.cuda.synchronize()
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - dynamo/inductor/Triton raise many types: any means "run exact"
            record.failed = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
            log.warning("LCM Nodes: torch.compile of the UNet failed (%s); this model runs the exact kernels from now on.",
                        record.failed)
            return exact_forward
        record.seconds[key] = time.perf_counter() - start
        progress_text(f"LCM Nodes: UNet compiled in {record.seconds[key]:.1f} s.")
    return run_compiled
