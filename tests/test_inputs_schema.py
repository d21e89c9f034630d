"""The nodes' inputs are a public contract: saved workflows name the node ids and inputs, and UI workflows store
widget values by position. This pins them (names, order, types, defaults, ranges) and the seams the nodes share:
one category, one definition of each input the samplers have in common, each with the sampler's own tooltip."""

from __future__ import annotations

import sys

import pytest

KEEP_GRAPHS = {"default": "while queued", "options": ["while queued", "always", "never"]}
U64 = 0xFFFFFFFFFFFFFFFF

# (input id, io type, optional, widget settings) in schema order, as released. An input may be added after these,
# optional; none may be renamed, removed, moved or changed in type, default or range.
CONTRACT = {
    "LCMLoadUNet": [
        ("unet_name", "COMBO", False, {}),  # the options are the files present
        ("weight_dtype", "COMBO", False, {"default": "default", "options": ["default", "fp16", "bf16", "fp32"]}),
        ("default_guidance", "FLOAT", True, {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1}),
    ],
    "LCMApplyLoRA": [
        ("model", "MODEL", False, {}),
        ("lora_name", "COMBO", False, {}),
        ("strength", "FLOAT", False, {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01}),
        ("allow_partial", "BOOLEAN", True, {"default": False}),
    ],
    "LCMSampler": [
        ("model", "MODEL", False, {}),
        ("positive", "CONDITIONING", False, {}),
        ("negative", "CONDITIONING", True, {}),
        ("latent_image", "LATENT", False, {}),
        ("seed", "INT", False, {"default": 0, "min": 0, "max": U64}),
        ("steps", "INT", False, {"default": 4, "min": 1, "max": 50}),
        ("guidance_scale", "FLOAT", False, {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
        ("original_inference_steps", "INT", True, {"default": 50, "min": 1, "max": 1000}),
        ("timesteps", "STRING", True, {"default": ""}),
        ("timestep_scaling", "FLOAT", True, {"default": 10.0, "min": 0.001, "max": 1000.0, "step": 0.1}),
        ("fast", "BOOLEAN", True, {"default": True}),
        ("keep_graphs", "COMBO", True, KEEP_GRAPHS),
        ("compile", "BOOLEAN", True, {"default": False}),
    ],
    "LCMImg2Img": [
        ("model", "MODEL", False, {}),
        ("positive", "CONDITIONING", False, {}),
        ("negative", "CONDITIONING", True, {}),
        ("latent_image", "LATENT", False, {}),
        ("seed", "INT", False, {"default": 0, "min": 0, "max": U64}),
        ("steps", "INT", False, {"default": 4, "min": 1, "max": 50}),
        ("guidance_scale", "FLOAT", False, {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
        ("original_inference_steps", "INT", True, {"default": 50, "min": 1, "max": 1000}),
        ("timesteps", "STRING", True, {"default": ""}),
        ("timestep_scaling", "FLOAT", True, {"default": 10.0, "min": 0.001, "max": 1000.0, "step": 0.1}),
        ("fast", "BOOLEAN", True, {"default": True}),
        ("strength", "FLOAT", False, {"default": 0.5, "min": 0.01, "max": 1.0, "step": 0.01}),
        ("strength_mode", "COMBO", True, {"default": "lcm", "options": ["lcm", "truncate"]}),
        ("keep_graphs", "COMBO", True, KEEP_GRAPHS),
        ("compile", "BOOLEAN", True, {"default": False}),
    ],
    "TCDSampler": [
        ("model", "MODEL", False, {}),
        ("positive", "CONDITIONING", False, {}),
        ("negative", "CONDITIONING", True, {}),
        ("latent_image", "LATENT", False, {}),
        ("seed", "INT", False, {"default": 0, "min": 0, "max": U64}),
        ("steps", "INT", False, {"default": 4, "min": 1, "max": 1000}),
        ("guidance_scale", "FLOAT", False, {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
        ("gamma", "FLOAT", False, {"default": 0.3, "min": 0.0, "max": 1.0, "step": 0.01, "round": 0.01}),
        ("original_inference_steps", "INT", True, {"default": 50, "min": 1, "max": 1000}),
        ("timesteps", "STRING", True, {"default": ""}),
        ("strength", "FLOAT", True, {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01}),
        ("fast", "BOOLEAN", True, {"default": True}),
        ("keep_graphs", "COMBO", True, KEEP_GRAPHS),
        ("compile", "BOOLEAN", True, {"default": False}),
    ],
    "LCMVAEDecode": [
        ("samples", "LATENT", False, {}),
        ("vae", "VAE", False, {}),
        ("compile", "BOOLEAN", True, {"default": True}),
    ],
    "LCMSaveImage": [
        ("images", "IMAGE", False, {}),
        ("filename_prefix", "STRING", False, {"default": "ComfyUI"}),
        ("compress_level", "INT", True, {"default": 4, "min": 0, "max": 9}),
    ],
}
WIDGET_KEYS = ("default", "min", "max", "step", "round", "options")
SHARED = ("seed", "steps", "guidance_scale", "original_inference_steps", "timesteps", "fast", "keep_graphs", "compile")
SAMPLERS = ("LCMSampler", "LCMImg2Img", "TCDSampler")


def pack_module(pack, name: str):
    return sys.modules[f"{pack.root}.{name}"]


@pytest.fixture(scope="module")
def schemas(pack):
    return {cls.define_schema().node_id: cls.define_schema() for cls in pack_module(pack, "nodes").NODE_CLASSES}


def described(inp) -> tuple:
    d = inp.as_dict()
    widget = {k: d[k] for k in WIDGET_KEYS if k in d and not (k == "options" and inp.id in ("unet_name", "lora_name"))}
    return (inp.id, inp.get_io_type(), bool(inp.optional), widget)


@pytest.mark.parametrize("node_id", list(CONTRACT))
def test_released_inputs_never_change_and_new_ones_go_last(schemas, node_id):
    inputs = schemas[node_id].inputs
    assert [described(i) for i in inputs[: len(CONTRACT[node_id])]] == CONTRACT[node_id]
    added = inputs[len(CONTRACT[node_id]):]
    assert all(i.optional for i in added), f"{node_id}: inputs added after release must be optional: {[i.id for i in added]}"
    assert all(i.tooltip for i in inputs), f"{node_id}: every input has a tooltip"


def test_node_ids_and_one_category(pack, schemas):
    common = pack_module(pack, "nodes.common")
    assert set(schemas) == set(CONTRACT)
    assert {s.category for s in schemas.values()} == {common.CATEGORY} == {"sampling/lcm"}
    # and no node module spells it itself: test_inputs_files.py::test_file_names_and_weight_dtypes_are_spelled_in_one_place


def test_samplers_share_one_definition_per_input_with_their_own_tooltips(schemas):
    by_node = {n: {i.id: i for i in schemas[n].inputs} for n in SAMPLERS}
    for name in SHARED:
        defs = {n: by_node[n][name] for n in SAMPLERS}
        kinds = {type(d) for d in defs.values()}
        assert len(kinds) == 1, f"{name}: one input type on every sampler"
        shapes = {n: {k: v for k, v in d.as_dict().items() if k not in ("tooltip", "max")} for n, d in defs.items()}
        assert shapes["LCMSampler"] == shapes["LCMImg2Img"] == shapes["TCDSampler"], name
        # LCM's two nodes are one method: the same text; TCD says what the input means for TCD
        assert defs["LCMSampler"].tooltip == defs["LCMImg2Img"].tooltip, name
    for name in ("seed", "steps", "guidance_scale", "original_inference_steps"):
        assert by_node["TCDSampler"][name].tooltip != by_node["LCMSampler"][name].tooltip, name
    assert by_node["TCDSampler"]["steps"].max == 1000 and by_node["LCMSampler"]["steps"].max == 50


def test_weight_dtype_choices_are_the_loaders_own(pack, schemas):
    options = next(i for i in schemas["LCMLoadUNet"].inputs if i.id == "weight_dtype").options
    assert options == list(pack.comfy.loading.WEIGHT_DTYPES)
    for choice in options:
        pack.comfy.loading.check_weight_dtype(choice)
    with pytest.raises(pack.core.LCMInputError, match=r"weight_dtype='fp8' is not one of \['default', 'fp16', 'bf16', 'fp32'\]"):
        pack.comfy.loading.check_weight_dtype("fp8")
