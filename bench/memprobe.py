"""Where does a ComfyUI server's memory go over many LCM prompts? (issue #6 investigation; CPU, tiny models)

Starts a real ComfyUI server (``--cpu``) with this pack and the quickstart's tiny smoke models
(``lcm_tools.smoke``: built once into the pack's cache, about 500 MB), runs warm-up prompts, then takes a
snapshot (Python allocations by line via tracemalloc, live torch tensors by shape, gc object counts by type, RSS)
after every block of prompts, and prints what grew.

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
sys.path.append(str(REPO))
LDM_UNET = "ldm-unet.safetensors"  # the smoke UNet in ComfyUI's layout, for the native run's UNETLoader

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


def build_models(comfy: Path, models: Path) -> None:
    """The quickstart's smoke models (built once into the pack's cache) linked into ``models``, plus their UNet
    alone in ComfyUI's layout without the guidance embedding, for the native run's UNETLoader."""
    from safetensors.torch import load_file, save_file

    from lcm_tools.smoke import NAMES, ensure_models

    smoke = ensure_models(comfy)
    for kind, folder in (("ckpt", "checkpoints"), ("unet", "diffusion_models"), ("lora", "loras")):
        link = models / folder / NAMES[kind]
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(smoke / folder / NAMES[kind])
    prefix = "model.diffusion_model."
    ckpt = load_file(str(smoke / "checkpoints" / NAMES["ckpt"]))
    save_file({k[len(prefix):]: v for k, v in ckpt.items() if k.startswith(prefix)}, str(models / "diffusion_models" / LDM_UNET))


def _latent_prompt(seed: int, prefix: str, model: dict, sampler: str, sampler_inputs: dict) -> dict:
    """1 step to a SaveLatent at 64x64 on the smoke checkpoint's CLIP: ``model`` is node 1, node 3 a ``sampler``."""
    from lcm_tools.smoke import NAMES

    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": NAMES["ckpt"]}},
        "1": model,
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse", "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "3": {"class_type": sampler, "inputs": {"model": ["1", 0], "positive": ["6", 0], "latent_image": ["5", 0], "seed": seed,
                                                "steps": 1, **sampler_inputs}},
        "9": {"class_type": "SaveLatent", "inputs": {"samples": ["3", 0], "filename_prefix": f"{prefix}/s{seed}"}},
    }


def lcm_prompt(seed: int, lora: bool = False, prefix: str = "lcm") -> dict:
    """Our nodes: LCM Apply LoRA on the checkpoint's UNet (guidance 1) or LCM Load UNet (guidance 8), LCM Sampler."""
    from lcm_tools.smoke import NAMES

    model = ({"class_type": "LCMApplyLoRA", "inputs": {"model": ["4", 0], "lora_name": NAMES["lora"], "strength": 1.0}} if lora
             else {"class_type": "LCMLoadUNet", "inputs": {"unet_name": NAMES["unet"], "weight_dtype": "fp32"}})
    return _latent_prompt(seed, prefix, model, "LCMSampler", {"guidance_scale": 1.0 if lora else 8.0, "timesteps": ""})


def native_prompt(seed: int, lora: bool = False, prefix: str = "nat") -> dict:
    """The same alternation with ComfyUI's own nodes: LoraLoaderModelOnly or UNETLoader, KSampler lcm."""
    from lcm_tools.smoke import NAMES

    model = ({"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["4", 0], "lora_name": NAMES["lora"], "strength_model": 1.0}} if lora
             else {"class_type": "UNETLoader", "inputs": {"unet_name": LDM_UNET, "weight_dtype": "default"}})
    return _latent_prompt(seed, prefix, model, "KSampler", {"negative": ["6", 0], "cfg": 1.0, "sampler_name": "lcm",
                                                            "scheduler": "sgm_uniform", "denoise": 1.0})


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--blocks", type=int, default=3)
    p.add_argument("--per-block", type=int, default=25)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--no-trace", action="store_true", help="RSS, tensors and object counts only (much faster)")
    p.add_argument("--native", action="store_true",
                   help="control run: the same alternation with ComfyUI's own nodes only (UNETLoader / LoraLoader + KSampler lcm)")
    args = p.parse_args()
    from lcm_tools.client import ComfyClient
    from lcm_tools.locate import find_comfyui
    from lcm_tools.server import LocalComfy

    path, _ = find_comfyui()
    work = Path(tempfile.mkdtemp(prefix="memprobe-"))
    base = work / "base"
    for sub in ("custom_nodes", "input", "output", "temp", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    build_models(path, base / "models")
    make_prompt = native_prompt if args.native else lcm_prompt
    hook_dir = work / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(HOOK)
    snaps = work / "snaps"
    snaps.mkdir()
    env = {"PYTHONPATH": os.pathsep.join([str(hook_dir), os.environ.get("PYTHONPATH", "")]), "MEMPROBE_OUT": str(snaps)}
    if args.no_trace:
        env["MEMPROBE_FRAMES"] = "0"
    server = LocalComfy(path, base_directory=base, cpu=True, env=env, log_path=work / "server.log")
    with server as url:
        client = ComfyClient(url)

        def snapshot():
            before = len(list(snaps.glob("*.json")))
            os.kill(server.proc.pid, signal.SIGUSR1)
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
