"""The records of a scale-out job, apart from Dask: the prompt file streamed line by line, each prompt's output
stem, the job description, the journal of finished prompts and the summary.

The driver (:mod:`lcm_tools.cluster`) turns each :class:`PromptLine` into a task with :func:`prepare`; a rerun
reads :data:`JOURNAL` with :func:`read_journal` and skips what is done. No Dask import here.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .client import RunnerError
from .cluster_spec import ClusterError
from .workflows import SAMPLERS, Overrides, apply_overrides, item_key

log = logging.getLogger("lcm_nodes.cluster")


JOURNAL = "journal.jsonl"
FAILURES = "failures.jsonl"
SUMMARY = "summary.json"
#: An ``id`` becomes part of file names: letters, digits, '.', '_' and '-', not starting with '.' or '-'.
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
#: Failures kept in memory for the summary; all of them are in failures.jsonl.
SUMMARY_FAILURES = 100


# ------------------------------------------------------------------------------------------ the prompt file


@dataclass(frozen=True)
class PromptLine:
    """One prompt of the file: its line number and override fields, or why the line cannot be read."""

    line: int
    item: dict[str, Any] | None = None
    error: str | None = None


def iter_prompt_lines(path: Path) -> Iterator[PromptLine]:
    """The prompts of a prompts file, read line by line (the file is never held whole).

    The format is the runner's: a line of text is a prompt; a line starting with ``{`` is a JSON object of
    override fields (plus an optional ``id``); blank lines and ``#`` comments are skipped. A line that is not
    valid JSON comes back with ``error`` set, so it fails alone instead of stopping the job.
    """
    try:
        f = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise ClusterError(f"prompts file {path} does not exist; give --prompts FILE with one prompt per line") from None
    with f:
        for n, raw in enumerate(f, 1):
            text = raw.strip()
            if not text or text.startswith("#"):
                continue
            if not text.startswith("{"):
                yield PromptLine(n, {"prompt": text})
                continue
            try:
                item = json.loads(text)
            except json.JSONDecodeError as exc:
                yield PromptLine(n, error=f"line {n} is not valid JSON ({exc}); write one JSON object per line, e.g. "
                                          '{"prompt": "a cat", "seed": 7}')
                continue
            if not isinstance(item, dict):
                yield PromptLine(n, error=f"line {n} is JSON but not an object of override fields")
            else:
                yield PromptLine(n, item)


def count_prompts(path: Path) -> int:
    """How many prompt lines the file has (one streaming pass, for the progress bar's total)."""
    with open(path, encoding="utf-8") as f:
        return sum(1 for raw in f if raw.strip() and not raw.strip().startswith("#"))


def prompt_seed(api: dict) -> int | None:
    """The seed of the workflow's first sampler (by node id), or None when it has none or it comes from a link."""
    for nid in sorted(api, key=lambda k: (len(k), k)):
        node = api[nid]
        if node.get("class_type") in SAMPLERS:
            for key in ("seed", "noise_seed"):
                if isinstance(node.get("inputs", {}).get(key), int):
                    return node["inputs"][key]
    return None


def prompt_stem(line: int, item_id: str | None, seed: int | None) -> str:
    """The name a prompt's outputs start with: ``<id or line000012>[_s<seed>]``."""
    return (item_id or f"line{line:06d}") + ("" if seed is None else f"_s{seed}")


# ------------------------------------------------------------------------------------------ job and summary


@dataclass(frozen=True)
class Job:
    """One cluster run: the workflow, the prompts file and overrides for every prompt, and where outputs go.

    retries: how often Dask re-runs a prompt whose ComfyUI stopped answering (a worker that dies is handled by
        the scheduler itself: its prompts go to other workers, up to ``distributed.scheduler.allowed-failures``).
    in_flight: prompts submitted at once; None: twice the workers' task slots (looked at again every 30 s).
    timeout: seconds one prompt may take, its wait in ComfyUI's queue included.
    """

    workflow: dict
    prompts: Path
    output: Path
    overrides: Overrides = field(default_factory=Overrides)
    retries: int = 2
    in_flight: int | None = None
    timeout: float = 3600.0
    quiet: bool = False


@dataclass
class WorkerStats:
    """Images one worker (by name: a restarted worker keeps its name) finished, and over what time span."""

    images: int = 0
    prompts: int = 0
    first: float = math.inf
    last: float = 0.0

    @property
    def images_per_s(self) -> float:
        span = self.last - self.first
        return self.images / span if span > 0 else 0.0


@dataclass
class Summary:
    total: int = 0
    done: int = 0
    failed: int = 0
    skipped: int = 0
    images: int = 0
    wall_s: float = 0.0
    interrupted: bool = False
    failures: list[dict] = field(default_factory=list)
    workers: dict[str, WorkerStats] = field(default_factory=dict)

    def to_json(self) -> dict:
        d = asdict(self)
        for name, w in self.workers.items():
            d["workers"][name] = {"images": w.images, "prompts": w.prompts, "images_per_s": round(w.images_per_s, 4)}
        return d

    def text(self, output: Path | None = None) -> str:
        rate = self.images / self.wall_s if self.wall_s > 0 else 0.0
        lines = [f"{self.done} done, {self.failed} failed, {self.skipped} skipped (already done), of {self.total} prompts; "
                 f"{self.images} images in {self.wall_s:.1f} s wall time ({rate:.2f} images/s)"
                 + ("; INTERRUPTED: run the same command again to resume" if self.interrupted else "")]
        for name in sorted(self.workers):
            w = self.workers[name]
            lines.append(f"  worker {name}: {w.images} images from {w.prompts} prompts, {w.images_per_s:.2f} images/s")
        for f in self.failures:
            lines.append(f"  FAILED line {f['line']} ({f['stem'] or 'unnamed'}): {f['error']}")
        if self.failed > len(self.failures):
            lines.append(f"  ... and {self.failed - len(self.failures)} more")
        if self.failed and output is not None:
            lines.append(f"  all failures, with ComfyUI's error text: {output / FAILURES}")
        return "\n".join(lines)


def read_journal(path: Path) -> dict[str, dict]:
    """stem -> journal entry of every prompt an earlier run finished. A torn last line (driver killed mid-write) is ignored."""
    done: dict[str, dict] = {}
    if not path.is_file():
        return done
    with open(path, encoding="utf-8") as f:
        for n, raw in enumerate(f, 1):
            try:
                entry = json.loads(raw)
                done[entry["stem"]] = entry
            except (ValueError, KeyError, TypeError):
                log.warning("%s:%d is not a journal entry; ignored (that prompt runs again)", path, n)
    return done


def open_journal(path: Path):
    """The journal, open for appending; after a torn last line (driver killed mid-write) new entries start on a new line."""
    journal = open(path, "a+", encoding="utf-8")
    if journal.tell() > 0:
        journal.seek(journal.tell() - 1)
        if journal.read(1) != "\n":
            journal.write("\n")
    return journal


@dataclass(frozen=True)
class Prepared:
    line: int
    stem: str | None = None
    item_id: str | None = None
    seed: int | None = None
    hash: str | None = None
    api: dict | None = None
    skip: bool = False
    error: str | None = None


def prepare(pl: PromptLine, job: Job, done: dict[str, dict], output: Path, seen: dict[str, int]) -> Prepared:
    """Turn a prompt line into a task, a skip (already done) or a failure, without touching the cluster."""
    if pl.error:
        return Prepared(pl.line, error=pl.error)
    item = dict(pl.item)
    item_id = item.pop("id", None)
    if item_id is not None and (not isinstance(item_id, str) or not ID_PATTERN.fullmatch(item_id)):
        return Prepared(pl.line, error=f"id {item_id!r} cannot be part of a file name; use 1-100 letters, digits, "
                                        f"'.', '_' or '-', starting with a letter or digit")
    try:
        api = apply_overrides(job.workflow, job.overrides.merged(item))
    except RunnerError as exc:
        return Prepared(pl.line, error=str(exc))
    seed = prompt_seed(api)
    stem = prompt_stem(pl.line, item_id, seed)
    if stem in seen:
        return Prepared(pl.line, stem, item_id, seed, error=f"its output name {stem!r} is taken by line {seen[stem]}; give each "
                                                             f"prompt its own id (or seed)")
    seen[stem] = pl.line
    h = item_key(api)
    entry = done.get(stem)
    if entry is not None:
        if entry.get("hash") != h:
            return Prepared(pl.line, stem, item_id, seed, error=f"{stem} was already made from a different prompt or settings "
                                                                 f"(line {entry.get('line')} of an earlier run); its files are kept. "
                                                                 f"Use another --output folder, or give this prompt a new id")
        if all((output / name).is_file() for name in entry.get("files", [])):
            return Prepared(pl.line, stem, item_id, seed, h, skip=True)
    return Prepared(pl.line, stem, item_id, seed, h, api=api)
