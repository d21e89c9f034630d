"""Where the time goes in one LCM sampling call on the GPU (profile + ComfyUI's model-loading log).

    python bench/diagnose.py --comfyui PATH [--family sdxl]
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import logging
import pstats
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import boot_comfy, comfy_conds, load_unet, pack, sample, unet_config  # noqa: E402


def replay_ms(fn, *args, reps: int = 20):
    """GPU time of one forward replayed as a CUDA graph (device events), and its output."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*args)
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps, out.clone()


def kernel_variants(dm, x, t, ctx, y, compile_too: bool) -> None:
    """Would other kernels make the forward itself faster, and how far do their outputs move?"""
    fwd = lambda x, t, ctx, y: dm(x, t, ctx, y)  # noqa: E731
    base_ms, base = replay_ms(fwd, x, t, ctx, y)
    again_ms, again = replay_ms(fwd, x, t, ctx, y)
    rows = [("default (as ComfyUI runs it)", base_ms, 0.0), ("default, captured again", again_ms, (again - base).abs().max().item())]
    torch.backends.cudnn.benchmark = True
    ms, out = replay_ms(fwd, x, t, ctx, y)
    rows.append(("cudnn.benchmark", ms, (out - base).abs().max().item()))
    torch.backends.cudnn.benchmark = False
    for backend in ("EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(getattr(SDPBackend, backend)):
                ms, out = replay_ms(fwd, x, t, ctx, y)
            rows.append((f"SDPA {backend.lower()}", ms, (out - base).abs().max().item()))
        except Exception as exc:  # noqa: BLE001 - report and go on
            rows.append((f"SDPA {backend.lower()} failed: {type(exc).__name__}", float("nan"), float("nan")))
    dm.to(memory_format=torch.channels_last)
    ms, out = replay_ms(fwd, x.contiguous(memory_format=torch.channels_last), t, ctx, y)
    rows.append(("channels_last", ms, (out - base).abs().max().item()))
    torch.backends.cudnn.benchmark = True
    ms, out = replay_ms(fwd, x.contiguous(memory_format=torch.channels_last), t, ctx, y)
    rows.append(("channels_last + cudnn.benchmark", ms, (out - base).abs().max().item()))
    torch.backends.cudnn.benchmark = False
    dm.to(memory_format=torch.contiguous_format)
    if compile_too:
        t0 = time.perf_counter()
        try:
            compiled = torch.compile(dm)
            compiled(x, t, ctx, y)
            compile_s = time.perf_counter() - t0
            ms, out = replay_ms(lambda x, t, ctx, y: compiled(x, t, ctx, y), x, t, ctx, y)
            rows.append((f"torch.compile (compile {compile_s:.0f} s)", ms, (out - base).abs().max().item()))
        except Exception as exc:  # noqa: BLE001
            rows.append((f"torch.compile failed: {type(exc).__name__}: {str(exc)[:80]}", float("nan"), float("nan")))
    print("==== one UNet forward replayed as a CUDA graph: GPU ms, max abs diff vs default")
    for name, ms, diff in rows:
        print(f"  {name:45s} {ms:8.2f} ms   {diff:.3g}")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--comfyui", required=True)
    p.add_argument("--family", default="sdxl")
    p.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile)")
    args = p.parse_args()
    boot_comfy(args.comfyui, cpu=False)
    logging.getLogger().setLevel(logging.INFO)
    import comfy.model_management as mm
    import comfy.sample
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete
    from diffusers import UNet2DConditionModel

    fastpath = pack("lcm_comfy.fastpath")

    released = []
    orig_release = fastpath.release_graphs
    fastpath.release_graphs = lambda m: (released.append(time.perf_counter()), orig_release(m))
    fam = args.family
    h = 64 if fam == "sd15" else 128
    with torch.device("cuda"):
        unet = UNet2DConditionModel(**unet_config(fam, None)).half().eval()
    sd = {k: v.detach().cpu() for k, v in unet.state_dict().items()}
    del unet
    torch.cuda.empty_cache()
    model = load_unet(sd, fam)
    native = ModelSamplingDiscrete().patch(model, "lcm", False)[0]
    pos, neg = comfy_conds(fam, 1, h)
    latent = {"samples": torch.zeros(1, 4, h, h)}

    def native_run():
        noise = comfy.sample.prepare_noise(latent["samples"], 1)
        return comfy.sample.sample(native, noise, 4, 1.0, "lcm", "sgm_uniform", pos, neg, latent["samples"], denoise=1.0, disable_pbar=True, seed=1)

    def ours(fast):
        st = {}
        out, stats = sample(model, pos, neg, latent, 1, 1.0, fast=fast)
        st.update(vars(stats))
        return out, st

    def timings(label, fn, calls=6):
        times = []
        for _ in range(calls):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1000)
        print(f"{label}: calls {[round(t, 1) for t in times]} ms; median of last 4 {statistics.median(times[2:]):.1f}; "
              f"loaded={[type(x.model.model).__name__ for x in mm.current_loaded_models]} releases={len(released)}", flush=True)

    def sync_points(label, fn):
        """Every host-device synchronisation in one call, by the innermost comfy/lcm_core frame."""
        where = collections.Counter()

        def show(message, category, filename, lineno, file=None, line=None):
            frames = [f for f in traceback.extract_stack()[:-1] if "/comfy" in f.filename or "lcm_core" in f.filename or "bench" in f.filename]
            where[" < ".join(f"{Path(f.filename).name}:{f.lineno}:{f.name}" for f in frames[-3:][::-1])] += 1

        old = warnings.showwarning
        warnings.showwarning = show
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = show
            torch.cuda.set_sync_debug_mode(1)
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        warnings.showwarning = old
        print(f"==== synchronisations in one {label} call: {sum(where.values())}")
        for k, n in where.most_common(25):
            print(f"  {n:3d}  {k}")

    no_prefetch = lambda guider, device: None  # noqa: E731
    run = pack("lcm_comfy.run")  # the module whose loop calls inputs_to_device
    prefetch = run.inputs_to_device
    with torch.inference_mode():
        timings("native", native_run)
        run.inputs_to_device = no_prefetch
        timings("ours-eager, conds left on the CPU", lambda: ours(False))
        timings("ours-fast, conds left on the CPU", lambda: ours(True))
        sync_points("ours-fast, conds left on the CPU", lambda: ours(True))
        run.inputs_to_device = prefetch
        timings("ours-eager", lambda: ours(False))
        timings("ours-fast", lambda: ours(True))
        sync_points("native", native_run)
        sync_points("ours-fast", lambda: ours(True))
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(5):
            ours(True)
        torch.cuda.synchronize()
        pr.disable()
        print("==== cProfile of 5 ours-fast calls (cumulative)")
        pstats.Stats(pr).sort_stats("cumulative").print_stats(30)
        from torch.profiler import ProfilerActivity, profile

        for label, fn in (("native", native_run), ("ours-fast", lambda: ours(True))):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                fn()
                torch.cuda.synchronize()
            wall = (time.perf_counter() - t0) * 1000
            kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            busy = sum(e.device_time for e in kernels) / 1000
            print(f"==== profile {label}: wall {wall:.1f} ms (profiled), GPU busy {busy:.1f} ms in {len(kernels)} device events")
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
        kernel_variants(dm, x, t, ctx, y, compile_too=args.compile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
