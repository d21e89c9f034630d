"""Bad files and bad values give one clear error naming the value and the fix (real ComfyUI graphs)."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from models import random_lora, save_unet, tiny_sd15_unet, tiny_sdxl_unet
from safetensors.torch import save_file
from test_support_nodes import stash


@pytest.fixture(scope="module")
def files(comfy, comfy_base):
    dm = comfy_base / "models" / "diffusion_models"
    loras = comfy_base / "models" / "loras"
    sd15 = tiny_sd15_unet(time_cond_proj_dim=None, seed=3)
    save_unet(sd15, dm / "err-sd15.safetensors")
    sdxl_path = dm / "tiny-sdxl.safetensors"
    if not sdxl_path.exists():
        save_unet(tiny_sdxl_unet(), sdxl_path)
    save_file(random_lora(sd15, "kohya"), str(loras / "err-sd15-lora.safetensors"))
    save_file({"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3), "decoder.conv_in.weight": torch.zeros(8, 4, 3, 3)},
              str(dm / "err-vae.safetensors"))
    save_file({"text_model.embeddings.token_embedding.weight": torch.zeros(10, 8)}, str(dm / "err-te.safetensors"))
    (dm / "err-empty.safetensors").write_bytes(b"")
    good = (dm / "err-sd15.safetensors").read_bytes()
    (dm / "err-truncated.safetensors").write_bytes(good[: len(good) // 3])
    (dm / "err-garbage.safetensors").write_bytes(os.urandom(4096))
    save_file({"foo.weight": torch.zeros(2, 2)}, str(loras / "err-notlora.safetensors"))
    return comfy_base


def load_error(runner, name):
    return runner.error_of({"1": {"class_type": "LCMLoadUNet", "inputs": {"unet_name": name, "weight_dtype": "fp32"}}}, ["1"])


@pytest.mark.parametrize("name,expect", [
    ("err-vae.safetensors", "it is a VAE; load it with Load VAE"),
    ("err-te.safetensors", "it is a text encoder"),
    ("err-empty.safetensors", "is empty (0 bytes)"),
    ("err-truncated.safetensors", "truncated or corrupt"),
    ("err-garbage.safetensors", "truncated or corrupt"),
    ("../../etc/passwd.safetensors", "leaves ComfyUI's model folders"),
    ("/etc/passwd", "leaves ComfyUI's model folders"),
])
def test_bad_unet_files_name_the_file_and_the_fix(runner, files, name, expect):
    err = load_error(runner, name)
    assert err["exception_type"].endswith("LCMModelError") or err["exception_type"].endswith("LCMInputError")
    assert expect in err["exception_message"]


def test_pickle_is_refused_and_never_executed(runner, files, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = files / "models" / "diffusion_models" / "evil.ckpt"
    path.write_bytes(pickle.dumps({"state_dict": Evil()}))
    err = load_error(runner, "evil.ckpt")
    assert "only .safetensors is read" in err["exception_message"]
    assert f"python -m lcm_tools convert {path}" in err["exception_message"]  # the fix, runnable as written
    assert not marker.exists()
    # the planted file really is live: unpickling it (what a torch.load without weights_only does) runs the code
    pickle.loads(path.read_bytes())
    assert marker.exists()


def lora_error(runner, unet, lora, **kw):
    prompt = {
        "1": {"class_type": "LCMLoadUNet", "inputs": {"unet_name": unet, "weight_dtype": "fp32"}},
        "2": {"class_type": "LCMApplyLoRA", "inputs": dict({"model": ["1", 0], "lora_name": lora, "strength": 1.0}, **kw)},
    }
    return runner.error_of(prompt, ["2"])


def test_sd15_lora_on_sdxl_names_both(runner, files):
    err = lora_error(runner, "tiny-sdxl.safetensors", "err-sd15-lora.safetensors")
    msg = err["exception_message"]
    import re

    assert re.search(r"^LoRA 'err-sd15-lora\.safetensors' does not fit this SDXL model: (\d+) of (\d+) UNet modules fit; "
                     r"\d+ have the wrong shape \(e\.g\. .*\(320x768 vs layer 320x2048\)\)", msg), msg
    fit, total = map(int, re.search(r"(\d+) of (\d+) UNet modules fit", msg).groups())
    assert fit < total
    assert "use the LCM-LoRA for SDXL (lcm-lora-sdxl for SDXL" in msg


def test_sdxl_lora_on_sd15_names_both(runner, files, comfy_base):
    path = comfy_base / "models" / "loras" / "err-sdxl-lora.safetensors"
    save_file(random_lora(tiny_sdxl_unet(), "peft"), str(path))
    err = lora_error(runner, "err-sd15.safetensors", "err-sdxl-lora.safetensors")
    assert "does not fit this SD15 model" in err["exception_message"]


def test_not_a_lora(runner, files):
    err = lora_error(runner, "err-sd15.safetensors", "err-notlora.safetensors")
    assert "is not a LoRA" in err["exception_message"]


def sample_error(runner, unet, positive, latent, sampler="LCMSampler", **kw):
    inputs = dict({"model": ["1", 0], "positive": ["10", 0], "latent_image": ["11", 0], "seed": 1, "steps": 4,
                   "guidance_scale": 1.0}, **kw)
    prompt = {
        "1": {"class_type": "LCMLoadUNet", "inputs": {"unet_name": unet, "weight_dtype": "fp32"}},
        "10": {"class_type": "LCMTestValue", "inputs": {"key": stash(positive)}},
        "11": {"class_type": "LCMTestValue", "inputs": {"key": stash(latent)}},
        "3": {"class_type": sampler, "inputs": inputs},
    }
    return runner.error_of(prompt, ["3"])["exception_message"]


SD15_POS = [[torch.zeros(1, 77, 768), {}]]
LAT = {"samples": torch.zeros(1, 4, 8, 8)}


@pytest.mark.parametrize("kw,expect", [
    ({"steps": 0}, "steps=0 is out of range"),
    ({"steps": 51}, "steps=51 is out of range"),
    ({"timesteps": "259, 499"}, "strictly descending"),
    ({"timesteps": "1200, 10"}, "leave the range"),
    ({"timesteps": "999, abc"}, "not a whole number"),
    ({"guidance_scale": float("nan")}, "guidance_scale=nan"),
    ({"original_inference_steps": 2}, "exceeds original_inference_steps=2"),
])
def test_bad_sampler_values(runner, files, kw, expect):
    assert expect in sample_error(runner, "err-sd15.safetensors", SD15_POS, LAT, **kw)


@pytest.mark.parametrize("strength,expect", [(0.0, "strength=0.0 is out of range"), (1.5, "strength=1.5 is out of range")])
def test_bad_strength(runner, files, strength, expect):
    assert expect in sample_error(runner, "err-sd15.safetensors", SD15_POS, {"samples": torch.randn(1, 4, 8, 8)},
                                  sampler="LCMImg2Img", strength=strength)


def test_nan_latent(runner, files):
    lat = {"samples": torch.full((1, 4, 8, 8), float("nan"))}
    assert "NaN or Inf" in sample_error(runner, "err-sd15.safetensors", SD15_POS, lat, sampler="LCMImg2Img", strength=0.5)


def test_sd15_conditioning_into_sdxl(runner, files):
    msg = sample_error(runner, "tiny-sdxl.safetensors", SD15_POS, LAT)
    assert "width 768 but the model expects 2048" in msg


def test_batch_mismatch(runner, files):
    pos = [[torch.zeros(3, 77, 768), {}]]
    msg = sample_error(runner, "err-sd15.safetensors", pos, {"samples": torch.zeros(2, 4, 8, 8)})
    assert "batch 3 but latent_image has batch 2" in msg


def test_inputs_are_not_mutated(runner, files):
    """The MODEL, conditioning and latent a user passes in come back unchanged."""
    lat = {"samples": torch.randn(1, 4, 8, 8)}
    before = lat["samples"].clone()
    pos = [[torch.randn(1, 77, 768), {}]]
    pos_before = pos[0][0].clone()
    prompt = {
        "1": {"class_type": "LCMLoadUNet", "inputs": {"unet_name": "err-sd15.safetensors", "weight_dtype": "fp32"}},
        "10": {"class_type": "LCMTestValue", "inputs": {"key": stash(pos)}},
        "11": {"class_type": "LCMTestValue", "inputs": {"key": stash(lat)}},
        "3": {"class_type": "LCMImg2Img", "inputs": {"model": ["1", 0], "positive": ["10", 0], "latent_image": ["11", 0],
                                                     "seed": 1, "steps": 2, "guidance_scale": 1.0, "strength": 0.5}},
    }
    out = runner.run(prompt, ["1", "3"])
    model = out["1"][0][0]
    patches_before = len(model.patches)
    assert torch.equal(lat["samples"], before) and torch.equal(pos[0][0], pos_before)
    assert out["3"][0][0]["samples"].dtype == torch.float32
    assert len(model.patches) == patches_before and "model_sampling" in model.object_patches


def test_unet_shape_comfy_cannot_run(runner, files, comfy_base):
    from diffusers import UNet2DConditionModel

    odd = UNet2DConditionModel(sample_size=8, block_out_channels=(64,), down_block_types=("CrossAttnDownBlock2D",),
                               up_block_types=("CrossAttnUpBlock2D",), layers_per_block=1, cross_attention_dim=512,
                               attention_head_dim=8, norm_num_groups=32)
    save_unet(odd, comfy_base / "models" / "diffusion_models" / "err-odd-shape.safetensors")
    err = load_error(runner, "err-odd-shape.safetensors")
    assert "does not recognise the shape of UNet 'err-odd-shape.safetensors'" in err["exception_message"]


def test_partly_fitting_lora_reports_counts(runner, files, comfy_base):
    lora = random_lora(tiny_sd15_unet(time_cond_proj_dim=None, seed=3), "kohya")
    names = sorted({k.rsplit(".", 2)[0] for k in lora if k.endswith("lora_down.weight")})
    broken = names[0]
    lora = {k.replace(broken, broken + "_nowhere"): v for k, v in lora.items()}
    save_file(lora, str(comfy_base / "models" / "loras" / "err-partial.safetensors"))
    err = lora_error(runner, "err-sd15.safetensors", "err-partial.safetensors")
    assert f"{len(names) - 1} of {len(names)} UNet modules fit" in err["exception_message"]
    prompt = {
        "1": {"class_type": "LCMLoadUNet", "inputs": {"unet_name": "err-sd15.safetensors", "weight_dtype": "fp32"}},
        "2": {"class_type": "LCMApplyLoRA", "inputs": {"model": ["1", 0], "lora_name": "err-partial.safetensors", "strength": 1.0,
                                                       "allow_partial": True}},
    }
    model = runner.run(prompt, ["2"])["2"][0][0]
    assert len(model.patches) == len(names) - 1  # what fits was applied, and only that
