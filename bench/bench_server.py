"""LCM workflows through a real ComfyUI server: images per second and where each prompt's time goes (issue #12).

The benchmark writes full-size random-weight model files (``model_files.py``: an LCM UNet with the guidance
embedding, CLIP-L, for SDXL also CLIP-G, and the SD VAE) into a fresh ComfyUI base folder, starts ComfyUI v0.8.0 on
127.0.0.1 with this pack and the probe (``probe_server.py``), and for each workflow variant queues N prompts with
distinct texts and seeds over HTTP at once, then polls ``/queue`` every 50 ms until it is empty
(``server_timing.py``). Images/s = N / (first POST to empty queue), after a few warm-up prompts that load,
capture and compile. It also times PNG encoding in-process (``png_cost.py``).

Variants (each one our nodes against ComfyUI's native LCM, UNETLoader + ModelSamplingDiscrete lcm + KSampler
lcm/sgm_uniform, cfg 1, on the same files; the prompts are ``server_workflows.py``'s):
    latents   the workflow ends at the sampler (a do-nothing output node takes the latents)
    decode    ... VAE Decode (or LCM VAE Decode), the images taken by the do-nothing node
    save      ... VAE Decode + Save Image (or LCM VAE Decode + LCM Save Image)
plus the sampler's ``compile`` mode where the pack has it, started again on the same compile cache to time a
warm start. Writes ``results_server.json`` to ``--out``; ``--chart`` redraws bench/chart.png (``server_chart.py``).

    python bench/bench_server.py --comfyui PATH --out bench/out [--families sdxl,sd15] [--prompts 24]
    python bench/bench_server.py --comfyui PATH --tiny          # a CPU smoke of the whole flow, tiny UNets
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, default_comfyui  # noqa: E402
from model_files import build_models  # noqa: E402
from png_cost import png_costs  # noqa: E402
from server_chart import write_chart  # noqa: E402
from server_timing import listed_files_are_complete, probed_comfy, run_variant  # noqa: E402
from server_workflows import prompt_text, workflow  # noqa: E402

from lcm_tools.client import ComfyClient  # noqa: E402

log = logging.getLogger("lcm_bench")


def variants_for(fam: str, names: dict, size: int, tiny: bool) -> list[tuple[str, object]]:
    files = names[fam]

    def mk(ours: bool, end: str, **kw):
        return lambda tag, i: workflow(fam, files, ours, end, prompt_text(tag, i), seed=1000 + i, size=size, **kw)

    out = [
        ("lcm latents", mk(True, "latents")),
        ("native latents", mk(False, "latents")),
        ("lcm latents keep_graphs=always", mk(True, "latents", keep_graphs="always")),
        ("lcm decode-only (VAE Decode)", mk(True, "decode")),
        ("lcm decode-only (LCM VAE Decode)", mk(True, "decode", fast_vae=True)),
        ("native decode-only", mk(False, "decode")),
        ("lcm save (VAE Decode + Save Image)", mk(True, "save")),
        ("lcm save (LCM VAE Decode + LCM Save Image)", mk(True, "save", fast_vae=True, fast_save=True)),
        ("native save", mk(False, "save")),
    ]
    if tiny:  # ComfyUI's own UNETLoader does not recognise the tiny UNets' shapes: ours only
        out = [v for v in out if not v[0].startswith("native")]
    out += [
        ("lcm compile latents", mk(True, "latents", compile_unet=True)),
        ("lcm compile save (LCM VAE Decode + LCM Save Image)", mk(True, "save", fast_vae=True, fast_save=True, compile_unet=True)),
    ]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--comfyui", default=None, help="ComfyUI v0.8.0 folder (default: as the tests find it)")
    p.add_argument("--out", default=str(REPO / "bench" / "out"))
    p.add_argument("--base", default=None, help="ComfyUI base folder for models/output (default: a temporary one)")
    p.add_argument("--families", default="sdxl,sd15")
    p.add_argument("--prompts", type=int, default=24)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2, help="measured runs of the latents-only variants (they vary most)")
    p.add_argument("--only", default="", help="comma-separated substrings: run only variants whose name holds one")
    p.add_argument("--skip", default="", help="comma-separated substrings: skip variants whose name holds one")
    p.add_argument("--compile-cache", default=None, help="TORCHINDUCTOR_CACHE_DIR for the servers (default: in the base folder)")
    p.add_argument("--no-restart", action="store_true", help="skip the warm-start run of the compile mode")
    p.add_argument("--no-png", action="store_true", help="skip the PNG cost measurement")
    p.add_argument("--server-args", default="", help="more ComfyUI arguments, e.g. '--disable-cuda-malloc' (space-separated)")
    p.add_argument("--tiny", action="store_true", help="tiny UNets at 64x64 on the CPU: checks the flow, times nothing")
    p.add_argument("--port", type=int, default=8199)
    p.add_argument("--chart", action="store_true", help="only redraw bench/chart.png from bench/results.json and results_server.json")
    args = p.parse_args(argv)
    if args.chart:
        write_chart(REPO / "bench" / "results_server.json", REPO / "bench" / "results.json", REPO / "bench" / "chart.png")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.comfyui is None:
        args.comfyui = default_comfyui()
    import torch

    cpu = args.tiny or not torch.cuda.is_available()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = Path(args.base) if args.base else Path(tempfile.mkdtemp(prefix="lcm-bench-server-"))
    for sub in ("custom_nodes", "input", "output", "temp", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    families = args.families.split(",")
    names = build_models(base, families, tiny=args.tiny)
    results: dict = {"server_args": args.server_args, "card": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not cpu else "CPU (smoke, not a timing)",
                     "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "prompts": args.prompts,
                     "cpu_cores": os.cpu_count(), "families": {}}
    results_path = out / "results_server.json"

    def dump():
        results_path.write_text(json.dumps(results, indent=2))

    try:
        if not args.no_png:
            results["png"] = png_costs()
    except Exception as exc:  # noqa: BLE001 - report and go on
        results["png"] = {"error": f"{type(exc).__name__}: {exc}"}
    dump()
    probe_file = out / "probe.jsonl"
    cache_env = {"TORCHINDUCTOR_CACHE_DIR": args.compile_cache or str(base / "user" / "lcm_nodes" / "torch_compile")}
    only = [s for s in args.only.split(",") if s]
    skip = [s for s in args.skip.split(",") if s]

    def server(log_name: str):
        return probed_comfy(Path(args.comfyui), base, probe_file, out / log_name, cpu=cpu, port=args.port, env=cache_env,
                            extra_args=args.server_args.split())

    for fam in families:
        size = 64 if args.tiny else (1024 if fam == "sdxl" else 512)
        fam_res = results["families"].setdefault(fam, {"size": size, "variants": []})
        variants = [(n, m) for n, m in variants_for(fam, names, size, args.tiny) if (not only or any(s in n for s in only)) and not any(s in n for s in skip)]
        t_start = time.perf_counter()
        with server(f"server-{fam}.log") as url:
            fam_res["server_start_s"] = round(time.perf_counter() - t_start, 1)
            client = ComfyClient(url)
            for name, make in variants:
                n = 4 if args.tiny else args.prompts
                reps = args.repeats if "latents" in name else 1
                try:
                    fam_res["variants"].append(run_variant(client, probe_file, name, make, n, args.warmup, reps))
                except Exception as exc:  # noqa: BLE001 - one broken variant must not lose the others
                    log.error("%s failed: %s", name, exc)
                    fam_res["variants"].append({"variant": name, "error": str(exc)[:3000]})
                dump()
            fast_save = [m for n, m in variants if "LCM Save Image" in n]
            if fast_save:
                fam_res["listed_files_complete"] = listed_files_are_complete(client, fast_save[0], 4 if args.tiny else 6)
                dump()
        compiled = [(n, m) for n, m in variants if "compile latents" in n]
        if compiled and not args.no_restart:  # a restarted ComfyUI on the same compile cache: the warm start
            with server(f"server-{fam}-restart.log") as url:
                client = ComfyClient(url)
                name, make = compiled[0]
                try:
                    fam_res["variants"].append(run_variant(client, probe_file, name + " (restarted, warm cache)", make,
                                                           4 if args.tiny else args.prompts, args.warmup, 1))
                except Exception as exc:  # noqa: BLE001
                    fam_res["variants"].append({"variant": name + " (restarted)", "error": str(exc)[:3000]})
            dump()
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
