"""Planted checkpoints: a checkpoint file that would run code when opened is refused, by name, on
resume and on export, and the code never runs; legitimate checkpoints still resume and export.

Each payload is an object whose __reduce__ makes the unpickler call `open(marker, "w")`: if any
reader unpickled it, the marker file would exist. Planted: the DCP `.metadata` pickle, a `.distcp`
byte item (the optimizer's param-group values), every `.pt` a run writes (RNG, trainer state,
schedule, DeepSpeed EMA) and the DeepSpeed layout's own files. Bitwise resume of legitimate
checkpoints of every engine is covered by test_trainer.py (none), test_distributed.py (fsdp2 and
DeepSpeed kill-and-resume, resharding, Megatron runs read back) through the same readers; here a
legitimate checkpoint is resumed after each refusal test's copy is restored.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import _TINY

from ddrl_scale.config import load_config
from ddrl_scale.storage.safe_load import CheckpointRefusedError
from ddrl_scale.train.anchor_data import demo_shards
from ddrl_scale.train.checkpoint import read_weights
from ddrl_scale.train.export import export_checkpoint
from ddrl_scale.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
STEP = "step_000001"


class Payload:
    """Unpickling this calls open(marker, "w"): the marker file is the proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _overrides(run_dir: Path, shards: Path, *extra: str) -> list[str]:
    return [*_TINY, "train.eval_prompts=0", "train.save_every=1", "train.keep_last=10",
            f"data.generated_dir={shards}", f"run.output_dir={run_dir}", *extra]


@pytest.fixture(scope="module")
def legit(tmp_path_factory, shared_shards_dir) -> tuple[Path, Trainer]:
    """A 1-step run of engine none: its checkpoint, and the trainer (for its state dict layout)."""
    run_dir = tmp_path_factory.mktemp("safety") / "run"
    trainer = Trainer(load_config(None, _overrides(run_dir, shared_shards_dir, "train.steps=1")))
    trainer.train()
    return run_dir, trainer


def _copy(legit_dir: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "planted"
    shutil.copytree(legit_dir, run_dir)
    return run_dir


def _resume(run_dir: Path, shards: Path) -> Trainer:
    trainer = Trainer(load_config(None, _overrides(run_dir, shards, "train.steps=2")))
    trainer.maybe_resume()
    return trainer


def _plant_metadata(engine_dir: Path, marker: Path) -> Path:
    path = engine_dir / ".metadata"
    with path.open("rb") as handle:
        metadata = pickle.load(handle)  # the test's own, legitimate file
    metadata.storage_meta.modules = [Payload(marker)]
    with path.open("wb") as handle:
        pickle.dump(metadata, handle)
    return path


def _plant_byte_item(engine_dir: Path, trainer: Trainer, marker: Path) -> Path:
    """Rewrite the engine state with a payload as one optimizer param-group value (a DCP byte item)."""
    state = trainer.engine._state()
    state["optimizer"]["param_groups"][0]["initial_lr"] = Payload(marker)
    shutil.rmtree(engine_dir)
    dcp.save(state, checkpoint_id=engine_dir, no_dist=True)
    return engine_dir / "__0_0.distcp"


def _plant_pt(path: Path, marker: Path) -> Path:
    torch.save({"legitimate": torch.zeros(2), "payload": Payload(marker)}, path)
    return path


@pytest.mark.parametrize("where", ["metadata", "byte_item", "rng_rank0.pt", "trainer_state.pt",
                                   "engine_schedule.pt"])
def test_planted_checkpoint_is_refused_by_resume_and_export(legit, tmp_path, shared_shards_dir, where):
    """Resume refuses the planted file naming it; export refuses it too where export reads it;
    the marker never appears."""
    legit_dir, trainer = legit
    run_dir, marker = _copy(legit_dir, tmp_path), tmp_path / "marker"
    checkpoint = run_dir / "checkpoints" / STEP
    if where == "metadata":
        planted = _plant_metadata(checkpoint / "engine", marker)
    elif where == "byte_item":
        planted = _plant_byte_item(checkpoint / "engine", trainer, marker)
    else:
        planted = _plant_pt(checkpoint / where, marker)
    with pytest.raises(CheckpointRefusedError, match=str(planted).replace(".", r"\.")):
        _resume(run_dir, shared_shards_dir)
    assert not marker.exists()
    exported = tmp_path / "out.safetensors"
    if where in ("metadata", "trainer_state.pt"):  # what export reads
        with pytest.raises(CheckpointRefusedError, match=str(planted).replace(".", r"\.")):
            export_checkpoint(run_dir, exported)
    else:  # export reads the model tensors only: the planted item is never unpickled
        export_checkpoint(run_dir, exported)
    assert not marker.exists()


def test_legitimate_checkpoint_resumes_and_exports(legit, tmp_path, shared_shards_dir):
    """The safe readers take a real checkpoint: resume restores its weights bitwise, export works."""
    legit_dir, _ = legit
    run_dir = _copy(legit_dir, tmp_path)
    trainer = _resume(run_dir, shared_shards_dir)
    assert trainer.step == 1
    stored = read_weights(run_dir / "checkpoints" / STEP)
    for name, tensor in trainer.engine.model.state_dict().items():
        assert torch.equal(tensor, stored[name]), name
    export_checkpoint(run_dir, tmp_path / "out.safetensors", ema=True)


def test_refusal_through_the_cli_names_the_file(legit, tmp_path):
    """`ddrl ckpt export` on a planted checkpoint: exit 2, the file named, no traceback."""
    legit_dir, _ = legit
    run_dir, marker = _copy(legit_dir, tmp_path), tmp_path / "marker"
    planted = _plant_metadata(run_dir / "checkpoints" / STEP / "engine", marker)
    done = subprocess.run([sys.executable, "-m", "ddrl_scale.cli", "ckpt", "export", str(run_dir),
                           "--out", str(tmp_path / "out.safetensors")], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert str(planted) in done.stderr and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert not marker.exists()


# -- DeepSpeed ------------------------------------------------------------------------------------
deepspeed_missing = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                       reason="deepspeed is not installed")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE",
                                                          "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _torchrun(overrides: list[str], log: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
               "--nproc_per_node=2", "-m", "ddrl_scale.cli", "demo", *overrides]
    done = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    log.write_text(done.stdout + done.stderr)
    return done


DEEPSPEED = ["parallel.engine=deepspeed", "parallel.zero_stage=2"]


@pytest.fixture(scope="module")
def deepspeed_run(tmp_path_factory, shared_shards_dir) -> Path:
    """A 1-step 2-rank DeepSpeed ZeRO-2 run (its layout: deepspeed/checkpoint/*.pt + ema_rank*.pt)."""
    run_dir = tmp_path_factory.mktemp("ds") / "run"
    overrides = _overrides(run_dir, shared_shards_dir, "train.steps=1", *DEEPSPEED)
    demo_shards(load_config(None, overrides))  # written once, before two ranks could race
    done = _torchrun(overrides, run_dir.parent / "first.log")
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return run_dir


@deepspeed_missing
@pytest.mark.parametrize("where", ["deepspeed/checkpoint/mp_rank_00_model_states.pt",
                                   "deepspeed/checkpoint/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                   "ema_rank0.pt"])
def test_planted_deepspeed_file_is_refused_by_export(deepspeed_run, tmp_path, where):
    """zero_to_fp32 (and the EMA reader) under weights_only: a planted file is refused by name."""
    read_weights(deepspeed_run / "checkpoints" / STEP)  # the legitimate layout consolidates
    run_dir, marker = _copy(deepspeed_run, tmp_path), tmp_path / "marker"
    planted = _plant_pt(run_dir / "checkpoints" / STEP / where, marker)
    with pytest.raises(CheckpointRefusedError, match=str(planted).replace(".", r"\.")):
        export_checkpoint(run_dir, tmp_path / "out.safetensors", ema=where.startswith("ema"))
    assert not marker.exists()


@deepspeed_missing
def test_planted_deepspeed_file_is_refused_by_resume(deepspeed_run, tmp_path, shared_shards_dir):
    """DeepSpeed's load_checkpoint under weights_only: the resumed 2-rank run stops, the planted
    optimizer file named (by the rank that read it), no traceback from our code, no marker."""
    run_dir, marker = _copy(deepspeed_run, tmp_path), tmp_path / "marker"
    planted = _plant_pt(run_dir / "checkpoints" / STEP / "deepspeed/checkpoint/"
                        "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    done = _torchrun(_overrides(run_dir, shared_shards_dir, "train.steps=2", *DEEPSPEED),
                     tmp_path / "resume.log")
    output = done.stdout + done.stderr
    assert done.returncode != 0 and "refused" in output, output[-4000:]
    # torchrun reports the failed workers with a traceback of its own; none comes from our code
    assert str(planted) in output and str(REPO / "ddrl_scale") not in output, output[-4000:]
    assert not marker.exists()


# -- the torch-extension lock DeepSpeed's op build takes -------------------------------------------
@deepspeed_missing
@pytest.mark.parametrize("fresh", [False, True])
def test_extension_lock_stops_the_engine_naming_the_file(tmp_path, monkeypatch, fresh):
    """A lock left by a killed build (old) stops the engine at once; one held by a live build
    (fresh) after the wait; both name the lock file instead of waiting forever as torch does."""
    from ddrl_scale.config.schema import OptimSection, ParallelSection
    from ddrl_scale.parallel.deepspeed_engine import DeepSpeedEngine, extension_lock
    from ddrl_scale.parallel.distributed import init_world

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    lock = extension_lock("deepspeed_shm_comm")
    lock.touch()
    if not fresh:
        os.utime(lock, (time.time() - 3600,) * 2)
    parallel = ParallelSection(engine="deepspeed", timeout_s=1.0)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=str(lock).replace(".", r"\.")) as caught:
        DeepSpeedEngine(torch.nn.Linear(2, 2), OptimSection(), parallel, init_world("cpu", 1.0))
    assert ("still held" if fresh else "stale") in str(caught.value)
    assert time.monotonic() - started < 30
