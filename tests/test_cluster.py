"""Scale-out on Dask distributed (issue #13): a local cluster of 2 CPU workers, each with its own ComfyUI, 20 prompts.

One cluster (and so two ComfyUI servers) serves every test here: the plugin that gives each worker its server
is registered once per configuration and kept, so later jobs, the rerun driver in its own process included, find
the servers warm (the last test, of --release-servers, stops them). The prompts run the bundled SD1.5 LCM-LoRA
workflow on tiny random-weight models at 16x16, one step. Expected output names are written out here, not computed
by the code under test, and pictures are compared with the same prompt run by the in-process ComfyUI.
The start-up checks (no workers, a worker or scheduler without this pack, an output folder a worker cannot see)
run on small clusters of their own that start no ComfyUI.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from comfy_harness import GPU_RUN, REPO, assert_same_picture, find_comfyui, in_process_pixels
from models import random_lora, tiny_sd15_checkpoint, tiny_sd15_unet
from PIL import Image
from safetensors.torch import save_file

pytest.importorskip("distributed")

from lcm_tools.cluster import (  # noqa: E402
    JOURNAL,
    Job,
    PromptLine,
    check_environment,
    ensure_plugin,
    iter_prompt_lines,
    local_cluster,
    open_journal,
    prepare,
    read_journal,
    run_job,
)
from lcm_tools.cluster_spec import ClusterError, ServerSpec  # noqa: E402
from lcm_tools.cluster_watchdog import servers_of, watch  # noqa: E402
from lcm_tools.cluster_worker import can_see, publish  # noqa: E402
from lcm_tools.workflows import API_DIR, Overrides, load_workflow  # noqa: E402

# the same files test_http.py's server uses (built once per session, whichever test gets there first)
CKPT, LORA = "tiny-sd15-ckpt.safetensors", "tiny-sd15-lcm-lora.safetensors"
BAD_LORA = "tiny-cluster-misfit-lora.safetensors"
WORKFLOW = "sd15-lcm-lora-txt2img"
# 16x16 images, one step, one prompt text: ComfyUI re-runs only the sampler, the decode and the save per prompt
# (its cache keeps the text encoding), so a prompt costs a fraction of a second on the CPU.
TINY = Overrides(ckpt=CKPT, lora=LORA, width=16, height=16, steps=1, prompt="a lighthouse at dusk")


def twenty_prompts(path: Path) -> list[str]:
    """20 prompts (10 plain lines, 10 JSON lines with id and seed, a comment and a blank line between) and their
    expected output names: plain lines take their line number and the workflow's seed (0), JSON lines their id and seed.
    The same text everywhere keeps prompts cheap (see TINY); the cluster only cares about the names."""
    lines, names = ["# twenty prompts"], []
    for _ in range(10):
        lines.append("a lighthouse at dusk")
        names.append(f"line{len(lines):06d}_s0_00.png")
    lines.append("")
    for i in range(10):
        lines.append(json.dumps({"id": f"fox-{i}", "prompt": "a lighthouse at dusk", "seed": 100 + i}))
        names.append(f"fox-{i}_s{100 + i}_00.png")
    path.write_text("\n".join(lines) + "\n")
    return sorted(names)


def outputs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix == ".png")


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".part") or p.name.startswith(".lcm-probe"))


def journal_lines(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / JOURNAL).read_text().splitlines()]


def make_job(prompts: Path, output: Path, **kw) -> Job:
    return Job(workflow=load_workflow(WORKFLOW), prompts=prompts, output=output, overrides=TINY, quiet=True, **kw)


def tiny_api(seed: int) -> dict:
    """What a prompt of twenty_prompts() with ``seed`` should run, set field by field (not by the code under test)."""
    api = json.loads((API_DIR / f"{WORKFLOW}.api.json").read_text())
    sampler = next(n for n in api.values() if n["class_type"] == "LCMSampler")
    sampler["inputs"].update(seed=seed, steps=1)
    api[sampler["inputs"]["positive"][0]]["inputs"]["text"] = TINY.prompt
    for node in api.values():
        node["inputs"].update({"CheckpointLoaderSimple": {"ckpt_name": CKPT}, "LCMApplyLoRA": {"lora_name": LORA},
                               "EmptyLatentImage": {"width": 16, "height": 16}}.get(node["class_type"], {}))
    return api


def driver_cmd(address: str, spec: ServerSpec, prompts: Path, out: Path) -> list[str]:
    """`python -m lcm_tools run ... --cluster ADDRESS` with this module's settings (the same server spec)."""
    return [sys.executable, "-m", "lcm_tools", "run", WORKFLOW, "--prompts", str(prompts), "--output", str(out),
            "--cluster", address, "--comfyui", spec.comfy_path, "--base-dir", spec.base_directory,
            "--comfy-arg", "--disable-api-nodes", "--ckpt", CKPT, "--lora", LORA, "--width", "16", "--height", "16", "--steps", "1",
            "--prompt", TINY.prompt]


def scheduler_plugins(client) -> list[str]:
    return client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.worker_plugins))


def server_pids(client, plugin: str) -> dict[str, int]:
    """worker name -> pid of the ComfyUI it talks to."""
    return {name: pid for name, (pid, _) in servers_of_workers(client, plugin).items()}


def servers_of_workers(client, plugin: str) -> dict[str, tuple[int, str]]:
    """worker name -> (pid, URL) of the ComfyUI it talks to."""

    async def server_of(dask_worker):
        server = dask_worker.plugins[plugin].server
        url = await asyncio.to_thread(server.url)  # waits until it is up, off the worker's event loop
        return str(dask_worker.name), (server._running.pid, url)

    return dict(client.run(server_of).values())


# ------------------------------------------------------------------------------------------ no cluster needed


def test_prompt_lines_that_cannot_run_fail_alone_with_the_reason(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text('a cat\n{"prompt": "a dog",\n{"id": "a/b", "prompt": "x"}\n{"colour": "red"}\n'
                       '{"id": "same", "seed": 1}\n{"id": "same", "seed": 1}\n{"width": 60}\n')
    job = make_job(prompts, tmp_path / "out")
    seen: dict[str, int] = {}
    got = [prepare(pl, job, {}, tmp_path, seen) for pl in iter_prompt_lines(prompts)]
    assert [p.line for p in got] == [1, 2, 3, 4, 5, 6, 7]
    assert got[0].error is None and got[0].stem == "line000001_s0" and got[0].api["6"]["inputs"]["text"] == "a cat"
    assert "line 2 is not valid JSON" in got[1].error
    assert "id 'a/b' cannot be part of a file name" in got[2].error
    assert "unknown field(s) ['colour']" in got[3].error
    assert got[4].error is None and got[4].stem == "same_s1"
    assert "'same_s1' is taken by line 5" in got[5].error
    assert "--width 60 is not a multiple of 8" in got[6].error


def test_prepare_skips_done_prompts_and_refuses_a_changed_one(tmp_path):
    job = make_job(tmp_path / "p.txt", tmp_path)
    (tmp_path / "cat_s3_00.png").write_bytes(b"png")
    first = prepare(PromptLine(1, {"id": "cat", "seed": 3}), job, {}, tmp_path, {})
    done = {"cat_s3": {"hash": first.hash, "files": ["cat_s3_00.png"], "line": 1}}
    assert prepare(PromptLine(1, {"id": "cat", "seed": 3}), job, done, tmp_path, {}).skip
    changed = prepare(PromptLine(1, {"id": "cat", "seed": 3, "prompt": "a dog"}), job, done, tmp_path, {})
    assert "already made from a different prompt" in changed.error
    (tmp_path / "cat_s3_00.png").unlink()  # a file deleted since: the prompt runs again
    again = prepare(PromptLine(1, {"id": "cat", "seed": 3}), job, done, tmp_path, {})
    assert not again.skip and again.error is None and again.api is not None


def test_a_torn_journal_line_is_ignored_and_the_next_entry_starts_afresh(tmp_path):
    (tmp_path / JOURNAL).write_text('{"stem": "a", "files": []}\n{"stem": "b", "fi')  # driver killed mid-write
    assert list(read_journal(tmp_path / JOURNAL)) == ["a"]
    with open_journal(tmp_path / JOURNAL) as journal:
        journal.write('{"stem": "c", "files": []}\n')
    assert list(read_journal(tmp_path / JOURNAL)) == ["a", "c"]


def test_a_server_that_does_not_answer_is_told_from_a_bad_prompt():
    """The client's part: no answer at all (here: nothing listens) is ComfyUnreachable, not a plain RunnerError (what
    a rejected prompt raises). That run_prompt turns it into a Dask retry on a new server is
    test_a_comfyui_that_dies_mid_job_is_replaced_and_its_prompts_retried."""
    from lcm_tools.client import ComfyClient, ComfyUnreachable, RunnerError
    from lcm_tools.server import free_port

    with pytest.raises(ComfyUnreachable, match=r"cannot reach ComfyUI at http://127\.0\.0\.1:\d+"):
        ComfyClient(f"http://127.0.0.1:{free_port()}").queue({})
    assert issubclass(ComfyUnreachable, RunnerError)  # callers that only know RunnerError still catch it


def test_publish_keeps_an_image_already_there_and_never_overwrites_it(tmp_path):
    """The exactly-once branch: an earlier attempt (a retry's first try, a driver killed before its journal line)
    published stem_00; this attempt's file for that name is dropped, the other one is published."""
    scratch, out = tmp_path / "scratch", tmp_path / "out"
    scratch.mkdir()
    out.mkdir()
    (out / "cat_s3_00.png").write_bytes(b"earlier attempt")
    before = (out / "cat_s3_00.png").stat()
    sources = [scratch / "a_00001_.png", scratch / "a_00002_.png"]
    for i, src in enumerate(sources):
        src.write_bytes(f"this attempt {i}".encode())
    names, kept = publish(sources, out, "cat_s3")
    assert (names, kept) == (["cat_s3_00.png", "cat_s3_01.png"], ["cat_s3_00.png"])
    assert (out / "cat_s3_00.png").read_bytes() == b"earlier attempt"
    now = (out / "cat_s3_00.png").stat()
    assert (now.st_ino, now.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not replaced, not rewritten
    assert (out / "cat_s3_01.png").read_bytes() == b"this attempt 1"
    assert sorted(p.name for p in out.iterdir()) == ["cat_s3_00.png", "cat_s3_01.png"] and list(scratch.iterdir()) == []


def test_publish_keeps_an_image_already_there_where_hard_links_fail(tmp_path, monkeypatch):
    """Some network and FUSE filesystems have no hard links: the final name is then checked, then renamed into."""
    def no_links(src, dst, *args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    scratch, out = tmp_path / "scratch", tmp_path / "out"
    scratch.mkdir()
    out.mkdir()
    (out / "dog_00.png").write_bytes(b"earlier attempt")
    sources = [scratch / "x.png", scratch / "y.png"]
    for i, src in enumerate(sources):
        src.write_bytes(f"this attempt {i}".encode())
    assert publish(sources, out, "dog") == (["dog_00.png", "dog_01.png"], ["dog_00.png"])
    assert (out / "dog_00.png").read_bytes() == b"earlier attempt" and (out / "dog_01.png").read_bytes() == b"this attempt 1"
    assert sorted(p.name for p in out.iterdir()) == ["dog_00.png", "dog_01.png"]


def test_local_cluster_refuses_bad_worker_counts():
    with pytest.raises(ClusterError, match=r"--workers 0: give 1 or more"):
        local_cluster(0, gpus=[])
    with pytest.raises(ClusterError, match=r"--workers 3, but only 2 GPU\(s\) are visible \(0,1\)"):
        local_cluster(3, gpus=["0", "1"])


def test_watchdog_stops_the_slots_server_when_its_keeper_dies(tmp_path):
    slot = tmp_path / "slot"
    slot.mkdir()
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    keeper = subprocess.Popen(sleeper)
    server = subprocess.Popen([*sleeper, "--temp-directory", str(slot)])  # found by the slot in its command line
    other = subprocess.Popen([*sleeper, "--temp-directory", str(tmp_path / "other-slot")])
    try:
        created = psutil.Process(keeper.pid).create_time()
        time.sleep(0.3)
        assert [p.pid for p in servers_of(slot)] == [server.pid]
        keeper.kill()
        keeper.wait()
        assert watch(keeper.pid, created, slot, poll_s=0.05) is True
        assert server.wait(10) is not None and not slot.exists()
        assert other.poll() is None  # another slot's server is left alone
        slot.mkdir()  # a closed slot (folder removed) ends the watch without touching anything
        closer = threading.Timer(0.2, lambda: slot.rmdir())
        closer.start()
        keeper2 = psutil.Process(other.pid)
        assert watch(keeper2.pid, keeper2.create_time(), slot, poll_s=0.05) is False
        assert other.poll() is None
    finally:
        for p in (keeper, server, other):
            if p.poll() is None:
                p.kill()
            p.wait()


# ------------------------------------------------------------------------------------------ start-up checks (no ComfyUI starts)


@pytest.fixture
def bare_cluster():
    """(cluster, client): a Dask scheduler in this process with no workers (workers are added by the tests)."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=0, processes=False, protocol="tcp://", host="127.0.0.1", scheduler_port=0,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        yield cluster, client


def without_the_pack(*args: str, cwd: Path) -> subprocess.Popen:
    """A Dask command (``dask worker ...`` / ``dask scheduler ...``) in a folder without this pack, not on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.Popen([sys.executable, "-m", *args], cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_a_cluster_without_workers_is_refused(bare_cluster, tmp_path):
    _, client = bare_cluster
    (tmp_path / "p.txt").write_text("a cat\n")
    with pytest.raises(ClusterError, match=r"the cluster has no workers; start some \(e\.g\. `dask worker SCHEDULER"):
        run_job(client, make_job(tmp_path / "p.txt", tmp_path / "out"), ServerSpec())
    assert not (tmp_path / "out" / JOURNAL).exists()


def test_a_worker_that_cannot_import_the_pack_is_refused(bare_cluster, tmp_path):
    cluster, client = bare_cluster
    worker = without_the_pack("distributed.cli.dask_worker", cluster.scheduler_address, "--nthreads", "1", "--no-nanny",
                              "--no-dashboard", "--host", "127.0.0.1", cwd=tmp_path)
    try:
        client.wait_for_workers(1, timeout=120)
        [address] = client.scheduler_info()["workers"]
        (tmp_path / "p.txt").write_text("a cat\n")
        with pytest.raises(ClusterError, match=rf"Dask worker\(s\) {re.escape(address)} cannot import this pack's code \(lcm_tools\); "
                                               r"start it with this folder on PYTHONPATH"):
            run_job(client, make_job(tmp_path / "p.txt", tmp_path / "out"), ServerSpec())
        assert not [p for p in scheduler_plugins(client) if p.startswith("lcm-comfy-")]  # refused before any server
    finally:
        stop(worker)


def test_a_scheduler_that_cannot_import_the_pack_is_refused(tmp_path):
    """Dask's scheduler unpickles every task: with --cluster it needs this pack too (a local cluster's runs here)."""
    from distributed import Client

    info = tmp_path / "scheduler.json"
    scheduler = without_the_pack("distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                                 "--scheduler-file", str(info), cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not info.is_file() and time.monotonic() < deadline:
            time.sleep(0.1)
        with Client(scheduler_file=str(info), timeout="60s") as client:
            with pytest.raises(ClusterError, match=rf"the Dask scheduler {re.escape(client.scheduler.address)} cannot import this "
                                                   r"pack's code \(lcm_tools\)"):
                check_environment(client)
    finally:
        stop(scheduler)


def test_a_worker_that_cannot_see_the_output_folder_is_refused(bare_cluster, tmp_path, monkeypatch):
    """A worker on a host without the shared filesystem. Here the worker is a thread of this process, which sees
    everything, so its answer is that of such a host: the probe file the driver wrote is not there."""
    import lcm_tools.cluster_worker as worker_side

    record = tmp_path / "asked.jsonl"  # a file, not a list: Dask ships the function to the worker as a pickled copy

    def on_another_host(path: str) -> bool:
        with open(record, "a") as f:  # (here the probe is visible: it was written before the question)
            f.write(json.dumps([path, can_see(path)]) + "\n")
        return False

    monkeypatch.setattr(worker_side, "can_see", on_another_host)
    cluster, client = bare_cluster
    cluster.scale(1)
    client.wait_for_workers(1, timeout=60)
    [address] = client.scheduler_info()["workers"]
    out = tmp_path / "out"
    (tmp_path / "p.txt").write_text("a cat\n")
    with pytest.raises(ClusterError, match=rf"worker\(s\) {re.escape(address)} cannot see the output folder {re.escape(str(out))}; "
                                           r"on a cluster of several hosts give an --output on a filesystem every worker mounts"):
        run_job(client, make_job(tmp_path / "p.txt", out), ServerSpec())
    asked = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(asked) == 1 and Path(asked[0][0]).parent == out and asked[0][1] is True
    assert list(out.iterdir()) == []  # the probe is removed, nothing else was written
    assert not [p for p in scheduler_plugins(client) if p.startswith("lcm-comfy-")]
    assert can_see(str(out / "no-such-file")) is False


# ------------------------------------------------------------------------------------------ one local cluster of 2 workers


@pytest.fixture(scope="module")
def tiny_models(comfy, comfy_base):
    models = comfy_base / "models"
    if not (models / "checkpoints" / CKPT).is_file():
        tiny_sd15_checkpoint(models / "checkpoints" / CKPT)
    if not (models / "loras" / LORA).is_file():
        save_file(random_lora(tiny_sd15_unet(time_cond_proj_dim=None, seed=21), "kohya"), str(models / "loras" / LORA))
    # a LoRA whose module names fit no layer: passes ComfyUI's validation, fails when our node runs
    lora = random_lora(tiny_sd15_unet(time_cond_proj_dim=None), "kohya")
    save_file({k.replace("lora_unet_", "lora_unet_zzz_"): v for k, v in lora.items()}, str(models / "loras" / BAD_LORA))
    return comfy_base


@pytest.fixture(scope="module")
def cluster(tiny_models):
    """(client, server spec): a local Dask cluster of 2 CPU workers (the code --workers 2 runs), shared by the tests below."""
    from distributed import Client

    comfy_path, why = find_comfyui()
    assert comfy_path is not None, why
    spec = ServerSpec(comfy_path=str(Path(comfy_path).resolve()), base_directory=str(tiny_models.resolve()),
                      extra_args=("--disable-api-nodes",))
    local = local_cluster(2, gpus=[])
    client = Client(local)
    try:
        ensure_plugin(client, spec)  # the servers boot now, whichever test comes first (as the first job would do)
        yield client, spec
    finally:
        client.close()
        local.close()


def test_every_prompt_is_done_exactly_once(cluster, runner, tmp_path):
    client, spec = cluster
    expected = twenty_prompts(tmp_path / "prompts.txt")
    out = tmp_path / "out"
    held: list[int] = []  # tasks the driver holds whenever a result arrives: the file is streamed, not submitted whole
    summary = run_job(client, make_job(tmp_path / "prompts.txt", out), spec, on_result=lambda r: held.append(len(client.futures)))
    assert (summary.done, summary.failed, summary.skipped, summary.total, summary.images) == (20, 0, 0, 20, 20), summary.text()
    assert 2 <= max(held) <= 8, held  # never more than twice the 4 task slots (2 workers x 2 threads), and in parallel
    assert outputs(out) == expected
    assert leftovers(out) == []
    stems = [e["stem"] for e in journal_lines(out)]
    assert sorted(stems) == sorted(n.removesuffix("_00.png") for n in expected)
    for name in expected:
        img = Image.open(out / name)
        assert img.size == (16, 16) and any(lo != hi for lo, hi in img.getextrema())
    # seeds differ between the fox prompts: so do their pictures (the plain lines share seed 0: the same picture)
    assert len({(out / f"fox-{i}_s{100 + i}_00.png").read_bytes() for i in range(10)}) == 10
    # each picture is the prompt's: a plain line (the workflow's seed 0) and a JSON line (its own seed), as run in-process
    if not GPU_RUN:  # the cluster's ComfyUIs run on the CPU: compared with the in-process one where it runs there too
        assert_same_picture(out / "line000002_s0_00.png", in_process_pixels(runner, tiny_api(0))[0], "plain line")
        assert_same_picture(out / "fox-7_s107_00.png", in_process_pixels(runner, tiny_api(107))[0], "fox-7")
    # both workers took prompts, and the summary gives each one's rate
    assert sorted(summary.workers) == ["cpu0", "cpu1"]
    assert all(w.images > 0 and w.images_per_s > 0 for w in summary.workers.values()), summary.text()
    text = summary.text()
    assert "20 done, 0 failed, 0 skipped" in text and "worker cpu0:" in text and "images/s" in text
    assert json.loads((out / "summary.json").read_text())["done"] == 20


def test_bad_prompts_fail_alone_with_comfyuis_error(cluster, tmp_path):
    """A malformed prompt (ComfyUI rejects it: a LoRA that does not exist) and one that fails while running (a LoRA
    that fits no layer) are recorded with ComfyUI's text; the other prompts are done."""
    client, spec = cluster
    prompts = tmp_path / "prompts.txt"
    lines = [json.dumps({"id": f"ok-{i}", "seed": i}) for i in range(8)]
    lines[3] = json.dumps({"id": "bad", "seed": 3, "lora": "no-such-lora.safetensors"})
    lines[6] = json.dumps({"id": "misfit", "seed": 6, "lora": BAD_LORA})
    prompts.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    summary = run_job(client, make_job(prompts, out), spec)
    assert (summary.done, summary.failed) == (6, 2), summary.text()
    assert outputs(out) == sorted(f"ok-{i}_s{i}_00.png" for i in range(8) if i not in (3, 6))
    bad, misfit = sorted(summary.failures, key=lambda f: f["line"])
    assert (bad["line"], bad["stem"], misfit["line"], misfit["stem"]) == (4, "bad_s3", 7, "misfit_s6")
    assert "Value not in list" in bad["error"] and "no-such-lora.safetensors" in bad["error"]  # ComfyUI's validation text
    assert "LCMLoRAError" in misfit["error"] and "does not fit this SD1.5 model" in misfit["error"]  # the node's error, via ComfyUI
    text = summary.text()
    assert "FAILED line 4 (bad_s3): " in text and "FAILED line 7 (misfit_s6): " in text and "does not fit" in text
    recorded = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert sorted((r["line"], r["stem"]) for r in recorded) == [(4, "bad_s3"), (7, "misfit_s6")]
    assert leftovers(out) == []


def test_an_interrupted_driver_resumes_with_only_the_missing_prompts(cluster, tmp_path):
    """The driver is a real `python -m lcm_tools run ... --cluster ADDRESS` process, stopped with SIGINT (Ctrl-C)."""
    client, spec = cluster
    expected = twenty_prompts(tmp_path / "prompts.txt")
    out = tmp_path / "out"
    warm = server_pids(client, spec.plugin_name)
    cmd = driver_cmd(client.scheduler.address, spec, tmp_path / "prompts.txt", out)
    with open(tmp_path / "first.log", "w") as log:
        # two prompts in flight: slow enough that SIGINT lands mid-job, well before the 20th prompt
        first = subprocess.Popen(cmd + ["--in-flight", "2"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and first.poll() is None:
            if (out / JOURNAL).is_file() and len((out / JOURNAL).read_text().splitlines()) >= 6:
                break
            time.sleep(0.05)
        first.send_signal(signal.SIGINT)
        assert first.wait(60) == 130, (tmp_path / "first.log").read_text()
    assert "interrupted" in (tmp_path / "first.log").read_text()
    journaled = journal_lines(out)
    assert 6 <= len(journaled) < 20
    before = {f: (out / f).stat() for e in journaled for f in e["files"]}
    time.sleep(1.0)  # prompts the workers were still running may land now: they count as not done (not journaled)

    second = subprocess.run(cmd + ["--quiet"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    ran = 20 - len(journaled)
    assert f"{ran} done, 0 failed, {len(journaled)} skipped (already done), of 20 prompts" in second.stdout, second.stdout
    assert outputs(out) == expected and leftovers(out) == []
    stems = [e["stem"] for e in journal_lines(out)]
    assert len(stems) == 20 and len(set(stems)) == 20
    for name, st in before.items():  # what the first run finished was neither redone nor touched
        now = (out / name).stat()
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    assert server_pids(client, spec.plugin_name) == warm  # both drivers used the same warm servers


def test_a_killed_worker_loses_and_duplicates_nothing(cluster, tmp_path):
    """SIGKILL one worker process mid-job: Dask gives its prompt to the other worker, the nanny restarts the worker,
    which adopts the ComfyUI its predecessor left running; every prompt is still written exactly once."""
    client, spec = cluster
    expected = twenty_prompts(tmp_path / "prompts.txt")
    out = tmp_path / "out"
    servers = server_pids(client, spec.plugin_name)
    killed: dict = {}
    seen: list = []

    def kill_one_mid_prompt(result):
        seen.append(result)
        if killed or len(seen) < 4:
            return
        processing = {addr: keys for addr, keys in client.processing().items() if keys}
        if not processing:  # between prompts: try again at the next result
            return
        addr = sorted(processing)[0]
        info = client.run(lambda dask_worker: (os.getpid(), str(dask_worker.name)), workers=[addr])[addr]
        killed.update(address=addr, pid=info[0], name=info[1], keys=list(processing[addr]))
        os.kill(info[0], signal.SIGKILL)

    summary = run_job(client, make_job(tmp_path / "prompts.txt", out), spec, on_result=kill_one_mid_prompt)
    assert killed, "the job ended before a worker could be killed"
    assert (summary.done, summary.failed, summary.skipped) == (20, 0, 0), summary.text()
    assert outputs(out) == expected and leftovers(out) == []
    entries = journal_lines(out)
    assert sorted(e["stem"] for e in entries) == sorted(n.removesuffix("_00.png") for n in expected)
    # the prompts the dead worker was running were redone by a live worker process
    in_flight = {k.rsplit("-", 1)[0].removeprefix("lcm-") for k in killed["keys"]}
    assert in_flight and all(e["address"] != killed["address"] for e in entries if e["stem"] in in_flight)
    # the nanny restarted the worker, and the new worker took over the same ComfyUI (no second server, no orphan)
    client.wait_for_workers(2, timeout=60)
    assert server_pids(client, spec.plugin_name) == servers


def test_a_comfyui_that_dies_mid_job_is_replaced_and_its_prompts_retried(cluster, tmp_path):
    """SIGKILL a worker's ComfyUI while it runs a prompt: the prompt raises ServerLost, Dask retries it, the worker
    starts a new ComfyUI in its place; every prompt is still written exactly once and none fails."""
    from lcm_tools.client import ComfyClient

    client, spec = cluster
    expected = twenty_prompts(tmp_path / "prompts.txt")
    out = tmp_path / "out"
    servers = servers_of_workers(client, spec.plugin_name)
    killed: dict = {}
    seen: list = []

    def kill_a_server_mid_prompt(result):
        seen.append(result)
        if killed or len(seen) < 4:
            return
        for name, (pid, url) in sorted(servers.items()):
            running = ComfyClient(url).request("/queue")["queue_running"]
            if running:  # a prompt is being run there right now: kill its server under it
                killed.update(name=name, pid=pid, created=psutil.Process(pid).create_time(), prompt=running[0][1])
                os.kill(pid, signal.SIGKILL)
                return

    summary = run_job(client, make_job(tmp_path / "prompts.txt", out), spec, on_result=kill_a_server_mid_prompt)
    assert killed, "the job ended before a ComfyUI could be killed mid-prompt"
    # the prompt it was running (and any queued behind it) raised ServerLost and was retried: nothing failed
    assert (summary.done, summary.failed, summary.skipped) == (20, 0, 0), summary.text()
    assert outputs(out) == expected and leftovers(out) == []
    stems = [e["stem"] for e in journal_lines(out)]
    assert sorted(stems) == sorted(n.removesuffix("_00.png") for n in expected)
    # that worker now talks to a new ComfyUI; the other worker kept its own
    now = server_pids(client, spec.plugin_name)
    assert now[killed["name"]] != killed["pid"], "the dead ComfyUI was not replaced"
    assert {n: p for n, p in now.items() if n != killed["name"]} == {n: p for n, (p, _) in servers.items() if n != killed["name"]}
    try:
        gone = psutil.Process(killed["pid"]).create_time() != killed["created"]
    except psutil.NoSuchProcess:
        gone = True
    assert gone, "the killed ComfyUI is still there"


def test_a_rerun_keeps_an_image_an_earlier_attempt_published(cluster, tmp_path):
    """publish()'s exactly-once branch in a real job: the first prompt's image is already in the folder (its attempt
    published it, then the driver died before the journal line): the new attempt leaves it as it was and says so."""
    client, spec = cluster
    prompts, out = tmp_path / "prompts.txt", tmp_path / "out"
    prompts.write_text(json.dumps({"id": "kept", "seed": 1}) + "\n" + json.dumps({"id": "new", "seed": 2}) + "\n")
    out.mkdir()
    (out / "kept_s1_00.png").write_bytes(b"an earlier attempt's image")
    before = (out / "kept_s1_00.png").stat()
    summary = run_job(client, make_job(prompts, out), spec)
    assert (summary.done, summary.failed) == (2, 0), summary.text()
    now = (out / "kept_s1_00.png").stat()
    assert (out / "kept_s1_00.png").read_bytes() == b"an earlier attempt's image"
    assert (now.st_ino, now.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    entries = {e["stem"]: e for e in journal_lines(out)}
    assert (entries["kept_s1"]["files"], entries["kept_s1"]["kept"]) == (["kept_s1_00.png"], ["kept_s1_00.png"])
    assert (entries["new_s2"]["files"], entries["new_s2"]["kept"]) == (["new_s2_00.png"], [])
    assert outputs(out) == ["kept_s1_00.png", "new_s2_00.png"] and leftovers(out) == []


def test_release_servers_stops_the_workers_comfyui_at_the_end(cluster, tmp_path):
    """`--cluster ADDRESS --release-servers`: the job runs on the warm servers, then stops them and their slots.
    Runs last in this module: it stops the servers the tests above share."""
    client, spec = cluster
    warm = server_pids(client, spec.plugin_name)
    created = {name: psutil.Process(pid).create_time() for name, pid in warm.items()}
    slots = client.run(lambda dask_worker: str(dask_worker.plugins[spec.plugin_name].server.slot))
    prompts, out = tmp_path / "prompts.txt", tmp_path / "out"
    prompts.write_text("a lighthouse at dusk\n" + json.dumps({"id": "two", "seed": 2}) + "\n")
    r = subprocess.run(driver_cmd(client.scheduler.address, spec, prompts, out) + ["--quiet", "--release-servers"], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 done, 0 failed, 0 skipped (already done), of 2 prompts" in r.stdout, r.stdout
    assert outputs(out) == ["line000001_s0_00.png", "two_s2_00.png"]
    entries = journal_lines(out)
    assert {e["worker"] for e in entries} <= set(warm)  # the warm servers did the work...
    assert spec.plugin_name not in scheduler_plugins(client)  # ...and were released: no new worker gets one either
    assert all(spec.plugin_name not in names for names in client.run(lambda dask_worker: list(dask_worker.plugins)).values())
    for name, pid in warm.items():
        try:
            proc = psutil.Process(pid)
            assert proc.create_time() != created[name] or proc.status() == psutil.STATUS_ZOMBIE, f"{name}'s ComfyUI still runs"
        except psutil.NoSuchProcess:
            pass
    assert not [s for s in slots.values() if Path(s).exists()]
