"""Tiny random-weight models and LoRAs built by the tests (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from lcm_core.weights import DIFFUSERS_CONFIG_NAME


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


def _unet(seed: int, **config):
    """A ``UNet2DConditionModel(**config)`` with :func:`_randomise`'s weights.

    Built on the meta device and given empty CPU storage: diffusers' own initialisation would be overwritten anyway,
    and for the SDXL shapes (~280M parameters) it costs seconds. The weights are bit-identical to building it
    normally and randomising; the UNet has no buffers that would be left uninitialised.
    """
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    unet = unet.to_empty(device="cpu")
    if any(True for _ in unet.buffers()):
        raise RuntimeError("this UNet has buffers: build it normally, to_empty would leave them uninitialised")
    _randomise(unet, seed)
    return unet.eval()


def tiny_sd15_unet(time_cond_proj_dim: int | None = 256, seed: int = 0):
    """SD1.5-shaped (320 channels, context 768, 8 heads, no linear projection) one-level UNet, ~21M params."""
    return _unet(
        seed, sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(320,), down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, time_cond_proj_dim=time_cond_proj_dim,
    )


#: What SDXL-family UNets share: 320 base channels, SDXL's text context and pooled/size embedding (adm 2816).
_SDXL_FAMILY = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 320, 320),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 5, 5), cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)


def tiny_sdxl_unet(time_cond_proj_dim: int | None = None, seed: int = 1):
    """SDXL-shaped UNet ComfyUI recognises (transformer depth [0,0,2,2,10,10], adm 2816), channel_mult [1,1,1]."""
    return _unet(seed, **_SDXL_FAMILY, transformer_layers_per_block=(1, 2, 10), time_cond_proj_dim=time_cond_proj_dim)


def tiny_ssd1b_unet(time_cond_proj_dim: int | None = None, seed: int = 2):
    """SSD-1B-shaped UNet ComfyUI recognises as SSD1B: SDXL's levels with fewer transformer blocks (down [0,0,2,2,4,4],
    up [4,4,10 | 2,1,1 | 0,0,0] from the lowest resolution, none in the middle block), channel_mult [1,1,1]: the
    layout of ComfyUI's ``SSD_1B`` diffusers config, about half the tiny SDXL UNet's cost."""
    return _unet(seed, **{**_SDXL_FAMILY, "mid_block_type": "UNetMidBlock2D"}, transformer_layers_per_block=(1, 2, 4),
                 reverse_transformer_layers_per_block=((4, 4, 10), (2, 1, 1), (1, 1, 1)), time_cond_proj_dim=time_cond_proj_dim)


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


def comfy_wan_vae(dim: int = 8):
    """ComfyUI's Wan 2.1 video VAE (its own WanVAE class, found by ``comfy.sd.VAE`` from the weights: 16 latent channels,
    4x in time, 8x in space) at ``dim`` base channels with seeded random weights; needs ComfyUI loaded."""
    import comfy.sd
    from comfy.ldm.wan.vae import WanVAE

    shapes = {k: v.shape for k, v in WanVAE(dim=dim, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                            temperal_downsample=[False, True, True], image_channels=3, dropout=0.0).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=g) * (0.2 if len(s) <= 1 else s[1:].numel() ** -0.5) for k, s in shapes.items()}
    return comfy.sd.VAE(sd=sd)


def save_unet(unet, path: Path, with_config: bool = False, dtype: torch.dtype | None = None) -> Path:
    sd = {k: (v.to(dtype) if dtype else v).contiguous() for k, v in unet.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    if with_config:
        import json

        (path.parent / DIFFUSERS_CONFIG_NAME).write_text(json.dumps(dict(unet.config, _class_name="UNet2DConditionModel")))
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
    """A random LoRA for ``unet`` in ``fmt``: 'kohya' (lora_unet_<diffusers path>.lora_down + alpha), 'kohya-ldm' (the
    same tensors under ComfyUI's ldm module names, lora_unet_input_blocks_1_1_proj_in...; needs ComfyUI imported) or
    'peft' (unet.<path>.lora_A). The same seed gives the same tensors in every format."""
    g = torch.Generator("cpu").manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    ldm_names = _ldm_module_names(unet) if fmt == "kohya-ldm" else {}
    for path, shape in lora_targets(unet).items():
        out_f, in_f = shape[0], shape[1]
        kernel = shape[2:] if len(shape) == 4 else ()
        down = torch.randn((rank, in_f, *kernel), generator=g) * (scale / (in_f * max(1, len(kernel) and kernel[0] * kernel[1])) ** 0.5)
        up = torch.randn((out_f, rank, *((1, 1) if kernel else ())), generator=g) * (scale / rank**0.5)
        if fmt in ("kohya", "kohya-ldm"):
            key = "lora_unet_" + ldm_names.get(path, path).replace(".", "_")
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


def _ldm_module_names(unet, weights: bool = False) -> dict[str, str]:
    """diffusers module path -> ComfyUI (ldm) module path (``weights``: every weight name instead, biases too), from
    ComfyUI's own renaming, fed with the layout read from the weights (needs ComfyUI imported)."""
    import comfy.utils

    from lcm_core.unet_format import diffusers_unet_layout

    key_map = comfy.utils.unet_to_diffusers(diffusers_unet_layout(unet.state_dict()).comfy_unet_config())
    if weights:
        return {k: v for k, v in key_map.items() if k in unet.state_dict()}
    return {k[: -len(".weight")]: v[: -len(".weight")] for k, v in key_map.items() if k.endswith(".weight")}


#: The modules diffusers' LCM-LoRA distillation scripts (examples/consistency_distillation) adapt.
LCM_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
                    "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")


def add_peft_lora(unet, rank: int = 4, alpha: float = 8.0, seed: int = 7, scale: float = 0.3) -> dict[str, torch.Tensor]:
    """Give ``unet`` (in place) a LoRA adapter made by peft on LCM-LoRA's target modules, with seeded random weights;
    return the adapter as an LCM-LoRA file holds it: kohya's format with diffusers module names
    (``lora_unet_down_blocks_1_..._to_q.lora_down.weight``, ``.lora_up.weight``, ``.alpha``).

    The kohya conversion is diffusers' ``convert_state_dict_to_kohya``; it writes ``alpha = rank``, so the adapter's
    own ``lora_alpha`` is written instead (the file must mean what the adapter computes)."""
    from diffusers.utils import convert_state_dict_to_kohya
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(LCM_LORA_TARGETS), init_lora_weights=False))
    g = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if ".lora_A." in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale * p[0].numel() ** -0.5)
            elif ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale * rank**-0.5)
    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in get_peft_model_state_dict(unet).items()})
    return {k: torch.tensor(float(alpha)) if k.endswith(".alpha") else v.contiguous() for k, v in kohya.items()}


def diffusers_unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    """Rename a diffusers UNet's weights to ComfyUI's ldm layout (needs ComfyUI imported)."""
    names = _ldm_module_names(unet, weights=True)
    return {names[k]: v for k, v in unet.state_dict().items() if k in names}


def unet_from_checkpoint(path: Path, unet):
    """``unet`` (diffusers) holding the UNet weights of the SD checkpoint at ``path`` (ldm names under
    ``model.diffusion_model.``), in float32: what ComfyUI's checkpoint loader runs on a CPU, read back from the file
    itself. Every weight of ``unet`` must be in the file (needs ComfyUI imported, for its renaming)."""
    from safetensors.torch import load_file

    prefix = "model.diffusion_model."
    ldm_to_diffusers = {ldm: k for k, ldm in _ldm_module_names(unet, weights=True).items()}
    sd = {ldm_to_diffusers[k[len(prefix):]]: v.float() for k, v in load_file(str(path)).items() if k.startswith(prefix)}
    unet.load_state_dict(sd, strict=True)
    return unet


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
