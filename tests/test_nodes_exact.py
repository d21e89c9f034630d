"""The four nodes in real ComfyUI v0.8.0 graphs, compared with diffusers' pipelines on the same weights.

Tolerance (issue #3): max |ours - diffusers| <= 1e-4 * max(1, max |diffusers|), float32 on CPU.
"""

from __future__ import annotations

import pytest
import torch

from models import random_lora, save_unet, tiny_sd15_unet, tiny_sdxl_unet, tiny_vae

from lcm_core import conditioning_to_diffusers, diffusers_to_conditioning

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
