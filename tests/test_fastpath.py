"""The GPU fast path: identical latents to the ordinary path (GPU), and a clean fallback where it cannot run."""

from __future__ import annotations

import pytest
import torch

from models import tiny_sd15_unet, tiny_sdxl_unet


def _sample(comfy_adapter, model, pos, fast, guidance, shape=(1, 4, 8, 8)):
    stats: dict = {}
    out = comfy_adapter.sample(model, pos, None, {"samples": torch.zeros(shape)}, 7, 4, guidance, fast=fast, disable_pbar=True, stats=stats)
    return out["samples"], stats


def test_fast_flag_on_cpu_falls_back_to_the_same_result(comfy):
    import comfy.model_management

    from lcm_core import comfy_adapter

    if comfy.model_management.get_torch_device().type != "cpu":
        pytest.skip("ComfyUI runs on a GPU here: the fallback case is the CPU one")

    model = comfy_adapter.load_lcm_unet_state_dict(dict(tiny_sd15_unet(256).state_dict()), "cpu-fast", "fp32")
    pos = [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(0)), {}]]
    a, stats = _sample(comfy_adapter, model, pos, True, 8.0)
    b, _ = _sample(comfy_adapter, model, pos, False, 8.0)
    assert torch.equal(a, b)
    assert stats.get("graph_calls", 0) == 0  # no CUDA: nothing was captured


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU (run on the device machine)")
@pytest.mark.parametrize("family,guided", [("sd15", True), ("sd15", False), ("sdxl", True), ("sdxl", False)])
def test_fast_path_equals_ordinary_path_on_gpu(comfy, family, guided):
    from lcm_core import comfy_adapter, diffusers_to_conditioning

    unet = (tiny_sd15_unet if family == "sd15" else tiny_sdxl_unet)(time_cond_proj_dim=256 if guided else None)
    model = comfy_adapter.load_lcm_unet_state_dict(dict(unet.state_dict()), f"gpu-{family}", "fp16")
    g = torch.Generator().manual_seed(1)
    if family == "sd15":
        pos = [[torch.randn(1, 77, 768, generator=g), {}]]
    else:
        pos = diffusers_to_conditioning(torch.randn(1, 77, 2048, generator=g), torch.randn(1, 1280, generator=g),
                                        torch.tensor([[64.0, 64.0, 0, 0, 64.0, 64.0]]))
    for batch in (1, 2):
        eager, _ = _sample(comfy_adapter, model, pos, False, 8.0 if guided else 1.5, (batch, 4, 8, 8))
        fast, stats = _sample(comfy_adapter, model, pos, True, 8.0 if guided else 1.5, (batch, 4, 8, 8))
        assert stats["graph_calls"] == 4 and stats.get("eager_calls", 0) == 0
        assert (fast - eager).abs().max().item() == 0.0
