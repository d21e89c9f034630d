"""`python -m lcm_tools convert`: pickled weights to .safetensors, tensors only, never code (issue #6 item 1)."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lcm_core.errors import LCMModelError
from lcm_core.weights import convert_to_safetensors

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lcm_tools", "convert", *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_a_checkpoint_converts_to_equal_tensors(tmp_path):
    w = torch.randn(4, 3)
    sd = {"state_dict": {"a.weight": w, "a.view": w[:2], "b.bias": torch.arange(5, dtype=torch.float16), "step": 7}, "epoch": 3}
    src = tmp_path / "model.ckpt"
    torch.save(sd, src)
    r = cli(str(src))
    assert r.returncode == 0, r.stderr
    assert "3 tensors" in r.stdout and "1 non-tensor entries left out" in r.stdout
    out = load_file(str(tmp_path / "model.safetensors"))
    assert set(out) == {"a.weight", "a.view", "b.bias"}
    assert torch.equal(out["a.weight"], w) and torch.equal(out["a.view"], w[:2]) and out["b.bias"].dtype == torch.float16


def test_code_in_a_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    src = tmp_path / "evil.pt"
    src.write_bytes(pickle.dumps({"w": Evil()}))
    r = cli(str(src))
    assert r.returncode == 1
    assert "evil.pt" in r.stderr and "was refused" in r.stderr and "Traceback" not in r.stderr
    assert not marker.exists() and not (tmp_path / "evil.safetensors").exists()
    pickle.loads(src.read_bytes())  # the file is live: an unrestricted unpickle runs its code
    assert marker.exists()


def test_convert_never_overwrites_and_names_what_is_wrong(tmp_path):
    src = tmp_path / "m.bin"
    torch.save({"x": torch.ones(2)}, src)
    (tmp_path / "m.safetensors").write_bytes(b"keep me")
    with pytest.raises(LCMModelError, match="already exists"):
        convert_to_safetensors(src)
    assert (tmp_path / "m.safetensors").read_bytes() == b"keep me"
    with pytest.raises(LCMModelError, match="not a pickled weights file"):
        convert_to_safetensors(tmp_path / "m.safetensors")
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(LCMModelError, match="'list.pt' holds a list, not a dict of named tensors"):
        convert_to_safetensors(tmp_path / "list.pt")
    (tmp_path / "broken.ckpt").write_bytes(b"\x80\x04garbage")
    with pytest.raises(LCMModelError, match="broken.ckpt"):
        convert_to_safetensors(tmp_path / "broken.ckpt")
