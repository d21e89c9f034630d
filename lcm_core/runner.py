"""Headless runner: queue a workflow (or a file of many prompts) on ComfyUI and write the images.

    python -m lcm_core.runner run workflows/sdxl-lcm-lora-txt2img.api.json --prompt "a cat" --seed 7
    python -m lcm_core.runner run WORKFLOW --server http://127.0.0.1:8188 --prompts prompts.txt --output out/
    python -m lcm_core.runner convert models/loras/old.ckpt    # pickle -> .safetensors, tensors only

Without ``--server`` it starts a ComfyUI of its own on 127.0.0.1 (found as the test harness finds it) and
stops it afterwards. Progress is shown per sampling step; a prompt that fails validation or execution makes
the command exit non-zero with ComfyUI's own error text. With ``--prompts`` (one prompt per line, or JSON
lines with any of the override fields) it runs a queue, records each finished item in
``<output>/.lcm-runner-state.json`` and, when run again, skips what is already done.
ComfyUI is only spoken to over HTTP; this module imports no ComfyUI code.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("lcm_nodes.runner")

SAMPLERS = ("LCMSampler", "LCMImg2Img", "KSampler")
STATE_FILE = ".lcm-runner-state.json"


class RunnerError(RuntimeError):
    """A prompt failed (validation or execution) or ComfyUI could not be reached; the text is ComfyUI's."""


# ------------------------------------------------------------------------------------------ overrides


@dataclass
class Overrides:
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

    def merged(self, item: dict[str, Any]) -> Overrides:
        data = {k: v for k, v in self.__dict__.items() if k != "extra"}
        unknown = set(item) - set(data)
        if unknown:
            raise RunnerError(f"unknown field(s) {sorted(unknown)} in prompts file; allowed: {sorted(data)}")
        data.update(item)
        return Overrides(**data)


def _linked_node(api: dict, ref: Any) -> str | None:
    return ref[0] if isinstance(ref, list) and len(ref) == 2 and str(ref[0]) in api else None


def apply_overrides(api: dict, o: Overrides) -> dict:
    """Return a copy of an API-format workflow with the overrides applied. Raises RunnerError when one has no target."""
    api = copy.deepcopy(api)
    samplers = [nid for nid, n in api.items() if n.get("class_type") in SAMPLERS]

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


def load_workflow(path: str) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunnerError(f"workflow {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise RunnerError(f"workflow {path} is not valid JSON: {exc}") from None
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        raise RunnerError(
            f"{path} is a UI-format workflow (what the page saves); the runner takes the API format: "
            f"use the .api.json beside it, or 'Export (API)' in ComfyUI."
        )
    if not isinstance(data, dict) or not all(isinstance(v, dict) and "class_type" in v for v in data.values()):
        raise RunnerError(f"{path} is not an API-format workflow ({{node_id: {{class_type, inputs}}}})")
    return data


# ------------------------------------------------------------------------------------------ HTTP client


class ComfyClient:
    """A minimal ComfyUI HTTP client: /prompt, /ws progress, /history, /view, /interrupt, /free."""

    def __init__(self, server: str, timeout: float = 3600.0):
        self.server = server.rstrip("/")
        self.timeout = timeout
        self.client_id = uuid.uuid4().hex

    def _request(self, path: str, data: dict | None = None, method: str | None = None) -> Any:
        body = json.dumps(data).encode() if data is not None else None
        req = urllib.request.Request(self.server + path, data=body, method=method or ("POST" if body is not None else "GET"),
                                     headers={"Content-Type": "application/json"} if body is not None else {})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                raw = r.read()
                return json.loads(raw) if raw and r.headers.get_content_type() == "application/json" else raw
        except urllib.error.HTTPError as exc:
            text = exc.read().decode("utf-8", "replace")
            try:
                payload = json.loads(text)
            except json.JSONDecodeError:
                raise RunnerError(f"ComfyUI answered {exc.code} on {path}: {text[:2000]}") from None
            raise RunnerError(format_prompt_error(payload)) from None
        except urllib.error.URLError as exc:
            raise RunnerError(f"cannot reach ComfyUI at {self.server}: {exc.reason}") from None

    def alive(self) -> bool:
        try:
            self._request("/system_stats")
            return True
        except RunnerError:
            return False

    def queue(self, api: dict) -> str:
        resp = self._request("/prompt", {"prompt": api, "client_id": self.client_id})
        return resp["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        return self._request(f"/history/{prompt_id}").get(prompt_id)

    def view(self, image: dict) -> bytes:
        q = urllib.parse.urlencode({"filename": image["filename"], "subfolder": image.get("subfolder", ""), "type": image.get("type", "output")})
        return self._request(f"/view?{q}")

    def interrupt(self) -> None:
        self._request("/interrupt", {})

    def wait(self, prompt_id: str, on_progress=None) -> dict:
        """Wait for a prompt, reporting (value, max) progress from the websocket when aiohttp is there."""
        try:
            import asyncio

            import aiohttp  # ComfyUI's own dependency

            async def listen():
                url = self.server.replace("http", "ws", 1) + f"/ws?clientId={self.client_id}"
                async with aiohttp.ClientSession() as session:
                    async with session.ws_connect(url, heartbeat=30) as ws:
                        deadline = time.monotonic() + self.timeout
                        while time.monotonic() < deadline:
                            h = self.history(prompt_id)
                            if h is not None and h.get("status", {}).get("completed") is not None:
                                return
                            try:
                                msg = await ws.receive(timeout=1.0)
                            except asyncio.TimeoutError:
                                continue
                            if msg.type != aiohttp.WSMsgType.TEXT:
                                if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                                    return
                                continue
                            data = json.loads(msg.data)
                            d = data.get("data", {})
                            if d.get("prompt_id") not in (None, prompt_id):
                                continue
                            if data["type"] == "progress" and on_progress:
                                on_progress(d["value"], d["max"])
                            elif data["type"] in ("execution_success", "execution_error", "execution_interrupted"):
                                return

            asyncio.run(listen())
        except ImportError:
            pass
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            h = self.history(prompt_id)
            if h is not None and h.get("status", {}).get("completed") is not None:
                break
            time.sleep(0.2)
        else:
            raise RunnerError(f"prompt {prompt_id} did not finish within {self.timeout:.0f} s")
        status = h.get("status", {})
        if status.get("status_str") != "success":
            raise RunnerError(format_history_error(h))
        return h


def format_prompt_error(payload: dict) -> str:
    """ComfyUI's validation error text, as the page would show it."""
    err = payload.get("error", {})
    lines = [f"{err.get('message', 'prompt rejected')}: {err.get('details', '')}".rstrip(": ")]
    for nid, ne in (payload.get("node_errors") or {}).items():
        for e in ne.get("errors", []):
            lines.append(f"  node {nid} ({ne.get('class_type')}): {e.get('message')}: {e.get('details', '')}")
    return "\n".join(lines)


def format_history_error(h: dict) -> str:
    for event, data in h.get("status", {}).get("messages", []):
        if event == "execution_error":
            return f"node {data.get('node_id')} ({data.get('node_type')}): {data.get('exception_type')}: {data.get('exception_message')}"
        if event == "execution_interrupted":
            return "prompt was interrupted"
    return f"prompt failed: {h.get('status')}"


# ------------------------------------------------------------------------------------------ own server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalComfy:
    """A ComfyUI started on 127.0.0.1 for the duration of a run (``with LocalComfy(...) as url``)."""

    def __init__(self, comfy_path: Path, extra_args: list[str] | None = None, log_path: Path | None = None):
        self.comfy_path = comfy_path
        self.extra_args = extra_args or []
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def __enter__(self) -> str:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        args = [sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch", *self.extra_args]
        if not _has_cuda():
            args.append("--cpu")
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(args, cwd=self.comfy_path, stdout=out, stderr=subprocess.STDOUT)
        client = ComfyClient(self.url)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RunnerError(f"ComfyUI exited with code {self.proc.returncode} while starting" +
                                  (f"; see {self.log_path}" if self.log_path else ""))
            if client.alive():
                return self.url
            time.sleep(0.5)
        self.__exit__(None, None, None)
        raise RunnerError("ComfyUI did not start within 180 s")

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


# ------------------------------------------------------------------------------------------ running


def _progress_bar(desc: str):
    try:
        from tqdm import tqdm
    except ImportError:  # plain lines
        def report(value, total):
            print(f"{desc}: step {value}/{total}", file=sys.stderr)
        return report, lambda: None
    bar = tqdm(total=1, desc=desc, unit="step", file=sys.stderr)

    def report(value, total):
        if bar.total != total:
            bar.reset(total=total)
        bar.n = value
        bar.refresh()

    return report, bar.close


def run_one(client: ComfyClient, api: dict, output: Path, name: str, quiet: bool = False) -> list[Path]:
    """Queue one prompt, wait for it, and save every image it produced under ``output``."""
    prompt_id = client.queue(api)
    report, close = (lambda v, t: None, lambda: None) if quiet else _progress_bar(name)
    try:
        history = client.wait(prompt_id, report)
    finally:
        close()
    written = []
    output.mkdir(parents=True, exist_ok=True)
    for node_out in history.get("outputs", {}).values():
        for image in node_out.get("images", []):
            if image.get("type") != "output":
                continue
            path = output / f"{name}_{len(written):02d}.png"
            tmp = path.with_suffix(".part")
            tmp.write_bytes(client.view(image))
            os.replace(tmp, path)  # never a half-written image under the final name
            written.append(path)
    if not written:
        raise RunnerError(f"prompt {prompt_id} finished but produced no output image (does the workflow end in Save Image?)")
    return written


def read_prompts(path: str) -> list[dict]:
    items = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("{"):
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RunnerError(f"{path}:{n} is not valid JSON: {exc}") from None
            items.append(item)
        else:
            items.append({"prompt": line})
    return items


def item_key(api: dict) -> str:
    return hashlib.sha256(json.dumps(api, sort_keys=True).encode()).hexdigest()[:16]


def run_queue(client: ComfyClient, base: dict, overrides: Overrides, items: list[dict], output: Path, quiet: bool = False) -> dict:
    """Run many prompts; resume from the state file in ``output``. Returns a summary dict."""
    output.mkdir(parents=True, exist_ok=True)
    state_path = output / STATE_FILE
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    done = skipped = 0
    failed: list[str] = []
    for i, item in enumerate(items):
        api = apply_overrides(base, overrides.merged(item))
        key = item_key(api)
        name = f"item{i:04d}_{key[:8]}"
        if key in state and all((output / f).exists() for f in state[key]):
            skipped += 1
            continue
        try:
            files = run_one(client, api, output, name, quiet)
        except RunnerError as exc:
            failed.append(f"item {i}: {exc}")
            print(f"item {i} failed: {exc}", file=sys.stderr)
            continue
        state[key] = [f.name for f in files]
        tmp = state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, state_path)
        done += 1
        if not quiet:
            print(f"[{i + 1}/{len(items)}] {', '.join(f.name for f in files)}", file=sys.stderr)
    return {"total": len(items), "done": done, "skipped": skipped, "failed": failed}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lcm_core.runner", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="queue a workflow and write its images")
    r.add_argument("workflow", help="an API-format workflow (.api.json)")
    r.add_argument("--server", help="URL of a running ComfyUI; default: start one on 127.0.0.1")
    r.add_argument("--comfyui", help="ComfyUI folder to start when --server is not given (default: as the tests find it)")
    r.add_argument("--comfy-arg", action="append", default=[], help="extra argument for the ComfyUI it starts (repeatable)")
    r.add_argument("--output", default="lcm-output", help="folder for the images (default: lcm-output)")
    r.add_argument("--prompts", help="file of prompts (one per line, or JSON lines of override fields) to run as a queue")
    for flag, typ in (("prompt", str), ("negative", str), ("seed", int), ("steps", int), ("guidance", float), ("strength", float),
                      ("width", int), ("height", int), ("batch", int), ("unet", str), ("ckpt", str), ("lora", str), ("image", str)):
        r.add_argument(f"--{flag}", type=typ)
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    c = sub.add_parser("convert", help="convert a pickled .ckpt/.pt/.bin file to .safetensors (tensors only, no code is run)")
    c.add_argument("file")
    c.add_argument("--output", help="output file (default: beside the input, with .safetensors)")
    return p


def _convert(args) -> int:
    from .errors import LCMModelError
    from .safe_convert import convert_to_safetensors

    try:
        dst, n, dropped = convert_to_safetensors(args.file, args.output)
    except LCMModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {dst} ({n} tensors" + (f"; {dropped} non-tensor entries left out" if dropped else "") + ")")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "convert":
        return _convert(args)
    overrides = Overrides(**{k: getattr(args, k) for k in ("prompt", "negative", "seed", "steps", "guidance", "strength",
                                                            "width", "height", "batch", "unet", "ckpt", "lora", "image")})
    try:
        base = load_workflow(args.workflow)
        output = Path(args.output)
        if args.server:
            return _run(ComfyClient(args.server), base, overrides, args, output)
        from .locate import find_comfyui

        comfy = Path(args.comfyui) if args.comfyui else find_comfyui()[0]
        if comfy is None or not (comfy / "main.py").is_file():
            raise RunnerError(f"no ComfyUI found to start ({find_comfyui()[1]}); give --server URL or --comfyui PATH")
        output.mkdir(parents=True, exist_ok=True)
        with LocalComfy(comfy, args.comfy_arg, output / "comfyui.log") as url:
            return _run(ComfyClient(url), base, overrides, args, output)
    except RunnerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _run(client: ComfyClient, base: dict, overrides: Overrides, args, output: Path) -> int:
    if args.prompts:
        summary = run_queue(client, base, overrides, read_prompts(args.prompts), output, args.quiet)
        print(f"{summary['done']} done, {summary['skipped']} already done, {len(summary['failed'])} failed, of {summary['total']}")
        return 1 if summary["failed"] else 0
    api = apply_overrides(base, overrides)
    files = run_one(client, api, output, Path(args.workflow).name.split(".")[0], args.quiet)
    for f in files:
        print(f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
