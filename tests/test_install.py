"""The install's promises, checked offline: setup.py's extras, the Makefile's CPU pins and the README's
supported versions and GPU install agree (tests/test_gpu_static.py checks the same commands against
PyPI). Issue 16: a triton==3.9.0 pin made the GPU install unresolvable (the CUDA torch 2.13.0 requires
triton 3.7.1), and flash-attn in `all` made `all` uninstallable under build isolation.
"""

from __future__ import annotations

import os
import re
import runpy
import sys
from pathlib import Path
from unittest import mock

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_static  # noqa: E402


@pytest.fixture(scope="module")
def extras() -> dict[str, list[Requirement]]:
    """setup.py's extras_require, from running setup.py with setuptools.setup replaced."""
    cwd = os.getcwd()
    os.chdir(ROOT)  # setup.py reads README.md from the working directory, as pip runs it
    try:
        with mock.patch("setuptools.setup") as setup:
            runpy.run_path(str(ROOT / "setup.py"))
    finally:
        os.chdir(cwd)
    return {name: [Requirement(text) for text in reqs]
            for name, reqs in setup.call_args.kwargs["extras_require"].items()}


def makefile_pins() -> dict[str, str]:
    """The exact pins `make setup` installs before the package: PINS, and CPU_TRITON for a CPU torch."""
    makefile = (ROOT / "Makefile").read_text()
    pins = [re.search(rf"^{name} := (.*)$", makefile, re.MULTILINE).group(1)
            for name in ("PINS", "CPU_TRITON")]
    return dict(pin.split("==") for line in pins for pin in line.split())


def test_all_is_every_extra_but_flash_attn(extras):
    """flash-attn's sdist needs torch to build its metadata: `all` leaves it to its own step."""
    everything = {str(req) for name, reqs in extras.items() if name not in ("all", "flash") for req in reqs}
    assert {str(req) for req in extras["all"]} == everything
    assert [req.name for req in extras["flash"]] == ["flash-attn"]


def test_triton_extra_admits_the_cuda_torch_triton_and_the_cpu_pin(extras):
    (triton,) = extras["triton"]
    gpu, cpu = gpu_static.supported_versions()["triton"], makefile_pins()["triton"]
    assert gpu in triton.specifier, f"the CUDA torch's triton {gpu} is outside the extra's {triton}"
    assert cpu in triton.specifier, f"the CPU pin triton=={cpu} is outside the extra's {triton}"
    assert cpu == "3.9.0"  # the CPU setup is unchanged


def test_supported_versions_are_the_pins(extras):
    readme = gpu_static.supported_versions()
    assert readme["torch"] == gpu_static.setup_pin("torch") == makefile_pins()["torch"]
    pins = {req.name: str(req.specifier) for reqs in extras.values() for req in reqs}
    assert pins["deepspeed"] == f"=={readme['deepspeed']}"
    assert pins["megatron-core"] == f"=={readme['megatron-core']}"
    (flash,) = extras["flash"]
    assert readme["flash-attn"] in flash.specifier


def test_readme_gpu_install_is_all_then_flash_attn_without_isolation():
    main, flash = gpu_static.gpu_install_commands()
    assert gpu_static.install_args(main) == ["-e", ".[all]"]
    assert gpu_static.install_args(flash) == ["--no-build-isolation",
                                              f"flash-attn=={gpu_static.supported_versions()['flash-attn']}"]
    assert not gpu_static.builds_without_isolation(main) and gpu_static.builds_without_isolation(flash)


def test_gpu_static_checks_run_in_ci_and_not_in_make_test():
    makefile = (ROOT / "Makefile").read_text()
    test_target = makefile.split("\ntest: setup\n", 1)[1].split("\n\n", 1)[0]
    assert 'not gpu_static' in test_target
    assert "-m gpu_static" in makefile.split("\ntest-gpu-static: setup\n", 1)[1].split("\n\n", 1)[0]
    assert "make test-gpu-static" in (ROOT / ".ci" / "run").read_text()
