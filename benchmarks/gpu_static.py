"""GPU checks that need no GPU: the GPU install resolves, the Triton kernels and the CUDA extension compile.

Where it sits: the README's "GPU install" section -> pip's resolver against PyPI (which serves the CUDA
build of torch for Linux) -> the versions that CUDA torch requires (triton, the CUDA toolkit) -> those
installed with `pip install --target` into .cache/gpu_static/ -> every Triton kernel compiled ahead of
time for sm_80/sm_90 (triton.compile with a GPUTarget; no CUDA driver is needed until a launch), and
kernels/csrc compiled with nvcc against the CUDA torch's headers (read out of its wheel by HTTP range
requests, each file checked against the wheel's RECORD). tests/test_gpu_static.py runs these checks
(pytest marker `gpu_static`); `python benchmarks/gpu_static.py [resolve|triton|nvcc|all]` prints them.

Every download is cached under .cache/gpu_static/ (or $DDRL_GPU_STATIC_CACHE), keyed by version, so a
rerun only repeats the resolver and the compiles.
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
GPU_INSTALL_HEADING = "## GPU install"
CACHE = Path(os.environ.get("DDRL_GPU_STATIC_CACHE") or ROOT / ".cache" / "gpu_static")
INDEX = "https://pypi.org/simple"
ARCHES = (80, 90)
# the extras of PyPI's cuda-toolkit that compile a torch extension: nvcc (with cicc/ptxas), the
# runtime headers, CCCL (cub, thrust, libcu++) and the crt headers nvcc's host code includes
CUDA_TOOLKIT_EXTRAS = "nvcc,cudart,cccl,crt"
TRITON_KERNEL_MODULE = "ddrl_scale.kernels.triton_kernels"
# what flash-attn's setup.py reads to leave its CUDA extension out of the metadata build; needed here
# only because this machine's torch is a CPU build, with which that extension cannot be described
FLASH_METADATA_ENV = {"FLASH_ATTENTION_SKIP_CUDA_BUILD": "TRUE"}


class GpuStaticError(RuntimeError):
    """A static GPU check could not run or found a problem; the message says which and why."""


# -- the package index ----------------------------------------------------------------------------------

def index_problem(timeout_s: float = 15.0) -> str | None:
    """None when PyPI answers, else why not (for a skip reason)."""
    url = f"{INDEX}/torch/"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout_s):
            return None
    except (urllib.error.URLError, TimeoutError, OSError) as error:
        return f"the package index {INDEX} cannot be reached ({type(error).__name__}: {error})"


def platform_problem() -> str | None:
    """None on Linux x86_64, where PyPI's torch wheel is the CUDA build these checks are about."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return f"the GPU install is checked for Linux x86_64; this is {sys.platform} {platform.machine()}"
    return None


def pip_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for pip: PyPI only, whatever this machine's pip configuration adds.

    A local mirror or a find-links folder (a CPU torch wheel, say) would answer in place of PyPI and
    check the wrong thing, so configuration files and PIP_* settings are dropped, except the CA bundle.
    """
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("PIP_") or key in ("PIP_CERT", "PIP_DEFAULT_TIMEOUT")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", **(extra or {}))
    return env


def run_pip(args: list[str], env_extra: dict[str, str] | None = None, cwd: Path = ROOT) -> None:
    command = [sys.executable, "-m", "pip", *args, "--index-url", INDEX, "--cache-dir", str(CACHE / "pip")]
    done = subprocess.run(command, cwd=cwd, env=pip_environment(env_extra), capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-40:])
        raise GpuStaticError(f"`{shlex.join(command)}` failed (exit {done.returncode}):\n{tail}")


def dry_run(install_args: list[str], ignore_installed: bool,
            env_extra: dict[str, str] | None = None) -> list[dict]:
    """pip's resolver on `pip install ARGS` against PyPI, installing nothing: the report's `install` list."""
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "report.json"
        flags = ["--dry-run", "--quiet", "--report", str(report)]
        run_pip(["install", *flags, *(["--ignore-installed"] if ignore_installed else []), *install_args],
                env_extra)
        return json.loads(report.read_text())["install"]


# -- the README's GPU install -----------------------------------------------------------------------------

def readme_section(heading: str = GPU_INSTALL_HEADING, readme: Path = README) -> str:
    text = readme.read_text(encoding="utf-8")
    if f"\n{heading}\n" not in text:
        raise GpuStaticError(f"{readme} has no '{heading}' section")
    return text.split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]


def gpu_install_commands(readme: Path = README) -> list[str]:
    """The `pip install` lines of the README's GPU install code block, in order."""
    commands = [line.strip() for line in readme_section(readme=readme).splitlines()
                if line.startswith("    ") and line.strip().startswith("pip install ")]
    if not commands:
        raise GpuStaticError(f"the '{GPU_INSTALL_HEADING}' section of {readme} has no indented "
                             "`pip install` line")
    return commands


def supported_versions(readme: Path = README) -> dict[str, str]:
    """{component: version} from the README's supported-versions table."""
    versions = {}
    for row in readme_section(readme=readme).splitlines():
        cells = [cell.strip() for cell in row.split("|")[1:-1]]
        if len(cells) == 3 and cells[0] not in ("component", "---") and re.match(r"^[\d.]+\w*$", cells[1]):
            versions[cells[0]] = cells[1]
    return versions


def install_args(command: str) -> list[str]:
    words = shlex.split(command)
    if words[:2] != ["pip", "install"]:
        raise GpuStaticError(f"expected a `pip install` command, got {command!r}")
    return words[2:]


def builds_without_isolation(command: str) -> bool:
    """The step that installs into an environment that already has torch (flash-attn's)."""
    return "--no-build-isolation" in install_args(command)


# -- the CUDA torch and what it requires ---------------------------------------------------------------

def setup_pin(name: str) -> str:
    """The exact version setup.py pins for `name` (torch)."""
    match = re.search(rf'"{re.escape(name)}==([^"]+)"', (ROOT / "setup.py").read_text())
    if match is None:
        raise GpuStaticError(f"setup.py pins no exact {name} version ('{name}==...')")
    return match.group(1)


def cuda_torch(version: str) -> dict:
    """PyPI's Linux x86_64 torch `version` as pip's report describes it (metadata, download URL).

    Resolved once per version (--no-deps: the wheel's metadata only, served on its own by PyPI) and
    cached as JSON.
    """
    python = f"cp{sys.version_info.major}{sys.version_info.minor}"
    cached = CACHE / f"torch-{version}-{platform.machine()}-{python}.json"
    if cached.exists():
        return json.loads(cached.read_text())
    (entry,) = dry_run(["--no-deps", "--only-binary", ":all:", f"torch=={version}"], ignore_installed=True)
    filename = entry["download_info"]["url"].rsplit("/", 1)[-1]
    if entry["metadata"]["version"] != version or "+" in filename:
        raise GpuStaticError(f"PyPI's torch=={version} resolved to {filename}, not the plain CUDA wheel")
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(entry, indent=1))
    return entry


def linux_requirements(entry: dict) -> dict:
    """torch's requirements that apply on this Linux machine, by name (no extras)."""
    from packaging.requirements import Requirement  # here: `install-commands` runs on a bare Python

    environment = {"platform_system": "Linux", "sys_platform": "linux", "extra": ""}
    requirements = {}
    for text in entry["metadata"].get("requires_dist", []):
        requirement = Requirement(text)
        if requirement.marker is None or requirement.marker.evaluate(environment):
            requirements[requirement.name.lower()] = requirement
    return requirements


def exact_pin(requirement) -> str:
    pins = [spec.version for spec in requirement.specifier if spec.operator == "=="]
    if len(pins) != 1:
        raise GpuStaticError(f"expected an exact pin in torch's requirement '{requirement}'")
    return pins[0]


def required_triton(entry: dict) -> str:
    """The triton version the CUDA torch requires on Linux."""
    requirement = linux_requirements(entry).get("triton")
    if requirement is None:
        raise GpuStaticError(f"torch {entry['metadata']['version']} requires no triton on Linux")
    return exact_pin(requirement)


def required_cuda_toolkit(entry: dict) -> str:
    """The cuda-toolkit version (e.g. 13.0.3) the CUDA torch's CUDA libraries come from."""
    requirement = linux_requirements(entry).get("cuda-toolkit")
    if requirement is None:
        names = sorted(name for name in linux_requirements(entry) if "cuda" in name or "nvidia" in name)
        raise GpuStaticError("this check finds torch's CUDA version through its 'cuda-toolkit==...' "
                             f"requirement (CUDA 13 wheels); torch {entry['metadata']['version']} "
                             f"lists {names}")
    return exact_pin(requirement)


# -- installs into the cache ---------------------------------------------------------------------------

def cached_target(name: str, requirements: list[str], no_deps: bool) -> Path:
    """`pip install --target .cache/gpu_static/NAME REQUIREMENTS`, once (a marker file says it finished)."""
    folder = CACHE / name
    marker = folder / ".complete"
    if marker.exists() and marker.read_text() == "\n".join(requirements):
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    run_pip(["install", "--quiet", "--only-binary", ":all:", "--target", str(folder),
             *(["--no-deps"] if no_deps else []), *requirements])
    marker.write_text("\n".join(requirements))
    return folder


def triton_install(version: str) -> Path:
    return cached_target(f"triton-{version}", [f"triton=={version}"], no_deps=True)


def cuda_home(toolkit_version: str) -> Path:
    """A CUDA_HOME-shaped folder (bin/nvcc, include/) from PyPI's CUDA toolkit wheels."""
    folder = cached_target(f"cuda-toolkit-{toolkit_version}",
                           [f"cuda-toolkit[{CUDA_TOOLKIT_EXTRAS}]=={toolkit_version}"], no_deps=False)
    homes = sorted(path.parent.parent for path in (folder / "nvidia").glob("cu*/bin/nvcc"))
    if len(homes) != 1:
        raise GpuStaticError(f"expected one nvidia/cu*/bin/nvcc under {folder}, found {homes}")
    return homes[0]


# -- the CUDA torch's headers, out of its wheel ---------------------------------------------------------

class RemoteFile(io.RawIOBase):
    """A read-only, seekable file on an HTTP server that honours Range requests.

    One window of bytes can be fetched ahead (`prefetch`), so that many small reads inside it, such as
    a zip's members, cost one request.
    """

    def __init__(self, url: str, timeout_s: float = 120.0) -> None:
        super().__init__()
        self.url, self.timeout_s, self.position, self.fetched = url, timeout_s, 0, 0
        self.window_start, self.window = 0, b""
        probe = self._request(0, 1, whole=False)
        self.size = int(probe.headers["Content-Range"].rsplit("/", 1)[1])

    def _request(self, start: int, stop: int, whole: bool = True):
        request = urllib.request.Request(self.url, headers={"Range": f"bytes={start}-{stop - 1}"})
        response = urllib.request.urlopen(request, timeout=self.timeout_s)
        if response.status != 206:
            raise GpuStaticError(f"{self.url} ignores Range requests (HTTP {response.status})")
        if not whole:
            response.read()
        return response

    def _get(self, start: int, stop: int) -> bytes:
        with self._request(start, stop) as response:
            data = response.read()
        if len(data) != stop - start:
            raise GpuStaticError(f"{self.url}: asked for {stop - start} bytes at {start}, got {len(data)}")
        self.fetched += len(data)
        return data

    def prefetch(self, start: int, stop: int) -> None:
        self.window_start, self.window = start, self._get(start, min(stop, self.size))

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = base + offset
        return self.position

    def readinto(self, buffer) -> int:
        count = min(len(buffer), self.size - self.position)
        if count <= 0:
            return 0
        start = self.position - self.window_start
        if 0 <= start and start + count <= len(self.window):
            data = self.window[start:start + count]
        else:
            data = self._get(self.position, self.position + count)
        buffer[:count] = data
        self.position += count
        return count


def _record_hashes(wheel: zipfile.ZipFile) -> dict[str, str]:
    (record,) = [name for name in wheel.namelist() if re.fullmatch(r"[^/]+\.dist-info/RECORD", name)]
    rows = csv.reader(io.StringIO(wheel.read(record).decode()))
    return {row[0]: row[1] for row in rows if len(row) >= 2 and row[1].startswith("sha256=")}


def _sha256_field(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def torch_headers(entry: dict) -> Path:
    """A folder holding torch/include of the CUDA torch wheel (`entry`), extracted once.

    Only the zip's directory, its RECORD and the byte range of torch/include/ are fetched (about 11 MB
    of a ~500 MB wheel); every header is checked against the sha256 the wheel's RECORD lists.
    """
    version = entry["metadata"]["version"]
    folder = CACHE / f"torch-{version}-cuda-headers"
    marker = folder / ".complete"
    if marker.exists():
        return folder
    url = entry["download_info"]["url"]
    remote = RemoteFile(url)
    wheel = zipfile.ZipFile(remote)
    members = [info for info in wheel.infolist()
               if info.filename.startswith("torch/include/") and not info.is_dir()]
    if not members or any(".." in Path(info.filename).parts for info in members):
        raise GpuStaticError(f"{url}: no usable torch/include/ in the wheel")
    hashes = _record_hashes(wheel)
    last = max(members, key=lambda info: info.header_offset)
    # a member's local header is 30 bytes + its name + an extra field (a few dozen bytes at most)
    remote.prefetch(min(info.header_offset for info in members),
                    last.header_offset + 30 + len(last.filename.encode()) + 1024 + last.compress_size)
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    for info in members:
        data = wheel.read(info)  # zipfile checks each member's CRC
        if hashes.get(info.filename) != _sha256_field(data):
            raise GpuStaticError(f"{url}: {info.filename} does not match the sha256 in the wheel's RECORD")
        target = staging / info.filename
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    (staging / ".complete").write_text(f"{url}\n{len(members)} headers, {remote.fetched} bytes fetched\n")
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return folder


# -- Triton: ahead-of-time compiles for sm_80 / sm_90 -----------------------------------------------------

def _triton_variants() -> list[tuple[str, str, dict[str, str], dict[str, object]]]:
    """(kernel, variant, signature, constexprs) for every kernel and the dtypes the launchers pass.

    Storage (v, data): fp32/fp32, bf16/bf16, bf16 v on fp32 data (autocast output on fp32 latents),
    fp64/fp64; the accumulators and per-sample vectors are fp32 (fp64 with fp64 inputs), as in
    kernels/ops.py. Pointers are 16-byte aligned, as torch's allocations are.
    """
    variants = []
    for v, data in (("fp32", "fp32"), ("bf16", "bf16"), ("bf16", "fp32"), ("fp64", "fp64")):
        acc = "fp64" if v == "fp64" else "fp32"
        name = v if v == data else f"{v}-on-{data}"
        base = {"BLOCK": 4096, "FP64": acc == "fp64"}
        ints = {"n_per_sample": "i32"}
        variants.append(("_flow_matching_sq_sum_kernel", name, {
            "v_ptr": f"*{v}", "x0_ptr": f"*{data}", "noise_ptr": f"*{data}", "partial_ptr": f"*{acc}",
            **ints, "blocks_per_sample": "i32"}, base))
        variants.append(("_flow_matching_grad_kernel", name, {
            "grad_sum_ptr": f"*{acc}", "v_ptr": f"*{v}", "x0_ptr": f"*{data}", "noise_ptr": f"*{data}",
            "out_ptr": f"*{v}", **ints}, base))
        for write_mean in (True, False):
            variants.append(("_sde_sq_sum_kernel", f"{name}{'-mean' if write_mean else ''}", {
                "v_ptr": f"*{v}", "x_ptr": f"*{data}", "prev_ptr": f"*{data}", "coef_x_ptr": f"*{acc}",
                "coef_v_ptr": f"*{acc}", "partial_ptr": f"*{acc}", "mean_ptr": f"*{acc}", **ints,
                "blocks_per_sample": "i32"}, {**base, "WRITE_MEAN": write_mean}))
        for has_grad_mean in (True, False):
            variants.append(("_sde_grad_kernel", f"{name}{'-grad_mean' if has_grad_mean else ''}", {
                "grad_sum_ptr": f"*{acc}", "grad_mean_ptr": f"*{acc if has_grad_mean else v}",
                "v_ptr": f"*{v}", "x_ptr": f"*{data}", "prev_ptr": f"*{data}", "coef_x_ptr": f"*{acc}",
                "coef_v_ptr": f"*{acc}", "out_ptr": f"*{v}", **ints},
                {**base, "HAS_GRAD_MEAN": has_grad_mean}))
    return variants


def _resource_usage(cuobjdump: Path, cubin: bytes) -> dict[str, int]:
    """Registers and local memory of a cubin's one function (what the driver reports at load)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        text = subprocess.run([str(cuobjdump), "-res-usage", file.name], check=True, capture_output=True,
                              text=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if match is None:
        raise GpuStaticError(f"cuobjdump -res-usage printed no resource line:\n{text}")
    regs, stack, shared, local = (int(group) for group in match.groups())
    return {"n_regs": regs, "stack_bytes": stack, "shared_bytes": shared, "local_bytes": local}


def _triton_worker(expect_version: str, out: Path) -> None:
    """Runs in a subprocess whose sys.path starts with the cached triton: compiles and reports."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if triton.__version__ != expect_version:
        raise GpuStaticError(f"imported triton {triton.__version__} from {triton.__file__}, "
                             f"expected {expect_version}")
    import importlib

    kernels = importlib.import_module(TRITON_KERNEL_MODULE)
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    results = []
    for kernel_name, variant, signature, constexprs in _triton_variants():
        fn = getattr(kernels, kernel_name)
        if sorted(fn.arg_names) != sorted([*signature, *constexprs]):
            raise GpuStaticError(f"{kernel_name} takes {fn.arg_names}; the check describes "
                                 f"{[*signature, *constexprs]}: update _triton_variants")
        full_signature = {name: signature.get(name, "constexpr") for name in fn.arg_names}
        aligned = {(index,): [["tt.divisibility", 16]]
                   for index, name in enumerate(fn.arg_names) if full_signature[name].startswith("*")}
        for arch in ARCHES:
            start = time.perf_counter()
            compiled = triton.compile(ASTSource(fn, full_signature, constexprs=constexprs, attrs=aligned),
                                      target=GPUTarget("cuda", arch, 32),
                                      options={"num_warps": kernels.NUM_WARPS})
            usage = _resource_usage(cuobjdump, compiled.asm["cubin"])
            # triton's loader reports n_spills as CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES / 4
            results.append({"kernel": kernel_name, "variant": variant, "arch": f"sm_{arch}", **usage,
                            "n_spills": usage["local_bytes"] // 4,
                            "num_warps": compiled.metadata.num_warps,
                            "shared": compiled.metadata.shared, "cubin_bytes": len(compiled.asm["cubin"]),
                            "seconds": round(time.perf_counter() - start, 3)})
    out.write_text(json.dumps({"triton": triton.__version__, "triton_file": triton.__file__,
                               "kernels": results}, indent=1))


def triton_aot(triton_version: str) -> dict:
    """Every Triton kernel compiled for ARCHES under triton `triton_version` (cached), in a subprocess.

    The subprocess finds the cached triton first on its path, so the project's own triton (the CPU
    setup's) stays out of it; no CUDA driver is loaded (libcuda is needed only to launch).
    """
    triton_dir = triton_install(triton_version)
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "triton.json"
        env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
        path = [str(triton_dir), *filter(None, [env.get("PYTHONPATH")])]
        env.update(PYTHONPATH=os.pathsep.join(path), TRITON_CACHE_DIR=str(Path(scratch) / "triton-cache"),
                   CUDA_VISIBLE_DEVICES="")
        done = subprocess.run([sys.executable, __file__, "triton-worker", "--expect-version", triton_version,
                               "--out", str(out)], env=env, capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            raise GpuStaticError(f"the ahead-of-time Triton compile under triton {triton_version} failed:\n"
                                 + "\n".join((done.stdout + done.stderr).strip().splitlines()[-30:]))
        return json.loads(out.read_text())


# -- the CUDA extension: nvcc -c for sm_80 / sm_90 --------------------------------------------------------

CSRC = ROOT / "kernels" / "csrc"
EXTENSION_NAME = "ddrl_diffusion_losses"  # kernels/cuda_extension.py


def extension_sources() -> list[Path]:
    sources = sorted([*CSRC.glob("*.cu"), *CSRC.glob("*.cpp")])
    if not sources:
        raise GpuStaticError(f"no .cu or .cpp sources in {CSRC}")
    return sources


def nvcc_command(nvcc: Path, source: Path, output: Path, includes: list[Path], arch: int | None) -> list[str]:
    """The compile torch.utils.cpp_extension.load runs for `source` (compile only, no link).

    The flags follow torch 2.13's cpp_extension: C++20, its extension defines and COMMON_NVCC_FLAGS;
    .cpp files pass through nvcc to the host compiler, as torch passes them to c++.
    """
    defines = [f"-DTORCH_EXTENSION_NAME={EXTENSION_NAME}", "-DTORCH_API_INCLUDE_EXTENSION_H",
               "-D_GLIBCXX_USE_CXX11_ABI=1"]
    command = [str(nvcc), "-c", str(source), "-o", str(output), *defines,
               *(flag for path in includes for flag in ("-isystem", str(path))), "-std=c++20", "-O3",
               "--compiler-options=-fPIC"]
    if source.suffix == ".cu":
        command += ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
                    "--expt-relaxed-constexpr", f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas=-v"]
    return command


def _ptxas_usage(log: str) -> list[dict]:
    """Registers and spills per kernel from `ptxas -v` (nvcc -Xptxas=-v) output."""
    usage, current = [], None
    for line in log.splitlines():
        entry = re.search(r"Compiling entry function '([^']+)' for '(sm_\w+)'", line)
        if entry:
            current = {"function": entry.group(1), "arch": entry.group(2)}
            usage.append(current)
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if spills and current is not None:
            current.update(spill_store_bytes=int(spills.group(1)), spill_load_bytes=int(spills.group(2)))
        registers = re.search(r"Used (\d+) registers", line)
        if registers and current is not None:
            current["n_regs"] = int(registers.group(1))
    return usage


def _demangled(names: list[str]) -> dict[str, str]:
    """Itanium-mangled kernel names -> readable ones, where binutils' c++filt is installed."""
    cxxfilt = shutil.which("c++filt")
    if not names or cxxfilt is None:
        return {}
    done = subprocess.run([cxxfilt, *names], capture_output=True, text=True)
    return dict(zip(names, done.stdout.splitlines(), strict=False)) if done.returncode == 0 else {}


def _nvcc_one(nvcc: Path, source: Path, arch: int | None, includes: list[Path], scratch: Path) -> dict:
    output = scratch / f"{source.name}.{arch or 'host'}.o"
    command = nvcc_command(nvcc, source, output, includes, arch)
    start = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - start
    target = f"sm_{arch}" if arch else "host"
    if done.returncode != 0 or not output.exists():
        raise GpuStaticError(f"nvcc failed on {source.relative_to(ROOT)} for {target} (exit "
                             f"{done.returncode}):\n{shlex.join(command)}\n"
                             + "\n".join(done.stdout.strip().splitlines()[-40:]))
    kernels = _ptxas_usage(done.stdout)
    names = _demangled([kernel["function"] for kernel in kernels])
    for kernel in kernels:
        kernel["function"] = names.get(kernel["function"], kernel["function"])
    return {"source": str(source.relative_to(ROOT)), "arch": target, "object_bytes": output.stat().st_size,
            "seconds": round(seconds, 1), "kernels": kernels}


def nvcc_compile(toolkit_version: str, headers: Path) -> dict:
    """Compile every source of kernels/csrc with PyPI's nvcc (`toolkit_version`) for each of ARCHES."""
    home = cuda_home(toolkit_version)
    nvcc = home / "bin" / "nvcc"
    python_include = Path(sysconfig.get_paths()["include"])
    if not (python_include / "Python.h").exists():
        raise GpuStaticError(f"torch/extension.h includes Python.h, which is not in {python_include} "
                             "(install this Python's development headers)")
    torch_include = headers / "torch" / "include"
    includes = [torch_include, torch_include / "torch" / "csrc" / "api" / "include", home / "include",
                python_include]
    version = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, check=True).stdout
    jobs = [(source, arch) for source in extension_sources()
            for arch in (ARCHES if source.suffix == ".cu" else (None,))]
    with tempfile.TemporaryDirectory() as scratch, ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        results = list(pool.map(lambda job: _nvcc_one(nvcc, *job, includes, Path(scratch)), jobs))
    return {"nvcc": version.strip().splitlines()[-1], "cuda_home": str(home), "torch_headers": str(headers),
            "compiles": results}


# -- printing ---------------------------------------------------------------------------------------------

def format_triton(report: dict) -> str:
    lines = [f"Triton {report['triton']} ahead-of-time compiles (registers per thread, spills = local "
             "bytes / 4 as triton reports them):",
             f"  {'kernel':30} {'variant':22} {'arch':6} {'n_regs':>6} {'n_spills':>8} {'shared':>6}"]
    for row in report["kernels"]:
        lines.append(f"  {row['kernel']:30} {row['variant']:22} {row['arch']:6} {row['n_regs']:>6} "
                     f"{row['n_spills']:>8} {row['shared']:>6}")
    return "\n".join(lines)


def format_nvcc(report: dict) -> str:
    lines = [f"nvcc ({report['nvcc']}) -c against the CUDA torch's headers:"]
    for row in report["compiles"]:
        kernels = row["kernels"]
        summary = ""
        if kernels:
            spilling = [kernel for kernel in kernels
                        if kernel.get("spill_store_bytes") or kernel.get("spill_load_bytes")]
            summary = (f"; {len(kernels)} kernels, {min(k['n_regs'] for k in kernels)}-"
                       f"{max(k['n_regs'] for k in kernels)} registers, {len(spilling)} spilling"
                       + "".join(f"\n    spills: {k['function']}: {k['spill_store_bytes']} B stores, "
                                 f"{k['spill_load_bytes']} B loads" for k in spilling))
        lines.append(f"  {row['source']} {row['arch']}: ok, {row['object_bytes']} bytes, "
                     f"{row['seconds']} s{summary}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("check", choices=["resolve", "triton", "nvcc", "all", "install-commands",
                                          "triton-worker"])
    parser.add_argument("--expect-version", default="")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.check == "triton-worker":
        _triton_worker(args.expect_version, args.out)
        return 0
    if args.check == "install-commands":
        print("\n".join(gpu_install_commands()))
        return 0
    problem = platform_problem() or index_problem()
    if problem:
        print(f"skipped: {problem}")
        return 0
    entry = cuda_torch(setup_pin("torch"))
    print(f"PyPI's torch {entry['metadata']['version']}: {entry['download_info']['url'].rsplit('/', 1)[-1]}; "
          f"requires triton {required_triton(entry)}, cuda-toolkit {required_cuda_toolkit(entry)}")
    if args.check in ("resolve", "all"):
        for command in gpu_install_commands():
            isolated = not builds_without_isolation(command)
            installs = dry_run(install_args(command), ignore_installed=isolated,
                               env_extra=None if isolated else FLASH_METADATA_ENV)
            names = [f"{item['metadata']['name']}=={item['metadata']['version']}" for item in installs]
            print(f"{command}: would install {len(names)} packages: {', '.join(names[:12])}"
                  + (" ..." if len(names) > 12 else ""))
    if args.check in ("triton", "all"):
        print(format_triton(triton_aot(required_triton(entry))))
    if args.check in ("nvcc", "all"):
        print(format_nvcc(nvcc_compile(required_cuda_toolkit(entry), torch_headers(entry))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
