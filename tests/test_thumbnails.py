"""The Templates dialog's thumbnails (``workflows/<name>.jpg``): each one drawn by lcm_tools/thumbnails.py as it is
now, from its workflow as it is now, and showing what the workflow holds (no rendered result).

A thumbnail drawn by hand, left over from an older generator, or not redrawn after its workflow changed fails here:
the fix is ``python -m lcm_tools.thumbnails``.
"""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import pytest

from lcm_tools import thumbnails

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
UI_NAMES = sorted(p.stem for p in WORKFLOWS.glob("*.json"))  # what the Templates dialog lists
FIX = "run python -m lcm_tools.thumbnails"


@pytest.mark.parametrize("name", UI_NAMES)
def test_every_template_thumbnail_is_drawn_by_the_current_generator(name):
    from PIL import Image, ImageChops, ImageStat

    path = WORKFLOWS / f"{name}.jpg"
    assert path.is_file(), f"{name} has no thumbnail: {FIX} {name}"
    card = thumbnails.card_for(name)
    assert thumbnails.stamp_in(path) == thumbnails.stamp_of(card), (
        f"{path.name} was not drawn by lcm_tools/thumbnails.py as it is now from {name}.json as it is now: {FIX} {name}")
    # the stamp is a claim; the pixels must back it (tolerance: other FreeType and libjpeg builds differ a little)
    with Image.open(path) as img, Image.open(io.BytesIO(thumbnails.encode(card))) as fresh:
        diff = ImageStat.Stat(ImageChops.difference(img.convert("RGB"), fresh.convert("RGB"))).mean
    assert max(diff) < 2.0, f"{path.name} differs from a fresh drawing by {diff} on average per channel: {FIX} {name}"


def test_the_card_says_what_the_workflow_holds_and_invents_no_result():
    """Change the settings and a title in a copy of a template: the card follows (read, not kept in a table)."""
    name = "sdxl-lcm-lora-img2img"
    ui = json.loads((WORKFLOWS / f"{name}.json").read_text())
    api = json.loads((WORKFLOWS / "api" / f"{name}.api.json").read_text())
    card = thumbnails.card_of(name, ui, api)
    assert card.input_picture and card.subtitle.startswith("image to image · SDXL")
    titles = [s.title for s in card.steps]
    assert titles[0] == "Load Checkpoint" and titles[-1] == "your image" and card.steps[-1].kind == "output"
    assert titles.index("Apply LCM-LoRA") < titles.index("LCM Img2Img") < titles.index("VAE Decode") < titles.index("Save Image")
    files = {f for s in card.steps for f in s.details}
    assert {"sd_xl_base_1.0.safetensors", "lcm-lora-sdxl.safetensors"} <= files

    ui2, api2 = copy.deepcopy(ui), copy.deepcopy(api)
    sampler = next(k for k, n in api2.items() if "steps" in n["inputs"])
    api2[sampler]["inputs"].update(steps=6, guidance_scale=1.5, strength=0.8)
    next(n for n in ui2["nodes"] if str(n["id"]) == sampler)["title"] = "My Sampler (tuned)"
    changed = thumbnails.card_of(name, ui2, api2)
    step = next(s for s in changed.steps if s.kind == "sampler")
    assert step.title == "My Sampler" and step.details == ("6 steps · guidance 1.5", "strength 0.8")
    assert thumbnails.stamp_of(changed) != thumbnails.stamp_of(card)

    txt = thumbnails.card_for("sdxl-lcm-lora-txt2img")
    assert not txt.input_picture and txt.subtitle == "text to image · SDXL · 1024 x 1024"
