"""The fused kernels' import name does not take PyPI's `kernels` (issue 24 item 10).

`kernels/` (sources and csrc) is installed as `ddrl_scale.kernels` (setup.py's package_dir), so an
installed ddrl-scale leaves the name `kernels` to PyPI's package, which transformers probes for and
imports to load hub kernels. These tests install nothing: they read setup.py's arguments, import
transformers' model classes in a fresh interpreter outside the checkout, and, with a stand-in
PyPI `kernels` (a module and its dist-info), check what `import kernels` gets.

Known gap (strict xfail below): with the checkout's root on sys.path (`python -m ...` or
`torchrun -m ddrl_scale.cli ...` started there, `python -m pytest`), the folder `kernels/` is found
first as the top-level `kernels`; if PyPI's `kernels` is installed too, transformers sees its
version, imports ours, and `from transformers import CLIPModel` fails. The folder's name is the
cause: moving it to `ddrl_scale/kernels/` (or renaming it) removes it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("transformers", reason="needs the 'diffusers' extra (transformers)")

# every name transformers' hub-kernel integration imports from PyPI's `kernels`, as stand-ins
FAKE_KERNELS = '''"""A stand-in for PyPI's `kernels` (the hub kernel loader), for tests."""
__version__ = "0.18.2"
FAKE_PYPI_KERNELS = True


def __getattr__(name):
    return lambda *args, **kwargs: (lambda value: value)
'''


def setup_arguments() -> dict:
    """The keyword arguments setup.py passes to setuptools.setup (nothing is built)."""
    script = ("import json, setuptools; captured = {}; setuptools.setup = captured.update; "
              "exec(open('setup.py').read()); print(json.dumps({key: captured[key] for key in "
              "('packages', 'package_dir')}))")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    import json

    return json.loads(done.stdout)


def fake_pypi_kernels(folder: Path) -> Path:
    (folder / "kernels").mkdir(parents=True)
    (folder / "kernels" / "__init__.py").write_text(FAKE_KERNELS)
    info = folder / "kernels-0.18.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 0.18.2\n")
    (info / "top_level.txt").write_text("kernels\n")
    (info / "RECORD").write_text("")
    return folder


def run_python(code: str, cwd: Path, extra_path: Path | None = None) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    if extra_path is not None:
        env["PYTHONPATH"] = str(extra_path)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_setup_installs_the_kernels_folder_only_as_ddrl_scale_kernels():
    arguments = setup_arguments()
    assert not [name for name in arguments["packages"] if name == "kernels" or name.startswith("kernels.")]
    assert "ddrl_scale.kernels" in arguments["packages"]
    assert arguments["package_dir"]["ddrl_scale.kernels"] == "kernels"


IMPORTS = """
import importlib.util, sys
import ddrl_scale.kernels as ours
assert ours.__file__.endswith("kernels/__init__.py"), ours.__file__
from transformers import CLIPModel, CLIPTextModel, T5EncoderModel, UMT5EncoderModel
import torch
loss = ours.flow_matching_loss(torch.zeros(1, 2, 2), torch.ones(1, 2, 2), torch.zeros(1, 2, 2),
                               torch.ones(1), backend="torch")
spec = importlib.util.find_spec("kernels")
print("kernels:", None if spec is None else spec.origin, "loss:", float(loss))
"""


def test_transformers_model_classes_import_with_the_project_installed(tmp_path):
    """Outside the checkout: the project's kernels come as ddrl_scale.kernels, transformers' model
    classes import, and there is no top-level `kernels` at all."""
    done = run_python(IMPORTS, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "kernels: None loss:" in done.stdout


def test_pypi_kernels_is_what_import_kernels_gets_outside_the_checkout(tmp_path):
    site = fake_pypi_kernels(tmp_path / "site")
    done = run_python(IMPORTS + "\nimport kernels\nassert kernels.FAKE_PYPI_KERNELS\n", tmp_path, site)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"kernels: {site / 'kernels' / '__init__.py'}" in done.stdout


@pytest.mark.xfail(strict=True, reason="issue 24 item 10: the checkout's top-level kernels/ folder shadows "
                                       "PyPI's kernels when the repo root is on sys.path; fixed by moving "
                                       "it to ddrl_scale/kernels/ (then drop this marker)")
def test_pypi_kernels_is_what_import_kernels_gets_from_the_checkout_root(tmp_path):
    site = fake_pypi_kernels(tmp_path / "site")
    done = run_python(IMPORTS + "\nimport kernels\nassert kernels.FAKE_PYPI_KERNELS\n", ROOT, site)
    assert done.returncode == 0, done.stderr[-3000:]
