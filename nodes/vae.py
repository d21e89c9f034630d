"""LCM VAE Decode."""

from __future__ import annotations

from comfy_api.latest import io

from .common import CATEGORY


class LCMVAEDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LCMVAEDecode",
            display_name="LCM VAE Decode",
            category=CATEGORY,
            description="VAE Decode with a torch.compile'd decoder on CUDA GPUs (SDXL 1024²: about half the time). "
            "Falls back to ComfyUI's own decode, tiled when memory is short, wherever compiling does not apply.",
            inputs=[
                io.Latent.Input("samples", tooltip="The latent to be decoded."),
                io.Vae.Input("vae", tooltip="The VAE model used for decoding the latent."),
                io.Boolean.Input(
                    "compile", default=True, optional=True,
                    tooltip="Compile the decoder with torch.compile on a CUDA GPU. The first decode of each latent size "
                    "compiles (about 20 s for SDXL 1024², cached on disk for later starts); the image then differs from "
                    "VAE Decode's by rounding only (see the README). Off, or on a CPU: exactly VAE Decode.",
                ),
            ],
            outputs=[io.Image.Output(tooltip="The decoded image.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, samples, vae, compile=True) -> io.NodeOutput:
        from ..lcm_comfy.vae import decode

        node_id = cls.hidden.unique_id if cls.hidden else None
        return io.NodeOutput(decode(vae, samples, compile=compile, node_id=node_id))
