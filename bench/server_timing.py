"""Timing prompts through a real ComfyUI server: the server with the probe, the queue, images/s and the stages.

The server is ``lcm_tools``' :class:`~lcm_tools.server.LocalComfy` (this checkout's pack loaded) with the probe
(``probe_server.py``) linked into its base folder's ``custom_nodes``; the client is ``lcm_tools``'
:class:`~lcm_tools.client.ComfyClient`. A variant's N prompts are queued at once and ``/queue`` is polled every
50 ms until it is empty (a light client: polling ``/history`` per prompt slows the server); images/s =
N / (first POST to empty queue), after a few warm-up prompts that load, capture and compile. Where each
prompt's time went comes from the probe's records.
"""

from __future__ import annotations

import io
import logging
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import common  # noqa: F401 - puts the repository on sys.path, for lcm_tools
from probe_server import PROBE_ENV, read_probe

from lcm_tools.client import ComfyClient, format_history_error
from lcm_tools.server import LocalComfy

log = logging.getLogger("lcm_bench")
PROBE_FILE = Path(__file__).resolve().with_name("probe_server.py")
#: The probe's name in the server's custom_nodes.
PROBE_LINK = "lcm_bench_probe.py"

STAGES = {
    "clip": ("CLIPTextEncode",),
    "sampler": ("LCMSampler", "KSampler", "ModelSamplingDiscrete"),
    "decode": ("VAEDecode", "LCMVAEDecode"),
    "save": ("SaveImage", "LCMSaveImage", "LCMBenchSink"),
}


def probed_comfy(comfy: Path, base: Path, probe_file: Path, log_file: Path, *, cpu: bool, port: int,
                 env: Mapping[str, str] | None = None, extra_args: Sequence[str] = ()) -> LocalComfy:
    """A ComfyUI v0.8.0 server on ``base`` (its models, output and custom_nodes) that records to ``probe_file``.

    Links the probe into ``base/custom_nodes`` and serves a stub page as the frontend (the GPU machine has no
    frontend package); ``env`` and ``extra_args`` go to the server. Start it with ``with ... as url``.
    """
    link = base / "custom_nodes" / PROBE_LINK
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(PROBE_FILE)
    front = base / "frontend"
    front.mkdir(parents=True, exist_ok=True)
    (front / "index.html").write_text("<!doctype html><title>bench</title>")
    return LocalComfy(comfy, port=port, base_directory=base, cpu=cpu, log_path=log_file, start_timeout=300,
                      extra_args=["--front-end-root", str(front), "--disable-api-nodes", *extra_args],
                      env={**(env or {}), PROBE_ENV: str(probe_file), "PYTHONUNBUFFERED": "1"})


def wait_empty(client: ComfyClient, poll: float = 0.05, timeout: float = 1800) -> float:
    """Poll ``/queue`` until nothing runs or waits; returns that moment (``time.perf_counter()``)."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        q = client.request("/queue")
        if not q.get("queue_running") and not q.get("queue_pending"):
            return time.perf_counter()
        time.sleep(poll)
    raise RuntimeError(f"the queue did not empty within {timeout:.0f} s")


def prompt_error(client: ComfyClient, prompt_id: str) -> str:
    """ComfyUI's error for a failed prompt, from its history."""
    return format_history_error(client.history(prompt_id) or {})


def breakdown(records: list[dict]) -> dict:
    """Median ms per prompt for each stage, the executor's own time around the nodes, and the gap between prompts."""
    per: dict[str, list[float]] = {k: [] for k in (*STAGES, "other_nodes", "executor", "between_prompts", "prompt")}
    records = sorted(records, key=lambda r: r["t0"])
    for i, r in enumerate(records):
        stage_ms = dict.fromkeys(STAGES, 0.0)
        other = 0.0
        for _, cls, t0, t1 in r["nodes"]:
            ms = (t1 - t0) * 1000
            stage = next((s for s, names in STAGES.items() if cls in names), None)
            if stage:
                stage_ms[stage] += ms
            else:
                other += ms
        prompt_ms = (r["t1"] - r["t0"]) * 1000
        for s, v in stage_ms.items():
            per[s].append(v)
        per["other_nodes"].append(other)
        per["executor"].append(prompt_ms - sum(stage_ms.values()) - other)
        per["prompt"].append(prompt_ms)
        if i + 1 < len(records):
            per["between_prompts"].append((records[i + 1]["t0"] - r["t1"]) * 1000)
    return {k: round(statistics.median(v), 2) if v else None for k, v in per.items()}


def run_variant(client: ComfyClient, probe_file: Path, name: str, make, n: int, warmup: int, repeats: int = 1) -> dict:
    """Warm up, then queue ``n`` prompts at once ``repeats`` times; images/s and the per-stage breakdown.

    ``make(tag, i)`` gives the i-th API prompt of the variant; ``tag`` keeps the texts of each queue distinct.
    """
    t_warm = time.perf_counter()
    warm_ids = [client.queue(make(f"{name}-warm", i)) for i in range(warmup)]
    wait_empty(client)
    warm_s = time.perf_counter() - t_warm
    probe = read_probe(probe_file)
    warm_records = [probe[p] for p in warm_ids if p in probe]
    failed = [p for p in warm_ids if p in probe and not probe[p]["success"]]
    if failed:
        raise RuntimeError(f"{name}: warm-up prompt failed: {prompt_error(client, failed[0])}")
    result = {"variant": name, "prompts": n, "warmup_prompts": warmup, "warmup_s": round(warm_s, 2),
              "first_prompt_s": round(warm_records[0]["t1"] - warm_records[0]["t0"], 2) if warm_records else None,
              "warmup_captures": sum(r.get("captures", 0) for r in warm_records), "runs": []}
    for rep in range(repeats):
        t0 = time.perf_counter()
        ids = [client.queue(make(f"{name}-r{rep}", i)) for i in range(n)]
        t_end = wait_empty(client)
        probe = read_probe(probe_file)
        recs = [probe[p] for p in ids if p in probe]
        bad = [r["prompt_id"] for r in recs if not r["success"]]
        if bad or len(recs) != n:
            why = prompt_error(client, bad[0]) if bad else ""
            raise RuntimeError(f"{name}: {len(bad)} failed / {n - len(recs)} missing prompts {why}")
        executing = (max(r["t1"] for r in recs) - min(r["t0"] for r in recs))
        result["runs"].append({
            "images_per_s": round(n / (t_end - t0), 3),
            "wall_s": round(t_end - t0, 3),
            "images_per_s_executor": round(n / executing, 3),
            "captures": sum(r.get("captures", 0) for r in recs),
            "gpu_reserved_mib_last": recs[-1].get("gpu_reserved_mib"),
            "stages_ms": breakdown(recs),
        })
    result["images_per_s"] = [r["images_per_s"] for r in result["runs"]]
    log.info("%-28s %s images/s (warm-up %.1f s, first prompt %s s) stages %s", name, result["images_per_s"], warm_s,
             result["first_prompt_s"], result["runs"][-1]["stages_ms"])
    return result


def listed_files_are_complete(client: ComfyClient, make, n: int = 6) -> dict:
    """Queue ``n`` saving prompts, fetch each image through /view the moment /history lists it, check it decodes."""
    from PIL import Image

    ids = [client.queue(make("listed", i)) for i in range(n)]
    pending, ok, checked = set(ids), 0, 0
    deadline = time.time() + 600
    while pending and time.time() < deadline:
        for pid in list(pending):
            h = client.history(pid)
            if not h:
                continue
            pending.discard(pid)
            for out in h.get("outputs", {}).values():
                for image in out.get("images", []):
                    checked += 1
                    data = client.view(image)
                    img = Image.open(io.BytesIO(data))
                    img.load()  # raises on a truncated file
                    ok += 1
        time.sleep(0.02)
    return {"prompts": n, "images_checked": checked, "complete": ok}
