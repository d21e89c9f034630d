"""What the cluster driver and its workers share: the server spec, a task and its result, the errors.

No Dask import here: the command line can read these (and print a clear error) where Dask is not installed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

PLUGIN_PREFIX = "lcm-comfy-"


class ClusterError(RuntimeError):
    """A cluster run cannot go on (no workers, a worker cannot start ComfyUI, the output is not shared...)."""


class ServerStartError(ClusterError):
    """A worker could not start its ComfyUI; the text names the worker and ComfyUI's log."""


class ServerLost(RuntimeError):
    """ComfyUI did not answer during a prompt; Dask retries the prompt (``retries=``), after starting the server again
    when its process has died."""


# ------------------------------------------------------------------------------------------ configuration


@dataclass(frozen=True)
class ServerSpec:
    """How each worker starts its ComfyUI. Part of the plugin's name: a job with another spec gets new servers.

    comfy_path: the ComfyUI folder on the worker's host; None: found there as ``lcm_tools.locate`` finds it.
    base_directory: ComfyUI's ``--base-directory`` (models/, input/) on the worker's host; None: ComfyUI's own.
    extra_args: more ComfyUI arguments (``--comfy-arg``).
    start_timeout: seconds a server may take to answer.
    """

    comfy_path: str | None = None
    base_directory: str | None = None
    extra_args: tuple[str, ...] = ()
    start_timeout: float = 600.0

    @property
    def plugin_name(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return PLUGIN_PREFIX + hashlib.sha256(blob).hexdigest()[:12]


@dataclass(frozen=True)
class PromptTask:
    """One prompt of a job, as sent to a worker: the API workflow (overrides applied) and where its outputs go."""

    plugin: str
    stem: str
    line: int
    api: dict
    output: str
    timeout: float = 3600.0


@dataclass(frozen=True)
class PromptResult:
    """What a worker did with one prompt. ``error`` is ComfyUI's text when the prompt failed, else None.

    files: names (in the output folder) of the prompt's outputs; ``kept`` lists those an earlier attempt had
    already written and that were left as they were. Times are the worker host's ``time.time()``.
    """

    stem: str
    line: int
    worker: str
    address: str
    files: tuple[str, ...] = ()
    kept: tuple[str, ...] = ()
    error: str | None = None
    queued_at: float = 0.0
    finished_at: float = 0.0
