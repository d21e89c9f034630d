"""The file layouts the README says Load LCM UNet and Apply LCM-LoRA read, each loaded through the node and sampled.

Load LCM UNet: a diffusers-layout UNet file (the reference, itself checked against diffusers' LCM pipeline) and the
same weights as a ComfyUI (ldm) UNet with the guidance embedding, as a checkpoint-style file, in a models/diffusers
folder (a pipeline's unet/ with config.json, or a UNet's own folder without one), beside a config.json, in ComfyUI's
legacy models/unet folder, and as fp16 files (a single file, and diffusers' ``.fp16`` variant). Apply LCM-LoRA: a
kohya LoRA with ComfyUI's ldm module names against the same tensors under diffusers' names.

Every variant holds the reference's very tensors (the fp16 ones: the reference's rounded to fp16, against a float32
reference of those rounded values), so ComfyUI builds the same model and runs the same arithmetic: the latents must
be equal bit for bit, and any difference is a wrong or missing weight.
"""

from __future__ import annotations

import json

import pytest
import torch
from models import diffusers_unet_to_ldm, random_lora, save_unet, tiny_sd15_unet, tiny_vae
from safetensors.torch import save_file
from test_support_nodes import SEED, assert_close, run_sampler

SD15_SCALE = 0.18215
REFERENCE = "variants-ref.safetensors"
REFERENCE_FP16 = "variants-ref-fp16-values.safetensors"
#: variant name in Load LCM UNet's list -> the reference it must equal
VARIANTS = {
    "variants/ldm-unet.safetensors": REFERENCE,
    "variants/ldm-checkpoint.safetensors": REFERENCE,
    "diffusers/variants-pipeline": REFERENCE,
    "diffusers/variants-unet-only": REFERENCE,
    "variants-config/unet.safetensors": REFERENCE,
    "variants-legacy-folder.safetensors": REFERENCE,
    "variants-fp16.safetensors": REFERENCE_FP16,
    "diffusers/variants-fp16": REFERENCE_FP16,
}
BASE = "variants-base.safetensors"
LORAS = {"kohya": "variants-lora-kohya.safetensors", "kohya-ldm": "variants-lora-kohya-ldm.safetensors"}


def write_config(unet, folder) -> None:
    (folder / "config.json").write_text(json.dumps(dict(unet.config, _class_name="UNet2DConditionModel")))


@pytest.fixture(scope="module")
def lcm_unet(comfy, comfy_base):
    """An LCM UNet (guidance embedding) written in every layout; returns the diffusers model."""
    models = comfy_base / "models"
    dm, diffusers = models / "diffusion_models", models / "diffusers"
    unet = tiny_sd15_unet(time_cond_proj_dim=256, seed=81)
    sd = {k: v.contiguous() for k, v in unet.state_dict().items()}
    cond_proj = sd["time_embedding.cond_proj.weight"]
    ldm = {**diffusers_unet_to_ldm(unet), "time_embed.cond_proj.weight": cond_proj}
    assert len(ldm) == len(sd)  # every weight has its ldm name

    save_unet(unet, dm / REFERENCE)
    (dm / "variants").mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in ldm.items()}, str(dm / "variants" / "ldm-unet.safetensors"))
    save_file({"model.diffusion_model." + k: v.contiguous() for k, v in ldm.items()}, str(dm / "variants" / "ldm-checkpoint.safetensors"))
    save_unet(unet, diffusers / "variants-pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    write_config(unet, diffusers / "variants-pipeline" / "unet")
    save_unet(unet, diffusers / "variants-unet-only" / "diffusion_pytorch_model.safetensors")
    save_unet(unet, dm / "variants-config" / "unet.safetensors")
    write_config(unet, dm / "variants-config")  # in a folder of its own: a config.json applies to its folder's files
    save_unet(unet, models / "unet" / "variants-legacy-folder.safetensors")

    rounded = {k: v.half().float() for k, v in sd.items()}
    assert any(not torch.equal(rounded[k], v) for k, v in sd.items())  # else fp16 files could not be told from float32 ones
    save_file(rounded, str(dm / REFERENCE_FP16))
    save_unet(unet, dm / "variants-fp16.safetensors", dtype=torch.float16)
    save_unet(unet, diffusers / "variants-fp16" / "unet" / "diffusion_pytorch_model.fp16.safetensors", dtype=torch.float16)
    write_config(unet, diffusers / "variants-fp16" / "unet")
    return unet


_SAMPLES: dict[str, torch.Tensor] = {}


def lcm_samples(runner, name: str) -> torch.Tensor:
    """Load LCM UNet ``name`` -> LCM Sampler, 4 steps at guidance 8 (the guidance embedding in play); once per name."""
    if name not in _SAMPLES:
        cond = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(3))
        _SAMPLES[name] = run_sampler(runner, name, "LCMSampler", [[cond, {}]], None, {"samples": torch.zeros(1, 4, 8, 8)},
                                     steps=4, guidance_scale=8.0)
    return _SAMPLES[name]


@pytest.mark.usefixtures("cpu_exactness")
def test_the_reference_layout_matches_diffusers(runner, lcm_unet):
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    pipe = LatentConsistencyModelPipeline(vae=tiny_vae(), text_encoder=None, tokenizer=None, unet=lcm_unet, scheduler=LCMScheduler(),
                                          safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt_embeds=torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(3)), num_inference_steps=4,
               guidance_scale=8.0, height=64, width=64, output_type="latent", generator=torch.Generator("cpu").manual_seed(SEED)).images
    assert_close(lcm_samples(runner, REFERENCE) * SD15_SCALE, ref)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_each_unet_layout_is_listed_loads_and_samples_as_the_reference(comfy, runner, lcm_unet, name):
    kind, options = comfy.NODE_CLASS_MAPPINGS["LCMLoadUNet"].INPUT_TYPES()["required"]["unet_name"]
    assert kind == "COMBO" and name in options["options"]  # the user can pick it
    assert torch.equal(lcm_samples(runner, name), lcm_samples(runner, VARIANTS[name]))


@pytest.fixture(scope="module")
def lora_files(comfy, comfy_base):
    """A plain SD1.5 UNet and one random LoRA for it, in kohya format under diffusers' and under ComfyUI's module names."""
    unet = tiny_sd15_unet(time_cond_proj_dim=None, seed=83)
    save_unet(unet, comfy_base / "models" / "diffusion_models" / BASE)
    for fmt, name in LORAS.items():
        save_file(random_lora(unet, fmt, seed=84), str(comfy_base / "models" / "loras" / name))
    return unet


def test_kohya_lora_with_ldm_names_equals_diffusers_names(runner, lora_files):
    """Same tensors, other module names: the same patches, so the same latents; and the LoRA changes them."""
    cond = [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(4)), {}]]
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    runs = {fmt: run_sampler(runner, BASE, "LCMSampler", cond, None, latent, lora=name, steps=4, guidance_scale=1.0)
            for fmt, name in LORAS.items()}
    plain = run_sampler(runner, BASE, "LCMSampler", cond, None, latent, steps=4, guidance_scale=1.0)
    assert torch.equal(runs["kohya-ldm"], runs["kohya"])
    assert (runs["kohya"] - plain).abs().max() > 1e-3
