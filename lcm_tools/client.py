"""An HTTP client of a running ComfyUI: queue a prompt, follow its progress, read its history and images.

Only the standard library (plus ComfyUI's own ``aiohttp`` for the progress websocket, when it is installed);
no ComfyUI import. Failures raise :class:`RunnerError` with ComfyUI's own error text.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from typing import Any

ProgressCallback = Callable[[int, int], None]


class RunnerError(RuntimeError):
    """A prompt failed (validation or execution), or ComfyUI could not be reached or started; the text says which."""


class ComfyUnreachable(RunnerError):
    """A request to ComfyUI got no answer at all (refused, reset, timed out): the server's trouble, not the prompt's."""


class ComfyClient:
    """A minimal ComfyUI HTTP client: /prompt, /ws progress, /history, /view, /interrupt, /object_info.

    One client per thread: ``client_id`` ties the websocket's progress messages to the prompts it queued.
    """

    def __init__(self, server: str, timeout: float = 3600.0):
        if not server.startswith(("http://", "https://")):
            raise RunnerError(f"server {server!r} is not an http:// or https:// URL; give e.g. http://127.0.0.1:8188")
        self.server = server.rstrip("/")
        self.timeout = timeout
        self.client_id = uuid.uuid4().hex

    def request(self, path: str, data: dict | None = None, method: str | None = None, timeout: float = 60.0) -> Any:
        """GET (or POST ``data`` as JSON) ``path``; returns decoded JSON, or the raw bytes for anything else."""
        body = json.dumps(data).encode() if data is not None else None
        req = urllib.request.Request(self.server + path, data=body, method=method or ("POST" if body is not None else "GET"),
                                     headers={"Content-Type": "application/json"} if body is not None else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
                return json.loads(raw) if raw and r.headers.get_content_type() == "application/json" else raw
        except urllib.error.HTTPError as exc:
            text = exc.read().decode("utf-8", "replace")
            try:
                payload = json.loads(text)
            except json.JSONDecodeError:
                raise RunnerError(f"ComfyUI answered {exc.code} on {path}: {text[:2000]}") from None
            raise RunnerError(format_prompt_error(payload) if isinstance(payload, dict) else text[:2000]) from None
        except urllib.error.URLError as exc:
            raise ComfyUnreachable(f"cannot reach ComfyUI at {self.server}: {exc.reason}") from None
        except (ConnectionError, TimeoutError) as exc:
            raise ComfyUnreachable(f"cannot reach ComfyUI at {self.server}: {exc}") from None

    def alive(self) -> bool:
        try:
            self.request("/system_stats", timeout=5.0)
            return True
        except RunnerError:
            return False

    def has_node(self, class_type: str) -> bool:
        """Whether the server knows node ``class_type`` (its pack loaded)."""
        info = self.request(f"/object_info/{urllib.parse.quote(class_type)}")
        return isinstance(info, dict) and class_type in info

    def queue(self, api: dict) -> str:
        resp = self.request("/prompt", {"prompt": api, "client_id": self.client_id})
        return resp["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        return self.request(f"/history/{prompt_id}").get(prompt_id)

    def view(self, image: dict) -> bytes:
        q = urllib.parse.urlencode({"filename": image["filename"], "subfolder": image.get("subfolder", ""), "type": image.get("type", "output")})
        return self.request(f"/view?{q}")

    def interrupt(self) -> None:
        self.request("/interrupt", {})

    def wait(self, prompt_id: str, on_progress: ProgressCallback | None = None) -> dict:
        """Wait for a prompt and return its history entry; ``on_progress(value, max)`` per sampling step.

        Progress comes over the websocket when ``aiohttp`` (a ComfyUI dependency) is installed; without it the
        history is polled. Raises RunnerError with ComfyUI's text when the prompt failed or was interrupted.
        """
        try:
            self._listen(prompt_id, on_progress)
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
        if h.get("status", {}).get("status_str") != "success":
            raise RunnerError(format_history_error(h))
        return h

    def _listen(self, prompt_id: str, on_progress: ProgressCallback | None) -> None:
        """Follow the websocket until the prompt ends (or the socket closes); raises ImportError without aiohttp."""
        import asyncio

        import aiohttp

        async def listen():
            url = self.server.replace("http", "ws", 1) + f"/ws?clientId={self.client_id}"
            async with aiohttp.ClientSession() as session, session.ws_connect(url, heartbeat=30) as ws:
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


def format_prompt_error(payload: dict) -> str:
    """ComfyUI's validation error text, as the page would show it."""
    err = payload.get("error", {})
    if isinstance(err, str):
        return err
    lines = [f"{err.get('message', 'prompt rejected')}: {err.get('details', '')}".rstrip(": ")]
    for nid, ne in (payload.get("node_errors") or {}).items():
        for e in ne.get("errors", []):
            lines.append(f"  node {nid} ({ne.get('class_type')}): {e.get('message')}: {e.get('details', '')}")
    return "\n".join(lines)


def format_history_error(h: dict) -> str:
    """The error of a failed prompt's history entry: node, exception type and ComfyUI's message."""
    for event, data in h.get("status", {}).get("messages", []):
        if event == "execution_error":
            return f"node {data.get('node_id')} ({data.get('node_type')}): {data.get('exception_type')}: {data.get('exception_message')}"
        if event == "execution_interrupted":
            return "prompt was interrupted"
    return f"prompt failed: {h.get('status')}"
