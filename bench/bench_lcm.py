"""LCM benchmark: this pack's LCM Sampler (fast path on/off) against ComfyUI v0.8.0's native LCM and diffusers.

One run on one GPU: builds full-size SD1.5 (512x512) and SDXL (1024x1024) UNets with random weights (which
cost the same as real ones), times 4-step sampling to latents and to decoded images at batch 1 and 4
(median of repeated runs after warm-up), checks that the fast path gives the ordinary path's latents,
and writes a table, ``RESULTS.md``, ``results.json`` and a bar chart to ``--out``. On a CPU it says so and
runs a small correctness smoke instead (timings are for GPUs only).

    python bench/bench_lcm.py --comfyui /path/to/ComfyUI-v0.8.0 --out bench/out
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    REPO,
    SD_VAE,
    STEPS,
    boot_comfy,
    comfy_conds,
    default_comfyui,
    free_models,
    full_size_parts,
    inprocess_bars,
    load_unet,
    pack,
    sample,
    tiny_unet_config,
    unet_config,
)


def timed(fn, reps: int, warmup: int = 2) -> tuple[float, object]:
    out = None
    for _ in range(warmup):
        out = fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times), out


def matmul_tflops(n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.float16)
    b = torch.randn(n, n, device="cuda", dtype=torch.float16)
    ms, _ = timed(lambda: a @ b, reps=20, warmup=3)
    return 2 * n**3 / (ms / 1000) / 1e12


def unet_flops(unet, family, batch, h):
    from torch.utils.flop_counter import FlopCounterMode

    x, kw = diffusers_inputs(family, batch, h)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(x, torch.tensor([999], device="cuda"), **kw)
    return counter.get_total_flops()


def diffusers_inputs(family, batch, h, dtype=torch.float16):
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(batch, 4, h, h, device="cuda", dtype=dtype, generator=g)
    if family == "sd15":
        return x, {"encoder_hidden_states": torch.randn(batch, 77, 768, device="cuda", dtype=dtype, generator=g)}
    ids = torch.tensor([[h * 8, h * 8, 0, 0, h * 8, h * 8]] * batch, device="cuda", dtype=dtype)
    return x, {"encoder_hidden_states": torch.randn(batch, 77, 2048, device="cuda", dtype=dtype, generator=g),
               "added_cond_kwargs": {"text_embeds": torch.randn(batch, 1280, device="cuda", dtype=dtype, generator=g), "time_ids": ids}}


def bench_family(family: str, reps: int, results: dict, rate: float, batches=(1, 4)):
    import comfy.sample
    import comfy.sd
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete
    from diffusers import AutoencoderKL, LCMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

    h = 64 if family == "sd15" else 128
    torch.manual_seed(0)
    with torch.device("cuda"):
        unet = UNet2DConditionModel(**unet_config(family, 256)).half().eval()
        vae = AutoencoderKL(**SD_VAE, force_upcast=False).half().eval()
    params = sum(p.numel() for p in unet.parameters())
    sd_cpu = {k: v.detach().to("cpu", copy=True) for k, v in unet.state_dict().items()}
    guided = load_unet(dict(sd_cpu), f"{family}-guided")
    plain_sd = {k: v for k, v in sd_cpu.items() if "cond_proj" not in k}
    plain = load_unet(plain_sd, f"{family}")
    comfy_vae = comfy.sd.VAE(sd={k: v.to("cpu") for k, v in vae.state_dict().items()})
    native = ModelSamplingDiscrete().patch(plain, "lcm", False)[0]
    # diffusers baseline: the same weights without the guidance projection
    unet_plain = UNet2DConditionModel(**unet_config(family, None)).half().eval().to("cuda")
    unet_plain.load_state_dict({k: v for k, v in unet.state_dict().items() if "cond_proj" not in k})
    pipe_cls = StableDiffusionPipeline if family == "sd15" else StableDiffusionXLPipeline
    extra = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False} if family == "sd15" else {"text_encoder_2": None, "tokenizer_2": None}
    pipe = pipe_cls(vae=vae, text_encoder=None, tokenizer=None, unet=unet_plain, scheduler=LCMScheduler(), **extra)
    pipe.set_progress_bar_config(disable=True)
    flops = unet_flops(unet_plain, family, 1, h)
    fam = results.setdefault(family, {"params": params, "unet_tflop_per_forward_b1": flops / 1e12, "rows": {}})
    pos, neg = comfy_conds(family, 1, h)
    stats_fast: dict = {}

    for batch in batches:
        latent = {"samples": torch.zeros(batch, 4, h, h)}
        seed = 42

        def ours(fast, model=plain, guidance=1.0, stats=None, keep_graphs="always", latent=latent, seed=seed):
            out, st = sample(model, pos, neg, latent, seed, guidance, fast=fast, keep_graphs=keep_graphs)
            if stats is not None:
                stats.clear()
                stats.update(vars(st))
            return out

        def native_run(cfg=1.0, latent=latent, seed=seed, native=native):
            noise = comfy.sample.prepare_noise(latent["samples"], seed)
            return comfy.sample.sample(native, noise, STEPS, cfg, "lcm", "sgm_uniform", pos, neg, latent["samples"],
                                       denoise=1.0, disable_pbar=True, seed=seed)

        def diffusers_run(output_type="latent", batch=batch, seed=seed, pipe=pipe):
            x, kw = diffusers_inputs(family, 1, h)
            args = dict(prompt_embeds=kw["encoder_hidden_states"], num_inference_steps=STEPS, guidance_scale=1.0,
                        output_type=output_type, num_images_per_prompt=batch, height=h * 8, width=h * 8,
                        generator=torch.Generator("cpu").manual_seed(seed))
            if family == "sdxl":
                args["pooled_prompt_embeds"] = kw["added_cond_kwargs"]["text_embeds"]
            with torch.no_grad():
                return pipe(**args).images

        def decode(lat):
            return comfy_vae.decode(lat)

        rows = {}
        with torch.inference_mode():  # each path timed in a block of its own, as a user would run it
            t_fast, lat_fast = timed(lambda: ours(True, stats=stats_fast), reps)
            t_fast_dec, _ = timed(lambda: decode(ours(True)), reps)
            t_eager, lat_eager = timed(lambda: ours(False), reps)
            t_eager_dec, _ = timed(lambda: decode(ours(False)), reps)
            t_native, _ = timed(native_run, reps)
            t_native_dec, _ = timed(lambda: decode(native_run()), reps)
        t_diff, _ = timed(diffusers_run, reps)
        t_diff_dec, _ = timed(lambda: diffusers_run("pt"), reps)
        floor = STEPS * flops * batch / (rate * 1e12) * 1000
        rows.update({
            "lcm_fast_latents_ms": t_fast, "lcm_ordinary_latents_ms": t_eager, "comfy_native_latents_ms": t_native,
            "diffusers_latents_ms": t_diff, "lcm_fast_decoded_ms": t_fast_dec, "lcm_ordinary_decoded_ms": t_eager_dec,
            "comfy_native_decoded_ms": t_native_dec, "diffusers_decoded_ms": t_diff_dec, "flop_floor_latents_ms": floor,
            "images_per_s_fast": batch / (t_fast_dec / 1000),
            "fast_vs_ordinary_max_abs_diff": (lat_fast - lat_eager).abs().max().item(),
        })
        if batch == 1:
            with torch.inference_mode():
                t_nokeep, _ = timed(lambda: ours(True, keep_graphs="never"), reps)
                host = []
                for _ in range(reps):
                    st: dict = {}
                    ours(True, stats=st)
                    host.append(st["host_ms_before_first_forward"])
                torch.cuda.synchronize()
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    ours(True)
                    torch.cuda.synchronize()
                busy = sum(e.device_time for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA) / 1000
                pool = stats_fast.get("graph_pool_bytes", 0)
                again = ours(False)
                torch.backends.cudnn.benchmark = not torch.backends.cudnn.benchmark
                other_kernels = ours(False)
                torch.backends.cudnn.benchmark = not torch.backends.cudnn.benchmark
                t_native15, _ = timed(lambda: native_run(1.5), reps)
                t_fast15, _ = timed(lambda: ours(True, guidance=1.5), reps)
                t_eager15, _ = timed(lambda: ours(False, guidance=1.5), reps)
                # with the guidance embedding (LCM UNet): fast vs ordinary
                g_fast = ours(True, model=guided, guidance=8.0)
                g_eager = ours(False, model=guided, guidance=8.0)
            rows.update({
                "lcm_fast_keep_graphs_off_latents_ms": t_nokeep, "fast_host_ms_before_first_forward": statistics.median(host),
                "fast_gpu_busy_ms": busy, "graph_pool_mib": pool / 2**20,
                "eager_vs_eager_max_abs_diff": (again - lat_eager).abs().max().item(),
                "eager_cudnn_benchmark_toggled_max_abs_diff": (other_kernels - lat_eager).abs().max().item(),
                "comfy_native_cfg1.5_latents_ms": t_native15, "lcm_fast_cfg1.5_latents_ms": t_fast15,
                "lcm_ordinary_cfg1.5_latents_ms": t_eager15,
                "guided_fast_vs_ordinary_max_abs_diff": (g_fast - g_eager).abs().max().item(),
                "capture_seconds_first": stats_fast.get("capture_seconds", [None])[0],
                "captures_total": len(stats_fast.get("capture_seconds", [])),
                "graph_calls_last_run": stats_fast.get("graph_calls"), "eager_calls_last_run": stats_fast.get("eager_calls", 0),
            })
        fam["rows"][f"batch{batch}"] = rows
        print(family, batch, json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in rows.items()}), flush=True)
    del pipe, unet, unet_plain, guided, plain, native
    free_models()
    torch.cuda.empty_cache()


def bench_compile(family: str, reps: int) -> dict:
    """Issue #12's faster-kernel mode in-process, batch 1, 4 steps, guidance embedding (w = 7), timed beside the exact path.

    Columns: the exact fast path with ComfyUI's VAE decode (the default), with LCM VAE Decode's compiled decoder,
    and the compiled UNet with the compiled decoder; the first call of each compiled piece is its compile (cold
    or from the on-disk cache, whichever this machine has). Deviations are max |diff| over max |exact| for
    latents, and max / mean |diff| in [0, 1] pixel units for images.
    """
    vae_mod = pack("lcm_comfy.vae")
    compile_mod = pack("lcm_comfy.compile")
    model, vae, pos, latent = full_size_parts(family, f"{family}-compile")
    res: dict = {"vae_dtype": str(vae.vae_dtype), "compile_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR")}

    def run(compile_, seed=42):
        return sample(model, pos, None, latent, seed, 8.0, compile_=compile_)[0]

    with torch.inference_mode():
        t0 = time.perf_counter()
        exact = run(False)
        torch.cuda.synchronize()
        res["exact_first_call_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        compiled = run(True)
        torch.cuda.synchronize()
        res["unet_compile_first_call_s"] = time.perf_counter() - t0
        st: dict = {}
        t0 = time.perf_counter()
        img_fast = vae_mod.decode(vae, {"samples": exact}, compile=True, stats=st)
        torch.cuda.synchronize()
        res["vae_compile_first_call_s"] = time.perf_counter() - t0
        res["vae_path"] = st.get("path")
        img_ref = vae_mod.comfy_decode(vae, exact)
        d = (img_fast - img_ref).abs()
        res["vae_compiled_vs_vaedecode_max_abs"] = d.max().item()
        res["vae_compiled_vs_vaedecode_mean_abs"] = d.mean().item()
        res["unet_compiled_vs_exact_rel_max"] = (compiled - exact).abs().max().item() / exact.abs().max().item()
        again = run(False)
        res["exact_again_bit_identical"] = bool(torch.equal(again, exact))
        img_c = vae_mod.decode(vae, {"samples": compiled}, compile=True)
        d = (img_c - img_ref).abs()
        res["e2e_compiled_vs_exact_image_max_abs"] = d.max().item()
        res["e2e_compiled_vs_exact_image_mean_abs"] = d.mean().item()
        rows = {
            "exact_latents_ms": lambda: run(False),
            "compiled_latents_ms": lambda: run(True),
            "vaedecode_ms": lambda: vae_mod.comfy_decode(vae, exact),
            "lcm_vae_decode_compiled_ms": lambda: vae_mod.decode(vae, {"samples": exact}, compile=True),
            "exact_e2e_vaedecode_ms": lambda: vae_mod.comfy_decode(vae, run(False)),
            "exact_e2e_compiled_vae_ms": lambda: vae_mod.decode(vae, {"samples": run(False)}, compile=True),
            "compiled_e2e_compiled_vae_ms": lambda: vae_mod.decode(vae, {"samples": run(True)}, compile=True),
        }
        for name, fn in rows.items():
            res[name], _ = timed(fn, reps)
    record = compile_mod.record_of(model.model.diffusion_model)
    res["unet_compile_seconds"] = list(record.seconds.values())
    res["images_per_s_compiled_e2e"] = 1000 / res["compiled_e2e_compiled_vae_ms"]
    print(family, json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()}), flush=True)
    rows.clear()
    free_models()
    return res


def targets_table(results: dict) -> list[str]:
    """Issue #5's targets against this run's numbers: met or missed, and by how much."""
    xl, sd = results.get("sdxl", {}).get("rows", {}), results.get("sd15", {}).get("rows", {})
    rows = []
    if "batch1" in xl:
        r = xl["batch1"]
        fast, native, busy = r["lcm_fast_latents_ms"], r["comfy_native_latents_ms"], r.get("fast_gpu_busy_ms", float("nan"))
        rows.append(("SDXL 1024², batch 1, to latents: at most 1/3 of ComfyUI native",
                     f"{fast:.1f} ms vs {native:.1f} ms = {fast / native:.2f} of native ({native / fast:.2f}x faster)",
                     "met" if fast <= native / 3 else f"**missed** by {fast - native / 3:.1f} ms (target {native / 3:.1f} ms; the 4 forwards alone keep the GPU busy {busy:.1f} ms)"))
        d = r["diffusers_decoded_ms"] / r["lcm_fast_decoded_ms"]
        rows.append(("SDXL end to end (ComfyUI's VAE decode included): at least 2x faster than diffusers",
                     f"{r['lcm_fast_decoded_ms']:.1f} ms vs {r['diffusers_decoded_ms']:.1f} ms = {d:.2f}x",
                     "met" if d >= 2 else f"**missed** (needs {r['diffusers_decoded_ms'] / 2:.1f} ms)"))
    if "batch1" in sd:
        r = sd["batch1"]
        x = r["comfy_native_latents_ms"] / r["lcm_fast_latents_ms"]
        rows.append(("SD1.5 512², batch 1, to latents: at least 3.5x faster than native",
                     f"{r['lcm_fast_latents_ms']:.1f} ms vs {r['comfy_native_latents_ms']:.1f} ms = {x:.2f}x",
                     "met" if x >= 3.5 else f"**missed** (needs {r['comfy_native_latents_ms'] / 3.5:.1f} ms; the GPU is busy {r.get('fast_gpu_busy_ms', float('nan')):.1f} ms)"))
        e = r["comfy_native_decoded_ms"] / r["lcm_fast_decoded_ms"]
        rows.append(("SD1.5 end to end: at least 2.5x faster than native",
                     f"{r['lcm_fast_decoded_ms']:.1f} ms vs {r['comfy_native_decoded_ms']:.1f} ms = {e:.2f}x",
                     "met" if e >= 2.5 else f"**missed** (needs {r['comfy_native_decoded_ms'] / 2.5:.1f} ms)"))
    if "batch4" in xl:
        rows.append(("SDXL batch 4 throughput", f"{xl['batch4']['images_per_s_fast']:.2f} images/s to decoded images (fast path)", "reported"))
    if not rows:
        return []
    out = [f"## Against the targets (issue #5), same run, same weights, {results['card']}", "",
           "| target | measured | verdict |", "|---|---|---|"]
    out += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return out + [""]


def write_reports(results: dict, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    lines = ["# LCM benchmark results", "",
             f"Card: **{results['card']}**. Software: {results['software']}. Date: {results['date']}. "
             f"Measured fp16 matmul rate: {results['matmul_tflops']:.0f} TFLOP/s. {STEPS} steps, guidance 1 (no CFG) unless noted; "
             f"median of {results['reps']} runs after 2 warm-ups; random weights, full-size UNets.", ""]
    for fam, d in results.items():
        if not isinstance(d, dict) or "rows" not in d:
            continue
        res = "512x512" if fam == "sd15" else "1024x1024"
        lines += [f"## {fam.upper()} {res} ({d['params'] / 1e9:.2f}B-param UNet, {d['unet_tflop_per_forward_b1']:.2f} TFLOP per forward at batch 1)", "",
                  "| batch | path | to latents (ms) | to decoded image (ms) |", "|---|---|---|---|"]
        for bkey, r in d["rows"].items():
            b = bkey.replace("batch", "")
            for label, lk, dk in (("LCM Sampler, fast path", "lcm_fast_latents_ms", "lcm_fast_decoded_ms"),
                                  ("LCM Sampler, fast path off", "lcm_ordinary_latents_ms", "lcm_ordinary_decoded_ms"),
                                  ("ComfyUI native LCM", "comfy_native_latents_ms", "comfy_native_decoded_ms"),
                                  ("diffusers + LCMScheduler", "diffusers_latents_ms", "diffusers_decoded_ms")):
                lines.append(f"| {b} | {label} | {r[lk]:.1f} | {r[dk]:.1f} |")
            lines.append(f"| {b} | floor (FLOPs / measured matmul rate) | {r['flop_floor_latents_ms']:.1f} | |")
        r1 = d["rows"].get("batch1", {})
        if r1:
            lines += ["", f"- Speed-up to latents, batch 1: {r1['comfy_native_latents_ms'] / r1['lcm_fast_latents_ms']:.2f}x vs ComfyUI native, "
                      f"{r1['diffusers_latents_ms'] / r1['lcm_fast_latents_ms']:.2f}x vs diffusers; end to end "
                      f"{r1['comfy_native_decoded_ms'] / r1['lcm_fast_decoded_ms']:.2f}x vs native, {r1['diffusers_decoded_ms'] / r1['lcm_fast_decoded_ms']:.2f}x vs diffusers.",
                      f"- CFG 1.5 (cond+uncond batched), batch 1, to latents: fast {r1['lcm_fast_cfg1.5_latents_ms']:.1f} ms, fast path off {r1['lcm_ordinary_cfg1.5_latents_ms']:.1f} ms, native {r1['comfy_native_cfg1.5_latents_ms']:.1f} ms.",
                      f"- Exactness (fp16 latents, max abs diff): fast vs ordinary {r1['fast_vs_ordinary_max_abs_diff']:.3g}; with guidance embedding {r1['guided_fast_vs_ordinary_max_abs_diff']:.3g}; "
                      f"ordinary run twice {r1['eager_vs_eager_max_abs_diff']:.3g}; ordinary with cuDNN autotuning toggled {r1['eager_cudnn_benchmark_toggled_max_abs_diff']:.3g}.",
                      f"- First-call capture cost (warm-up + capture of one forward signature): {r1['capture_seconds_first']:.2f} s, paid once per model, shape and batch while the model stays loaded; "
                      f"the graphs hold {r1['graph_pool_mib']:.0f} MiB of GPU memory meanwhile. With keep_graphs 'never' (captured again every run, nothing held between prompts): {r1['lcm_fast_keep_graphs_off_latents_ms']:.1f} ms to latents.",
                      f"- Where the fast path's {r1['lcm_fast_latents_ms']:.1f} ms go: the GPU is busy {r1['fast_gpu_busy_ms']:.1f} ms (4 UNet forwards and the LCM arithmetic); "
                      f"{r1['fast_host_ms_before_first_forward']:.1f} ms of host work (ComfyUI's sampling set-up, conditioning, noise) come before the first forward is queued."]
            b4 = d["rows"].get("batch4")
            if b4:
                lines.append(f"- Batch 4 throughput, fast path, to decoded images: {b4['images_per_s_fast']:.2f} images/s.")
        lines.append("")
    lines += targets_table(results)
    (out / "RESULTS.md").write_text("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for ax, fam in zip(axes, ("sd15", "sdxl"), strict=True):
            if fam in results:
                inprocess_bars(ax, results, fam)
        fig.tight_layout()
        fig.savefig(out / "chart.png", dpi=110)
    except ImportError:
        pass


def cpu_smoke(comfy_path: str) -> int:
    print("No CUDA GPU: timings are for GPUs only. Running a small correctness smoke on the CPU instead.")
    boot_comfy(comfy_path, cpu=True)
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**tiny_unet_config("sd15"))
    model = pack("lcm_comfy.loading").load_lcm_unet_state_dict(dict(unet.state_dict()), "smoke", "fp32")
    pos = [[torch.randn(1, 77, 768), {}]]
    a, _ = sample(model, pos, None, {"samples": torch.zeros(1, 4, 8, 8)}, 1, 8.0, fast=True)
    b, _ = sample(model, pos, None, {"samples": torch.zeros(1, 4, 8, 8)}, 1, 8.0, fast=False)
    ok = torch.isfinite(a).all() and torch.equal(a, b)
    print("smoke:", "ok" if ok else "FAILED", tuple(a.shape))
    return 0 if ok else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--comfyui", default=None, help="ComfyUI v0.8.0 folder (default: as the tests find it)")
    p.add_argument("--out", default=str(REPO / "bench" / "out"))
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--families", default="sd15,sdxl")
    p.add_argument("--compile", action="store_true", help="only the compile-mode table (issue #12): exact vs compiled UNet "
                   "and VAE decoder, end to end, with compile times and deviations; writes results_compile.json")
    args = p.parse_args(argv)
    if args.comfyui is None:
        args.comfyui = default_comfyui()
    if not torch.cuda.is_available():
        return cpu_smoke(args.comfyui)
    boot_comfy(args.comfyui, cpu=False)
    import diffusers

    results = {"card": torch.cuda.get_device_name(0), "date": datetime.date.today().isoformat(), "reps": args.reps,
               "software": f"PyTorch {torch.__version__}, diffusers {diffusers.__version__}, ComfyUI v0.8.0, Python {platform.python_version()}"}
    if args.compile:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for fam in args.families.split(","):
            results[fam] = bench_compile(fam, args.reps)
            (out / "results_compile.json").write_text(json.dumps(results, indent=2))
        print(json.dumps(results, indent=1))
        return 0
    results["matmul_tflops"] = matmul_tflops()
    print(f"{results['card']}: fp16 matmul {results['matmul_tflops']:.0f} TFLOP/s", flush=True)
    for fam in args.families.split(","):
        bench_family(fam, args.reps, results, results["matmul_tflops"])
        write_reports(results, Path(args.out))
    print((Path(args.out) / "RESULTS.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
