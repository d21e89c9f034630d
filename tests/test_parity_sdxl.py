"""SDXL-family parity through the pack's nodes, against diffusers' SDXL pipelines with LCMScheduler:

- an LCM SDXL UNet with its guidance embedding (``time_cond_proj_dim`` 256, as latent-consistency/lcm-sdxl) through
  Load LCM UNet -> LCM Sampler (txt2img) and -> LCM Img2Img with ``strength_mode`` "truncate" (img2img, what the
  lcm-sdxl-unet-img2img workflow uses), against StableDiffusionXLPipeline / StableDiffusionXLImg2ImgPipeline, which
  feed ``guidance_scale`` to the embedding and run no CFG;
- an SSD-1B-shaped UNet with an LCM-LoRA made by peft on LCM-LoRA's target modules and saved as LCM-LoRA files are
  (kohya format, diffusers module names), through Load LCM UNet -> Apply LCM-LoRA -> LCM Sampler, against
  StableDiffusionXLPipeline running the peft model itself (not the file read back by diffusers).

Tolerance (issue #3): max |ours - diffusers| <= 1e-4 * max(1, max |diffusers|), float32 on CPU (``assert_close``).
Prompt embeddings are 8 tokens long: these UNets' cost is mostly their cross-attentions' key/value projections of
the text, and nothing checked here depends on the prompt's length.
"""

from __future__ import annotations

import pytest
import torch
from models import add_peft_lora, save_unet, tiny_sdxl_unet, tiny_ssd1b_unet, tiny_vae
from oracles import conditioning_to_diffusers, diffusers_to_conditioning
from safetensors.torch import save_file
from test_support_nodes import SEED, assert_close, run_sampler, sampler_prompt

SDXL_SCALE = 0.13025
TOKENS = 8
LCM_SDXL = "parity-lcm-sdxl.safetensors"
SSD1B = "parity-ssd1b.safetensors"
SSD1B_LORA = "parity-ssd1b-lcm-lora.safetensors"


def sdxl_cond(h: int, w: int, seed: int = 5) -> tuple[list, list]:
    """Positive and negative SDXL CONDITIONING (text, pooled text, size ids) for an h x w latent."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([[h * 8, w * 8, 0, 0, h * 8, w * 8]], dtype=torch.float32)
    return tuple(diffusers_to_conditioning(torch.randn(1, TOKENS, 2048, generator=g), torch.randn(1, 1280, generator=g), ids)
                 for _ in range(2))


def pipeline(unet, img2img: bool = False):
    from diffusers import LCMScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(vae=tiny_vae(), text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
                                     unet=unet, scheduler=LCMScheduler())
    if img2img:
        pipe = StableDiffusionXLImg2ImgPipeline(**pipe.components, requires_aesthetics_score=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_latents(pipe, positive, negative, shape, guidance: float, steps: int, **kw) -> torch.Tensor:
    p = conditioning_to_diffusers(positive, shape[2:])
    n = conditioning_to_diffusers(negative, shape[2:])
    return pipe(prompt_embeds=p.prompt_embeds, pooled_prompt_embeds=p.pooled_prompt_embeds, negative_prompt_embeds=n.prompt_embeds,
                negative_pooled_prompt_embeds=n.pooled_prompt_embeds, num_inference_steps=steps, guidance_scale=guidance,
                output_type="latent", height=shape[2] * 8, width=shape[3] * 8, generator=torch.Generator("cpu").manual_seed(SEED),
                **kw).images


# ---------------------------------------------------------------- LCM SDXL UNet (guidance embedding)


@pytest.fixture(scope="module")
def lcm_sdxl(comfy, comfy_base):
    unet = tiny_sdxl_unet(time_cond_proj_dim=256, seed=61)
    save_unet(unet, comfy_base / "models" / "diffusion_models" / LCM_SDXL)
    return unet


@pytest.mark.usefixtures("cpu_exactness")
def test_lcm_sdxl_unet_txt2img_matches_diffusers(runner, lcm_sdxl):
    """4 steps at guidance 8 (the recommended setting); the negative prompt is connected, and ignored as diffusers ignores
    it for a UNet with a guidance embedding."""
    pos, neg = sdxl_cond(8, 8)
    ours = run_sampler(runner, LCM_SDXL, "LCMSampler", pos, neg, {"samples": torch.zeros(1, 4, 8, 8)}, steps=4, guidance_scale=8.0)
    ref = diffusers_latents(pipeline(lcm_sdxl), pos, neg, (1, 4, 8, 8), 8.0, 4)
    assert_close(ours * SDXL_SCALE, ref)


@pytest.mark.usefixtures("cpu_exactness")
def test_lcm_sdxl_unet_img2img_matches_diffusers(runner, lcm_sdxl):
    """strength 0.5 at 4 steps, "truncate": the SDXL img2img pipeline drops the first two of 999/759/499/259."""
    pos, neg = sdxl_cond(8, 8)
    init = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(12))  # a raw VAE latent
    ours = run_sampler(runner, LCM_SDXL, "LCMImg2Img", pos, neg, {"samples": init}, steps=4, guidance_scale=8.0, strength=0.5,
                       strength_mode="truncate")
    ref = diffusers_latents(pipeline(lcm_sdxl, img2img=True), pos, neg, init.shape, 8.0, 4, image=init * SDXL_SCALE, strength=0.5)
    assert_close(ours * SDXL_SCALE, ref)


# ---------------------------------------------------------------- SSD-1B + LCM-LoRA


@pytest.fixture(scope="module")
def ssd1b(comfy, comfy_base):
    """The SSD-1B UNet saved plain (diffusers layout), then given its peft LoRA in memory; the LoRA saved as a file."""
    unet = tiny_ssd1b_unet(seed=62)
    save_unet(unet, comfy_base / "models" / "diffusion_models" / SSD1B)
    save_file(add_peft_lora(unet, seed=63), str(comfy_base / "models" / "loras" / SSD1B_LORA))
    return unet


@pytest.mark.usefixtures("cpu_exactness")
def test_ssd1b_lcm_lora_matches_diffusers_running_the_peft_model(runner, ssd1b):
    """4 steps, guidance 1.0 (the LCM-LoRA setting: no CFG). ComfyUI takes the UNet for SSD-1B (not SDXL), and every
    module of the LoRA lands (Apply LCM-LoRA refuses a partial fit)."""
    pos, neg = sdxl_cond(8, 8)
    prompt = sampler_prompt(SSD1B, "LCMSampler", pos, neg, {"samples": torch.zeros(1, 4, 8, 8)}, lora=SSD1B_LORA,
                            steps=4, guidance_scale=1.0)
    out = runner.run(prompt, ["1", "3"])
    assert type(out["1"][0][0].model.model_config).__name__ == "SSD1B"
    ref = diffusers_latents(pipeline(ssd1b), pos, neg, (1, 4, 8, 8), 1.0, 4)
    assert_close(out["3"][0][0]["samples"] * SDXL_SCALE, ref)
