"""The real ComfyUI web frontend (comfyui-frontend-package, served by the real server) in headless Chromium.

Each UI-format workflow is loaded the way the page loads a dropped file (``app.loadGraphData``), checked for
missing nodes and broken links, turned into the prompt the page would send (``app.graphToPrompt``), which must be
its API twin in workflows/api/ (the tests' own converter in workflow_formats.py is not involved), queued with
``app.queuePrompt``, and must show its image. Screenshots go to
``screenshots/`` in the repository (``$LCM_SCREENSHOTS`` overrides). Model names are pointed at the tiny
test models and sizes set to 64x64, as in test_http.py.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from comfy_harness import IN_CI, REPO, SAVE_NODES
from conftest import TINY

WORKFLOWS = REPO / "workflows"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SHOTS = Path(os.environ.get("LCM_SCREENSHOTS", REPO / "screenshots"))
NAMES = sorted(p.name[: -len(".api.json")] for p in (WORKFLOWS / "api").glob("*.api.json"))

pytestmark = pytest.mark.skipif(CHROMIUM is None and not IN_CI, reason="Debian chromium is not installed")


def tiny_ui(name: str) -> dict:
    ui = json.loads((WORKFLOWS / f"{name}.json").read_text())
    for node in ui["nodes"]:
        w = node.get("widgets_values", [])
        if node["type"] == "CheckpointLoaderSimple":
            w[0] = TINY["ckpt"]
        elif node["type"] == "LCMLoadUNet":
            w[0] = TINY["unet"]
        elif node["type"] == "LCMApplyLoRA":
            w[0] = TINY["lora"]
        elif node["type"] == "EmptyLatentImage":
            w[0] = w[1] = 64
    return ui


def tiny_api(name: str) -> dict:
    """The API twin with the same model names and size as tiny_ui (set here field by field, no converter)."""
    api = json.loads((WORKFLOWS / "api" / f"{name}.api.json").read_text())
    fields = {"CheckpointLoaderSimple": {"ckpt_name": TINY["ckpt"]}, "LCMLoadUNet": {"unet_name": TINY["unet"]},
              "LCMApplyLoRA": {"lora_name": TINY["lora"]}, "EmptyLatentImage": {"width": 64, "height": 64}}
    for node in api.values():
        node["inputs"].update(fields.get(node["class_type"], {}))
    return api


def open_dialogs(pg) -> int:
    return pg.locator("[role=dialog]:visible, .p-dialog:visible").count()


def close_dialogs(pg) -> None:
    """Close what a first load opens (the Templates dialog), as a user would: Escape, then the close button."""
    for _ in range(6):
        if not open_dialogs(pg):
            return
        pg.keyboard.press("Escape")
        time.sleep(0.5)
        for sel in ("[role=dialog] button[aria-label*='lose']", ".p-dialog-close-button", "[role=dialog] button:has(.pi-times)",
                    "[role=dialog] button:has(svg)"):
            loc = pg.locator(sel)
            if loc.count():
                try:
                    loc.first.click(timeout=1000)
                    time.sleep(0.5)
                    break
                except Exception:
                    pass


@pytest.fixture(scope="module")
def page(request):
    assert CHROMIUM, "CI needs Debian chromium for the browser test (apt-get install chromium)"
    server = request.getfixturevalue("server")  # after the check: without chromium, fail before starting ComfyUI
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
                                          "--no-first-run", "--disable-component-update", "--disable-sync"])
        pg = browser.new_page(viewport={"width": 1600, "height": 1000})
        pg.goto(server, wait_until="domcontentloaded", timeout=120_000)
        pg.wait_for_function("() => window.app && window.app.graph && window.LiteGraph", timeout=120_000)
        time.sleep(3)
        close_dialogs(pg)
        yield pg
        browser.close()


@pytest.mark.parametrize("name", NAMES)
def test_workflow_loads_queues_and_shows_its_image(page, server, name):
    from lcm_tools.client import ComfyClient

    ui = tiny_ui(name)
    page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", ui)
    time.sleep(1)
    report = page.evaluate("""() => {
        const g = window.app.graph;
        const nodes = g._nodes || g.nodes;
        const missing = nodes.filter(n => !window.LiteGraph.registered_node_types[n.type]).map(n => n.type);
        const links = Object.values(g.links || {}).filter(l => l && (!g.getNodeById(l.origin_id) || !g.getNodeById(l.target_id)));
        const dialogs = [...document.querySelectorAll('.p-dialog')].map(d => d.innerText).filter(t => /missing|invalid/i.test(t));
        return {count: nodes.length, missing, badLinks: links.length, dialogs};
    }""")
    assert report["count"] == len(ui["nodes"])
    assert report["missing"] == [] and report["badLinks"] == 0 and report["dialogs"] == [], report
    # what the page sends to /prompt for this graph is the API twin (both hold the tiny model names and size)
    sent = page.evaluate("async () => (await window.app.graphToPrompt()).output")
    assert sent == tiny_api(name)
    client = ComfyClient(server)
    before = set(client.request("/history").keys())
    page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
    deadline = time.monotonic() + 300
    entry = None
    while time.monotonic() < deadline and entry is None:
        for pid, h in client.request("/history").items():
            if pid not in before and h.get("status", {}).get("completed") is not None:
                entry = h
        time.sleep(0.5)
    assert entry is not None, "the queued prompt never finished"
    assert entry["status"]["status_str"] == "success", entry["status"]
    save_id = next(str(n["id"]) for n in ui["nodes"] if n["type"] in SAVE_NODES)
    # the page received the image for the Save Image node and shows it
    page.wait_for_function(f"() => window.app.nodeOutputs && window.app.nodeOutputs['{save_id}'] && window.app.nodeOutputs['{save_id}'].images", timeout=60_000)
    outputs = page.evaluate(f"() => window.app.nodeOutputs['{save_id}'].images")
    assert outputs and outputs[0]["filename"] == entry["outputs"][save_id]["images"][0]["filename"]
    time.sleep(1)
    close_dialogs(page)
    assert open_dialogs(page) == 0
    page.screenshot(path=str(SHOTS / f"{name}.png"))
    assert (SHOTS / f"{name}.png").stat().st_size > 10_000
