"""Starting and stopping a ComfyUI of our own on 127.0.0.1, with this checkout's LCM Nodes loaded.

``LocalComfy`` runs ComfyUI's ``main.py`` as a subprocess. The pack it loads is always the checkout these tools
run from: when that checkout is not already among the ComfyUI's custom nodes, a link to it is made in a
temporary custom-nodes folder handed to ComfyUI through ``--extra-model-paths-config`` and removed on stop,
so nothing outside the temporary folder is written and two checkouts never share (or break) a link.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from .client import ComfyClient, RunnerError
from .locate import PACK_DIR

log = logging.getLogger("lcm_nodes.tools")

#: The name the pack's folder gets when we link it in: ComfyUI's module name, its template and docs URLs.
PACK_LINK_NAME = "lcm-nodes"
#: A node of the pack, asked for after start to prove the pack loaded.
PROBE_NODE = "LCMSampler"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def has_cuda(env: Mapping[str, str] | None = None) -> bool:
    """Whether ComfyUI would see a CUDA GPU (honours CUDA_VISIBLE_DEVICES in ``env``)."""
    visible = (env or {}).get("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES"))
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    try:
        import torch  # only here: starting ComfyUI costs far more than this import
    except ImportError:
        return False
    return torch.cuda.is_available()


def _is_this_pack(path: Path) -> bool:
    try:
        return path.resolve() == PACK_DIR
    except OSError:
        return False


def _looks_like_lcm_nodes(path: Path) -> bool:
    return (path / "lcm_core").is_dir() and (path / "nodes").is_dir() and (path / "__init__.py").is_file()


def _tail(path: Path | None, lines: int = 25) -> str:
    if path is None or not path.is_file():
        return ""
    text = path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
    return "\n".join("    " + line for line in text)


class LocalComfy:
    """A ComfyUI subprocess on 127.0.0.1 with this checkout's LCM Nodes: ``with LocalComfy(path) as url: ...``.

    comfy_path: the ComfyUI folder (holding ``main.py``).
    port: the port to listen on; None picks a free one.
    base_directory: ComfyUI's ``--base-directory`` (models/, input/, output/, user/, custom_nodes/); None keeps
        ComfyUI's own folders.
    output_directory: ComfyUI's ``--output-directory`` (overrides the base directory's output/).
    extra_args: more ComfyUI arguments, e.g. ``["--highvram"]``.
    env: variables merged into this process's environment for ComfyUI, e.g. ``{"CUDA_VISIBLE_DEVICES": "1"}``.
    log_path: where ComfyUI's output goes (appended); None: a file in a temporary folder, shown on failure.
    cpu: add ``--cpu``; None: when ComfyUI would see no CUDA GPU.
    start_timeout: seconds to wait for the server to answer.

    One object, one server; ``start()`` and ``stop()`` are not thread-safe (call them from one thread).
    """

    def __init__(self, comfy_path: Path | str, *, port: int | None = None, base_directory: Path | str | None = None,
                 output_directory: Path | str | None = None, extra_args: Sequence[str] = (), env: Mapping[str, str] | None = None,
                 log_path: Path | str | None = None, cpu: bool | None = None, start_timeout: float = 180.0):
        self.comfy_path = Path(comfy_path).expanduser().resolve()
        if not (self.comfy_path / "main.py").is_file():
            raise RunnerError(f"{self.comfy_path} is not a ComfyUI folder (no main.py); give the folder that holds ComfyUI's main.py")
        if isinstance(extra_args, str):
            raise RunnerError(f"extra_args must be a list of arguments, not the string {extra_args!r}")
        self.port = port
        self.base_directory = Path(base_directory).expanduser().resolve() if base_directory else None
        self.output_directory = Path(output_directory).expanduser().resolve() if output_directory else None
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.log_path = Path(log_path) if log_path else None
        self.cpu = cpu
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self._tmp: Path | None = None

    # ------------------------------------------------------------------ the pack

    def custom_nodes_dirs(self) -> list[Path]:
        """The custom-nodes folder ComfyUI scans before any extra paths."""
        return [(self.base_directory or self.comfy_path) / "custom_nodes"]

    def _pack_args(self, tmp: Path) -> list[str]:
        """Arguments that make ComfyUI load this checkout, or [] when it already would."""
        others = []
        for folder in self.custom_nodes_dirs():
            if not folder.is_dir():
                continue
            for entry in folder.iterdir():
                if entry.name.endswith(".disabled"):
                    continue
                if _is_this_pack(entry):
                    return []
                if entry.is_dir() and _looks_like_lcm_nodes(entry):
                    others.append(entry)
        for other in others:
            log.warning("%s holds another copy of LCM Nodes; this run also loads %s, which ComfyUI loads later, so its nodes win",
                        other, PACK_DIR)
        nodes_dir = tmp / "custom_nodes"
        nodes_dir.mkdir()
        (nodes_dir / PACK_LINK_NAME).symlink_to(PACK_DIR, target_is_directory=True)
        config = tmp / "lcm_pack_paths.yaml"
        config.write_text(f"lcm_nodes_checkout:\n  custom_nodes: {nodes_dir}\n", encoding="utf-8")
        return ["--extra-model-paths-config", str(config)]

    # ------------------------------------------------------------------ lifecycle

    def command(self, tmp: Path) -> list[str]:
        args = [sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(self.port), "--disable-auto-launch"]
        if self.base_directory:
            args += ["--base-directory", str(self.base_directory)]
        if self.output_directory:
            args += ["--output-directory", str(self.output_directory)]
        args += self._pack_args(tmp)
        cpu = self.cpu if self.cpu is not None else not has_cuda(self.env)
        if cpu and "--cpu" not in self.extra_args:
            args.append("--cpu")
        return args + self.extra_args

    def start(self) -> str:
        """Start ComfyUI and wait until it answers with the pack loaded; returns its URL."""
        if self.proc is not None:
            raise RunnerError("this LocalComfy is already started; make a new one for another server")
        self._tmp = Path(tempfile.mkdtemp(prefix="lcm-comfy-"))
        if self.port is None:
            self.port = free_port()
        if self.log_path is None:
            self.log_path = self._tmp / "comfyui.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.url = f"http://127.0.0.1:{self.port}"
        args = self.command(self._tmp)
        log.info("starting ComfyUI %s on %s (log: %s)", self.comfy_path, self.url, self.log_path)
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(args, cwd=self.comfy_path, stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, **self.env})
        try:
            self._wait_ready()
        except BaseException:
            self.stop(keep_log=True)
            raise
        return self.url

    def _wait_ready(self) -> None:
        client = ComfyClient(self.url)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RunnerError(f"ComfyUI exited with code {self.proc.returncode} while starting; the end of {self.log_path}:\n"
                                  + _tail(self.log_path))
            if client.alive():
                if not client.has_node(PROBE_NODE):
                    raise RunnerError(f"ComfyUI started but LCM Nodes ({PACK_DIR}) did not load; the end of {self.log_path}:\n"
                                      + _tail(self.log_path, 40))
                return
            time.sleep(0.3)
        raise RunnerError(f"ComfyUI did not answer within {self.start_timeout:.0f} s; see {self.log_path}")

    def stop(self, keep_log: bool = False) -> None:
        """Stop ComfyUI (terminate, then kill after 20 s) and remove the temporary folder. Safe to call twice.

        keep_log: leave a log that lives in the temporary folder in place (a failed start names it).
        """
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)
        if self._tmp is None:
            return
        keep_log = keep_log and self.log_path is not None and self.log_path.parent == self._tmp
        for entry in list(self._tmp.iterdir()) if self._tmp.is_dir() else []:
            if keep_log and entry == self.log_path:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)  # never follows the link to the pack
            else:
                entry.unlink(missing_ok=True)
        if not keep_log:
            shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
