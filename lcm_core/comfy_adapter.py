"""The one module of ``lcm_core`` that touches ComfyUI.

It is imported lazily (by the nodes, at execution time), never by ``lcm_core/__init__``. Everything here
takes ComfyUI objects as arguments and goes through ComfyUI's machinery: ``comfy.sd`` to build models,
``ModelPatcher`` clones and patches, ``comfy.lora`` for LoRA arithmetic, ``comfy.sample.sample_custom``
for conditioning, CFG, model loading and ControlNet, ``latent_preview`` for progress and previews.
The LCM maths itself comes from the ComfyUI-free modules beside it.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import comfy.lora
import comfy.model_management
import comfy.model_patcher
import comfy.model_sampling
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import comfy.sd
import comfy.utils
import latent_preview
import torch

from .errors import LCMInputError, LCMLoRAError, LCMModelError
from .fastpath import GraphCache, keep_graphs_mode
from .guidance import GuidedTimeEmbedding, guidance_embedding, guidance_w
from .lora import group_lora_modules, module_name_candidates
from .noise import SeededNoise, check_seed
from .schedule import (
    STRENGTH_MODES,
    NoiseSchedule,
    boundary_scalings,
    check_custom_timesteps,
    check_strength,
    lcm_timesteps,
    truncate_for_strength,
)
from .unet_format import COND_PROJ_KEY, classify_state_dict, diffusers_unet_layout

log = logging.getLogger("lcm_nodes")

GUIDANCE_OPTION = "lcm_nodes_guidance_scale"
GUIDANCE_WRAPPER_KEY = "lcm_nodes_guidance_embedding"
DEFAULT_LCM_GUIDANCE = 8.0
WEIGHT_DTYPES = {"default": None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


# --------------------------------------------------------------------------------------------------
# Files


def load_safetensors(path: str, what: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a ``.safetensors`` file (tensors and metadata), or raise LCMModelError naming the file.

    Pickle-based formats (``.ckpt``, ``.pt``, ``.bin``, ``.pth``) are refused: unpickling can run code.
    """
    name = os.path.basename(path)
    ext = os.path.splitext(path)[1].lower()
    if ext != ".safetensors":
        raise LCMModelError(
            f"{what} {name!r} is a {ext or 'extensionless'} file; only .safetensors is read, because pickled "
            "formats (.ckpt/.pt/.bin) can run code when loaded. Convert it once, from the lcm-nodes folder, with "
            f"`python -m lcm_core.runner convert {path}` (reads tensors only, never code) or download the .safetensors release."
        )
    if not os.path.isfile(path):
        raise LCMModelError(f"{what} {name!r} does not exist at {path}.")
    if os.path.getsize(path) == 0:
        raise LCMModelError(f"{what} {name!r} is empty (0 bytes): the download or copy failed; fetch it again.")
    try:
        from safetensors import safe_open

        tensors: dict[str, torch.Tensor] = {}
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    except Exception as exc:  # safetensors raises its own SafetensorError / OSError types
        raise LCMModelError(
            f"{what} {name!r} is not a readable safetensors file ({type(exc).__name__}: {exc}); "
            "it is probably truncated or corrupt: download it again."
        ) from exc
    if not tensors:
        raise LCMModelError(f"{what} {name!r} holds no tensors.")
    return tensors, metadata


def resolve_unet_files(path: str) -> tuple[str, str | None]:
    """For a UNet path (a file, or a diffusers model folder), return (weights file, config.json or None)."""
    if os.path.isdir(path):
        folder = os.path.join(path, "unet") if os.path.isdir(os.path.join(path, "unet")) else path
        for fname in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"):
            if os.path.isfile(os.path.join(folder, fname)):
                cfg = os.path.join(folder, "config.json")
                return os.path.join(folder, fname), cfg if os.path.isfile(cfg) else None
        raise LCMModelError(
            f"diffusers folder {os.path.basename(path)!r} has no diffusion_pytorch_model[.fp16].safetensors "
            "(in it or in its unet/ sub-folder)."
        )
    base = os.path.splitext(path)[0]
    for cfg in (base + ".json", base.replace(".fp16", "") + ".json", os.path.join(os.path.dirname(path), "config.json")):
        if os.path.isfile(cfg):
            return path, cfg
    return path, None


# --------------------------------------------------------------------------------------------------
# Model sampling: ComfyUI's discrete schedule with LCM's exact boundary condition


def _schedule_of(model_config) -> NoiseSchedule:
    settings = getattr(model_config, "sampling_settings", {}) or {}
    if settings.get("beta_schedule", "linear") != "linear" or settings.get("zsnr", False):
        raise LCMModelError(
            f"the model's noise schedule ({settings}) is not Stable Diffusion's scaled-linear one: LCM sampling "
            "supports SD1.x/2.x/SDXL-family models."
        )
    # ComfyUI's "linear" is linspace(sqrt(start), sqrt(end))^2, i.e. diffusers' "scaled_linear".
    return NoiseSchedule(
        num_train_timesteps=int(settings.get("timesteps", 1000)),
        beta_start=float(settings.get("linear_start", 0.00085)),
        beta_end=float(settings.get("linear_end", 0.012)),
        beta_schedule="scaled_linear",
    )


class LCMModelSampling(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.EPS):
    """ComfyUI model sampling for LCM: diffusers' float32 schedule and the exact consistency boundary condition.

    ComfyUI works with ``x = x_t / sqrt(alpha_t)`` (variance exploding); diffusers applies
    ``c_skip`` to ``x_t`` itself, so ``calculate_denoised`` converts back before mixing. With
    ``original_inference_steps`` set, only the distillation timesteps are kept (as ComfyUI's own
    ``ModelSamplingDiscreteDistilled``), so that KSampler with sampler ``lcm`` picks LCM timesteps.
    """

    def __init__(self, model_config=None, timestep_scaling: float = 10.0, original_inference_steps: int | None = None):
        super().__init__(model_config)
        schedule = _schedule_of(model_config)
        acp = schedule.alphas_cumprod()
        self.timestep_scaling = float(timestep_scaling)
        self.schedule = schedule
        sigmas = ((1 - acp) / acp) ** 0.5
        self.skip = 1
        if original_inference_steps:
            self.skip = schedule.num_train_timesteps // original_inference_steps
            sigmas = sigmas[self.skip - 1 :: self.skip]
        self.set_sigmas(sigmas)

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        index = super().timestep(sigma)
        return index * self.skip + (self.skip - 1)

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        return super().sigma((timestep.float() - (self.skip - 1)) / self.skip)

    def calculate_denoised(self, sigma, model_output, model_input):
        t = self.timestep(sigma).view(sigma.shape[:1] + (1,) * (model_output.ndim - 1)).to(model_output.dtype)
        sigma = sigma.view(sigma.shape[:1] + (1,) * (model_output.ndim - 1))
        x0 = model_input - model_output * sigma
        x_t = model_input / (sigma**2 + 1.0) ** 0.5
        c_skip, c_out = boundary_scalings(t, self.timestep_scaling)
        return c_out * x0 + c_skip * x_t


def _guidance_wrapper(executor, x, timesteps, context, y, control, transformer_options, **kwargs):
    """DIFFUSION_MODEL wrapper: feed the guidance embedding to the UNet's guided time embedding."""
    time_embed = getattr(executor.class_obj, "time_embed", None)
    scale = transformer_options.get(GUIDANCE_OPTION, DEFAULT_LCM_GUIDANCE)
    if time_embed is None or not hasattr(time_embed, "cond_proj"):
        return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
    time_embed.set_condition(_embedding_on(time_embed, float(scale), x.device))
    try:
        return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
    finally:
        time_embed.set_condition(None)


def _embedding_on(time_embed, scale: float, device) -> torch.Tensor:
    """The guidance embedding for ``scale`` on ``device``, computed once and kept beside the UNet.

    Building it on the CPU at every step would cost a host-to-device copy per step, and a copy from
    ordinary (pageable) host memory makes the CPU wait for all queued GPU work first.
    """
    cache = time_embed.__dict__.setdefault("_lcm_nodes_embeddings", {})
    key = (scale, str(device))
    emb = cache.get(key)
    if emb is None:
        if len(cache) >= 16:
            cache.clear()
        emb = guidance_embedding(torch.tensor([guidance_w(scale)]), time_embed.cond_dim).to(device)
        cache[key] = emb
    return emb


def has_guidance_embedding(model) -> bool:
    """True when the MODEL's UNet carries LCM's guidance (w) embedding."""
    diffusion_model = getattr(model.model, "diffusion_model", None)
    return hasattr(getattr(diffusion_model, "time_embed", None), "cond_proj")


def setup_lcm(model, guidance_scale: float | None = None, original_inference_steps: int | None = 50, timestep_scaling: float = 10.0):
    """Return a clone of ``model`` set up for LCM sampling (the input is never changed).

    Installs :class:`LCMModelSampling` and, for UNets with a guidance embedding, the guidance value that
    ComfyUI's own samplers (KSampler with sampler ``lcm``) will use.
    """
    check_eps_model(model)
    m = model.clone()
    m.add_object_patch("model_sampling", LCMModelSampling(m.model.model_config, timestep_scaling, original_inference_steps))
    if has_guidance_embedding(m):
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, GUIDANCE_WRAPPER_KEY, _guidance_wrapper)
        if guidance_scale is not None:
            m.model_options.setdefault("transformer_options", {})[GUIDANCE_OPTION] = float(guidance_scale)
    return m


def check_eps_model(model) -> None:
    if not hasattr(model, "model") or not hasattr(model, "clone"):
        raise LCMInputError(f"model is a {type(model).__name__}, not a ComfyUI MODEL: connect a model loader's MODEL output.")
    model_type = getattr(model.model, "model_type", None)
    if model_type is not None and model_type.name not in ("EPS",):
        raise LCMModelError(
            f"the model predicts {model_type.name}, but LCM sampling here supports epsilon-prediction models "
            "(SD1.5, SDXL, SSD-1B, LCM UNets)."
        )


# --------------------------------------------------------------------------------------------------
# Loading an LCM UNet


def _attach_guidance_embedding(patcher, weight: torch.Tensor) -> None:
    diffusion_model = patcher.model.diffusion_model
    time_embed = diffusion_model.time_embed
    first = time_embed[0]
    out_features, in_features = weight.shape
    if out_features != first.weight.shape[1]:
        raise LCMModelError(
            f"time_embedding.cond_proj maps to {out_features} channels but the timestep embedding has "
            f"{first.weight.shape[1]}: the file is inconsistent."
        )
    cond_proj = type(first)(in_features, out_features, bias=False, dtype=first.weight.dtype, device=first.weight.device)
    with torch.no_grad():
        cond_proj.weight.copy_(weight.to(first.weight.dtype))
    cond_proj.weight.requires_grad_(first.weight.requires_grad)  # as ComfyUI's own weights (inference only)
    diffusion_model.time_embed = GuidedTimeEmbedding(time_embed, cond_proj)


def _check_config(config_path: str | None, layout) -> None:
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
            f"config.json says time_cond_proj_dim={cfg_dim} but the weights have {layout.cond_proj_dim}: "
            "the config and the weights do not belong together."
        )


def load_lcm_unet(path: str, weight_dtype: str = "default", default_guidance: float = DEFAULT_LCM_GUIDANCE):
    """Load a UNet file or diffusers folder as a ComfyUI MODEL set up for LCM sampling.

    diffusers-format weights are renamed to ComfyUI's layout with ``comfy.utils.unet_to_diffusers``
    (the layout read from the weights, so shapes outside ComfyUI's fixed list load too); ldm-format
    UNets and full checkpoints go straight to ``comfy.sd.load_diffusion_model_state_dict``. The guidance
    embedding (``time_embedding.cond_proj``) is kept when present.
    """
    if weight_dtype not in WEIGHT_DTYPES:
        raise LCMInputError(f"weight_dtype={weight_dtype!r} is not one of {list(WEIGHT_DTYPES)}.")
    weights_path, config_path = resolve_unet_files(path)
    sd, _ = load_safetensors(weights_path, "UNet")
    return load_lcm_unet_state_dict(sd, os.path.basename(path.rstrip(os.sep)), weight_dtype, default_guidance, config_path)


def load_lcm_unet_state_dict(sd: dict, name: str, weight_dtype: str = "default",
                             default_guidance: float = DEFAULT_LCM_GUIDANCE, config_path: str | None = None):
    """:func:`load_lcm_unet` for weights already in memory (``sd`` is consumed)."""
    kind = classify_state_dict(sd.keys())
    cond_weight = None
    if kind == "diffusers_unet":
        layout = diffusers_unet_layout(sd)
        _check_config(config_path, layout)
        cond_weight = sd.pop(COND_PROJ_KEY, None)
        key_map = comfy.utils.unet_to_diffusers(layout.comfy_unet_config())
        # The map also names optional weights (conv_shortcut only exists where channels change): take what is there.
        ldm_sd = {key_map[k]: sd.pop(k) for k in list(key_map) if k in sd}
        if sd:
            raise LCMModelError(
                f"UNet {name!r} has {len(sd)} weight(s) ComfyUI's UNet has no place for (e.g. {next(iter(sd))!r}): "
                "this UNet2DConditionModel variant cannot run in ComfyUI."
            )
        sd = ldm_sd
    elif kind in ("ldm_unet", "checkpoint"):
        for key in [k for k in sd if k.endswith(("time_embed.cond_proj.weight", "time_embedding.cond_proj.weight"))]:
            cond_weight = sd.pop(key)
    else:
        hint = {
            "vae": "it is a VAE; load it with Load VAE",
            "text_encoder": "it is a text encoder; load it with Load CLIP",
            "lora": "it is a LoRA; apply it with Apply LCM-LoRA",
            "controlnet": "it is a ControlNet; load it with Load ControlNet Model",
        }.get(kind, "it holds no UNet weights")
        raise LCMModelError(f"{name!r} is not a UNet: {hint}. Pick a UNet file (e.g. lcm-sdxl's diffusion_pytorch_model.safetensors).")
    dtype = WEIGHT_DTYPES[weight_dtype]
    try:
        patcher = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": dtype} if dtype else {})
    except Exception as exc:
        raise LCMModelError(f"ComfyUI could not build a model from UNet {name!r}: {type(exc).__name__}: {exc}") from exc
    if patcher is None:
        raise LCMModelError(
            f"ComfyUI does not recognise the shape of UNet {name!r} (model_channels, context_dim or adm size "
            "match no supported SD1.x/SD2.x/SDXL family), so it cannot run it."
        )
    if cond_weight is not None:
        _attach_guidance_embedding(patcher, cond_weight)
    return setup_lcm(patcher, guidance_scale=default_guidance)


# --------------------------------------------------------------------------------------------------
# LCM-LoRA


@dataclass(frozen=True)
class LoRAReport:
    """What applying a LoRA did: counts of modules that landed, and what did not."""

    landed: int
    total: int
    not_found: tuple[str, ...]
    shape_mismatch: tuple[str, ...]
    text_encoder: int
    unrecognised: tuple[str, ...]

    def summary(self) -> str:
        return f"{self.landed} of {self.total} UNet LoRA modules applied"


def _lora_key_map(model) -> dict[str, str]:
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    unet_config = model.model.model_config.unet_config
    for dkey, ldm in comfy.utils.unet_to_diffusers(unet_config).items():
        if dkey.endswith(".weight"):
            target = f"diffusion_model.{ldm}"
            base = dkey[: -len(".weight")]
            key_map.setdefault(base, target)
            key_map.setdefault("unet." + base, target)
    if has_guidance_embedding(model):
        key_map.setdefault("time_embedding.cond_proj", "diffusion_model.time_embed.cond_proj.weight")
    return key_map


def _model_family(model) -> str:
    return type(model.model.model_config).__name__


def apply_lcm_lora(model, lora_path: str, strength: float = 1.0, allow_partial: bool = False):
    """Apply a LoRA file to a clone of ``model`` and set it up for LCM. Returns ``(model, LoRAReport)``.

    Every UNet module of the file must land on a layer of matching shape, or LCMLoRAError names the file,
    the model family and what did not fit (``allow_partial`` applies what fits and warns instead).
    """
    if not math.isfinite(strength):
        raise LCMInputError(f"strength={strength} is not a finite number.")
    name = os.path.basename(lora_path)
    sd, _ = load_safetensors(lora_path, "LoRA")
    kind = classify_state_dict(sd.keys())
    if kind != "lora":
        raise LCMLoRAError(
            f"{name!r} is not a LoRA (it looks like a {kind.replace('_', ' ')}); pick an LCM-LoRA such as lcm-lora-sdxl.safetensors."
        )
    try:
        groups = group_lora_modules(sd)
    except LCMLoRAError as exc:
        raise LCMLoRAError(f"LoRA {name!r}: {exc}") from None
    key_map = _lora_key_map(model)
    model_sd_shapes = {k: tuple(v.shape) for k, v in model.model.state_dict().items()}
    renamed: dict[str, torch.Tensor] = {}
    to_load: dict[str, str] = {}
    not_found: list[str] = []
    mismatch: list[str] = []
    for mod_name, mod in groups.unet.items():
        target = next((key_map[c] for c in module_name_candidates(mod_name) if c in key_map), None)
        if target is None or target not in model_sd_shapes:
            not_found.append(mod_name)
            continue
        shape = model_sd_shapes[target]
        out_f, in_f = mod.delta_shape()
        if len(shape) < 2 or shape[0] != out_f or shape[1] != in_f:
            mismatch.append(f"{mod_name} ({out_f}x{in_f} vs layer {shape[0]}x{shape[1] if len(shape) > 1 else '-'})")
            continue
        prefix = target[: -len(".weight")]
        renamed[f"{prefix}.lora_up.weight"] = mod.up
        renamed[f"{prefix}.lora_down.weight"] = mod.down
        if mod.alpha is not None:
            renamed[f"{prefix}.alpha"] = torch.tensor(mod.alpha)
        if mod.mid is not None:
            renamed[f"{prefix}.lora_mid.weight"] = mod.mid
        if mod.dora_scale is not None:
            renamed[f"{prefix}.dora_scale"] = mod.dora_scale
        to_load[prefix] = target
    report = LoRAReport(
        landed=len(to_load),
        total=len(groups.unet),
        not_found=tuple(not_found),
        shape_mismatch=tuple(mismatch),
        text_encoder=len(groups.text_encoder),
        unrecognised=groups.unrecognised,
    )
    family = _model_family(model)
    if report.total == 0:
        raise LCMLoRAError(
            f"LoRA {name!r} has no UNet modules ({report.text_encoder} text-encoder modules only): apply it with LoraLoader to the CLIP."
        )
    if report.landed < report.total:
        detail = []
        if mismatch:
            detail.append(f"{len(mismatch)} have the wrong shape (e.g. {mismatch[0]})")
        if not_found:
            detail.append(f"{len(not_found)} name no layer of this model (e.g. {not_found[0]!r})")
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
    patches = comfy.lora.load_lora(renamed, to_load, log_missing=False)
    if len(patches) != report.landed:
        raise LCMLoRAError(f"LoRA {name!r}: ComfyUI accepted {len(patches)} of {report.landed} matched modules.")
    m = model.clone()
    m.add_patches(patches, strength)
    log.info("LoRA %r on %s: %s at strength %s.", name, family, report.summary(), strength)
    patched = setup_lcm(m, guidance_scale=None)
    # ComfyUI hands a loaded model's slot to its parent when the model is freed, so that the next clone of
    # the same network finds and replaces it. The intermediate clone ``m`` dies with ``patched``; the slot
    # must go to the MODEL that was passed in (as with ComfyUI's own LoraLoader), not to a dead parent.
    patched.parent = model
    return patched, report


# --------------------------------------------------------------------------------------------------
# Sampling


@dataclass(frozen=True)
class SamplingPlan:
    """Everything the LCM loop needs, decided before any model work (used for one run: ``noise`` is consumed)."""

    timesteps: tuple[int, ...]
    noise: SeededNoise  # its initial draw already taken; the loop draws one per re-noising, in diffusers' order
    from_image: bool


def plan_timesteps(
    steps: int,
    original_inference_steps: int,
    custom_timesteps: list[int] | None,
    strength: float,
    strength_mode: str,
) -> list[int]:
    """The timesteps a run uses, following diffusers' semantics for each strength mode."""
    if strength_mode not in STRENGTH_MODES:
        raise LCMInputError(f"strength_mode={strength_mode!r} is not one of {list(STRENGTH_MODES)}.")
    strength = check_strength(strength)
    if strength_mode == "lcm":
        if custom_timesteps:
            return check_custom_timesteps(custom_timesteps, original_inference_steps, strength)
        return lcm_timesteps(steps, original_inference_steps, strength)
    full = check_custom_timesteps(custom_timesteps, original_inference_steps) if custom_timesteps else lcm_timesteps(steps, original_inference_steps)
    return truncate_for_strength(full, strength)


def _lcm_sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, plan: SamplingPlan | None = None):
    """ComfyUI KSAMPLER function running the LCM multi-step consistency loop in ComfyUI's x = x_t / sqrt(a) space."""
    extra_args = {} if extra_args is None else extra_args
    assert plan is not None
    n = len(sigmas) - 1
    initial = model.noise.to(x)
    if plan.from_image:  # diffusers: sqrt(a) x0 + sqrt(1 - a) noise
        x = model.latent_image.to(x) + initial * sigmas[0]
    else:  # diffusers: pure noise, whatever the first timestep
        x = initial * (sigmas[0] ** 2 + 1.0) ** 0.5
    _inputs_to_device(getattr(model, "inner_model", None), x.device)
    s_in = x.new_ones([x.shape[0]])
    for i in range(n):
        comfy.model_management.throw_exception_if_processing_interrupted()
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        # drawn on the CPU (diffusers' generator) while the GPU computes this step, and copied without a host sync
        step_noise = _to_device_async(plan.noise.draw().float(), x) if i + 1 < n else None
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        if step_noise is not None:
            x = denoised + step_noise * sigmas[i + 1]
        else:
            x = denoised
    return x


def _to_device_async(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t.to(like)`` that does not make the CPU wait for queued GPU work (pinned source, non-blocking copy)."""
    if like.is_cuda:
        return t.pin_memory().to(device=like.device, dtype=like.dtype, non_blocking=True)
    return t.to(like)


def _inputs_to_device(guider, device: torch.device) -> None:
    """Move this run's encoded conditioning and the LCM sigma table to the sampling device, once.

    ComfyUI keeps encoded conditioning on the CPU and copies it to the GPU inside every model call; a
    copy from pageable host memory waits for all queued GPU work, so each step's Python ran while the
    GPU sat idle. Moved here once, those per-step copies become no-ops and the CPU can queue the next
    step while the GPU computes this one. Only the guider's own per-run copies are changed (the COND
    objects are copied, never the user's CONDITIONING); values are unchanged, so results are identical.
    """
    if guider is None:
        return
    conds = getattr(guider, "conds", None)
    entries = [e for group in conds.values() if isinstance(group, list) for e in group] if isinstance(conds, dict) else []
    for entry in entries:
        if isinstance(entry, dict) and entry.get("model_conds"):
            entry["model_conds"] = {name: _cond_on(cond, device) for name, cond in entry["model_conds"].items()}
    model_sampling = getattr(getattr(guider, "inner_model", None), "model_sampling", None)
    if isinstance(model_sampling, LCMModelSampling) and model_sampling.sigmas.device != device:
        model_sampling.to(device)  # ours (an object patch of the sampling clone): timestep() then never leaves the GPU


def _cond_on(cond, device: torch.device):
    """A copy of one of ComfyUI's COND objects whose tensor is on ``device`` (the object itself when it already is)."""
    tensor = getattr(cond, "cond", None)
    if not isinstance(tensor, torch.Tensor) or tensor.device == device:
        return cond
    moved = copy.copy(cond)
    moved.cond = tensor.to(device)
    return moved


FAST_WRAPPER_KEY = "lcm_nodes_cuda_graph"
GRAPH_CACHE_ATTR = "_lcm_nodes_graph_cache"


def graph_cache_of(model) -> GraphCache:
    """The CUDA-graph cache of a MODEL's underlying network (shared by its clones, dropped on unload)."""
    cache = getattr(model.model, GRAPH_CACHE_ATTR, None)
    if cache is None:
        cache = GraphCache()
        setattr(model.model, GRAPH_CACHE_ATTR, cache)
    return cache


def release_graphs(model) -> None:
    """Drop a MODEL's captured graphs and return their memory (also called when ComfyUI unloads it)."""
    cache = getattr(model.model, GRAPH_CACHE_ATTR, None)
    if cache is not None and len(cache):
        cache.clear()
        comfy.model_management.soft_empty_cache()


def _release_if_unloaded(patcher, *args, **kwargs) -> None:
    """ON_DETACH callback: drop the graphs once the weights have really left the GPU.

    ComfyUI also detaches short-lived clones (and clones it replaces by another clone of the same
    network) without moving the weights; the graphs stay valid then and are kept.
    """
    if not getattr(patcher.model, "model_loaded_weight_memory", 0):
        release_graphs(patcher)


def _prompts_waiting() -> int | None:
    """Prompts waiting in the ComfyUI server's queue behind the running one; None when no server runs this
    (a library call, or ComfyUI's executor driven in-process)."""
    server = sys.modules.get("server")
    queue = getattr(getattr(getattr(server, "PromptServer", None), "instance", None), "prompt_queue", None)
    if queue is None:
        return None
    try:
        return max(0, int(queue.get_tasks_remaining()) - len(queue.currently_running))
    except (AttributeError, TypeError, ValueError):
        return None


def _keep_graphs_after_run(cache: GraphCache, mode: str) -> bool:
    """Whether a model's graphs stay after a run: the mode allows it, and the GPU is not short of memory.

    "while queued" keeps them only while more prompts wait in ComfyUI's queue (or when no server runs this),
    so an idle ComfyUI holds no graph memory. ComfyUI counts memory PyTorch has reserved but not handed out
    as free, and the graphs' private pool looks like that while no other allocation can use it; so the pool
    is subtracted, and the graphs go when what is left is under ComfyUI's minimum for inference (or under
    the pool's own size).
    """
    if mode == "never":
        return False
    if mode == "while queued" and _prompts_waiting() == 0:
        log.debug("LCM fast path: no prompt waiting in the queue; freeing %.0f MiB of CUDA graphs.", cache.pool_bytes / 2**20)
        return False
    device = comfy.model_management.get_torch_device()
    free = comfy.model_management.get_free_memory(device) - cache.pool_bytes
    needed = max(comfy.model_management.minimum_inference_memory(), cache.pool_bytes)
    if free < needed:
        log.info("LCM fast path: freeing %.0f MiB of CUDA graphs after the run, as GPU memory is short "
                 "(%.0f MiB free, %.0f MiB wanted).", cache.pool_bytes / 2**20, free / 2**20, needed / 2**20)
        return False
    return True


def _rewalk_weights(patcher, *args, **kwargs) -> None:
    """ON_LOAD callback: (re)loading may swap sub-modules (object patches), so walk the module tree again."""
    graph_cache_of(patcher).watch.forget()


def _fast_path_blocker(patcher, x, control, transformer_options, kwargs) -> str | None:
    """Why this forward cannot be captured, or None when it can."""
    if not x.is_cuda:
        return "not on a CUDA device"
    if control is not None:
        return "a ControlNet is attached"
    if any(transformer_options.get(k) for k in ("patches", "patches_replace")):
        return "the model has attention/block patches"
    if any(v is not None for v in kwargs.values()):
        return f"extra model inputs {sorted(k for k, v in kwargs.items() if v is not None)}"
    if getattr(patcher.model, "model_lowvram", False):
        return "the model is only partly loaded on the GPU (low VRAM)"
    if patcher.model_options.get("torch_compile_kwargs") is not None or torch.compiler.is_compiling():
        return "the model is compiled with torch.compile (TorchCompileModel), which a CUDA-graph capture cannot run inside"
    return None


def _make_fast_wrapper(patcher, run_state: dict):
    """DIFFUSION_MODEL wrapper replaying the UNet forward as a CUDA graph when that is safe."""
    cache = graph_cache_of(patcher)

    def wrapper(executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        blocker = _fast_path_blocker(patcher, x, control, transformer_options, kwargs)
        if blocker is not None:
            if not run_state.get("warned"):
                log.info("LCM fast path off for this run: %s; using the ordinary path.", blocker)
                run_state["warned"] = True
            run_state["eager_calls"] = run_state.get("eager_calls", 0) + 1
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        if run_state.get("fingerprint") is None:
            run_state["first_forward_at"] = time.perf_counter()
            run_state["fingerprint"] = cache.watch(executor.class_obj)

        def forward(x, timesteps, context, y):
            return executor(x, timesteps, context, y, control, transformer_options)

        run_state["graph_calls"] = run_state.get("graph_calls", 0) + 1
        return cache.run(forward, run_state["fingerprint"], {"x": x, "timesteps": timesteps, "context": context, "y": y})

    return wrapper


SAMPLING_CLONES_ATTR = "_lcm_nodes_sampling_clones"


def _sampling_clone(model, timestep_scaling: float, fast: bool):
    """The patched clone LCM sampling runs on, made once per input MODEL and setting.

    Reusing one clone across prompts matters: ComfyUI treats every new clone as a new model to load and
    unloads the previous one (moving its weights off the GPU and back), which costs more than 4 LCM steps.
    The input MODEL itself is never changed; the clones are only remembered beside it.
    """
    clones = model.__dict__.setdefault(SAMPLING_CLONES_ATTR, {})
    key = (timestep_scaling, fast)
    if key not in clones:
        m = model.clone()
        # The clone lives beside ``model`` (a reference cycle), so both are freed together; ComfyUI would then
        # hand the clone's loaded-model slot to the freed ``model`` and keep a dead entry for every MODEL that
        # ever sampled. ``model``'s own parent outlives them both.
        m.parent = model.parent
        m.add_object_patch("model_sampling", LCMModelSampling(m.model.model_config, timestep_scaling, original_inference_steps=None))
        run_state: dict = {}
        if fast and comfy.model_management.get_torch_device().type == "cuda":
            m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, FAST_WRAPPER_KEY, _make_fast_wrapper(m, run_state))
            m.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_DETACH, FAST_WRAPPER_KEY, _release_if_unloaded)
            m.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_LOAD, FAST_WRAPPER_KEY, _rewalk_weights)
        clones[key] = (m, run_state)
    return clones[key]


def _check_latent(latent: Any, model) -> torch.Tensor:
    if not isinstance(latent, dict) or not isinstance(latent.get("samples"), torch.Tensor):
        raise LCMInputError("latent_image is not a LATENT ({'samples': tensor}): connect Empty Latent Image or VAE Encode.")
    samples = latent["samples"]
    if samples.ndim != 4:
        raise LCMInputError(f"latent_image has shape {tuple(samples.shape)}; an image latent is 4-D [batch, channels, h, w].")
    if samples.shape[0] < 1 or samples.shape[2] < 1 or samples.shape[3] < 1:
        raise LCMInputError(f"latent_image has an empty dimension: shape {tuple(samples.shape)}.")
    channels = model.get_model_object("latent_format").latent_channels
    if samples.shape[1] != channels and torch.count_nonzero(samples) > 0:
        raise LCMInputError(
            f"latent_image has {samples.shape[1]} channels but this model works on {channels}: it was encoded by "
            "another model family's VAE; encode the image with this model's VAE."
        )
    if not torch.isfinite(samples).all():
        raise LCMInputError("latent_image contains NaN or Inf values: re-encode the image (an fp16 VAE overflow is the usual cause).")
    return samples


def _check_sampling_conditioning(cond: Any, name: str, model, batch: int) -> None:
    if not isinstance(cond, list) or not cond:
        raise LCMInputError(f"{name} is not a CONDITIONING: connect a CLIP Text Encode output.")
    unet_config = model.model.model_config.unet_config
    context_dim = unet_config.get("context_dim")
    for i, entry in enumerate(cond):
        if not isinstance(entry, (list, tuple)) or len(entry) < 2 or not isinstance(entry[0], torch.Tensor):
            raise LCMInputError(f"{name} entry {i} is not [tensor, dict]: connect a CLIP Text Encode output.")
        emb = entry[0]
        if context_dim is not None and emb.shape[-1] != context_dim:
            raise LCMInputError(
                f"{name} has text embeddings of width {emb.shape[-1]} but the model expects {context_dim} "
                f"({_model_family(model)}): encode the prompt with the CLIP of this model's checkpoint."
            )
        if emb.shape[0] not in (1, batch) and batch % emb.shape[0] != 0:
            raise LCMInputError(
                f"{name} has batch {emb.shape[0]} but latent_image has batch {batch}: use one prompt, or as many as latents."
            )
        if not torch.isfinite(emb).all():
            raise LCMInputError(f"{name} contains NaN or Inf values.")
        if unet_config.get("adm_in_channels") == 2816 and entry[1].get("pooled_output") is None:
            raise LCMInputError(f"{name} has no pooled_output, which SDXL needs: encode it with an SDXL CLIP.")


def _zero_conditioning(cond: list) -> list:
    out = []
    for emb, opts in cond:
        opts = dict(opts)
        if opts.get("pooled_output") is not None:
            opts["pooled_output"] = torch.zeros_like(opts["pooled_output"])
        out.append([torch.zeros_like(emb), opts])
    return out


def sample(
    model,
    positive: list,
    negative: list | None,
    latent: dict,
    seed: int,
    steps: int = 4,
    guidance_scale: float = 1.0,
    original_inference_steps: int = 50,
    timesteps: list[int] | None = None,
    strength: float = 1.0,
    strength_mode: str = "lcm",
    from_image: bool = False,
    timestep_scaling: float = 10.0,
    disable_pbar: bool = False,
    fast: bool = True,
    stats: dict | None = None,
    keep_graphs: str | bool = "while queued",
) -> dict:
    """Run LCM multi-step consistency sampling on a ComfyUI MODEL; returns a new LATENT.

    Guidance: with a guidance embedding ``guidance_scale`` feeds it (w = guidance_scale - 1) and the
    negative prompt is not used; otherwise ``guidance_scale > 1`` is classifier-free guidance with
    ``negative`` (zeros when none is connected, as diffusers' SDXL pipeline does), cond and uncond in
    one batched forward. ``fast`` replays the UNet forward as a CUDA graph where that is safe (see
    :func:`_fast_path_blocker`); ``keep_graphs`` (one of :data:`~lcm_core.fastpath.KEEP_GRAPHS_MODES`, or a
    bool for "always"/"never") says whether the graphs and their GPU memory stay for later runs while ComfyUI
    keeps the model loaded and memory is not short (:func:`_keep_graphs_after_run`); ``stats``, when given, receives what the fast path did. Noise comes from :class:`~lcm_core.noise.SeededNoise`, so a seed reproduces
    diffusers' pipeline called with ``torch.Generator("cpu").manual_seed(seed)``.
    """
    started = time.perf_counter()
    check_eps_model(model)
    check_seed(seed)
    keep_graphs = keep_graphs_mode(keep_graphs)
    if not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale) or not 0.0 <= guidance_scale <= 100.0:
        raise LCMInputError(f"guidance_scale={guidance_scale!r} is out of range: use 0 to 100 (8 for LCM UNets, 1-2 or 0 for LCM-LoRA).")
    if not isinstance(timestep_scaling, (int, float)) or not math.isfinite(timestep_scaling) or timestep_scaling <= 0:
        raise LCMInputError(f"timestep_scaling={timestep_scaling!r} must be a positive number (10 for every public LCM).")
    ts = plan_timesteps(steps, original_inference_steps, timesteps, strength, strength_mode)
    samples = _check_latent(latent, model)
    batch = samples.shape[0]
    _check_sampling_conditioning(positive, "positive", model, batch)
    guided = has_guidance_embedding(model)
    cfg = 1.0 if guided or guidance_scale <= 1.0 else float(guidance_scale)
    if cfg > 1.0:
        if negative is None:
            log.info("LCM Sampler: no negative prompt connected; using zeroed conditioning for classifier-free guidance.")
            negative = _zero_conditioning(positive)
        _check_sampling_conditioning(negative, "negative", model, batch)
    elif negative is None:
        negative = _zero_conditioning(positive)  # unused at cfg 1, but ComfyUI's guider expects one
    elif guided:
        log.info("LCM Sampler: the model has a guidance embedding; the negative prompt has no effect.")

    m, run_state = _sampling_clone(model, float(timestep_scaling), bool(fast))
    run_state.clear()
    ms = m.object_patches["model_sampling"]
    if guided:
        m.model_options.setdefault("transformer_options", {})[GUIDANCE_OPTION] = float(guidance_scale)

    latent_image = comfy.sample.fix_empty_latent_channels(m, samples)
    noise_dtype = m.model_dtype() if m.model_dtype() in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
    noise = SeededNoise(seed, tuple(latent_image.shape), dtype=noise_dtype)
    initial = noise.draw().float()
    plan = SamplingPlan(timesteps=tuple(ts), noise=noise, from_image=from_image)
    table = ms.sigmas.detach().float().cpu()
    sigmas = torch.cat([table[torch.tensor(ts, dtype=torch.long)], table.new_zeros(1)])
    sampler = comfy.samplers.KSAMPLER(_lcm_sampler, extra_options={"plan": plan})
    callback = latent_preview.prepare_callback(m, len(ts))
    out_samples = comfy.sample.sample_custom(
        m, initial, cfg, sampler, sigmas, positive, negative, latent_image,
        noise_mask=latent.get("noise_mask"), callback=callback, disable_pbar=disable_pbar, seed=seed,
    )
    cache = getattr(m.model, GRAPH_CACHE_ATTR, None)
    if stats is not None:
        if "first_forward_at" in run_state:
            stats["host_ms_before_first_forward"] = (run_state["first_forward_at"] - started) * 1000
        stats.update(run_state, graphs=len(cache) if cache else 0, graph_pool_bytes=cache.pool_bytes if cache else 0,
                     capture_seconds=list(cache.capture_seconds) if cache else [],
                     capture_warmups=list(cache.capture_warmups) if cache else [], timesteps=list(ts))
    if cache is not None and len(cache) and not _keep_graphs_after_run(cache, keep_graphs):
        release_graphs(m)
        if stats is not None:
            stats["released_after_run"] = True
    out = latent.copy()
    out.pop("downscale_ratio_spacial", None)
    out["samples"] = out_samples
    return out
