"""What the benchmark scripts share: the pack's modules imported in-process, ComfyUI booted in-process, the
random-weight UNet and VAE shapes, ComfyUI conditioning built from random tensors, and the in-process bar chart.

Nothing here imports from ``tests/``; the scripts import this module with ``bench/`` on ``sys.path``.
"""

from __future__ import annotations

import asyncio
import importlib
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))  # lcm_tools; appended, so ComfyUI's own `nodes` module wins over the pack's nodes/ folder
STEPS = 4
#: The SD VAE (diffusers' AutoencoderKL arguments), random weights of the real shape.
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4)


def pack(name: str):
    """A module of this pack (``lcm_nodes.<name>``), imported as a package so its relative imports resolve."""
    if "lcm_nodes" not in sys.modules:
        link_dir = Path(tempfile.mkdtemp(prefix="lcm-pack-"))
        (link_dir / "lcm_nodes").symlink_to(REPO, target_is_directory=True)
        sys.path.append(str(link_dir))
    return importlib.import_module(f"lcm_nodes.{name}")


def default_comfyui() -> str:
    """The ComfyUI folder the tests would use (``$COMFYUI_PATH``, above the pack, or the pack's cache)."""
    from lcm_tools.locate import find_comfyui

    return str(find_comfyui()[0])


def boot_comfy(comfy_path: str, cpu: bool) -> None:
    """Import ComfyUI in this process (no custom nodes, a temporary base folder) and load its built-in nodes."""
    sys.path.insert(0, comfy_path)
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    comfy.cli_args.args.cpu = cpu
    comfy.cli_args.args.base_directory = tempfile.mkdtemp()
    import comfy.model_management  # noqa: F401
    import folder_paths  # noqa: F401
    import utils.extra_config  # noqa: F401

    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))


def free_models() -> None:
    """Unload every model ComfyUI holds and give its cached GPU memory back (between two families)."""
    import comfy.model_management

    comfy.model_management.unload_all_models()
    comfy.model_management.soft_empty_cache()


def sample(model, pos, neg, latent, seed, guidance, fast=True, keep_graphs="always", compile_=False):
    """One LCM Sampler run (4 steps) through the pack's sampler; returns (latents, SamplingStats)."""
    config = pack("lcm_core.config").SamplingConfig(seed=seed, steps=STEPS, guidance_scale=guidance, fast=fast,
                                                    keep_graphs=keep_graphs, progress=False, compile=compile_)
    out, stats = pack("lcm_comfy.sampler").sample(model, pos, neg, latent, config)
    return out["samples"], stats


def load_unet(sd: dict, name: str):
    return pack("lcm_comfy.loading").load_lcm_unet_state_dict(sd, name, "fp16")


def unet_config(family: str, cond_proj: int | None) -> dict:
    """Full-size SD1.5 or SDXL UNet (diffusers' arguments); ``cond_proj``: the guidance embedding's width, or None."""
    if family == "sd15":
        return dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8, time_cond_proj_dim=cond_proj)
    return dict(sample_size=128, block_out_channels=(320, 640, 1280),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=2,
                transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816, time_cond_proj_dim=cond_proj)


def tiny_unet_config(family: str) -> dict:
    """A CPU-sized UNet of the family with the guidance embedding: one 320-channel level (SD1.5), or SDXL's
    transformer depths at 320 channels throughout (the shape ComfyUI's model detection still reads as SDXL)."""
    if family == "sd15":
        return dict(sample_size=8, block_out_channels=(320,), down_block_types=("CrossAttnDownBlock2D",),
                    up_block_types=("CrossAttnUpBlock2D",), layers_per_block=1, cross_attention_dim=768,
                    attention_head_dim=8, time_cond_proj_dim=256)
    return dict(sample_size=8, block_out_channels=(320, 320, 320), layers_per_block=2,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
                attention_head_dim=(5, 5, 5), cross_attention_dim=2048, use_linear_projection=True,
                addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
                time_cond_proj_dim=256)


def comfy_conds(family: str, batch: int, h: int) -> tuple[list, list]:
    """Seeded random positive and negative CONDITIONING for a latent ``h`` high and wide, as CLIP Text Encode gives:
    SD1.5 the CLIP-L sequence; SDXL the CLIP-L+G sequence, CLIP-G's pooled output and the size micro-conditioning."""
    g = torch.Generator().manual_seed(1)
    if family == "sd15":
        return [[torch.randn(1, 77, 768, generator=g), {}]], [[torch.randn(1, 77, 768, generator=g), {}]]
    size = h * 8

    def sdxl() -> list:
        cond = torch.randn(1, 77, 2048, generator=g)
        return [[cond, {"pooled_output": torch.randn(1, 1280, generator=g), "height": size, "width": size, "crop_h": 0,
                        "crop_w": 0, "target_height": size, "target_width": size}]]

    return sdxl(), sdxl()


def full_size_parts(family: str, name: str, with_vae: bool = True):
    """Full-size random-weight parts on the GPU, seeded: ComfyUI's MODEL of an LCM UNet with the guidance embedding
    (fp16), the SD VAE (ComfyUI's, its working dtype) or None, batch-1 conditioning and an empty batch-1 latent."""
    import comfy.sd
    from diffusers import AutoencoderKL, UNet2DConditionModel

    h = 64 if family == "sd15" else 128
    torch.manual_seed(0)
    with torch.device("cuda"):
        unet = UNet2DConditionModel(**unet_config(family, 256)).half().eval()
        vae_ref = AutoencoderKL(**SD_VAE) if with_vae else None
    sd = {k: v.detach().to("cpu", copy=True) for k, v in unet.state_dict().items()}
    vae_sd = {k: v.detach().to("cpu", copy=True) for k, v in vae_ref.state_dict().items()} if with_vae else None
    del unet, vae_ref
    torch.cuda.empty_cache()
    model = load_unet(sd, name)
    vae = comfy.sd.VAE(sd=vae_sd) if with_vae else None
    pos, _ = comfy_conds(family, 1, h)
    return model, vae, pos, {"samples": torch.zeros(1, 4, h, h)}


def inprocess_bars(ax, results: dict, fam: str, fontsize: int | None = None) -> None:
    """One family's batch-1 bars (to latents, to a decoded image; ours, ComfyUI native, diffusers) on ``ax``."""
    r = results[fam]["rows"]["batch1"]
    labels = ["LCM fast", "LCM ordinary", "ComfyUI native", "diffusers"]
    lat = [r["lcm_fast_latents_ms"], r["lcm_ordinary_latents_ms"], r["comfy_native_latents_ms"], r["diffusers_latents_ms"]]
    dec = [r["lcm_fast_decoded_ms"], r["lcm_ordinary_decoded_ms"], r["comfy_native_decoded_ms"], r["diffusers_decoded_ms"]]
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], lat, 0.4, label="to latents")
    ax.bar([x + 0.2 for x in xs], dec, 0.4, label="to decoded image")
    ax.set_xticks(list(xs), labels, fontsize=fontsize)
    ax.set_ylabel("ms, in-process (lower is better)")
    ax.set_title(f"{fam.upper()} {'512' if fam == 'sd15' else '1024'}px, 4 steps, batch 1\n{results['card']}", fontsize=fontsize and fontsize + 1)
    ax.legend(fontsize=fontsize)
