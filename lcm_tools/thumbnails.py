"""The pictures the pack ships: the Templates browser's thumbnails (``workflows/<name>.jpg``) and ``icon.png``.

    python -m lcm_tools.thumbnails [NAME ...]     # every UI workflow in workflows/ when no name is given
    python -m lcm_tools.thumbnails --icon

A thumbnail is a card that says what the workflow makes (text -> image or image -> image, the model family and
the files, steps, guidance and size read from the workflow) beside a render of the workflow's own graph. The
render runs on the quickstart's tiny random-weight smoke models, so it is illustrative (texture, not a
picture): the card says so, and so does the README. Run it again after adding or changing a workflow.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
from pathlib import Path

from . import smoke
from .client import ComfyClient, RunnerError
from .locate import PACK_DIR, find_comfyui
from .run import run_one
from .server import LocalComfy
from .workflows import API_DIR, API_SUFFIX, WORKFLOWS_DIR, Overrides, apply_overrides, input_images, load_workflow, model_files, output_size

SIZE = 512
INPUT_NAME = "lcm-input.png"
TOKENS = {"sd15": "SD1.5", "sdxl": "SDXL", "lcm": "LCM", "lora": "LoRA", "unet": "UNet", "txt2img": "", "img2img": "",
          "tcd": "TCD", "dmd2": "DMD2"}


def ui_names() -> list[str]:
    """UI workflows that have an API twin: the ones the Templates browser lists."""
    return sorted(p.stem for p in WORKFLOWS_DIR.glob("*.json") if (API_DIR / f"{p.stem}{API_SUFFIX}").is_file())


def title_of(name: str) -> str:
    words = [TOKENS.get(t, t.capitalize()) for t in name.split("-")]
    text = " ".join(w for w in words if w)
    return text.replace("LCM LoRA", "LCM-LoRA")


def facts_of(api: dict) -> dict:
    sampler = next((n["inputs"] for n in api.values() if "steps" in n.get("inputs", {}) and "seed" in n.get("inputs", {})), {})
    size = output_size(api)
    return {
        "mode": "image to image" if input_images(api) else "text to image",
        "family": smoke.family(api),
        "steps": sampler.get("steps"),
        "guidance": sampler.get("guidance_scale", sampler.get("cfg")),
        "strength": sampler.get("strength"),
        "size": f"{size[0]} x {size[1]}" if size else "input's size",
        "files": [name for _, name in model_files(api)],
        "prompt": next((n["inputs"]["text"] for n in api.values() if n.get("class_type") == "CLIPTextEncode"
                        and isinstance(n["inputs"].get("text"), str)), ""),
    }


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)  # Pillow's own FreeType font: the same picture on every machine


def input_picture(size: int = 256):
    """The illustrative img2img input: a plain drawn landscape (sky, sun, hills)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size))
    d = ImageDraw.Draw(img)
    for y in range(size):
        t = y / size
        d.line([(0, y), (size, y)], fill=(int(40 + 170 * t), int(70 + 90 * t), int(150 - 40 * t)))
    d.ellipse([size * 0.58, size * 0.18, size * 0.80, size * 0.40], fill=(250, 214, 120))
    d.polygon([(0, size * 0.75), (size * 0.35, size * 0.52), (size * 0.7, size * 0.78), (size, size * 0.6), (size, size), (0, size)],
              fill=(46, 92, 60))
    return img


def card(name: str, api: dict, render: bytes, source=None):
    """The thumbnail: title, what goes in and what comes out, settings and files, and the illustrative render."""
    from PIL import Image, ImageDraw

    f = facts_of(api)
    img = Image.new("RGB", (SIZE, SIZE), (24, 26, 33))
    d = ImageDraw.Draw(img)
    d.rectangle([0, 0, SIZE, 92], fill=(53, 64, 120))
    d.text((24, 16), title_of(name), font=_font(30), fill=(255, 255, 255))
    d.text((24, 56), f"{f['mode']}  ·  {f['family']}  ·  {f['steps']} steps", font=_font(22), fill=(200, 210, 255))
    panel = 196
    out = Image.open(io.BytesIO(render)).convert("RGB").resize((panel, panel))
    top = 126
    if source is not None:
        left = source.resize((panel, panel))
    else:
        left = Image.new("RGB", (panel, panel), (38, 42, 54))
        ld = ImageDraw.Draw(left)
        words, line, lines = (f["prompt"] or "your prompt").split(), "", []
        for w in words:
            if len(line) + len(w) > 16:
                lines.append(line)
                line = ""
            line = f"{line} {w}".strip()
        lines.append(line)
        ld.text((14, 12), "prompt", font=_font(18), fill=(150, 160, 190))
        for i, text in enumerate(lines[:6]):
            ld.text((14, 44 + 24 * i), text, font=_font(21), fill=(235, 235, 240))
    img.paste(left, (24, top))
    img.paste(out, (SIZE - 24 - panel, top))
    mid = SIZE // 2
    d.polygon([(mid - 14, top + panel // 2 - 16), (mid + 14, top + panel // 2), (mid - 14, top + panel // 2 + 16)], fill=(240, 190, 90))
    settings = [f"guidance {f['guidance']}"] + ([f"strength {f['strength']}"] if f["strength"] is not None else []) + [f["size"]]
    d.text((24, top + panel + 16), "  ·  ".join(settings), font=_font(20), fill=(225, 225, 230))
    for i, fname in enumerate(f["files"][:3]):
        d.text((24, top + panel + 46 + 24 * i), fname, font=_font(18), fill=(160, 170, 190))
    d.text((24, SIZE - 28), "right: tiny random-weight render (illustrative)", font=_font(16), fill=(130, 135, 150))
    return img


def render_thumbnails(names: list[str], comfy: Path) -> list[Path]:
    """Run each workflow's graph on the smoke models in one ComfyUI and write ``workflows/<name>.jpg``."""
    models = smoke.ensure_models(comfy)
    written = []
    with tempfile.TemporaryDirectory(prefix="lcm-thumbs-") as tmp:
        work = Path(tmp)
        (work / "input").mkdir()
        (work / "user").mkdir()
        source = input_picture()
        source.save(work / "input" / INPUT_NAME)
        extra = ["--extra-model-paths-config", str(smoke.model_paths_config(models, work)), "--input-directory", str(work / "input"),
                 "--temp-directory", str(work), "--user-directory", str(work / "user")]
        with LocalComfy(comfy, output_directory=work / "output", extra_args=extra) as url:
            client = ComfyClient(url)
            for name in names:
                api = load_workflow(API_DIR / f"{name}{API_SUFFIX}")
                runnable = apply_overrides(api, smoke.smoke_overrides(api, Overrides(seed=7, width=256, height=256)))
                files = run_one(client, runnable, work / "renders", name, quiet=True)
                path = WORKFLOWS_DIR / f"{name}.jpg"
                card(name, api, files[0].read_bytes(), source if input_images(api) else None).save(path, quality=88)
                written.append(path)
                print(path)
    return written


def make_icon(path: Path = PACK_DIR / "icon.png") -> Path:
    """The pack's icon (400x400): four frames from noise to a picture, four steps, and the name."""
    import random

    from PIL import Image, ImageDraw

    img = Image.new("RGB", (400, 400), (53, 64, 120))
    d = ImageDraw.Draw(img)
    d.text((200, 120), "LCM", font=_font(128), fill=(255, 255, 255), anchor="mm")
    clean = input_picture(72)
    rng = random.Random(0)
    for i in range(4):
        frame = clean.copy()
        px = frame.load()
        amount = 1.0 - i / 3
        for y in range(72):
            for x in range(72):
                r, g, b = px[x, y]
                n = rng.randint(0, 255)
                px[x, y] = tuple(int((1 - amount) * c + amount * n) for c in (r, g, b))
        img.paste(frame, (28 + i * 88, 250))
    d.text((200, 360), "4 steps", font=_font(30), fill=(240, 190, 90), anchor="mm")
    img.save(path)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lcm_tools.thumbnails", description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", help="UI workflows to render (default: all in workflows/)")
    p.add_argument("--icon", action="store_true", help="write icon.png instead")
    args = p.parse_args(argv)
    if args.icon:
        print(make_icon())
        return 0
    comfy, why = find_comfyui()
    try:
        if comfy is None:
            raise RunnerError(why)
        unknown = sorted(set(args.names) - set(ui_names()))
        if unknown:
            raise RunnerError(f"no UI workflow {unknown}; UI workflows: {', '.join(ui_names())}")
        render_thumbnails(args.names or ui_names(), comfy)
    except RunnerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
