"""The tools as a newcomer meets them before any image is made (issue #11 items 1, 2, 5, 6, 7): help, names,
the missing-files list and its exit code, refused values, file numbering, the set-up stamp. No server starts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from comfy_harness import REPO

from lcm_tools.cli import split_comfy_args
from lcm_tools.client import RunnerError
from lcm_tools.releases import RELEASES
from lcm_tools.run import save_new
from lcm_tools.workflows import API_DIR, bundled_names, load_workflow, model_files, resolve_workflow

VENV = Path(sys.prefix)
# The README's exit codes ("Exit codes: 0 image written, 1 error, 2 bad arguments, 3 files missing"), written out here:
# a test that took them from the code under test would pass whatever number the code used.
EXIT_ERROR, EXIT_BAD_ARGUMENTS, EXIT_MISSING = 1, 2, 3


def env_for(tmp_path: Path, **extra) -> dict:
    from comfy_harness import find_comfyui

    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), LCM_VENV=str(VENV))
    env.update(extra)
    env.pop("LCM_QUICKSTART_DIR", None)
    path, _ = find_comfyui()
    if path is not None:
        env["COMFYUI_PATH"] = str(path)
    return env


def quickstart(tmp_path: Path, *args: str, cwd: Path | None = None, **env) -> subprocess.CompletedProcess:
    """The documented command, from a folder of the caller's."""
    cwd = cwd or tmp_path
    return subprocess.run(["bash", str(REPO / "scripts" / "quickstart"), *args], cwd=cwd, env=env_for(tmp_path, **env),
                          capture_output=True, text=True, timeout=600)


def test_help_lists_workflows_and_defaults_without_setting_anything_up(tmp_path):
    start = time.monotonic()
    r = quickstart(tmp_path, "--help")
    took = time.monotonic() - start
    assert r.returncode == 0, r.stderr
    for name in bundled_names():
        assert name in r.stdout
        for _, fname in model_files(load_workflow(name)):
            assert fname in r.stdout
    assert "(default: sd15-lcm-lora-txt2img)" in r.stdout and "(default: lcm-output)" in r.stdout
    assert "exit codes: 0 image written (real or smoke test), 1 error, 2 bad arguments, 3 model files missing" in r.stdout
    assert "installing" not in r.stdout + r.stderr and took < 15, took


@pytest.mark.parametrize("form", ["{name}", "{name}.api.json", "workflows/{name}.api.json", "workflows/api/{name}.api.json"])
def test_every_way_of_naming_a_bundled_workflow_works(form):
    name = "sdxl-lcm-lora-img2img"
    assert resolve_workflow(form.format(name=name), REPO) == API_DIR / f"{name}.api.json"


def test_a_wrong_workflow_name_lists_the_valid_ones(tmp_path):
    r = quickstart(tmp_path, "--workflow", "sdxl-lcm-lora")
    assert r.returncode == 1
    assert "no workflow 'sdxl-lcm-lora'" in r.stderr
    for name in bundled_names():
        assert name in r.stderr


def test_missing_files_are_listed_with_folder_source_and_local_name_and_exit_3(tmp_path):
    """Some files there, some not: nothing runs; the list names the full folder, the Hub repo, the file there and
    the local name. The same list comes when none is there (see test_quickstart), so it depends on no file existing."""
    base = tmp_path / "cache" / "lcm-nodes" / "quickstart"
    (base / "models" / "checkpoints").mkdir(parents=True)
    (base / "models" / "checkpoints" / "sd_xl_base_1.0.safetensors").write_bytes(b"x")
    r = quickstart(tmp_path, "--workflow", "lcm-sdxl-unet-txt2img")
    assert r.returncode == EXIT_MISSING, r.stderr
    lora = RELEASES["lcm-sdxl.safetensors"]
    assert f"{base / 'models' / 'diffusion_models'}/\n      lcm-sdxl.safetensors" in r.stderr
    assert f"https://huggingface.co/{lora.repo}  file {lora.file}, saved as lcm-sdxl.safetensors" in r.stderr
    assert lora.size in r.stderr
    assert "sd_xl_base_1.0" not in r.stderr.split("missing")[1]  # present: not listed
    assert "SMOKE TEST" not in r.stderr
    assert "installing" not in r.stdout, "the set-up ran again although nothing changed"


def test_check_lists_every_file_with_its_state(tmp_path):
    r = quickstart(tmp_path, "--check", "--workflow", "sdxl-lcm-lora-img2img")
    assert r.returncode == EXIT_MISSING
    base = tmp_path / "cache" / "lcm-nodes" / "quickstart"
    assert f"missing {base / 'models' / 'checkpoints' / 'sd_xl_base_1.0.safetensors'}" in r.stdout
    assert f"missing {base / 'models' / 'loras' / 'lcm-lora-sdxl.safetensors'}" in r.stdout
    assert f"ok      {base / 'input' / 'lcm-input.png'}" in r.stdout  # the quickstart's own folder gets a placeholder


@pytest.mark.parametrize(("args", "message"), [
    (["--width", "100"], "--width 100 is not a multiple of 8"),
    (["--workflow", "sd15-lcm-lora-txt2img", "--image", "x.png"], "no LoadImage node"),
])
def test_bad_values_are_refused_before_anything_starts(tmp_path, args, message):
    r = quickstart(tmp_path, *args)
    assert r.returncode == EXIT_ERROR and message in r.stderr, r.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--seed", "seven"], "argument --seed: invalid int value: 'seven'"),
    (["--no-such-option"], "unrecognized arguments: --no-such-option"),
])
def test_bad_arguments_exit_2_with_the_usage(tmp_path, args, message):
    r = quickstart(tmp_path, *args)
    assert r.returncode == EXIT_BAD_ARGUMENTS and message in r.stderr and "usage:" in r.stderr, (r.returncode, r.stderr)
    assert not (tmp_path / "cache" / "lcm-nodes" / "quickstart").exists()  # refused before any folder was made


def test_comfyui_arguments_may_start_with_dashes():
    ours, comfy = split_comfy_args(["run", "wf", "--comfy-arg", "--highvram", "--seed", "3", "--", "--preview-method", "auto"])
    assert ours == ["run", "wf", "--comfy-arg=--highvram", "--seed", "3"] and comfy == ["--preview-method", "auto"]
    r = subprocess.run([sys.executable, "-m", "lcm_tools", "run", "sd15-lcm-lora-txt2img", "--server", "http://127.0.0.1:9",
                        "--", "--highvram"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "with --server they do nothing" in r.stderr


def test_images_are_numbered_and_never_overwritten(tmp_path):
    first = save_new(tmp_path, "wf", b"one")
    second = save_new(tmp_path, "wf", b"two")
    first.unlink()
    third = save_new(tmp_path, "wf", b"three")  # numbers are not reused either
    assert [first.name, second.name, third.name] == ["wf_00000.png", "wf_00001.png", "wf_00002.png"]
    assert second.read_bytes() == b"two" and sorted(p.name for p in tmp_path.iterdir()) == ["wf_00001.png", "wf_00002.png"]


def test_runner_errors_name_the_value_and_the_fix():
    with pytest.raises(RunnerError, match="neither a file nor a bundled workflow.*sd15-lcm-lora-txt2img"):
        resolve_workflow("nope")
    from lcm_tools.client import ComfyClient

    with pytest.raises(RunnerError, match="'127.0.0.1:8188' is not an http"):
        ComfyClient("127.0.0.1:8188")


def test_setup_installs_nothing_when_nothing_changed(tmp_path):
    """The stamp: a second set-up starts no pip, and any change to the requirements changes the stamp."""
    env = env_for(tmp_path)
    subprocess.run(["bash", "scripts/setup", "runtime"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=True)
    start = time.monotonic()
    r = subprocess.run(["bash", "scripts/setup", "runtime"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "up to date" in r.stdout and "installing" not in r.stdout, r.stdout + r.stderr
    assert time.monotonic() - start < 15
    copy = tmp_path / "repo"
    for part in ("scripts", "lcm_tools"):
        shutil.copytree(REPO / part, copy / part)
    for req in REPO.glob("requirements*.txt"):
        shutil.copy(req, copy / req.name)
    stamp = [subprocess.run(["bash", "scripts/setup", "--stamp", mode], cwd=copy, env=env, capture_output=True,
                                               text=True, check=True).stdout for mode in ("runtime", "test")]
    assert stamp[0] != stamp[1]
    with open(copy / "requirements-test.txt", "a") as f:
        f.write("pytest-timeout\n")
    after = subprocess.run(["bash", "scripts/setup", "--stamp", "test"], cwd=copy, env=env, capture_output=True, text=True, check=True).stdout
    runtime_after = subprocess.run(["bash", "scripts/setup", "--stamp", "runtime"], cwd=copy, env=env, capture_output=True, text=True,
                                   check=True).stdout
    assert after != stamp[1] and runtime_after == stamp[0]  # a test tool does not touch the runtime stamp


def recording_venv(folder: Path) -> tuple[Path, Path]:
    """(venv, log): a venv whose python records every ``python -m pip ...`` it is asked for (and does nothing else
    for it), says yes to the set-up's torch check (importing torch twice would double this test's time), and hands
    everything else to this test's Python, so the set-up's decisions show without installing."""
    log = folder / "pip-calls.txt"
    python = folder / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/usr/bin/env bash\nif [ "$1" = -m ] && [ "$2" = pip ]; then echo "$*" >> "{log}"; exit 0; fi\n'
                      'if [ "$1" = -c ] && [ "$2" = "import torch, torchvision" ]; then exit 0; fi\n'
                      f'exec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    return python.parent.parent, log


def test_force_setup_installs_although_the_stamp_is_up_to_date(tmp_path):
    """README: a stamp in the venv makes the next quickstart start no pip; LCM_FORCE_SETUP=1 installs anyway."""
    venv, log = recording_venv(tmp_path)
    env = env_for(tmp_path, LCM_VENV=str(venv))
    stamp = subprocess.run(["bash", "scripts/setup", "--stamp", "runtime"], cwd=REPO, env=env, capture_output=True, text=True,
                           check=True).stdout.strip()
    (venv / ".lcm-setup-runtime").write_text(stamp + "\n")  # as a finished set-up leaves it
    r = quickstart(tmp_path, "--check", LCM_VENV=str(venv))
    assert r.returncode == EXIT_MISSING, r.stderr
    assert "up to date" in r.stdout and "installing" not in r.stdout and not log.exists(), r.stdout
    r = quickstart(tmp_path, "--check", LCM_VENV=str(venv), LCM_FORCE_SETUP="1")
    assert r.returncode == EXIT_MISSING, r.stderr
    assert "installing" in r.stdout and "up to date" not in r.stdout, r.stdout
    calls = log.read_text().splitlines()
    assert any("install" in c and "-r requirements.txt" in c for c in calls), calls  # the pack's requirements
    assert any("install" in c and "requests" in c for c in calls), calls  # ComfyUI's requirements
    assert (venv / ".lcm-setup-runtime").read_text().strip() == stamp


def test_local_comfy_refuses_what_it_cannot_start(tmp_path):
    from lcm_tools.server import LocalComfy

    with pytest.raises(RunnerError, match=f"{tmp_path} is not a ComfyUI folder"):
        LocalComfy(tmp_path)
    (tmp_path / "main.py").write_text("")
    with pytest.raises(RunnerError, match="extra_args must be a list"):
        LocalComfy(tmp_path, extra_args="--highvram")
