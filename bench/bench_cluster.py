"""Scale-out benchmark (issue #13): one prompt file on 1 worker, then on 2 workers (one GPU each), same files.

Builds full-size random-weight SDXL parts (LCM UNet with the guidance embedding, CLIP-L, CLIP-G, SD VAE; the
same builder as ``bench_server.py``'s, ``model_files.py``; random weights cost what real ones do) in a fresh ComfyUI
base folder, writes an SDXL text-to-image workflow (LCM Load UNet -> LCM Sampler, 4 steps -> VAE Decode -> Save Image,
1024x1024) and a prompts file of N distinct prompts and seeds. Then, for 1 and for 2 workers, it starts the
local Dask cluster ``--workers N`` starts (one worker per GPU, pinned by CUDA_VISIBLE_DEVICES, each with its own
ComfyUI), runs a warm-up job (models loaded, CUDA graphs captured) and times the real job: images/s =
N / wall time of that job, as the run's summary gives it. The goal of the issue is 2 workers >= 1.9x one.

    python bench/bench_cluster.py --comfyui /path/to/ComfyUI-v0.8.0 --out bench/out-cluster     # 2 GPUs
    python bench/bench_cluster.py --comfyui /path/to/ComfyUI-v0.8.0 --tiny --family sd15 --prompts 4   # CPU smoke of the flow

Writes ``cluster_results.json`` and ``cluster_results.md`` (a table for bench/RESULTS.md) to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def write_inputs(out: Path, base: Path, n: int, size: int, tiny: bool, family: str) -> tuple[Path, Path]:
    from model_files import build_models
    from server_workflows import prompt_text, workflow

    for sub in ("models", "input", "user", "custom_nodes"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    files = build_models(base, [family], tiny)[family]
    wf = out / f"{family}-cluster.api.json"
    wf.write_text(json.dumps(workflow(family, files, ours=True, end="save", text="a photograph", seed=0, size=size), indent=1))
    prompts = out / "prompts.txt"
    prompts.write_text("".join(json.dumps({"id": f"b{i:05d}", "prompt": prompt_text("cluster", i), "seed": i}) + "\n" for i in range(n)))
    return wf, prompts


def run_with(workers: int, gpus: list[str], wf: Path, prompts: Path, warm: Path, out: Path, spec, threads: int) -> dict:
    from distributed import Client

    from lcm_tools.cluster import Job, local_cluster, run_job
    from lcm_tools.workflows import load_workflow

    t0 = time.perf_counter()
    cluster = local_cluster(workers, threads_per_worker=threads, gpus=gpus[:workers])
    try:
        with Client(cluster) as client:
            workflow = load_workflow(wf)
            warm_summary = run_job(client, Job(workflow=workflow, prompts=warm, output=out / f"warm-{workers}"), spec)
            if warm_summary.failed:
                raise SystemExit(f"warm-up failed: {warm_summary.text()}")
            ready_s = time.perf_counter() - t0
            summary = run_job(client, Job(workflow=workflow, prompts=prompts, output=out / f"run-{workers}"), spec)
    finally:
        cluster.close()
    if summary.failed or summary.done != summary.total:
        raise SystemExit(f"the timed job did not finish every prompt: {summary.text()}")
    print(summary.text(), flush=True)
    return {"workers": workers, "images": summary.images, "wall_s": round(summary.wall_s, 3),
            "images_per_s": round(summary.images / summary.wall_s, 4), "start_and_warmup_s": round(ready_s, 1),
            "per_worker": {name: round(w.images_per_s, 4) for name, w in sorted(summary.workers.items())}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--comfyui", required=True, help="ComfyUI v0.8.0 folder")
    p.add_argument("--out", default="bench/out-cluster", help="folder for models, outputs and results")
    p.add_argument("--prompts", type=int, default=192, help="prompts in the timed job (default 192)")
    p.add_argument("--size", type=int, default=1024, help="image size (default 1024)")
    p.add_argument("--threads", type=int, default=2, help="prompts each worker keeps in its ComfyUI at once (default 2)")
    p.add_argument("--family", choices=("sdxl", "sd15"), default="sdxl", help="model family (default sdxl, the issue's)")
    p.add_argument("--front-end-root", default=None, help="serve this folder (an empty index.html is written) as the frontend")
    p.add_argument("--tiny", action="store_true", help="CPU smoke: tiny UNet, CPU workers, 64x64")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import distributed  # noqa: F401  (sets its loggers' levels when imported: quieten them after)

    logging.getLogger("distributed").setLevel(logging.WARNING)

    from lcm_tools.cluster import visible_gpus
    from lcm_tools.cluster_spec import ServerSpec

    gpus = [] if args.tiny else visible_gpus()
    if not args.tiny and len(gpus) < 2:
        print(f"error: this benchmark compares 1 and 2 GPUs; {len(gpus)} visible ({gpus}). Use a 2-GPU machine, or --tiny for a CPU smoke",
              file=sys.stderr)
        return 2
    size = 64 if args.tiny else args.size
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = out / "comfy-base"
    wf, prompts = write_inputs(out, base, args.prompts, size, args.tiny, args.family)
    warm = out / "warm.txt"
    warm.write_text("".join(json.dumps({"id": f"w{i:03d}", "prompt": f"warm-up {i}", "seed": 10_000 + i}) + "\n"
                            for i in range(2 if args.tiny else 2 * 2 * args.threads)))  # loads, captures
    front = Path(args.front_end_root) if args.front_end_root else None
    if front:  # a machine without the frontend package (the GPU machine): ComfyUI serves this folder instead
        front.mkdir(parents=True, exist_ok=True)
        (front / "index.html").write_text("<!doctype html><title>bench</title>")
    extra = ("--front-end-root", str(front.resolve())) if front else ()
    spec = ServerSpec(comfy_path=str(Path(args.comfyui).resolve()), base_directory=str(base), extra_args=extra)
    runs = [run_with(n, gpus, wf, prompts, warm, out, spec, args.threads) for n in (1, 2)]
    ratio = runs[1]["images_per_s"] / runs[0]["images_per_s"]
    gpu_name = "CPU"
    if gpus:
        import torch

        gpu_name = torch.cuda.get_device_name(0)
    results = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "host": platform.node(),
               "device": gpu_name, "gpus": gpus[:2], "family": args.family, "size": size, "prompts": args.prompts, "threads_per_worker": args.threads,
               "tiny": args.tiny, "runs": runs, "speedup_2_vs_1": round(ratio, 3), "goal": 1.9}
    (out / "cluster_results.json").write_text(json.dumps(results, indent=1))
    md = [f"### Scale-out on Dask: 1 vs 2 workers ({gpu_name}, {args.family.upper()} {size}x{size}, 4 steps, decode + Save Image, "
          f"{args.prompts} prompts{', TINY CPU SMOKE' if args.tiny else ''})", "",
          "| workers | images/s | wall time | per worker (images/s) |", "|---|---|---|---|"]
    for r in runs:
        md.append(f"| {r['workers']} | {r['images_per_s']:.2f} | {r['wall_s']:.1f} s | "
                  + ", ".join(f"{k}: {v:.2f}" for k, v in r["per_worker"].items()) + " |")
    md += ["", f"2 workers / 1 worker: **{ratio:.2f}x** (goal >= 1.9x)."]
    (out / "cluster_results.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
