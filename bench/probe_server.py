"""The benchmark's server-side probe: ComfyUI imports this file as a custom node (``lcm_bench_probe.py``).

``bench_server.py`` links it into the server's ``custom_nodes`` and sets ``LCM_BENCH_PROBE`` to a file; ComfyUI
imports it, and it then appends one JSON line per prompt to that file: the prompt's wall time, every node's
wall time and the CUDA-graph captures of the pack's fast path during it. It also adds the output node
``LCMBenchSink`` (takes anything, does nothing). Nothing of this runs when the variable is not set, or when the
benchmark itself imports the file for :func:`read_probe`.

Standard library only (and ComfyUI's ``execution``, inside ComfyUI): ComfyUI imports it alone, without ``bench/``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

PROBE_ENV = "LCM_BENCH_PROBE"
#: Where the pack's graph cache lives (the pack is imported under a path-derived name: matched by the tail).
GRAPH_CACHE_MODULES = ("lcm_core.graphs", "lcm_comfy.fastpath")


class LCMBenchSink:
    """Output node that takes any value and does nothing: lets a benchmark workflow end at latents or images."""

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 - ComfyUI's name
        return {"required": {"value": ("*", {"tooltip": "Anything; it is dropped."})}}

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def run(self, value):
        return {}


def _install_probe(path: str) -> None:
    """Record per-prompt and per-node wall times (and fast-path captures) to ``path``, one JSON object per prompt."""
    import execution

    lock = threading.Lock()
    current: dict = {}
    captures = {"n": 0, "seconds": []}
    patched_graphs: set[int] = set()

    def hook_graph_caches() -> None:
        # The pack's modules are imported under a path-derived name, after this probe: find them at run time.
        for name, module in list(sys.modules.items()):
            cls = getattr(module, "GraphCache", None) if name.endswith(GRAPH_CACHE_MODULES) else None
            if cls is None or id(cls) in patched_graphs:
                continue
            patched_graphs.add(id(cls))
            original = cls._capture

            def _capture(self, *args, _original=original, **kwargs):
                t0 = time.perf_counter()
                out = _original(self, *args, **kwargs)
                captures["n"] += 1
                captures["seconds"].append(time.perf_counter() - t0)
                return out

            cls._capture = _capture

    original_execute = execution.execute

    async def timed_execute(*args, **kwargs):
        t0 = time.perf_counter()
        result = await original_execute(*args, **kwargs)
        t1 = time.perf_counter()
        dynprompt, node_id = args[1], args[3]
        try:
            class_type = dynprompt.get_node(node_id)["class_type"]
        except Exception:  # noqa: BLE001 - an expanded node: keep the id
            class_type = "?"
        current.setdefault("nodes", []).append([node_id, class_type, t0, t1])
        return result

    execution.execute = timed_execute
    original_prompt = execution.PromptExecutor.execute_async

    async def timed_prompt(self, prompt, prompt_id, extra_data={}, execute_outputs=[]):  # noqa: B006 - ComfyUI's signature
        hook_graph_caches()
        current.clear()
        before = captures["n"]
        t0 = time.perf_counter()
        try:
            return await original_prompt(self, prompt, prompt_id, extra_data, execute_outputs)
        finally:
            t1 = time.perf_counter()
            record = {"prompt_id": prompt_id, "t0": t0, "t1": t1, "nodes": current.get("nodes", []),
                      "captures": captures["n"] - before, "capture_s": captures["seconds"][before:], "success": self.success}
            try:
                import torch

                if torch.cuda.is_available():
                    record["gpu_reserved_mib"] = torch.cuda.memory_reserved() / 2**20
            except Exception:  # noqa: BLE001
                pass
            with lock, open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    execution.PromptExecutor.execute_async = timed_prompt
    logging.getLogger("lcm_bench").info("LCM bench probe: timings to %s", path)


def read_probe(path: Path) -> dict[str, dict]:
    """The probe's records so far, by prompt id (empty before the first prompt ends)."""
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        out[rec["prompt_id"]] = rec
    return out


NODE_CLASS_MAPPINGS: dict = {}
if __name__ != "__main__" and os.environ.get(PROBE_ENV) and "execution" in sys.modules:
    NODE_CLASS_MAPPINGS["LCMBenchSink"] = LCMBenchSink
    _install_probe(os.environ[PROBE_ENV])
