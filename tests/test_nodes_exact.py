"""The nodes in real ComfyUI v0.8.0 graphs, compared with diffusers' pipelines on the same weights, and the README's
node claims that need no oracle (the 16-channel error, latent previews, LCM VAE Decode on a video VAE, compile mode's
refusal under cudaMallocAsync, the fast path's graphs freed when memory runs short).

Tolerance (issue #3): max |ours - diffusers| <= 1e-4 * max(1, max |diffusers|), float32 on CPU (``assert_close``).
"""

from __future__ import annotations

import pytest
import torch
from models import random_lora, save_unet, tiny_sd15_unet, tiny_sdxl_unet, tiny_vae
from oracles import conditioning_to_diffusers, diffusers_to_conditioning
from test_support_nodes import SEED, assert_close, lcm_loader, run_sampler, sampler_prompt, stash

SD15_SCALE = 0.18215
SDXL_SCALE = 0.13025
#: SDXL prompt embeddings are 8 tokens long, not CLIP's 77: the tiny SDXL UNet's cost is mostly its 70 cross-attentions'
#: key/value projections of the text, and nothing checked here depends on the prompt's length.
SDXL_TOKENS = 8


@pytest.fixture(scope="module")
def sd15_lcm(comfy, comfy_base):
    unet = tiny_sd15_unet(time_cond_proj_dim=256)
    save_unet(unet, comfy_base / "models" / "diffusion_models" / "tiny-lcm-sd15.safetensors")
    return unet


@pytest.fixture(scope="module")
def sdxl(comfy, comfy_base):
    unet = tiny_sdxl_unet()
    save_unet(unet, comfy_base / "models" / "diffusion_models" / "tiny-sdxl.safetensors")
    return unet


def sd15_cond(batch=1, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 77, 768, generator=g), torch.randn(batch, 77, 768, generator=g)


def sdxl_cond(h, w, seed=5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([[h * 8, w * 8, 0, 0, h * 8, w * 8]], dtype=torch.float32)
    pos = diffusers_to_conditioning(torch.randn(1, SDXL_TOKENS, 2048, generator=g), torch.randn(1, 1280, generator=g), ids)
    neg = diffusers_to_conditioning(torch.randn(1, SDXL_TOKENS, 2048, generator=g), torch.randn(1, 1280, generator=g), ids)
    return pos, neg


def diffusers_lcm_sd15(unet, cond, neg, latents_shape, guidance, steps, init=None, strength=1.0, batch=1):
    from diffusers import LatentConsistencyModelImg2ImgPipeline, LatentConsistencyModelPipeline, LCMScheduler

    cls = LatentConsistencyModelPipeline if init is None else LatentConsistencyModelImg2ImgPipeline
    pipe = cls(vae=tiny_vae(), text_encoder=None, tokenizer=None, unet=unet, scheduler=LCMScheduler(),
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt_embeds=cond, num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
              generator=torch.Generator("cpu").manual_seed(SEED), num_images_per_prompt=batch)
    if init is None:
        kw.update(height=latents_shape[2] * 8, width=latents_shape[3] * 8)
    else:
        kw.update(image=init, strength=strength)
    return pipe(**kw).images


@pytest.mark.usefixtures("cpu_exactness")
def test_sd15_lcm_unet_txt2img_matches_diffusers(runner, sd15_lcm):
    cond, neg = sd15_cond()
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    ours = run_sampler(runner, "tiny-lcm-sd15.safetensors", "LCMSampler", [[cond, {}]], [[neg, {}]], latent,
                       steps=4, guidance_scale=8.0)
    ref = diffusers_lcm_sd15(sd15_lcm, cond, neg, (1, 4, 8, 8), 8.0, 4)
    assert_close(ours * SD15_SCALE, ref)
    # the guidance embedding really is in play: another guidance gives another image
    other = run_sampler(runner, "tiny-lcm-sd15.safetensors", "LCMSampler", [[cond, {}]], None, latent, steps=4, guidance_scale=2.0)
    assert (other - ours).abs().max() > 1e-3


@pytest.mark.usefixtures("cpu_exactness")
def test_sd15_lcm_unet_batch2_matches_diffusers(runner, sd15_lcm):
    cond, _ = sd15_cond()
    latent = {"samples": torch.zeros(2, 4, 8, 8)}
    ours = run_sampler(runner, "tiny-lcm-sd15.safetensors", "LCMSampler", [[cond, {}]], None, latent, steps=4, guidance_scale=8.0)
    ref = diffusers_lcm_sd15(sd15_lcm, cond, None, (2, 4, 8, 8), 8.0, 4, batch=2)
    assert_close(ours * SD15_SCALE, ref)
    assert (ours[0] - ours[1]).abs().max() > 1e-3  # two different images, not one repeated


@pytest.mark.parametrize("strength", [0.3, 0.5, 0.75, 1.0])
@pytest.mark.usefixtures("cpu_exactness")
def test_sd15_lcm_unet_img2img_matches_diffusers(runner, sd15_lcm, strength):
    cond, _ = sd15_cond()
    init = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(11))  # raw VAE latent
    ours = run_sampler(runner, "tiny-lcm-sd15.safetensors", "LCMImg2Img", [[cond, {}]], None, {"samples": init},
                       steps=4, guidance_scale=8.0, strength=strength)
    ref = diffusers_lcm_sd15(sd15_lcm, cond, None, init.shape, 8.0, 4, init=init * SD15_SCALE, strength=strength)
    assert_close(ours * SD15_SCALE, ref)


# ---------------------------------------------------------------- SDXL + LCM-LoRA


_PIPES: dict = {}


def sdxl_pipeline(unet_factory, lora_path, img2img=False):
    """diffusers' SDXL pipeline with LCMScheduler and the LoRA loaded by load_lora_weights (built once per LoRA)."""
    from diffusers import LCMScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    key = str(lora_path)
    if key not in _PIPES:
        pipe = StableDiffusionXLPipeline(vae=tiny_vae(), text_encoder=None, text_encoder_2=None, tokenizer=None,
                                         tokenizer_2=None, unet=unet_factory(), scheduler=LCMScheduler())
        pipe.load_lora_weights(str(lora_path.parent), weight_name=lora_path.name)
        _PIPES[key] = pipe
    pipe = _PIPES[key]
    if img2img:
        pipe = StableDiffusionXLImg2ImgPipeline(**pipe.components, requires_aesthetics_score=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_sdxl(pipe, pos, neg, shape, guidance, steps, init=None, strength=1.0, batch=1):
    p = conditioning_to_diffusers(pos, shape[2:])
    n = conditioning_to_diffusers(neg, shape[2:])
    kw = dict(prompt_embeds=p.prompt_embeds, pooled_prompt_embeds=p.pooled_prompt_embeds,
              negative_prompt_embeds=n.prompt_embeds, negative_pooled_prompt_embeds=n.pooled_prompt_embeds,
              num_inference_steps=steps, guidance_scale=guidance, output_type="latent", num_images_per_prompt=batch,
              generator=torch.Generator("cpu").manual_seed(SEED), height=shape[2] * 8, width=shape[3] * 8)
    if init is not None:
        kw.update(image=init, strength=strength)
    return pipe(**kw).images


@pytest.fixture(scope="module", params=["kohya", "peft"])
def sdxl_lora(request, sdxl, comfy_base):
    from safetensors.torch import save_file

    name = f"tiny-sdxl-lcm-lora-{request.param}.safetensors"
    path = comfy_base / "models" / "loras" / name
    save_file(random_lora(sdxl, request.param, alpha=8.0 if request.param == "kohya" else None), str(path))
    return request.param, name, path


# No kohya file at guidance 1.5: once parsed, both formats are the same patches, and CFG on the kohya file is the
# batch-2 case below (test_sdxl_lcm_lora_batch2_matches_diffusers[kohya], guidance 1.5).
@pytest.mark.parametrize("sdxl_lora,guidance", [("kohya", 1.0), ("peft", 1.0), ("peft", 1.5)], indirect=["sdxl_lora"])
@pytest.mark.usefixtures("cpu_exactness")
def test_sdxl_lcm_lora_txt2img_matches_diffusers(runner, sdxl, sdxl_lora, guidance):
    fmt, name, path = sdxl_lora
    pos, neg = sdxl_cond(8, 8)
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    ours = run_sampler(runner, "tiny-sdxl.safetensors", "LCMSampler", pos, neg, latent, lora=name, steps=4, guidance_scale=guidance)
    pipe = sdxl_pipeline(tiny_sdxl_unet, path)
    ref = diffusers_sdxl(pipe, pos, neg, (1, 4, 8, 8), guidance, 4)
    assert_close(ours * SDXL_SCALE, ref)
    if guidance == 1.0:  # the LoRA really changed the result (checked once per format: a model switch is slow on CPU)
        plain = run_sampler(runner, "tiny-sdxl.safetensors", "LCMSampler", pos, neg, latent, steps=4, guidance_scale=guidance)
        assert (plain - ours).abs().max() > 1e-3


@pytest.mark.parametrize("strength", [0.3, 0.5, 0.75, 1.0])
@pytest.mark.usefixtures("cpu_exactness")
def test_sdxl_lcm_lora_img2img_matches_diffusers(runner, sdxl, sdxl_lora, strength):
    fmt, name, path = sdxl_lora
    pos, neg = sdxl_cond(8, 8)
    init = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(12))
    ours = run_sampler(runner, "tiny-sdxl.safetensors", "LCMImg2Img", pos, neg, {"samples": init}, lora=name,
                       steps=4, guidance_scale=1.5, strength=strength, strength_mode="truncate")
    pipe = sdxl_pipeline(tiny_sdxl_unet, path, img2img=True)
    ref = diffusers_sdxl(pipe, pos, neg, init.shape, 1.5, 4, init=init * SDXL_SCALE, strength=strength)
    assert_close(ours * SDXL_SCALE, ref)


@pytest.mark.usefixtures("cpu_exactness")
def test_sdxl_lcm_lora_batch2_matches_diffusers(runner, sdxl, sdxl_lora):
    fmt, name, path = sdxl_lora
    pos, neg = sdxl_cond(8, 8)
    ours = run_sampler(runner, "tiny-sdxl.safetensors", "LCMSampler", pos, neg, {"samples": torch.zeros(2, 4, 8, 8)},
                       lora=name, steps=4, guidance_scale=1.5)
    pipe = sdxl_pipeline(tiny_sdxl_unet, path)
    ref = diffusers_sdxl(pipe, pos, neg, (2, 4, 8, 8), 1.5, 4, batch=2)
    assert_close(ours * SDXL_SCALE, ref)


# ---------------------------------------------------------------- first-class MODEL


# KSampler's sigmas for sgm_uniform are interpolated between LCM's table entries (t = 754, 509, 264 after 999) while the
# UNet is told the nearest entry (759, 499, 259): the boundary condition and the renoising then use other alphas than
# diffusers'. "simple" picks table entries 49, 37, 24, 12 of the 50-entry table, i.e. exactly 999/759/499/259.
# sgm_uniform asks for t = 754, 509, 264 after 999: the model sampling snaps them to the table's 759, 499, 259
@pytest.mark.parametrize("scheduler", ["simple", "sgm_uniform"])
@pytest.mark.usefixtures("cpu_exactness")
def test_ksampler_on_load_lcm_unet_feeds_default_guidance_to_the_embedding(runner, sd15_lcm, scheduler):
    """ComfyUI's own KSampler (sampler lcm, 4 steps, cfg 1) on Load LCM UNet's MODEL: the loader's default_guidance
    drives the UNet's guidance embedding. Two values give two images, and each is diffusers' LCM pipeline at that
    guidance_scale on the timesteps KSampler visits (999, 759, 499, 259; recorded for sgm_uniform in
    test_adapter.py::test_ksampler_on_our_model_visits_lcms_timesteps) with KSampler's noise: the initial noise of
    ``comfy.sample.prepare_noise`` (``torch.manual_seed(seed)``) and, per step, ``sample_lcm``'s noise sampler, which
    on the CPU draws from a generator seeded with ``seed + 1``."""
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    cond, neg = sd15_cond()
    seed, shape = 3, (1, 4, 8, 8)

    def ksampler(default_guidance: float) -> torch.Tensor:
        prompt = {
            "1": lcm_loader("tiny-lcm-sd15.safetensors", default_guidance=default_guidance),
            "10": {"class_type": "LCMTestValue", "inputs": {"key": stash([[cond, {}]])}},
            "11": {"class_type": "LCMTestValue", "inputs": {"key": stash([[neg, {}]])}},
            "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "3": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": seed, "steps": 4, "cfg": 1.0, "sampler_name": "lcm",
                                                       "scheduler": scheduler, "positive": ["10", 0], "negative": ["11", 0],
                                                       "latent_image": ["5", 0], "denoise": 1.0}},
        }
        return runner.run(prompt, ["3"])["3"][0][0]["samples"]

    ours = {guidance: ksampler(guidance) for guidance in (8.0, 2.0)}
    assert (ours[8.0] - ours[2.0]).abs().max() > 1e-3  # the value reaches the model
    pipe = LatentConsistencyModelPipeline(vae=tiny_vae(), text_encoder=None, tokenizer=None, unet=sd15_lcm, scheduler=LCMScheduler(),
                                          safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    for guidance, latents in ours.items():
        ref = pipe(prompt_embeds=cond, timesteps=[999, 759, 499, 259], guidance_scale=guidance, output_type="latent",
                   height=64, width=64, latents=torch.randn(shape, generator=torch.Generator().manual_seed(seed)),
                   generator=torch.Generator().manual_seed(seed + 1)).images
        assert_close(latents * SD15_SCALE, ref, f"KSampler at default_guidance {guidance}")


# ---------------------------------------------------------------- README claims with no oracle


def test_a_latent_of_another_family_is_refused_with_the_fix(runner, sd15_lcm):
    """README's error table: a 16-channel latent (an SD3/Flux VAE's) into a 4-channel model names both counts and the
    fix, before any model work. An empty one (all zeros, what Empty SD3 Latent Image gives) is no encoded image:
    ComfyUI's fix_empty_latent_channels adapts it, and it samples."""
    cond, _ = sd15_cond()
    encoded = {"samples": torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(13))}
    err = runner.error_of(sampler_prompt("tiny-lcm-sd15.safetensors", "LCMSampler", [[cond, {}]], None, encoded,
                                         steps=1, guidance_scale=8.0), ["3"])
    assert err["exception_type"].endswith("LCMInputError"), err
    assert "latent_image has 16 channels but this model works on 4" in err["exception_message"]
    assert "encode the image with this model's VAE" in err["exception_message"]
    empty = run_sampler(runner, "tiny-lcm-sd15.safetensors", "LCMSampler", [[cond, {}]], None, {"samples": torch.zeros(1, 16, 8, 8)},
                        steps=1, guidance_scale=8.0)
    assert empty.shape == (1, 4, 8, 8) and torch.isfinite(empty).all()


def test_latent_previews_show_each_steps_prediction(runner, sd15_lcm, monkeypatch):
    """README: "Progress bar, latent previews and Cancel work as with ComfyUI's samplers". With ComfyUI started with
    ``--preview-method latent2rgb`` (the executor resets the method to that default at every prompt), ComfyUI's
    progress hook (what the server sends to the page) gets one preview per step from ``latent_preview``, and the last
    is Latent2RGB of the final latent: LCM's last step returns its prediction. Tolerance: one of 255 levels (the
    latent is the preview's, divided by the VAE scale and multiplied back: a last-bit difference may cross a rounding
    boundary of the byte conversion)."""
    import comfy.latent_formats
    import comfy.model_management
    import comfy.utils
    import latent_preview
    import numpy as np
    from comfy.cli_args import LatentPreviewMethod, args

    monkeypatch.setattr(latent_preview, "default_preview_method", LatentPreviewMethod.Latent2RGB)  # the startup flag
    monkeypatch.setattr(args, "preview_method", args.preview_method)  # restored after the test, whatever a prompt set
    calls = []
    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: calls.append((value, total, preview)))
    try:
        cond, _ = sd15_cond()
        out = run_sampler(runner, "tiny-lcm-sd15.safetensors", "LCMSampler", [[cond, {}]], None, {"samples": torch.zeros(1, 4, 8, 8)},
                          steps=4, guidance_scale=8.0)
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
    assert [(value, total) for value, total, _ in calls] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert all(preview is not None and preview[0] == "JPEG" and preview[1].size == (8, 8) for _, _, preview in calls)
    images = [np.asarray(preview[1], dtype=np.int16) for _, _, preview in calls]
    assert np.abs(images[0] - images[-1]).max() > 1  # each step's own prediction, not one picture repeated
    if comfy.model_management.get_torch_device().type == "cpu":
        # On a GPU the preview's matmul runs in TF32, and the tiny random model's large latents cancel in it by whole
        # levels: the last preview equals Latent2RGB of the output where both are computed in float32, on the CPU.
        fmt = comfy.latent_formats.SD15()
        expected = latent_preview.Latent2RGBPreviewer(fmt.latent_rgb_factors, fmt.latent_rgb_factors_bias).decode_latent_to_preview(
            out * fmt.scale_factor)
        assert np.abs(images[-1] - np.asarray(expected, dtype=np.int16)).max() <= 1


def test_lcm_vae_decode_is_vae_decode_for_a_video_vae(runner, pack):
    """README: for a video VAE, LCM VAE Decode is VAE Decode, bit for bit (the frames become the IMAGE batch, as VAE
    Decode makes them), and says why it did not compile. The VAE is ComfyUI's own Wan 2.1 video VAE at 8 base
    channels with random weights; compile is on, and the video check comes before the device check, so this CPU run
    takes the path a GPU would for a video VAE."""
    import importlib

    from models import comfy_wan_vae

    vae = comfy_wan_vae()
    latent = {"samples": torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(14))}  # 2 latent frames, 4x4
    prompt = {
        "1": {"class_type": "LCMTestValue", "inputs": {"key": stash(vae)}},
        "2": {"class_type": "LCMTestValue", "inputs": {"key": stash(latent)}},
        "3": {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": ["1", 0]}},
        "4": {"class_type": "LCMVAEDecode", "inputs": {"samples": ["2", 0], "vae": ["1", 0], "compile": True}},
    }
    out = runner.run(prompt, ["3", "4"])
    ref, ours = out["3"][0][0], out["4"][0][0]
    assert ref.shape == (5, 32, 32, 3)  # Wan's 4x time and 8x space upscale: 1 + 4 frames
    assert torch.equal(ours, ref)
    stats: dict = {}
    importlib.import_module(f"{pack.root}.lcm_comfy.vae").decode(vae, latent, compile=True, stats=stats)
    assert stats["path"] == "comfy" and "not an image VAE" in stats["why"], stats


def test_compile_mode_is_refused_under_cudamallocasync(comfy, comfy_base):
    """README: under ComfyUI's default cudaMallocAsync allocator a compiled UNet inside a CUDA graph crashes the process,
    so compile mode logs why and runs exact. The allocator is chosen by what ComfyUI's cuda_malloc.py puts in
    PYTORCH_CUDA_ALLOC_CONF unless started with --disable-cuda-malloc, read once per process; so each case runs in a
    fresh process with that setting or without it. No GPU here: CUDA is reported available (Triton is installed, as
    on a GPU host), so the allocator is the one thing that differs between the two cases."""
    import os
    import subprocess
    import sys

    from comfy_harness import find_comfyui

    pytest.importorskip("triton", reason="without Triton compile mode is off anyway: the allocator's part cannot be shown")
    setting = "backend:cudaMallocAsync"
    assert f'"{setting}"' in (find_comfyui()[0] / "cuda_malloc.py").read_text()  # ComfyUI's own default, verbatim
    script = "\n".join([
        "import logging, sys, types, torch",
        "torch.cuda.is_available = lambda: True",
        f"sys.path.insert(0, {str(comfy_base / 'custom_nodes')!r})",
        "from lcm_nodes.lcm_comfy import compile as compile_mode",
        "logging.basicConfig(level=logging.INFO, stream=sys.stdout, format='%(message)s')",
        "unet = types.SimpleNamespace(_forward=lambda *a, **k: None)",
        "executor = types.SimpleNamespace(idx=0, wrappers=[None], class_obj=unet)  # the innermost wrapper's executor",
        "print('allocator', torch.cuda.memory.get_allocator_backend())",
        "print('compiled', compile_mode.decide(executor))",
    ])
    results = {}
    for name, value in (("async", setting), ("native", None)):
        env = {k: v for k, v in os.environ.items() if k != "PYTORCH_CUDA_ALLOC_CONF"}
        if value:
            env["PYTORCH_CUDA_ALLOC_CONF"] = value
        run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr[-2000:]
        results[name] = run.stdout
    assert "allocator cudaMallocAsync" in results["async"] and "compiled False" in results["async"]
    assert "compile mode off for this model" in results["async"] and "--disable-cuda-malloc" in results["async"]
    assert "allocator native" in results["native"] and "compiled True" in results["native"], results["native"]


def test_kept_graphs_are_freed_when_free_memory_runs_short(pack, monkeypatch):
    """README: whatever keep_graphs says, the fast path's graphs are freed when free GPU memory runs short after a run.
    Short means: ComfyUI's free-memory reading for its device, less the graphs' own pool (which that reading counts as
    free), is under ComfyUI's minimum for inference, or under the pool's size when that is larger. The reading is
    replaced by a stand-in returning chosen byte counts, and the cache holds one entry of a known pool size (no GPU
    here to capture one); the sampler calls finish_run so after every run."""
    import importlib
    import sys
    from types import SimpleNamespace

    import comfy.model_management as mm

    fastpath = pack.comfy.fastpath
    graph_cache = importlib.import_module(f"{pack.root}.lcm_core.graphs").GraphCache
    monkeypatch.delitem(sys.modules, "server", raising=False)  # no server: 'while queued' keeps graphs as 'always' does
    asked = []

    def finish(free: int, pool: int, mode: str) -> tuple[bool, int]:
        cache = graph_cache()
        cache.entries[("signature",)] = SimpleNamespace(pool_bytes=pool)
        clone = fastpath.SamplingClone(model=SimpleNamespace(model=SimpleNamespace(**{fastpath.GRAPH_CACHE_ATTR: cache})))
        monkeypatch.setattr(mm, "get_free_memory", lambda dev=None, torch_free_too=False: asked.append(dev) or free)
        return fastpath.finish_run(clone, mode), len(cache)

    minimum = mm.minimum_inference_memory()
    for pool in (minimum // 4, minimum * 2):  # the minimum decides, then the pool's own size does
        needed = max(minimum, pool)
        for mode in ("always", "while queued"):
            assert finish(needed + pool, pool, mode) == (False, 1), (pool, mode)  # exactly enough left: kept
            assert finish(needed + pool - 1, pool, mode) == (True, 0), (pool, mode)  # one byte short: freed
        assert finish(10 * needed + pool, pool, "never") == (True, 0)
    assert asked and set(asked) == {mm.get_torch_device()}
