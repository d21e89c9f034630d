"""Where the time goes in one LCM sampling call on the GPU (profile + ComfyUI's model-loading log).

    python bench/diagnose.py --comfyui PATH [--family sdxl]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lcm import boot_comfy, comfy_conds, unet_config  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--comfyui", required=True)
    p.add_argument("--family", default="sdxl")
    args = p.parse_args()
    boot_comfy(args.comfyui, cpu=False)
    logging.getLogger().setLevel(logging.INFO)
    import comfy.model_management as mm
    import comfy.sample
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete
    from diffusers import UNet2DConditionModel

    from lcm_core import comfy_adapter

    released = []
    orig_release = comfy_adapter.release_graphs
    comfy_adapter.release_graphs = lambda m: (released.append(time.perf_counter()), orig_release(m))
    fam = args.family
    h = 64 if fam == "sd15" else 128
    with torch.device("cuda"):
        unet = UNet2DConditionModel(**unet_config(fam, None)).half().eval()
    sd = {k: v.detach().cpu() for k, v in unet.state_dict().items()}
    del unet
    torch.cuda.empty_cache()
    model = comfy_adapter.load_lcm_unet_state_dict(sd, fam, "fp16")
    native = ModelSamplingDiscrete().patch(model, "lcm", False)[0]
    pos, neg = comfy_conds(fam, 1, h)
    latent = {"samples": torch.zeros(1, 4, h, h)}

    def native_run():
        noise = comfy.sample.prepare_noise(latent["samples"], 1)
        return comfy.sample.sample(native, noise, 4, 1.0, "lcm", "sgm_uniform", pos, neg, latent["samples"], denoise=1.0, disable_pbar=True, seed=1)

    def ours(fast):
        st = {}
        out = comfy_adapter.sample(model, pos, neg, latent, 1, 4, 1.0, fast=fast, disable_pbar=True, stats=st)
        return out, st

    with torch.inference_mode():
        for label, fn in (("native", native_run), ("ours-eager", lambda: ours(False)), ("ours-fast", lambda: ours(True))):
            for i in range(4):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                r = fn()
                torch.cuda.synchronize()
                dt = (time.perf_counter() - t0) * 1000
                extra = r[1] if isinstance(r, tuple) else ""
                print(f"{label} call {i}: {dt:.1f} ms; loaded={[type(x.model.model).__name__ for x in mm.current_loaded_models]} "
                      f"releases={len(released)} {extra if extra else ''}", flush=True)
        from torch.profiler import ProfilerActivity, profile

        for label, fn in (("native", native_run), ("ours-fast", lambda: ours(True))):
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                fn()
                torch.cuda.synchronize()
            print(f"==== profile {label}")
            print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=22, max_name_column_width=60))
        # the bare UNet forward as ComfyUI runs it, eager
        dm = model.model.diffusion_model
        x = torch.randn(1, 4, h, h, device="cuda", dtype=torch.float16)
        ctx = torch.randn(1, 77, 2048 if fam == "sdxl" else 768, device="cuda", dtype=torch.float16)
        y = torch.randn(1, 2816, device="cuda", dtype=torch.float16) if fam == "sdxl" else None
        t = torch.tensor([999.0], device="cuda")
        for _ in range(3):
            dm(x, t, ctx, y)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            dm(x, t, ctx, y)
        torch.cuda.synchronize()
        print(f"bare ComfyUI UNet forward, eager: {(time.perf_counter() - t0) * 100:.1f} ms; weights on {next(dm.parameters()).device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
