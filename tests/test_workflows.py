"""The bundled workflows: UI and API formats in step, every node known, every input valid in ComfyUI v0.8.0.

Layout (issue #11 item 8): ``workflows/<name>.json`` (UI format) and ``workflows/<name>.jpg`` are what ComfyUI's
Templates browser lists and shows; ``workflows/api/<name>.api.json`` is the API twin, where the browser does not look.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from workflow_formats import ui_to_api

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
API = WORKFLOWS / "api"
NAMES = sorted(p.name[: -len(".api.json")] for p in API.glob("*.api.json"))
SEED_GUIDE_CASES = {"lcm-sdxl-unet-txt2img", "lcm-sdxl-unet-img2img", "sdxl-lcm-lora-txt2img", "sdxl-lcm-lora-img2img",
                    "sd15-lcm-lora-txt2img"}


def test_every_seed_guide_case_has_both_formats():
    assert SEED_GUIDE_CASES <= set(NAMES)  # later issues add workflows in the same layout
    for name in NAMES:
        assert (WORKFLOWS / f"{name}.json").is_file(), f"{name} has no UI-format file"


def test_the_templates_folder_holds_only_ui_workflows_each_with_a_thumbnail():
    """ComfyUI lists workflows/*.json as templates: only UI workflows may be there, each with <name>.jpg."""
    from PIL import Image

    top = sorted(p.name for p in WORKFLOWS.glob("*.json"))
    assert top == sorted(f"{n}.json" for n in NAMES), "every UI workflow needs an API twin in workflows/api/ and vice versa"
    for path in WORKFLOWS.glob("*.json"):
        ui = json.loads(path.read_text())
        assert "nodes" in ui and "links" in ui and "version" in ui, f"{path.name} is not a UI-format workflow"
    for name in NAMES:
        thumb = WORKFLOWS / f"{name}.jpg"
        assert thumb.is_file(), f"{name} has no thumbnail: run python -m lcm_tools.thumbnails {name}"
        with Image.open(thumb) as img:
            assert img.format == "JPEG" and img.size[0] >= 256 and img.size[0] == img.size[1]
    assert not list(WORKFLOWS.glob("*.api.json")), "API-format files belong in workflows/api/"


@pytest.fixture(scope="module")
def placeholder_models(comfy, comfy_base):
    """Files named as the public releases, so validation sees them in ComfyUI's model lists."""
    from PIL import Image

    names = set()
    for name in NAMES:
        for node in json.loads((API / f"{name}.api.json").read_text()).values():
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
    api = json.loads((API / f"{name}.api.json").read_text())
    ui = json.loads((WORKFLOWS / f"{name}.json").read_text())
    assert ui_to_api(ui, comfy.NODE_CLASS_MAPPINGS) == api
    assert {n["type"] for n in ui["nodes"]} <= set(comfy.NODE_CLASS_MAPPINGS)
    link_ids = {link[0] for link in ui["links"]}
    for node in ui["nodes"]:
        for inp in node.get("inputs", []):
            assert inp["link"] in link_ids


@pytest.mark.parametrize("name", NAMES)
def test_api_workflow_validates_in_comfyui(runner, placeholder_models, name):
    api = json.loads((API / f"{name}.api.json").read_text())
    valid, error, outputs, node_errors = runner.validate(api)
    assert valid, (error, node_errors)
    assert outputs == ["9"]


@pytest.mark.parametrize("name", sorted(SEED_GUIDE_CASES))
def test_workflow_settings_follow_the_seed_guide(name):
    api = json.loads((API / f"{name}.api.json").read_text())
    sampler = next(n for n in api.values() if n["class_type"] in ("LCMSampler", "LCMImg2Img"))["inputs"]
    assert sampler["steps"] == 4
    if "unet" in name:
        assert sampler["guidance_scale"] == 8.0
    else:
        assert sampler["guidance_scale"] <= 2.0
    size = next((n["inputs"]["width"] for n in api.values() if n["class_type"] == "EmptyLatentImage"), None)
    if size is not None:
        assert size == (512 if name.startswith("sd15") else 1024)


@pytest.mark.parametrize("name", NAMES)
def test_workflows_saved_before_keep_graphs_still_load(comfy, name):
    """A UI workflow saved before keep_graphs (and the inputs added after it) existed maps every old value to the same input."""
    from workflow_formats import widget_layout

    api = json.loads((API / f"{name}.api.json").read_text())
    ui = json.loads((WORKFLOWS / f"{name}.json").read_text())
    for node in ui["nodes"]:
        if node["type"] in ("LCMSampler", "LCMImg2Img", "TCDSampler"):
            widgets = [n for n, control in widget_layout(comfy.NODE_CLASS_MAPPINGS[node["type"]])[0] for n in [n] * (1 + control)]
            cut = widgets.index("compile" if node["type"] == "TCDSampler" else "keep_graphs")  # TCD: saved before compile
            assert node["widgets_values"][cut] == (False if node["type"] == "TCDSampler" else "while queued")
            node["widgets_values"] = node["widgets_values"][:cut]
    assert ui_to_api(ui, comfy.NODE_CLASS_MAPPINGS) == api  # the dropped inputs fall back to their defaults


def test_new_sampler_inputs_come_after_every_existing_widget(comfy):
    """Saved UI workflows list widget values by position: inputs added later must stay at the end."""
    from workflow_formats import widget_layout

    first_release = {
        "LCMSampler": ["seed", "steps", "guidance_scale", "original_inference_steps", "timesteps", "timestep_scaling", "fast"],
        "LCMImg2Img": ["seed", "steps", "guidance_scale", "strength", "original_inference_steps", "timesteps", "timestep_scaling",
                       "fast", "strength_mode"],
    }
    for node_id, names in first_release.items():
        widgets = [n for n, _ in widget_layout(comfy.NODE_CLASS_MAPPINGS[node_id])[0]]
        assert widgets[: len(names)] == names, (node_id, widgets)
