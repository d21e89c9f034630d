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
# The README's recommended settings for each bundled workflow ("The nodes": recommended settings, DMD2 recipe), written
# out here: the sampler node, its steps, the guidance range, the image size (None for img2img: the input's), and the
# method's own settings. Every bundled workflow must have an entry.
LORA_GUIDANCE = (0.0, 2.0)  # LCM-LoRA: off (1.0 or below) or 1.0-2.0
SEED_GUIDE = {
    "lcm-sdxl-unet-txt2img": {"sampler": "LCMSampler", "guidance": (8.0, 8.0), "size": 1024},
    "lcm-sdxl-unet-img2img": {"sampler": "LCMImg2Img", "guidance": (8.0, 8.0), "size": None},
    "sdxl-lcm-lora-txt2img": {"sampler": "LCMSampler", "guidance": LORA_GUIDANCE, "size": 1024},
    "sdxl-lcm-lora-img2img": {"sampler": "LCMImg2Img", "guidance": LORA_GUIDANCE, "size": None},
    "sd15-lcm-lora-txt2img": {"sampler": "LCMSampler", "guidance": LORA_GUIDANCE, "size": 512},
    "sdxl-tcd-lora-txt2img": {"sampler": "TCDSampler", "guidance": (0.0, 1.0), "size": 1024, "inputs": {"gamma": 0.3, "timesteps": ""}},
    "dmd2-sdxl-txt2img": {"sampler": "LCMSampler", "guidance": (0.0, 1.0), "size": 1024,
                          "inputs": {"timesteps": "999, 749, 499, 249"}, "unet": "dmd2_sdxl_4step_unet_fp16.safetensors"},
}
SEED_GUIDE_CASES = set(SEED_GUIDE)


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


def test_every_bundled_workflow_has_a_seed_guide_entry():
    assert sorted(SEED_GUIDE) == NAMES


@pytest.mark.parametrize("name", sorted(SEED_GUIDE))
def test_workflow_settings_follow_the_seed_guide(name):
    guide = SEED_GUIDE[name]
    api = json.loads((API / f"{name}.api.json").read_text())
    samplers = [n for n in api.values() if n["class_type"] in ("LCMSampler", "LCMImg2Img", "TCDSampler")]
    assert [n["class_type"] for n in samplers] == [guide["sampler"]]
    sampler = samplers[0]["inputs"]
    assert sampler["steps"] == 4
    low, high = guide["guidance"]
    assert low <= sampler["guidance_scale"] <= high, sampler["guidance_scale"]
    for key, value in guide.get("inputs", {}).items():
        assert sampler[key] == value, (key, sampler[key])
    if "unet" in guide:
        assert [n["inputs"]["unet_name"] for n in api.values() if n["class_type"] == "LCMLoadUNet"] == [guide["unet"]]
    latent = [n["inputs"] for n in api.values() if n["class_type"] == "EmptyLatentImage"]
    if guide["size"] is None:
        assert latent == []
    else:
        assert [(i["width"], i["height"]) for i in latent] == [(guide["size"], guide["size"])]


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
