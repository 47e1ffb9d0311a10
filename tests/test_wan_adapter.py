"""Wan2.1 from diffusers as the policy: a tiny random WanTransformer3DModel saved in diffusers format,
loaded through the adapter (model.kind=diffusers_wan), trained with DDRL on CPU (one process, and
FSDP2 on 2 ranks), exported (--format diffusers | safetensors) and reloaded with diffusers itself.

The flow-matching convention (timestep = 1000 sigma, velocity = +1 x output, our shift = diffusers'
shift) is checked against diffusers' own FlowMatchEulerDiscreteScheduler, not against a copy of the
mapping. Needs `diffusers` (skipped without it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import _TINY

diffusers = pytest.importorskip("diffusers", reason="needs diffusers (pip install diffusers==0.42.1)")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from ddrl_scale.algo.samplers import ode_step  # noqa: E402
from ddrl_scale.algo.schedules import sigma_schedule  # noqa: E402
from ddrl_scale.config import ConfigError, load_config  # noqa: E402
from ddrl_scale.models import build_model, flops_per_sample  # noqa: E402
from ddrl_scale.models.wan import WanPolicy, scheduler_shift, wan_flops_per_sample  # noqa: E402
from ddrl_scale.train.anchor_data import demo_shards  # noqa: E402
from ddrl_scale.train.checkpoint import latest_checkpoint, read_weights  # noqa: E402
from ddrl_scale.train.export import export_checkpoint  # noqa: E402
from ddrl_scale.train.trainer import Trainer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# a Wan2.1-shaped transformer, shrunk: 2 blocks, 2 heads of 12 channels, 3 latent channels so the
# demo's pixel "VAE" and anchor shards serve as data; text_dim 8 = the tiny config's hash encoder
TINY_WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=3,
                out_channels=3, text_dim=8, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32)
SHIFT = 3.0  # the folder's scheduler shift, as Wan2.1 480p uses


def _wan_overrides(folder: Path, run_dir: Path, shards: Path) -> list[str]:
    keep = [item for item in _TINY if not item.startswith(("model.patch_size", "train.eval"))]
    return [*keep, "model.kind=diffusers_wan", f"model.pretrained={folder}", "model.patch_size=[1,2,2]",
            f"sampler.shift={SHIFT}", "train.steps=2", "train.eval_prompts=0", "optim.lr=1e-2",
            f"data.generated_dir={shards}", f"run.output_dir={run_dir}"]


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory) -> Path:
    """A diffusers pipeline-style folder: transformer/ (random tiny Wan) and scheduler/."""
    folder = tmp_path_factory.mktemp("wan") / "Wan2.1-tiny"
    torch.manual_seed(0)
    diffusers.WanTransformer3DModel(**TINY_WAN).save_pretrained(str(folder / "transformer"))
    diffusers.FlowMatchEulerDiscreteScheduler(shift=SHIFT).save_pretrained(str(folder / "scheduler"))
    return folder


@pytest.fixture(scope="module")
def trained(wan_folder, tmp_path_factory, shared_shards_dir):
    """Two DDRL steps (engine none, CPU) from the Wan folder; the trainer is kept for its policy."""
    run_dir = tmp_path_factory.mktemp("wan_run") / "run"
    overrides = _wan_overrides(wan_folder, run_dir, shared_shards_dir)
    trainer = Trainer(load_config(None, overrides))
    assert trainer.train()
    return trainer, overrides


def _known_input(seed: int = 1, batch: int = 2):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 3, 4, 8, 8, generator=generator)
    sigma = torch.tensor([0.9, 0.35])[:batch]
    text = torch.randn(batch, 12, 8, generator=generator)
    return latents, sigma, text


def _diffusers_model(folder: Path, subfolder: str = "transformer"):
    return diffusers.WanTransformer3DModel.from_pretrained(str(folder), subfolder=subfolder).eval()


# -- the convention --------------------------------------------------------------------------------
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_velocity_is_the_diffusers_output_under_the_convention(wan_folder, tmp_path, shared_shards_dir,
                                                               sign):
    """adapter(x, sigma, text) == sign * WanTransformer3DModel(x, 1000 sigma, text), bitwise."""
    overrides = _wan_overrides(wan_folder, tmp_path, shared_shards_dir) + [f"model.velocity_sign={sign}"]
    policy = build_model(load_config(None, overrides)).eval()
    assert isinstance(policy, WanPolicy)
    latents, sigma, text = _known_input()
    with torch.no_grad():
        ours = policy(latents, sigma, text)
        theirs = _diffusers_model(wan_folder)(latents, 1000.0 * sigma, text).sample
    assert ours.shape == latents.shape
    assert torch.equal(ours, sign * theirs)


def test_euler_step_matches_the_diffusers_scheduler(wan_folder, tmp_path, shared_shards_dir):
    """Our schedule (sampler.shift) and ODE step with the adapter's velocity reproduce diffusers'
    FlowMatchEulerDiscreteScheduler (shift from the folder) stepping with the raw Wan output: this
    fails if the timestep scale, the shift formula or the velocity sign were mapped wrongly."""
    config = load_config(None, _wan_overrides(wan_folder, tmp_path, shared_shards_dir))
    policy, model = build_model(config).eval(), _diffusers_model(wan_folder)
    num_steps = 4
    ours = sigma_schedule(num_steps, config.sampler.shift)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(str(wan_folder / "scheduler"))
    assert scheduler_shift(wan_folder) == config.sampler.shift == SHIFT
    scheduler.set_timesteps(sigmas=torch.linspace(1.0, 0.0, num_steps + 1)[:-1].tolist())
    torch.testing.assert_close(scheduler.sigmas.double(), ours, rtol=0, atol=1e-6)
    torch.testing.assert_close(scheduler.timesteps.double(), 1000.0 * ours[:-1], rtol=0, atol=1e-3)
    latents, _, text = _known_input()
    x_ours = x_theirs = latents
    with torch.no_grad():
        for index, timestep in enumerate(scheduler.timesteps):
            sigma, sigma_next = float(ours[index]), float(ours[index + 1])
            velocity = policy(x_ours, torch.full((2,), sigma), text)
            x_ours = ode_step(velocity, x_ours, sigma, sigma_next)
            output = model(x_theirs, timestep.expand(2), text).sample
            x_theirs = scheduler.step(output, timestep, x_theirs, return_dict=False)[0]
    torch.testing.assert_close(x_ours, x_theirs, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(x_ours, latents)  # the model moved the sample


# -- train, export, reload ---------------------------------------------------------------------------
def test_ddrl_steps_change_the_policy(trained, wan_folder):
    """Training ran its steps and moved the Wan weights away from the pretrained ones."""
    trainer, _ = trained
    assert trainer.step == 2
    initial = _diffusers_model(wan_folder).state_dict()
    moved = {name: tensor for name, tensor in trainer.engine.model.export_state_dict().items()
             if not torch.equal(tensor, initial[name])}
    assert len(moved) > len(initial) // 2, "training changed almost no tensor"
    metrics = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in metrics] == [1, 2]
    assert all(torch.isfinite(torch.tensor(record["loss"])) for record in metrics)


@pytest.mark.parametrize("ema", [False, True])
def test_diffusers_export_reloads_with_diffusers(trained, tmp_path, ema):
    """--format diffusers: WanTransformer3DModel.from_pretrained(OUT, subfolder='transformer') gives
    the trained policy's outputs (EMA: the EMA weights), bitwise in fp32."""
    trainer, _ = trained
    out = export_checkpoint(trainer.run_dir, tmp_path / "export", ema=ema, format="diffusers")
    reloaded = _diffusers_model(out)
    policy = trainer.engine.model.eval()
    if ema:
        policy = WanPolicy(_diffusers_model(out), policy.config)  # same architecture, EMA weights
        weights = {name: trainer.engine.ema.shadow[f"transformer.{name}"]
                   for name, _ in policy.transformer.named_parameters()}
        for name, tensor in reloaded.named_parameters():
            assert torch.equal(tensor, weights[name]), name
    latents, sigma, text = _known_input()
    with torch.no_grad():
        expected = policy(latents, sigma, text)
        got = reloaded(latents, 1000.0 * sigma, text).sample
    assert torch.equal(got, expected)
    record = json.loads((out / "ddrl_export.json").read_text())
    assert record["ema"] is ema and record["step"] == 2
    assert record["policy_config"]["kind"] == "diffusers_wan"


def test_exports_start_new_runs(trained, tmp_path, shared_shards_dir, wan_folder):
    """The diffusers export works as model.pretrained, the single file as model.init_checkpoint;
    both build the trained policy. The single file holds diffusers' tensor names and configs."""
    trainer, _ = trained
    stored = read_weights(latest_checkpoint(trainer.run_dir))
    folder = export_checkpoint(trainer.run_dir, tmp_path / "folder", format="diffusers")
    single = export_checkpoint(trainer.run_dir, tmp_path / "policy.safetensors", format="safetensors")
    tensors = load_file(str(single))
    assert tensors.keys() == {name[len("transformer."):] for name in stored}
    with safe_open(str(single), framework="pt") as handle:
        metadata = handle.metadata()
    assert json.loads(metadata["config"])["_class_name"] == "WanTransformer3DModel"
    from_folder = build_model(load_config(None, _wan_overrides(folder, tmp_path / "a", shared_shards_dir)))
    from_file = build_model(load_config(None, _wan_overrides(wan_folder, tmp_path / "b", shared_shards_dir)
                                        + [f"model.init_checkpoint={single}"]))
    for model in (from_folder, from_file):
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, stored[name]), name


def test_bf16_export(trained, tmp_path):
    trainer, _ = trained
    out = export_checkpoint(trainer.run_dir, tmp_path / "bf16", format="diffusers", dtype="bf16")
    tensors = load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert {tensor.dtype for tensor in tensors.values()} == {torch.bfloat16}


# -- errors ------------------------------------------------------------------------------------------
def test_bad_configs_name_the_key(wan_folder, tmp_path, shared_shards_dir):
    base = _wan_overrides(wan_folder, tmp_path, shared_shards_dir)
    with pytest.raises(ConfigError, match="model.pretrained"):
        load_config(None, [*base, "model.pretrained="])
    with pytest.raises(FileNotFoundError, match="model.pretrained"):
        build_model(load_config(None, [*base, f"model.pretrained={tmp_path / 'missing'}"]))
    with pytest.raises(ConfigError, match="video.channels"):
        build_model(load_config(None, [*base, "video.channels=4"]))
    with pytest.raises(ConfigError, match="model.text_dim"):
        build_model(load_config(None, [*base, "model.text_dim=16"]))
    with pytest.raises(ConfigError, match="parallel.cp"):  # the tiny Wan has 2 heads
        build_model(load_config(None, [*base, "parallel.engine=fsdp2", "parallel.cp=3"]))
    with pytest.raises(ConfigError, match="model.velocity_sign"):
        load_config(None, [*base, "model.velocity_sign=2"])


def test_dit_has_no_diffusers_format(tmp_path, tiny_overrides):
    overrides = [*tiny_overrides, "train.steps=1", "train.eval_prompts=0"]
    trainer = Trainer(load_config(None, overrides))
    trainer.train()
    with pytest.raises(ValueError, match="has no diffusers"):
        export_checkpoint(trainer.run_dir, tmp_path / "x", format="diffusers")
    with pytest.raises(ValueError, match="--format"):
        export_checkpoint(trainer.run_dir, tmp_path / "x", format="onnx")


# -- FLOPs -------------------------------------------------------------------------------------------
def test_flops_estimate_matches_the_flop_counter(wan_folder, tmp_path, shared_shards_dir):
    """wan_flops_per_sample counts what torch's FlopCounterMode counts for one sample's forward
    (attention on SDPA's math backend: the counter does not see inside the fused CPU kernel)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    policy = build_model(load_config(None, _wan_overrides(wan_folder, tmp_path, shared_shards_dir)))
    latents, sigma, text = _known_input(batch=1)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        policy(latents, sigma, text)
    assert wan_flops_per_sample(policy.config, training=False) == pytest.approx(
        counter.get_total_flops(), rel=1e-9)
    assert flops_per_sample(policy.config) == pytest.approx(3 * counter.get_total_flops(), rel=1e-9)


# -- FSDP2 on 2 ranks --------------------------------------------------------------------------------
def _demo(overrides: list[str], nproc: int, log: Path, timeout_s: float = 240) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE",
                                                            "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO),
                                                                             env.get("PYTHONPATH")])))
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
        f"--nproc_per_node={nproc}"]
    command = [*launcher, "-m", "ddrl_scale.cli", "demo", *overrides]
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the launcher's own session: it and its ranks
            process.wait()
            pytest.fail(f"timed out after {timeout_s} s: {command}\n{log.read_text()[-4000:]}")
    assert process.returncode == 0, f"{command} failed:\n{log.read_text()[-6000:]}"


@pytest.mark.slow
def test_fsdp2_two_ranks_match_one_process(wan_folder, tmp_path, shared_shards_dir):
    """fsdp2 on 2 ranks (gloo) trains the Wan policy like one process (fp32 reduction-order
    tolerance), and its sharded checkpoint exports to a folder diffusers loads."""
    runs = {}
    # AdamW divides by sqrt(v): a gradient near 0 turns fp32 reduction-order noise into a step of up
    # to lr, so this comparison uses a small lr (the default) and ATOL well below it
    base = [*_wan_overrides(wan_folder, tmp_path, shared_shards_dir), "optim.lr=3e-4"]
    demo_shards(load_config(None, base))  # written once, before two ranks could race for them
    for name, nproc, extra in (("one", 1, []), ("fsdp2", 2, ["parallel.engine=fsdp2"])):
        runs[name] = tmp_path / name
        _demo([*base, *extra, f"run.output_dir={runs[name]}"], nproc, tmp_path / f"{name}.log")
    for ema in (False, True):
        got, want = (read_weights(latest_checkpoint(runs[name]), ema=ema) for name in ("fsdp2", "one"))
        assert got.keys() == want.keys()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        worst = max((got[name] - want[name]).abs().max().item() for name in got)
        print(f"fsdp2 vs one process: max |weight difference| (ema={ema}) = {worst:.3g}")
    out = export_checkpoint(runs["fsdp2"], tmp_path / "export", format="diffusers")
    reloaded = _diffusers_model(out)
    stored = read_weights(latest_checkpoint(runs["fsdp2"]))
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, stored[f"transformer.{name}"]), name
