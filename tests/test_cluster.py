"""Scale-out on Dask distributed (issue #13): a local cluster of 2 CPU workers, each with its own ComfyUI, 20 prompts.

One cluster (and so two ComfyUI servers) serves every test here: the plugin that gives each worker its server
is registered once per configuration and kept, so later jobs, the rerun driver in its own process included, find
the servers warm. The prompts run the bundled SD1.5 LCM-LoRA workflow on tiny random-weight models at 64x64,
one step. Expected output names are written out here, not computed by the code under test.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from comfy_harness import REPO, find_comfyui
from models import random_lora, tiny_sd15_checkpoint, tiny_sd15_unet
from PIL import Image
from safetensors.torch import save_file

pytest.importorskip("distributed")

from lcm_tools.cluster import (  # noqa: E402
    JOURNAL,
    Job,
    PromptLine,
    iter_prompt_lines,
    local_cluster,
    open_journal,
    prepare,
    read_journal,
    run_job,
)
from lcm_tools.cluster_spec import ClusterError, ServerSpec  # noqa: E402
from lcm_tools.cluster_watchdog import servers_of, watch  # noqa: E402
from lcm_tools.workflows import Overrides, load_workflow  # noqa: E402

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


def server_pids(client, plugin: str) -> dict[str, int]:
    """worker name -> pid of the ComfyUI it talks to."""

    async def pid(dask_worker):
        server = dask_worker.plugins[plugin].server
        await asyncio.to_thread(server.url)  # waits until it is up, off the worker's event loop
        return str(dask_worker.name), server._running.pid

    return dict(client.run(pid).values())


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
    """No answer (here: nothing listens) means ServerLost and a Dask retry, never the prompt's recorded failure."""
    from lcm_tools.client import ComfyClient, ComfyUnreachable, RunnerError
    from lcm_tools.server import free_port

    with pytest.raises(RunnerError) as info:
        ComfyClient(f"http://127.0.0.1:{free_port()}").queue({})
    assert isinstance(info.value, ComfyUnreachable)  # what run_prompt turns into ServerLost (a Dask retry)


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
        yield client, spec
    finally:
        client.close()
        local.close()


def test_every_prompt_is_done_exactly_once(cluster, tmp_path):
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
    assert "LCMLoRAError" in misfit["error"] and "does not fit this SD15 model" in misfit["error"]  # the node's error, via ComfyUI
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
    cmd = [sys.executable, "-m", "lcm_tools", "run", WORKFLOW, "--prompts", str(tmp_path / "prompts.txt"), "--output", str(out),
           "--cluster", client.scheduler.address, "--comfyui", spec.comfy_path, "--base-dir", spec.base_directory,
           "--comfy-arg", "--disable-api-nodes", "--ckpt", CKPT, "--lora", LORA, "--width", "16", "--height", "16", "--steps", "1",
           "--prompt", TINY.prompt]
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
