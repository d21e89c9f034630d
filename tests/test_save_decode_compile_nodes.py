"""LCM Save Image, LCM VAE Decode and the samplers' compile mode in a real ComfyUI v0.8.0, against Save Image,
VAE Decode and the exact path.

- LCM Save Image writes what Save Image writes: the same file names (``folder_paths.get_save_image_path``), the
  same pixels (SaveImage's own float-to-byte conversion) and the same ``prompt`` / ``workflow`` text chunks, and
  leaves no temporary file behind. Its parallel PNG encoder is checked on its own too: odd sizes, RGBA, every
  compress level, several strips.
- LCM VAE Decode with a VAE on the CPU (ComfyUI's ``--cpu-vae`` placement, on any machine) runs VAE Decode's own
  code (nothing to compile), says why, and gives VAE Decode's IMAGE exactly. Its one-piece path (the one the
  compiled decoder runs in, with process_output before the copy) equals VAE Decode exactly when given the eager
  decoder, on the CPU and, where ComfyUI runs on one, on the GPU: that is what makes the GPU's compiled deviation
  the compiler's alone. The compiled decoder itself and its memory fallbacks are in test_compile_and_queue_gpu.py.
- Compile mode's bookkeeping (the decision per run, graph keys, the fallback to exact) with a stand-in for the
  compiled UNet; on a CPU, where there is no fast path, compile=True runs the exact path's code.
"""

from __future__ import annotations

import importlib
import io
import json
import logging
import uuid

import numpy as np
import pytest
import torch
from PIL import Image


def module(pack, name: str):
    """A module of the pack as ComfyUI loaded it (the very module its nodes run), e.g. ``lcm_comfy.save``."""
    return importlib.import_module(f"{pack.root}.{name}")


def natural_image(h: int, w: int, c: int = 3, seed: int = 0) -> torch.Tensor:
    """Smooth random colour fields with edges and a little grain: compresses like a picture, not like noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, c, max(2, h // 16), max(2, w // 16), generator=g)
    img = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)[0].permute(1, 2, 0)
    img = img + 0.02 * torch.randn(h, w, c, generator=g)
    img[h // 3 : h // 2, :] += 0.3  # a hard edge
    return img.clamp(-0.05, 1.05)  # a little out of range, as decoded images are before SaveImage's clip


def run_prompt(runner, prompt: dict, outputs: list[str], extra_data: dict | None = None) -> dict:
    """Execute through ComfyUI's PromptExecutor; returns the UI outputs (what /history lists)."""
    runner.executor.status_messages = []
    runner.executor.success = True
    runner.executor.execute(prompt, str(uuid.uuid4()), extra_data or {}, outputs)
    if not runner.executor.success:
        errors = [d for e, d in runner.executor.status_messages if e == "execution_error"]
        raise RuntimeError(errors[0]["exception_message"] if errors else "failed")
    return runner.executor.history_result["outputs"]


# ---------------------------------------------------------------------------------------------- PNG encoder


@pytest.mark.parametrize("shape,level,workers", [((37, 53, 3), 4, 4), ((256, 96, 3), 1, 4), ((256, 96, 4), 9, 3),
                                                 ((130, 64, 3), 0, 8), ((64, 64, 3), 4, 1)])
def test_parallel_png_has_savimage_pixels_and_text(pack, shape, level, workers):
    save = module(pack, "lcm_comfy.save")
    image = natural_image(*shape, seed=level)
    encoder = save.PngEncoder(max_workers=workers)
    texts = [("prompt", json.dumps({"3": {"class_type": "KSampler"}})), ("workflow", json.dumps({"nodes": ["é"]}))]
    data = encoder.encode(image, level, texts)
    png = Image.open(io.BytesIO(data))
    png.load()
    assert png.mode == ("RGB" if shape[2] == 3 else "RGBA") and png.size == (shape[1], shape[0])
    assert np.array_equal(np.asarray(png), np.clip(255.0 * image.numpy(), 0, 255).astype(np.uint8))
    assert png.text == dict(texts)


def test_parallel_png_is_close_to_pil_in_size(pack):
    """Paeth on every row, strips deflated apart: a few per cent over PIL's adaptive filters at the same level."""
    save = module(pack, "lcm_comfy.save")
    u8 = save.to_uint8(natural_image(256, 256, seed=3))
    buf = io.BytesIO()
    Image.fromarray(u8).save(buf, format="PNG", compress_level=4)
    ours = save.PngEncoder(max_workers=4).encode(u8, 4)
    assert len(ours) <= 1.15 * len(buf.getvalue()), (len(ours), len(buf.getvalue()))


def test_bad_images_and_levels_are_named(pack, tmp_path):
    save = module(pack, "lcm_comfy.save")
    errors = module(pack, "lcm_core.errors")
    with pytest.raises(errors.LCMInputError, match="compress_level=12"):
        save.save_images(natural_image(8, 8)[None], "x", str(tmp_path), compress_level=12)
    with pytest.raises(errors.LCMInputError, match=r"images is \(8, 8, 3\)"):
        save.save_images(natural_image(8, 8), "x", str(tmp_path))


# ---------------------------------------------------------------------------------------------- LCM Save Image


def test_lcm_save_image_writes_what_save_image_writes(runner, comfy_base):
    from test_support_nodes import stash

    images = torch.stack([natural_image(48, 40, seed=s) for s in range(2)])
    out_dir = comfy_base / "output"
    prompt = {
        "1": {"class_type": "LCMTestValue", "inputs": {"key": ""}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "speedtest/native"}},
        "3": {"class_type": "LCMSaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "speedtest/lcm"}},
    }
    extra = {"extra_pnginfo": {"workflow": {"nodes": [{"id": 3, "type": "LCMSaveImage"}], "version": 0.4}}}
    for round_ in range(2):  # the second run's names continue the counter, as Save Image's do
        prompt["1"]["inputs"]["key"] = stash(images)  # a new key each round, or ComfyUI would serve the cached outputs
        ui = run_prompt(runner, prompt, ["2", "3"], extra)
        native, ours = ui["2"]["images"], ui["3"]["images"]
        assert [i["filename"] for i in native] == [f"native_{round_ * 2 + n + 1:05}_.png" for n in range(2)]
        assert [i["filename"] for i in ours] == [f"lcm_{round_ * 2 + n + 1:05}_.png" for n in range(2)]
        assert all(i["subfolder"] == "speedtest" and i["type"] == "output" for i in native + ours)
        for a, b in zip(native, ours, strict=True):
            pa, pb = Image.open(out_dir / "speedtest" / a["filename"]), Image.open(out_dir / "speedtest" / b["filename"])
            assert np.array_equal(np.asarray(pa), np.asarray(pb))
            assert pa.text == pb.text and set(pb.text) == {"prompt", "workflow"}
            assert json.loads(pb.text["prompt"])["3"]["class_type"] == "LCMSaveImage"
    assert not [p for p in (out_dir / "speedtest").iterdir() if p.name.startswith(".")], "a temporary file was left behind"


# ---------------------------------------------------------------------------------------------- LCM VAE Decode


@pytest.fixture(scope="module")
def vae(comfy):
    """A tiny KL VAE (ComfyUI's own AutoencoderKL at 32 channels, 8x upscale, seeded random weights) on ComfyUI's
    device: the CPU, or the GPU under LCM_TEST_GPU=1."""
    from models import comfy_kl_vae

    return comfy_kl_vae(32)


@pytest.fixture(scope="module")
def cpu_vae(comfy):
    """The same VAE placed on the CPU whatever device ComfyUI runs on, as ComfyUI's ``--cpu-vae`` places it."""
    import comfy.model_management
    from models import comfy_kl_vae

    with pytest.MonkeyPatch.context() as m:
        m.setattr(comfy.model_management.args, "cpu_vae", True)
        vae = comfy_kl_vae(32)
    assert vae.device.type == "cpu"
    return vae


def test_lcm_vae_decode_of_a_cpu_vae_runs_vae_decodes_code(runner, cpu_vae, caplog):
    """Nothing to compile on a CPU: LCM VAE Decode (compile on, its default, and off) takes ComfyUI's decoder, so
    all three nodes run the same code; the log line is what tells LCM VAE Decode's fallback took place."""
    from test_support_nodes import stash

    latent = {"samples": torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))}
    prompt = {
        "1": {"class_type": "LCMTestValue", "inputs": {"key": stash(cpu_vae)}},
        "2": {"class_type": "LCMTestValue", "inputs": {"key": stash(latent)}},
        "3": {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": ["1", 0]}},
        "4": {"class_type": "LCMVAEDecode", "inputs": {"samples": ["2", 0], "vae": ["1", 0]}},
        "5": {"class_type": "LCMVAEDecode", "inputs": {"samples": ["2", 0], "vae": ["1", 0], "compile": False}},
    }
    with caplog.at_level(logging.DEBUG, logger="lcm_nodes"):
        out = runner.run(prompt, ["3", "4", "5"])
    assert "ComfyUI's decoder for this decode (the VAE runs on cpu, not a CUDA GPU)" in caplog.text
    ref = out["3"][0][0]
    assert ref.shape == (2, 64, 64, 3) and ref.device.type == "cpu"
    assert torch.equal(out["4"][0][0], ref) and torch.equal(out["5"][0][0], ref)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_one_piece_decode_path_equals_vae_decode_with_the_eager_decoder(pack, request, device):
    """process_output before the copy, contiguous [b, h, w, c]: the same numbers as VAE Decode's order, on either
    device. Under inference mode, as ComfyUI's executor runs every node: ComfyUI's own ``vae.decode`` (the reference
    here) records autograd history outside it, which fails on weights an earlier node run loaded onto the GPU."""
    import comfy.model_management

    if device == "cuda" and comfy.model_management.get_torch_device().type != "cuda":
        pytest.skip("ComfyUI runs on the CPU here (the GPU case runs under LCM_TEST_GPU=1 on a CUDA machine)")
    vae = request.getfixturevalue("cpu_vae" if device == "cpu" else "vae")
    vae_mod = module(pack, "lcm_comfy.vae")
    latent = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(2)) * 3
    with torch.inference_mode():
        comfy.model_management.load_models_gpu([vae.patcher])  # as LCM VAE Decode does before the one-piece path
        ours = vae_mod.decode_direct(vae, latent, decoder=lambda model, z: model.decode(z))
        ref = vae_mod.comfy_decode(vae, latent)
    assert vae.device.type == device
    assert ours.is_contiguous() and ours.device == ref.device
    assert torch.equal(ours, ref)


def test_vae_decode_says_why_it_did_not_compile_and_names_bad_inputs(pack, cpu_vae):
    vae_mod = module(pack, "lcm_comfy.vae")
    errors = module(pack, "lcm_core.errors")
    latent = torch.zeros(1, 4, 8, 8)
    assert vae_mod.fast_decode_blocker(cpu_vae, latent, False) == "compile is off"
    assert "not a CUDA GPU" in vae_mod.fast_decode_blocker(cpu_vae, latent, True)
    stats: dict = {}
    vae_mod.decode(cpu_vae, {"samples": latent}, compile=True, stats=stats)
    assert stats["path"] == "comfy" and "not a CUDA GPU" in stats["why"]
    with pytest.raises(errors.LCMInputError, match="samples is not a LATENT"):
        vae_mod.decode(cpu_vae, latent)
    with pytest.raises(errors.LCMInputError, match="not a ComfyUI VAE"):
        vae_mod.decode("vae.safetensors", {"samples": latent})


def test_vae_decode_called_as_a_library_records_no_autograd_history(pack, cpu_vae):
    """Outside ComfyUI's inference mode (a library call) the IMAGE carries no autograd history, on weights that an
    earlier node run made inference tensors too (what loading them onto the GPU under inference mode does; here
    the CPU weights are copied under that mode instead)."""
    vae_mod = module(pack, "lcm_comfy.vae")
    latent = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))}
    plain = vae_mod.decode(cpu_vae, latent, compile=False)
    assert not plain.requires_grad
    params = list(cpu_vae.first_stage_model.parameters())
    before = [p.data for p in params]
    try:
        with torch.inference_mode():
            for p in params:
                p.data = p.data.clone()
        assert all(p.is_inference() and p.requires_grad for p in params)
        again = vae_mod.decode(cpu_vae, latent, compile=False)
    finally:
        for p, data in zip(params, before, strict=True):
            p.data = data
    assert torch.equal(again, plain)


# ---------------------------------------------------------------------------------------------- compile mode


def test_compile_input_is_appended_last_and_off_by_default(pack):
    """Saved UI workflows list widget values by position: the new input comes after every existing one."""
    nodes, tcd_nodes = module(pack, "nodes.sampling"), module(pack, "nodes.tcd")
    for cls, before in ((nodes.LCMSampler, "keep_graphs"), (nodes.LCMImg2Img, "keep_graphs"), (tcd_nodes.TCDSampler, "keep_graphs")):
        inputs = cls.define_schema().inputs
        assert [i.id for i in inputs[-2:]] == [before, "compile"]
        assert inputs[-1].default is False and inputs[-1].optional and inputs[-1].tooltip


class _Unet(torch.nn.Module):
    def _forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}):  # noqa: B006 - ComfyUI's
        return x * 2


def _Executor(unet, is_last=True):
    """The executor ComfyUI hands a DIFFUSION_MODEL wrapper (its idx is the wrapper's own position): the innermost of
    two wrappers, or the outer one."""
    from comfy.patcher_extension import WrapperExecutor

    def passthrough(executor, *args, **kwargs):
        return executor(*args, **kwargs)

    return WrapperExecutor.new_class_executor(unet._forward, unet, [passthrough, passthrough], idx=1 if is_last else 0)


def test_compile_mode_keys_graphs_apart_and_falls_back_to_exact(pack, monkeypatch):
    """The decision per run, the graph-cache key, compiling once per signature, and the exact forward on failure.

    The compiled function is replaced by a stand-in (inductor on CUDA is the GPU test's business): what is checked
    here is what the fast path's wrapper is told to do.
    """
    cm = module(pack, "lcm_comfy.compile")
    monkeypatch.setattr(cm, "compile_unavailable", lambda: None)
    monkeypatch.setattr(cm, "compile_cache_dir", lambda: "/cache")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    calls, keys_seen = [], []

    def fake_compiled(unet, x, timesteps, context, y, transformer_options):
        calls.append(tuple(x.shape))
        keys_seen.append(sorted(transformer_options))
        transformer_options["original_shape"] = list(x.shape)  # as ComfyUI's UNet does: writes into the options
        return unet._forward(x, timesteps, context, y, None, transformer_options) + 1

    monkeypatch.setattr(cm, "_compiled", lambda: fake_compiled)
    unet = _Unet()

    def exact(x, timesteps, context, y):
        return x * 2

    tensors = {"x": torch.ones(1, 4, 8, 8), "timesteps": torch.ones(1), "context": torch.ones(1, 77, 8), "y": None}
    assert cm.fingerprint(7, False) == 7 and cm.fingerprint(7, True) != 7  # compiled and exact graphs never share a key
    assert cm.decide(_Executor(unet)) is True
    assert cm.decide(_Executor(unet, is_last=False)) is False  # a wrapper inside ours: the run stays exact
    options = {"cond_or_uncond": [0]}
    fwd = cm.compiled_forward(exact, _Executor(unet), options, tensors)
    # compiled now, outside any capture: a compile call and a check call
    assert calls == [(1, 4, 8, 8)] * 2 and len(cm.record_of(unet).seconds) == 1
    assert torch.equal(fwd(**tensors), tensors["x"] * 2 + 1)  # what the capture will run
    # every call met the options as they were, never a copy the UNet had written into (a new guard in a capture)
    assert keys_seen == [["cond_or_uncond"]] * 3 and options == {"cond_or_uncond": [0]}
    cm.compiled_forward(exact, _Executor(unet), options, tensors)
    assert len(calls) == 3  # no second compile for the same signature

    def failing(*args):
        raise RuntimeError("inductor says no (test)")

    monkeypatch.setattr(cm, "_compiled", lambda: failing)
    other = _Unet()
    assert cm.decide(_Executor(other)) is True
    assert cm.compiled_forward(exact, _Executor(other), {}, tensors) is exact
    assert "inductor says no" in cm.record_of(other).failed
    assert cm.decide(_Executor(other)) is False  # after a failure this UNet runs (and is keyed) exact


def test_compile_mode_on_cpu_runs_the_exact_paths_code(runner, comfy_base, pack):
    """On a CPU there is no fast path, and compile mode lives inside it: compile=True runs the very code compile=False
    runs, compiles nothing, and gives the same latents. The GPU side is test_compile_and_queue_gpu.py."""
    import comfy.model_management
    from models import save_unet, tiny_sd15_unet
    from test_support_nodes import stash

    if comfy.model_management.get_torch_device().type != "cpu":
        pytest.skip("ComfyUI runs on a GPU here, where compile mode compiles: the CPU case needs ComfyUI on the CPU")
    cm = module(pack, "lcm_comfy.compile")
    save_unet(tiny_sd15_unet(time_cond_proj_dim=256, seed=9), comfy_base / "models" / "diffusion_models" / "tiny-speed.safetensors")
    cond = [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(4)), {}]]
    for node, extra in (("LCMSampler", {}), ("TCDSampler", {"gamma": 0.3})):
        outs = []
        for compile_ in (False, True):
            prompt = {
                "1": {"class_type": "LCMLoadUNet", "inputs": {"unet_name": "tiny-speed.safetensors", "weight_dtype": "fp32"}},
                "2": {"class_type": "LCMTestValue", "inputs": {"key": stash(cond)}},
                "3": {"class_type": "LCMTestValue", "inputs": {"key": stash({"samples": torch.zeros(1, 4, 8, 8)})}},
                "4": {"class_type": node, "inputs": {"model": ["1", 0], "positive": ["2", 0], "latent_image": ["3", 0],
                                                     "seed": 5, "steps": 2, "guidance_scale": 8.0, "compile": compile_, **extra}},
            }
            outs.append(runner.run(prompt, ["4"])["4"][0][0]["samples"])
        assert torch.equal(outs[0], outs[1]), node
    assert not cm._compiled.built, "compile mode built the compiled UNet on a CPU"
