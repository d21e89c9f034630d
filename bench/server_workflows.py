"""The API-format prompts the server benchmarks queue (bench_server.py, bench_cluster.py): an SD1.5 or SDXL
text-to-image graph with this pack's nodes or ComfyUI's native LCM, on the files ``model_files.build_models`` writes,
ending at the latents, the decoded images or saved PNGs; and distinct prompt texts, so no prompt is a cache hit.
"""

from __future__ import annotations

SUBJECTS = ["a lighthouse", "a red fox", "an old bicycle", "a mountain lake", "a bowl of ramen", "a city street",
            "a sailing boat", "a violin", "a desert canyon", "a greenhouse", "a steam train", "a koi pond"]
STYLES = ["at dusk", "in fog", "in spring", "at noon", "under snow", "by candlelight"]


def prompt_text(tag: str, i: int) -> str:
    return f"a photograph of {SUBJECTS[i % len(SUBJECTS)]} {STYLES[(i // len(SUBJECTS)) % len(STYLES)]}, {tag} take {i}"


def workflow(fam: str, files: dict, ours: bool, end: str, text: str, seed: int, size: int, *, fast_vae: bool = False,
             fast_save: bool = False, compile_unet: bool | None = None, keep_graphs: str | None = None) -> dict:
    """An API-format prompt. ``end``: 'latents', 'decode' or 'save'."""
    p: dict = {}
    if fam == "sdxl":
        p["2"] = {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": files["clip_l"], "clip_name2": files["clip_g"], "type": "sdxl"}}
    else:
        p["2"] = {"class_type": "CLIPLoader", "inputs": {"clip_name": files["clip_l"], "type": "stable_diffusion"}}
    p["3"] = {"class_type": "VAELoader", "inputs": {"vae_name": files["vae"]}}
    p["4"] = {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["2", 0]}}
    p["5"] = {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}}
    if ours:
        p["1"] = {"class_type": "LCMLoadUNet", "inputs": {"unet_name": files["unet"], "weight_dtype": "default", "default_guidance": 8.0}}
        inputs = {"model": ["1", 0], "positive": ["4", 0], "latent_image": ["5", 0], "seed": seed, "steps": 4, "guidance_scale": 8.0}
        if keep_graphs:
            inputs["keep_graphs"] = keep_graphs
        if compile_unet is not None:
            inputs["compile"] = compile_unet
        p["6"] = {"class_type": "LCMSampler", "inputs": inputs}
    else:
        p["1"] = {"class_type": "UNETLoader", "inputs": {"unet_name": files["unet"], "weight_dtype": "default"}}
        p["1b"] = {"class_type": "ModelSamplingDiscrete", "inputs": {"model": ["1", 0], "sampling": "lcm", "zsnr": False}}
        p["4n"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["2", 0]}}
        p["6"] = {"class_type": "KSampler", "inputs": {"model": ["1b", 0], "seed": seed, "steps": 4, "cfg": 1.0, "sampler_name": "lcm",
                                                        "scheduler": "sgm_uniform", "positive": ["4", 0], "negative": ["4n", 0],
                                                        "latent_image": ["5", 0], "denoise": 1.0}}
    if end == "latents":
        p["9"] = {"class_type": "LCMBenchSink", "inputs": {"value": ["6", 0]}}
        return p
    p["7"] = ({"class_type": "LCMVAEDecode", "inputs": {"samples": ["6", 0], "vae": ["3", 0]}} if fast_vae
              else {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["3", 0]}})
    if end == "decode":
        p["9"] = {"class_type": "LCMBenchSink", "inputs": {"value": ["7", 0]}}
    elif fast_save:
        p["9"] = {"class_type": "LCMSaveImage", "inputs": {"images": ["7", 0], "filename_prefix": f"bench/{fam}"}}
    else:
        p["9"] = {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": f"bench/{fam}"}}
    return p
