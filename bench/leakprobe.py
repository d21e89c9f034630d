"""Which allocations made while capturing a CUDA graph outlive the graph? (GPU; tiny model)

    COMFYUI_PATH=... python bench/leakprobe.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
os.environ["LCM_TEST_GPU"] = "1"

import tempfile  # noqa: E402

import torch  # noqa: E402

from comfy_harness import boot_in_process, find_comfyui, make_base_dir  # noqa: E402
from models import tiny_sd15_unet  # noqa: E402


def main() -> int:
    boot_in_process(find_comfyui()[0], make_base_dir(Path(tempfile.mkdtemp())))
    from lcm_core import comfy_adapter

    model = comfy_adapter.load_lcm_unet_state_dict(dict(tiny_sd15_unet(256).state_dict()), "leak", "fp16")
    pos = [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(4)), {}]]
    latent = {"samples": torch.zeros(2, 4, 16, 16)}
    for seed in range(3):
        comfy_adapter.sample(model, pos, None, latent, seed, 4, 8.0, fast=True, disable_pbar=True, keep_graphs=False)
    torch.cuda.memory._record_memory_history(max_entries=200000, stacks="python")
    before = {s["address"] for s in torch.cuda.memory_snapshot()}
    r0 = torch.cuda.memory_reserved()
    comfy_adapter.sample(model, pos, None, latent, 9, 4, 8.0, fast=True, disable_pbar=True, keep_graphs=False)
    torch.cuda.synchronize()
    print(f"reserved grew by {(torch.cuda.memory_reserved() - r0) >> 20} MiB in one keep_graphs=False run")
    snap = torch.cuda.memory._snapshot()
    seen = 0
    for seg in snap["segments"]:
        if seg["address"] in before:
            continue
        print(f"segment {seg['total_size'] >> 10} KiB pool={seg.get('segment_pool_id')} stream={seg.get('stream')}")
        for b in seg["blocks"]:
            if b["state"] != "active_allocated":
                continue
            frames = [f"{Path(f['filename']).name}:{f['line']}:{f['name']}" for f in b.get("frames", [])
                      if "torch/" not in f["filename"] or "cuda/graphs" in f["filename"]][:8]
            print(f"   {b['size'] >> 10} KiB  {frames}")
            seen += 1
            if seen > 40:
                return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
