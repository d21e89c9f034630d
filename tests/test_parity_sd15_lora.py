"""SD1.5 + LCM-LoRA, the quickstart's default workflow (workflows/api/sd15-lcm-lora-txt2img.api.json), against diffusers.

The bundled workflow runs as it ships (its seed, steps, guidance and sampler settings), on tiny files: a random-weight
SD1.5-family checkpoint (the quickstart smoke test's kind) and a random LCM-LoRA in kohya format with diffusers
module names (as lcm-lora-sdv1-5 ships), at 64 x 64 instead of 512 x 512. The oracle is StableDiffusionPipeline with
LCMScheduler, the UNet weights read back from the checkpoint file, the LoRA loaded by diffusers' own
``load_lora_weights`` and the prompt embeddings the workflow's CLIP Text Encode nodes produced.

Tolerance (issue #3): max |ours - diffusers| <= 1e-4 * max(1, max |diffusers|), float32 on CPU (``assert_close``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from models import random_lora, tiny_sd15_checkpoint, tiny_sd15_unet, tiny_vae, unet_from_checkpoint
from oracles import conditioning_to_diffusers
from safetensors.torch import save_file
from test_support_nodes import assert_close

WORKFLOW = Path(__file__).resolve().parents[1] / "workflows" / "api" / "sd15-lcm-lora-txt2img.api.json"
CKPT = "parity-sd15-ckpt.safetensors"
LORA = "parity-sd15-lcm-lora.safetensors"
SD15_SCALE = 0.18215


@pytest.fixture(scope="module")
def oracle_unet(comfy, comfy_base):
    """The checkpoint and LoRA files; returns the diffusers UNet with the checkpoint's own UNet weights."""
    models = comfy_base / "models"
    tiny_sd15_checkpoint(models / "checkpoints" / CKPT, seed=71)
    unet = unet_from_checkpoint(models / "checkpoints" / CKPT, tiny_sd15_unet(time_cond_proj_dim=None))
    save_file(random_lora(unet, "kohya", seed=72), str(models / "loras" / LORA))
    return unet


@pytest.mark.usefixtures("cpu_exactness")
def test_quickstart_workflow_matches_diffusers(runner, oracle_unet, comfy_base):
    from diffusers import LCMScheduler, StableDiffusionPipeline

    prompt = json.loads(WORKFLOW.read_text())
    by_type = {node["class_type"]: node_id for node_id, node in prompt.items()}
    prompt[by_type["CheckpointLoaderSimple"]]["inputs"]["ckpt_name"] = CKPT
    prompt[by_type["LCMApplyLoRA"]]["inputs"]["lora_name"] = LORA
    prompt[by_type["EmptyLatentImage"]]["inputs"].update(width=64, height=64)
    sampler = prompt[by_type["LCMSampler"]]
    settings = sampler["inputs"]
    assert (settings["steps"], settings["guidance_scale"], settings["timesteps"]) == (4, 1.0, "")  # what the oracle runs
    positive, negative = settings["positive"][0], settings["negative"][0]
    out = runner.run(prompt, [by_type["LCMSampler"], positive, negative])
    ours = out[by_type["LCMSampler"]][0][0]["samples"]

    pipe = StableDiffusionPipeline(vae=tiny_vae(), text_encoder=None, tokenizer=None, unet=oracle_unet, scheduler=LCMScheduler(steps_offset=1),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    embeds = {name: conditioning_to_diffusers(out[node][0][0]).prompt_embeds for name, node in (("prompt", positive), ("negative", negative))}

    def diffusers_latents():
        return pipe(prompt_embeds=embeds["prompt"], negative_prompt_embeds=embeds["negative"], num_inference_steps=settings["steps"],
                    guidance_scale=settings["guidance_scale"], height=64, width=64, output_type="latent",
                    generator=torch.Generator("cpu").manual_seed(settings["seed"])).images

    pipe.load_lora_weights(str(comfy_base / "models" / "loras"), weight_name=LORA)
    ref = diffusers_latents()
    pipe.unload_lora_weights()
    without_lora = diffusers_latents()
    assert_close(ours * SD15_SCALE, ref)
    assert (without_lora - ref).abs().max() > 100 * 1e-4 * max(1.0, ref.abs().max().item())  # the LoRA is in play
