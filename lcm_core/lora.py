"""LoRA key normalisation: one parser for every format LCM-LoRAs circulate in.

Recognised per-module suffixes (``P`` is the module path):
- diffusers / PEFT: ``P.lora_A.weight`` / ``P.lora_B.weight`` (also ``.default.weight``)
- diffusers (older): ``P.lora.down.weight`` / ``P.lora.up.weight`` and attention-processor
  ``...processor.to_q_lora.down.weight``
- kohya: ``P.lora_down.weight`` / ``P.lora_up.weight`` with ``P.alpha``; ``P`` like
  ``lora_unet_down_blocks_0_attentions_0_proj_in`` (diffusers names) or ``lora_unet_input_blocks_1_1_proj_in`` (ldm).

:func:`group_lora_modules` splits a state dict into modules with their down/up/alpha tensors and says what
it did not understand; :func:`module_name_candidates` gives the names under which a module may be known to
ComfyUI's LoRA key map. Nothing here imports ComfyUI.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from .errors import LCMLoRAError

_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_A.default.weight", "down"),
    (".lora_B.default.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    ("_lora.down.weight", "down"),
    ("_lora.up.weight", "up"),
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora_mid.weight", "mid"),
    (".alpha", "alpha"),
    (".dora_scale", "dora_scale"),
)

_TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "te_", "te1", "te2", "lora_te1", "lora_te2", "clip_")


@dataclass
class LoRAModule:
    """The tensors of one LoRA module, under its name in the file (suffix stripped)."""

    name: str
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None
    mid: torch.Tensor | None = None
    dora_scale: torch.Tensor | None = None
    source_keys: list[str] = field(default_factory=list)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0]) if self.down is not None else 0

    def delta_shape(self) -> tuple[int, int]:
        """(out_features, in_features) of the weight this module changes."""
        assert self.down is not None and self.up is not None
        return int(self.up.shape[0]), int(self.down.shape[1])


@dataclass(frozen=True)
class LoRAGroups:
    unet: dict[str, LoRAModule]
    text_encoder: dict[str, LoRAModule]
    unrecognised: tuple[str, ...]


def _is_text_encoder(name: str) -> bool:
    lowered = name.lower()
    return lowered.startswith(_TEXT_ENCODER_PREFIXES) or ".text_model." in lowered


def group_lora_modules(sd: Mapping[str, torch.Tensor]) -> LoRAGroups:
    """Split a LoRA state dict into modules. Raises LCMLoRAError if no LoRA module is found at all."""
    modules: dict[str, LoRAModule] = {}
    unrecognised: list[str] = []
    for key, tensor in sd.items():
        for suffix, role in _SUFFIXES:
            if key.endswith(suffix):
                name = key[: -len(suffix)]
                mod = modules.setdefault(name, LoRAModule(name=name))
                mod.source_keys.append(key)
                if role == "alpha":
                    mod.alpha = float(tensor.float().item()) if tensor.numel() == 1 else None
                else:
                    setattr(mod, role, tensor)
                break
        else:
            unrecognised.append(key)
    incomplete = [m.name for m in modules.values() if m.down is None or m.up is None]
    if incomplete:
        raise LCMLoRAError(
            f"{len(incomplete)} LoRA module(s) lack their down or up weight (e.g. {incomplete[0]!r}): the file is incomplete."
        )
    if not modules:
        raise LCMLoRAError(
            "no LoRA weights found (no lora_A/lora_B, lora.down/lora.up or lora_down/lora_up keys): "
            "this is not a LoRA file; pick an LCM-LoRA such as lcm-lora-sdxl.safetensors."
        )
    unet = {n: m for n, m in modules.items() if not _is_text_encoder(n)}
    te = {n: m for n, m in modules.items() if _is_text_encoder(n)}
    return LoRAGroups(unet=unet, text_encoder=te, unrecognised=tuple(unrecognised))


def module_name_candidates(name: str) -> list[str]:
    """Names under which a LoRA module may appear in ComfyUI's (extended) UNet LoRA key map."""
    out = [name]
    for prefix in ("base_model.model.", "unet.", "model.", "transformer."):
        if name.startswith(prefix):
            out.append(name[len(prefix) :])
    stripped = list(out)
    for n in stripped:
        # diffusers attention-processor names: ...attn1.processor.to_q -> ...attn1.to_q; to_out -> to_out.0
        if ".processor." in n:
            plain = n.replace(".processor.", ".")
            out.append(plain)
            if plain.endswith(".to_out"):
                out.append(plain + ".0")
        out.append("unet." + n)
    seen: set[str] = set()
    return [n for n in out if not (n in seen or seen.add(n))]
