"""Running prompts on a ComfyUI: one prompt with a progress bar, or a resumable queue from a prompts file.

Images are written under the output folder as ``<name>_<n>.png`` with the next free ``n``: a run never
overwrites an earlier image, and nothing but what the run asked for lands there.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

from .client import ComfyClient, RunnerError
from .workflows import Overrides, apply_overrides, item_key

STATE_FILE = ".lcm-runner-state.json"


def progress_bar(desc: str) -> tuple[Callable[[int, int], None], Callable[[], None]]:
    """(report(value, total), close()) drawing a tqdm bar on stderr, or plain lines without tqdm."""
    try:
        from tqdm import tqdm
    except ImportError:
        def report(value, total):
            print(f"{desc}: step {value}/{total}", file=sys.stderr)
        return report, lambda: None
    bar = tqdm(total=1, desc=desc, unit="step", file=sys.stderr)

    def report(value, total):
        if bar.total != total:
            bar.reset(total=total)
        bar.n = value
        bar.refresh()

    return report, bar.close


def next_free(output: Path, name: str) -> Path:
    """``output/<name>_<n>.png`` for the first ``n`` above every existing one (numbers are never reused)."""
    pattern = re.compile(re.escape(name) + r"_(\d+)\.png$")
    taken = [int(m.group(1)) for p in output.glob(f"{glob_escape(name)}_*.png") if (m := pattern.match(p.name))]
    return output / f"{name}_{(max(taken) + 1) if taken else 0:05d}.png"


def glob_escape(text: str) -> str:
    return re.sub(r"([\[\]*?])", r"[\1]", text)


def save_new(output: Path, name: str, data: bytes) -> Path:
    """Write ``data`` as the next free ``<name>_<n>.png``, atomically (never a half-written image under that name)."""
    output.mkdir(parents=True, exist_ok=True)
    while True:
        path = next_free(output, name)
        tmp = path.with_name(path.name + ".part")
        tmp.write_bytes(data)
        try:
            os.link(tmp, path)  # fails if another writer took the name meanwhile: then take the next one
        except FileExistsError:
            tmp.unlink()
            continue
        except OSError:  # a filesystem without hard links
            if path.exists():
                tmp.unlink()
                continue
            os.replace(tmp, path)
            return path
        tmp.unlink()
        return path


def run_one(client: ComfyClient, api: dict, output: Path, name: str, quiet: bool = False) -> list[Path]:
    """Queue one prompt, wait for it, and save every output image under ``output``; returns the new files."""
    prompt_id = client.queue(api)
    report, close = (lambda v, t: None, lambda: None) if quiet else progress_bar(name)
    try:
        history = client.wait(prompt_id, report)
    finally:
        close()
    written = []
    for node_out in history.get("outputs", {}).values():
        for image in node_out.get("images", []):
            if image.get("type") == "output":
                written.append(save_new(output, name, client.view(image)))
    if not written:
        raise RunnerError(f"prompt {prompt_id} finished but produced no output image (does the workflow end in Save Image?)")
    return written


def run_queue(client: ComfyClient, base: dict, overrides: Overrides, items: list[dict], output: Path, quiet: bool = False) -> dict:
    """Run many prompts, resuming from the state file in ``output``. Returns {total, done, skipped, failed}."""
    output.mkdir(parents=True, exist_ok=True)
    state_path = output / STATE_FILE
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    done = skipped = 0
    failed: list[str] = []
    for i, item in enumerate(items):
        api = apply_overrides(base, overrides.merged(item))
        key = item_key(api)
        name = f"item{i:04d}_{key[:8]}"
        if key in state and all((output / f).exists() for f in state[key]):
            skipped += 1
            continue
        try:
            files = run_one(client, api, output, name, quiet)
        except RunnerError as exc:
            failed.append(f"item {i}: {exc}")
            print(f"item {i} failed: {exc}", file=sys.stderr)
            continue
        state[key] = [f.name for f in files]
        tmp = state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, state_path)
        done += 1
        if not quiet:
            print(f"[{i + 1}/{len(items)}] {', '.join(f.name for f in files)}", file=sys.stderr)
    return {"total": len(items), "done": done, "skipped": skipped, "failed": failed}
