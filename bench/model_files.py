"""Random-weight model files for the benchmarks that go through a ComfyUI server (bench_server.py, bench_cluster.py).

Full-size files cost what real weights cost: an LCM UNet with the guidance embedding per family, CLIP-L, for SDXL
also CLIP-G, and the SD VAE, written in fp16 into ComfyUI's folders under a base folder. ``tiny`` swaps in
CPU-sized UNets (the text encoders and the VAE keep their real shapes: ComfyUI fixes them).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from common import SD_VAE, tiny_unet_config, unet_config

log = logging.getLogger("lcm_bench")


def _save(module, path: Path, clip: bool = False) -> None:
    import torch
    from safetensors.torch import save_file

    sd = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in module.state_dict().items()}
    if clip:  # ComfyUI reads transformers' "text_model." names; some transformers versions drop the prefix
        sd = {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v for k, v in sd.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))


def build_models(base: Path, families: list[str], tiny: bool) -> dict:
    """Random-weight model files in ComfyUI's folders (files already there are kept); returns the file names per family."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    device = "cuda" if torch.cuda.is_available() else "cpu"
    models = base / "models"
    names: dict = {}
    torch.manual_seed(0)
    t0 = time.perf_counter()
    if not (models / "vae" / "sd_vae.safetensors").exists():
        with torch.device(device):
            vae = AutoencoderKL(**SD_VAE)
        _save(vae, models / "vae" / "sd_vae.safetensors")
        del vae
    if not (models / "text_encoders" / "clip_l.safetensors").exists():
        with torch.device(device):
            clip_l = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                                  max_position_embeddings=77, vocab_size=49408, projection_dim=768, hidden_act="quick_gelu"))
        _save(clip_l, models / "text_encoders" / "clip_l.safetensors", clip=True)
        del clip_l
    if "sdxl" in families and not (models / "text_encoders" / "clip_g.safetensors").exists():
        with torch.device(device):
            clip_g = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                                                num_attention_heads=20, max_position_embeddings=77, vocab_size=49408,
                                                                projection_dim=1280, hidden_act="gelu"))
        _save(clip_g, models / "text_encoders" / "clip_g.safetensors", clip=True)
        del clip_g
    for fam in families:
        unet_file = f"{fam}-lcm-unet{'-tiny' if tiny else ''}.safetensors"
        if not (models / "diffusion_models" / unet_file).exists():
            with torch.device(device):
                unet = UNet2DConditionModel(**(tiny_unet_config(fam) if tiny else unet_config(fam, 256))).half()
            _save(unet, models / "diffusion_models" / unet_file)
            del unet
        names[fam] = {"unet": unet_file, "vae": "sd_vae.safetensors", "clip_l": "clip_l.safetensors", "clip_g": "clip_g.safetensors"}
        if device == "cuda":
            torch.cuda.empty_cache()
    log.info("model files ready in %.0f s", time.perf_counter() - t0)
    return names
