"""Workflow files: the bundled ones, API-format loading, overrides (prompt, seed, size, model names...) and prompt files.

The bundled workflows live in ``workflows/<name>.json`` (UI format: what ComfyUI's Templates browser lists and
the page opens) and ``workflows/api/<name>.api.json`` (API format: what ``POST /prompt`` and the runner take).
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .client import RunnerError
from .locate import PACK_DIR

WORKFLOWS_DIR = PACK_DIR / "workflows"
API_DIR = WORKFLOWS_DIR / "api"
API_SUFFIX = ".api.json"
SAMPLERS = ("LCMSampler", "LCMImg2Img", "TCDSampler", "KSampler")
#: Workflow inputs that name a model file, and the models/ folder each is read from.
MODEL_INPUTS = {"ckpt_name": "checkpoints", "unet_name": "diffusion_models", "lora_name": "loras", "vae_name": "vae",
                "clip_name": "text_encoders"}


# ------------------------------------------------------------------------------------------ bundled workflows


def bundled_names() -> list[str]:
    """Names of the bundled API-format workflows (``workflows/api/<name>.api.json``), sorted."""
    return sorted(p.name[: -len(API_SUFFIX)] for p in API_DIR.glob(f"*{API_SUFFIX}"))


def resolve_workflow(spec: str | Path, cwd: Path | None = None) -> Path:
    """The API-format file for ``spec``: a path to one, or a bundled workflow's name in any of the forms
    ``NAME``, ``NAME.api.json``, ``NAME.json``, ``workflows/NAME.json``, ``workflows/api/NAME.api.json``.

    A path that exists wins. Raises RunnerError listing the bundled names when nothing matches.
    """
    spec = str(spec)
    path = Path(spec).expanduser()
    if not path.is_absolute() and cwd is not None:
        path = cwd / path
    if path.is_file():
        return path
    name = Path(spec).name
    for suffix in (API_SUFFIX, ".json"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    bundled = API_DIR / f"{name}{API_SUFFIX}"
    if bundled.is_file():
        return bundled
    names = bundled_names()
    raise RunnerError(f"no workflow {spec!r}: it is neither a file nor a bundled workflow. Bundled workflows: "
                      + ", ".join(names) + f" (in {API_DIR}); or give the path of an API-format .json file")


def load_workflow(path: str | Path) -> dict:
    """Read an API-format workflow ``{node_id: {class_type, inputs}}``; a bundled name works too (see resolve_workflow)."""
    path = resolve_workflow(path)
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RunnerError(f"workflow {path} is not valid JSON: {exc}") from None
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        api_twin = API_DIR / f"{Path(path).name.removesuffix('.json')}{API_SUFFIX}"
        hint = f"use {api_twin}" if api_twin.is_file() else "export it with 'Export (API)' in ComfyUI's menu"
        raise RunnerError(f"{path} is a UI-format workflow (what the page saves); the runner takes the API format: {hint}.")
    if not isinstance(data, dict) or not data or not all(isinstance(v, dict) and "class_type" in v for v in data.values()):
        raise RunnerError(f"{path} is not an API-format workflow ({{node_id: {{class_type, inputs}}}})")
    return data


def model_files(api: dict) -> list[tuple[str, str]]:
    """The (models/ folder, file name) pairs a workflow reads, sorted."""
    out = set()
    for node in api.values():
        for key, folder in MODEL_INPUTS.items():
            value = node.get("inputs", {}).get(key)
            if isinstance(value, str):
                out.add((folder, value))
    return sorted(out)


def input_images(api: dict) -> list[str]:
    """The images a workflow reads from ComfyUI's input/ folder (Load Image nodes)."""
    return sorted({n["inputs"]["image"] for n in api.values() if n.get("class_type") == "LoadImage" and isinstance(n.get("inputs", {}).get("image"), str)})


def output_size(api: dict) -> tuple[int, int] | None:
    """(width, height) of the workflow's Empty Latent Image, or None (img2img: the input image's size)."""
    for node in api.values():
        if node.get("class_type") in ("EmptyLatentImage", "EmptySD3LatentImage"):
            return node["inputs"]["width"], node["inputs"]["height"]
    return None


# ------------------------------------------------------------------------------------------ overrides


@dataclass(frozen=True)
class Overrides:
    """Values to set in a workflow; None leaves the workflow's own value."""

    prompt: str | None = None
    negative: str | None = None
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    strength: float | None = None
    width: int | None = None
    height: int | None = None
    batch: int | None = None
    unet: str | None = None
    ckpt: str | None = None
    lora: str | None = None
    image: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name != "extra"]

    def merged(self, item: dict[str, Any]) -> Overrides:
        """These overrides with a prompts-file item's fields on top. Raises RunnerError on an unknown field."""
        data = {k: getattr(self, k) for k in self.field_names()}
        unknown = set(item) - set(data)
        if unknown:
            raise RunnerError(f"unknown field(s) {sorted(unknown)} in prompts file; allowed: {sorted(data)}")
        data.update(item)
        return Overrides(**data)


def _linked_node(api: dict, ref: Any) -> str | None:
    return ref[0] if isinstance(ref, list) and len(ref) == 2 and str(ref[0]) in api else None


def _check_size(o: Overrides) -> None:
    for name in ("width", "height"):
        value = getattr(o, name)
        if value is not None and (not isinstance(value, int) or value < 16 or value % 8):
            raise RunnerError(f"--{name} {value} is not a multiple of 8 of at least 16; give e.g. 512 or 1024")
    if o.batch is not None and (not isinstance(o.batch, int) or o.batch < 1):
        raise RunnerError(f"--batch {o.batch} must be 1 or more")


def apply_overrides(api: dict, o: Overrides) -> dict:
    """Return a copy of an API-format workflow with the overrides applied. Raises RunnerError when one has no target."""
    _check_size(o)
    api = copy.deepcopy(api)
    samplers = [nid for nid, n in api.items() if n.get("class_type") in SAMPLERS
                or {"steps", "seed"} <= set(n.get("inputs", {})) or {"steps", "noise_seed"} <= set(n.get("inputs", {}))]

    def set_on(class_types: tuple[str, ...], key: str, value: Any, what: str) -> None:
        if value is None:
            return
        targets = [n for n in api.values() if n.get("class_type") in class_types and key in n.get("inputs", {})]
        if not targets:
            raise RunnerError(f"--{what} given, but the workflow has no {'/'.join(class_types)} node with input {key!r}")
        for n in targets:
            n["inputs"][key] = value

    for flag, sampler_key in (("seed", "seed"), ("steps", "steps"), ("guidance", "guidance_scale"), ("strength", "strength")):
        value = getattr(o, flag)
        if value is not None:
            keys = [sampler_key] + (["noise_seed"] if flag == "seed" else []) + (["cfg"] if flag == "guidance" else [])
            hit = False
            for nid in samplers:
                for k in keys:
                    if k in api[nid]["inputs"]:
                        api[nid]["inputs"][k] = value
                        hit = True
            if not hit:
                raise RunnerError(f"--{flag} given, but no sampler in the workflow has input {sampler_key!r}")
    for text, slot in ((o.prompt, "positive"), (o.negative, "negative")):
        if text is None:
            continue
        encoders = {_linked_node(api, api[nid]["inputs"].get(slot)) for nid in samplers} - {None}
        encoders = {e for e in encoders if "text" in api[e]["inputs"]}
        if not encoders:
            raise RunnerError(f"--{'prompt' if slot == 'positive' else 'negative'} given, but no text encoder feeds the sampler's {slot}")
        for e in encoders:
            api[e]["inputs"]["text"] = text
    empty = [n for n in api.values() if n.get("class_type") in ("EmptyLatentImage", "EmptySD3LatentImage")]
    encoders = [nid for nid, n in api.items() if n.get("class_type") == "VAEEncode"]
    if (o.width or o.height) and not empty:
        if not encoders:
            raise RunnerError("--width/--height given, but the workflow has neither Empty Latent Image nor VAE Encode")
        # img2img: the size comes from the input image; scale it so --width/--height still apply.
        for nid in encoders:
            scale_id = f"lcm_runner_scale_{nid}"
            api[scale_id] = {"class_type": "ImageScale", "inputs": {"image": api[nid]["inputs"]["pixels"], "upscale_method": "bilinear",
                             "width": o.width or o.height, "height": o.height or o.width, "crop": "center"}}
            api[nid]["inputs"]["pixels"] = [scale_id, 0]
    else:
        set_on(("EmptyLatentImage", "EmptySD3LatentImage"), "width", o.width, "width")
        set_on(("EmptyLatentImage", "EmptySD3LatentImage"), "height", o.height, "height")
    if o.batch is not None and not empty:
        for nid in encoders:
            batch_id = f"lcm_runner_batch_{nid}"
            api[batch_id] = {"class_type": "RepeatLatentBatch", "inputs": {"samples": [nid, 0], "amount": o.batch}}
            for n in api.values():
                for k, v in n.get("inputs", {}).items():
                    if v == [nid, 0] and n is not api[batch_id] and n.get("class_type") != "VAEDecode":
                        n["inputs"][k] = [batch_id, 0]
    else:
        set_on(("EmptyLatentImage", "EmptySD3LatentImage"), "batch_size", o.batch, "batch")
    set_on(("LCMLoadUNet", "UNETLoader"), "unet_name", o.unet, "unet")
    set_on(("CheckpointLoaderSimple",), "ckpt_name", o.ckpt, "ckpt")
    set_on(("LCMApplyLoRA", "LoraLoader", "LoraLoaderModelOnly"), "lora_name", o.lora, "lora")
    set_on(("LoadImage",), "image", o.image, "image")
    return api


# ------------------------------------------------------------------------------------------ prompt files


def read_prompts(path: str | Path) -> list[dict]:
    """A prompts file: one prompt per line, or JSON lines of override fields; blank lines and ``#`` comments skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RunnerError(f"prompts file {path} does not exist") from None
    items = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("{"):
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RunnerError(f"{path}:{n} is not valid JSON: {exc}") from None
            if not isinstance(item, dict):
                raise RunnerError(f"{path}:{n} is JSON but not an object of override fields")
            items.append(item)
        else:
            items.append({"prompt": line})
    return items


def item_key(api: dict) -> str:
    """A stable key of a prompt (its content), to know it is already done when a queue is run again."""
    return hashlib.sha256(json.dumps(api, sort_keys=True).encode()).hexdigest()[:16]
