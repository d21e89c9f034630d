"""LCM VAE Decode: ComfyUI's VAE decode with a ``torch.compile``'d decoder on CUDA GPUs.

At LCM speeds the VAE decode is a large part of a prompt: SDXL's decoder at 1024² takes about 85 ms eager on an
H200, against ~120 ms for the four UNet steps. Its cost there is memory traffic between small kernels (group norm,
SiLU and residual adds on 128-512 channel maps of up to 1024², each a full pass over hundreds of MiB), which
inductor fuses; a CUDA graph alone gains nothing (the launches are not the cost) and would keep the decoder's
activations, gigabytes at 1024², allocated for as long as the graph lives, so the decoder is compiled, not
captured.

What it computes is VAEDecode's: the same ``load_models_gpu`` and memory estimate, the same decoder weights (the
VAE's own ``first_stage_model``, so a patched VAE decodes patched), the same ``process_output``, and an IMAGE on
the same (intermediate) device. Compiled kernels round differently, so the compiled output differs from
VAEDecode's by a small stated amount (README); everything else is VAEDecode, bit for bit:

- ``compile`` off, a CPU or other non-CUDA device, a video or audio VAE, a VAE only partly on the GPU, or
  ``torch.compile`` unusable here: ComfyUI's own ``vae.decode`` (which batches and falls back to tiled decoding on
  out-of-memory), the result identical to VAEDecode's;
- free GPU memory under ComfyUI's estimate for the batch, or an out-of-memory error in the compiled decoder:
  the same fallback, so a tight GPU decodes tiled, as VAEDecode would;
- a compile error: logged once per VAE with the reason, and that VAE decodes with ComfyUI's decoder from then on.

The first decode of a new latent size compiles (about 21 s for SDXL at 1024² on an H200 when nothing is cached;
progress text and the log say so); then SDXL's decode takes 39 ms instead of ~90 ms per prompt through a server.
Compile artefacts go to :func:`.compile.compile_cache_dir`, so a restarted ComfyUI compiles again from the disk
cache (for the UNet that took 84 -> 28 s; for the decoder it was not measured).
"""

from __future__ import annotations

import logging
import time

import torch

from ..lcm_core.errors import LCMInputError
from .compile import compile_cache_dir, compile_unavailable, lazily_compiled, progress_text, record_of

log = logging.getLogger("lcm_nodes")


# ------------------------------------------------------------------------------------------------ decoding


def _decoder_call(model: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    # The module is an argument, not a closure, so one compiled function serves every VAE without holding any.
    return model.decode(z)


_compiled = lazily_compiled(_decoder_call)


def comfy_decode(vae, latent: torch.Tensor) -> torch.Tensor:
    """VAEDecode's own code path (ComfyUI's ``vae.decode``, batching and tiled fallback included)."""
    images = vae.decode(latent)
    if images.ndim == 5:  # as VAEDecode: video VAEs return [batch, frames, h, w, c]
        images = images.reshape(-1, images.shape[-3], images.shape[-2], images.shape[-1])
    return images


def fast_decode_blocker(vae, latent: torch.Tensor, compile: bool) -> str | None:
    """Why this decode goes through ComfyUI's decoder rather than the compiled one, or None."""
    if not compile:
        return "compile is off"
    if getattr(vae, "latent_dim", 2) != 2 or latent.ndim != 4 or getattr(vae, "extra_1d_channel", None) is not None:
        return "not an image VAE (2-D latents)"
    device = getattr(vae, "device", None)
    if not isinstance(device, torch.device) or device.type != "cuda":
        return f"the VAE runs on {device}, not a CUDA GPU"
    model = getattr(vae, "first_stage_model", None)
    if model is None or not callable(getattr(model, "decode", None)):
        return "the VAE has no decoder"
    failed = record_of(model).failed
    if failed:
        return f"compiling this VAE failed earlier ({failed})"
    return compile_unavailable()


def decode_direct(vae, latent: torch.Tensor, decoder=None) -> torch.Tensor:
    """Decode the whole batch at once with ``decoder(model, z)`` (default: the compiled one), finishing on the GPU.

    ``process_output`` runs in float32 on the decoder's device before the copy to the output device; float32
    addition, division by 2 and clamping are correctly rounded on both, so this equals VAEDecode's order (copy,
    then convert) exactly for the same decoder output. Returns contiguous [batch, h, w, c] on ``vae.output_device``.
    """
    decoder = decoder or _compiled()
    with torch.no_grad():
        z = latent.to(vae.vae_dtype).to(vae.device)
        out = decoder(vae.first_stage_model, z)
        images = vae.process_output(out.float()).movedim(1, -1).contiguous()
        return images.to(vae.output_device)


def decode(vae, samples: dict, compile: bool = True, node_id: str | None = None, stats: dict | None = None) -> torch.Tensor:
    """LCM VAE Decode: the IMAGE VAEDecode gives for ``samples``, decoded by a compiled decoder where that is safe.

    ``stats``, when given, receives ``path`` ("compiled" or "comfy"), ``why`` (the fallback's reason) and, after a
    compile, ``compile_seconds``. The IMAGE carries no autograd history on any path: ComfyUI's ``vae.decode`` records
    one when called outside its executor's inference mode (a library call), and on weights ComfyUI loaded under
    that mode recording fails ("Inference tensors cannot be saved for backward").
    """
    with torch.no_grad():
        return _decode(vae, samples, compile, node_id, {} if stats is None else stats)


def _decode(vae, samples: dict, compile: bool, node_id: str | None, stats: dict) -> torch.Tensor:
    import comfy.model_management as mm

    if not isinstance(samples, dict) or not isinstance(samples.get("samples"), torch.Tensor):
        raise LCMInputError("samples is not a LATENT ({'samples': tensor}): connect a sampler's LATENT output.")
    if vae is None or not callable(getattr(vae, "decode", None)):
        raise LCMInputError(f"vae is a {type(vae).__name__}, not a ComfyUI VAE: connect Load VAE or a checkpoint loader's VAE output.")
    latent = samples["samples"]
    if latent.is_nested:
        latent = latent.unbind()[0]
    if latent.ndim == 5 and getattr(vae, "latent_dim", 2) == 2:
        latent = latent[:, :, 0]  # as vae.decode does for image VAEs
    why = fast_decode_blocker(vae, latent, compile)
    if why is None:
        model = vae.first_stage_model
        memory_used = vae.memory_used_decode(latent.shape, vae.vae_dtype)
        mm.load_models_gpu([vae.patcher], memory_required=memory_used, force_full_load=vae.disable_offload)
        if getattr(vae.patcher.model, "model_lowvram", False):
            why = "the VAE is only partly loaded on the GPU (low VRAM)"
        elif mm.get_free_memory(vae.device) < memory_used * latent.shape[0]:
            why = "GPU memory is short for a one-piece decode; ComfyUI's decoder batches or tiles"
        else:
            try:
                return _decode_compiled(vae, model, latent, node_id, stats)
            except mm.OOM_EXCEPTION:
                why = "out of GPU memory in the compiled decoder"
                mm.soft_empty_cache()
    stats.update(path="comfy", why=why)
    if why != "compile is off":
        _log_once(why)
    return comfy_decode(vae, latent)


_LOGGED: set[str] = set()


def _log_once(why: str) -> None:
    """Say why the compiled decoder was not used, once per reason (then at debug level: a queue repeats it)."""
    level = logging.DEBUG if why in _LOGGED else logging.INFO
    _LOGGED.add(why)
    log.log(level, "LCM VAE Decode: ComfyUI's decoder for this decode (%s).", why)


def _decode_compiled(vae, model, latent: torch.Tensor, node_id: str | None, stats: dict) -> torch.Tensor:
    state = record_of(model)  # the compile module's per-module record: sizes compiled (with seconds), failure
    key = (tuple(latent.shape), vae.vae_dtype, str(vae.device))
    if key in state.seconds:
        stats.update(path="compiled", why=None)
        return decode_direct(vae, latent)
    cache = compile_cache_dir()
    b, c, h, w = latent.shape
    progress_text(f"LCM VAE Decode: compiling the VAE decoder for {b}x{c}x{h}x{w} latents ({vae.vae_dtype}) "
                  f"with torch.compile, once per size: about 20 s for SDXL at 1024² on an H200, less when {cache} "
                  "already holds it.", node_id)
    start = time.perf_counter()
    try:
        images = decode_direct(vae, latent)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - inductor/Triton raise many types; any of them means "don't compile"
        state.failed = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        log.warning("LCM VAE Decode: torch.compile of this VAE's decoder failed (%s); it decodes with ComfyUI's "
                    "decoder from now on.", state.failed)
        stats.update(path="comfy", why=f"compile failed: {state.failed}")
        return comfy_decode(vae, latent)
    torch.cuda.synchronize(vae.device)
    seconds = time.perf_counter() - start
    state.seconds[key] = seconds
    progress_text(f"LCM VAE Decode: decoder compiled in {seconds:.1f} s.", node_id)
    stats.update(path="compiled", why=None, compile_seconds=seconds)
    return images
