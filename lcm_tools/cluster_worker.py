"""The worker side of a cluster run: one warm ComfyUI per Dask worker, and the task that runs one prompt on it.

:class:`ComfyServerPlugin` is a Dask ``WorkerPlugin``. The driver registers it once per server configuration;
Dask sets it up on every worker that is or later joins the cluster, including one its nanny restarted after a
crash. Setting up starts the worker's ComfyUI in a background thread (:class:`WorkerServer`), so the worker keeps
answering its scheduler while ComfyUI boots; tasks wait for it. The server lives as long as the plugin: Dask
tears the plugin down when the worker closes or the plugin is unregistered, and that stops ComfyUI.

A worker that dies without clean-up (SIGKILL, OOM) cannot stop its ComfyUI. Two things cover that:

- the *slot file*: each server is recorded under the worker's nanny and the server configuration. The worker
  the nanny restarts in its place finds the record and adopts the still-running ComfyUI (interrupting and
  clearing whatever the dead worker had queued), so a crash does not cost a model reload;
- :mod:`lcm_tools.cluster_watchdog`: a small process per slot, started before its first ComfyUI, stops the
  slot's ComfyUI (booting or running) once the nanny (or, without a nanny, the worker) is gone, so nothing is
  left holding a GPU when the whole cluster dies.

:func:`run_prompt` is the task. It queues the prompt on this worker's ComfyUI, waits, and publishes every
output file exactly once as ``<stem>_<k><ext>`` in the job's output folder: written under a temporary name in
that folder, then hard-linked to the final name, which fails instead of overwriting when the name exists. An
attempt the engine repeats (a retry, or a rerun after the driver was interrupted) therefore keeps what an earlier
attempt wrote. A prompt ComfyUI rejects or fails is returned as a result with ComfyUI's error text (no retry:
it would fail the same way); a ComfyUI that stops answering raises :class:`ServerLost`, which Dask retries.

Threads: Dask runs tasks in the worker's thread pool, two at a time per worker by default, so a second prompt
is already in ComfyUI's queue when one finishes (the fast path keeps its CUDA graphs while the queue is not
empty). :class:`WorkerServer` is shared by those threads and guarded by its lock.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from distributed import WorkerPlugin, get_worker

from .client import ComfyClient, ComfyUnreachable, RunnerError
from .cluster_spec import PromptResult, PromptTask, ServerLost, ServerSpec, ServerStartError
from .cluster_watchdog import running as process_running

log = logging.getLogger("lcm_nodes.cluster")

#: Prefix ComfyUI is told to save under (inside the server's scratch output folder).
SCRATCH_PREFIX = "lcm-cluster"


# ------------------------------------------------------------------------------------------ one server per worker


def slot_root() -> Path:
    return Path(tempfile.gettempdir()) / f"lcm-cluster-{os.getuid() if hasattr(os, 'getuid') else 'user'}"


def _proc_created(pid: int) -> float:
    return psutil.Process(pid).create_time()


@dataclass
class _Running:
    """The server this worker talks to: started here (``local`` set) or adopted from a dead predecessor."""

    url: str
    pid: int
    created: float
    local: Any = None  # the LocalComfy that started it, when this worker did
    adopted: bool = False


@dataclass
class WorkerServer:
    """The ComfyUI of one worker: start (or adopt) in the background, hand out its URL, restart it when it died, stop it.

    Owned by the worker's :class:`ComfyServerPlugin`; ``url()``, ``alive()`` and ``stop()`` may be called from any
    thread (task threads and the worker's event loop), ``_lock`` serialises start, restart and stop.
    """

    spec: ServerSpec
    slot: Path  # this worker's slot folder: record, scratch output, ComfyUI log
    keeper_pid: int  # the process whose death ends the server (nanny, or the worker itself)
    worker_name: str
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _ready: threading.Event = field(default_factory=threading.Event)
    _running: _Running | None = None
    _error: str | None = None
    _closed: bool = False
    _starting: Any = None  # the LocalComfy being started, so stop() can end a boot early

    @property
    def scratch(self) -> Path:
        return self.slot / "output"

    @property
    def record(self) -> Path:
        return self.slot / "server.json"

    @property
    def log_path(self) -> Path:
        return self.slot / "comfyui.log"

    def start_in_background(self) -> None:
        threading.Thread(target=self._boot, name=f"lcm-comfy-boot-{self.worker_name}", daemon=True).start()

    def _boot(self) -> None:
        with self._lock:
            try:
                if not self._closed:
                    self._running = self._adopt() or self._start()
                    self._error = None
            except Exception as exc:  # reported to every task that asks for the server
                self._error = f"worker {self.worker_name} could not start ComfyUI: {exc}"
                log.error("%s", self._error)
            finally:
                self._ready.set()

    def url(self) -> str:
        """The server's URL once it answers; restarts it first when it has died. Raises ServerStartError."""
        if not self._ready.wait(self.spec.start_timeout + 60):
            raise ServerStartError(f"worker {self.worker_name}: ComfyUI did not come up within {self.spec.start_timeout:.0f} s; "
                                   f"see {self.log_path}")
        with self._lock:
            if self._error:
                raise ServerStartError(self._error)
            if self._closed:
                raise ServerLost(f"worker {self.worker_name} is closing")
            if not self._process_alive():
                log.warning("worker %s: ComfyUI (pid %s) has exited; starting a new one (log: %s)", self.worker_name,
                            self._running.pid if self._running else "?", self.log_path)
                self._stop_locked()
                try:
                    self._running = self._start()
                except Exception as exc:
                    self._error = f"worker {self.worker_name} could not restart ComfyUI: {exc}"
                    raise ServerStartError(self._error) from None
            return self._running.url

    def _process_alive(self) -> bool:
        r = self._running
        if r is None:
            return False
        if r.local is not None and r.local.proc is not None and r.local.proc.poll() is not None:
            return False
        return process_running(r.pid, r.created)

    def alive(self) -> bool:
        """Whether the server process runs and answers HTTP (tells a bad prompt from a lost server)."""
        r = self._running
        return r is not None and self._process_alive() and ComfyClient(r.url).alive()

    def _start(self) -> _Running:
        from .locate import find_comfyui
        from .server import LocalComfy

        comfy = Path(self.spec.comfy_path) if self.spec.comfy_path else find_comfyui()[0]
        if comfy is None:
            raise ServerStartError(f"no ComfyUI found on {socket.gethostname()} ({find_comfyui()[1]}); "
                                   f"give --comfyui PATH (a path valid on the workers)")
        self._ensure_watchdog()
        self._clear_scratch()
        # The slot folder as ComfyUI's temp folder: the watchdog finds the server by it (even while it boots), and
        # servers sharing a base folder do not empty each other's temp folder when they start.
        local = LocalComfy(comfy, base_directory=self.spec.base_directory, output_directory=self.scratch,
                           extra_args=["--temp-directory", str(self.slot), *self.spec.extra_args], log_path=self.log_path,
                           start_timeout=self.spec.start_timeout)
        self._starting = local
        try:
            url = local.start()
        finally:
            self._starting = None
        pid = local.proc.pid
        running = _Running(url=url, pid=pid, created=_proc_created(pid), local=local)
        self._write_record(running)
        log.info("worker %s: ComfyUI pid %s on %s, %s", self.worker_name, pid, url,
                 f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']}" if "CUDA_VISIBLE_DEVICES" in os.environ else "no GPU pinned")
        return running

    def _ensure_watchdog(self) -> None:
        """Start this slot's watchdog (cluster_watchdog) unless one already runs (a predecessor's, when adopting)."""
        pidfile = self.slot / "watchdog.json"
        try:
            rec = json.loads(pidfile.read_text())
            if process_running(int(rec["pid"]), float(rec["created"])):
                return
        except (OSError, ValueError, KeyError):
            pass
        watchdog = subprocess.Popen([sys.executable, "-m", "lcm_tools.cluster_watchdog", str(self.keeper_pid),
                                     repr(_proc_created(self.keeper_pid)), str(self.slot)],
                                    cwd=str(Path(__file__).resolve().parents[1]), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        pidfile.write_text(json.dumps({"pid": watchdog.pid, "created": _proc_created(watchdog.pid)}))

    def _write_record(self, running: _Running) -> None:
        tmp = self.record.with_suffix(f".{uuid.uuid4().hex}.tmp")
        tmp.write_text(json.dumps({"url": running.url, "pid": running.pid, "created": running.created,
                                   "keeper": self.keeper_pid, "plugin": self.spec.plugin_name}))
        os.replace(tmp, self.record)

    def _adopt(self) -> _Running | None:
        """Take over the ComfyUI a dead predecessor in this slot left running; None when there is none to take."""
        try:
            rec = json.loads(self.record.read_text())
        except (OSError, ValueError):
            return None
        pid, created = int(rec["pid"]), float(rec["created"])
        same = process_running(pid, created)
        client = ComfyClient(rec["url"])
        if not same:
            self.record.unlink(missing_ok=True)
            return None
        if rec.get("plugin") != self.spec.plugin_name or not client.alive():
            log.warning("worker %s: stopping a stale ComfyUI (pid %s) left in this slot", self.worker_name, pid)
            try:
                _terminate(psutil.Process(pid))
            except psutil.Error:
                pass
            self.record.unlink(missing_ok=True)
            return None
        self._ensure_watchdog()  # normally the predecessor's still runs: it watches the nanny, not the worker
        # Whatever the dead worker queued belongs to no task any more: drop it, then the leftovers it wrote.
        client.request("/queue", {"clear": True})
        client.interrupt()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            q = client.request("/queue")
            if not q.get("queue_running") and not q.get("queue_pending"):
                break
            time.sleep(0.2)
        self._clear_scratch()
        log.warning("worker %s: adopted the ComfyUI (pid %s, %s) its predecessor left running", self.worker_name, pid, rec["url"])
        return _Running(url=rec["url"], pid=pid, created=created, adopted=True)

    def _clear_scratch(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)
        self.scratch.mkdir(parents=True, exist_ok=True)

    def stop(self) -> None:
        """Stop the server (worker closing or plugin removed) and remove the slot folder. Safe to call twice."""
        self._closed = True
        starting = self._starting
        if starting is not None and starting.proc is not None and starting.proc.poll() is None:
            starting.proc.terminate()  # a boot in progress fails at once and releases the lock
        with self._lock:
            self._stop_locked()
            shutil.rmtree(self.slot, ignore_errors=True)  # also ends the slot's watchdog

    def _stop_locked(self) -> None:
        r, self._running = self._running, None
        if r is None:
            return
        if r.local is not None:
            r.local.stop()
        else:
            try:
                proc = psutil.Process(r.pid)
                if abs(proc.create_time() - r.created) < 0.01:
                    _terminate(proc)
            except psutil.Error:
                pass
        self.record.unlink(missing_ok=True)
        shutil.rmtree(self.scratch, ignore_errors=True)


def _terminate(proc: psutil.Process) -> None:
    try:
        proc.terminate()
        proc.wait(20)
    except psutil.TimeoutExpired:
        proc.kill()
    except psutil.Error:
        pass


class ComfyServerPlugin(WorkerPlugin):
    """Gives each Dask worker one warm ComfyUI (see the module docstring). Register with ``client.register_plugin``.

    ``idempotent``: registering the same spec again (the next job, a rerun) keeps the running servers.
    """

    idempotent = True

    def __init__(self, spec: ServerSpec):
        self.spec = spec
        self.name = spec.plugin_name
        self.server: WorkerServer | None = None

    def setup(self, worker) -> None:
        keeper = os.getppid() if worker.nanny else os.getpid()
        slot_id = hashlib.sha256(f"{socket.gethostname()}|{worker.nanny or worker.address}|{self.name}".encode()).hexdigest()[:16]
        slot = slot_root() / slot_id
        slot.mkdir(parents=True, exist_ok=True)
        self.server = WorkerServer(self.spec, slot, keeper, str(worker.name))
        self.server.start_in_background()

    async def teardown(self, worker) -> None:
        if self.server is not None:  # stopping waits for ComfyUI to exit: not on the worker's event loop
            await asyncio.to_thread(self.server.stop)


# ------------------------------------------------------------------------------------------ the task


def _scratch_prefix(api: dict, stem: str) -> dict:
    """The workflow with every save node writing under ``lcm-cluster/<stem>`` in the scratch folder."""
    api = json.loads(json.dumps(api))
    for node in api.values():
        inputs = node.get("inputs", {})
        if isinstance(inputs.get("filename_prefix"), str):
            inputs["filename_prefix"] = f"{SCRATCH_PREFIX}/{stem}"
    return api


def _node_order(node_id: str) -> tuple:
    return (0, int(node_id), "") if node_id.isdigit() else (1, 0, node_id)


def output_files(history: dict, scratch: Path) -> list[Path]:
    """The files a finished prompt saved (entries of type ``output``), in node order, as paths in ``scratch``."""
    found = []
    root = scratch.resolve()
    for node_id in sorted(history.get("outputs", {}), key=_node_order):
        for _kind, entries in sorted(history["outputs"][node_id].items(), key=lambda kv: kv[0]):
            if not isinstance(entries, list):
                continue
            for entry in entries:
                if isinstance(entry, dict) and entry.get("type") == "output" and entry.get("filename"):
                    path = (root / entry.get("subfolder", "") / entry["filename"]).resolve()
                    if root not in path.parents:
                        raise RunnerError(f"ComfyUI reported an output outside its output folder: {entry}")
                    found.append(path)
    return found


def publish(sources: list[Path], output: Path, stem: str) -> tuple[list[str], list[str]]:
    """Move each source to ``output/<stem>_<k><ext>`` unless that name exists. Returns (names, names kept as they were).

    Each file is first moved to a temporary name in ``output`` (a rename on one filesystem, a copy otherwise) and
    then hard-linked to its final name: the link is atomic and refuses an existing name, so two attempts at the
    same prompt (a retry, a worker declared dead that was only slow) can never both write, and no reader ever
    sees a half-written file. On a filesystem without hard links the final name is checked, then renamed into.
    """
    names, kept = [], []
    for k, src in enumerate(sources):
        final = output / f"{stem}_{k:02d}{src.suffix}"
        tmp = output / f".{final.name}.{uuid.uuid4().hex[:8]}.part"
        try:
            os.rename(src, tmp)
        except OSError:  # another filesystem
            shutil.copyfile(src, tmp)
            src.unlink(missing_ok=True)
        try:
            os.link(tmp, final)
            tmp.unlink()
        except FileExistsError:
            tmp.unlink()
            kept.append(final.name)
        except OSError:  # no hard links here (some network and FUSE filesystems)
            if final.exists():
                tmp.unlink()
                kept.append(final.name)
            else:
                os.rename(tmp, final)
        names.append(final.name)
    return names, kept


def run_prompt(task: PromptTask) -> PromptResult:
    """Run one prompt on this worker's ComfyUI and publish its outputs (the Dask task; see the module docstring)."""
    worker = get_worker()
    plugin = worker.plugins.get(task.plugin)
    if plugin is None or plugin.server is None:
        raise ServerStartError(f"worker {worker.name} has no ComfyUI plugin {task.plugin} (was it unregistered during the job?)")
    server: WorkerServer = plugin.server
    base = dict(stem=task.stem, line=task.line, worker=str(worker.name), address=worker.address)
    url = server.url()
    client = ComfyClient(url, timeout=task.timeout)
    queued_at = time.time()
    try:
        history = client.wait(client.queue(_scratch_prefix(task.api, task.stem)))
        sources = output_files(history, server.scratch)
        if not sources:
            raise RunnerError("the prompt finished but saved no output file (does the workflow end in a Save Image node?)")
    except RunnerError as exc:
        # no answer at all is the server's trouble: a Dask retry (a slow answer under load too), never the prompt's failure
        if isinstance(exc, ComfyUnreachable) or not server.alive():
            raise ServerLost(f"ComfyUI of worker {worker.name} did not answer during {task.stem}: {exc}") from None
        return PromptResult(**base, error=str(exc), queued_at=queued_at, finished_at=time.time())
    names, kept = publish(sources, Path(task.output), task.stem)
    return PromptResult(**base, files=tuple(names), kept=tuple(kept), queued_at=queued_at, finished_at=time.time())


def can_see(path: str) -> bool:
    """Run on every worker before a job: whether the driver's probe file is visible there (a shared output folder)."""
    return Path(path).is_file()
