"""bench/chart.png: the in-process table (bench_lcm.py's results.json) beside the images/s through a ComfyUI server
(bench_server.py's results_server.json)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from common import inprocess_bars


def write_chart(server_json: Path, inproc_json: Path, out_png: Path) -> None:
    """bench/chart.png: the in-process table (bench_lcm.py's results.json) beside the server's images/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    inproc = json.loads(inproc_json.read_text())
    server = json.loads(server_json.read_text())
    fig, axes = plt.subplots(1, 3, figsize=(18, 5), gridspec_kw={"width_ratios": [1, 1, 1.5]})
    for ax, fam in zip(axes[:2], ("sd15", "sdxl"), strict=True):
        inprocess_bars(ax, inproc, fam, fontsize=8)
    ax = axes[2]
    best: dict[tuple[str, str], float] = {}
    for run in server["runs"]:  # ComfyUI's default settings only; the median of a variant's repeated queues
        if run.get("server_args") or "compile mode" in run["label"]:
            continue
        fam = "SDXL" if run["label"].startswith("SDXL") else "SD1.5"
        for v in run.get("variants", []):
            if "images_per_s" in v and (fam, v["variant"]) not in best:
                best[(fam, v["variant"])] = statistics.median(v["images_per_s"])
    wanted = [("latents", "lcm latents", "native latents", "lcm compile latents"),
              ("save", "lcm save (VAE Decode + Save Image)", "native save", "lcm save (LCM VAE Decode + LCM Save Image)")]
    groups, values, colors = [], [], []
    for fam in ("SDXL", "SD1.5"):
        for end, ours, native, fast in wanted:
            for name, label, color in ((native, "native", "tab:gray"), (ours, "LCM", "tab:blue"), (fast, "LCM fast nodes", "tab:green")):
                if (fam, name) in best:
                    groups.append(f"{fam}\n{end}\n{label}")
                    values.append(best[(fam, name)])
                    colors.append(color)
    ax.bar(range(len(values)), values, color=colors)
    ax.set_xticks(range(len(values)), groups, fontsize=7)
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
    ax.set_ylabel("images/s through a ComfyUI server (higher is better)")
    ax.set_title(f"Through ComfyUI's queue, {server['card']} (bench_server.py)\n'fast nodes': LCM VAE Decode + LCM Save Image", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
