"""Bad files and bad values give one clear error naming the value and the fix (real ComfyUI graphs)."""

from __future__ import annotations

import copy
import hashlib
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
    # the family as every message and tool spells it (not ComfyUI's class name "SD15")
    assert "does not fit this SD1.5 model" in err["exception_message"]
    assert "use the LCM-LoRA for SD1.5 (" in err["exception_message"]


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


SAMPLERS = {  # the sampler nodes, with values for their own required inputs
    "LCMSampler": {},
    "LCMImg2Img": {"strength": 0.5},
    "TCDSampler": {"gamma": 0.3, "strength": 0.75},
}
SD15_POS = [[torch.zeros(1, 77, 768), {}]]
LAT = {"samples": torch.zeros(1, 4, 8, 8)}


@pytest.mark.parametrize("kw,expect", [
    ({"steps": 0}, "steps=0 is out of range"),
    ({"steps": 51}, "steps=51 exceeds original_inference_steps=50"),
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


# ------------------------------------------------------------------------------------------ bounds


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), -0.5, 100.5])
def test_bad_default_guidance_is_refused_before_the_file_is_read(runner, files, value):
    # err-garbage fails as "truncated or corrupt" once read: the guidance error proves nothing was read before it
    for unet in ("err-sd15.safetensors", "err-garbage.safetensors"):
        load = {"unet_name": unet, "weight_dtype": "fp32", "default_guidance": value}
        err = runner.error_of({"1": {"class_type": "LCMLoadUNet", "inputs": load}}, ["1"])
        assert err["exception_type"].endswith("LCMInputError"), (unet, err["exception_message"])
        assert (f"default_guidance={value!r} is out of range: use a finite number from 0 to 100 (8 is what LCM UNets "
                "are made for)") in err["exception_message"]


def expanded(*shape: int) -> torch.Tensor:
    """A zero latent of ``shape`` that takes no memory (stride 0), as big as a user's may be."""
    return torch.zeros(1, 1, 1, 1).expand(*shape)


HUGE = (64, 4, 2048, 2048)  # 64 images of 16384 x 16384 px: 4 GiB of float32, and far more for the UNet to run on


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_huge_latent_is_refused_before_any_work(runner, files, sampler):
    msg = sample_error(runner, "err-sd15.safetensors", SD15_POS, {"samples": expanded(*HUGE)}, sampler=sampler,
                       **SAMPLERS[sampler])
    assert ("latent_image is too large: 64 latent(s) of 2048 x 2048 (width x height) is 268,435,456 latent pixels; the "
            "samplers take at most 4,194,304 (one 16384 x 16384 px image") in msg
    assert "lower the width, height or batch_size" in msg


@pytest.fixture(scope="module")
def sd15_model(runner, files):
    load = {"class_type": "LCMLoadUNet", "inputs": {"unet_name": "err-sd15.safetensors", "weight_dtype": "fp32"}}
    return runner.run({"1": load}, ["1"])["1"][0][0]


@pytest.mark.parametrize("shape", [
    (1, 4, 8, 8),  # the tests' latents
    (8, 4, 128, 128),  # SDXL 1024 x 1024 px, batch 8
    (64, 4, 64, 64),  # SD1.5 512 x 512 px, batch 64
    (1, 4, 2048, 2048),  # ComfyUI's largest Empty Latent Image: at the limit
    (4096, 4, 32, 32),  # Empty Latent Image's largest batch, 256 x 256 px: at the limit
    (1, 4, 4096, 1024),  # a 32768 x 8192 px panorama (VAE Encode of a big image): within the pixel limit
])
def test_normal_and_limit_sized_latents_pass(pack, sd15_model, shape):
    assert pack.comfy.checks.check_latent({"samples": expanded(*shape)}, sd15_model).shape == shape


@pytest.mark.parametrize("shape,expect", [
    (HUGE, "64 latent(s) of 2048 x 2048 (width x height) is 268,435,456 latent pixels; the samplers take at most 4,194,304"),
    ((1, 4, 2048, 2049), "1 latent(s) of 2049 x 2048 (width x height) is 4,196,352 latent pixels; the samplers take at most 4,194,304"),
    ((2, 4, 1024, 4096), "2 latent(s) of 4096 x 1024 (width x height) is 8,388,608 latent pixels"),
    ((4097, 4, 1, 1), "latent_image has a batch of 4097 latents; the samplers take at most 4096"),
])
def test_too_large_latents_are_refused_from_their_shape_alone(pack, sd15_model, shape, expect):
    # on the meta device a tensor has a shape and no values: any read of them (NaN check, channel check) would raise
    with pytest.raises(pack.core.LCMInputError) as e:
        pack.comfy.checks.check_latent({"samples": torch.empty(shape, device="meta")}, sd15_model)
    assert expect in str(e.value)


def test_sd15_conditioning_into_sdxl(runner, files):
    msg = sample_error(runner, "tiny-sdxl.safetensors", SD15_POS, LAT)
    assert "width 768 but the model expects 2048" in msg


def test_batch_mismatch(runner, files):
    pos = [[torch.zeros(3, 77, 768), {}]]
    msg = sample_error(runner, "err-sd15.safetensors", pos, {"samples": torch.zeros(2, 4, 8, 8)})
    assert "batch 3 but latent_image has batch 2" in msg


# ------------------------------------------------------------------------------------------ inputs are not mutated

# What a ModelPatcher is to ComfyUI: everything a clone copies and a sampler could change in place. (The pack's
# sampling-clone registry, remembered beside the MODEL by design, is not part of it; see lcm_comfy/fastpath.py.)
PATCHER_FIELDS = ("model_options", "object_patches", "patches", "wrappers", "callbacks", "attachments", "additional_models",
                  "injections", "hook_patches", "weight_wrapper_patches", "patches_uuid", "parent", "force_cast_weights",
                  "load_device", "offload_device")


def snapshot(obj, path: str = "", out: dict | None = None) -> dict[str, object]:
    """``obj`` flattened to {path: comparable leaf}: tensors by dtype, shape and a hash of their bytes, containers
    by content, modules by identity and state, other objects by type and identity (a wrapper or callback swapped
    for another shows; one added or removed shows as a path)."""
    out = {} if out is None else out
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        out[path] = ("tensor", str(t.dtype), tuple(t.shape), hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest())
    elif isinstance(obj, dict):
        out[path] = ("dict", len(obj))
        for k, v in obj.items():
            snapshot(v, f"{path}[{k!r}]", out)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj, key=repr) if isinstance(obj, (set, frozenset)) else obj
        out[path] = (type(obj).__name__, len(obj))
        for i, v in enumerate(items):
            snapshot(v, f"{path}[{i}]", out)
    elif obj is None or isinstance(obj, (bool, int, str, bytes)):
        out[path] = obj
    elif isinstance(obj, float):
        out[path] = repr(obj)  # NaN == NaN
    elif isinstance(obj, torch.nn.Module):
        out[path] = ("module", type(obj).__qualname__, id(obj))
        snapshot(dict(obj.state_dict(keep_vars=True)), f"{path}.state_dict()", out)
    else:
        out[path] = (type(obj).__qualname__, id(obj))
    return out


def model_snapshot(model) -> dict[str, object]:
    """A MODEL's ComfyUI state (:data:`PATCHER_FIELDS`, deep), its model's identity and its UNet's weights' values.

    (Not the rest of ``model.model``: ComfyUI applies a loaded clone's object patches to that shared module in place.)
    """
    out = snapshot({name: getattr(model, name) for name in PATCHER_FIELDS})
    out["model"] = (type(model.model).__qualname__, id(model.model))
    snapshot(dict(model.model.diffusion_model.state_dict()), "weights", out)
    return out


def changes(before: dict, after: dict) -> list[str]:
    return [f"{k}: {before.get(k, '<absent>')} -> {after.get(k, '<absent>')}" for k in sorted(set(before) | set(after))
            if before.get(k, "<absent>") != after.get(k, "<absent>")]


@pytest.fixture(scope="module")
def guided_unet(files):
    path = files / "models" / "diffusion_models" / "err-sd15-guided.safetensors"
    save_unet(tiny_sd15_unet(time_cond_proj_dim=256, seed=4), path)
    return path.name


@pytest.mark.parametrize("guided", [True, False], ids=["guidance-embedding", "cfg"])
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_inputs_are_not_mutated(runner, files, guided_unet, sampler, guided):
    """The MODEL, conditionings and latent a user passes in come back unchanged, deep: weights, model_options
    (transformer_options, wrappers), object patches, weight patches, callbacks; tensors' values and dicts' keys."""
    unet = guided_unet if guided else "err-sd15.safetensors"
    load = {"class_type": "LCMLoadUNet", "inputs": {"unet_name": unet, "weight_dtype": "fp32", "default_guidance": 8.0}}
    model = runner.run({"1": load}, ["1"])["1"][0][0]
    g = torch.Generator().manual_seed(0)
    lat = {"samples": torch.randn(1, 4, 8, 8, generator=g)}
    pos = [[torch.randn(1, 77, 768, generator=g), {"extra": torch.ones(2)}]]
    neg = [[torch.randn(1, 77, 768, generator=g), {}]]
    before = {"model": model_snapshot(model), "latent": snapshot(lat), "positive": snapshot(pos), "negative": snapshot(neg)}
    inputs = dict({"model": ["10", 0], "positive": ["11", 0], "negative": ["12", 0], "latent_image": ["13", 0], "seed": 1,
                   "steps": 2, "guidance_scale": 3.0 if guided else 2.0, "fast": True}, **SAMPLERS[sampler])
    prompt = {
        "10": {"class_type": "LCMTestValue", "inputs": {"key": stash(model)}},
        "11": {"class_type": "LCMTestValue", "inputs": {"key": stash(pos)}},
        "12": {"class_type": "LCMTestValue", "inputs": {"key": stash(neg)}},
        "13": {"class_type": "LCMTestValue", "inputs": {"key": stash(lat)}},
        "3": {"class_type": sampler, "inputs": inputs},
    }
    out = runner.run(prompt, ["3"])["3"][0][0]
    after = {"model": model_snapshot(model), "latent": snapshot(lat), "positive": snapshot(pos), "negative": snapshot(neg)}
    for name in before:
        assert not changes(before[name], after[name]), f"{sampler} changed its {name} input: " + "; ".join(changes(before[name], after[name]))
    assert out is not lat and out["samples"] is not lat["samples"] and out["samples"].dtype == torch.float32
    assert "model_sampling" in model.object_patches  # the snapshot saw the MODEL Load LCM UNet set up


def test_snapshot_sees_a_change_anywhere(runner, files):
    """The snapshot the test above compares cannot be blind: every kind of change it must catch, caught."""
    load = {"class_type": "LCMLoadUNet", "inputs": {"unet_name": "err-sd15.safetensors", "weight_dtype": "fp32"}}
    model = runner.run({"1": load}, ["1"])["1"][0][0]
    mutations = {
        "model_options entry": lambda m: m.model_options.setdefault("transformer_options", {}).__setitem__("x", 1),
        "transformer_options value": lambda m: m.model_options["transformer_options"].__setitem__(
            next(iter(m.model_options["transformer_options"]), "y"), 2.5),
        "object patch": lambda m: m.object_patches.__setitem__("model_sampling", object()),
        "wrapper": lambda m: m.wrappers.setdefault("diffusion_model", {}).setdefault("t", []).append(print),
        "callback": lambda m: m.callbacks.setdefault("on_clone", {}).setdefault("t", []).append(print),
        "weight patch": lambda m: m.patches.setdefault("k", []).append((1.0, torch.ones(1))),
    }
    for what, mutate in mutations.items():
        clone = model.clone()
        clone.model_options = copy.deepcopy(model.model_options)
        before = model_snapshot(clone)
        mutate(clone)
        assert changes(before, model_snapshot(clone)), what
    weight = next(iter(model.model.diffusion_model.parameters())).data.view(-1)  # shared with the cached MODEL: restored
    before, kept = model_snapshot(model), weight[0].item()
    try:
        with torch.inference_mode():  # ComfyUI loaded them as inference tensors
            weight[0] += 1.0
        assert [c for c in changes(before, model_snapshot(model)) if c.startswith("weights[")], "weight value"
    finally:
        with torch.inference_mode():
            weight[0] = kept
    assert not changes(before, model_snapshot(model))


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
