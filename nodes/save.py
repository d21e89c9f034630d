"""LCM Save Image."""

from __future__ import annotations

from comfy_api.latest import io, ui

from .common import CATEGORY


class LCMSaveImage(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LCMSaveImage",
            display_name="LCM Save Image",
            category=CATEGORY,
            description="Save Image, with the PNG encoded on all CPU cores: the same file names, pixels and embedded "
            "workflow as ComfyUI's Save Image, in a fraction of the time the GPU would wait for it.",
            inputs=[
                io.Image.Input("images", tooltip="The images to save."),
                io.String.Input(
                    "filename_prefix", default="ComfyUI",
                    tooltip="The prefix for the file to save, as in Save Image (it may include formatting such as "
                    "%date:yyyy-MM-dd% or %Empty Latent Image.width%, and a sub-folder).",
                ),
                io.Int.Input(
                    "compress_level", default=4, min=0, max=9, optional=True,
                    tooltip="PNG compression, 0 (none: fastest, largest) to 9 (smallest, slowest). 4 is Save Image's. "
                    "The pixels are the same at every level.",
                ),
            ],
            hidden=[io.Hidden.prompt, io.Hidden.extra_pnginfo],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, images, filename_prefix="ComfyUI", compress_level=4) -> io.NodeOutput:
        import folder_paths

        from ..lcm_comfy.save import save_images

        hidden = cls.hidden
        saved, _ = save_images(images, filename_prefix, folder_paths.get_output_directory(),
                               prompt=hidden.prompt if hidden else None,
                               extra_pnginfo=hidden.extra_pnginfo if hidden else None, compress_level=compress_level)
        return io.NodeOutput(ui=ui.SavedImages([ui.SavedResult(s["filename"], s["subfolder"], io.FolderType.output) for s in saved]))
