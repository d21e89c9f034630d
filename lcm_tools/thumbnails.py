"""The pictures the pack ships: the Templates browser's thumbnails (``workflows/<name>.jpg``) and ``icon.png``.

    python -m lcm_tools.thumbnails [NAME ...]     # every UI workflow in workflows/ when no name is given
    python -m lcm_tools.thumbnails --check        # exit 1 when a thumbnail is missing or not drawn by this code
    python -m lcm_tools.thumbnails --icon

A thumbnail is a card that says what the template is and shows no made-up result: the title, text or image to
image, the model family and the size in a header, then the template's own graph drawn as a flow of its nodes
(loader -> LoRA -> sampler -> decode -> save, titled as on the canvas) with the model file each loader reads and
the sampler's steps, guidance and (image to image) strength, ending in a neutral "your image" mark. An image to
image card shows a small drawn picture in the header for the image the user starts from. Everything is read from
the workflow files (the graph and titles from the UI file, the named settings from its API twin, which the tests
keep in step), so there is no table to keep by hand: run it again after adding or changing a workflow.

The Templates dialog shows a thumbnail about 228 CSS px wide (ComfyUI v0.8.0, 1440 px window), 0.44 of the
card's 512 px, so no text is drawn smaller than MIN_FONT (about 10 px in the dialog). Each JPEG carries a stamp
(a hash of this module and of what the card shows) that tests/test_thumbnails.py compares with a fresh drawing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import smoke
from .locate import PACK_DIR
from .workflows import API_DIR, API_SUFFIX, MODEL_INPUTS, WORKFLOWS_DIR, input_images, load_workflow, output_size

SIZE = 512
MARGIN = 16
MIN_FONT = 22  # px on the 512 px card: about 10 px at the dialog's 228 px
STAMP_PREFIX = "lcm-nodes thumbnail "
BG, BAND, BOX, EDGE, ACCENT = (24, 26, 33), (53, 64, 120), (44, 48, 61), (92, 100, 124), (240, 190, 90)
TEXT, DETAIL, MUTED = (245, 245, 248), (200, 207, 226), (156, 162, 178)
TOKENS = {"sd15": "SD1.5", "sdxl": "SDXL", "lcm": "LCM", "lora": "LoRA", "unet": "UNet", "txt2img": "", "img2img": "",
          "tcd": "TCD", "dmd2": "DMD2"}


def ui_names() -> list[str]:
    """UI workflows that have an API twin: the ones the Templates browser lists."""
    return sorted(p.stem for p in WORKFLOWS_DIR.glob("*.json") if (API_DIR / f"{p.stem}{API_SUFFIX}").is_file())


def title_of(name: str) -> str:
    words = [TOKENS.get(t, t.capitalize()) for t in name.split("-")]
    text = " ".join(w for w in words if w)
    return text.replace("LCM LoRA", "LCM-LoRA")


# ------------------------------------------------------------------------------------------ what a card shows


@dataclass(frozen=True)
class Step:
    """One node of the drawn flow: its canvas title and the values that matter (files, settings)."""

    title: str
    details: tuple[str, ...] = ()
    kind: str = "node"  # "node", "sampler" (highlighted) or "output" (the "your image" mark)
    joins: bool = False  # a second loader beside the previous one ("+"), not its successor ("->")


@dataclass(frozen=True)
class Card:
    title: str
    subtitle: str
    steps: tuple[Step, ...] = field(default_factory=tuple)
    input_picture: bool = False  # image to image: a drawn stand-in for the user's input picture, in the header


def _upstream(ui: dict) -> dict[int, list[int]]:
    """node id -> the nodes its linked inputs come from, in input order."""
    source = {link[0]: link[1] for link in ui["links"]}
    return {n["id"]: [source[i["link"]] for i in n.get("inputs", []) if i.get("link") is not None] for n in ui["nodes"]}


def _spine(ui: dict) -> list[dict]:
    """The graph's main line, loader to output: from the output node (the sink with the most ancestors) back
    through each node's first linked input (model -> sampler -> decode -> save, as ComfyUI wires them)."""
    nodes = {n["id"]: n for n in ui["nodes"]}
    upstream = _upstream(ui)
    feeds = {src for ups in upstream.values() for src in ups}

    def ancestors(nid: int) -> set[int]:
        seen, todo = set(), [nid]
        while todo:
            for up in upstream[todo.pop()]:
                if up not in seen:
                    seen.add(up)
                    todo.append(up)
        return seen

    sink = max((nid for nid in nodes if nid not in feeds), key=lambda nid: (len(ancestors(nid)), -nid))
    line = [sink]
    while upstream[line[-1]] and upstream[line[-1]][0] not in line:
        line.append(upstream[line[-1]][0])
    return [nodes[nid] for nid in reversed(line)]


def _short(title: str) -> str:
    """A canvas title without its parenthesised note: "Load Checkpoint (CLIP + VAE)" -> "Load Checkpoint"."""
    return re.sub(r"\s*\([^)]*\)", "", title).strip() or title


def card_of(name: str, ui: dict, api: dict) -> Card:
    """What ``workflows/<name>.jpg`` shows, read from the UI workflow ``ui`` and its API twin ``api``."""
    spine = _spine(ui)
    on_spine = {n["id"] for n in spine}
    upstream = _upstream(ui)
    images = input_images(api)

    def inputs(nid: int) -> dict:
        return api.get(str(nid), {}).get("inputs", {})

    def files(nid: int) -> tuple[str, ...]:
        return tuple(v for k, v in inputs(nid).items() if k in MODEL_INPUTS and isinstance(v, str))

    def title(n: dict) -> str:
        return _short(n.get("title") or n["type"])

    steps: list[Step] = []
    # loaders off the main line (a checkpoint read for its CLIP and VAE beside a UNet) come first, joined by "+"
    for n in ui["nodes"]:
        if n["id"] not in on_spine and files(n["id"]) and not upstream[n["id"]]:
            steps.append(Step(title(n), files(n["id"]), joins=bool(steps)))
    for n in spine:
        values = inputs(n["id"])
        if "steps" in values:
            details = [f"{values['steps']} steps · guidance {values.get('guidance_scale', values.get('cfg'))}"]
            if images and values.get("strength") is not None:
                details.append(f"strength {values['strength']}")
            steps.append(Step(title(n), tuple(details), "sampler"))
        else:
            steps.append(Step(title(n), files(n["id"]), joins=n is spine[0] and bool(steps)))
    steps.append(Step("your image", (), "output"))
    size = output_size(api)
    mode = "image to image" if images else "text to image"
    subtitle = f"{mode} · {smoke.family(api)} · " + (f"{size[0]} x {size[1]}" if size else "input's size")
    return Card(title_of(name), subtitle, tuple(steps), bool(images))


def card_for(name: str) -> Card:
    ui = json.loads((WORKFLOWS_DIR / f"{name}.json").read_text(encoding="utf-8"))
    return card_of(name, ui, load_workflow(API_DIR / f"{name}{API_SUFFIX}"))


def stamp_of(card: Card) -> str:
    """What the JPEG's comment must say: a hash of this drawing code (line endings ignored) and of the card."""
    source = Path(__file__).read_bytes().replace(b"\r\n", b"\n")
    content = json.dumps(asdict(card), sort_keys=True, ensure_ascii=False).encode()
    return STAMP_PREFIX + hashlib.sha256(source + b"\0" + content).hexdigest()[:24]


# ------------------------------------------------------------------------------------------ drawing


def _font(size: float):
    from PIL import ImageFont

    return ImageFont.load_default(size=round(size))  # Pillow's own FreeType font: the same picture on every machine


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


@dataclass(frozen=True)
class _Fonts:
    scale: float

    @property
    def label(self) -> int:
        return round(27 * self.scale)

    @property
    def detail(self) -> int:
        return round(24 * self.scale)


def _item_size(step: Step, f: _Fonts) -> tuple[float, float]:
    pad = 10 * f.scale
    label = _font(f.label)
    height = 2 * pad + f.label + len(step.details) * (f.detail + 6 * f.scale)
    if step.kind == "output":
        return label.getlength(step.title) + 2 * pad + 1.6 * f.label, height
    detail = _font(f.detail)
    return max([label.getlength(step.title)] + [detail.getlength(t) for t in step.details]) + 2 * pad, height


def _layout(card: Card, f: _Fonts, top: float) -> list[tuple[Step, float, float, float, float]]:
    """(step, x, y, width, height) for each step, rows filled left to right like text: a loader (a box that names
    files) has a row of its own, full width."""
    right, gap, row_gap = SIZE - MARGIN, 34 * f.scale, 22 * f.scale
    rows: list[list[list]] = [[]]
    for step in card.steps:
        w, h = _item_size(step, f)
        loader = step.kind == "node" and bool(step.details)
        row = rows[-1]
        x = MARGIN if not row else row[-1][1] + row[-1][3] + gap
        if row and (x + w > right or loader or row[-1][0].kind == "node" and row[-1][0].details):
            rows.append([])
            row, x = rows[-1], MARGIN
        row.append([step, x, 0.0, right - x if loader else w, h])
    placed, y = [], top
    for row in rows:
        height = max(item[4] for item in row)
        for item in row:
            item[2] = y + (height - item[4]) / 2
            placed.append(tuple(item))
        y += height + row_gap
    return placed


def _arrow(d, points: list[tuple[float, float]], scale: float) -> None:
    d.line(points, fill=ACCENT, width=max(2, round(3 * scale)), joint="curve")
    (x0, y0), (x1, y1) = points[-2], points[-1]
    k = 9 * scale
    if abs(x1 - x0) >= abs(y1 - y0):  # horizontal head
        s = 1 if x1 > x0 else -1
        d.polygon([(x1 + s * 2, y1), (x1 - s * k, y1 - k), (x1 - s * k, y1 + k)], fill=ACCENT)
    else:
        d.polygon([(x1, y1 + 2), (x1 - k, y1 - k), (x1 + k, y1 - k)], fill=ACCENT)


def _dashed_box(d, box: tuple[float, float, float, float], color, dash: float) -> None:
    x0, y0, x1, y1 = box
    for a, b, horizontal, fixed in ((x0, x1, True, y0), (x0, x1, True, y1), (y0, y1, False, x0), (y0, y1, False, x1)):
        t = a
        while t < b:
            e = min(t + dash, b)
            d.line([(t, fixed), (e, fixed)] if horizontal else [(fixed, t), (fixed, e)], fill=color, width=2)
            t += 2 * dash


def draw(card: Card):
    """The card as a SIZE x SIZE image; raises ValueError when its flow cannot fit with text of MIN_FONT or more."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (SIZE, SIZE), BG)
    d = ImageDraw.Draw(img)
    band = 100
    d.rectangle([0, 0, SIZE, band], fill=BAND)
    d.text((MARGIN + 2, 12), card.title, font=_font(40), fill=TEXT, stroke_width=1, stroke_fill=TEXT)
    side = band - 20
    room = SIZE - 2 * MARGIN - 4 - (side + 12 if card.input_picture else 0)
    size = next((s for s in range(26, MIN_FONT - 1, -1) if _font(s).getlength(card.subtitle) <= room), MIN_FONT)
    d.text((MARGIN + 2, 62 + (26 - size) / 2), card.subtitle, font=_font(size), fill=(210, 218, 255))
    if card.input_picture:  # image to image: a stand-in for the picture the user starts from
        img.paste(input_picture(side), (SIZE - MARGIN - side, 10))
        d.rectangle([SIZE - MARGIN - side, 10, SIZE - MARGIN, 10 + side], outline=(210, 218, 255), width=2)
    scale = 1.0
    while True:
        f = _Fonts(scale)
        placed = _layout(card, f, band)
        bottom = max(y + h for _, _, y, _, h in placed)
        if bottom <= SIZE - MARGIN:
            break
        scale *= 0.95
        if _Fonts(scale).detail < MIN_FONT:
            raise ValueError(f"the flow of {card.title!r} ({len(card.steps)} steps) needs text below {MIN_FONT} px to fit "
                             f"{SIZE} px; shorten its node titles or draw fewer steps")
    shift = (SIZE - MARGIN - bottom) / 2 + 4  # centre the flow under the band
    placed = [(s, x, y + shift, w, h) for s, x, y, w, h in placed]
    pad = 10 * scale
    for i, (step, x, y, w, h) in enumerate(placed):
        if i:
            prev, px, py, pw, ph = placed[i - 1]
            if step.joins:
                d.text((MARGIN + 40 * scale, (py + ph + y) / 2), "+", font=_font(1.3 * f.label), fill=ACCENT, anchor="mm",
                       stroke_width=1, stroke_fill=ACCENT)
            elif abs(py - y) < 1 or (py < y + h and y < py + ph):  # same row
                _arrow(d, [(px + pw + 4, y + h / 2), (x - 6, y + h / 2)], scale)
            else:
                # the next row starts at the left: down from the previous step, across, down into this one
                sx, tx = px + min(pw / 2, 40 * scale), x + min(w / 2, 40 * scale)
                mid = (py + ph + y) / 2
                _arrow(d, [(sx, py + ph + 2), (sx, mid), (tx, mid), (tx, y - 4)] if abs(sx - tx) > 2 else [(sx, py + ph + 2), (tx, y - 4)], scale)
        if step.kind == "output":
            _dashed_box(d, (x, y, x + w, y + h), MUTED, 7 * scale)
            ix, iy, s = x + pad, y + h / 2, f.label * 0.55  # a small picture sign: frame, sun, hill
            d.rectangle([ix, iy - s, ix + 2 * s, iy + s], outline=MUTED, width=2)
            d.ellipse([ix + 1.2 * s, iy - 0.7 * s, ix + 1.6 * s, iy - 0.3 * s], fill=MUTED)
            d.line([(ix, iy + 0.7 * s), (ix + 0.8 * s, iy - 0.1 * s), (ix + 2 * s, iy + 0.9 * s)], fill=MUTED, width=2)
            d.text((ix + 2 * s + 0.6 * pad, iy), step.title, font=_font(f.label), fill=DETAIL, anchor="lm")
            continue
        sampler = step.kind == "sampler"
        d.rounded_rectangle([x, y, x + w, y + h], radius=10 * scale, fill=BOX, outline=ACCENT if sampler else EDGE, width=3 if sampler else 2)
        d.text((x + pad, y + pad), step.title, font=_font(f.label), fill=TEXT)
        for k, line in enumerate(step.details):
            d.text((x + pad, y + pad + f.label + 6 * scale + k * (f.detail + 6 * scale)), line, font=_font(f.detail),
                   fill=ACCENT if sampler else DETAIL)
    return img


def write(name: str) -> Path:
    """Draw ``workflows/<name>.jpg`` from ``workflows/<name>.json`` and its API twin, stamped."""
    path = WORKFLOWS_DIR / f"{name}.jpg"
    path.write_bytes(encode(card_for(name)))
    return path


def encode(card: Card) -> bytes:
    """The card as the JPEG file the pack ships (full-resolution colour, so small text keeps its edges), stamped."""
    import io

    out = io.BytesIO()
    draw(card).save(out, format="JPEG", quality=90, subsampling=0, comment=stamp_of(card).encode())
    return out.getvalue()


def stamp_in(path: Path) -> str | None:
    """The stamp a thumbnail carries (its JPEG comment), or None."""
    from PIL import Image

    with Image.open(path) as img:
        comment = img.info.get("comment")
    return comment.decode(errors="replace") if isinstance(comment, bytes) else comment


def stale() -> list[str]:
    """UI workflows whose thumbnail is missing or was not drawn by this code from the workflow as it is now."""
    return [n for n in ui_names() if not (WORKFLOWS_DIR / f"{n}.jpg").is_file() or stamp_in(WORKFLOWS_DIR / f"{n}.jpg") != stamp_of(card_for(n))]


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
    p.add_argument("--check", action="store_true", help="only check that every thumbnail is drawn by this code from its workflow")
    p.add_argument("--icon", action="store_true", help="write icon.png instead")
    args = p.parse_args(argv)
    if args.icon:
        print(make_icon())
        return 0
    if args.check:
        bad = stale()
        for name in bad:
            print(f"{WORKFLOWS_DIR / name}.jpg is missing or stale: run python -m lcm_tools.thumbnails {name}", file=sys.stderr)
        return 1 if bad else 0
    unknown = sorted(set(args.names) - set(ui_names()))
    if unknown:
        print(f"error: no UI workflow {unknown}; UI workflows: {', '.join(ui_names())}", file=sys.stderr)
        return 1
    for name in args.names or ui_names():
        print(write(name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
