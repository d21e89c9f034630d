"""Scale-out: one prompt file across many ComfyUI workers, on Dask distributed.

    python -m lcm_tools run WORKFLOW --prompts prompts.txt --output out/ --workers 2          # a local cluster
    python -m lcm_tools run WORKFLOW --prompts prompts.txt --output out/ --cluster tls://HOST:8786 \
        --tls-ca-file ca.pem --tls-cert cert.pem --tls-key key.pem

Dask does the distributed part: scheduling, worker liveness, retries, restarts. There is no scheduler, RPC
or heartbeat of our own. A scheduler on another host is joined over TLS only (:mod:`lcm_tools.cluster_security`:
Dask unpickles what it is sent). This module is the driver; :mod:`lcm_tools.cluster_job` holds the job's records (prompt
lines, journal, summary) and :mod:`lcm_tools.cluster_worker` is what runs on the workers (one warm ComfyUI per
worker, the task that runs a prompt).

The driver streams the prompt file: at most ``in_flight`` prompts (twice the workers' task slots) are
submitted at once, the next one only when one finishes (``as_completed``), so a 100,000-line file is never
100,000 task objects. Each prompt becomes one task whose outputs land in the output folder as
``<stem>_<k><ext>``, the stem being the prompt's ``id`` (a field of a JSON line) or ``line<N>`` and its seed:
``line000012_s7_00.png``. Every finished prompt is appended to ``journal.jsonl`` there (by the driver alone,
so there is one writer); a rerun skips the prompts the journal lists whose files all exist, so an
interrupted driver resumes where it stopped. Prompts that fail (a bad line, ComfyUI's validation or execution
error) are written to ``failures.jsonl`` with the error text and counted in the summary; the job goes on.

Exactly once: an output is written under its final name only by a hard link that refuses an existing name
(:func:`lcm_tools.cluster_worker.publish`), so neither Dask's retry of a prompt whose worker died nor a rerun
after an interrupted driver can duplicate or overwrite an image.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from .client import RunnerError
from .cluster_job import (  # noqa: F401  (PromptLine and the rest are this module's public names too)
    FAILURES,
    JOURNAL,
    SUMMARY,
    SUMMARY_FAILURES,
    Job,
    Prepared,
    PromptLine,
    Summary,
    WorkerStats,
    count_prompts,
    iter_prompt_lines,
    open_journal,
    prepare,
    read_journal,
)
from .cluster_security import TLSFiles, check_cluster_address, driver_security
from .cluster_spec import PLUGIN_PREFIX, ClusterError, PromptResult, PromptTask, ServerSpec, ServerStartError
from .workflows import Overrides

log = logging.getLogger("lcm_nodes.cluster")


# ------------------------------------------------------------------------------------------ the driver


def ensure_plugin(client, spec: ServerSpec) -> str:
    """Register the ComfyUI plugin for ``spec`` (kept if already there: servers stay warm between jobs);
    servers of another spec are stopped first, so a GPU never holds two. Returns the plugin name."""
    from .cluster_worker import ComfyServerPlugin

    names = client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.worker_plugins))
    for name in names:
        if name.startswith(PLUGIN_PREFIX) and name != spec.plugin_name:
            log.info("stopping the ComfyUI servers of an earlier job's configuration (%s)", name)
            client.unregister_worker_plugin(name)
    try:
        client.register_plugin(ComfyServerPlugin(spec), name=spec.plugin_name)
    except Exception as exc:
        if not _is_import_failure(exc):
            raise
        with contextlib.suppress(Exception):  # the scheduler would hand it to every new worker; the workers never had it
            client.unregister_worker_plugin(spec.plugin_name)
        raise _cannot_import(exc) from None
    return spec.plugin_name


def _is_import_failure(exc: Exception) -> bool:
    """A worker could not unpickle our code: it answers the ImportError, or a bare Exception naming it."""
    return isinstance(exc, ImportError) or "No module named" in str(exc)


def _cannot_import(exc: Exception) -> ClusterError:
    return ClusterError(f"a worker cannot load this pack's cluster code ({type(exc).__name__}: {exc}); start the Dask workers "
                        f"in the LCM Nodes folder, or with it on PYTHONPATH (the same version as the driver's)")


def check_environment(client) -> None:
    """Refuse to start when the scheduler or a worker cannot import this pack's code.

    Dask's scheduler unpickles every task it is given, so with ``--cluster`` it needs ``lcm_tools`` as much as the
    workers do (a local cluster's scheduler runs in this process). The probe is a lambda, sent by value.
    """
    has_pack = lambda: __import__("importlib.util").util.find_spec("lcm_tools") is not None  # noqa: E731
    fix = "start it with this folder on PYTHONPATH (PYTHONPATH=/path/to/lcm-nodes dask scheduler / dask worker ...)"
    if not client.run_on_scheduler(has_pack):
        raise ClusterError(f"the Dask scheduler {client.scheduler.address} cannot import this pack's code (lcm_tools); {fix}")
    blind = sorted(addr for addr, ok in client.run(has_pack).items() if not ok)
    if blind:
        raise ClusterError(f"Dask worker(s) {', '.join(blind)} cannot import this pack's code (lcm_tools); {fix}")


def check_shared_output(client, output: Path) -> None:
    """Refuse to start when a worker cannot see the output folder (it writes there directly)."""
    from .cluster_worker import can_see

    probe = output / f".lcm-probe-{uuid.uuid4().hex}"
    probe.write_text("probe")
    try:
        seen = client.run(can_see, str(probe))
    except Exception as exc:
        if _is_import_failure(exc):
            raise _cannot_import(exc) from None
        raise
    finally:
        probe.unlink(missing_ok=True)
    blind = sorted(addr for addr, ok in seen.items() if not ok)
    if blind:
        raise ClusterError(f"worker(s) {', '.join(blind)} cannot see the output folder {output}; on a cluster of several "
                           f"hosts give an --output on a filesystem every worker mounts at the same path")


def task_slots(client) -> int:
    return sum(w.get("nthreads", 1) for w in client.scheduler_info()["workers"].values())


def _progress(total: int, quiet: bool):
    if quiet:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="prompt", desc="prompts", file=sys.stderr, dynamic_ncols=True)


def run_job(client, job: Job, spec: ServerSpec, on_result=None) -> Summary:
    """Run every prompt of ``job`` on the cluster behind ``client``; returns the summary (also in ``summary.json``).

    on_result: called with each PromptResult as it arrives (the tests use it to act mid-job).
    Raises ClusterError when the job cannot go on (no workers, output not shared, ComfyUI will not start);
    KeyboardInterrupt is re-raised after the journal and the summary are written.
    """
    started = time.monotonic()
    output = job.output.expanduser().resolve()
    output.mkdir(parents=True, exist_ok=True)
    if not client.scheduler_info()["workers"]:
        raise ClusterError("the cluster has no workers; start some (e.g. `dask worker SCHEDULER --nthreads 2`, one per GPU)")
    check_environment(client)
    check_shared_output(client, output)
    plugin = ensure_plugin(client, spec)
    done = read_journal(output / JOURNAL)
    summary = Summary(total=count_prompts(job.prompts))
    bar = _progress(summary.total, job.quiet)
    seen: dict[str, int] = {}
    pending: dict[Any, Prepared] = {}

    from distributed import as_completed

    from .cluster_worker import run_prompt

    ac = as_completed(with_results=False)
    limit, limit_at = job.in_flight or 2 * task_slots(client), time.monotonic()

    def failure(p: Prepared, error: str) -> None:
        summary.failed += 1
        record = {"line": p.line, "id": p.item_id, "stem": p.stem, "seed": p.seed, "error": error}
        failures.write(json.dumps(record) + "\n")
        failures.flush()
        if len(summary.failures) < SUMMARY_FAILURES:
            summary.failures.append(record)

    def tick() -> None:
        if bar is not None:
            bar.set_postfix(done=summary.done, failed=summary.failed, skipped=summary.skipped, refresh=False)
            bar.update(1)

    def finish(future) -> None:
        p = pending.pop(future)
        try:
            res: PromptResult = future.result()
        except ServerStartError as exc:
            raise ClusterError(str(exc)) from None
        except Exception as exc:  # retries used up: KilledWorker (workers kept dying on it), ServerLost, ...
            failure(p, f"{type(exc).__name__}: {exc}")
            tick()
            return
        if on_result is not None:
            on_result(res)
        if res.error is not None:
            failure(p, res.error)
        else:
            summary.done += 1
            summary.images += len(res.files)
            w = summary.workers.setdefault(res.worker, WorkerStats())
            w.images += len(res.files)
            w.prompts += 1
            w.first, w.last = min(w.first, res.queued_at), max(w.last, res.finished_at)
            journal.write(json.dumps({"stem": p.stem, "line": p.line, "id": p.item_id, "seed": p.seed, "hash": p.hash,
                                      "files": list(res.files), "kept": list(res.kept), "worker": res.worker,
                                      "address": res.address, "seconds": round(res.finished_at - res.queued_at, 3)}) + "\n")
            journal.flush()
        tick()

    with open_journal(output / JOURNAL) as journal, open(output / FAILURES, "w", encoding="utf-8") as failures:
        try:
            for pl in iter_prompt_lines(job.prompts):
                p = prepare(pl, job, done, output, seen)
                if p.error is not None:
                    failure(p, p.error)
                    tick()
                    continue
                if p.skip:
                    summary.skipped += 1
                    tick()
                    continue
                task = PromptTask(plugin=plugin, stem=p.stem, line=p.line, api=p.api, output=str(output), timeout=job.timeout)
                future = client.submit(run_prompt, task, key=f"lcm-{p.stem}-{uuid.uuid4().hex[:8]}", pure=False, retries=job.retries)
                pending[future] = p
                ac.add(future)
                if job.in_flight is None and time.monotonic() - limit_at > 30:  # workers may have joined or left
                    limit, limit_at = max(2, 2 * task_slots(client)), time.monotonic()
                while len(pending) >= limit:
                    finish(next(ac))
            for future in ac:
                finish(future)
        except KeyboardInterrupt:
            summary.interrupted = True
            raise
        finally:
            if pending:
                client.cancel(list(pending))
            if bar is not None:
                bar.close()
            summary.wall_s = time.monotonic() - started
            (output / SUMMARY).write_text(json.dumps(summary.to_json(), indent=1), encoding="utf-8")
    return summary


# ------------------------------------------------------------------------------------------ the local cluster


def visible_gpus() -> list[str]:
    """The GPUs this machine offers: CUDA_VISIBLE_DEVICES's entries when it is set, else one per CUDA device torch sees."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    try:
        import torch
    except ImportError:
        return []
    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def local_cluster(workers: int | None, threads_per_worker: int = 2, gpus: list[str] | None = None, silence_logs: int = logging.ERROR):
    """A Dask cluster on this machine: one worker process (with a nanny) per GPU, each pinned by CUDA_VISIBLE_DEVICES;
    without GPUs, ``workers`` CPU workers. Each worker's ComfyUI gets an equal share of the CPU cores.

    workers: None takes every visible GPU (one CPU worker when there is none).
    threads_per_worker: prompts a worker keeps in its ComfyUI at once (2: the next one waits in ComfyUI's queue).
    """
    from distributed import Nanny, Scheduler, SpecCluster

    gpus = visible_gpus() if gpus is None else gpus
    if workers is not None and workers < 1:
        raise ClusterError(f"--workers {workers}: give 1 or more")
    if gpus:
        n = len(gpus) if workers is None else workers
        if n > len(gpus):
            raise ClusterError(f"--workers {n}, but only {len(gpus)} GPU(s) are visible ({','.join(gpus)}): one worker per GPU; "
                               f"give --workers {len(gpus)} or fewer (CUDA_VISIBLE_DEVICES= runs CPU workers instead)")
        names = [(f"gpu{g}", {"CUDA_VISIBLE_DEVICES": g}) for g in gpus[:n]]
    else:
        n = workers or 1
        names = [(f"cpu{i}", {"CUDA_VISIBLE_DEVICES": ""}) for i in range(n)]
    threads = str(max(1, (os.cpu_count() or 1) // len(names)))
    spec = {}
    for name, env in names:
        env = {**env, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        spec[name] = {"cls": Nanny, "options": {"nthreads": threads_per_worker, "env": env, "host": "127.0.0.1", "dashboard": False,
                                                "silence_logs": silence_logs}}
    # any free port for the scheduler's HTTP endpoints (8787 may be another cluster's)
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "port": 0, "dashboard": False, "dashboard_address": "127.0.0.1:0"}}
    return SpecCluster(scheduler=scheduler, workers=spec, silence_logs=silence_logs, name="lcm-nodes")


# ------------------------------------------------------------------------------------------ command line


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    """The scale-out flags of ``python -m lcm_tools run`` (``--workers``, ``--cluster`` and their tuning)."""
    g = parser.add_argument_group("scale-out (with --prompts; Dask distributed)")
    g.add_argument("--workers", type=int, metavar="N",
                   help="run the prompts file on a local Dask cluster of N workers, each with its own ComfyUI: one per GPU "
                        "(default all GPUs), or N CPU workers on a machine without GPUs")
    g.add_argument("--cluster", metavar="ADDRESS",
                   help="join an existing Dask scheduler instead, e.g. tls://10.0.0.5:8786 (plain tcp:// only on 127.0.0.1, "
                        "see --insecure-cluster)")
    g.add_argument("--tls-ca-file", metavar="PEM", help="with --cluster tls://: the CA that signed the cluster's certificates "
                   "(default: Dask's distributed.comm.tls.ca-file)")
    g.add_argument("--tls-cert", metavar="PEM", help="with --cluster tls://: this driver's certificate "
                   "(default: Dask's distributed.comm.tls.client.cert)")
    g.add_argument("--tls-key", metavar="PEM", help="with --cluster tls://: this driver's private key (default: in the --tls-cert "
                   "file, or Dask's distributed.comm.tls.client.key)")
    g.add_argument("--insecure-cluster", action="store_true",
                   help="allow --cluster tcp://HOST on another host: anyone who can reach that port can run code on every "
                        "host of the cluster; only on a network that only you can reach")
    g.add_argument("--retries", type=int, default=2, help="times a prompt is retried when its ComfyUI stops answering (default 2)")
    g.add_argument("--in-flight", type=int, metavar="N", help="prompts submitted at once (default: twice the workers' task slots)")
    g.add_argument("--prompt-timeout", type=float, default=3600.0, metavar="S", help="seconds one prompt may take (default 3600)")
    g.add_argument("--release-servers", action="store_true",
                   help="with --cluster: stop the workers' ComfyUI servers at the end (default: kept warm for the next job)")


def wants_cluster(args: argparse.Namespace) -> bool:
    """Whether ``run`` was asked to scale out (``--workers`` or ``--cluster``)."""
    return getattr(args, "workers", None) is not None or getattr(args, "cluster", None) is not None


def run_cluster(args: argparse.Namespace, comfy_args: list[str] | None = None) -> int:
    """``python -m lcm_tools run ... --workers N | --cluster ADDRESS``; returns the exit code
    (0 all done, 1 some prompts failed or the job could not run, 130 interrupted).

    args: the ``run`` subcommand's arguments (with :func:`add_cluster_arguments`'s); comfy_args: the arguments for
    each worker's ComfyUI (``--comfy-arg`` values and those after ``--``; default ``args.comfy_arg``).
    """
    from .workflows import load_workflow

    try:
        job, spec = _job_from_args(args, load_workflow, list(getattr(args, "comfy_arg", None) or []) if comfy_args is None else comfy_args)
    except (ClusterError, RunnerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        from distributed import Client
    except ImportError:
        print("error: --workers/--cluster need Dask distributed: pip install -r requirements-cluster.txt", file=sys.stderr)
        return 1
    logging.getLogger("distributed").setLevel(logging.ERROR)

    cluster = None
    try:
        if args.cluster:
            security = driver_security(args.cluster, _tls_files(args))
            try:
                client = Client(args.cluster, timeout="60s", security=security)
            except OSError as exc:
                tls = (" (over TLS: the scheduler admits only certificates its CA signed; check --tls-ca-file and --tls-cert)"
                       if security is not None else "")
                raise ClusterError(f"cannot reach a Dask scheduler at {args.cluster} ({exc}){tls}; check the address, or start one "
                                   f"with `PYTHONPATH=/path/to/lcm-nodes dask scheduler` (see README, Scale-out)") from None
        else:
            cluster = local_cluster(args.workers)
            client = Client(cluster)
        with client:
            try:
                summary = run_job(client, job, spec)
            finally:
                if args.cluster and args.release_servers:
                    with contextlib.suppress(ValueError, KeyError):  # never registered (the job stopped before)
                        client.unregister_worker_plugin(spec.plugin_name)
    except KeyboardInterrupt:
        print(f"interrupted; the finished prompts are in {job.output / JOURNAL}: run the same command again to resume",
              file=sys.stderr)
        return 130
    except (ClusterError, RunnerError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if cluster is not None:
            cluster.close()
    print(summary.text(job.output))
    return 1 if summary.failed else 0


def _tls_files(args: argparse.Namespace) -> TLSFiles:
    return TLSFiles(getattr(args, "tls_ca_file", None), getattr(args, "tls_cert", None), getattr(args, "tls_key", None))


def _job_from_args(args: argparse.Namespace, load_workflow, comfy_args: list[str]) -> tuple[Job, ServerSpec]:
    if args.workers is not None and args.cluster is not None:
        raise ClusterError("--workers and --cluster exclude each other: --workers starts a local cluster, --cluster joins one")
    if args.cluster is not None:  # before anything touches the network or the disk
        check_cluster_address(args.cluster, insecure=bool(getattr(args, "insecure_cluster", False)))
    _tls_files(args).check(args.cluster)
    if args.workers is not None and args.workers < 1:
        raise ClusterError(f"--workers {args.workers}: give 1 or more")
    if not args.prompts:
        raise ClusterError("--workers/--cluster run a prompts file: give --prompts FILE (one prompt per line, or JSON lines)")
    if args.retries < 0:
        raise ClusterError(f"--retries {args.retries}: give 0 or more")
    if args.in_flight is not None and args.in_flight < 1:
        raise ClusterError(f"--in-flight {args.in_flight}: give 1 or more")
    if getattr(args, "server", None):
        raise ClusterError("--server runs on one ComfyUI you started; with --workers/--cluster every worker starts its own: drop --server")
    overrides = Overrides(**{k: getattr(args, k, None) for k in Overrides.field_names()})
    job = Job(workflow=load_workflow(args.workflow), prompts=Path(args.prompts), output=Path(args.output), overrides=overrides,
              retries=args.retries, in_flight=args.in_flight, timeout=args.prompt_timeout, quiet=bool(getattr(args, "quiet", False)))
    comfy = getattr(args, "comfyui", None)
    base = getattr(args, "base_dir", None)
    if comfy is None and args.cluster is None:
        from .locate import find_comfyui

        found, why = find_comfyui()
        if found is None:
            raise ClusterError(f"no ComfyUI found to start ({why}); give --comfyui PATH")
        comfy = str(found)
    spec = ServerSpec(comfy_path=str(Path(comfy).expanduser().resolve()) if comfy and args.cluster is None else comfy,
                      base_directory=str(Path(base).expanduser().resolve()) if base and args.cluster is None else base,
                      extra_args=tuple(comfy_args))
    if not job.prompts.is_file():
        raise ClusterError(f"prompts file {job.prompts} " + ("is not a regular file" if job.prompts.exists() else "does not exist")
                           + "; give --prompts FILE with one prompt per line")
    return job, spec
