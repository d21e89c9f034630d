"""Load LCM UNet and Apply LCM-LoRA."""

from __future__ import annotations

from comfy_api.latest import io

from ..lcm_core.config import MAX_GUIDANCE
from ..lcm_core.weights import DIFFUSERS_CONFIG_NAME
from .common import CATEGORY


class LCMLoadUNet(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        from ..lcm_comfy.loading import WEIGHT_DTYPES, unet_choices

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
                    f"in models/diffusers (shown as diffusers/<name>). fp16 variants and files without {DIFFUSERS_CONFIG_NAME} load too.",
                ),
                io.Combo.Input(
                    "weight_dtype",
                    options=list(WEIGHT_DTYPES),
                    default="default",
                    tooltip="Weight precision. 'default' lets ComfyUI choose for your device (fp16 on most GPUs, fp32 on CPU).",
                ),
                io.Float.Input(
                    "default_guidance",
                    default=8.0, min=0.0, max=MAX_GUIDANCE, step=0.1, optional=True,
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

        return io.NodeOutput(loading.load_lcm_unet(loading.resolve_unet(unet_name), weight_dtype, default_guidance))


class LCMApplyLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        from ..lcm_comfy.loading import lora_choices

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
                    options=lora_choices(),
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
        from ..lcm_comfy import loading, lora_patch

        patched, _report = lora_patch.apply_lcm_lora(model, loading.resolve_lora(lora_name), strength, allow_partial)
        return io.NodeOutput(patched)
