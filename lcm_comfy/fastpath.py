"""The GPU fast path's ComfyUI glue: per-MODEL sampling clones, the CUDA-graph wrapper, and the graphs' lifetime.

The graphs themselves are :class:`lcm_core.graphs.GraphCache`'s. This module decides, per forward, whether a
capture is safe (:func:`fast_path_blocker`), serves safe forwards from the cache (a DIFFUSION_MODEL wrapper that
sits inside the guidance wrapper), and, after a run, whether the graphs stay (:func:`keep_graphs_after_run`:
``keep_graphs``, ComfyUI's queue, free memory). The graphs also go when ComfyUI unloads the weights.

State and threads. Each input MODEL keeps its sampling clones in a :class:`SamplingClones` registry (one per
MODEL, created under a module lock); each :class:`SamplingClone` carries a run lock that the samplers hold for a
whole run, so two library calls on one MODEL run one after the other, never interleaved on one clone's graphs.
ComfyUI's executor runs one prompt at a time, so the lock is never contended there. Clones and graphs are freed
with the MODEL (the registry lives in the MODEL's ``__dict__``) or when ComfyUI unloads it.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import comfy.model_management
import comfy.patcher_extension
import torch

from ..lcm_core.graphs import GraphCache
from . import compile as compile_mode  # the sampler's opt-in torch.compile mode

log = logging.getLogger("lcm_nodes")

FAST_WRAPPER_KEY = "lcm_nodes_cuda_graph"
GRAPH_CACHE_ATTR = "_lcm_nodes_graph_cache"
SAMPLING_CLONES_ATTR = "_lcm_nodes_sampling_clones"
DIFFUSION_MODEL = comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL
_REGISTRY_LOCK = threading.Lock()


# ------------------------------------------------------------------------------------------ graph cache


def graph_cache_of(model) -> GraphCache:
    """The CUDA-graph cache of a MODEL's underlying network (shared by its clones, dropped on unload)."""
    cache = getattr(model.model, GRAPH_CACHE_ATTR, None)
    if cache is None:
        with _REGISTRY_LOCK:
            cache = getattr(model.model, GRAPH_CACHE_ATTR, None)
            if cache is None:
                cache = GraphCache()
                setattr(model.model, GRAPH_CACHE_ATTR, cache)
    return cache


def release_graphs(model) -> None:
    """Drop a MODEL's captured graphs and return their memory (also called when ComfyUI unloads it)."""
    cache = getattr(model.model, GRAPH_CACHE_ATTR, None)
    if cache is not None and len(cache):
        cache.clear()
        comfy.model_management.soft_empty_cache()


def _release_if_unloaded(patcher, *args, **kwargs) -> None:
    """ON_DETACH callback: drop the graphs once the weights have really left the GPU.

    ComfyUI also detaches short-lived clones (and clones it replaces by another clone of the same
    network) without moving the weights; the graphs stay valid then and are kept.
    """
    if not getattr(patcher.model, "model_loaded_weight_memory", 0):
        release_graphs(patcher)


def _rewalk_weights(patcher, *args, **kwargs) -> None:
    """ON_LOAD callback: (re)loading may swap sub-modules (object patches), so walk the module tree again."""
    graph_cache_of(patcher).watch.forget()


def prompts_waiting() -> int | None:
    """Prompts waiting in the ComfyUI server's queue behind the running one; None when no server runs this
    (a library call, or ComfyUI's executor driven in-process)."""
    server = sys.modules.get("server")
    queue = getattr(getattr(getattr(server, "PromptServer", None), "instance", None), "prompt_queue", None)
    if queue is None:
        return None
    try:
        return max(0, int(queue.get_tasks_remaining()) - len(queue.currently_running))
    except (AttributeError, TypeError, ValueError):
        return None


def keep_graphs_after_run(cache: GraphCache, mode: str) -> bool:
    """Whether a model's graphs stay after a run: the mode allows it, and the GPU is not short of memory.

    "while queued" keeps them only while more prompts wait in ComfyUI's queue (or when no server runs this),
    so an idle ComfyUI holds no graph memory. ComfyUI counts memory PyTorch has reserved but not handed out
    as free, and the graphs' private pool looks like that while no other allocation can use it; so the pool
    is subtracted, and the graphs go when what is left is under ComfyUI's minimum for inference (or under
    the pool's own size).
    """
    if mode == "never":
        return False
    if mode == "while queued" and prompts_waiting() == 0:
        log.debug("LCM fast path: no prompt waiting in the queue; freeing %.0f MiB of CUDA graphs.", cache.pool_bytes / 2**20)
        return False
    device = comfy.model_management.get_torch_device()
    free = comfy.model_management.get_free_memory(device) - cache.pool_bytes
    needed = max(comfy.model_management.minimum_inference_memory(), cache.pool_bytes)
    if free < needed:
        log.info("LCM fast path: freeing %.0f MiB of CUDA graphs after the run, as GPU memory is short "
                 "(%.0f MiB free, %.0f MiB wanted).", cache.pool_bytes / 2**20, free / 2**20, needed / 2**20)
        return False
    return True


# ------------------------------------------------------------------------------------------ the wrapper


def fast_path_blocker(patcher, x, control, transformer_options, kwargs) -> str | None:
    """Why this forward cannot be captured, or None when it can."""
    if not x.is_cuda:
        return "not on a CUDA device"
    if control is not None:
        return "a ControlNet is attached"
    if any(transformer_options.get(k) for k in ("patches", "patches_replace")):
        return "the model has attention/block patches"
    if any(v is not None for v in kwargs.values()):
        return f"extra model inputs {sorted(k for k, v in kwargs.items() if v is not None)}"
    if getattr(patcher.model, "model_lowvram", False):
        return "the model is only partly loaded on the GPU (low VRAM)"
    if patcher.model_options.get("torch_compile_kwargs") is not None or torch.compiler.is_compiling():
        return "the model is compiled with torch.compile (TorchCompileModel), which a CUDA-graph capture cannot run inside"
    return None


@dataclass
class RunRecord:
    """What the graph wrapper saw during the current run of one sampling clone (reset at each run's start)."""

    graph_calls: int = 0
    eager_calls: int = 0
    fast_path_off: str | None = None
    first_forward_at: float | None = None
    fingerprint: int | None = None
    compile: bool = False  # asked for (compile mode); whether it runs is decided at the first forward
    compiled: bool = False


def _make_fast_wrapper(patcher, clone: SamplingClone):
    """DIFFUSION_MODEL wrapper replaying the UNet forward as a CUDA graph when that is safe.

    The wrapper lives in ``patcher``'s wrappers, so it holds ``patcher`` and ``clone`` weakly: a strong reference
    would be a cycle that only Python's cycle collector frees, and until it ran ComfyUI would keep one more
    loaded-model entry for every MODEL that ever sampled on the fast path. Both are alive whenever it is called
    (a run samples on ``patcher``; ``clone`` lives in the input MODEL's registry).
    """
    cache = graph_cache_of(patcher)
    patcher_ref, clone_ref = weakref.ref(patcher), weakref.ref(clone)

    def wrapper(executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        record = clone_ref().record
        blocker = fast_path_blocker(patcher_ref(), x, control, transformer_options, kwargs)
        if blocker is not None:
            if record.fast_path_off is None:
                log.info("LCM fast path off for this run: %s; using the ordinary path.", blocker)
                record.fast_path_off = blocker
            record.eager_calls += 1
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        if record.fingerprint is None:  # the run's first forward: decide once what this run's graphs replay
            record.first_forward_at = time.perf_counter()
            record.compiled = record.compile and compile_mode.decide(executor)
            # compiled and exact graphs get different keys (unchanged when compile mode is not running)
            record.fingerprint = compile_mode.fingerprint(cache.watch(executor.class_obj), record.compiled)

        def forward(x, timesteps, context, y):
            return executor(x, timesteps, context, y, control, transformer_options)

        record.graph_calls += 1
        tensors = {"x": x, "timesteps": timesteps, "context": context, "y": y}
        if record.compiled:  # compiles (outside any capture) the first time this size is seen; then a lookup
            forward = compile_mode.compiled_forward(forward, executor, transformer_options, tensors)
        return cache.run(forward, record.fingerprint, tensors)

    return wrapper


# ------------------------------------------------------------------------------------------ sampling clones


@dataclass
class SamplingClone:
    """A patched clone of an input MODEL that runs are made on, with its run lock and the current run's record."""

    model: object
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    record: RunRecord = field(default_factory=RunRecord)

    @property
    def graphs(self) -> GraphCache | None:
        return getattr(self.model.model, GRAPH_CACHE_ATTR, None)


class SamplingClones:
    """The sampling clones of one input MODEL, one per sampler kind and setting.

    Reusing one clone across prompts matters: ComfyUI treats every new clone as a new model to load and
    unloads the previous one (moving its weights off the GPU and back), which costs more than 4 LCM steps.
    The input MODEL itself is never changed; the registry is only remembered beside it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._clones: dict[tuple, SamplingClone] = {}

    @staticmethod
    def of(model) -> SamplingClones:
        with _REGISTRY_LOCK:
            registry = model.__dict__.get(SAMPLING_CLONES_ATTR)
            if registry is None:
                registry = model.__dict__[SAMPLING_CLONES_ATTR] = SamplingClones()
            return registry

    def get(self, model, key: tuple, model_sampling: Callable[[object], object], fast: bool) -> SamplingClone:
        """The clone for ``key``, made on first use: ``model_sampling(model_config)`` is its object patch, and
        with ``fast`` on a CUDA device the graph wrapper and the unload callbacks are installed."""
        with self._lock:
            full_key = (*key, bool(fast))
            clone = self._clones.get(full_key)
            if clone is None:
                clone = self._clones[full_key] = _new_clone(model, model_sampling, bool(fast))
            return clone


def _new_clone(model, model_sampling: Callable[[object], object], fast: bool) -> SamplingClone:
    m = model.clone()
    # The clone lives beside ``model`` (a reference cycle), so both are freed together; ComfyUI would then
    # hand the clone's loaded-model slot to the freed ``model`` and keep a dead entry for every MODEL that
    # ever sampled. ``model``'s own parent outlives them both.
    m.parent = model.parent
    ms = model_sampling(m.model.model_config)
    ms.lcm_nodes_owned = True  # ours alone: the sampler may move its tables to the GPU
    m.add_object_patch("model_sampling", ms)
    clone = SamplingClone(model=m)
    if fast and comfy.model_management.get_torch_device().type == "cuda":
        m.remove_wrappers_with_key(DIFFUSION_MODEL, FAST_WRAPPER_KEY)
        m.add_wrapper_with_key(DIFFUSION_MODEL, FAST_WRAPPER_KEY, _make_fast_wrapper(m, clone))  # after (inside) guidance
        m.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_DETACH, FAST_WRAPPER_KEY, _release_if_unloaded)
        m.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_LOAD, FAST_WRAPPER_KEY, _rewalk_weights)
    return clone


def sampling_clone(model, key: tuple, model_sampling: Callable[[object], object], fast: bool) -> SamplingClone:
    """The sampling clone of ``model`` for ``key`` (e.g. ``("lcm", timestep_scaling)``); see :class:`SamplingClones`."""
    return SamplingClones.of(model).get(model, key, model_sampling, fast)


def finish_run(clone: SamplingClone, keep_graphs: str) -> bool:
    """After a run: free the clone's graphs unless :func:`keep_graphs_after_run` keeps them. True when freed."""
    cache = clone.graphs
    if cache is not None and len(cache) and not keep_graphs_after_run(cache, keep_graphs):
        release_graphs(clone.model)
        return True
    return False
