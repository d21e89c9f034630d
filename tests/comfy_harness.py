"""Finding, setting up and driving a real ComfyUI v0.8.0 for tests.

ComfyUI is looked for at ``$COMFYUI_PATH``, then above the pack when it sits in ``<ComfyUI>/custom_nodes/``,
then at ``${XDG_CACHE_HOME:-~/.cache}/lcm-nodes/ComfyUI-v0.8.0`` (cloned there when missing and a network
is available). Each test session gets its own base directory (models, custom_nodes, output), so nothing is
written into the ComfyUI tree itself; the pack is linked into that custom_nodes folder as ``lcm_nodes``.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACK_MODULE = "lcm_nodes"
sys.path.append(str(REPO))
from lcm_tools.locate import cache_dir, find_comfyui  # noqa: E402,F401


def make_base_dir(base: Path) -> Path:
    """A ComfyUI base directory with the pack linked into custom_nodes."""
    for sub in ("models/diffusion_models", "models/loras", "models/diffusers", "models/checkpoints", "models/vae",
                "custom_nodes", "input", "output", "temp", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_MODULE
    if not link.exists():
        link.symlink_to(REPO, target_is_directory=True)
    return base


def boot_in_process(comfy_path: Path, base: Path):
    """Import ComfyUI in this process (CPU mode) and load built-in and custom nodes. Returns the nodes module."""
    if str(comfy_path) not in sys.path:
        sys.path.insert(0, str(comfy_path))
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    # CPU mode unless a GPU run is asked for (LCM_TEST_GPU=1 on the device machine)
    comfy.cli_args.args.cpu = os.environ.get("LCM_TEST_GPU") != "1"
    comfy.cli_args.args.base_directory = str(base)
    comfy.cli_args.args.disable_all_custom_nodes = False
    import comfy.model_management  # noqa: F401
    import folder_paths  # noqa: F401  (reads base_directory)
    import utils.extra_config  # noqa: F401  (ComfyUI needs it before nodes)

    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    return nodes


class StubServer:
    """What PromptExecutor needs of ComfyUI's PromptServer, recording the messages it is sent."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.messages: list[tuple[str, dict]] = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass
