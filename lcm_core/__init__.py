"""lcm_core: the Latent Consistency Model library of LCM Nodes. torch + safetensors only.

No ComfyUI, no diffusers and no network here. LCM and TCD are two members of one family of consistency-model
samplers: one schedule module for both (origin schedule, even-spacing pick, custom timesteps, strength planning,
the sigma -> timestep rule: :mod:`.schedule`), one step module (LCM's consistency step, TCD's step and the one
noising function: :mod:`.step`) and one run configuration base (:mod:`.config`). Beside them: the guidance
embedding (:mod:`.guidance`), diffusers' seeded noise (:mod:`.noise`), LoRA parsing and matching (:mod:`.lora`),
UNet layout and config checks (:mod:`.unet_format`), weights I/O (:mod:`.weights`), the CUDA-graph cache
(:mod:`.graphs`) and the errors (:mod:`.errors`). The ComfyUI adapter is the sibling package ``lcm_comfy``; the tools are ``lcm_tools``.
"""

from .config import ConsistencyRun, SamplingConfig, SamplingStats, TCDConfig
from .errors import LCMError, LCMInputError, LCMLoRAError, LCMModelError
from .graphs import KEEP_GRAPHS_MODES, GraphCache, keep_graphs_mode
from .guidance import GuidedTimeEmbedding, guidance_embedding, guidance_w
from .lora import LoRAReport, check_fit, group_lora_modules, match_lora, module_name_candidates
from .noise import SeededNoise, check_seed
from .schedule import (
    MAX_STEPS,
    STRENGTH_MODES,
    NoiseSchedule,
    check_custom_timesteps,
    check_strength,
    lcm_timesteps,
    nearest_timestep_index,
    origin_timesteps,
    parse_timesteps,
    pick_timesteps,
    plan_timesteps,
    truncate_for_strength,
)
from .step import (
    DEFAULT_GAMMA,
    boundary_scalings,
    check_gamma,
    consistency_denoise,
    lcm_step,
    predicted_original,
    renoise,
    tcd_step,
)
from .unet_format import UNetLayout, check_unet_config, classify_state_dict, diffusers_unet_layout
from .weights import convert_to_safetensors, load_safetensors, resolve_unet_files

__all__ = [
    "ConsistencyRun", "SamplingConfig", "SamplingStats", "TCDConfig", "LCMError", "LCMInputError", "LCMLoRAError", "LCMModelError",
    "KEEP_GRAPHS_MODES", "GraphCache", "keep_graphs_mode", "GuidedTimeEmbedding", "guidance_embedding", "guidance_w",
    "LoRAReport", "check_fit", "group_lora_modules", "match_lora", "module_name_candidates", "SeededNoise", "check_seed",
    "MAX_STEPS", "STRENGTH_MODES", "NoiseSchedule", "check_custom_timesteps", "check_strength", "lcm_timesteps",
    "nearest_timestep_index", "origin_timesteps", "parse_timesteps", "pick_timesteps", "plan_timesteps",
    "truncate_for_strength", "DEFAULT_GAMMA", "boundary_scalings", "check_gamma", "consistency_denoise", "lcm_step",
    "predicted_original", "renoise", "tcd_step", "UNetLayout", "check_unet_config", "classify_state_dict", "diffusers_unet_layout",
    "convert_to_safetensors", "load_safetensors", "resolve_unet_files",
]
