"""Where an end-to-end compile-mode run (LCM Sampler + LCM VAE Decode) leaves the GPU idle (issue #12; GPU only).

Builds the same random-weight SDXL / SD1.5 parts as ``bench_lcm.py --compile``, warms them up (compiling, or
loading from the inductor cache), then records one end-to-end run per family with ``torch.profiler`` (CPU ops
with Python stacks, CUDA kernels) and writes ``<out>/<family>.trace.json.gz`` for chrome://tracing or Perfetto,
plus a summary line: wall time, GPU-busy time, and the idle gaps over 0.3 ms with the host functions running then.

    python bench/profile_e2e.py --comfyui PATH --out DIR [--families sdxl,sd15]
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import boot_comfy, free_models, full_size_parts, pack, sample  # noqa: E402


def busy_and_gaps(events: list[dict], start_us: float, end_us: float, min_gap_us: float = 300.0):
    """GPU-busy microseconds (union of kernel and memcpy intervals) in [start, end], and the idle gaps over min_gap."""
    spans = sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in events
                   if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and start_us <= e["ts"] <= end_us)
    busy, gaps, cursor = 0.0, [], start_us
    for a, b in spans:
        if a > cursor:
            if a - cursor >= min_gap_us:
                gaps.append((cursor, a))
        else:
            a = cursor
        if b > a:
            busy += b - a
            cursor = b
    if end_us - cursor >= min_gap_us:
        gaps.append((cursor, end_us))
    return busy, gaps


def host_during(events: list[dict], a: float, b: float, limit: int = 6) -> list[str]:
    """The longest Python functions overlapping [a, b] that are not wrappers of the whole run."""
    overlaps = []
    for e in events:
        if e.get("cat") != "python_function" or "dur" not in e:
            continue
        s, t = e["ts"], e["ts"] + e["dur"]
        if s < b and t > a and not (s <= a and t >= b and e["dur"] > 4 * (b - a)):
            overlaps.append((min(t, b) - max(s, a), e["name"][:120]))
    overlaps.sort(reverse=True)
    return [f"{name} {ov / 1000:.2f}ms" for ov, name in overlaps[:limit]]


def profile_family(family: str, out: Path) -> dict:
    vae_mod = pack("lcm_comfy.vae")
    model, vae, pos, latent = full_size_parts(family, f"{family}-profile")

    def e2e():
        lat = sample(model, pos, None, latent, 42, 8.0, compile_=True)[0]
        return vae_mod.decode(vae, {"samples": lat}, compile=True)

    with torch.inference_mode():
        t0 = time.perf_counter()
        for _ in range(3):
            e2e()
        torch.cuda.synchronize()
        warm_s = time.perf_counter() - t0
        times = []
        for _ in range(10):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            e2e()
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1000)
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts, with_stack=True) as prof:
            torch.cuda.synchronize()
            with torch.profiler.record_function("lcm_e2e"):
                e2e()
                torch.cuda.synchronize()
    raw = out / f"{family}.trace.json"
    prof.export_chrome_trace(str(raw))
    trace = json.loads(raw.read_text())
    with open(raw, "rb") as src, gzip.open(str(raw) + ".gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    raw.unlink()
    events = trace["traceEvents"]
    run = next(e for e in events if e.get("name") == "lcm_e2e" and e.get("cat") == "user_annotation")
    a, b = run["ts"], run["ts"] + run["dur"]
    busy, gaps = busy_and_gaps(events, a, b)
    result = {
        "family": family, "warmup_s": round(warm_s, 1), "e2e_ms_median_of_10": round(sorted(times)[5], 2),
        "profiled_wall_ms": round(run["dur"] / 1000, 2), "gpu_busy_ms": round(busy / 1000, 2),
        "idle_gaps": [{"at_ms": round((g0 - a) / 1000, 2), "ms": round((g1 - g0) / 1000, 2), "host": host_during(events, g0, g1)}
                      for g0, g1 in gaps],
    }
    print(json.dumps(result), flush=True)
    free_models()
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--comfyui", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--families", default="sdxl,sd15")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    boot_comfy(args.comfyui, cpu=False)
    results = [profile_family(f, out) for f in args.families.split(",")]
    (out / "profile_e2e.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
