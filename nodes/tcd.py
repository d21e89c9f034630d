"""TCD Sampler: Trajectory Consistency Distillation sampling (TCD-LoRA, Hyper-SD), exactly as diffusers' TCDScheduler."""

from __future__ import annotations

from comfy_api.latest import io

from ..lcm_core.config import TCDConfig
from ..lcm_core.schedule import parse_timesteps
from ..lcm_core.step import DEFAULT_GAMMA
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

# TCD picks its steps from original_inference_steps entries (at most 1000, the training schedule's length).
TCD_MAX_STEPS = 1000


class TCDSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TCDSampler",
            display_name="TCD Sampler",
            category=CATEGORY,
            description="Few-step sampling with Trajectory Consistency Distillation (TCD-LoRA, Hyper-SD LoRAs) and its "
            "gamma parameter, exactly as diffusers' pipelines with TCDScheduler.",
            inputs=[
                io.Model.Input(
                    "model",
                    tooltip="An SD1.5/SDXL MODEL with a TCD-LoRA or Hyper-SD LoRA applied (Apply LCM-LoRA or Load LoRA), or any "
                    "MODEL from Load LCM UNet / Apply LCM-LoRA: TCD samples plain epsilon over the full 1000-step schedule.",
                ),
                io.Conditioning.Input("positive", tooltip="The prompt (CLIP Text Encode)."),
                io.Conditioning.Input(
                    "negative", optional=True,
                    tooltip="Negative prompt, used only for classifier-free guidance (guidance_scale > 1); zeros when not "
                    "connected, as diffusers' SDXL pipeline.",
                ),
                io.Latent.Input(
                    "latent_image",
                    tooltip="Empty Latent Image for text-to-image; VAE Encode of the input image for img2img (strength < 1).",
                ),
                seed_input(
                    "Noise seed (initial and per-step noise). The same seed gives the same image as diffusers with "
                    "torch.Generator('cpu').manual_seed(seed).",
                ),
                steps_input(
                    "TCD steps, at most original_inference_steps: 4 is typical; more steps want a lower gamma.",
                    max_steps=TCD_MAX_STEPS,
                ),
                guidance_input(
                    "<= 1 is no guidance (as TCD-LoRAs are usually run, fastest); > 1 is classifier-free guidance with "
                    "the negative prompt, as diffusers' pipelines.",
                ),
                io.Float.Input(
                    "gamma", default=DEFAULT_GAMMA, min=0.0, max=1.0, step=0.01, round=0.01,
                    tooltip="Stochasticity (diffusers' eta in TCDScheduler.step): 0 is deterministic, 1 re-noises fully as LCM "
                    "does. 0.3 at 4 steps; use a lower gamma for more steps.",
                ),
                original_inference_steps_input(
                    "Length of the TCD distillation schedule the steps are picked from (50, as TCDScheduler's default).",
                ),
                timesteps_input(),
                io.Float.Input(
                    "strength", default=1.0, min=0.01, max=1.0, step=0.01, optional=True,
                    tooltip="1.0: text-to-image from pure noise. Below 1: image-to-image as diffusers' SD/SDXL img2img pipelines "
                    "with TCDScheduler: the full schedule is built and its first steps dropped (int(steps x strength) run).",
                ),
                fast_input(),
                keep_graphs_input(),
                compile_input(),
            ],
            outputs=[io.Latent.Output(tooltip="The sampled latent. VAE Decode it with the VAE of the same checkpoint.")],
        )

    @classmethod
    def execute(cls, model, positive, latent_image, seed, steps, guidance_scale, gamma, negative=None,
                original_inference_steps=50, timesteps="", strength=1.0, fast=True, keep_graphs="while queued",
                compile=False) -> io.NodeOutput:
        from ..lcm_comfy import tcd

        config = TCDConfig(
            seed=seed, steps=steps, guidance_scale=guidance_scale, gamma=gamma, original_inference_steps=original_inference_steps,
            timesteps=parse_timesteps(timesteps), strength=strength, fast=fast, keep_graphs=keep_graphs, compile=compile,
        )
        out, _stats = tcd.sample_tcd(model, positive, negative, latent_image, config)
        return io.NodeOutput(out)
