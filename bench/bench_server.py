"""LCM workflows through a real ComfyUI server: images per second and where each prompt's time goes (issue #12).

The benchmark writes full-size random-weight model files (an LCM UNet with the guidance embedding, CLIP-L, for
SDXL also CLIP-G, and the SD VAE) into a fresh ComfyUI base folder, starts ComfyUI v0.8.0 on 127.0.0.1 with this
pack, and for each workflow variant queues N prompts with distinct texts and seeds over HTTP at once, then polls
``/queue`` every 50 ms until it is empty (a light client: polling ``/history`` per prompt slows the server).
Images/s = N / (first POST to empty queue), after a few warm-up prompts that load, capture and compile.

Variants (each one our nodes against ComfyUI's native LCM, UNETLoader + ModelSamplingDiscrete lcm + KSampler
lcm/sgm_uniform, cfg 1, on the same files):
    latents   the workflow ends at the sampler (a do-nothing output node takes the latents)
    decode    ... VAE Decode (or LCM VAE Decode), the images taken by the do-nothing node
    save      ... VAE Decode + Save Image (or LCM VAE Decode + LCM Save Image)
plus the sampler's ``compile`` mode where the pack has it, started again on the same compile cache to time a
warm start.

This file is also the server-side probe. The benchmark links it into the server's ``custom_nodes`` as
``lcm_bench_probe.py`` and sets ``LCM_BENCH_PROBE``; ComfyUI imports it, and it then records the wall time of
every prompt and every node (JSON lines) and the CUDA-graph captures of the fast path, and adds the output node
``LCMBenchSink`` (takes anything, does nothing). Nothing of this runs when the variable is not set.

    python bench/bench_server.py --comfyui PATH --out bench/out [--families sdxl,sd15] [--prompts 24]
    python bench/bench_server.py --comfyui PATH --tiny          # a CPU smoke of the whole flow, tiny UNets
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROBE_ENV = "LCM_BENCH_PROBE"
log = logging.getLogger("lcm_bench")

# ============================================================================================ server-side probe


class LCMBenchSink:
    """Output node that takes any value and does nothing: lets a benchmark workflow end at latents or images."""

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 - ComfyUI's name
        return {"required": {"value": ("*", {"tooltip": "Anything; it is dropped."})}}

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def run(self, value):
        return {}


def _install_probe(path: str) -> None:
    """Record per-prompt and per-node wall times (and fast-path captures) to ``path``, one JSON object per prompt."""
    import execution

    lock = threading.Lock()
    current: dict = {}
    captures = {"n": 0, "seconds": []}
    patched_graphs: set[int] = set()

    def hook_graph_caches() -> None:
        # The pack's modules are imported under a path-derived name, after this probe: find them at run time.
        for name, module in list(sys.modules.items()):
            cls = getattr(module, "GraphCache", None) if name.endswith(("lcm_core.graphs", "lcm_core.fastpath")) else None
            if cls is None or id(cls) in patched_graphs:
                continue
            patched_graphs.add(id(cls))
            original = cls._capture

            def _capture(self, *args, _original=original, **kwargs):
                t0 = time.perf_counter()
                out = _original(self, *args, **kwargs)
                captures["n"] += 1
                captures["seconds"].append(time.perf_counter() - t0)
                return out

            cls._capture = _capture

    original_execute = execution.execute

    async def timed_execute(*args, **kwargs):
        t0 = time.perf_counter()
        result = await original_execute(*args, **kwargs)
        t1 = time.perf_counter()
        dynprompt, node_id = args[1], args[3]
        try:
            class_type = dynprompt.get_node(node_id)["class_type"]
        except Exception:  # noqa: BLE001 - an expanded node: keep the id
            class_type = "?"
        current.setdefault("nodes", []).append([node_id, class_type, t0, t1])
        return result

    execution.execute = timed_execute
    original_prompt = execution.PromptExecutor.execute_async

    async def timed_prompt(self, prompt, prompt_id, extra_data={}, execute_outputs=[]):  # noqa: B006 - ComfyUI's signature
        hook_graph_caches()
        current.clear()
        before = captures["n"]
        t0 = time.perf_counter()
        try:
            return await original_prompt(self, prompt, prompt_id, extra_data, execute_outputs)
        finally:
            t1 = time.perf_counter()
            record = {"prompt_id": prompt_id, "t0": t0, "t1": t1, "nodes": current.get("nodes", []),
                      "captures": captures["n"] - before, "capture_s": captures["seconds"][before:], "success": self.success}
            try:
                import torch

                if torch.cuda.is_available():
                    record["gpu_reserved_mib"] = torch.cuda.memory_reserved() / 2**20
            except Exception:  # noqa: BLE001
                pass
            with lock, open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    execution.PromptExecutor.execute_async = timed_prompt
    logging.getLogger("lcm_bench").info("LCM bench probe: timings to %s", path)


NODE_CLASS_MAPPINGS: dict = {}
if __name__ != "__main__" and os.environ.get(PROBE_ENV) and "execution" in sys.modules:
    NODE_CLASS_MAPPINGS["LCMBenchSink"] = LCMBenchSink
    _install_probe(os.environ[PROBE_ENV])


# ============================================================================================ model files


def _unet_config(family: str, tiny: bool) -> dict:
    sys.path.insert(0, str(REPO / "bench"))
    from bench_lcm import unet_config

    if not tiny:
        return unet_config(family, 256)
    if family == "sd15":
        return dict(sample_size=8, block_out_channels=(320,), down_block_types=("CrossAttnDownBlock2D",),
                    up_block_types=("CrossAttnUpBlock2D",), layers_per_block=1, cross_attention_dim=768,
                    attention_head_dim=8, time_cond_proj_dim=256)
    return dict(sample_size=8, block_out_channels=(320, 320, 320), layers_per_block=2,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
                attention_head_dim=(5, 5, 5), cross_attention_dim=2048, use_linear_projection=True,
                addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
                time_cond_proj_dim=256)


def _save(module, path: Path, clip: bool = False) -> None:
    import torch
    from safetensors.torch import save_file

    sd = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in module.state_dict().items()}
    if clip:  # ComfyUI reads transformers' "text_model." names; some transformers versions drop the prefix
        sd = {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v for k, v in sd.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))


def build_models(base: Path, families: list[str], tiny: bool) -> dict:
    """Random-weight model files in ComfyUI's folders; returns the file names per family."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    device = "cuda" if torch.cuda.is_available() else "cpu"
    models = base / "models"
    names: dict = {}
    torch.manual_seed(0)
    t0 = time.perf_counter()
    if not (models / "vae" / "sd_vae.safetensors").exists():
        with torch.device(device):
            vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                                up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4)
        _save(vae, models / "vae" / "sd_vae.safetensors")
        del vae
    if not (models / "text_encoders" / "clip_l.safetensors").exists():
        with torch.device(device):
            clip_l = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                                  max_position_embeddings=77, vocab_size=49408, projection_dim=768, hidden_act="quick_gelu"))
        _save(clip_l, models / "text_encoders" / "clip_l.safetensors", clip=True)
        del clip_l
    if "sdxl" in families and not (models / "text_encoders" / "clip_g.safetensors").exists():
        with torch.device(device):
            clip_g = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                                                num_attention_heads=20, max_position_embeddings=77, vocab_size=49408,
                                                                projection_dim=1280, hidden_act="gelu"))
        _save(clip_g, models / "text_encoders" / "clip_g.safetensors", clip=True)
        del clip_g
    for fam in families:
        unet_file = f"{fam}-lcm-unet{'-tiny' if tiny else ''}.safetensors"
        if not (models / "diffusion_models" / unet_file).exists():
            with torch.device(device):
                unet = UNet2DConditionModel(**_unet_config(fam, tiny)).half()
            _save(unet, models / "diffusion_models" / unet_file)
            del unet
        names[fam] = {"unet": unet_file, "vae": "sd_vae.safetensors", "clip_l": "clip_l.safetensors", "clip_g": "clip_g.safetensors"}
        if device == "cuda":
            torch.cuda.empty_cache()
    log.info("model files ready in %.0f s", time.perf_counter() - t0)
    return names


# ============================================================================================ workflows


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


# ============================================================================================ server and client


class Server:
    """ComfyUI v0.8.0 in a subprocess on 127.0.0.1, with this pack and the probe in its custom_nodes."""

    def __init__(self, comfy: Path, base: Path, probe_file: Path, log_file: Path, cpu: bool, port: int, env: dict | None = None,
                 extra_args: list[str] | None = None):
        self.comfy, self.base, self.probe_file, self.log_file, self.cpu, self.port = comfy, base, probe_file, log_file, cpu, port
        self.env = env or {}
        self.extra_args = list(extra_args or [])
        self.proc: subprocess.Popen | None = None
        self.url = f"http://127.0.0.1:{port}"

    def __enter__(self) -> Server:
        front = self.base / "frontend"
        front.mkdir(parents=True, exist_ok=True)
        (front / "index.html").write_text("<!doctype html><title>bench</title>")
        cmd = [sys.executable, str(self.comfy / "main.py"), "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base), "--front-end-root", str(front), "--disable-auto-launch", "--disable-api-nodes"]
        if self.cpu:
            cmd.append("--cpu")
        cmd += self.extra_args
        env = dict(os.environ, **self.env, **{PROBE_ENV: str(self.probe_file), "PYTHONUNBUFFERED": "1"})
        self.log_handle = open(self.log_file, "a", encoding="utf-8")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=self.comfy, stdout=self.log_handle, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}; see {self.log_file}")
            try:
                urllib.request.urlopen(self.url + "/system_stats", timeout=2).read()
                self.ready_s = time.perf_counter() - self.started
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        raise RuntimeError(f"ComfyUI did not answer within 300 s; see {self.log_file}")

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log_handle.close()


class Client:
    """Queues prompts and waits for an empty queue, polling /queue only."""

    def __init__(self, url: str):
        self.url = url
        self.client_id = uuid.uuid4().hex

    def _call(self, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=600) as r:
                return json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"{path}: HTTP {exc.code}: {exc.read().decode()[:2000]}") from None

    def queue(self, prompt: dict) -> str:
        return self._call("/prompt", {"prompt": prompt, "client_id": self.client_id})["prompt_id"]

    def wait_empty(self, poll: float = 0.05, timeout: float = 1800) -> float:
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            q = self._call("/queue")
            if not q.get("queue_running") and not q.get("queue_pending"):
                return time.perf_counter()
            time.sleep(poll)
        raise RuntimeError("the queue did not empty in time")

    def history(self, prompt_id: str) -> dict:
        return self._call(f"/history/{prompt_id}").get(prompt_id, {})

    def view(self, image: dict) -> bytes:
        q = urllib.parse.urlencode({"filename": image["filename"], "subfolder": image["subfolder"], "type": image["type"]})
        with urllib.request.urlopen(f"{self.url}/view?{q}", timeout=60) as r:
            return r.read()


def prompt_error(client: Client, prompt_id: str) -> str:
    for event, data in client.history(prompt_id).get("status", {}).get("messages", []):
        if event == "execution_error":
            return f"{data.get('node_type')}: {data.get('exception_message', '').strip()[:1500]}"
    return "no error message"


def read_probe(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        out[rec["prompt_id"]] = rec
    return out


STAGES = {
    "clip": ("CLIPTextEncode",),
    "sampler": ("LCMSampler", "KSampler", "ModelSamplingDiscrete"),
    "decode": ("VAEDecode", "LCMVAEDecode"),
    "save": ("SaveImage", "LCMSaveImage", "LCMBenchSink"),
}


def breakdown(records: list[dict]) -> dict:
    """Median ms per prompt for each stage, the executor's own time around the nodes, and the gap between prompts."""
    per: dict[str, list[float]] = {k: [] for k in (*STAGES, "other_nodes", "executor", "between_prompts", "prompt")}
    records = sorted(records, key=lambda r: r["t0"])
    for i, r in enumerate(records):
        stage_ms = dict.fromkeys(STAGES, 0.0)
        other = 0.0
        for _, cls, t0, t1 in r["nodes"]:
            ms = (t1 - t0) * 1000
            stage = next((s for s, names in STAGES.items() if cls in names), None)
            if stage:
                stage_ms[stage] += ms
            else:
                other += ms
        prompt_ms = (r["t1"] - r["t0"]) * 1000
        for s, v in stage_ms.items():
            per[s].append(v)
        per["other_nodes"].append(other)
        per["executor"].append(prompt_ms - sum(stage_ms.values()) - other)
        per["prompt"].append(prompt_ms)
        if i + 1 < len(records):
            per["between_prompts"].append((records[i + 1]["t0"] - r["t1"]) * 1000)
    return {k: round(statistics.median(v), 2) if v else None for k, v in per.items()}


def run_variant(client: Client, probe_file: Path, name: str, make, n: int, warmup: int, repeats: int = 1) -> dict:
    """Warm up, then queue ``n`` prompts at once ``repeats`` times; images/s and the per-stage breakdown."""
    before = set(read_probe(probe_file))
    t_warm = time.perf_counter()
    warm_ids = [client.queue(make(f"{name}-warm", i)) for i in range(warmup)]
    client.wait_empty()
    warm_s = time.perf_counter() - t_warm
    probe = read_probe(probe_file)
    warm_records = [probe[p] for p in warm_ids if p in probe]
    failed = [p for p in warm_ids if p in probe and not probe[p]["success"]]
    if failed:
        raise RuntimeError(f"{name}: warm-up prompt failed: {prompt_error(client, failed[0])}")
    result = {"variant": name, "prompts": n, "warmup_prompts": warmup, "warmup_s": round(warm_s, 2),
              "first_prompt_s": round(warm_records[0]["t1"] - warm_records[0]["t0"], 2) if warm_records else None,
              "warmup_captures": sum(r.get("captures", 0) for r in warm_records), "runs": []}
    for rep in range(repeats):
        t0 = time.perf_counter()
        ids = [client.queue(make(f"{name}-r{rep}", i)) for i in range(n)]
        t_end = client.wait_empty()
        probe = read_probe(probe_file)
        recs = [probe[p] for p in ids if p in probe]
        bad = [r["prompt_id"] for r in recs if not r["success"]]
        if bad or len(recs) != n:
            why = prompt_error(client, bad[0]) if bad else ""
            raise RuntimeError(f"{name}: {len(bad)} failed / {n - len(recs)} missing prompts {why}")
        executing = (max(r["t1"] for r in recs) - min(r["t0"] for r in recs))
        result["runs"].append({
            "images_per_s": round(n / (t_end - t0), 3),
            "wall_s": round(t_end - t0, 3),
            "images_per_s_executor": round(n / executing, 3),
            "captures": sum(r.get("captures", 0) for r in recs),
            "gpu_reserved_mib_last": recs[-1].get("gpu_reserved_mib"),
            "stages_ms": breakdown(recs),
        })
    result["images_per_s"] = [r["images_per_s"] for r in result["runs"]]
    del before
    log.info("%-28s %s images/s (warm-up %.1f s, first prompt %s s) stages %s", name, result["images_per_s"], warm_s,
             result["first_prompt_s"], result["runs"][-1]["stages_ms"])
    return result


def listed_files_are_complete(client: Client, make, n: int = 6) -> dict:
    """Queue ``n`` saving prompts, fetch each image through /view the moment /history lists it, check it decodes."""
    import io

    from PIL import Image

    ids = [client.queue(make("listed", i)) for i in range(n)]
    pending, ok, checked = set(ids), 0, 0
    deadline = time.time() + 600
    while pending and time.time() < deadline:
        for pid in list(pending):
            h = client.history(pid)
            if not h:
                continue
            pending.discard(pid)
            for out in h.get("outputs", {}).values():
                for image in out.get("images", []):
                    checked += 1
                    data = client.view(image)
                    img = Image.open(io.BytesIO(data))
                    img.load()  # raises on a truncated file
                    ok += 1
        time.sleep(0.02)
    return {"prompts": n, "images_checked": checked, "complete": ok}


# ============================================================================================ PNG cost


def natural_pixels(size: int = 1024):
    """A natural-looking image: a mosaic of photographs bundled with scikit-image when it is installed, else
    smooth colour fields with edges and grain (noted in the result)."""
    import numpy as np

    try:
        from skimage import data, transform

        tiles = []
        for name in ("astronaut", "coffee", "chelsea", "rocket"):
            img = getattr(data, name)()
            h, w = img.shape[:2]
            s = min(h, w)
            img = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
            tiles.append(transform.resize(img, (size // 2, size // 2), anti_aliasing=True).astype(np.float32))
        top, bottom = np.concatenate(tiles[:2], 1), np.concatenate(tiles[2:], 1)
        return np.concatenate([top, bottom], 0), "scikit-image photo mosaic (astronaut, coffee, chelsea, rocket)"
    except ImportError:
        g = np.random.default_rng(0)
        coarse = g.random((size // 32, size // 32, 3))
        img = np.kron(coarse, np.ones((32, 32, 1)))
        img += 0.02 * g.standard_normal(img.shape)
        return img.astype(np.float32), "synthetic smooth colour fields (scikit-image not installed)"


def png_costs(reps: int = 5) -> dict:
    import io

    import numpy as np
    import torch
    from bench_lcm import pack
    from PIL import Image

    save = pack("lcm_comfy.save")
    pixels, what = natural_pixels()
    image = torch.from_numpy(pixels)
    out = {"pixels": what, "cpu_cores": os.cpu_count(), "encoder_threads": save.ENCODER.workers}

    def best(fn):
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            r = fn()
            times.append((time.perf_counter() - t0) * 1000)
        return round(statistics.median(times), 1), r

    for level in (1, 4):
        def pil(level=level):
            buf = io.BytesIO()
            Image.fromarray(np.clip(255.0 * image.numpy(), 0, 255).astype(np.uint8)).save(buf, format="PNG", compress_level=level)
            return len(buf.getvalue())

        ms, size = best(pil)
        out[f"saveimage_pil_level{level}"] = {"ms": ms, "mb": round(size / 1e6, 3)}
        ms, data = best(lambda level=level: save.ENCODER.encode(image, level))
        out[f"lcm_parallel_level{level}"] = {"ms": ms, "mb": round(len(data) / 1e6, 3)}
    log.info("PNG cost: %s", out)
    return out


# ============================================================================================ chart


def write_chart(server_json: Path, inproc_json: Path, out_png: Path) -> None:
    """bench/chart.png: the in-process table (bench_lcm.py's results.json) beside the server's images/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from bench_lcm import inprocess_bars

    inproc = json.loads(inproc_json.read_text())
    server = json.loads(server_json.read_text())
    fig, axes = plt.subplots(1, 3, figsize=(18, 5), gridspec_kw={"width_ratios": [1, 1, 1.5]})
    for ax, fam in zip(axes[:2], ("sd15", "sdxl"), strict=True):
        inprocess_bars(ax, inproc, fam, fontsize=8)
    ax = axes[2]
    best: dict[tuple[str, str], float] = {}
    for run in server["runs"]:  # ComfyUI's default settings only; the median of a variant's repeated queues
        if run.get("server_args") or "compile mode" in run["label"]:
            continue
        fam = "SDXL" if run["label"].startswith("SDXL") else "SD1.5"
        for v in run.get("variants", []):
            if "images_per_s" in v and (fam, v["variant"]) not in best:
                best[(fam, v["variant"])] = statistics.median(v["images_per_s"])
    wanted = [("latents", "lcm latents", "native latents", "lcm compile latents"),
              ("save", "lcm save (VAE Decode + Save Image)", "native save", "lcm save (LCM VAE Decode + LCM Save Image)")]
    groups, values, colors = [], [], []
    for fam in ("SDXL", "SD1.5"):
        for end, ours, native, fast in wanted:
            for name, label, color in ((native, "native", "tab:gray"), (ours, "LCM", "tab:blue"), (fast, "LCM fast nodes", "tab:green")):
                if (fam, name) in best:
                    groups.append(f"{fam}\n{end}\n{label}")
                    values.append(best[(fam, name)])
                    colors.append(color)
    ax.bar(range(len(values)), values, color=colors)
    ax.set_xticks(range(len(values)), groups, fontsize=7)
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
    ax.set_ylabel("images/s through a ComfyUI server (higher is better)")
    ax.set_title(f"Through ComfyUI's queue, {server['card']} (bench_server.py)\n'fast nodes': LCM VAE Decode + LCM Save Image", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)


# ============================================================================================ main


def variants_for(fam: str, names: dict, size: int, tiny: bool) -> list[tuple[str, object]]:
    files = names[fam]

    def mk(ours: bool, end: str, **kw):
        return lambda tag, i: workflow(fam, files, ours, end, prompt_text(tag, i), seed=1000 + i, size=size, **kw)

    out = [
        ("lcm latents", mk(True, "latents")),
        ("native latents", mk(False, "latents")),
        ("lcm latents keep_graphs=always", mk(True, "latents", keep_graphs="always")),
        ("lcm decode-only (VAE Decode)", mk(True, "decode")),
        ("lcm decode-only (LCM VAE Decode)", mk(True, "decode", fast_vae=True)),
        ("native decode-only", mk(False, "decode")),
        ("lcm save (VAE Decode + Save Image)", mk(True, "save")),
        ("lcm save (LCM VAE Decode + LCM Save Image)", mk(True, "save", fast_vae=True, fast_save=True)),
        ("native save", mk(False, "save")),
    ]
    if tiny:  # ComfyUI's own UNETLoader does not recognise the tiny UNets' shapes: ours only
        out = [v for v in out if not v[0].startswith("native")]
    out += [
        ("lcm compile latents", mk(True, "latents", compile_unet=True)),
        ("lcm compile save (LCM VAE Decode + LCM Save Image)", mk(True, "save", fast_vae=True, fast_save=True, compile_unet=True)),
    ]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--comfyui", default=None, help="ComfyUI v0.8.0 folder (default: as the tests find it)")
    p.add_argument("--out", default=str(REPO / "bench" / "out"))
    p.add_argument("--base", default=None, help="ComfyUI base folder for models/output (default: a temporary one)")
    p.add_argument("--families", default="sdxl,sd15")
    p.add_argument("--prompts", type=int, default=24)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2, help="measured runs of the latents-only variants (they vary most)")
    p.add_argument("--only", default="", help="comma-separated substrings: run only variants whose name holds one")
    p.add_argument("--skip", default="", help="comma-separated substrings: skip variants whose name holds one")
    p.add_argument("--compile-cache", default=None, help="TORCHINDUCTOR_CACHE_DIR for the servers (default: in the base folder)")
    p.add_argument("--no-restart", action="store_true", help="skip the warm-start run of the compile mode")
    p.add_argument("--no-png", action="store_true", help="skip the PNG cost measurement")
    p.add_argument("--server-args", default="", help="more ComfyUI arguments, e.g. '--disable-cuda-malloc' (space-separated)")
    p.add_argument("--tiny", action="store_true", help="tiny UNets at 64x64 on the CPU: checks the flow, times nothing")
    p.add_argument("--port", type=int, default=8199)
    p.add_argument("--chart", action="store_true", help="only redraw bench/chart.png from bench/results.json and results_server.json")
    args = p.parse_args(argv)
    if args.chart:
        write_chart(REPO / "bench" / "results_server.json", REPO / "bench" / "results.json", REPO / "bench" / "chart.png")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.comfyui is None:
        sys.path.insert(0, str(REPO))
        from lcm_tools.locate import find_comfyui

        args.comfyui = str(find_comfyui()[0])
    import torch

    cpu = args.tiny or not torch.cuda.is_available()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = Path(args.base) if args.base else Path(tempfile.mkdtemp(prefix="lcm-bench-server-"))
    for sub in ("custom_nodes", "input", "output", "temp", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    for link, target in ((base / "custom_nodes" / "lcm_nodes", REPO), (base / "custom_nodes" / "lcm_bench_probe.py", Path(__file__).resolve())):
        if not link.exists():
            link.symlink_to(target)
    families = args.families.split(",")
    names = build_models(base, families, tiny=args.tiny)
    results: dict = {"server_args": args.server_args, "card": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not cpu else "CPU (smoke, not a timing)",
                     "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "prompts": args.prompts,
                     "cpu_cores": os.cpu_count(), "families": {}}
    results_path = out / "results_server.json"

    def dump():
        results_path.write_text(json.dumps(results, indent=2))

    try:
        if not args.no_png:
            results["png"] = png_costs()
    except Exception as exc:  # noqa: BLE001 - report and go on
        results["png"] = {"error": f"{type(exc).__name__}: {exc}"}
    dump()
    probe_file = out / "probe.jsonl"
    cache_env = {"TORCHINDUCTOR_CACHE_DIR": args.compile_cache or str(base / "user" / "lcm_nodes" / "torch_compile")}
    only = [s for s in args.only.split(",") if s]
    skip = [s for s in args.skip.split(",") if s]
    for fam in families:
        size = 64 if args.tiny else (1024 if fam == "sdxl" else 512)
        fam_res = results["families"].setdefault(fam, {"size": size, "variants": []})
        variants = [(n, m) for n, m in variants_for(fam, names, size, args.tiny) if (not only or any(s in n for s in only)) and not any(s in n for s in skip)]
        with Server(Path(args.comfyui), base, probe_file, out / f"server-{fam}.log", cpu, args.port, cache_env,
                    args.server_args.split()) as server:
            fam_res["server_start_s"] = round(server.ready_s, 1)
            client = Client(server.url)
            for name, make in variants:
                n = 4 if args.tiny else args.prompts
                reps = args.repeats if "latents" in name else 1
                try:
                    fam_res["variants"].append(run_variant(client, probe_file, name, make, n, args.warmup, reps))
                except Exception as exc:  # noqa: BLE001 - one broken variant must not lose the others
                    log.error("%s failed: %s", name, exc)
                    fam_res["variants"].append({"variant": name, "error": str(exc)[:3000]})
                dump()
            fast_save = [m for n, m in variants if "LCM Save Image" in n]
            if fast_save:
                fam_res["listed_files_complete"] = listed_files_are_complete(client, fast_save[0], 4 if args.tiny else 6)
                dump()
        compiled = [(n, m) for n, m in variants if "compile latents" in n]
        if compiled and not args.no_restart:  # a restarted ComfyUI on the same compile cache: the warm start
            with Server(Path(args.comfyui), base, probe_file, out / f"server-{fam}-restart.log", cpu, args.port, cache_env,
                        args.server_args.split()) as server:
                client = Client(server.url)
                name, make = compiled[0]
                try:
                    fam_res["variants"].append(run_variant(client, probe_file, name + " (restarted, warm cache)", make,
                                                           4 if args.tiny else args.prompts, args.warmup, 1))
                except Exception as exc:  # noqa: BLE001
                    fam_res["variants"].append({"variant": name + " (restarted)", "error": str(exc)[:3000]})
            dump()
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
