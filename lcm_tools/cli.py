"""The command line: ``python -m lcm_tools run | convert | quickstart | workflows`` (run it in this folder).

    python -m lcm_tools run sdxl-lcm-lora-txt2img --prompt "a cat" --seed 7 --output out/
    python -m lcm_tools run workflows/api/sd15-lcm-lora-txt2img.api.json --server http://127.0.0.1:8188 --prompts prompts.txt
    python -m lcm_tools run sd15-lcm-lora-txt2img -- --highvram        # after --: arguments for the ComfyUI it starts
    python -m lcm_tools convert models/loras/old.ckpt                   # pickle -> .safetensors, tensors only
    python -m lcm_tools quickstart --workflow sd15-lcm-lora-txt2img     # what bash scripts/quickstart runs

``run`` without ``--server`` starts a ComfyUI of its own on 127.0.0.1 with this checkout's LCM Nodes loaded,
and stops it afterwards. Progress is shown per sampling step; a prompt that fails validation or execution
makes the command exit 1 with ComfyUI's own error text. With ``--prompts`` (one prompt per line, or JSON lines
of override fields) it runs a queue, records each finished item in ``<output>/.lcm-runner-state.json`` and,
when run again, skips what is already done.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

from .client import ComfyClient, RunnerError
from .cluster import add_cluster_arguments, run_cluster, wants_cluster  # Dask itself is imported only when a run scales out
from .locate import find_comfyui
from .run import run_one, run_queue
from .server import LocalComfy
from .workflows import Overrides, apply_overrides, bundled_names, load_workflow, model_files, read_prompts, resolve_workflow

OVERRIDE_FLAGS = (("prompt", str, "positive prompt"), ("negative", str, "negative prompt"), ("seed", int, "seed"),
                  ("steps", int, "sampling steps"), ("guidance", float, "guidance scale"), ("strength", float, "img2img strength"),
                  ("width", int, "width (img2img: the input is scaled)"), ("height", int, "height"), ("batch", int, "batch size"),
                  ("unet", str, "UNet file name"), ("ckpt", str, "checkpoint file name"), ("lora", str, "LoRA file name"),
                  ("image", str, "input image name"))


def _workflows_epilog() -> str:
    return "bundled workflows (name -> model files):\n" + "\n".join(
        f"  {name:26s} " + ", ".join(n for _, n in model_files(load_workflow(name))) for name in bundled_names())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lcm_tools", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_workflows_epilog())
    sub = p.add_subparsers(dest="command", required=True, metavar="{run,convert,quickstart,workflows}")
    r = sub.add_parser("run", help="queue a workflow on ComfyUI and write its images", formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=_workflows_epilog() + "\n\nArguments after a lone -- go to the ComfyUI it starts, e.g. -- --highvram.")
    r.add_argument("workflow", help="an API-format workflow file, or a bundled workflow's name")
    r.add_argument("--server", metavar="URL", help="a running ComfyUI, e.g. http://127.0.0.1:8188 (default: start one on 127.0.0.1)")
    r.add_argument("--comfyui", metavar="DIR", help="the ComfyUI to start when --server is not given "
                   "(default: $COMFYUI_PATH, the ComfyUI holding this folder, or ~/.cache/lcm-nodes/ComfyUI-v0.8.0)")
    r.add_argument("--base-dir", metavar="DIR", help="--base-directory of the ComfyUI it starts: models/, input/ (default: ComfyUI's own)")
    r.add_argument("--comfy-arg", action="append", default=[], metavar="ARG",
                   help="one more argument for the ComfyUI it starts, repeatable; a value starting with -- works "
                        "(--comfy-arg --highvram); or put them all after a lone --")
    r.add_argument("--output", default="lcm-output", metavar="DIR", help="folder for the images (default: lcm-output)")
    r.add_argument("--prompts", metavar="FILE", help="prompts to run as a queue: one per line, or JSON lines of override fields")
    for flag, typ, what in OVERRIDE_FLAGS:
        r.add_argument(f"--{flag}", type=typ, help=f"{what} (default: the workflow's)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    add_cluster_arguments(r)
    c = sub.add_parser("convert", help="convert a pickled .ckpt/.pt/.bin file to .safetensors (tensors only, no code is run)")
    c.add_argument("file")
    c.add_argument("--output", help="output file (default: beside the input, with .safetensors)")
    from .quickstart import build_parser as quickstart_parser

    quickstart_parser(sub.add_parser("quickstart", help="set up folders and generate an image from a bundled workflow"))
    sub.add_parser("workflows", help="list the bundled workflows and the model files each needs")
    return p


def split_comfy_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """(our arguments, ComfyUI's): everything after a lone ``--``, and each ``--comfy-arg VALUE`` even when VALUE starts with -."""
    if "--" in argv:
        i = argv.index("--")
        argv, comfy = argv[:i], argv[i + 1:]
    else:
        comfy = []
    ours = []
    it = iter(argv)
    for a in it:
        if a == "--comfy-arg":
            value = next(it, None)
            if value is None:
                ours.append(a)  # argparse says what is missing
            else:
                ours.append(f"--comfy-arg={value}")
        else:
            ours.append(a)
    return ours, comfy


def _convert(args) -> int:
    from lcm_core.errors import LCMModelError
    from lcm_core.weights import convert_to_safetensors

    try:
        dst, n, dropped = convert_to_safetensors(args.file, args.output)
    except LCMModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {dst} ({n} tensors" + (f"; {dropped} non-tensor entries left out" if dropped else "") + ")")
    return 0


def _run(args, comfy_args: list[str]) -> int:
    overrides = Overrides(**{name: getattr(args, name) for name, _, _ in OVERRIDE_FLAGS})
    base = load_workflow(resolve_workflow(args.workflow, Path.cwd()))
    items = read_prompts(args.prompts) if args.prompts else None
    if items is None:
        apply_overrides(base, overrides)  # bad values fail before a server starts
    output = Path(args.output)
    name = Path(args.workflow).name.removesuffix(".json").removesuffix(".api")
    if args.server:
        if comfy_args or args.comfyui or args.base_dir:
            raise RunnerError("--comfyui, --base-dir and ComfyUI arguments are for the ComfyUI the runner starts; with --server they do nothing: drop them")
        return _run_on(ComfyClient(args.server), base, overrides, items, output, name, args.quiet)
    if args.comfyui:
        comfy = Path(args.comfyui)
    else:
        comfy, why = find_comfyui()
        if comfy is None:
            raise RunnerError(f"no ComfyUI found to start ({why}); give --server URL or --comfyui DIR")
    output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lcm-run-") as work, \
            LocalComfy(comfy, base_directory=args.base_dir, output_directory=Path(work) / "output",
                       extra_args=comfy_args, log_path=output / "comfyui.log") as url:
        return _run_on(ComfyClient(url), base, overrides, items, output, name, args.quiet)


def _run_on(client: ComfyClient, base: dict, overrides: Overrides, items: list[dict] | None, output: Path, name: str, quiet: bool) -> int:
    if items is not None:
        summary = run_queue(client, base, overrides, items, output, quiet)
        print(f"{summary['done']} done, {summary['skipped']} already done, {len(summary['failed'])} failed, of {summary['total']}")
        return 1 if summary["failed"] else 0
    for f in run_one(client, apply_overrides(base, overrides), output, name, quiet):
        print(f)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, comfy_args = split_comfy_args(argv)
    args = build_parser().parse_args(ours)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "convert":
            return _convert(args)
        if args.command == "workflows":
            print(_workflows_epilog())
            return 0
        if args.command == "quickstart":
            from .quickstart import main as quickstart_main

            if comfy_args:
                raise RunnerError("quickstart takes no ComfyUI arguments; use `python -m lcm_tools run` for that")
            return quickstart_main(args)
        if wants_cluster(args):
            return run_cluster(args, [*args.comfy_arg, *comfy_args])
        return _run(args, [*args.comfy_arg, *comfy_args])
    except RunnerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
