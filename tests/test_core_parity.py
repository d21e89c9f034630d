"""lcm_core against diffusers as the oracle (no ComfyUI needed). Float32 tolerance for scheduler maths: 1e-5."""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers import LCMScheduler
from diffusers.pipelines.latent_consistency_models.pipeline_latent_consistency_text2img import LatentConsistencyModelPipeline
from oracles import (
    LATENT_SCALE_FACTORS,
    conditioning_to_diffusers,
    diffusers_to_conditioning,
    draw_noise,
    latent_from_diffusers,
    latent_to_diffusers,
)

import lcm_core
from lcm_core import (
    LCMInputError,
    NoiseSchedule,
    boundary_scalings,
    check_custom_timesteps,
    guidance_embedding,
    lcm_step,
    lcm_timesteps,
    parse_timesteps,
    truncate_for_strength,
)

TOL = 1e-5


@pytest.mark.parametrize("original", [50, 20, 100, 1000])
@pytest.mark.parametrize("strength", [1.0, 0.9, 0.75, 0.5, 0.3, 0.1])
def test_timesteps_equal_diffusers_for_every_steps_value(original, strength):
    sched = LCMScheduler()
    for steps in range(1, 51):
        try:
            sched.set_timesteps(steps, original_inference_steps=original, strength=strength)
            ref = sched.timesteps.tolist()
        except ValueError:
            ref = None
        try:
            ours = lcm_timesteps(steps, original, strength)
        except LCMInputError:
            ours = None
        assert ours == ref, (steps, original, strength)


def test_timesteps_known_values():
    assert lcm_timesteps(4) == [999, 759, 499, 259]
    assert lcm_timesteps(4, strength=0.75) == [739, 559, 379, 199]
    assert lcm_timesteps(4, strength=0.3) == [299, 239, 159, 79]


@pytest.mark.parametrize("custom", [[999, 759, 499, 259], [999, 500, 250, 10], [899, 599], [999]])
@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_custom_timesteps_equal_diffusers(custom, strength):
    """As diffusers, or, where diffusers keeps no timestep at all, an error naming the fix (TCD's test checks the same)."""
    sched = LCMScheduler()
    sched.set_timesteps(timesteps=custom, strength=strength)
    ref = sched.timesteps.tolist()
    if not ref:
        with pytest.raises(LCMInputError, match=r"keeps int\(1 x 0.5\) = 0 of the 1 timesteps: raise strength"):
            check_custom_timesteps(custom, strength=strength)
        return
    assert check_custom_timesteps(custom, strength=strength) == ref


@pytest.mark.parametrize("bad,expect", [
    ([259, 499], r"custom timesteps must be strictly descending, but 499 follows 259 in \[259, 499\]: sort them high to low"),
    ([999, 999], r"strictly descending, but 999 follows 999"),
    ([1000, 10], r"custom timesteps \[1000, 10\] leave the range 0\.\.999: every timestep must lie in it"),
    ([5, -1], r"custom timesteps \[5, -1\] leave the range 0\.\.999"),
    ([], r"timesteps is empty: give at least one timestep, e\.g\. '999, 759, 499, 259'"),
])
def test_custom_timesteps_rejected_with_fix(bad, expect):
    with pytest.raises(LCMInputError, match=expect):
        check_custom_timesteps(bad)


def test_custom_timesteps_off_schedule_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="lcm_nodes"):
        check_custom_timesteps([999, 500])
    assert "not on the distillation schedule" in caplog.text


def test_parse_timesteps():
    assert parse_timesteps(" 999, 759;499 259 ") == [999, 759, 499, 259]
    assert parse_timesteps("") is None
    with pytest.raises(LCMInputError, match="'7x'"):
        parse_timesteps("999, 7x")


@pytest.mark.parametrize("text", ["\uff19\uff19\uff19, 759", "999, \u0667\u0665\u0669", "999, 7\u00b2"])
def test_parse_timesteps_rejects_digits_outside_ascii(text):
    """Full-width (U+FF19) and Arabic-Indic digits are read by Python's int(); a timestep must be written 0-9."""
    with pytest.raises(LCMInputError, match="ASCII digits 0-9"):
        parse_timesteps(text)


# Strength meets a float product whose real value is a whole number (0.29 x 100 = 28.999999999999996 in float64):
# diffusers floors that product, and so do we, by the same float64 arithmetic, which is the same on every IEEE CPU.
BOUNDARY_STRENGTHS = [k / 100 for k in range(1, 101)] + [0.07, 0.14, 0.28, 0.57, 0.58, 0.29, 0.3, 0.6, 0.7]


def test_truncation_at_every_strength_boundary_equals_diffusers():
    """'truncate' (StableDiffusionXLImg2ImgPipeline.get_timesteps) for 1-16 steps at every strength k/100."""
    from types import SimpleNamespace

    from diffusers import StableDiffusionXLImg2ImgPipeline

    sched = LCMScheduler()
    for steps in range(1, 17):
        sched.set_timesteps(steps)
        for strength in BOUNDARY_STRENGTHS:
            ref, _ = StableDiffusionXLImg2ImgPipeline.get_timesteps(SimpleNamespace(scheduler=sched), steps, strength, "cpu")
            try:
                ours = truncate_for_strength(lcm_timesteps(steps), strength)
            except LCMInputError:
                ours = []  # diffusers goes on with no step; ours refuses with the fix
            assert ours == ref.tolist(), (steps, strength)


def test_lcm_strength_cut_at_every_strength_boundary_equals_diffusers():
    """'lcm' mode cuts the origin schedule at int(50 x strength) as LCMScheduler.set_timesteps does."""
    sched = LCMScheduler()
    for strength in BOUNDARY_STRENGTHS:
        for steps in (1, 2, 4, 8):
            try:
                sched.set_timesteps(steps, strength=strength)
                ref = sched.timesteps.tolist()
            except ValueError:
                ref = None
            try:
                ours = lcm_timesteps(steps, strength=strength)
            except LCMInputError:
                ours = None
            assert ours == ref, (steps, strength)


@pytest.mark.parametrize("steps,strength", [(4, 0.3), (4, 0.5), (4, 1.0), (8, 0.75), (3, 0.34), (6, 0.99)])
def test_truncate_matches_sdxl_img2img_get_timesteps(steps, strength):
    """'truncate' is StableDiffusionXLImg2ImgPipeline.get_timesteps itself, run on an LCMScheduler's schedule."""
    from types import SimpleNamespace

    from diffusers import StableDiffusionXLImg2ImgPipeline

    sched = LCMScheduler()
    sched.set_timesteps(steps)
    pipe = SimpleNamespace(scheduler=sched, denoising_end=None)
    ref, n = StableDiffusionXLImg2ImgPipeline.get_timesteps(pipe, steps, strength, "cpu")
    ours = truncate_for_strength(lcm_timesteps(steps), strength)
    assert ours == ref.tolist() and len(ours) == n


def test_strength_hints_name_a_value_that_passes():
    """Every 'raise strength to at least S' the schedule errors give is a value on the nodes' 0.01 grid that then
    plans (S printed as 3 significant digits could round down: 29 of 50 needs 0.58, which keeps int(50 x 0.58) = 28)."""
    import re

    for original in (20, 50, 100):
        for steps in range(1, original + 1):
            for strength in (0.01, 0.1, 0.33, 0.5):
                for mode in ("lcm", "truncate"):
                    try:
                        lcm_core.plan_timesteps(steps, original, None, strength, mode)
                    except LCMInputError as e:
                        hint = float(re.search(r"raise strength to at least ([0-9]+(?:\.[0-9]+)?)", str(e)).group(1))
                        assert hint == round(hint, 2) and hint > strength
                        assert lcm_core.plan_timesteps(steps, original, None, hint, mode), (steps, original, strength, mode, hint)


def test_truncate_to_zero_steps_is_an_error():
    with pytest.raises(LCMInputError, match=r"keeps int\(2 x 0.3\) = 0 of the 2 timesteps: raise strength to at least 0.5"):
        truncate_for_strength(lcm_timesteps(2), 0.3)
    with pytest.raises(LCMInputError, match="or use strength_mode 'lcm'"):  # the LCM samplers name their other mode
        lcm_core.SamplingConfig(seed=0, steps=2, strength=0.3, strength_mode="truncate", from_image=True)


def test_alphas_cumprod_equal_diffusers():
    assert torch.equal(NoiseSchedule().alphas_cumprod(), LCMScheduler().alphas_cumprod)


@pytest.mark.parametrize("scaling", [10.0, 1.0, 3.5])
def test_boundary_scalings_equal_diffusers(scaling):
    sched = LCMScheduler(timestep_scaling=scaling)
    for t in [0, 1, 19, 259, 499, 999]:
        ref = sched.get_scalings_for_boundary_condition_discrete(t)
        ours = boundary_scalings(t, scaling)
        assert abs(ours[0] - ref[0]) <= TOL and abs(ours[1] - ref[1]) <= TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_consistency_step_equals_scheduler_step(steps, dtype):
    """lcm_core.step.lcm_step (what the sampler runs) reproduces LCMScheduler.step on random inputs, step by step, in
    float32 (1e-5) and in float16, where diffusers computes the scalars in float32 before they meet the latents:
    our step makes the same operations, so it may differ by a couple of float16 roundings (2e-3 relative)."""
    tol = TOL if dtype == torch.float32 else 2e-3
    sched = LCMScheduler()
    sched.set_timesteps(steps)
    acp = NoiseSchedule().alphas_cumprod()
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=g).to(dtype)
    ts = sched.timesteps.tolist()
    gen = torch.Generator("cpu").manual_seed(99)
    ours_gen = torch.Generator("cpu").manual_seed(99)
    ours = sample.clone()
    ref = sample.clone()
    for i, t in enumerate(ts):
        eps = torch.randn(sample.shape, generator=g).to(dtype)
        ref, ref_denoised = sched.step(eps, t, ref, generator=gen, return_dict=False)  # draws in eps' dtype
        last = i + 1 == len(ts)
        noise = None if last else torch.randn(sample.shape, generator=ours_gen, dtype=dtype)
        out = lcm_step(eps, t, ours, acp[t], 1.0 if last else acp[ts[i + 1]], noise)
        assert out.prev_sample.dtype == ref.dtype
        assert (out.denoised.float() - ref_denoised.float()).abs().max() <= tol * max(1.0, ref_denoised.abs().max().item())
        assert (out.prev_sample.float() - ref.float()).abs().max() <= tol * max(1.0, ref.abs().max().item())
        ours = out.prev_sample


@pytest.mark.parametrize("dim", [256, 255, 64])
@pytest.mark.parametrize("scale", [1.0, 2.0, 8.0, 8.5])
def test_guidance_embedding_equals_diffusers(dim, scale):
    w = torch.tensor([scale - 1.0, scale - 1.0])
    ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
    ours = guidance_embedding(w, dim)
    assert ours.shape == ref.shape == (2, dim)
    assert (ours - ref).abs().max() <= TOL


def test_guided_time_embedding_equals_diffusers_timestep_embedding():
    from diffusers.models.embeddings import TimestepEmbedding

    torch.manual_seed(0)
    ref = TimestepEmbedding(32, 64, cond_proj_dim=16)
    seq = torch.nn.Sequential(ref.linear_1, torch.nn.SiLU(), ref.linear_2)
    ours = lcm_core.GuidedTimeEmbedding(seq, ref.cond_proj)
    t_emb, cond = torch.randn(3, 32), guidance_embedding(torch.tensor([7.0]), 16)
    ours.condition = cond
    assert (ours(t_emb) - ref(t_emb, condition=cond.expand(3, -1))).abs().max() <= TOL
    ours.condition = None
    assert (ours(t_emb) - ref(t_emb)).abs().max() <= TOL


@pytest.mark.parametrize("shape,steps", [((1, 4, 8, 8), 4), ((2, 4, 16, 12), 6), ((1, 4, 8, 8), 1)])
def test_noise_stream_equals_diffusers_generator_draws(shape, steps):
    """Same numbers, in the same order, as randn_tensor with the pipeline's CPU generator."""
    from diffusers.utils.torch_utils import randn_tensor

    gen = torch.Generator("cpu").manual_seed(42)
    ref_initial = randn_tensor(shape, generator=gen, dtype=torch.float32)
    ref_steps = [randn_tensor(shape, generator=gen, dtype=torch.float32) for _ in range(steps - 1)]
    ours = draw_noise(42, shape, steps)
    assert torch.equal(ours.initial, ref_initial)
    assert len(ours.steps) == steps - 1
    for a, b in zip(ours.steps, ref_steps, strict=True):
        assert torch.equal(a, b)


def test_noise_is_independent_of_global_rng():
    torch.manual_seed(1)
    a = draw_noise(5, (1, 4, 8, 8), 3)
    torch.manual_seed(2)
    torch.randn(100)
    b = draw_noise(5, (1, 4, 8, 8), 3)
    assert torch.equal(a.initial, b.initial) and torch.equal(a.steps[1], b.steps[1])


@pytest.mark.parametrize("family,factor", [("sd15", 0.18215), ("sdxl", 0.13025)])
def test_latent_round_trip(family, factor):
    raw = torch.randn(2, 4, 8, 8)
    scaled = latent_to_diffusers(raw, LATENT_SCALE_FACTORS[family])
    assert torch.allclose(scaled, raw * factor)
    assert torch.allclose(latent_from_diffusers(scaled, factor), raw, atol=1e-6)


def test_sd15_conditioning_both_ways():
    emb = torch.randn(2, 77, 768)
    d = conditioning_to_diffusers([[emb, {}]])
    assert d.prompt_embeds is emb and d.pooled_prompt_embeds is None and d.add_time_ids is None
    back = diffusers_to_conditioning(d.prompt_embeds)
    assert back[0][0] is emb and back[0][1] == {}


def test_sdxl_conditioning_both_ways_and_defaults():
    emb, pooled = torch.randn(1, 77, 2048), torch.randn(1, 1280)
    ids = torch.tensor([[1024.0, 768.0, 16.0, 8.0, 1024.0, 768.0]])
    cond = diffusers_to_conditioning(emb, pooled, ids)
    assert cond[0][1]["height"] == 1024 and cond[0][1]["width"] == 768 and cond[0][1]["crop_h"] == 16
    d = conditioning_to_diffusers(cond, (128, 96))
    assert torch.equal(d.add_time_ids, ids) and d.pooled_prompt_embeds is pooled
    # like ComfyUI: without size keys, the latent size x 8
    d2 = conditioning_to_diffusers([[emb, {"pooled_output": pooled}]], (16, 12))
    assert d2.add_time_ids.tolist() == [[128.0, 96.0, 0.0, 0.0, 128.0, 96.0]]


def test_lcm_core_imports_no_comfy_no_diffusers_no_network():
    """lcm_core is torch + safetensors only: importing all of it pulls in no ComfyUI, diffusers or HTTP module,
    nor anything above it (lcm_comfy, lcm_tools)."""
    import subprocess
    import sys

    code = ("import sys, pkgutil, importlib, lcm_core\n"
            "[importlib.import_module('lcm_core.' + m.name) for m in pkgutil.iter_modules(lcm_core.__path__)]\n"
            "bad=[m for m in sys.modules if m.split('.')[0] in ('comfy','nodes','folder_paths','comfy_api','diffusers',"
            "'transformers','urllib3','requests','aiohttp','websocket','lcm_comfy','lcm_tools')]\n"
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=str(__import__('pathlib').Path(lcm_core.__file__).parents[1]), capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
