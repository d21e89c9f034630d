"""Quickstart: generate an LCM image headless from a bundled workflow, with whatever weights there are.

- All the workflow's files in place: a real image.
- Some missing: the list of what goes where and where it comes from, exit code 3 (``--download`` fetches them
  from the Hugging Face Hub; ``$HF_ENDPOINT`` overrides the address).
- None at all: the same list, then the workflow's own graph runs on tiny random-weight models from the pack's
  cache, said plainly: a smoke test of the setup, not a picture.

Folders: when this checkout sits in ``<ComfyUI>/custom_nodes/``, that ComfyUI's models/ and input/ serve (read
only; ``--download`` writes the files asked for). Otherwise the base folder is ``--base-dir``,
``$LCM_QUICKSTART_DIR`` or ``${XDG_CACHE_HOME:-~/.cache}/lcm-nodes/quickstart``. The ComfyUI started here loads
this checkout's LCM Nodes, writes its own output, user and temp files to a temporary folder, and the images are
copied to ``--output`` under new numbers, never over an earlier one.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import smoke
from .client import ComfyClient, RunnerError
from .locate import cache_root, find_comfyui
from .releases import RELEASES, Release, download
from .run import run_one
from .server import LocalComfy
from .workflows import Overrides, apply_overrides, bundled_names, input_images, load_workflow, model_files, resolve_workflow

EXIT_MISSING = 3
DEFAULT_WORKFLOW = "sd15-lcm-lora-txt2img"
OLD_LINK_NAME = "lcm_nodes"  # what older quickstarts linked into the shared base folder
ALIASES = {"diffusion_models": ("unet",), "text_encoders": ("clip",)}  # ComfyUI's legacy folder names


@dataclass(frozen=True)
class Place:
    """Where this run's ComfyUI reads models and input images from."""

    comfy: Path
    base: Path | None  # ComfyUI's --base-directory; None: the ComfyUI's own folders (the pack is installed there)
    models: Path
    input: Path

    @property
    def owned(self) -> bool:
        """Whether the folders are the quickstart's own (placeholders may be written there)."""
        return self.base is not None


@dataclass(frozen=True)
class Needed:
    folder: Path
    name: str
    release: Release | None
    kind: str  # "model" or "image"

    @property
    def path(self) -> Path:
        return self.folder / self.name


def default_base_dir() -> Path:
    env = os.environ.get("LCM_QUICKSTART_DIR")
    return Path(env).expanduser() if env else cache_root() / "quickstart"


def choose_place(comfy: Path, how: str, base_dir: str | None, cwd: Path) -> Place:
    if base_dir is None and how == "parent of custom_nodes":
        return Place(comfy, None, comfy / "models", comfy / "input")
    base = (cwd / Path(base_dir).expanduser()) if base_dir else default_base_dir()
    base = base.resolve()
    for sub in ("models/checkpoints", "models/loras", "models/diffusion_models", "input", "custom_nodes"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    old = base / "custom_nodes" / OLD_LINK_NAME
    if old.is_symlink():  # made by an older quickstart; it would load that checkout instead of this one
        print(f"removing {old} -> {os.readlink(old)} (left by an older quickstart: each checkout now loads its own code)", file=sys.stderr)
        old.unlink()
    return Place(comfy, base, base / "models", base / "input")


def _present(place: Place, folder: str, name: str) -> bool:
    return any((place.models / f / name).is_file() for f in (folder, *ALIASES.get(folder, ())))


def needed_files(api: dict, place: Place) -> list[Needed]:
    out = [Needed(place.models / folder, name, RELEASES.get(name), "model") for folder, name in model_files(api)]
    out += [Needed(place.input, name, None, "image") for name in input_images(api)]
    return out


def missing_files(api: dict, place: Place) -> list[Needed]:
    return [n for n in needed_files(api, place)
            if not (_present(place, n.folder.name, n.name) if n.kind == "model" else n.path.is_file())]


def describe(missing: list[Needed]) -> str:
    """The 'put them here' list: full folder, local name, size, and where each file comes from."""
    lines = []
    for n in missing:
        if n.kind == "image":
            lines.append(f"  {n.folder}/\n      {n.name}   any picture of yours (the image-to-image input); or --image NAME for one already there")
            continue
        lines.append(f"  {n.folder}/\n      {n.name}" + (f"   ({n.release.size}, {n.release.what})" if n.release else ""))
        if n.release:
            rename = "" if n.release.file == n.name else f", saved as {n.name}"
            lines.append(f"      from https://huggingface.co/{n.release.repo}  file {n.release.file}{rename}")
        else:
            lines.append("      (not a public release this pack knows: use the file your workflow was made with)")
    return "\n".join(lines)


def placeholder_image(path: Path, size: int = 512) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.linear_gradient("L").resize((size, size)).convert("RGB")
    img.save(path)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="bash scripts/quickstart")
    p.description = __doc__.split("\n\n")[0]
    names = bundled_names()
    p.epilog = ("bundled workflows (and the files each needs):\n" + "\n".join(
        f"  {name:26s} " + ", ".join(n for _, n in model_files(load_workflow(name))) for name in names)
        + f"\n\nexit codes: 0 image written (real or smoke test), 1 error, 2 bad arguments, {EXIT_MISSING} model files missing")
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--workflow", default=DEFAULT_WORKFLOW, metavar="NAME",
                   help=f"a bundled workflow: NAME, NAME.api.json or its path (default: {DEFAULT_WORKFLOW})")
    p.add_argument("--download", action="store_true", help="fetch missing model files from the Hugging Face Hub (default: off)")
    p.add_argument("--check", action="store_true", help="only say which files are there and which are missing; start nothing")
    p.add_argument("--output", default="lcm-output", metavar="DIR",
                   help="folder for the images, relative to the current folder (default: lcm-output)")
    p.add_argument("--base-dir", metavar="DIR", help="ComfyUI base folder for models/ and input/ (default: ComfyUI's own when "
                   "this checkout is in its custom_nodes/, else $LCM_QUICKSTART_DIR or ~/.cache/lcm-nodes/quickstart)")
    p.add_argument("--prompt", help="the positive prompt (default: the workflow's)")
    p.add_argument("--seed", type=int, help="the seed (default: the workflow's)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the workflow's)")
    p.add_argument("--width", type=int, help="image width, a multiple of 8 (default: the workflow's; 128 for a smoke test)")
    p.add_argument("--height", type=int, help="image height, a multiple of 8 (default: the workflow's; 128 for a smoke test)")
    p.add_argument("--image", help="input image in the input folder, for img2img workflows (default: lcm-input.png)")
    return p


def main(args: argparse.Namespace, cwd: Path | None = None) -> int:
    cwd = cwd or Path.cwd()
    wf_path = resolve_workflow(args.workflow, cwd)
    wf_name = wf_path.name.removesuffix(".api.json").removesuffix(".json")
    api = load_workflow(wf_path)
    overrides = Overrides(prompt=args.prompt, seed=args.seed, steps=args.steps, width=args.width, height=args.height, image=args.image)
    apply_overrides(api, overrides)  # bad values fail here, before anything starts
    comfy, how = find_comfyui(clone=True)
    if comfy is None:
        raise RunnerError(how)
    place = choose_place(comfy, how, args.base_dir, cwd)
    if args.image:
        api = apply_overrides(api, Overrides(image=args.image))
    needed = needed_files(api, place)
    missing = missing_files(api, place)
    if place.owned:  # the quickstart's own folder: a placeholder input picture is fine there
        for n in [n for n in missing if n.kind == "image"]:
            placeholder_image(n.path)
            print(f"wrote a placeholder input picture {n.path}; put your own there for a real image-to-image run", file=sys.stderr)
        missing = [n for n in missing if n.kind != "image"]
    if args.check:
        for n in needed:
            print(f"{'missing' if n in missing else 'ok     '} {n.path}")
        return EXIT_MISSING if missing else 0
    if missing and args.download:
        unknown = [n.name for n in missing if n.release is None]
        if unknown:
            raise RunnerError(f"--download cannot fetch {unknown}: not a public release this pack knows; put them in place yourself")
        for n in missing:
            download(n.release, n.path)
        missing = missing_files(api, place)
    models_needed = [n for n in needed if n.kind == "model"]
    models_missing = [n for n in missing if n.kind == "model"]
    is_smoke = bool(models_needed) and len(models_missing) == len(models_needed)
    if missing:
        head = (f"No model files for workflow '{wf_name}' were found. It needs these (run again with --download to fetch them):"
                if is_smoke else f"Workflow '{wf_name}' cannot run: these files are missing (run again with --download to fetch the models):")
        print(head + "\n" + describe(missing), file=sys.stderr)
        if not is_smoke:
            return EXIT_MISSING
    out = (cwd / Path(args.output).expanduser()).resolve()
    note = smoke_note(api, wf_name) if is_smoke else ""
    with tempfile.TemporaryDirectory(prefix="lcm-quickstart-") as work_dir:
        work = Path(work_dir)
        (work / "user").mkdir()
        extra = ["--temp-directory", str(work), "--user-directory", str(work / "user")]
        if is_smoke:
            models = smoke.ensure_models(comfy)
            extra += ["--extra-model-paths-config", str(smoke.model_paths_config(models, work))]
            api = apply_overrides(api, smoke.smoke_overrides(api, overrides))
            if not place.owned and input_images(api):  # never write into the user's input/: a folder of our own
                for name in input_images(api):
                    placeholder_image(work / "input" / name)
                extra += ["--input-directory", str(work / "input")]
            print(note, file=sys.stderr)
        else:
            api = apply_overrides(api, overrides)
        log_path = cache_root() / "logs" / "quickstart-comfyui.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.unlink(missing_ok=True)
        with LocalComfy(comfy, base_directory=place.base, output_directory=work / "output", extra_args=extra, log_path=log_path) as url:
            files = run_one(ComfyClient(url), api, out, f"{wf_name}-smoke" if is_smoke else wf_name)
    for f in files:
        print(f)
    if is_smoke:
        print(note, file=sys.stderr)
    return 0


def smoke_note(api: dict, wf_name: str) -> str:
    fam = smoke.family(api)
    shape = ("" if fam == "SD1.5" else
             " This workflow is for SDXL; the smoke test ran its graph on SD1.5-shaped models (random SDXL text encoders "
             "alone would be 1.6 GB).")
    return (f"SMOKE TEST: no model files were found, so workflow '{wf_name}' ran on tiny random-weight SD1.5-shaped models "
            f"from {smoke.smoke_dir()}.{shape} The picture is noise, not art; it only proves the setup works. "
            "Put the files listed above in place (or use --download) for real images.")
