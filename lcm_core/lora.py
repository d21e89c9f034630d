"""LoRA key normalisation: one parser for every format LCM-LoRAs circulate in.

Recognised per-module suffixes (``P`` is the module path):
- diffusers / PEFT: ``P.lora_A.weight`` / ``P.lora_B.weight`` (also ``.default.weight``)
- diffusers (older): ``P.lora.down.weight`` / ``P.lora.up.weight`` and attention-processor
  ``...processor.to_q_lora.down.weight``
- kohya: ``P.lora_down.weight`` / ``P.lora_up.weight`` with ``P.alpha``; ``P`` like
  ``lora_unet_down_blocks_0_attentions_0_proj_in`` (diffusers names) or ``lora_unet_input_blocks_1_1_proj_in`` (ldm).

:func:`group_lora_modules` splits a state dict into modules with their down/up/alpha tensors and says what
it did not understand; :func:`module_name_candidates` gives the names under which a module may be known to
a model's LoRA key map; :func:`match_lora` lands each module on a weight of the right shape and returns a
:class:`LoRAReport` of what landed and what did not; :func:`check_fit` turns a report into the error (or warning)
the user sees. Nothing here imports ComfyUI: the key map and the weight shapes are passed in.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from .errors import LCMLoRAError

log = logging.getLogger("lcm_nodes")

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


@dataclass(frozen=True)
class LoRAReport:
    """What matching a LoRA against a model found: counts of modules that land, and what does not."""

    landed: int
    total: int
    not_found: tuple[str, ...]
    shape_mismatch: tuple[str, ...]
    text_encoder: int
    unrecognised: tuple[str, ...]

    def summary(self) -> str:
        return f"{self.landed} of {self.total} UNet LoRA modules applied"


@dataclass(frozen=True)
class LoRAMatch:
    """The modules that land, renamed for the model: ``tensors`` holds ``<prefix>.lora_up.weight``,
    ``<prefix>.lora_down.weight`` (and ``.alpha``, ``.lora_mid.weight``, ``.dora_scale``) under the target
    weight's prefix; ``targets`` maps each prefix to the model weight key it changes."""

    report: LoRAReport
    tensors: dict[str, torch.Tensor]
    targets: dict[str, str]


def match_lora(groups: LoRAGroups, key_map: Mapping[str, str], weight_shapes: Mapping[str, tuple[int, ...]]) -> LoRAMatch:
    """Land each UNet module of ``groups`` on a model weight.

    ``key_map`` maps module names (any of :func:`module_name_candidates`) to model weight keys; ``weight_shapes``
    gives each weight's shape. A module lands when a candidate name is in the map, the weight exists, and its
    ``(out, in)`` equals the LoRA's ``(up rows, down columns)``.
    """
    tensors: dict[str, torch.Tensor] = {}
    targets: dict[str, str] = {}
    not_found: list[str] = []
    mismatch: list[str] = []
    for mod_name, mod in groups.unet.items():
        target = next((key_map[c] for c in module_name_candidates(mod_name) if c in key_map), None)
        if target is None or target not in weight_shapes:
            not_found.append(mod_name)
            continue
        shape = weight_shapes[target]
        out_f, in_f = mod.delta_shape()
        if len(shape) < 2 or shape[0] != out_f or shape[1] != in_f:
            mismatch.append(f"{mod_name} ({out_f}x{in_f} vs layer {shape[0]}x{shape[1] if len(shape) > 1 else '-'})")
            continue
        prefix = target[: -len(".weight")] if target.endswith(".weight") else target
        tensors[f"{prefix}.lora_up.weight"] = mod.up
        tensors[f"{prefix}.lora_down.weight"] = mod.down
        if mod.alpha is not None:
            tensors[f"{prefix}.alpha"] = torch.tensor(mod.alpha)
        if mod.mid is not None:
            tensors[f"{prefix}.lora_mid.weight"] = mod.mid
        if mod.dora_scale is not None:
            tensors[f"{prefix}.dora_scale"] = mod.dora_scale
        targets[prefix] = target
    report = LoRAReport(
        landed=len(targets), total=len(groups.unet), not_found=tuple(not_found), shape_mismatch=tuple(mismatch),
        text_encoder=len(groups.text_encoder), unrecognised=groups.unrecognised,
    )
    return LoRAMatch(report=report, tensors=tensors, targets=targets)


def check_fit(report: LoRAReport, name: str, family: str, allow_partial: bool = False) -> None:
    """Raise LCMLoRAError unless every UNet module landed (``allow_partial``: unless none did); log the rest.

    The message names the file, the model family, the counts, an example of what did not fit, and the fix.
    """
    if report.total == 0:
        raise LCMLoRAError(
            f"LoRA {name!r} has no UNet modules ({report.text_encoder} text-encoder modules only): apply it with LoraLoader to the CLIP."
        )
    if report.landed < report.total:
        detail = []
        if report.shape_mismatch:
            detail.append(f"{len(report.shape_mismatch)} have the wrong shape (e.g. {report.shape_mismatch[0]})")
        if report.not_found:
            detail.append(f"{len(report.not_found)} name no layer of this model (e.g. {report.not_found[0]!r})")
        msg = (
            f"LoRA {name!r} does not fit this {family} model: {report.landed} of {report.total} UNet modules fit; "
            + "; ".join(detail)
            + ". It was probably made for another base model: use the LCM-LoRA for "
            + f"{family} (lcm-lora-sdxl for SDXL, lcm-lora-sdv1-5 for SD1.5, lcm-lora-ssd-1b for SSD-1B)."
        )
        if not allow_partial or report.landed == 0:
            raise LCMLoRAError(msg)
        log.warning("%s Applying the %d that fit, as allow_partial is on.", msg, report.landed)
    if report.text_encoder:
        log.warning(
            "LoRA %r also has %d text-encoder modules, which a MODEL cannot take: apply the file to the CLIP with "
            "LoraLoader if you need them (LCM-LoRAs normally have none).", name, report.text_encoder
        )
    if report.unrecognised:
        log.warning("LoRA %r: %d keys of unknown role were skipped (e.g. %r).", name, len(report.unrecognised), report.unrecognised[0])
