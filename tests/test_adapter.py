"""The ComfyUI adapter's own contracts, in a real in-process ComfyUI: the step production runs equals
LCMScheduler.step at every step, setup_lcm is idempotent along any chain of our nodes, KSampler on our MODEL
visits LCM's timesteps (and the sigma -> timestep rule decides ties the same way on every device), and
concurrent runs on one MODEL do not interfere."""

from __future__ import annotations

import importlib
import threading
from types import SimpleNamespace

import pytest
import torch
from models import random_lora, save_unet, tiny_sd15_unet
from safetensors.torch import save_file

TOL = 1e-5


def _fake_eps(x_t: torch.Tensor, t: float) -> torch.Tensor:
    """A closed-form stand-in for a UNet: smooth in x_t and t, so every step's inputs matter."""
    return 0.4 * x_t + 0.2 * torch.sin(x_t * 3.0 + t / 97.0)


class _FakeGuider:
    """What the loop is given by ComfyUI's KSAMPLER: the noise, the image latent, and a denoising model call
    that ends in our LCMModelSampling.calculate_denoised, fed ComfyUI's input scaling."""

    def __init__(self, ms, noise, latent_image):
        self.ms, self.noise, self.latent_image, self.inner_model = ms, noise, latent_image, None

    def __call__(self, x, sigma, **kwargs):
        x_t = self.ms.calculate_input(sigma, x)  # what the UNet sees: x / sqrt(sigma^2 + 1)
        return self.ms.calculate_denoised(sigma, _fake_eps(x_t, float(self.ms.timestep(sigma)[0])), x)


@pytest.mark.parametrize("timesteps,from_image", [((999, 759, 499, 259), False), ((999,), False), ((899, 599, 299), False),
                                                  ((739, 559, 379, 199), True)])
def test_production_loop_equals_lcm_scheduler_step_at_every_step(pack, timesteps, from_image):
    """consistency_loop with LCM's method + LCMModelSampling (what LCM Sampler runs) against diffusers' LCMScheduler.step on the same
    inputs: every step's denoised and the final latent, within 1e-5 in float32."""
    from diffusers import LCMScheduler

    ms = pack.comfy.model_sampling.LCMModelSampling(SimpleNamespace(sampling_settings={}), 10.0)
    sched = LCMScheduler()
    sched.set_timesteps(timesteps=list(timesteps))
    shape = (2, 4, 8, 8)
    image = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    noise = pack.core.SeededNoise(21, shape)
    initial = noise.draw()
    gen = torch.Generator("cpu").manual_seed(21)
    ref = torch.randn(shape, generator=gen)
    if from_image:
        ref = sched.add_noise(image, ref, torch.tensor([timesteps[0]]))
    ref_denoised = []
    for t in sched.timesteps:
        ref, den = sched.step(_fake_eps(ref, float(t)), t, ref, generator=gen, return_dict=False)
        ref_denoised.append(den)

    run = importlib.import_module(f"{pack.root}.lcm_comfy.run")
    sigmas = run.sigmas_for(ms, timesteps)
    seen = []
    out = run.consistency_loop(_FakeGuider(ms, initial, image), torch.zeros(shape), sigmas,
                               callback=lambda d: seen.append(d["denoised"]), noise=noise, from_image=from_image,
                               timesteps=timesteps, alphas_cumprod=ms.alphas_cumprod, method=pack.comfy.sampler.LCM_METHOD)
    assert len(seen) == len(timesteps)
    for i, (ours, theirs) in enumerate(zip(seen, ref_denoised, strict=True)):
        assert (ours - theirs).abs().max() <= TOL * max(1.0, theirs.abs().max().item()), f"step {i}"
    assert (out - ref).abs().max() <= TOL * max(1.0, ref.abs().max().item())


@pytest.fixture(scope="module")
def chain_files(comfy_base):
    models = comfy_base / "models"
    save_unet(tiny_sd15_unet(time_cond_proj_dim=256, seed=31), models / "diffusion_models" / "chain-lcm.safetensors")
    save_file(random_lora(tiny_sd15_unet(time_cond_proj_dim=None, seed=32), "peft"), str(models / "loras" / "chain-lora.safetensors"))
    return models


def test_setup_lcm_is_idempotent_along_any_chain_of_our_nodes(pack, runner, chain_files):
    """Load LCM UNet -> Apply LCM-LoRA -> Apply LCM-LoRA: one LCMModelSampling, exactly one guidance wrapper, and it
    sits first (outermost) among the DIFFUSION_MODEL wrappers; the sampling clone adds its own inside it."""
    ms_mod = pack.comfy.model_sampling
    prompt = {
        "1": {"class_type": "LCMLoadUNet", "inputs": {"unet_name": "chain-lcm.safetensors", "weight_dtype": "fp32"}},
        "2": {"class_type": "LCMApplyLoRA", "inputs": {"model": ["1", 0], "lora_name": "chain-lora.safetensors", "strength": 1.0}},
        "3": {"class_type": "LCMApplyLoRA", "inputs": {"model": ["2", 0], "lora_name": "chain-lora.safetensors", "strength": 0.5}},
    }
    out = runner.run(prompt, ["1", "2", "3"])
    for node_id in ("1", "2", "3"):
        model = out[node_id][0][0]
        wrappers = model.wrappers[ms_mod.DIFFUSION_MODEL]
        assert list(wrappers)[0] == ms_mod.GUIDANCE_WRAPPER_KEY, (node_id, list(wrappers))
        assert len(model.get_wrappers(ms_mod.DIFFUSION_MODEL, ms_mod.GUIDANCE_WRAPPER_KEY)) == 1, node_id
        assert ms_mod.is_lcm_sampling(model.object_patches["model_sampling"])
    once = ms_mod.setup_lcm(out["3"][0][0], guidance_scale=3.0)
    twice = ms_mod.setup_lcm(once)
    assert len(twice.get_wrappers(ms_mod.DIFFUSION_MODEL, ms_mod.GUIDANCE_WRAPPER_KEY)) == 1
    assert twice.model_options["transformer_options"][ms_mod.GUIDANCE_OPTION] == 3.0  # None keeps the value
    # a wrapper someone else added earlier: ours still goes first, theirs stays
    other = twice.clone()
    other.remove_wrappers_with_key(ms_mod.DIFFUSION_MODEL, ms_mod.GUIDANCE_WRAPPER_KEY)
    other.add_wrapper_with_key(ms_mod.DIFFUSION_MODEL, "someone_else", lambda executor, *a, **k: executor(*a, **k))
    again = ms_mod.setup_lcm(other)
    assert list(again.wrappers[ms_mod.DIFFUSION_MODEL]) == [ms_mod.GUIDANCE_WRAPPER_KEY, "someone_else"]
    # the input MODELs were never changed
    assert len(out["1"][0][0].get_wrappers(ms_mod.DIFFUSION_MODEL, ms_mod.GUIDANCE_WRAPPER_KEY)) == 1


@pytest.mark.parametrize("steps,expected", [(4, [999, 759, 499, 259]), (8, [999, 879, 759, 639, 499, 379, 259, 139])])
def test_ksampler_on_our_model_visits_lcms_timesteps(pack, runner, chain_files, steps, expected):
    """ComfyUI's own KSampler (sampler lcm, scheduler sgm_uniform) on Load LCM UNet's MODEL feeds the UNet the
    timesteps LCM Sampler uses, on any CPU: at 4 steps sgm_uniform lands on a half-way point (t = 509, between
    499 and 519) and the tie rule picks 499."""
    import comfy.sample

    model = runner.run({"1": {"class_type": "LCMLoadUNet", "inputs": {"unet_name": "chain-lcm.safetensors", "weight_dtype": "fp32"}}},
                       ["1"])["1"][0][0]
    seen: list[float] = []

    def record(executor, x, timesteps, *args, **kwargs):
        seen.extend(timesteps.tolist())
        return executor(x, timesteps, *args, **kwargs)

    m = model.clone()
    m.add_wrapper_with_key(pack.comfy.model_sampling.DIFFUSION_MODEL, "test_record", record)
    cond = [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(5)), {}]]
    latent = torch.zeros(1, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, 3)
    with torch.inference_mode():  # as ComfyUI's executor runs KSampler (an earlier node run may have loaded the weights so)
        out = comfy.sample.sample(m, noise, steps, 1.0, "lcm", "sgm_uniform", cond, cond, latent, disable_pbar=True, seed=3)
    assert seen == [float(t) for t in expected]  # exact: the timesteps the UNet is fed are whole numbers
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()
    assert pack.core.SamplingConfig(seed=3, steps=steps, guidance_scale=8.0, progress=False).planned == tuple(expected)


# ------------------------------------------------------------------ the sigma -> timestep rule (ties)

SAME_AS_LCM_SCHEDULER = [1, 2, 3, 4, 6, 7, 8, 9, 11, 12, 16]
DIFFERENT = [5, 10, 13, 14, 15]


def _distilled_sampling(pack):
    """Load LCM UNet's model sampling: the 50 distillation sigmas of SD's schedule (t = 20 i + 19)."""
    return pack.comfy.model_sampling.LCMModelSampling(SimpleNamespace(sampling_settings={}), 10.0, 50)


def test_ksampler_sgm_uniform_step_counts_that_reproduce_lcm_scheduler(pack):
    """Which step counts of ComfyUI's KSampler (sgm_uniform) on Load LCM UNet's MODEL give exactly diffusers'
    LCMScheduler timesteps: 1-4, 6-9, 11, 12 and 16 (the help page says so); 5, 10 and 13-15 differ."""
    import comfy.samplers
    from diffusers import LCMScheduler

    ms = _distilled_sampling(pack)
    sched = LCMScheduler()
    same, different = [], []
    for steps in range(1, 17):
        sigmas = comfy.samplers.calculate_sigmas(ms, "sgm_uniform", steps)
        ours = ms.timestep(sigmas[:-1]).tolist()
        sched.set_timesteps(steps)
        (same if ours == sched.timesteps.tolist() else different).append(steps)
    assert same == SAME_AS_LCM_SCHEDULER
    assert different == DIFFERENT


def _half_way_sigmas(ms, dtype: torch.dtype, offset: float) -> torch.Tensor:
    """The sigma at every table mid-point i + 0.5 (+ offset, in table steps), as ComfyUI's own sigma() interpolates
    it in float32, then given in ``dtype``."""
    positions = torch.arange(len(ms.sigmas) - 1, dtype=torch.float32) + 0.5 + offset
    log_sigma = (1 - positions.frac()) * ms.log_sigmas[positions.floor().long()] + positions.frac() * ms.log_sigmas[positions.ceil().long()]
    return log_sigma.exp().to(dtype)


@pytest.mark.parametrize("dtype,offset", [(torch.float32, 1e-3), (torch.float16, 0.1)])
def test_timestep_rule_at_every_half_way_point(pack, dtype, offset):
    """At each of the 49 mid-points of the distilled table the LOWER timestep wins, whatever float rounding did to
    the sigma; just either side of each (by more than the tie band: 1e-3 of a table step in float32, whose rounding
    is ~1e-7 in log-sigma; 0.1 in float16, whose rounding is ~5e-4) the nearer one wins. Also the mid-points of ComfyUI's
    own sigma(), with the timestep it is fed, and exact table sigmas map to themselves."""
    ms = _distilled_sampling(pack)
    n = len(ms.sigmas)
    lower = torch.arange(n - 1) * 20 + 19
    assert ms.timestep(_half_way_sigmas(ms, dtype, 0.0)).tolist() == lower.tolist()
    assert ms.timestep(_half_way_sigmas(ms, dtype, -offset)).tolist() == lower.tolist()
    assert ms.timestep(_half_way_sigmas(ms, dtype, +offset)).tolist() == (lower + 20).tolist()
    # ComfyUI's own interpolating sigma() at the mid-points i + 0.5 (what it computes from sgm_uniform's t = 509)
    import comfy.model_sampling

    via_comfy = comfy.model_sampling.ModelSamplingDiscrete.sigma(ms, torch.arange(n - 1, dtype=torch.float32) + 0.5).to(dtype)
    assert ms.timestep(via_comfy).tolist() == lower.tolist()
    assert ms.timestep(ms.sigmas.to(dtype)).tolist() == (torch.arange(n) * 20 + 19).tolist()  # exact entries map to themselves


def test_tie_rule_keeps_the_table_shape_and_device_of_its_input(pack):
    """timestep() returns the input's shape on the input's device, as ComfyUI's own does (batched sigmas)."""
    ms = _distilled_sampling(pack)
    sigma = ms.sigmas[[3, 24, 3, 49]].view(2, 2)
    t = ms.timestep(sigma)
    assert t.shape == (2, 2) and t.device == sigma.device and t.tolist() == [[79, 499], [79, 999]]


def test_tcd_model_sampling_sees_only_exact_table_sigmas(pack):
    """TCD's model sampling keeps the full 1000-entry table, and the TCD sampler feeds it only table sigmas
    (sigmas_for): every one maps back to its own timestep, so no tie can arise there."""
    run = importlib.import_module(f"{pack.root}.lcm_comfy.run")
    ms = pack.comfy.model_sampling.DiffusersModelSampling(SimpleNamespace(sampling_settings={}))
    every = tuple(range(999, -1, -1))
    sigmas = run.sigmas_for(ms, every)
    assert ms.timestep(sigmas[:-1]).tolist() == list(every)
    assert ms.timestep(sigmas[:-1].half()).tolist() == list(every)  # in float16 too: its rounding is inside every gap


def test_start_and_end_percent_keep_comfyuis_meaning(pack):
    """ControlNet's and conditioning's start/end percent go through percent_to_sigma: on our model sampling it is
    ComfyUI's interpolated sigma, as on any MODEL (snapping it to an entry would move a boundary step: on LCM's
    4 steps, end_percent 0.5 would keep control on t = 499 too)."""
    import comfy.model_sampling

    interpolated = comfy.model_sampling.ModelSamplingDiscrete.sigma  # ComfyUI's own, on a table position
    for ms in (_distilled_sampling(pack), pack.comfy.model_sampling.DiffusersModelSampling(SimpleNamespace(sampling_settings={}))):
        assert ms.percent_to_sigma(0.0) > ms.sigmas.max() and ms.percent_to_sigma(1.0) == 0.0
        for percent in (0.25, 0.5, 0.74):
            position = ((1 - percent) * 999.0 - (ms.skip - 1)) / ms.skip
            assert ms.percent_to_sigma(percent) == interpolated(ms, torch.tensor(position)).item(), (ms.skip, percent)
    full = pack.comfy.model_sampling.DiffusersModelSampling(SimpleNamespace(sampling_settings={}))
    assert float(full.sigmas[499]) < full.percent_to_sigma(0.5) < float(full.sigmas[500])


def test_concurrent_runs_on_one_model_equal_serial_runs(pack, runner, chain_files):
    """Two threads sampling one MODEL at once (a library use; ComfyUI itself runs one prompt at a time) wait for
    each other on the model's run lock and give exactly the serial results."""
    model = runner.run({"1": {"class_type": "LCMLoadUNet", "inputs": {"unet_name": "chain-lcm.safetensors", "weight_dtype": "fp32"}}},
                       ["1"])["1"][0][0]
    pos = [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(6)), {}]]

    def run(seed):
        config = pack.core.SamplingConfig(seed=seed, steps=2, guidance_scale=8.0, progress=False)
        with torch.inference_mode():  # as ComfyUI's executor runs every node (the mode is per thread)
            return pack.comfy.sampler.sample(model, pos, None, {"samples": torch.zeros(1, 4, 8, 8)}, config)[0]["samples"]

    serial = {seed: run(seed) for seed in (1, 2)}
    results: dict[int, torch.Tensor] = {}
    threads = [threading.Thread(target=lambda s=s: results.__setitem__(s, run(s))) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert set(results) == {1, 2}
    assert torch.equal(results[1], serial[1]) and torch.equal(results[2], serial[2])
    assert not torch.equal(serial[1], serial[2])


@pytest.mark.parametrize("sampler", ["lcm", "tcd"])
def test_a_library_call_outside_inference_mode_records_no_autograd_history(pack, runner, chain_files, sampler):
    """sample() / sample_tcd() called from Python without ComfyUI's inference mode (a script, a test) build no
    autograd graph: the loop runs under no_grad, as ComfyUI's own samplers do, so no activation is kept alive."""
    model = runner.run({"1": {"class_type": "LCMLoadUNet", "inputs": {"unet_name": "chain-lcm.safetensors", "weight_dtype": "fp32"}}},
                       ["1"])["1"][0][0]
    pos = [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(6)), {}]]
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    if sampler == "lcm":
        out, _ = pack.comfy.sampler.sample(model, pos, None, latent, pack.core.SamplingConfig(seed=1, steps=2, fast=False, progress=False))
    else:
        tcd = importlib.import_module(f"{pack.root}.lcm_comfy.tcd")
        out, _ = tcd.sample_tcd(model, pos, None, latent, pack.core.TCDConfig(seed=1, steps=2, fast=False, progress=False))
    assert not torch.is_inference_mode_enabled()
    assert not out["samples"].requires_grad and out["samples"].grad_fn is None


def test_sampling_config_refuses_bad_values_before_model_work(pack):
    core = pack.core
    with pytest.raises(core.LCMInputError, match=r"guidance_scale=nan is out of range: use a finite number from 0 to 100"):
        core.SamplingConfig(seed=1, guidance_scale=float("nan"))
    with pytest.raises(core.LCMInputError, match=r"seed=-1 is out of range"):
        core.SamplingConfig(seed=-1)
    with pytest.raises(core.LCMInputError, match=r"strength_mode='x' is not one of \['lcm', 'truncate'\]"):
        core.SamplingConfig(seed=1, strength_mode="x")
    config = core.SamplingConfig(seed=1, steps=4, strength=0.5, strength_mode="truncate", from_image=True, keep_graphs=False)
    assert config.planned == (499, 259) and config.keep_graphs == "never"
    with pytest.raises(Exception, match="cannot assign"):
        config.steps = 8  # frozen

