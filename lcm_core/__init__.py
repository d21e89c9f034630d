"""lcm_core: Latent Consistency Model maths and ComfyUI <-> diffusers translation.

Importing this package never imports ComfyUI; :mod:`lcm_core.comfy_adapter` is the one module that does,
and it is imported only when a node runs.
"""

from .convert import (
    LATENT_SCALE_FACTORS,
    DiffusersConditioning,
    conditioning_to_diffusers,
    diffusers_to_conditioning,
    latent_from_diffusers,
    latent_to_diffusers,
)
from .errors import LCMError, LCMInputError, LCMLoRAError, LCMModelError
from .guidance import GuidedTimeEmbedding, guidance_embedding, guidance_w
from .lora import group_lora_modules, module_name_candidates
from .noise import NoiseStream, check_seed, draw_noise
from .schedule import (
    MAX_STEPS,
    STRENGTH_MODES,
    NoiseSchedule,
    boundary_scalings,
    check_custom_timesteps,
    check_strength,
    consistency_denoise,
    lcm_timesteps,
    parse_timesteps,
    predicted_original,
    renoise,
    truncate_for_strength,
)
from .unet_format import UNetLayout, classify_state_dict, diffusers_unet_layout

__all__ = [
    "LATENT_SCALE_FACTORS", "DiffusersConditioning", "conditioning_to_diffusers", "diffusers_to_conditioning",
    "latent_from_diffusers", "latent_to_diffusers", "LCMError", "LCMInputError", "LCMLoRAError", "LCMModelError",
    "GuidedTimeEmbedding", "guidance_embedding", "guidance_w", "group_lora_modules", "module_name_candidates",
    "NoiseStream", "check_seed", "draw_noise", "MAX_STEPS", "STRENGTH_MODES", "NoiseSchedule", "boundary_scalings",
    "check_custom_timesteps", "check_strength", "consistency_denoise", "lcm_timesteps", "parse_timesteps",
    "predicted_original", "renoise", "truncate_for_strength", "UNetLayout", "classify_state_dict", "diffusers_unet_layout",
]
