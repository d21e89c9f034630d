"""The four nodes in real ComfyUI v0.8.0 graphs, compared with diffusers' pipelines on the same weights.

Tolerance (issue #3): max |ours - diffusers| <= 1e-4 * max(1, max |diffusers|), float32 on CPU.
"""

from __future__ import annotations

import pytest
import torch
from models import random_lora, save_unet, tiny_sd15_unet, tiny_sdxl_unet, tiny_vae
from oracles import conditioning_to_diffusers, diffusers_to_conditioning

SD15_SCALE = 0.18215
SDXL_SCALE = 0.13025
SEED = 1234


def assert_close(ours: torch.Tensor, ref: torch.Tensor):
    tol = 1e-4 * max(1.0, ref.abs().max().item())
    diff = (ours - ref).abs().max().item()
    assert ours.shape == ref.shape
    assert diff <= tol, f"max abs diff {diff:.3e} > tolerance {tol:.3e}"
    return diff


@pytest.fixture(scope="module")
def sd15_lcm(comfy, comfy_base):
    unet = tiny_sd15_unet(time_cond_proj_dim=256)
    save_unet(unet, comfy_base / "models" / "diffusion_models" / "tiny-lcm-sd15.safetensors")
    return unet


@pytest.fixture(scope="module")
def sdxl(comfy, comfy_base):
    unet = tiny_sdxl_unet()
    save_unet(unet, comfy_base / "models" / "diffusion_models" / "tiny-sdxl.safetensors")
    return unet


def sd15_cond(batch=1, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 77, 768, generator=g), torch.randn(batch, 77, 768, generator=g)


def sdxl_cond(h, w, seed=5):
    g = torch.Generator().manual_seed(seed)
    pos = diffusers_to_conditioning(torch.randn(1, 77, 2048, generator=g), torch.randn(1, 1280, generator=g),
                                    torch.tensor([[h * 8, w * 8, 0, 0, h * 8, w * 8]], dtype=torch.float32))
    neg = diffusers_to_conditioning(torch.randn(1, 77, 2048, generator=g), torch.randn(1, 1280, generator=g),
                                    torch.tensor([[h * 8, w * 8, 0, 0, h * 8, w * 8]], dtype=torch.float32))
    return pos, neg


def lcm_prompt(unet_name, sampler, inputs, lora=None):
    prompt = {"1": {"class_type": "LCMLoadUNet", "inputs": {"unet_name": unet_name, "weight_dtype": "fp32"}}}
    model_ref = ["1", 0]
    if lora:
        prompt["2"] = {"class_type": "LCMApplyLoRA", "inputs": {"model": ["1", 0], "lora_name": lora, "strength": 1.0}}
        model_ref = ["2", 0]
    prompt["3"] = {"class_type": sampler, "inputs": dict(inputs, model=model_ref)}
    return prompt


def run_sampler(runner, unet_name, sampler, positive, negative, latent, lora=None, **kw):
    """Run LCMLoadUNet [-> LCMApplyLoRA] -> sampler in ComfyUI; tensors enter via the test input node."""
    from test_support_nodes import stash

    inputs = {"positive": ["10", 0], "latent_image": ["11", 0], "seed": SEED}
    stash_ids = {"10": positive, "11": latent}
    if negative is not None:
        inputs["negative"] = ["12", 0]
        stash_ids["12"] = negative
    inputs.update(kw)
    prompt = lcm_prompt(unet_name, sampler, inputs, lora)
    for node_id, value in stash_ids.items():
        prompt[node_id] = {"class_type": "LCMTestValue", "inputs": {"key": stash(value)}}
    out = runner.run(prompt, ["3"])
    return out["3"][0][0]["samples"]


def diffusers_lcm_sd15(unet, cond, neg, latents_shape, guidance, steps, init=None, strength=1.0, batch=1):
    from diffusers import LatentConsistencyModelImg2ImgPipeline, LatentConsistencyModelPipeline, LCMScheduler

    cls = LatentConsistencyModelPipeline if init is None else LatentConsistencyModelImg2ImgPipeline
    pipe = cls(vae=tiny_vae(), text_encoder=None, tokenizer=None, unet=unet, scheduler=LCMScheduler(),
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt_embeds=cond, num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
              generator=torch.Generator("cpu").manual_seed(SEED), num_images_per_prompt=batch)
    if init is None:
        kw.update(height=latents_shape[2] * 8, width=latents_shape[3] * 8)
    else:
        kw.update(image=init, strength=strength)
    return pipe(**kw).images


def test_sd15_lcm_unet_txt2img_matches_diffusers(runner, sd15_lcm):
    cond, neg = sd15_cond()
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    ours = run_sampler(runner, "tiny-lcm-sd15.safetensors", "LCMSampler", [[cond, {}]], [[neg, {}]], latent,
                       steps=4, guidance_scale=8.0)
    ref = diffusers_lcm_sd15(sd15_lcm, cond, neg, (1, 4, 8, 8), 8.0, 4)
    assert_close(ours * SD15_SCALE, ref)
    # the guidance embedding really is in play: another guidance gives another image
    other = run_sampler(runner, "tiny-lcm-sd15.safetensors", "LCMSampler", [[cond, {}]], None, latent, steps=4, guidance_scale=2.0)
    assert (other - ours).abs().max() > 1e-3


def test_sd15_lcm_unet_batch2_matches_diffusers(runner, sd15_lcm):
    cond, _ = sd15_cond()
    latent = {"samples": torch.zeros(2, 4, 8, 8)}
    ours = run_sampler(runner, "tiny-lcm-sd15.safetensors", "LCMSampler", [[cond, {}]], None, latent, steps=4, guidance_scale=8.0)
    ref = diffusers_lcm_sd15(sd15_lcm, cond, None, (2, 4, 8, 8), 8.0, 4, batch=2)
    assert_close(ours * SD15_SCALE, ref)
    assert (ours[0] - ours[1]).abs().max() > 1e-3  # two different images, not one repeated


@pytest.mark.parametrize("strength", [0.3, 0.5, 0.75, 1.0])
def test_sd15_lcm_unet_img2img_matches_diffusers(runner, sd15_lcm, strength):
    cond, _ = sd15_cond()
    init = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(11))  # raw VAE latent
    ours = run_sampler(runner, "tiny-lcm-sd15.safetensors", "LCMImg2Img", [[cond, {}]], None, {"samples": init},
                       steps=4, guidance_scale=8.0, strength=strength)
    ref = diffusers_lcm_sd15(sd15_lcm, cond, None, init.shape, 8.0, 4, init=init * SD15_SCALE, strength=strength)
    assert_close(ours * SD15_SCALE, ref)


# ---------------------------------------------------------------- SDXL + LCM-LoRA


_PIPES: dict = {}


def sdxl_pipeline(unet_factory, lora_path, img2img=False):
    """diffusers' SDXL pipeline with LCMScheduler and the LoRA loaded by load_lora_weights (built once per LoRA)."""
    from diffusers import LCMScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    key = str(lora_path)
    if key not in _PIPES:
        pipe = StableDiffusionXLPipeline(vae=tiny_vae(), text_encoder=None, text_encoder_2=None, tokenizer=None,
                                         tokenizer_2=None, unet=unet_factory(), scheduler=LCMScheduler())
        pipe.load_lora_weights(str(lora_path.parent), weight_name=lora_path.name)
        _PIPES[key] = pipe
    pipe = _PIPES[key]
    if img2img:
        pipe = StableDiffusionXLImg2ImgPipeline(**pipe.components, requires_aesthetics_score=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_sdxl(pipe, pos, neg, shape, guidance, steps, init=None, strength=1.0, batch=1):
    p = conditioning_to_diffusers(pos, shape[2:])
    n = conditioning_to_diffusers(neg, shape[2:])
    kw = dict(prompt_embeds=p.prompt_embeds, pooled_prompt_embeds=p.pooled_prompt_embeds,
              negative_prompt_embeds=n.prompt_embeds, negative_pooled_prompt_embeds=n.pooled_prompt_embeds,
              num_inference_steps=steps, guidance_scale=guidance, output_type="latent", num_images_per_prompt=batch,
              generator=torch.Generator("cpu").manual_seed(SEED), height=shape[2] * 8, width=shape[3] * 8)
    if init is not None:
        kw.update(image=init, strength=strength)
    return pipe(**kw).images


@pytest.fixture(scope="module", params=["kohya", "peft"])
def sdxl_lora(request, sdxl, comfy_base):
    from safetensors.torch import save_file

    name = f"tiny-sdxl-lcm-lora-{request.param}.safetensors"
    path = comfy_base / "models" / "loras" / name
    save_file(random_lora(sdxl, request.param, alpha=8.0 if request.param == "kohya" else None), str(path))
    return request.param, name, path


@pytest.mark.parametrize("guidance", [1.0, 1.5])
def test_sdxl_lcm_lora_txt2img_matches_diffusers(runner, sdxl, sdxl_lora, guidance):
    fmt, name, path = sdxl_lora
    if (fmt, guidance) == ("kohya", 1.5):
        pytest.skip("CFG is covered with the PEFT file and by the batch-2 case of both formats (the kohya run costs a minute on 2 CPUs)")
    pos, neg = sdxl_cond(8, 8)
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    ours = run_sampler(runner, "tiny-sdxl.safetensors", "LCMSampler", pos, neg, latent, lora=name, steps=4, guidance_scale=guidance)
    pipe = sdxl_pipeline(tiny_sdxl_unet, path)
    ref = diffusers_sdxl(pipe, pos, neg, (1, 4, 8, 8), guidance, 4)
    assert_close(ours * SDXL_SCALE, ref)
    if guidance == 1.0:  # the LoRA really changed the result (checked once per format: a model switch is slow on CPU)
        plain = run_sampler(runner, "tiny-sdxl.safetensors", "LCMSampler", pos, neg, latent, steps=4, guidance_scale=guidance)
        assert (plain - ours).abs().max() > 1e-3


@pytest.mark.parametrize("strength", [0.3, 0.5, 0.75, 1.0])
def test_sdxl_lcm_lora_img2img_matches_diffusers(runner, sdxl, sdxl_lora, strength):
    fmt, name, path = sdxl_lora
    pos, neg = sdxl_cond(8, 8)
    init = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(12))
    ours = run_sampler(runner, "tiny-sdxl.safetensors", "LCMImg2Img", pos, neg, {"samples": init}, lora=name,
                       steps=4, guidance_scale=1.5, strength=strength, strength_mode="truncate")
    pipe = sdxl_pipeline(tiny_sdxl_unet, path, img2img=True)
    ref = diffusers_sdxl(pipe, pos, neg, init.shape, 1.5, 4, init=init * SDXL_SCALE, strength=strength)
    assert_close(ours * SDXL_SCALE, ref)


def test_sdxl_lcm_lora_batch2_matches_diffusers(runner, sdxl, sdxl_lora):
    fmt, name, path = sdxl_lora
    pos, neg = sdxl_cond(8, 8)
    ours = run_sampler(runner, "tiny-sdxl.safetensors", "LCMSampler", pos, neg, {"samples": torch.zeros(2, 4, 8, 8)},
                       lora=name, steps=4, guidance_scale=1.5)
    pipe = sdxl_pipeline(tiny_sdxl_unet, path)
    ref = diffusers_sdxl(pipe, pos, neg, (2, 4, 8, 8), 1.5, 4, batch=2)
    assert_close(ours * SDXL_SCALE, ref)


# ---------------------------------------------------------------- first-class MODEL


def test_lcm_unet_model_runs_in_comfy_ksampler(runner, sd15_lcm):
    from test_support_nodes import stash

    cond, neg = sd15_cond()
    prompt = {
        "1": {"class_type": "LCMLoadUNet", "inputs": {"unet_name": "tiny-lcm-sd15.safetensors", "weight_dtype": "fp32"}},
        "10": {"class_type": "LCMTestValue", "inputs": {"key": stash([[cond, {}]])}},
        "11": {"class_type": "LCMTestValue", "inputs": {"key": stash([[neg, {}]])}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "3": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": 3, "steps": 4, "cfg": 1.0, "sampler_name": "lcm",
                                                   "scheduler": "sgm_uniform", "positive": ["10", 0], "negative": ["11", 0],
                                                   "latent_image": ["5", 0], "denoise": 1.0}},
    }
    out = runner.run(prompt, ["3"])["3"][0][0]["samples"]
    # KSampler runs the MODEL in a real prompt; which timesteps it visits (999/759/499/259, as LCM Sampler) is
    # asserted in test_adapter.py::test_ksampler_on_our_model_visits_lcms_timesteps by recording the UNet's inputs.
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()
