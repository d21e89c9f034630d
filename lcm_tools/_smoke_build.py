"""Builds the quickstart's smoke-test models from ComfyUI's own model classes (run as a script, in a subprocess).

    python lcm_tools/_smoke_build.py COMFYUI_DIR DEST_DIR

Writes, in the layout ComfyUI's loaders read (random weights, fp16):
  checkpoints/lcm-smoke-sd15.safetensors        an SD1.5-family checkpoint: a one-level UNet (320 channels),
                                                 full-shape CLIP-L and SD VAE (ComfyUI fixes their shapes)
  diffusion_models/lcm-smoke-sd15-lcm-unet.safetensors   the same UNet shape with an LCM guidance embedding
  loras/lcm-smoke-sd15-lora.safetensors         a kohya-format LoRA that fits that UNet

This is the one file of lcm_tools that imports ComfyUI; it runs only in its own process, and only when the
quickstart has no real weights to run.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

UNET_CONFIG = {  # what ComfyUI's model detection reads back from these weights: SD1.5 family
    "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320, "num_res_blocks": [1],
    "channel_mult": [1], "transformer_depth": [1], "transformer_depth_output": [1, 1], "transformer_depth_middle": 1,
    "use_spatial_transformer": True, "legacy": False, "use_linear_in_transformer": False, "context_dim": 768,
    "num_heads": 8, "num_head_channels": -1, "adm_in_channels": None,
}
VAE_CONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
              "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
GUIDANCE_EMBED_DIM = 256  # time_cond_proj_dim of every public LCM UNet
FILES = {"ckpt": ("checkpoints", "lcm-smoke-sd15.safetensors"),
         "unet": ("diffusion_models", "lcm-smoke-sd15-lcm-unet.safetensors"),
         "lora": ("loras", "lcm-smoke-sd15-lora.safetensors")}


def randomise(module, generator, torch) -> dict:
    """The module's state dict with seeded random values: unit-ish norms, fan-in scaled weights, small biases."""
    out = {}
    for name, p in module.state_dict().items():
        if not p.is_floating_point():
            out[name] = p
            continue
        if p.ndim == 1 and "norm" in name and name.endswith("weight"):
            t = 1.0 + 0.1 * torch.randn(p.shape, generator=generator)
        elif p.ndim == 1:
            t = 0.02 * torch.randn(p.shape, generator=generator)
        else:
            fan_in = max(1, p[0].numel())
            t = torch.randn(p.shape, generator=generator) * fan_in**-0.5
        out[name] = t.to(torch.float16).contiguous()
    return out


def main(comfy_dir: str, dest: str) -> None:
    sys.path.insert(0, comfy_dir)
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # building files needs no GPU, and the machine may have none
    import comfy.clip_model
    import comfy.ops
    import torch
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from safetensors.torch import save_file

    ops = comfy.ops.disable_weight_init  # no init work: every value is set below
    g = torch.Generator("cpu").manual_seed(0)
    unet = randomise(UNetModel(**UNET_CONFIG, dtype=torch.float32, device="cpu", operations=ops), g, torch)
    clip_config = json.loads((Path(comfy_dir) / "comfy" / "sd1_clip_config.json").read_text())
    clip = comfy.clip_model.CLIPTextModel(clip_config, torch.float32, "cpu", ops)
    clip_sd = {k: v for k, v in randomise(clip, g, torch).items() if k.startswith("text_model.")}
    clip_sd["text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    vae = randomise(AutoencoderKL(ddconfig=VAE_CONFIG, embed_dim=4), g, torch)

    root = Path(dest)
    for folder, _ in FILES.values():
        (root / folder).mkdir(parents=True, exist_ok=True)

    ckpt = {f"model.diffusion_model.{k}": v for k, v in unet.items()}
    ckpt.update({f"cond_stage_model.transformer.{k}": v for k, v in clip_sd.items()})
    ckpt.update({f"first_stage_model.{k}": v for k, v in vae.items()})
    save_file(ckpt, str(root.joinpath(*FILES["ckpt"])))

    # the guidance projection adds into the timestep embedding's input (model_channels wide), as diffusers' cond_proj
    t_in = unet["time_embed.0.weight"].shape[1]
    lcm_unet = dict(unet)
    lcm_unet["time_embed.cond_proj.weight"] = (torch.randn((t_in, GUIDANCE_EMBED_DIM), generator=g)
                                               * GUIDANCE_EMBED_DIM**-0.5).to(torch.float16)
    save_file(lcm_unet, str(root.joinpath(*FILES["unet"])))

    lora = {}
    for key, w in unet.items():  # every attention / feed-forward Linear of the transformer blocks, ldm-style kohya names
        if "transformer_blocks" in key and key.endswith(".weight") and w.ndim == 2:
            name = "lora_unet_" + key[: -len(".weight")].replace(".", "_")
            out_f, in_f = w.shape
            lora[f"{name}.lora_down.weight"] = (torch.randn((4, in_f), generator=g) * 0.3 * in_f**-0.5).to(torch.float16)
            lora[f"{name}.lora_up.weight"] = (torch.randn((out_f, 4), generator=g) * 0.15).to(torch.float16)
            lora[f"{name}.alpha"] = torch.tensor(4.0)
    save_file(lora, str(root.joinpath(*FILES["lora"])))
    (root / "MANIFEST.json").write_text(json.dumps({k: "/".join(v) for k, v in FILES.items()}, indent=1))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(f"usage: {os.path.basename(sys.argv[0])} COMFYUI_DIR DEST_DIR")
    main(sys.argv[1], sys.argv[2])
