"""ComfyUI node classes of LCM Nodes (V3 API).

Thin shells: each declares its inputs (the category and the inputs the samplers share come from :mod:`.common`)
and hands the values to ``lcm_comfy``, the ComfyUI adapter, which does the work through ComfyUI's machinery
(finding and loading files, LoRA patching, sampling, decoding, saving) with the maths and file formats of
``lcm_core``. No node keeps state or changes its inputs.
"""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io
from typing_extensions import override

from .loaders import LCMApplyLoRA, LCMLoadUNet
from .sampling import LCMImg2Img, LCMSampler
from .save import LCMSaveImage
from .tcd import TCDSampler
from .vae import LCMVAEDecode

NODE_CLASSES: list[type[io.ComfyNode]] = [LCMLoadUNet, LCMApplyLoRA, LCMSampler, LCMImg2Img, LCMVAEDecode, LCMSaveImage, TCDSampler]


class LCMExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODE_CLASSES)
