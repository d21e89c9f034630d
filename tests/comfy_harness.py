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
#: Whether this is a CI run (``CI`` set to 1, true or yes, any case; .ci/run sets ``CI=true``): the one definition the
#: tests use. Under CI, what a developer's machine may lack (ComfyUI, Debian chromium) fails the run instead of skipping.
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
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


GPU_RUN = os.environ.get("LCM_TEST_GPU") == "1"  # ComfyUI (in-process and the shared server) on the GPU


def boot_in_process(comfy_path: Path, base: Path):
    """Import ComfyUI in this process (CPU mode) and load built-in and custom nodes. Returns the nodes module."""
    if str(comfy_path) not in sys.path:
        sys.path.insert(0, str(comfy_path))
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    # CPU mode unless a GPU run is asked for (LCM_TEST_GPU=1 on the device machine)
    comfy.cli_args.args.cpu = not GPU_RUN
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


# ------------------------------------------------------------------------------------------ the same prompt in-process

SAVE_NODES = ("SaveImage", "LCMSaveImage")


def decoded_by(api: dict) -> str:
    """The id of the node whose IMAGE the workflow's one save node writes (what to run in-process instead)."""
    saves = [n for n in api.values() if n["class_type"] in SAVE_NODES]
    assert len(saves) == 1, f"expected one save node, found {len(saves)}"
    return saves[0]["inputs"]["images"][0]


def in_process_pixels(runner, api: dict):
    """The images ``api`` saves, computed by the in-process ComfyUI (``runner``) and converted to bytes as Save Image
    converts them (``np.clip(255 * x, 0, 255).astype(uint8)``): a uint8 array [batch, height, width, channels]."""
    import numpy as np

    node = decoded_by(api)
    image = runner.run(api, [node])[node][0][0]
    return np.clip(255.0 * image.cpu().numpy(), 0, 255).astype(np.uint8)


def assert_same_picture(png, expected, what: str = "") -> None:
    """A PNG (path or bytes) made by a ComfyUI server is the in-process picture of the same prompt.

    Tolerance: no value more than 1 of 255 off, and at most 1% of values off at all. Both sides run the same graph,
    seed and weights in float32 on the CPU, but in different processes with different thread counts (the server's
    OpenMP pool, Dask's per-worker share of the cores), which may sum a reduction's terms in another order: a
    last-bit difference in a float can move a value across a rounding boundary of the byte conversion, never further,
    and only for the rare value that lies within that tiny distance of a boundary. (On this project's 2-core machine
    every comparison is exact.) A different seed, prompt, size, step count or model moves most values by tens of
    levels; weights rounded to bfloat16 instead of float16 move about 10% of them by one level.
    """
    import io

    import numpy as np
    from PIL import Image

    data = png if isinstance(png, bytes) else Path(png).read_bytes()
    with Image.open(io.BytesIO(data)) as img:
        got = np.asarray(img.convert("RGB"))
    assert got.shape == expected.shape, f"{what}: {got.shape} from the server, {expected.shape} in-process"
    diff = np.abs(got.astype(np.int16) - expected.astype(np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() <= 0.01, (
        f"{what}: the server's picture is not the in-process one: max |diff| {diff.max()} of 255, {(diff > 0).mean():.1%} of "
        f"values differ, {(diff > 1).mean():.1%} by more than 1")
