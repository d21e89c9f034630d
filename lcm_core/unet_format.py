"""Recognising model files, reading the layout of a diffusers-format UNet from its weights, checking its config.

ComfyUI's own diffusers-UNet loader only accepts a fixed list of full-size configurations. The pack
reads the block layout (levels, res blocks, transformer depths) from the weight names instead, so any
``UNet2DConditionModel`` shape that ComfyUI's ldm UNet can express loads; the key renaming itself is
ComfyUI's (``comfy.utils.unet_to_diffusers``), fed with this layout.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .errors import LCMModelError

COND_PROJ_KEY = "time_embedding.cond_proj.weight"

# The model families' names, as every message, tool and chart of the pack spells them (ComfyUI's class names,
# such as ``SD15``, are mapped to these where they reach a user).
SD15 = "SD1.5"
SDXL = "SDXL"


def _count(keys: Iterable[str], prefix: str) -> int:
    """Number of consecutive integer children ``prefix{0}``, ``prefix{1}``, ... among ``keys``."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    n = 0
    while n in found:
        n += 1
    return n


def classify_state_dict(keys: Iterable[str]) -> str:
    """Say what a state dict holds, from its key names alone.

    Returns one of ``"diffusers_unet"``, ``"ldm_unet"``, ``"checkpoint"`` (a full SD checkpoint with a UNet
    inside), ``"vae"``, ``"text_encoder"``, ``"lora"``, ``"controlnet"`` or ``"unknown"``.
    """
    keys = list(keys)
    ks = set(keys)
    if any(".lora_" in k or "lora_up" in k or "lora_down" in k or ".lora." in k or k.startswith("lora_") for k in keys[:2000]):
        return "lora"
    if "conv_in.weight" in ks and any(k.startswith("down_blocks.") for k in keys):
        if "controlnet_cond_embedding.conv_in.weight" in ks or any(k.startswith("controlnet_") for k in keys):
            return "controlnet"
        return "diffusers_unet"
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return "checkpoint"
    if any(k.startswith(("input_blocks.0.0.", "diffusion_model.input_blocks.0.0.")) for k in keys):
        if any(k.startswith(("input_hint_block.", "control_model.")) for k in keys):
            return "controlnet"
        return "ldm_unet"
    if any(k.startswith(("control_model.", "input_hint_block.")) for k in keys):
        return "controlnet"
    if any(k.startswith(("encoder.conv_in.", "decoder.conv_in.", "first_stage_model.")) for k in keys):
        return "vae"
    if any(
        k.startswith(("text_model.", "transformer.text_model.", "cond_stage_model.", "conditioner.", "encoder.block.", "shared."))
        or ".text_model." in k
        for k in keys
    ):
        return "text_encoder"
    return "unknown"


@dataclass(frozen=True)
class UNetLayout:
    """The block layout of a UNet2DConditionModel, in the terms ComfyUI's ldm UNet config uses."""

    model_channels: int
    in_channels: int
    context_dim: int | None
    num_res_blocks: tuple[int, ...]
    channel_mult: tuple[int, ...]
    transformer_depth: tuple[int, ...]
    transformer_depth_output: tuple[int, ...]
    transformer_depth_middle: int
    adm_in_channels: int | None
    use_linear_in_transformer: bool
    cond_proj_dim: int | None

    def comfy_unet_config(self) -> dict:
        """The subset of ComfyUI's ``unet_config`` that ``comfy.utils.unet_to_diffusers`` needs."""
        return {
            "num_res_blocks": list(self.num_res_blocks),
            "channel_mult": list(self.channel_mult),
            "transformer_depth": list(self.transformer_depth),
            "transformer_depth_output": list(self.transformer_depth_output),
            "transformer_depth_middle": self.transformer_depth_middle,
        }


def diffusers_unet_layout(sd: Mapping[str, object]) -> UNetLayout:
    """Read the :class:`UNetLayout` of a diffusers-format UNet state dict.

    Raises LCMModelError when the weights are not a UNet2DConditionModel.
    """
    keys = list(sd.keys())
    if "conv_in.weight" not in sd or "time_embedding.linear_1.weight" not in sd:
        raise LCMModelError("the weights are not a diffusers UNet2DConditionModel (no conv_in / time_embedding weights).")
    conv_in = sd["conv_in.weight"]
    model_channels = int(conv_in.shape[0])  # type: ignore[attr-defined]
    levels = _count(keys, "down_blocks.")
    if levels == 0:
        raise LCMModelError("the UNet has no down_blocks: not a UNet2DConditionModel.")
    num_res, mult, depth = [], [], []
    context_dim = None
    use_linear = False
    for i in range(levels):
        n_res = _count(keys, f"down_blocks.{i}.resnets.")
        num_res.append(n_res)
        out_ch = int(sd[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0])  # type: ignore[attr-defined]
        if out_ch % model_channels:
            raise LCMModelError(
                f"down block {i} has {out_ch} channels, not a multiple of the {model_channels} base channels: "
                "ComfyUI's UNet cannot express this shape."
            )
        mult.append(out_ch // model_channels)
        for j in range(n_res):
            d = _count(keys, f"down_blocks.{i}.attentions.{j}.transformer_blocks.")
            depth.append(d)
            if d:
                k = f"down_blocks.{i}.attentions.{j}.transformer_blocks.0.attn2.to_k.weight"
                context_dim = int(sd[k].shape[1])  # type: ignore[attr-defined]
                proj = sd.get(f"down_blocks.{i}.attentions.{j}.proj_in.weight")
                use_linear = proj is not None and len(proj.shape) == 2  # type: ignore[attr-defined]
    depth_out = []
    for u in range(levels):
        for i in range(num_res[levels - 1 - u] + 1):
            depth_out.append(_count(keys, f"up_blocks.{u}.attentions.{i}.transformer_blocks."))
    mid = _count(keys, "mid_block.attentions.0.transformer_blocks.")
    adm = None
    for name in ("add_embedding.linear_1.weight", "class_embedding.linear_1.weight"):
        if name in sd:
            adm = int(sd[name].shape[1])  # type: ignore[attr-defined]
    cond = sd.get(COND_PROJ_KEY)
    return UNetLayout(
        model_channels=model_channels,
        in_channels=int(conv_in.shape[1]),  # type: ignore[attr-defined]
        context_dim=context_dim,
        num_res_blocks=tuple(num_res),
        channel_mult=tuple(mult),
        transformer_depth=tuple(depth),
        transformer_depth_output=tuple(reversed(depth_out)),
        transformer_depth_middle=mid,
        adm_in_channels=adm,
        use_linear_in_transformer=use_linear,
        cond_proj_dim=int(cond.shape[1]) if cond is not None else None,  # type: ignore[attr-defined]
    )


def check_unet_config(config_path: str | None, layout: UNetLayout) -> None:
    """Check a diffusers config (``config.json``, or ``<weights name>.json``) beside a UNet against the layout read
    from its weights (None: no config)."""
    if config_path is None:
        return
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise LCMModelError(f"config {os.path.basename(config_path)!r} beside the UNet is not valid JSON: {exc}") from exc
    if config.get("_class_name") not in (None, "UNet2DConditionModel"):
        raise LCMModelError(f"config {config_path!r} describes a {config.get('_class_name')}, not a UNet2DConditionModel.")
    cfg_dim = config.get("time_cond_proj_dim")
    if cfg_dim != layout.cond_proj_dim:
        raise LCMModelError(
            f"config {os.path.basename(config_path)!r} says time_cond_proj_dim={cfg_dim} but the weights have "
            f"{layout.cond_proj_dim}: the config and the weights do not belong together; put the model's own config "
            "beside the weights, or remove it."
        )
