"""Quickstart: generate an LCM image headless from a bundled workflow, with whatever weights there are.

    python -m lcm_core.quickstart [--workflow sd15-lcm-lora-txt2img] [--download] [runner flags]

- Real weights in the model folders: a real image.
- Some missing: says exactly which files to put where (exit 2); ``--download`` fetches them from the
  Hugging Face Hub (``$HF_ENDPOINT`` overrides the address, which the tests use for a local stand-in).
- No weights at all: a smoke test on tiny random-weight models built here, said plainly.

ComfyUI is found as the tests find it (``$COMFYUI_PATH``, above ``custom_nodes/``, or the cache; cloned
when missing). Unless the pack sits in ``<ComfyUI>/custom_nodes``, ComfyUI runs with a base directory
``${XDG_CACHE_HOME:-~/.cache}/lcm-nodes/quickstart`` (models/, input/, output/) that has the pack linked in.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.request
from pathlib import Path

from .locate import PACK_DIR, cache_dir, find_comfyui
from .runner import ComfyClient, LocalComfy, Overrides, RunnerError, apply_overrides, load_workflow, run_one

#: Public release of each file name the bundled workflows use: (folder, Hub repository, file in it).
RELEASES = {
    "v1-5-pruned-emaonly.safetensors": ("checkpoints", "stable-diffusion-v1-5/stable-diffusion-v1-5", "v1-5-pruned-emaonly.safetensors"),
    "sd_xl_base_1.0.safetensors": ("checkpoints", "stabilityai/stable-diffusion-xl-base-1.0", "sd_xl_base_1.0.safetensors"),
    "lcm-lora-sdv1-5.safetensors": ("loras", "latent-consistency/lcm-lora-sdv1-5", "pytorch_lora_weights.safetensors"),
    "lcm-lora-sdxl.safetensors": ("loras", "latent-consistency/lcm-lora-sdxl", "pytorch_lora_weights.safetensors"),
    "lcm-sdxl.safetensors": ("diffusion_models", "latent-consistency/lcm-sdxl", "diffusion_pytorch_model.fp16.safetensors"),
}
KEYS = {"ckpt_name": "checkpoints", "unet_name": "diffusion_models", "lora_name": "loras"}
SMOKE_NOTE = ("SMOKE TEST: no model weights were found, so this ran on tiny random-weight models built on the spot. "
              "The picture is noise, not art; it only proves the setup works. Add the real files (or --download) for real images.")


def base_dir(comfy: Path, how: str) -> Path | None:
    """None when ComfyUI's own folders serve (the pack is installed in it), else the quickstart base directory."""
    if how == "parent of custom_nodes":
        return None
    base = cache_dir().parent / "quickstart"
    for sub in ("models/checkpoints", "models/loras", "models/diffusion_models", "models/vae", "models/text_encoders",
                "custom_nodes", "input", "output", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / "lcm_nodes"
    if not link.exists():
        link.symlink_to(PACK_DIR, target_is_directory=True)
    return base


def needed_files(api: dict) -> list[tuple[str, str]]:
    out = []
    for node in api.values():
        for key, folder in KEYS.items():
            if key in node.get("inputs", {}):
                out.append((folder, node["inputs"][key]))
    return sorted(set(out))


def download(name: str, dest: Path) -> None:
    folder, repo, fname = RELEASES[name]
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    url = f"{endpoint}/{repo}/resolve/main/{fname}"
    print(f"downloading {url} -> {dest}", file=sys.stderr)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_suffix(dest.suffix + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(part, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
    except OSError as exc:
        part.unlink(missing_ok=True)
        raise RunnerError(f"download of {name} from {url} failed: {exc}") from None
    os.replace(part, dest)  # never a half-downloaded file under the final name


def build_smoke_models(models: Path) -> dict[str, str]:
    """Tiny random models for the smoke run: an LCM UNet (diffusers format), a CLIP-L-shaped encoder and an SD VAE."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    names = {"unet": "quickstart-tiny-lcm-unet.safetensors", "clip": "quickstart-tiny-clip-l.safetensors", "vae": "quickstart-tiny-vae.safetensors"}
    torch.manual_seed(0)
    if not (models / "diffusion_models" / names["unet"]).exists():
        unet = UNet2DConditionModel(sample_size=8, block_out_channels=(320,), down_block_types=("CrossAttnDownBlock2D",),
                                    up_block_types=("CrossAttnUpBlock2D",), layers_per_block=1, cross_attention_dim=768,
                                    attention_head_dim=8, time_cond_proj_dim=256)
        save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(models / "diffusion_models" / names["unet"]))
    if not (models / "text_encoders" / names["clip"]).exists():
        clip = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                            max_position_embeddings=77, vocab_size=49408, projection_dim=768, hidden_act="quick_gelu"))
        save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(models / "text_encoders" / names["clip"]))
    if not (models / "vae" / names["vae"]).exists():
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4)
        save_file({k: v.to(torch.float16).contiguous() for k, v in vae.state_dict().items()}, str(models / "vae" / names["vae"]))
    return names


def smoke_workflow(names: dict[str, str], prompt: str) -> dict:
    return {
        "1": {"class_type": "LCMLoadUNet", "inputs": {"unet_name": names["unet"], "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": names["clip"], "type": "stable_diffusion"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": names["vae"]}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["2", 0]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "7": {"class_type": "LCMSampler", "inputs": {"model": ["1", 0], "positive": ["6", 0], "latent_image": ["5", 0], "seed": 0,
                                                     "steps": 4, "guidance_scale": 8.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["3", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "lcm/quickstart-smoke"}},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lcm_core.quickstart", description=__doc__.split("\n\n")[0])
    p.add_argument("--workflow", default="sd15-lcm-lora-txt2img", help="a bundled workflow name (see workflows/)")
    p.add_argument("--download", action="store_true", help="fetch missing model files from the Hugging Face Hub")
    p.add_argument("--output", default="lcm-output")
    p.add_argument("--prompt", default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    args = p.parse_args(argv)
    try:
        comfy, how = find_comfyui(clone=True)
        if comfy is None:
            raise RunnerError(how)
        base = base_dir(comfy, how)
        models = (base or comfy) / "models"
        api = load_workflow(str(PACK_DIR / "workflows" / f"{args.workflow}.api.json"))
        needed = needed_files(api)
        missing = [(folder, name) for folder, name in needed if not (models / folder / name).is_file()]
        comfy_args = ["--base-directory", str(base)] if base else []
        if base and "LoadImage" in {n["class_type"] for n in api.values()} and not (base / "input" / "lcm-input.png").exists():
            from PIL import Image

            Image.new("RGB", (512, 512), (96, 128, 160)).save(base / "input" / "lcm-input.png")
        if missing and args.download:
            for folder, name in missing:
                download(name, models / folder / name)
            missing = []
        smoke = len(missing) == len(needed)
        if missing and not smoke:
            lines = [f"  {models / folder / name}" + (f"   (from https://huggingface.co/{RELEASES[name][1]}, file {RELEASES[name][2]})" if name in RELEASES else "")
                     for folder, name in missing]
            print("These model files are missing; put them here (or run again with --download):\n" + "\n".join(lines), file=sys.stderr)
            return 2
        if smoke:
            print(SMOKE_NOTE, file=sys.stderr)
            names = build_smoke_models(models)
            api = apply_overrides(smoke_workflow(names, args.prompt or "a lighthouse at dusk"), Overrides(seed=args.seed))
        else:
            api = apply_overrides(api, Overrides(prompt=args.prompt, seed=args.seed, width=args.width, height=args.height))
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        with LocalComfy(comfy, comfy_args, out / "comfyui.log") as url:
            files = run_one(ComfyClient(url), api, out, "quickstart-smoke" if smoke else args.workflow)
        for f in files:
            print(f)
        if smoke:
            print(SMOKE_NOTE, file=sys.stderr)
        return 0
    except RunnerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
