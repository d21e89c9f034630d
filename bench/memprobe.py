"""Where does a ComfyUI server's memory go over many LCM prompts? (issue #6 investigation; CPU, tiny models)

Starts a real ComfyUI server (``--cpu``) with this pack and the test suite's tiny models, runs warm-up
prompts, then takes a snapshot (Python allocations by line via tracemalloc, live torch tensors by shape,
gc object counts by type, RSS) after every block of prompts, and prints what grew.

    python bench/memprobe.py [--blocks 3] [--per-block 25]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

HOOK = textwrap.dedent('''
    import gc, json, os, signal, sys, tracemalloc, collections
    def _dump(signum, frame):
        import torch, psutil
        gc.collect()
        out = os.environ["MEMPROBE_OUT"]
        n = len([f for f in os.listdir(out) if f.endswith(".json")])
        if tracemalloc.is_tracing():
            tracemalloc.take_snapshot().dump(os.path.join(out, f"{n}.snap"))
        elif os.environ.get("MEMPROBE_FRAMES", "8") != "0":  # traced from the first snapshot on (tracing start-up takes minutes)
            tracemalloc.start(int(os.environ.get("MEMPROBE_FRAMES", "8")))
        tensors = collections.Counter(); types = collections.Counter()
        for o in gc.get_objects():
            types[type(o).__name__] += 1
            try:
                if isinstance(o, torch.Tensor) and not o.is_meta:
                    tensors[f"{tuple(o.shape)} {o.dtype}"] += o.numel() * o.element_size()
            except Exception:
                pass
        import comfy.model_management as mm
        info = {"rss": psutil.Process().memory_info().rss, "loaded_models": len(mm.current_loaded_models), "tensors": dict(tensors), "types": dict(types),
                "traced": tracemalloc.get_traced_memory()[0] if tracemalloc.is_tracing() else 0}
        with open(os.path.join(out, f"{n}.json"), "w") as f:
            json.dump(info, f)
    signal.signal(signal.SIGUSR1, _dump)
''')


def native_prompt(seed: int, lora: bool = False, prefix: str = "nat") -> dict:
    """The memory test's alternation with ComfyUI's own nodes: UNETLoader or LoraLoader as node 1, KSampler lcm."""
    from test_http import TINY

    p = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY["ckpt"]}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse", "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "3": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["6", 0], "negative": ["6", 0], "latent_image": ["5", 0],
                                                   "seed": seed, "steps": 1, "cfg": 1.0, "sampler_name": "lcm", "scheduler": "sgm_uniform",
                                                   "denoise": 1.0}},
        "9": {"class_type": "SaveLatent", "inputs": {"samples": ["3", 0], "filename_prefix": f"{prefix}/s{seed}"}},
    }
    if lora:
        p["1"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["4", 0], "lora_name": TINY["lora"], "strength_model": 1.0}}
    else:
        p["1"] = {"class_type": "UNETLoader", "inputs": {"unet_name": "ldm-unet.safetensors", "weight_dtype": "default"}}
    return p


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--blocks", type=int, default=3)
    p.add_argument("--per-block", type=int, default=25)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--no-trace", action="store_true", help="RSS, tensors and object counts only (much faster)")
    p.add_argument("--native", action="store_true",
                   help="control run: the same alternation with ComfyUI's own nodes only (UNETLoader / LoraLoader + KSampler lcm)")
    args = p.parse_args()
    from comfy_harness import find_comfyui, make_base_dir
    from models import diffusers_unet_to_ldm, random_lora, save_unet, tiny_sd15_checkpoint, tiny_sd15_unet
    from safetensors.torch import save_file
    from test_http import TINY
    from test_reliability import latent_prompt, server_process

    from lcm_tools.client import ComfyClient
    from lcm_tools.server import LocalComfy

    path, _ = find_comfyui()
    sys.path.insert(0, str(path))  # the tiny checkpoint is written with ComfyUI's key maps
    work = Path(tempfile.mkdtemp(prefix="memprobe-"))
    base = make_base_dir(work / "base")
    models = base / "models"
    tiny_sd15_checkpoint(models / "checkpoints" / TINY["ckpt"])
    save_unet(tiny_sd15_unet(time_cond_proj_dim=256, seed=5), models / "diffusion_models" / TINY["unet"])
    save_file(random_lora(tiny_sd15_unet(time_cond_proj_dim=None, seed=21), "kohya"), str(models / "loras" / TINY["lora"]))
    save_file({k: v.contiguous() for k, v in diffusers_unet_to_ldm(tiny_sd15_unet(time_cond_proj_dim=None, seed=5)).items()},
              str(models / "diffusion_models" / "ldm-unet.safetensors"))
    make_prompt = native_prompt if args.native else latent_prompt
    hook_dir = work / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(HOOK)
    snaps = work / "snaps"
    snaps.mkdir()
    os.environ["PYTHONPATH"] = os.pathsep.join([str(hook_dir), os.environ.get("PYTHONPATH", "")])
    os.environ["MEMPROBE_OUT"] = str(snaps)
    if args.no_trace:
        os.environ["MEMPROBE_FRAMES"] = "0"
    with LocalComfy(path, base_directory=base, cpu=True, log_path=work / "server.log") as url:
        client = ComfyClient(url)
        proc = server_process(url)

        def snapshot():
            before = len(list(snaps.glob("*.json")))
            os.kill(proc.pid, signal.SIGUSR1)
            while len(list(snaps.glob("*.json"))) == before:
                time.sleep(0.2)
            time.sleep(0.5)

        seed = 0
        for _ in range(args.warmup):
            seed += 1
            client.wait(client.queue(make_prompt(seed, lora=bool(seed % 2), prefix="warm")))
        snapshot()  # starts tracing
        for _ in range(3):
            seed += 1
            client.wait(client.queue(make_prompt(seed, lora=bool(seed % 2), prefix="warm")))
        snapshot()  # first traced snapshot
        for b in range(args.blocks):
            for _ in range(args.per_block):
                seed += 1
                client.wait(client.queue(make_prompt(seed, lora=bool(seed % 2), prefix=f"b{b}")))
            snapshot()
    import tracemalloc

    infos = [json.loads((snaps / f"{i}.json").read_text()) for i in range(args.blocks + 2)]
    print("mode:", "ComfyUI native nodes" if args.native else "LCM nodes", " ComfyUI's loaded-model list:", [i["loaded_models"] for i in infos])
    print("RSS MiB:", [round(i["rss"] / 2**20, 1) for i in infos], " traced Python MiB:", [round(i["traced"] / 2**20, 2) for i in infos])
    first, last = infos[1], infos[-1]
    tgrow = {k: last["tensors"].get(k, 0) - first["tensors"].get(k, 0) for k in set(first["tensors"]) | set(last["tensors"])}
    print("live tensor bytes that grew:", sorted(((v, k) for k, v in tgrow.items() if v), reverse=True)[:10])
    ty = {k: last["types"].get(k, 0) - first["types"].get(k, 0) for k in set(first["types"]) | set(last["types"])}
    print("object counts that grew:", sorted(((v, k) for k, v in ty.items() if v > 0), reverse=True)[:15])
    if args.no_trace:
        print("work dir:", work)
        return 0
    a = tracemalloc.Snapshot.load(str(snaps / "1.snap"))
    z = tracemalloc.Snapshot.load(str(snaps / f"{args.blocks + 1}.snap"))
    print("top Python allocation growth (by traceback):")
    for stat in z.compare_to(a, "traceback")[:12]:
        print(f"  {stat.size_diff / 1024:+.1f} KiB in {stat.count_diff:+d} blocks")
        for line in stat.traceback.format()[-12:]:
            print("     ", line)
    print("work dir:", work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
