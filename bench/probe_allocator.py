"""Is compile mode's refusal of the cudaMallocAsync allocator still needed? (issue #12; run on a GPU machine)

Compile mode stays off under ComfyUI's default allocator because a compiled SDXL UNet captured in a CUDA graph
once ended the server process (cudaErrorInvalidValue in CUDAMallocAsyncAllocator::free, PyTorch 2.11, H200),
before the capture fix in ``lcm_comfy/compile.py`` (a fresh copy of the options per call). This probe runs the
SDXL compile-mode sampler under cudaMallocAsync with the refusal lifted, in this process, and prints one JSON
line: ``{"ok": true, ...}`` when three runs passed and matched each other, or the error. A crash of the process
(what was seen) prints nothing: the caller reads the exit status.

    PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync python bench/probe_allocator.py --comfyui PATH
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import boot_comfy, full_size_parts, pack, sample  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--comfyui", required=True)
    p.add_argument("--family", default="sdxl", choices=("sdxl", "sd15"))
    args = p.parse_args()
    if "cudaMallocAsync" not in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""):
        p.error("set PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync (the allocator ComfyUI starts with by default)")
    boot_comfy(args.comfyui, cpu=False)
    backend = torch.cuda.memory.get_allocator_backend()
    compile_mod = pack("lcm_comfy.compile")
    original = compile_mod._blocker

    def lifted(executor):  # the same checks, with the allocator read as the native one
        real = torch.cuda.memory.get_allocator_backend
        torch.cuda.memory.get_allocator_backend = lambda: "native"
        try:
            return original(executor)
        finally:
            torch.cuda.memory.get_allocator_backend = real

    compile_mod._blocker = lifted
    model, _, pos, latent = full_size_parts(args.family, f"{args.family}-probe", with_vae=False)
    outs, times = [], []
    with torch.inference_mode():
        for _ in range(3):
            t0 = time.perf_counter()
            out, stats = sample(model, pos, None, latent, 42, 8.0, compile_=True)
            torch.cuda.synchronize()
            times.append(round(time.perf_counter() - t0, 3))
            outs.append(out)
    record = compile_mod.record_of(model.model.diffusion_model)
    result = {"ok": record.failed is None and all(torch.equal(o, outs[0]) for o in outs), "allocator": backend,
              "family": args.family, "seconds_per_run": times, "compiled_signatures": len(record.seconds),
              "compile_failed": record.failed, "graph_calls_last_run": stats.graph_calls, "torch": torch.__version__}
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
