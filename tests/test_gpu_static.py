"""The GPU checks that need no GPU (README, "GPU install"), marker `gpu_static`: run by .ci/run and
`make test-gpu-static`, not by `make test`.

- pip's resolver on the README's GPU install commands, against PyPI (whose Linux torch is the CUDA build);
- every Triton kernel compiled ahead of time for sm_80 and sm_90 under the triton the CUDA torch requires;
- kernels/csrc compiled with PyPI's nvcc (the CUDA torch's CUDA) against the CUDA torch's own headers.

The logic lives in benchmarks/gpu_static.py; downloads are cached in .cache/gpu_static/. Skipped, with the
reason, off Linux x86_64 or when PyPI cannot be reached. Run with -s to see the register counts.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_static  # noqa: E402

pytestmark = pytest.mark.gpu_static


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def resolved(installs: list[dict]) -> dict[str, dict]:
    return {canonical(item["metadata"]["name"]): item for item in installs}


@pytest.fixture(scope="module")
def cuda_torch() -> dict:
    """PyPI's torch at setup.py's pin, as pip's report describes it."""
    problem = gpu_static.platform_problem() or gpu_static.index_problem()
    if problem:
        pytest.skip(problem)
    return gpu_static.cuda_torch(gpu_static.setup_pin("torch"))


def test_readme_gpu_install_resolves_with_the_cuda_torch(cuda_torch):
    """`pip install -e '.[all]'` as the README writes it resolves on PyPI to the CUDA torch and the
    triton it requires (a triton==3.9.0 pin in setup.py made this impossible), with the README's versions."""
    readme = gpu_static.supported_versions()
    commands = [command for command in gpu_static.gpu_install_commands()
                if not gpu_static.builds_without_isolation(command)]
    assert commands, "the README's GPU install has no command to resolve"
    packages = {}
    for command in commands:
        packages.update(resolved(gpu_static.dry_run(gpu_static.install_args(command), ignore_installed=True)))
    torch = packages["torch"]
    wheel = torch["download_info"]["url"].rsplit("/", 1)[-1]
    triton = packages["triton"]["metadata"]["version"]
    print(f"\nresolved {len(packages)} packages; torch: {wheel}, triton {triton}")
    assert torch["metadata"]["version"] == readme["torch"] == gpu_static.setup_pin("torch")
    assert "+" not in wheel and "manylinux" in wheel, f"torch resolved to {wheel}, not PyPI's CUDA wheel"
    assert torch["download_info"]["url"] == cuda_torch["download_info"]["url"]
    assert "cuda-toolkit" in packages and any(name.startswith("nvidia-") for name in packages)
    assert triton == gpu_static.required_triton(cuda_torch) == readme["triton"]
    assert gpu_static.required_cuda_toolkit(cuda_torch).startswith(readme["CUDA"] + ".")
    for name in ("deepspeed", "megatron-core"):
        assert packages[name]["metadata"]["version"] == readme[name], name
    assert "flash-attn" not in packages, "flash-attn cannot build under isolation: keep it out of `all`"


def test_readme_flash_attn_step_needs_torch_first(cuda_torch):
    """The README's flash-attn step resolves where torch is installed and build isolation is off, and
    (as the README says) fails under build isolation, where its setup.py cannot import torch."""
    (command,) = [command for command in gpu_static.gpu_install_commands()
                  if gpu_static.builds_without_isolation(command)]
    args = gpu_static.install_args(command)
    # torch is installed here, as after the README's first step (a CPU build: flash-attn's setup.py
    # cannot describe its CUDA extension with it, so that part of its metadata build is switched off)
    packages = resolved(gpu_static.dry_run(args, ignore_installed=False,
                                           env_extra=gpu_static.FLASH_METADATA_ENV))
    print(f"\n{command}: would install {sorted(packages)}")
    assert packages["flash-attn"]["metadata"]["version"] == gpu_static.supported_versions()["flash-attn"]
    assert "torch" not in packages, "the flash-attn step must keep the torch installed before it"
    isolated = [arg for arg in args if arg != "--no-build-isolation"]
    with pytest.raises(gpu_static.GpuStaticError, match="No module named 'torch'"):
        gpu_static.dry_run(["--no-deps", *isolated], ignore_installed=True)


def triton_kernel_names() -> set[str]:
    source = (ROOT / "kernels" / "triton_kernels.py").read_text()
    return {name for name in re.findall(r"@triton\.jit\s*\ndef (\w+)\(", source) if name.endswith("_kernel")}


def test_triton_kernels_compile_ahead_of_time_for_sm80_and_sm90(cuda_torch):
    """Every kernel, for each dtype combination the launchers pass, compiles to a cubin for sm_80 and
    sm_90 under the CUDA torch's triton, without a GPU or a CUDA driver, and none spills."""
    version = gpu_static.required_triton(cuda_torch)
    report = gpu_static.triton_aot(version)
    print("\n" + gpu_static.format_triton(report))
    assert report["triton"] == version and "/.cache/gpu_static/" in report["triton_file"]
    compiled = {(row["kernel"], row["arch"]) for row in report["kernels"]}
    assert compiled == {(name, f"sm_{arch}") for name in triton_kernel_names() for arch in gpu_static.ARCHES}
    for row in report["kernels"]:
        assert 0 < row["n_regs"] <= 255 and row["cubin_bytes"] > 0, row
        assert row["n_spills"] == 0, f"{row['kernel']} {row['variant']} spills on {row['arch']}: {row}"


def test_cuda_extension_compiles_with_nvcc_for_sm80_and_sm90(cuda_torch):
    """kernels/csrc compiles (-c) with the nvcc of the CUDA torch's CUDA against that torch's headers
    (which, unlike a CPU torch's, have c10/cuda's build macros that bindings.cpp needs)."""
    toolkit = gpu_static.required_cuda_toolkit(cuda_torch)
    headers = gpu_static.torch_headers(cuda_torch)
    assert (headers / "torch" / "include" / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists()
    report = gpu_static.nvcc_compile(toolkit, headers)
    print("\n" + gpu_static.format_nvcc(report))
    assert f"cuda_{'.'.join(toolkit.split('.')[:2])}" in report["nvcc"]
    targets = {(row["source"], row["arch"]) for row in report["compiles"]}
    cuda_sources = {str(path.relative_to(ROOT)) for path in gpu_static.extension_sources()
                    if path.suffix == ".cu"}
    assert {(source, f"sm_{arch}") for source in cuda_sources for arch in gpu_static.ARCHES} <= targets
    assert ("kernels/csrc/bindings.cpp", "host") in targets
    for row in report["compiles"]:
        assert row["object_bytes"] > 0
        if row["arch"] != "host":
            assert row["kernels"] and all(kernel["arch"] == row["arch"] for kernel in row["kernels"]), row
            assert not any(kernel["spill_store_bytes"] for kernel in row["kernels"]), row
