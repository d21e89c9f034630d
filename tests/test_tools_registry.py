"""Registry packaging (issue #11 item 10): pyproject.toml as the Comfy Registry specifies it, the icon, and the
published archive (git-tracked files minus .comfyignore, as `comfy node publish` packs it) free of the
network and subprocess code the Registry flags. Nothing here starts ComfyUI."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
from comfy_harness import REPO

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: requirements-test.txt brings tomli
    import tomli as tomllib

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
# docs.comfy.org/registry/specifications: name rules; comfy-cli's checks of classifiers and requires-comfyui
NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9._-]*$")
SEMVER_RE = re.compile(r"^\d+\.\d+\.\d+$")
VERSION_PART_RE = re.compile(r"^(?:(==|>=|<=|!=|~=|>|<|<>|=)\s*)?(\d+\.\d+\.\d+(?:-[a-zA-Z0-9]+)?)?$")
OS_PREFIXES = ("Microsoft", "POSIX", "MacOS", "OS Independent")
ACCELERATORS = {"GPU :: NVIDIA CUDA", "GPU :: AMD ROCm", "GPU :: Intel Arc", "NPU :: Huawei Ascend", "GPU :: Apple Metal"}
ICON_TYPES = {"PNG", "JPEG", "GIF"}  # and SVG; max 800 x 400
#: What the Registry flags in a node pack, and what a node pack has no business doing.
FORBIDDEN = re.compile(r"^\s*(import|from)\s+(subprocess|socket|urllib|http\.client|requests|aiohttp|httpx|ftplib)\b"
                       r"|\bos\.system\(|\bos\.popen\(|pip install", re.M)


def published_files() -> list[str]:
    """The files `comfy node publish` would pack from this tree: tracked (or about to be) minus .comfyignore."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True)
    ignored = subprocess.run(["git", "ls-files", "-co", "-i", "--exclude-from=.comfyignore"], cwd=REPO, capture_output=True,
                             text=True, check=True)
    drop = set(ignored.stdout.splitlines())
    return sorted(f for f in listed.stdout.splitlines() if f not in drop and (REPO / f).is_file())


def test_project_section_follows_the_registry_spec():
    project = PYPROJECT["project"]
    name = project["name"]
    assert len(name) < 100 and NAME_RE.match(name) and not re.search(r"[._-]{2}", name), name
    assert "comfyui" not in name.lower()
    assert SEMVER_RE.match(project["version"]), project["version"]
    lic = project["license"]
    assert isinstance(lic, dict) and (lic.get("text") or (REPO / lic.get("file", "-")).is_file()), lic
    assert project["description"].strip()
    assert project["requires-python"].startswith(">=")
    repo = project["urls"]["Repository"]
    assert urlparse(repo).scheme == "https" and urlparse(repo).netloc, repo
    for c in project.get("classifiers", []):
        if c.startswith("Operating System :: "):
            assert c[len("Operating System :: "):].startswith(OS_PREFIXES), c
        if c.startswith("Environment ::"):
            assert c[len("Environment :: "):] in ACCELERATORS, c


def test_dependencies_match_requirements_txt():
    """ComfyUI-Manager installs requirements.txt, the Registry records [project] dependencies: the same list."""
    lines = [ln.split("#")[0].strip() for ln in (REPO / "requirements.txt").read_text().splitlines()]
    assert sorted(ln for ln in lines if ln) == sorted(PYPROJECT["project"]["dependencies"])
    assert not any(d.split("=")[0].split(">")[0].strip() in ("torch", "torchvision") for d in PYPROJECT["project"]["dependencies"]), \
        "torch comes with ComfyUI; a dependency on it may replace the user's CUDA build"


def test_tool_comfy_section_and_icon():
    comfy = PYPROJECT["tool"]["comfy"]
    assert comfy["PublisherId"] and re.match(r"^[a-z0-9][a-z0-9-]*$", comfy["PublisherId"])
    assert comfy["DisplayName"]
    for part in comfy.get("requires-comfyui", "").split(","):
        assert VERSION_PART_RE.match(part.strip()), comfy["requires-comfyui"]
    icon = urlparse(comfy["Icon"])
    assert icon.scheme == "https" and icon.netloc, comfy["Icon"]
    # the URL names a file of this repository, under the Repository's owner and name
    owner_repo = urlparse(PYPROJECT["project"]["urls"]["Repository"]).path.strip("/")
    assert icon.path.startswith(f"/{owner_repo}/"), (comfy["Icon"], owner_repo)
    local = REPO / icon.path.split("/", 4)[-1]
    assert local.is_file(), f"Icon points at {local.name}, which this repository does not have"
    from PIL import Image

    with Image.open(io.BytesIO(local.read_bytes())) as img:
        assert img.format in ICON_TYPES and img.size[0] <= 800 and img.size[1] <= 400, (img.format, img.size)


def test_comfyui_reads_the_pyproject(comfy_path):
    """ComfyUI v0.8.0 parses every custom node's pyproject.toml when loading it (comfy_config)."""
    sys.path.insert(0, str(comfy_path))
    try:
        from comfy_config import config_parser
    finally:
        sys.path.remove(str(comfy_path))
    config = config_parser.extract_node_configuration(str(REPO))
    assert config.project.name == PYPROJECT["project"]["name"]
    assert config.tool_comfy.icon == PYPROJECT["tool"]["comfy"]["Icon"]
    assert config.project.supported_os == ["OS Independent"]
    assert config.project.supported_comfyui_version == PYPROJECT["tool"]["comfy"]["requires-comfyui"]


def test_the_published_archive_is_the_node_pack_without_tools_or_tests():
    files = published_files()
    tops = {f.split("/")[0] for f in files}
    for needed in ("__init__.py", "nodes", "lcm_core", "lcm_comfy", "web", "workflows", "pyproject.toml", "requirements.txt",
                   "README.md", "icon.png"):
        assert needed in tops, f"{needed} would be missing from the published archive"
    for left_out in ("lcm_tools", "tests", "bench", "scripts", "docs", "screenshots", ".ci", "requirements-test.txt"):
        assert left_out not in tops, f"{left_out} would be published"
    assert not any(f.endswith(".png") and f != "icon.png" for f in files), [f for f in files if f.endswith(".png")]


def test_published_python_has_no_network_subprocess_or_eval():
    """What the Registry's scan flags: network and subprocess use, pip installs, eval/exec (ruff S102, S307, E702)."""
    py = [f for f in published_files() if f.endswith(".py")]
    assert any(f.startswith("nodes/") for f in py)
    hits = [f"{f}: {m.group(0).strip()}" for f in py for m in FORBIDDEN.finditer((REPO / f).read_text(encoding="utf-8"))]
    assert hits == []
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "-q", "--select", "S102,S307,E702", *py], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == "", r.stdout + r.stderr


@pytest.fixture(scope="module")
def comfy_path():
    from comfy_harness import find_comfyui

    path, why = find_comfyui()
    if path is None:
        pytest.skip(f"ComfyUI not found: {why}")
    return Path(path)
