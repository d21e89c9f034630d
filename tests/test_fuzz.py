"""Fuzzing (hypothesis): random values and random bytes-as-files give a result or one of the pack's errors.

Never a hang, a process crash, or a bare traceback from deep inside torch.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lcm_core
from lcm_core import LCMError

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
anything = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=True, allow_infinity=True),
                     st.text(max_size=20))


@FAST
@given(steps=anything, original=anything, strength=anything)
def test_lcm_timesteps_never_fails_badly(steps, original, strength):
    try:
        ts = lcm_core.lcm_timesteps(steps, original, strength)
    except LCMError:
        return
    assert 1 <= len(ts) <= 50 and ts == sorted(ts, reverse=True) and all(0 <= t < 1000 for t in ts)


@FAST
@given(ts=st.lists(st.integers(-2000, 2000), max_size=60), strength=st.one_of(st.floats(-1, 2), st.just(float("nan"))))
def test_custom_timesteps_never_fail_badly(ts, strength):
    try:
        out = lcm_core.check_custom_timesteps(ts, strength=strength)
    except LCMError:
        return
    assert out == sorted(out, reverse=True) and len(out) <= len(ts)


@FAST
@given(text=st.text(max_size=80))
def test_parse_timesteps_never_fails_badly(text):
    try:
        out = lcm_core.parse_timesteps(text)
    except LCMError:
        return
    assert out is None or all(isinstance(t, int) for t in out)


@FAST
@given(seed=anything, steps=st.integers(0, 6))
def test_noise_never_fails_badly(seed, steps):
    try:
        noise = lcm_core.SeededNoise(seed, (1, 4, 2, 2))
    except LCMError:
        return
    draws = [noise.draw() for _ in range(steps)]
    assert all(d.shape == (1, 4, 2, 2) and torch.isfinite(d).all() for d in draws)


@FAST
@given(strength=anything)
def test_check_strength(strength):
    try:
        v = lcm_core.check_strength(strength)
    except LCMError:
        return
    assert 0 < v <= 1 and not math.isnan(v)


@FAST
@given(keys=st.dictionaries(st.text(max_size=40), st.integers(1, 3), max_size=20))
def test_lora_grouping_never_fails_badly(keys):
    sd = {k: torch.zeros(v, 2) for k, v in keys.items()}
    try:
        groups = lcm_core.group_lora_modules(sd)
    except LCMError:
        return
    assert groups.unet or groups.text_encoder


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=4096))
def test_random_bytes_as_model_file(pack, tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "random.safetensors"
    path.write_bytes(data)
    loading = pack.comfy.loading
    for load in (lambda: loading.load_lcm_unet(str(path)), lambda: loading.load_safetensors(str(path), "LoRA")):
        try:
            load()
        except pack.core.LCMError as exc:
            assert "random.safetensors" in str(exc)


@pytest.fixture(scope="module")
def tiny_model(pack):
    from models import tiny_sd15_unet

    return pack.comfy.loading.load_lcm_unet_state_dict(dict(tiny_sd15_unet(256, seed=9).state_dict()), "fuzz", "fp32")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.integers(-2, 60), guidance=st.floats(allow_nan=True, allow_infinity=True), strength=st.one_of(st.floats(-1, 2), st.just(float("nan"))),
       timesteps=st.text(alphabet="0123456789, -x", max_size=15), seed=st.integers(-5, 2**64 + 5),
       fill=st.sampled_from([0.0, 1.0, float("nan"), float("inf")]), mode=st.sampled_from(["lcm", "truncate", "bogus"]))
def test_sampler_inputs_fuzz(pack, tiny_model, steps, guidance, strength, timesteps, seed, fill, mode):
    pos = [[torch.zeros(1, 77, 768), {}]]
    latent = {"samples": torch.full((1, 4, 4, 4), fill)}
    core = pack.core
    try:  # as LCM Img2Img builds it: the config checks the values, the sampler the tensors
        config = core.SamplingConfig(seed=seed, steps=steps, guidance_scale=guidance, timesteps=core.parse_timesteps(timesteps),
                                     strength=strength, strength_mode=mode, from_image=True, progress=False)
        out, _ = pack.comfy.sampler.sample(tiny_model, pos, None, latent, config)
    except core.LCMError:
        return
    assert out["samples"].shape == (1, 4, 4, 4) and torch.isfinite(out["samples"]).all()


def test_import_has_no_side_effects(tmp_path):
    """Loading the pack opens no socket, writes no file and imports no model code."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = f"""
import socket, sys, importlib.util, os
def no_net(*a, **k): raise AssertionError('network access at import')
socket.socket.connect = no_net
socket.create_connection = no_net
before = set(os.listdir('.'))
spec = importlib.util.spec_from_file_location('lcm_nodes_pkg', {os.path.join(repo, '__init__.py')!r}, submodule_search_locations=[{repo!r}])
m = importlib.util.module_from_spec(spec); sys.modules['lcm_nodes_pkg'] = m; spec.loader.exec_module(m)
assert callable(m.comfy_entrypoint)
assert set(os.listdir('.')) == before
heavy = [x for x in ('torch', 'diffusers', 'comfy', 'folder_paths') if x in sys.modules]
print(heavy)
assert not heavy, heavy
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_model_names_outside_model_folders_are_refused(pack):
    for bad in ("../x.safetensors", "/abs/x.safetensors", "a/../../x.safetensors", "..\\x.safetensors", ""):
        with pytest.raises(pack.core.LCMInputError) as e:
            pack.comfy.loading.safe_name(bad, "unet_name")
        assert "leaves ComfyUI's model folders" in str(e.value) or "unet_name is empty" in str(e.value)
    for bad in ("../x.safetensors", "/etc/passwd"):  # what the nodes call, for both file inputs
        with pytest.raises(pack.core.LCMInputError, match="leaves ComfyUI's model folders"):
            pack.comfy.loading.resolve_unet(bad)
        with pytest.raises(pack.core.LCMInputError, match="lora_name .* leaves ComfyUI's model folders"):
            pack.comfy.loading.resolve_lora(bad)


@FAST
@given(value=anything)
def test_default_guidance_check(pack, value):
    try:
        v = pack.comfy.loading.check_default_guidance(value)
    except pack.core.LCMInputError as exc:
        assert str(exc).startswith(f"default_guidance={value!r} is out of range")
        return
    assert isinstance(v, float) and math.isfinite(v) and 0.0 <= v <= 100.0


@FAST
@given(shape=st.tuples(st.integers(1, 10**5), st.integers(1, 16), st.integers(1, 10**5), st.integers(1, 10**5)))
def test_latent_size_check(pack, shape):
    checks = pack.comfy.checks
    try:
        checks.check_latent_size(shape)
    except pack.core.LCMInputError as exc:
        msg = str(exc)
        assert msg.startswith("latent_image ") and (f"at most {checks.MAX_LATENT_BATCH} " in msg or f"at most {checks.MAX_LATENT_PIXELS:,} " in msg)
        assert shape[0] > checks.MAX_LATENT_BATCH or shape[0] * shape[2] * shape[3] > checks.MAX_LATENT_PIXELS
        return
    assert shape[0] <= checks.MAX_LATENT_BATCH and shape[0] * shape[2] * shape[3] <= checks.MAX_LATENT_PIXELS
