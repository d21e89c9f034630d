"""The public releases of the model files the bundled workflows use, and fetching them from the Hugging Face Hub."""

from __future__ import annotations

import os
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .client import RunnerError


@dataclass(frozen=True)
class Release:
    """Where a file the workflows name comes from: ``{endpoint}/{repo}/resolve/main/{file}``."""

    local_name: str  # the name the workflows expect, in models/<folder>/
    folder: str
    repo: str
    file: str  # the file's name in the repository
    size: str  # the download size, as people read it
    what: str

    def url(self, endpoint: str | None = None) -> str:
        endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
        return f"{endpoint}/{self.repo}/resolve/main/{self.file}"


RELEASES = {r.local_name: r for r in (
    Release("v1-5-pruned-emaonly.safetensors", "checkpoints", "stable-diffusion-v1-5/stable-diffusion-v1-5",
            "v1-5-pruned-emaonly.safetensors", "4.3 GB", "Stable Diffusion 1.5 checkpoint (UNet, CLIP, VAE)"),
    Release("sd_xl_base_1.0.safetensors", "checkpoints", "stabilityai/stable-diffusion-xl-base-1.0",
            "sd_xl_base_1.0.safetensors", "6.9 GB", "SDXL base checkpoint (UNet, both CLIPs, VAE)"),
    Release("lcm-lora-sdv1-5.safetensors", "loras", "latent-consistency/lcm-lora-sdv1-5",
            "pytorch_lora_weights.safetensors", "135 MB", "LCM-LoRA for SD1.5"),
    Release("lcm-lora-sdxl.safetensors", "loras", "latent-consistency/lcm-lora-sdxl",
            "pytorch_lora_weights.safetensors", "394 MB", "LCM-LoRA for SDXL"),
    Release("lcm-sdxl.safetensors", "diffusion_models", "latent-consistency/lcm-sdxl",
            "diffusion_pytorch_model.fp16.safetensors", "5.1 GB", "LCM-distilled SDXL UNet (fp16)"),
)}


def download(release: Release, dest: Path, endpoint: str | None = None) -> None:
    """Fetch ``release`` to ``dest`` through a ``.part`` file: a broken download never sits under the final name."""
    url = release.url(endpoint)
    print(f"downloading {url} ({release.size}) -> {dest}", file=sys.stderr)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(part, "wb") as f:
            expected = r.headers.get("Content-Length")
            got = 0
            while chunk := r.read(1 << 20):
                f.write(chunk)
                got += len(chunk)
        if expected is not None and got != int(expected):
            raise OSError(f"got {got} of {expected} bytes")
    except OSError as exc:
        part.unlink(missing_ok=True)
        raise RunnerError(f"download of {release.local_name} from {url} failed: {exc}; run again to retry, "
                          f"or fetch the file yourself and put it at {dest}") from None
    os.replace(part, dest)
