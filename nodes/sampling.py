"""LCM Sampler and LCM Img2Img."""

from __future__ import annotations

from comfy_api.latest import io

from ..lcm_core.config import SamplingConfig
from ..lcm_core.schedule import MAX_STEPS, STRENGTH_MODES, parse_timesteps
from .common import (
    CATEGORY,
    compile_input,
    fast_input,
    guidance_input,
    keep_graphs_input,
    original_inference_steps_input,
    seed_input,
    steps_input,
    timesteps_input,
)

TXT2IMG_LATENT = "An Empty Latent Image: its width and height are the picture's size. (For image-to-image use LCM Img2Img.)"
IMG2IMG_LATENT = ("The input picture as a latent: Load Image -> VAE Encode, with the VAE of the same checkpoint. Its size is "
                  "the output's size; strength decides how much of it is replaced.")


def _common_inputs(latent_tooltip: str) -> list:
    return [
        io.Model.Input("model", tooltip="An LCM MODEL: from Load LCM UNet, or any SD1.5/SDXL model after Apply LCM-LoRA."),
        io.Conditioning.Input("positive", tooltip="The prompt (CLIP Text Encode)."),
        io.Conditioning.Input(
            "negative", optional=True,
            tooltip="Negative prompt, used only for classifier-free guidance (guidance_scale > 1 on a model without a "
            "guidance embedding). LCM UNets (lcm-sdxl, LCM_Dreamshaper) ignore it: their guidance is built in.",
        ),
        io.Latent.Input("latent_image", tooltip=latent_tooltip),
        seed_input("Noise seed. The same seed gives the same image as diffusers with torch.Generator('cpu').manual_seed(seed)."),
        steps_input("LCM steps: 2-8 (4 is typical).", max_steps=MAX_STEPS),
        guidance_input(
            "LCM UNet: drives its guidance embedding (8.0 recommended; the negative prompt has no effect). "
            "LCM-LoRA: <= 1 means no guidance (fastest), 1.0-2.0 is classifier-free guidance with the negative prompt.",
        ),
        original_inference_steps_input(
            "Length of the LCM distillation schedule the timesteps are picked from (50 for every public LCM).",
        ),
        timesteps_input(),
        io.Float.Input(
            "timestep_scaling", default=10.0, min=0.001, max=1000.0, step=0.1, optional=True,
            tooltip="Consistency boundary-condition scaling (10 for every public LCM).",
        ),
        fast_input(),
    ]


class LCMSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LCMSampler",
            display_name="LCM Sampler",
            category=CATEGORY,
            description="Text-to-image with a Latent Consistency Model in 2-8 steps, exactly as diffusers' LCM pipelines.",
            inputs=_common_inputs(TXT2IMG_LATENT) + [keep_graphs_input(), compile_input()],
            outputs=[io.Latent.Output(tooltip="The sampled latent. VAE Decode it with the VAE of the same checkpoint.")],
        )

    @classmethod
    def execute(cls, model, positive, latent_image, seed, steps, guidance_scale, negative=None,
                original_inference_steps=50, timesteps="", timestep_scaling=10.0, fast=True, keep_graphs="while queued",
                compile=False) -> io.NodeOutput:
        from ..lcm_comfy import sampler

        config = SamplingConfig(
            seed=seed, steps=steps, guidance_scale=guidance_scale, original_inference_steps=original_inference_steps,
            timesteps=parse_timesteps(timesteps), timestep_scaling=timestep_scaling, fast=fast, keep_graphs=keep_graphs,
            compile=compile,
        )
        out, _stats = sampler.sample(model, positive, negative, latent_image, config)
        return io.NodeOutput(out)


class LCMImg2Img(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LCMImg2Img",
            display_name="LCM Img2Img",
            category=CATEGORY,
            description="Image-to-image with a Latent Consistency Model, with diffusers' strength semantics.",
            inputs=_common_inputs(IMG2IMG_LATENT)
            + [
                io.Float.Input(
                    "strength", default=0.5, min=0.01, max=1.0, step=0.01,
                    tooltip="How much of the input image is replaced, in (0, 1]: 1.0 ignores it, 0.3 changes it a little.",
                ),
                io.Combo.Input(
                    "strength_mode", options=list(STRENGTH_MODES), default="lcm", optional=True,
                    tooltip="'lcm': as LatentConsistencyModelImg2ImgPipeline, all steps on a schedule shortened by strength "
                    "(4 steps at 0.75: 739/559/379/199). 'truncate': as the SD/SDXL img2img pipelines "
                    "(AutoPipelineForImage2Image), the first steps are dropped (int(steps x strength) steps run).",
                ),
                keep_graphs_input(),
                compile_input(),
            ],
            outputs=[io.Latent.Output(tooltip="The image-to-image result as a latent. VAE Decode it with the VAE that encoded the "
                                        "input image.")],
        )

    @classmethod
    def execute(cls, model, positive, latent_image, seed, steps, guidance_scale, strength, negative=None,
                original_inference_steps=50, timesteps="", timestep_scaling=10.0, fast=True, strength_mode="lcm",
                keep_graphs="while queued", compile=False) -> io.NodeOutput:
        from ..lcm_comfy import sampler

        config = SamplingConfig(
            seed=seed, steps=steps, guidance_scale=guidance_scale, original_inference_steps=original_inference_steps,
            timesteps=parse_timesteps(timesteps), strength=strength, strength_mode=strength_mode, from_image=True,
            timestep_scaling=timestep_scaling, fast=fast, keep_graphs=keep_graphs, compile=compile,
        )
        out, _stats = sampler.sample(model, positive, negative, latent_image, config)
        return io.NodeOutput(out)
