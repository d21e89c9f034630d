"""Load LCM UNet's files: which diffusers folders it offers, which file of one it loads, and the file names and
weight precisions spelled in exactly one place of the pack's code."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest
import torch
from models import save_unet, tiny_sd15_unet
from safetensors.torch import save_file

from lcm_core.errors import LCMModelError
from lcm_core.weights import (
    DIFFUSERS_CONFIG_NAME,
    DIFFUSERS_WEIGHTS_NAME,
    DIFFUSERS_WEIGHTS_NAME_FP16,
    diffusers_unet_files,
    resolve_unet_files,
)

REPO = Path(__file__).resolve().parents[1]


def touch(path: Path, text: str = "x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_a_diffusers_folder_s_unet_is_found_where_diffusers_puts_it(tmp_path):
    pipeline = tmp_path / "pipeline"  # a whole pipeline: the UNet in unet/, fp16 variant only, with its config
    fp16 = touch(pipeline / "unet" / DIFFUSERS_WEIGHTS_NAME_FP16)
    cfg = touch(pipeline / "unet" / DIFFUSERS_CONFIG_NAME)
    touch(pipeline / "vae" / DIFFUSERS_WEIGHTS_NAME)  # another component's weights are never taken for the UNet
    assert diffusers_unet_files(pipeline) == (str(fp16), str(cfg)) == resolve_unet_files(str(pipeline))

    unet_only = tmp_path / "unet-only"  # a UNet's own folder: both precisions, no config
    full = touch(unet_only / DIFFUSERS_WEIGHTS_NAME)
    touch(unet_only / DIFFUSERS_WEIGHTS_NAME_FP16)
    assert diffusers_unet_files(unet_only) == (str(full), None) == resolve_unet_files(str(unet_only))

    pickled = tmp_path / "pickled"  # .bin weights only: nothing the pack reads
    touch(pickled / "unet" / "diffusion_pytorch_model.bin")
    assert diffusers_unet_files(pickled) is None
    with pytest.raises(LCMModelError) as e:
        resolve_unet_files(str(pickled))
    assert f"'pickled' has no {DIFFUSERS_WEIGHTS_NAME} or {DIFFUSERS_WEIGHTS_NAME_FP16}" in str(e.value)


@pytest.fixture(scope="module")
def diffusers_models(comfy, comfy_base):
    root = comfy_base / "models" / "diffusers"
    unet = tiny_sd15_unet(time_cond_proj_dim=256, seed=11)
    save_unet(unet, root / "files-pipeline" / "unet" / DIFFUSERS_WEIGHTS_NAME_FP16, with_config=True, dtype=torch.float16)
    save_unet(unet, root / "files-unet" / DIFFUSERS_WEIGHTS_NAME)
    (root / "files-no-unet" / "vae").mkdir(parents=True, exist_ok=True)  # a folder, but no UNet in it
    save_file({"x": torch.zeros(1)}, str(root / "files-no-unet" / "vae" / DIFFUSERS_WEIGHTS_NAME))
    yield root
    for name in ("files-pipeline", "files-unet", "files-no-unet"):
        shutil.rmtree(root / name, ignore_errors=True)


def test_the_loader_offers_exactly_the_folders_it_can_load(pack, runner, diffusers_models):
    loading = pack.comfy.loading
    offered = [n for n in loading.unet_choices() if n.startswith(loading.DIFFUSERS_PREFIX + "files-")]
    assert offered == ["diffusers/files-pipeline", "diffusers/files-unet"]
    for name in offered:
        load = {"class_type": "LCMLoadUNet", "inputs": {"unet_name": name, "weight_dtype": "fp32"}}
        model = runner.run({"1": load}, ["1"])["1"][0][0]
        assert model.model.diffusion_model.time_embed.cond_proj.weight.shape == (320, 256)  # the guidance embedding kept
    err = runner.error_of({"1": {"class_type": "LCMLoadUNet", "inputs": {"unet_name": "diffusers/files-no-unet"}}}, ["1"])
    assert f"has no {DIFFUSERS_WEIGHTS_NAME}" in err["exception_message"]


def string_constants(path: Path) -> list[str]:
    """The string literals of a module, docstrings left out."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body
                  and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


@pytest.mark.parametrize("spelling,home", [
    ("diffusion_pytorch_model", "lcm_core/weights.py"),
    (DIFFUSERS_CONFIG_NAME, "lcm_core/weights.py"),
    ("bf16", "lcm_comfy/loading.py"),
    ("sampling/lcm", "nodes/common.py"),  # the nodes' category
])
def test_file_names_and_weight_dtypes_are_spelled_in_one_place(spelling, home):
    """The pack's code (nodes, lcm_comfy, lcm_core) names diffusers' files, the weight_dtype choices and the nodes'
    category once."""
    found = sorted(str(p.relative_to(REPO)) for pkg in ("nodes", "lcm_comfy", "lcm_core") for p in (REPO / pkg).glob("*.py")
                   if any(spelling in s for s in string_constants(p)))
    assert found == [home]
