"""Tiny random-weight models and LoRAs built by the tests (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file


def _randomise(module: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """Replace every parameter with seeded noise, so zero-initialised layers (conv_out, cond_proj) matter too."""
    g = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and ("norm" in name):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g)) if name.endswith("weight") else p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = max(1, p[0].numel()) if p.ndim > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g) * (scale if p.ndim == 1 else fan_in**-0.5))


def tiny_sd15_unet(time_cond_proj_dim: int | None = 256, seed: int = 0):
    """SD1.5-shaped (320 channels, context 768, 8 heads, no linear projection) one-level UNet, ~21M params."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(320,), down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, time_cond_proj_dim=time_cond_proj_dim,
    )
    _randomise(unet, seed)
    return unet.eval()


def tiny_sdxl_unet(time_cond_proj_dim: int | None = None, seed: int = 1):
    """SDXL-shaped UNet ComfyUI recognises (transformer depth [0,0,2,2,10,10], adm 2816), channel_mult [1,1,1]."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 320, 320),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 5, 5), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816, norm_num_groups=32, time_cond_proj_dim=time_cond_proj_dim,
    )
    _randomise(unet, seed)
    return unet.eval()


def tiny_vae():
    """A tiny AutoencoderKL with 4 levels (vae_scale_factor 8), only so pipelines can be built."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=32,
    ).eval()


def comfy_kl_vae(ch: int):
    """ComfyUI's own VAE (its AutoencoderKL, 8x, ``ch`` base channels) with seeded random weights; needs ComfyUI loaded."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    config = {"params": {"embed_dim": 4, "ddconfig": {
        "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": ch,
        "ch_mult": [1, 2, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}}}
    g = torch.Generator().manual_seed(0)
    shapes = {k: v.shape for k, v in AutoencoderKL(**config["params"]).state_dict().items()}
    sd = {k: 1.0 + 0.1 * torch.randn(s, generator=g) if len(s) == 1 and "norm" in k and k.endswith("weight")
          else torch.randn(s, generator=g) * (s[1:].numel() ** -0.5 if len(s) > 1 else 0.05) for k, s in shapes.items()}
    return comfy.sd.VAE(sd=sd, config=config)


def save_unet(unet, path: Path, with_config: bool = False, dtype: torch.dtype | None = None) -> Path:
    sd = {k: (v.to(dtype) if dtype else v).contiguous() for k, v in unet.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    if with_config:
        import json

        (path.parent / "config.json").write_text(json.dumps(dict(unet.config, _class_name="UNet2DConditionModel")))
    return path


def lora_targets(unet, max_modules: int | None = None) -> dict[str, tuple[int, ...]]:
    """Diffusers module paths of the UNet's attention/projection Linears and resnet convs, with weight shapes."""
    out = {}
    for name, mod in unet.named_modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) and (
            ".attn1." in name or ".attn2." in name or name.endswith(("proj_in", "proj_out", ".ff.net.2", ".ff.net.0.proj"))
            or (".resnets." in name and name.endswith(("conv1", "conv2")))
        ):
            out[name] = tuple(mod.weight.shape)
    if max_modules:
        out = dict(list(out.items())[:max_modules])
    return out


def random_lora(unet, fmt: str, rank: int = 4, seed: int = 7, alpha: float | None = 8.0, scale: float = 0.3) -> dict[str, torch.Tensor]:
    """A random LoRA for ``unet`` in ``fmt``: 'kohya' (lora_unet_*_lora_down + alpha) or 'peft' (unet.*.lora_A)."""
    g = torch.Generator("cpu").manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for path, shape in lora_targets(unet).items():
        out_f, in_f = shape[0], shape[1]
        kernel = shape[2:] if len(shape) == 4 else ()
        down = torch.randn((rank, in_f, *kernel), generator=g) * (scale / (in_f * max(1, len(kernel) and kernel[0] * kernel[1])) ** 0.5)
        up = torch.randn((out_f, rank, *((1, 1) if kernel else ())), generator=g) * (scale / rank**0.5)
        if fmt == "kohya":
            key = "lora_unet_" + path.replace(".", "_")
            sd[f"{key}.lora_down.weight"] = down
            sd[f"{key}.lora_up.weight"] = up
            if alpha is not None:
                sd[f"{key}.alpha"] = torch.tensor(alpha)
        elif fmt == "peft":
            sd[f"unet.{path}.lora_A.weight"] = down
            sd[f"unet.{path}.lora_B.weight"] = up
        else:
            raise ValueError(fmt)
    return sd


def diffusers_unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    """Rename a diffusers UNet's weights to ComfyUI's ldm layout (needs ComfyUI imported)."""
    import comfy.utils

    from lcm_core.unet_format import diffusers_unet_layout

    sd = unet.state_dict()
    key_map = comfy.utils.unet_to_diffusers(diffusers_unet_layout(sd).comfy_unet_config())
    return {key_map[k]: v for k, v in sd.items() if k in key_map}


def tiny_sd15_checkpoint(path: Path, seed: int = 21) -> Path:
    """An SD1.5-family checkpoint ComfyUI's CheckpointLoaderSimple loads: tiny UNet, full-shape CLIP-L and VAE (random)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for k, v in diffusers_unet_to_ldm(tiny_sd15_unet(time_cond_proj_dim=None, seed=seed)).items():
        sd["model.diffusion_model." + k] = v
    clip = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                        max_position_embeddings=77, vocab_size=49408, projection_dim=768, hidden_act="quick_gelu"))
    for k, v in clip.state_dict().items():
        sd["cond_stage_model.transformer." + k] = v
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4)
    for k, v in vae.state_dict().items():
        sd["first_stage_model." + k] = v
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.float16).contiguous() for k, v in sd.items()}, str(path))
    return path
