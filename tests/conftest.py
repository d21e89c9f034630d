"""Test configuration: a real ComfyUI (in-process) for the tests marked ``comfy``."""

from __future__ import annotations

import logging
import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfy_harness import GPU_RUN, IN_CI, PACK_MODULE, REPO, StubServer, boot_in_process, find_comfyui, make_base_dir  # noqa: E402

# lcm_core is importable on its own; the repo root goes last so ComfyUI's top-level `nodes` module wins.
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))

log = logging.getLogger("lcm_nodes.tests")
_COMFY = {"path": None, "why": None}


def pytest_configure(config):
    config.addinivalue_line("markers", "comfy: needs a real ComfyUI v0.8.0")
    config.addinivalue_line("markers", "slow: long-running (still run in CI)")


def _comfy_path():
    if _COMFY["path"] is None and _COMFY["why"] is None:
        path, why = find_comfyui(clone=True)
        _COMFY["path"], _COMFY["why"] = path, why
        if path is None:
            line = f"LCM Nodes: ComfyUI tests cannot run: {why}"
            print("\n" + "!" * 100 + "\n" + line + "\n" + "!" * 100, file=sys.stderr)
    return _COMFY["path"]


@pytest.fixture(scope="session")
def comfy_base(tmp_path_factory) -> Path:
    return make_base_dir(tmp_path_factory.mktemp("comfy_base"))


@pytest.fixture(scope="session")
def comfy(comfy_base):
    """The ComfyUI `nodes` module, booted in-process on the CPU with this pack loaded."""
    path = _comfy_path()
    if path is None:
        if IN_CI:
            pytest.fail(f"ComfyUI is required under CI: {_COMFY['why']}")
        pytest.skip(f"ComfyUI not found: {_COMFY['why']}")
    nodes = boot_in_process(path, comfy_base)
    import test_support_nodes

    test_support_nodes.register(nodes)
    return nodes


@pytest.fixture(scope="session")
def pack(comfy):
    """The pack as ComfyUI loaded it from custom_nodes/ (the very modules its nodes run), with ``pack.comfy``
    (lcm_comfy's modules) and ``pack.core`` (lcm_core's, whose error classes are the ones the nodes raise)."""
    return loaded_pack()


def loaded_pack():
    import importlib
    import types

    names = [n for n, m in sys.modules.items() if n.endswith("custom_nodes/" + PACK_MODULE) and hasattr(m, "__path__")]
    assert len(names) == 1, f"ComfyUI did not load the pack exactly once: {names}"
    root = names[0]
    comfy_mods = {name: importlib.import_module(f"{root}.lcm_comfy.{name}")
                  for name in ("model_sampling", "loading", "lora_patch", "checks", "sampler", "fastpath")}
    return types.SimpleNamespace(root=root, core=importlib.import_module(f"{root}.lcm_core"), comfy=types.SimpleNamespace(**comfy_mods))


class Runner:
    """Runs API-format prompts through ComfyUI's real PromptExecutor."""

    def __init__(self):
        import execution

        self.server = StubServer()
        self.executor = execution.PromptExecutor(self.server, cache_type=execution.CacheType.CLASSIC, cache_args={"lru": 0, "ram": 0})

    def validate(self, prompt: dict):
        import asyncio

        import execution

        return asyncio.run(execution.validate_prompt(str(uuid.uuid4()), prompt, None))

    def run(self, prompt: dict, outputs: list[str]):
        """Execute ``prompt`` up to ``outputs``; returns {node_id: output tuple}. Raises on failure with ComfyUI's error."""
        # Keep the output cache between prompts (as a running server does) so loaded models are reused.
        self.executor.status_messages = []
        self.executor.success = True
        self.server.messages.clear()
        prompt_id = str(uuid.uuid4())
        self.executor.execute(prompt, prompt_id, {}, outputs)
        if not self.executor.success:
            errors = [d for e, d in self.executor.status_messages if e == "execution_error"]
            err = errors[0] if errors else {}
            raise RuntimeError(f"{err.get('exception_type')}: {err.get('exception_message')}")
        result = {}
        for node_id in outputs:
            entry = self.executor.caches.outputs.get(node_id)
            result[node_id] = entry.outputs if entry is not None else None
        return result

    def error_of(self, prompt: dict, outputs: list[str]) -> dict:
        self.executor.status_messages = []
        self.executor.success = True
        self.executor.execute(prompt, str(uuid.uuid4()), {}, outputs)
        assert not self.executor.success, "the prompt was expected to fail"
        errors = [d for e, d in self.executor.status_messages if e == "execution_error"]
        return errors[0]


@pytest.fixture(scope="session")
def runner(comfy):
    return Runner()


def pytest_collection_modifyitems(config, items):
    for item in items:
        if {"comfy", "runner", "pack"} & set(item.fixturenames):
            item.add_marker(pytest.mark.comfy)


@pytest.fixture
def cpu_exactness(comfy):
    """Pins a test of exactness against diffusers' float32 CPU run (tolerances of about 1e-4) to the CPU it means:
    skipped when ComfyUI samples on a GPU, where other kernels and ComfyUI's fp16 choice move results by 1e-3 and
    more. On a GPU the fast-path and compile tests compare with diffusers at their own stated tolerances."""
    import comfy.model_management

    if comfy.model_management.get_torch_device().type != "cpu":
        pytest.skip("exactness against diffusers' float32 CPU run is checked with ComfyUI on the CPU")


TINY = {"ckpt": "tiny-sd15-ckpt.safetensors", "unet": "tiny-lcm-sd15-http.safetensors", "lora": "tiny-sd15-lcm-lora.safetensors"}


@pytest.fixture(scope="session")
def server(comfy, comfy_base, tmp_path_factory):
    """A ComfyUI v0.8.0 server (subprocess) with this pack and tiny models, one per test session: the HTTP,
    browser and reliability tests share it (defined here, not in a test module, so pytest makes only one). It runs
    on the device the in-process ComfyUI uses (--cpu unless LCM_TEST_GPU=1), so pixel comparisons between the two
    compare like with like."""
    from models import random_lora, save_unet, tiny_sd15_checkpoint, tiny_sd15_unet
    from PIL import Image
    from safetensors.torch import save_file

    from lcm_tools.server import LocalComfy

    models = comfy_base / "models"
    tiny_sd15_checkpoint(models / "checkpoints" / TINY["ckpt"])
    save_unet(tiny_sd15_unet(time_cond_proj_dim=256, seed=5), models / "diffusion_models" / TINY["unet"])
    save_file(random_lora(tiny_sd15_unet(time_cond_proj_dim=None, seed=21), "kohya"), str(models / "loras" / TINY["lora"]))
    Image.new("RGB", (64, 64), (120, 80, 40)).save(comfy_base / "input" / "lcm-input.png")
    path, _ = find_comfyui()
    log = tmp_path_factory.mktemp("server") / "comfyui.log"
    with LocalComfy(path, base_directory=comfy_base, cpu=not GPU_RUN, log_path=log) as url:
        yield url
