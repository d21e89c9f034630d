"""A test-only ComfyUI node that hands Python objects (tensors, conditionings) into a prompt, and the prompts and the
tolerance the parity tests share (Load LCM UNet [-> Apply LCM-LoRA] -> a sampler, fed through that node).

The node is registered into ComfyUI's NODE_CLASS_MAPPINGS by the tests only; the pack never ships it.
"""

from __future__ import annotations

import itertools

_VALUES: dict[str, object] = {}
_COUNTER = itertools.count()


def stash(value) -> str:
    key = f"v{next(_COUNTER)}"
    _VALUES[key] = value
    return key


class LCMTestValue:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"key": ("STRING", {"default": ""})}}

    RETURN_TYPES = ("*",)
    FUNCTION = "get"
    CATEGORY = "testing"

    @classmethod
    def IS_CHANGED(cls, key):
        return key

    def get(self, key):
        return (_VALUES[key],)


def register(nodes_module) -> None:
    nodes_module.NODE_CLASS_MAPPINGS.setdefault("LCMTestValue", LCMTestValue)


# ---------------------------------------------------------------- prompts the parity tests run

SEED = 1234


def assert_close(ours, ref, what: str = "") -> float:
    """Issue #3's tolerance: max |ours - ref| <= 1e-4 * max(1, max |ref|), float32 on CPU (ComfyUI and diffusers
    compute the same ops in another order: float32 rounding stays well inside it; one wrong step, weight or noise
    draw is orders of magnitude above it). Returns the difference."""
    tol = 1e-4 * max(1.0, ref.abs().max().item())
    assert ours.shape == ref.shape, (what, tuple(ours.shape), tuple(ref.shape))
    diff = (ours - ref).abs().max().item()
    assert diff <= tol, f"{what}: max abs diff {diff:.3e} > tolerance {tol:.3e}"
    return diff


def lcm_loader(unet_name: str, **inputs) -> dict:
    """A Load LCM UNet node in float32 (the tolerance above is for float32)."""
    return {"class_type": "LCMLoadUNet", "inputs": {"unet_name": unet_name, "weight_dtype": "fp32", **inputs}}


def sampler_prompt(unet, sampler: str, positive, negative, latent, lora: str | None = None, **inputs) -> dict:
    """Load LCM UNet (``unet``: a file name, or a loader node) [-> Apply LCM-LoRA] -> ``sampler`` as node "3"; the
    tensors enter through LCMTestValue nodes. The loader is node "1", Apply LCM-LoRA node "2"."""
    prompt = {"1": lcm_loader(unet) if isinstance(unet, str) else unet}
    model = ["1", 0]
    if lora:
        prompt["2"] = {"class_type": "LCMApplyLoRA", "inputs": {"model": ["1", 0], "lora_name": lora, "strength": 1.0}}
        model = ["2", 0]
    node_inputs = {"model": model, "positive": ["10", 0], "latent_image": ["11", 0], "seed": SEED, **inputs}
    prompt["10"] = {"class_type": "LCMTestValue", "inputs": {"key": stash(positive)}}
    prompt["11"] = {"class_type": "LCMTestValue", "inputs": {"key": stash(latent)}}
    if negative is not None:
        prompt["12"] = {"class_type": "LCMTestValue", "inputs": {"key": stash(negative)}}
        node_inputs["negative"] = ["12", 0]
    prompt["3"] = {"class_type": sampler, "inputs": node_inputs}
    return prompt


def run_sampler(runner, unet, sampler: str, positive, negative, latent, lora: str | None = None, **inputs):
    """Run :func:`sampler_prompt` in ComfyUI; returns the sampler's latent samples."""
    return runner.run(sampler_prompt(unet, sampler, positive, negative, latent, lora, **inputs), ["3"])["3"][0][0]["samples"]
