"""Load LCM UNet and Apply LCM-LoRA."""

from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io

from ..lcm_core.errors import LCMInputError

DIFFUSERS_PREFIX = "diffusers/"
CATEGORY = "sampling/lcm"


def _safe_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not name:
        raise LCMInputError(f"{what} is empty: pick a file from the list.")
    norm = name.replace("\\", "/")
    if os.path.isabs(name) or norm.startswith("/") or ".." in norm.split("/"):
        raise LCMInputError(f"{what} {name!r} leaves ComfyUI's model folders; pick a file from the list (absolute paths and '..' are refused).")
    return name


def diffusers_unet_folders() -> list[str]:
    """Diffusers model folders (with a UNet) under ComfyUI's ``diffusers`` model folders."""
    names = []
    for root in folder_paths.get_folder_paths("diffusers"):
        if not os.path.isdir(root):
            continue
        for entry in sorted(os.listdir(root)):
            path = os.path.join(root, entry)
            for sub in (os.path.join(path, "unet"), path):
                if any(os.path.isfile(os.path.join(sub, f)) for f in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")):
                    names.append(DIFFUSERS_PREFIX + entry)
                    break
    return names


def unet_choices() -> list[str]:
    files = [f for f in folder_paths.get_filename_list("diffusion_models") if f.lower().endswith(".safetensors")]
    return files + diffusers_unet_folders()


def resolve_unet(name: str) -> str:
    _safe_name(name, "unet_name")
    if name.startswith(DIFFUSERS_PREFIX):
        folder = name[len(DIFFUSERS_PREFIX):]
        for root in folder_paths.get_folder_paths("diffusers"):
            path = os.path.join(root, folder)
            if os.path.isdir(path):
                return path
        raise LCMInputError(f"diffusers folder {folder!r} was not found under {folder_paths.get_folder_paths('diffusers')}.")
    return folder_paths.get_full_path_or_raise("diffusion_models", name)


class LCMLoadUNet(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LCMLoadUNet",
            display_name="Load LCM UNet",
            category=CATEGORY,
            description="Loads an LCM-distilled UNet (diffusers or ComfyUI format), keeping its guidance embedding, "
            "as a MODEL ready for LCM Sampler and for ComfyUI's own KSampler (sampler 'lcm').",
            inputs=[
                io.Combo.Input(
                    "unet_name",
                    options=unet_choices(),
                    tooltip="A .safetensors UNet in models/diffusion_models (or models/unet), or a diffusers model folder "
                    "in models/diffusers (shown as diffusers/<name>). fp16 variants and files without config.json load too.",
                ),
                io.Combo.Input(
                    "weight_dtype",
                    options=["default", "fp16", "bf16", "fp32"],
                    default="default",
                    tooltip="Weight precision. 'default' lets ComfyUI choose for your device (fp16 on most GPUs, fp32 on CPU).",
                ),
                io.Float.Input(
                    "default_guidance",
                    default=8.0, min=0.0, max=100.0, step=0.1, optional=True,
                    tooltip="Guidance scale fed to the UNet's guidance embedding when a sampler other than LCM Sampler "
                    "(e.g. KSampler) runs this model. LCM Sampler uses its own guidance_scale.",
                ),
            ],
            outputs=[io.Model.Output(tooltip="The UNet as a MODEL set up for LCM, guidance embedding kept. Connect it to LCM Sampler "
                                       "or LCM Img2Img (or KSampler with sampler 'lcm'); take CLIP and VAE from the base checkpoint "
                                       "of the same family.")],
        )

    @classmethod
    def execute(cls, unet_name: str, weight_dtype: str = "default", default_guidance: float = 8.0) -> io.NodeOutput:
        from ..lcm_comfy import loading

        path = resolve_unet(unet_name)
        return io.NodeOutput(loading.load_lcm_unet(path, weight_dtype, default_guidance))


class LCMApplyLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LCMApplyLoRA",
            display_name="Apply LCM-LoRA",
            category=CATEGORY,
            description="Applies an LCM-LoRA (any common format) to a MODEL and sets it up for LCM sampling in one step. "
            "Every LoRA weight must land, or the node stops with an error saying what does not fit.",
            inputs=[
                io.Model.Input("model", tooltip="The base model (SD1.5, SDXL, SSD-1B...). It is not changed; a patched copy is returned."),
                io.Combo.Input(
                    "lora_name",
                    options=[f for f in folder_paths.get_filename_list("loras") if f.lower().endswith(".safetensors")],
                    tooltip="An LCM-LoRA in models/loras, e.g. lcm-lora-sdxl.safetensors for SDXL or lcm-lora-sdv1-5.safetensors for SD1.5.",
                ),
                io.Float.Input(
                    "strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                    tooltip="LoRA strength; 1.0 is what LCM-LoRAs are made for.",
                ),
                io.Boolean.Input(
                    "allow_partial", default=False, optional=True,
                    tooltip="Off (recommended): a LoRA with any module that does not fit the model is an error. "
                    "On: apply the modules that fit and log a warning with the count.",
                ),
            ],
            outputs=[io.Model.Output(tooltip="A patched copy of the model with the LCM-LoRA applied and set up for LCM. Connect it "
                                       "to LCM Sampler or LCM Img2Img (or KSampler with sampler 'lcm').")],
        )

    @classmethod
    def execute(cls, model, lora_name: str, strength: float = 1.0, allow_partial: bool = False) -> io.NodeOutput:
        from ..lcm_comfy import lora_patch

        _safe_name(lora_name, "lora_name")
        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        patched, _report = lora_patch.apply_lcm_lora(model, path, strength, allow_partial)
        return io.NodeOutput(patched)
