"""The bundled workflows: UI and API formats in step, every node known, every input valid in ComfyUI v0.8.0."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from workflow_formats import ui_to_api

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
NAMES = sorted(p.name[: -len(".api.json")] for p in WORKFLOWS.glob("*.api.json"))
SEED_GUIDE_CASES = {"lcm-sdxl-unet-txt2img", "lcm-sdxl-unet-img2img", "sdxl-lcm-lora-txt2img", "sdxl-lcm-lora-img2img",
                    "sd15-lcm-lora-txt2img"}


def test_every_seed_guide_case_has_both_formats():
    assert set(NAMES) == SEED_GUIDE_CASES
    for name in NAMES:
        assert (WORKFLOWS / f"{name}.json").is_file(), f"{name} has no UI-format file"


@pytest.fixture(scope="module")
def placeholder_models(comfy, comfy_base):
    """Files named as the public releases, so validation sees them in ComfyUI's model lists."""
    from PIL import Image

    names = set()
    for name in NAMES:
        for node in json.loads((WORKFLOWS / f"{name}.api.json").read_text()).values():
            for key, folder in (("ckpt_name", "checkpoints"), ("unet_name", "diffusion_models"), ("lora_name", "loras")):
                if key in node["inputs"]:
                    names.add((folder, node["inputs"][key]))
    for folder, fname in names:
        (comfy_base / "models" / folder / fname).touch()
    Image.new("RGB", (64, 64), (120, 80, 40)).save(comfy_base / "input" / "lcm-input.png")
    import folder_paths

    folder_paths.filename_list_cache.clear()
    return names


@pytest.mark.parametrize("name", NAMES)
def test_ui_and_api_formats_are_in_step(comfy, name):
    api = json.loads((WORKFLOWS / f"{name}.api.json").read_text())
    ui = json.loads((WORKFLOWS / f"{name}.json").read_text())
    assert ui_to_api(ui, comfy.NODE_CLASS_MAPPINGS) == api
    assert {n["type"] for n in ui["nodes"]} <= set(comfy.NODE_CLASS_MAPPINGS)
    link_ids = {l[0] for l in ui["links"]}
    for node in ui["nodes"]:
        for inp in node.get("inputs", []):
            assert inp["link"] in link_ids


@pytest.mark.parametrize("name", NAMES)
def test_api_workflow_validates_in_comfyui(runner, placeholder_models, name):
    api = json.loads((WORKFLOWS / f"{name}.api.json").read_text())
    valid, error, outputs, node_errors = runner.validate(api)
    assert valid, (error, node_errors)
    assert outputs == ["9"]


@pytest.mark.parametrize("name", NAMES)
def test_workflow_settings_follow_the_seed_guide(name):
    api = json.loads((WORKFLOWS / f"{name}.api.json").read_text())
    sampler = next(n for n in api.values() if n["class_type"] in ("LCMSampler", "LCMImg2Img"))["inputs"]
    assert sampler["steps"] == 4
    if "unet" in name:
        assert sampler["guidance_scale"] == 8.0
    else:
        assert sampler["guidance_scale"] <= 2.0
    size = next((n["inputs"]["width"] for n in api.values() if n["class_type"] == "EmptyLatentImage"), None)
    if size is not None:
        assert size == (512 if name.startswith("sd15") else 1024)
