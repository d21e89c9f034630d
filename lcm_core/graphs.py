"""CUDA-graph replay of a model forward, for the LCM loop's GPU fast path.

A 4-step LCM run on a large GPU is dominated by kernel-launch overhead, not arithmetic (an SDXL UNet
forward launches ~5,000 kernels). :class:`GraphCache` captures one forward per input signature
(shapes, dtypes, device) and replays it, copying new inputs into the captured buffers. Replays compute
the same kernels on the same data as the eager call they were captured from. The cache is bound to a
*fingerprint* of the weights (their storage addresses): when weights are swapped (LoRA patched, model
reloaded) every captured graph is dropped and captured again. Pure torch; nothing here knows ComfyUI.

Threads: a :class:`GraphCache` belongs to one network. Its methods take the cache's lock, so two threads never
capture into or replay the same graph at once; but a replay's output buffer is shared, so a caller must run one
sampling run per MODEL at a time (ComfyUI's executor does: prompts run one after another). ``lcm_comfy``'s
sampler holds the model's run lock for the whole run, which makes concurrent library calls on one MODEL wait
for each other instead of corrupting each other's graph inputs.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .errors import LCMInputError

#: What happens to a model's captured graphs when a sampling run ends: kept for the next run only while more
#: prompts wait in ComfyUI's queue (the default: capture is amortised over a queue, and nothing stays allocated
#: once the queue is empty), always kept while ComfyUI keeps the model loaded, or freed after every run.
KEEP_GRAPHS_MODES = ("while queued", "always", "never")


def keep_graphs_mode(value: object) -> str:
    """``value`` as one of :data:`KEEP_GRAPHS_MODES` (``True``/``False`` mean "always"/"never")."""
    if value is True or value is False:
        return "always" if value else "never"
    if isinstance(value, str) and value in KEEP_GRAPHS_MODES:
        return value
    raise LCMInputError(f"keep_graphs={value!r} is not one of {list(KEEP_GRAPHS_MODES)}: pick one of those "
                        "('while queued' keeps the GPU fast path's graphs only while more prompts are queued).")


class WeightsWatch:
    """A hash of the storage addresses, shapes and dtypes of a module's parameters and buffers, cheap enough
    to check before every run.

    Walking an SDXL UNet's module tree takes ~20 ms of Python, spent while the GPU waits for the first
    step. The tree is walked once; later calls only re-read the tensors in the remembered slots, which
    catches every weight or buffer replaced in place (a LoRA patched or unpatched, the model moved).
    A change of the tree itself (an object patch swapping a sub-module) is only seen after
    :meth:`forget`, which the owner calls whenever the model is (re)loaded.
    """

    def __init__(self) -> None:
        self._module: torch.nn.Module | None = None
        self._slots: list[tuple[dict, str]] = []

    def forget(self) -> None:
        self._module = None
        self._slots = []

    def __call__(self, module: torch.nn.Module) -> int:
        if self._module is not module:
            self._slots = [(d, name) for m in module.modules() for d in (m._parameters, m._buffers) for name in d]
            self._module = module
        items = []
        for d, name in self._slots:
            t = d.get(name)
            items.append(None if t is None else (t.data_ptr(), t.shape, t.dtype))
        return hash(tuple(items))


def signature(tensors: dict[str, torch.Tensor | None]) -> tuple:
    return tuple(
        (k, None) if v is None else (k, tuple(v.shape), v.dtype, str(v.device)) for k, v in sorted(tensors.items())
    )


_CAPTURE_STREAMS: dict[int, torch.cuda.Stream] = {}
_CAPTURE_STREAMS_LOCK = threading.Lock()


def _capture_stream() -> torch.cuda.Stream:
    """One side stream per device for every warm-up and capture.

    cuBLAS keeps a workspace (tens of MiB) for every stream it has run on, outside what ``empty_cache``
    returns; a fresh stream per capture would add one each time graphs are captured again.
    """
    device = torch.cuda.current_device()
    with _CAPTURE_STREAMS_LOCK:
        stream = _CAPTURE_STREAMS.get(device)
        if stream is None:
            stream = _CAPTURE_STREAMS[device] = torch.cuda.Stream()
        return stream


def _pool_bytes(graph: torch.cuda.CUDAGraph) -> int:
    """Bytes of the allocator segments that belong to ``graph``'s private memory pool."""
    pool = tuple(graph.pool())
    try:
        return sum(seg["total_size"] for seg in torch.cuda.memory_snapshot() if tuple(seg.get("segment_pool_id", ())) == pool)
    except (RuntimeError, KeyError, TypeError):  # the snapshot format is PyTorch's, not a promise: report 0 rather than fail
        return 0


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor | None]
    output: torch.Tensor
    pool_bytes: int = 0


@dataclass
class GraphCache:
    """Captured forwards of one model, keyed by input signature, valid for one weights fingerprint.

    Attributes:
        capture_seconds: wall time of each capture (warm-up included), for reporting (the last 100).
        capture_warmups: eager warm-up forwards run before each capture (the last 100).
        warmed: signatures already run on this model in this process. Warm-up exists for one-time work
            (cuBLAS/cuDNN handles and workspaces on the capture stream, algorithm choice, lazy init) that must
            not happen inside a capture; it is not repeated when graphs released earlier (``keep_graphs`` "never",
            model unloaded, weights swapped) are captured again for the same signature.
        lock: held by :meth:`run` and :meth:`clear` (re-entrant, so a release from inside a run is safe).
    """

    warmup: int = 2
    fingerprint: int | None = None
    entries: dict[tuple, _Captured] = field(default_factory=dict)
    capture_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=100))  # bounded: a server captures
    capture_warmups: deque[int] = field(default_factory=lambda: deque(maxlen=100))  # again after every idle prompt
    warmed: set[tuple] = field(default_factory=set)
    watch: WeightsWatch = field(default_factory=WeightsWatch)
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    def clear(self) -> None:
        """Drop every graph (their memory pools go back to PyTorch's allocator)."""
        with self.lock:
            self.entries.clear()
            self.fingerprint = None
            self.watch.forget()

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def pool_bytes(self) -> int:
        """GPU memory the captured graphs hold (measured as the allocator's growth during each capture)."""
        return sum(e.pool_bytes for e in self.entries.values())

    def run(self, fn: Callable[..., torch.Tensor], fingerprint: int, tensors: dict[str, torch.Tensor | None]) -> torch.Tensor:
        """``fn(**tensors)`` through a captured graph; captures on first use of this signature.

        Inference only: the result carries no autograd history (under grad mode an eager forward would
        record one that keeps every activation of the capture alive for as long as the result lives).
        """
        with self.lock, torch.no_grad():
            return self._run(fn, fingerprint, tensors)

    def _run(self, fn: Callable[..., torch.Tensor], fingerprint: int, tensors: dict[str, torch.Tensor | None]) -> torch.Tensor:
        if fingerprint != self.fingerprint:
            self.clear()
            self.fingerprint = fingerprint
        key = signature(tensors)
        entry = self.entries.get(key)
        if entry is None:
            entry = self._capture(fn, tensors, 0 if key in self.warmed else self.warmup)
            self.entries[key] = entry
            self.warmed.add(key)
        else:
            for name, value in tensors.items():
                if value is not None:
                    entry.inputs[name].copy_(value)
            entry.graph.replay()
        return entry.output.clone()

    def _capture(self, fn: Callable[..., torch.Tensor], tensors: dict[str, torch.Tensor | None], warmup: int) -> _Captured:
        start = time.perf_counter()
        static = {k: (v.clone() if v is not None else None) for k, v in tensors.items()}
        stream = _capture_stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):  # let lazy initialisation and allocator warm-up happen outside the graph
                fn(**static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            output = fn(**static)
        pool_bytes = _pool_bytes(graph)
        graph.replay()  # the captured run computed nothing yet: replay once for this call's result
        torch.cuda.synchronize()
        self.capture_seconds.append(time.perf_counter() - start)
        self.capture_warmups.append(warmup)
        return _Captured(graph=graph, inputs=static, output=output, pool_bytes=max(pool_bytes, 0))
