"""TCD against diffusers' TCDScheduler and pipelines as the oracle.

Tolerance (issue #14): max |ours - diffusers| <= 1e-4 * max(1, max |diffusers|), float32 on CPU.
"""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers import TCDScheduler

from lcm_core.config import TCDConfig
from lcm_core.errors import LCMInputError
from lcm_core.schedule import NoiseSchedule, check_custom_timesteps, pick_timesteps, truncate_for_strength
from lcm_core.step import check_gamma, previous_timestep, step_draws_noise, tcd_step

ALPHAS = NoiseSchedule().alphas_cumprod()


# float16 per-step tolerance: our step makes the same operations as diffusers' (scalars in float32, then one
# rounding to float16 per product), so the two may differ by a couple of float16 rounding steps (2^-10 relative).
FP16_TOL = 2e-3


def assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str = "", rel: float = 1e-4) -> float:
    tol = rel * max(1.0, ref.abs().max().item())
    diff = (ours.float() - ref.float()).abs().max().item()
    assert ours.shape == ref.shape and ours.dtype == ref.dtype, what
    assert diff <= tol, f"{what}: max abs diff {diff:.3e} > tolerance {tol:.3e}"
    return diff


# ---------------------------------------------------------------- schedule


def _diffusers_timesteps(steps, original, strength, explicit):
    """TCDScheduler's timesteps, or None where it refuses (ValueError)."""
    sched = TCDScheduler() if explicit else TCDScheduler(original_inference_steps=original)
    try:
        if explicit:
            sched.set_timesteps(steps, original_inference_steps=original, strength=strength)
        else:
            sched.set_timesteps(steps, strength=strength)
    except ValueError:
        return None
    return sched.timesteps.tolist()


@pytest.mark.parametrize("explicit", [False, True], ids=["config", "argument"])
@pytest.mark.parametrize("original", [50, 20, 100, 1000])
@pytest.mark.parametrize("strength", [1.0, 0.9, 0.75, 0.5, 0.3, 0.1])
def test_timesteps_equal_diffusers(explicit, original, strength):
    for steps in range(1, 61):
        ref = _diffusers_timesteps(steps, original, strength, explicit)
        try:
            ours = pick_timesteps(steps, original, strength, every_train_timestep=explicit)
        except LCMInputError:
            ours = None
        assert ours == ref, (steps, original, strength, explicit)


def test_timesteps_known_values():
    assert pick_timesteps(4) == [999, 759, 499, 259]
    assert pick_timesteps(4, every_train_timestep=True) == [999, 749, 499, 249]
    assert pick_timesteps(8)[:3] == [999, 879, 759]


@pytest.mark.parametrize("custom", [[999, 759, 499, 259], [999, 749, 499, 249], [999, 500, 250, 10], [899, 599], [999], [999, 0]])
@pytest.mark.parametrize("strength", [1.0, 0.5, 0.25])
@pytest.mark.parametrize("explicit", [False, True], ids=["config", "argument"])
def test_custom_timesteps_equal_diffusers(custom, strength, explicit):
    sched = TCDScheduler()
    kw = {"original_inference_steps": 50} if explicit else {}
    sched.set_timesteps(timesteps=custom, strength=strength, **kw)
    ref = sched.timesteps.tolist()
    if not ref:  # diffusers keeps nothing; ours refuses with the fix
        with pytest.raises(LCMInputError, match="raise strength"):
            check_custom_timesteps(custom, strength=strength, every_train_timestep=explicit)
        return
    assert check_custom_timesteps(custom, strength=strength, every_train_timestep=explicit) == ref


@pytest.mark.parametrize("bad", [[259, 499], [999, 999], [1000, 10], [5, -1], []])
def test_custom_timesteps_rejected_with_fix(bad):
    with pytest.raises(LCMInputError, match="timesteps"):
        check_custom_timesteps(bad)


def test_custom_timesteps_warn_like_diffusers(caplog):
    with caplog.at_level(logging.WARNING, logger="lcm_nodes"):
        check_custom_timesteps([999, 749, 499, 249])
    assert "not on the distillation schedule" in caplog.text and "[749, 249]" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lcm_nodes"):
        check_custom_timesteps([999, 749, 499, 249], every_train_timestep=True)  # every timestep is on that schedule
    assert "not on the distillation" not in caplog.text


@pytest.mark.parametrize(
    "kwargs, match",
    [({"steps": 0}, "steps=0"), ({"steps": 51}, "steps=51"), ({"steps": 4, "original_inference_steps": 0}, "original_inference_steps=0"),
     ({"steps": 30, "strength": 0.5}, "strength=0.5 leaves 25"), ({"steps": 4, "strength": 0.0}, "strength=0.0")],
)
def test_bad_schedule_values_name_value_and_fix(kwargs, match):
    with pytest.raises(LCMInputError, match=match):
        pick_timesteps(**kwargs)


@pytest.mark.parametrize("gamma", [-0.1, 1.5, float("nan"), "a"])
def test_bad_gamma_names_value_and_fix(gamma):
    with pytest.raises(LCMInputError, match="gamma=") as e:
        check_gamma(gamma)
    assert "0.3" in str(e.value)


@pytest.mark.parametrize("strength", [1.0, 0.9, 0.75, 0.5, 0.3])
@pytest.mark.parametrize("schedule", [{"steps": 4}, {"steps": 8}, {"steps": 5}, {"timesteps": (999, 749, 499, 249)}])
def test_config_plans_the_img2img_pipelines_timesteps(strength, schedule):
    """TCDConfig.planned equals what StableDiffusion(XL)Img2ImgPipeline.get_timesteps leaves of TCDScheduler's schedule."""
    from types import SimpleNamespace

    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline

    for pipeline in (StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline):
        sched = TCDScheduler()
        if "timesteps" in schedule:
            sched.set_timesteps(timesteps=list(schedule["timesteps"]))
        else:
            sched.set_timesteps(schedule["steps"])
        ref, _ = pipeline.get_timesteps(SimpleNamespace(scheduler=sched), len(sched.timesteps), strength, "cpu")
        config = TCDConfig(seed=0, strength=strength, **schedule)
        assert list(config.planned) == ref.tolist()
        assert config.from_image == (strength < 1.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"gamma": 1.2}, "gamma=1.2"), ({"guidance_scale": -1.0}, "guidance_scale=-1.0"), ({"seed": -3}, "seed=-3"),
     ({"strength": 0.2}, r"strength=0.2 keeps int\(4 x 0.2\) = 0"), ({"steps": 60}, "steps=60"), ({"timesteps": (5, 10)}, "descending"),
     ({"keep_graphs": "sometimes"}, "keep_graphs")],
)
def test_config_rejects_bad_values_with_fix(kwargs, match):
    with pytest.raises(LCMInputError, match=match):
        TCDConfig(**{"seed": 0, **kwargs})


# ---------------------------------------------------------------- step


BASE = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(99))


def fake_eps(sample: torch.Tensor, t) -> torch.Tensor:
    """A closed-form stand-in for a UNet: depends on the sample and the timestep."""
    return 0.8 * BASE + 0.3 * torch.tanh(sample) * torch.cos(torch.as_tensor(t, dtype=torch.float32) / 300)


def _run_both(gamma, set_kwargs, begin_index=0, seed=5, sched_kwargs=None, dtype=torch.float32):
    """Step diffusers' TCDScheduler and ours on the same inputs at every step, and our own loop beside it, in
    ``dtype`` (diffusers draws its step noise in the model output's dtype; so do we here); returns how many noise
    tensors our loop drew."""
    rel = 1e-4 if dtype == torch.float32 else FP16_TOL
    sched = TCDScheduler(**(sched_kwargs or {}))
    sched.set_timesteps(**set_kwargs)
    full = sched.timesteps.tolist()
    if begin_index:
        sched.set_begin_index(begin_index)  # what the SD/SDXL img2img pipelines do
    ts = full[begin_index:]
    g_ref = torch.Generator("cpu").manual_seed(seed)
    g_ours = torch.Generator("cpu").manual_seed(seed)
    x_ref = torch.randn(BASE.shape, generator=g_ref, dtype=dtype)
    loop_ours = torch.randn(BASE.shape, generator=g_ours, dtype=dtype)
    draws = 0
    for i, t in enumerate(ts):
        eps = fake_eps(x_ref, t).to(dtype)
        ref = sched.step(eps, sched.timesteps[begin_index + i], x_ref, eta=gamma, generator=g_ref)
        noise = torch.randn(BASE.shape, generator=g_ours, dtype=dtype) if step_draws_noise(gamma, i == len(ts) - 1) else None
        draws += noise is not None
        ours = tcd_step(eps, t, x_ref, previous_timestep(ts, i), gamma, ALPHAS, noise)
        assert_close(ours.denoised, ref.pred_noised_sample, f"x_s at step {i} (t={t})", rel)
        assert_close(ours.prev_sample, ref.prev_sample, f"prev_sample at step {i} (t={t})", rel)
        # our own loop, fed only by itself, stays on diffusers' trajectory (same noise, drawn in the same order)
        loop_ours = tcd_step(fake_eps(loop_ours, t).to(dtype), t, loop_ours, previous_timestep(ts, i), gamma, ALPHAS,
                             noise).prev_sample
        x_ref = ref.prev_sample
    assert_close(loop_ours, x_ref, "final latent of the whole loop", rel)
    # both generators consumed the same number of draws: the next numbers agree
    assert torch.equal(torch.randn(3, generator=g_ref), torch.randn(3, generator=g_ours))
    return draws


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("gamma", [0.0, 0.1, 0.3, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_step_equals_diffusers(gamma, steps, dtype):
    draws = _run_both(gamma, {"num_inference_steps": steps}, dtype=dtype)
    assert draws == (0 if gamma == 0 else steps - 1)


@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.7])
@pytest.mark.parametrize("custom", [[999, 749, 499, 249], [999, 500, 250, 10], [899, 599], [999, 1]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_step_equals_diffusers_custom_timesteps(gamma, custom, dtype):
    _run_both(gamma, {"timesteps": custom}, dtype=dtype)


@pytest.mark.parametrize("gamma", [0.0, 0.3])
@pytest.mark.parametrize("strength", [0.3, 0.5, 0.75])
def test_step_equals_diffusers_img2img_truncated(gamma, strength):
    """The SD/SDXL img2img pipelines: full schedule, first steps dropped, scheduler started at begin_index."""
    full = pick_timesteps(4)
    kept = truncate_for_strength(full, strength)
    _run_both(gamma, {"num_inference_steps": 4}, begin_index=len(full) - len(kept))


@pytest.mark.parametrize("gamma", [0.3, 1.0])
def test_step_equals_diffusers_other_schedules(gamma):
    _run_both(gamma, {"num_inference_steps": 6, "original_inference_steps": 100})  # every training timestep
    _run_both(gamma, {"num_inference_steps": 3}, sched_kwargs={"original_inference_steps": 20})


@pytest.mark.parametrize("gamma", [0.3, 0.8, 0.9])
def test_intermediate_timestep_equals_diffusers_everywhere(gamma):
    """s = floor((1 - gamma) t_prev) for every t_prev, rounded as diffusers rounds it (in float32: at gamma 0.3, 0.8
    and 0.9 a float64 floor differs for dozens of t_prev); an s off by one moves x_s far beyond the tolerance."""
    sample = torch.full((1, 1, 1, 4), 0.7)
    eps = torch.tensor([[[[0.3, -0.5, 1.1, 0.0]]]])
    sched = TCDScheduler()
    logging.getLogger("diffusers.schedulers.scheduling_tcd").setLevel(logging.ERROR)  # off-schedule warnings, 998 times
    for prev in range(1, 999):
        sched.set_timesteps(timesteps=[999, prev])
        ref = sched.step(eps, 999, sample, eta=gamma).pred_noised_sample
        ours = tcd_step(eps, 999, sample, prev, gamma, ALPHAS, None).denoised
        assert_close(ours, ref, f"t_prev={prev}")


# ================================================================ the TCD Sampler node in a real ComfyUI
#
# Oracles: diffusers' StableDiffusion(XL)(Img2Img)Pipeline with TCDScheduler, called with eta=gamma and
# generator=torch.Generator("cpu").manual_seed(SEED), on the same weights and prompt embeddings.

SD15_SCALE = 0.18215
SDXL_SCALE = 0.13025
SEED = 4321
TCD_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
                    "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")


def tcd_lora(unet, rank: int = 4, seed: int = 17, scale: float = 0.3) -> dict[str, torch.Tensor]:
    """A TCD-LoRA-shaped file: the modules TCD's (and LCM's) LoRA distillation scripts train, diffusers' lora.down/up keys."""
    g = torch.Generator("cpu").manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for name, mod in unet.named_modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) and name.endswith(TCD_LORA_TARGETS):
            w = mod.weight
            kernel = tuple(w.shape[2:])
            sd[f"unet.{name}.lora.down.weight"] = torch.randn((rank, w.shape[1], *kernel), generator=g) * scale / (w[0].numel() ** 0.5)
            sd[f"unet.{name}.lora.up.weight"] = torch.randn((w.shape[0], rank, *((1, 1) if kernel else ())), generator=g) * scale / rank**0.5
    return sd


def run_node(runner, loader: dict, sampler: str, positive, latent, negative=None, lora: str | None = None, **inputs):
    """loader -> [LCMApplyLoRA] -> sampler in ComfyUI's executor; tensors enter through the test-only value node."""
    from test_support_nodes import stash

    prompt = {"1": loader, "10": {"class_type": "LCMTestValue", "inputs": {"key": stash(positive)}},
              "11": {"class_type": "LCMTestValue", "inputs": {"key": stash(latent)}}}
    model = ["1", 0]
    if lora:
        prompt["2"] = {"class_type": "LCMApplyLoRA", "inputs": {"model": model, "lora_name": lora, "strength": 1.0}}
        model = ["2", 0]
    required = {"seed": SEED, "steps": 4, "guidance_scale": 1.0, **({"gamma": 0.3} if sampler == "TCDSampler" else {})}
    sampler_inputs = {"model": model, "positive": ["10", 0], "latent_image": ["11", 0], **required, **inputs}
    if negative is not None:
        prompt["12"] = {"class_type": "LCMTestValue", "inputs": {"key": stash(negative)}}
        sampler_inputs["negative"] = ["12", 0]
    prompt["3"] = {"class_type": sampler, "inputs": sampler_inputs}
    return runner.run(prompt, ["3"])["3"][0][0]["samples"]


def lcm_unet_loader(name: str) -> dict:
    return {"class_type": "LCMLoadUNet", "inputs": {"unet_name": name, "weight_dtype": "fp32"}}


def generator() -> torch.Generator:
    return torch.Generator("cpu").manual_seed(SEED)


# ---------------------------------------------------------------- SD1.5-shaped

SD15_FILE = "tiny-tcd-sd15.safetensors"  # diffusers layout, for Load LCM UNet
SD15_LDM_FILE = "tiny-tcd-sd15-ldm.safetensors"  # ComfyUI's own layout, for ComfyUI's plain UNETLoader
SD15_GUIDED_FILE = "tiny-tcd-lcm-sd15.safetensors"  # an LCM UNet (guidance embedding), for Load LCM UNet


@pytest.fixture(scope="module")
def sd15(comfy, comfy_base):
    from models import diffusers_unet_to_ldm, save_unet, tiny_sd15_unet
    from safetensors.torch import save_file

    unet = tiny_sd15_unet(time_cond_proj_dim=None, seed=41)
    folder = comfy_base / "models" / "diffusion_models"
    save_unet(unet, folder / SD15_FILE)
    save_file({k: v.contiguous() for k, v in diffusers_unet_to_ldm(unet).items()}, str(folder / SD15_LDM_FILE))
    return unet


@pytest.fixture(scope="module")
def sd15_pipe(sd15):
    from diffusers import StableDiffusionPipeline
    from models import tiny_vae

    pipe = StableDiffusionPipeline(vae=tiny_vae(), text_encoder=None, tokenizer=None, unet=sd15, scheduler=TCDScheduler(steps_offset=1),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd15_cond(batch: int = 1):
    g = torch.Generator().manual_seed(3)
    return torch.randn(batch, 77, 768, generator=g), torch.randn(batch, 77, 768, generator=g)


def sd15_ref(pipe, cond, shape, gamma, guidance=1.0, neg=None, steps=4, init=None, strength=1.0, batch=1, timesteps=None):
    kw = dict(prompt_embeds=cond, guidance_scale=guidance, eta=gamma, output_type="latent", generator=generator(),
              num_images_per_prompt=batch)
    if timesteps:
        kw.update(timesteps=timesteps)
    else:
        kw.update(num_inference_steps=steps)
    if neg is not None:
        kw.update(negative_prompt_embeds=neg)
    if init is None:
        return pipe(height=shape[2] * 8, width=shape[3] * 8, **kw).images
    from diffusers import StableDiffusionImg2ImgPipeline

    img2img = StableDiffusionImg2ImgPipeline(**pipe.components, requires_safety_checker=False)
    img2img.set_progress_bar_config(disable=True)
    return img2img(image=init, strength=strength, **kw).images


@pytest.mark.usefixtures("cpu_exactness")
def test_sd15_txt2img_matches_diffusers_at_gamma_03_and_0(runner, sd15, sd15_pipe):
    """From a MODEL set up by Load LCM UNet (it carries LCM's 50-entry model sampling) and from a plain one
    (ComfyUI's own UNETLoader), 4 steps."""
    cond, _ = sd15_cond()
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    plain_loader = {"class_type": "UNETLoader", "inputs": {"unet_name": SD15_LDM_FILE, "weight_dtype": "default"}}
    ours = {gamma: run_node(runner, lcm_unet_loader(SD15_FILE), "TCDSampler", [[cond, {}]], latent, gamma=gamma) for gamma in (0.3, 0.0)}
    plain = run_node(runner, plain_loader, "TCDSampler", [[cond, {}]], latent, gamma=0.3)
    refs = {gamma: sd15_ref(sd15_pipe, cond, (1, 4, 8, 8), gamma) for gamma in (0.3, 0.0)}
    for gamma in (0.3, 0.0):
        assert_close(ours[gamma] * SD15_SCALE, refs[gamma], f"gamma {gamma}")
    assert_close(plain * SD15_SCALE, refs[0.3], "plain MODEL")
    assert (ours[0.3] - ours[0.0]).abs().max() > 1e-3  # gamma is in play


@pytest.mark.usefixtures("cpu_exactness")
def test_sd15_cfg_with_negative_prompt_matches_diffusers(runner, sd15, sd15_pipe):
    cond, neg = sd15_cond()
    ours = run_node(runner, lcm_unet_loader(SD15_FILE), "TCDSampler", [[cond, {}]], {"samples": torch.zeros(1, 4, 8, 8)},
                    negative=[[neg, {}]], steps=2, guidance_scale=1.5)
    ref = sd15_ref(sd15_pipe, cond, (1, 4, 8, 8), 0.3, guidance=1.5, neg=neg, steps=2)
    assert_close(ours * SD15_SCALE, ref)


@pytest.mark.usefixtures("cpu_exactness")
def test_sd15_img2img_matches_diffusers(runner, sd15, sd15_pipe):
    """strength 0.5 at 4 steps: the img2img pipelines drop the first two of 999/759/499/259 and start from 499."""
    cond, _ = sd15_cond()
    init = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(11))  # a raw VAE latent
    ours = run_node(runner, lcm_unet_loader(SD15_FILE), "TCDSampler", [[cond, {}]], {"samples": init}, strength=0.5)
    ref = sd15_ref(sd15_pipe, cond, init.shape, 0.3, init=init * SD15_SCALE, strength=0.5)
    assert_close(ours * SD15_SCALE, ref)


@pytest.mark.usefixtures("cpu_exactness")
def test_sd15_batch2_with_custom_timesteps_matches_diffusers(runner, sd15, sd15_pipe):
    cond, _ = sd15_cond()
    ours = run_node(runner, lcm_unet_loader(SD15_FILE), "TCDSampler", [[cond, {}]], {"samples": torch.zeros(2, 4, 8, 8)},
                    gamma=0.5, timesteps="999, 599")
    ref = sd15_ref(sd15_pipe, cond, (2, 4, 8, 8), 0.5, batch=2, timesteps=[999, 599])
    assert_close(ours * SD15_SCALE, ref)
    assert (ours[0] - ours[1]).abs().max() > 1e-3  # two different images, not one repeated


@pytest.mark.usefixtures("cpu_exactness")
def test_lcm_unet_with_guidance_embedding_matches_diffusers(runner, comfy, comfy_base):
    """An LCM UNet through TCD: the pipelines feed guidance_scale to its guidance embedding and run no CFG."""
    from diffusers import StableDiffusionPipeline
    from models import save_unet, tiny_sd15_unet, tiny_vae

    unet = tiny_sd15_unet(time_cond_proj_dim=256, seed=43)
    save_unet(unet, comfy_base / "models" / "diffusion_models" / SD15_GUIDED_FILE)
    cond, neg = sd15_cond()
    ours = run_node(runner, lcm_unet_loader(SD15_GUIDED_FILE), "TCDSampler", [[cond, {}]], {"samples": torch.zeros(1, 4, 8, 8)},
                    negative=[[neg, {}]], steps=2, gamma=0.3, guidance_scale=8.0)
    pipe = StableDiffusionPipeline(vae=tiny_vae(), text_encoder=None, tokenizer=None, unet=unet, scheduler=TCDScheduler(steps_offset=1),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    ref = sd15_ref(pipe, cond, (1, 4, 8, 8), 0.3, guidance=8.0, neg=neg, steps=2)
    assert_close(ours * SD15_SCALE, ref)


# ---------------------------------------------------------------- SDXL-shaped: TCD-LoRA, and the DMD2 recipe

SDXL_FILE = "tiny-tcd-sdxl.safetensors"
SDXL_TCD_LORA = "tiny-tcd-sdxl-lora.safetensors"
SD15_TCD_LORA = "tiny-tcd-sd15-lora.safetensors"
SDXL_TOKENS = 8  # short prompt embeddings: the tiny SDXL UNet's cost is mostly its 70 cross-attentions' key/value projections


@pytest.fixture(scope="module")
def sdxl(comfy, comfy_base):
    """An SDXL-shaped UNet without a guidance embedding, in diffusers' layout: the shape of DMD2's UNet and of SDXL's."""
    from models import save_unet, tiny_sdxl_unet
    from safetensors.torch import save_file

    unet = tiny_sdxl_unet(time_cond_proj_dim=None, seed=51)
    save_unet(unet, comfy_base / "models" / "diffusion_models" / SDXL_FILE)
    save_file(tcd_lora(unet), str(comfy_base / "models" / "loras" / SDXL_TCD_LORA))
    return unet


def sdxl_cond(h: int, w: int, batch: int = 1):
    from oracles import diffusers_to_conditioning

    g = torch.Generator().manual_seed(8)
    ids = torch.tensor([[h * 8, w * 8, 0, 0, h * 8, w * 8]], dtype=torch.float32)
    return diffusers_to_conditioning(torch.randn(batch, SDXL_TOKENS, 2048, generator=g), torch.randn(batch, 1280, generator=g), ids)


def sdxl_ref(pipe, positive, shape, **kw):
    from oracles import conditioning_to_diffusers

    p = conditioning_to_diffusers(positive, shape[2:])
    return pipe(prompt_embeds=p.prompt_embeds, pooled_prompt_embeds=p.pooled_prompt_embeds,
                negative_prompt_embeds=torch.zeros_like(p.prompt_embeds), negative_pooled_prompt_embeds=torch.zeros_like(p.pooled_prompt_embeds),
                output_type="latent", height=shape[2] * 8, width=shape[3] * 8, generator=generator(), **kw).images


@pytest.mark.usefixtures("cpu_exactness")
def test_dmd2_unet_on_lcm_sampler_matches_diffusers(runner, sdxl):
    """DMD2 (issue #14): Load LCM UNet on a diffusers-format SDXL UNet without guidance embedding, LCM Sampler with
    timesteps "999, 749, 499, 249" at guidance 1.0 == StableDiffusionXLPipeline + LCMScheduler(timesteps=[999, 749, 499, 249])."""
    from diffusers import LCMScheduler, StableDiffusionXLPipeline
    from models import tiny_vae

    assert sdxl.config.time_cond_proj_dim is None
    positive = sdxl_cond(8, 8)
    ours = run_node(runner, lcm_unet_loader(SDXL_FILE), "LCMSampler", positive, {"samples": torch.zeros(1, 4, 8, 8)},
                    steps=4, guidance_scale=1.0, timesteps="999, 749, 499, 249")
    pipe = StableDiffusionXLPipeline(vae=tiny_vae(), text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
                                     unet=sdxl, scheduler=LCMScheduler())
    pipe.set_progress_bar_config(disable=True)
    ref = sdxl_ref(pipe, positive, (1, 4, 8, 8), timesteps=[999, 749, 499, 249], guidance_scale=1.0)
    assert_close(ours * SDXL_SCALE, ref)


@pytest.mark.usefixtures("cpu_exactness")
def test_sdxl_tcd_lora_through_apply_lora_matches_diffusers(runner, sdxl, comfy_base):
    """A TCD-LoRA-shaped file loads through Apply LCM-LoRA (every module lands) and TCD on it matches diffusers'
    SDXL pipeline with the LoRA loaded by load_lora_weights."""
    from diffusers import StableDiffusionXLPipeline
    from models import tiny_vae

    positive = sdxl_cond(8, 8)
    ours = run_node(runner, lcm_unet_loader(SDXL_FILE), "TCDSampler", positive, {"samples": torch.zeros(1, 4, 8, 8)},
                    lora=SDXL_TCD_LORA, steps=2, gamma=0.3)
    pipe = StableDiffusionXLPipeline(vae=tiny_vae(), text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
                                     unet=sdxl, scheduler=TCDScheduler())
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(comfy_base / "models" / "loras"), weight_name=SDXL_TCD_LORA)
    try:
        ref = sdxl_ref(pipe, positive, (1, 4, 8, 8), num_inference_steps=2, eta=0.3, guidance_scale=1.0)
    finally:
        pipe.unload_lora_weights()  # the module's SDXL UNet is the plain (DMD2) one again
    assert_close(ours * SDXL_SCALE, ref)


def test_wrong_base_tcd_lora_is_an_error(runner, sdxl, sd15, comfy_base):
    """Apply LCM-LoRA's fit check is about the base model, not about LCM: an SD1.5 TCD-LoRA on SDXL is refused."""
    from safetensors.torch import save_file

    save_file(tcd_lora(sd15), str(comfy_base / "models" / "loras" / SD15_TCD_LORA))
    prompt = {"1": lcm_unet_loader(SDXL_FILE),
              "2": {"class_type": "LCMApplyLoRA", "inputs": {"model": ["1", 0], "lora_name": SD15_TCD_LORA, "strength": 1.0}}}
    err = runner.error_of(prompt, ["2"])
    assert err["exception_type"].endswith("LCMLoRAError")
    assert f"LoRA '{SD15_TCD_LORA}' does not fit this SDXL model" in err["exception_message"]


def test_node_inputs_are_the_issues_table_with_tooltips(comfy):
    """Issue #14's inputs, names and defaults, plus the fast path's; every input has a tooltip; widgets in a stable order."""
    from workflow_formats import widget_layout

    node = comfy.NODE_CLASS_MAPPINGS["TCDSampler"]
    spec = node.INPUT_TYPES()
    required, optional = spec["required"], spec["optional"]
    assert list(required) == ["model", "positive", "latent_image", "seed", "steps", "guidance_scale", "gamma"]
    assert list(optional) == ["negative", "original_inference_steps", "timesteps", "strength", "fast", "keep_graphs", "compile"]
    defaults = {name: value[1].get("default") for name, value in {**required, **optional}.items() if len(value) > 1}
    assert {k: defaults[k] for k in ("steps", "guidance_scale", "gamma", "original_inference_steps", "timesteps", "strength")} == {
        "steps": 4, "guidance_scale": 1.0, "gamma": 0.3, "original_inference_steps": 50, "timesteps": "", "strength": 1.0}
    assert required["gamma"][1]["min"] == 0.0 and required["gamma"][1]["max"] == 1.0
    for name, value in {**required, **optional}.items():
        assert value[1].get("tooltip"), f"{name} has no tooltip"
    assert list(node.RETURN_TYPES) == ["LATENT"] and node.CATEGORY == "sampling/lcm"
    widgets = [n for n, _ in widget_layout(node)[0]]
    assert widgets == ["seed", "steps", "guidance_scale", "gamma", "original_inference_steps", "timesteps", "strength", "fast", "keep_graphs", "compile"]
