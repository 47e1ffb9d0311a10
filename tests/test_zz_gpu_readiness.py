"""(Named to run last: after this module, DataLoader worker processes forked by later tests in
the same pytest process segfaulted at fork (test_sharded_loader); the state it leaves is not yet
found, each half of the module alone is harmless.)

What breaks on CUDA, checked on the CPU (issue 16, items 2-6): collective devices, fp32-only
inputs under every engine's bf16, Megatron's parameter placement, the flash-attn choice under
autocast, the publish's NCCL timeout, NVML errors, the reward thread's device, CUDA peak memory.

No GPU result is faked: the CUDA side is represented by what decides it (a backend's name, the
autocast dtype, Megatron's init flags, NCCL's documented `Work.wait` semantics), and the CPU
stand-in for "the default device is not the backend's device" is the meta default device.
"""

from __future__ import annotations

import datetime
import logging
import threading
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch import nn

from ddrl_scale.models import attention as attention_module
from ddrl_scale.models.dit import DiTConfig, VideoDiT
from ddrl_scale.parallel import distributed
from ddrl_scale.parallel.distributed import World, reduce_metrics
from ddrl_scale.rollout import publish
from ddrl_scale.rollout.transport import PeerError

CONFIG = DiTConfig(in_channels=2, num_frames=4, height=4, width=4, patch_size=(2, 2, 2),
                   hidden_size=24, depth=2, num_heads=2, text_dim=8, max_text_tokens=3)


class FakeBackend:
    """A process-group stand-in that only names its backend (what backend_device reads)."""

    def __init__(self, name: str):
        self._name = name

    def name(self) -> str:
        return self._name


@pytest.fixture
def one_rank_group():
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


# -- item 2: collectives on the backend's device --------------------------------------------------
def test_check_devices_names_the_operation_and_the_expected_device(monkeypatch):
    distributed.check_devices("op", [torch.zeros(2)], FakeBackend("gloo"))
    with pytest.raises(RuntimeError, match=r"collective 'op'.*meta.*cpu tensors only.*world.device"):
        distributed.check_devices("op", [torch.zeros(2, device="meta")], FakeBackend("gloo"))
    # nccl serves the current CUDA device: a CPU tensor (the defect) is refused before NCCL sees it
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    with pytest.raises(RuntimeError, match=r"tensor on cpu.*cuda:1 tensors only"):
        distributed.check_devices("all_reduce(metrics)", [torch.zeros(2)], FakeBackend("nccl"))


def test_collective_checks_the_tensors_it_is_given_before_running():
    ran = []
    with pytest.raises(RuntimeError, match="collective 'x'"):
        distributed.collective("x", lambda: ran.append(1), [torch.zeros(1, device="meta")],
                               FakeBackend("gloo"))
    assert not ran


def test_reduce_metrics_makes_its_tensors_on_world_device(one_rank_group):
    """The default device set to meta stands for a GPU run's default CPU: a tensor made without
    device=world.device lands off the backend's device and the check refuses it (the old code did)."""
    world = World(rank=0, world_size=2, device=torch.device("cpu"))  # 2: take the reducing path
    with torch.device("meta"):
        out = reduce_metrics({"loss": 3.0, "mem_max": 5.0}, world)
    assert out == {"loss": 1.5, "mem_max": 5.0}  # one rank summed, divided by the claimed 2


def test_object_collectives_need_this_ranks_cuda_device(monkeypatch):
    world = World(rank=1, world_size=2, local_rank=1, device=torch.device("cuda", 1))
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    with pytest.raises(RuntimeError, match=r"cuda:0.*cuda:1.*set_device"):
        distributed.check_object_device("all_gather_object(prompts)", world)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    distributed.check_object_device("all_gather_object(prompts)", world)


def test_megatron_grad_norm_tensor_is_on_the_engine_device(monkeypatch):
    """MegatronEngine.step's TP grad-norm sum is the int 0 when no gradient is TP-split: it must
    still be made on the engine's device (it was made on the CPU)."""
    from ddrl_scale.parallel import megatron_engine

    seen = []
    monkeypatch.setattr(megatron_engine, "collective",
                        lambda op, fn, tensors=(), group=None: seen.append((op, [t.device for t in tensors])))
    engine = SimpleNamespace(model=nn.Linear(2, 2, bias=False), dp_size=1, tp_size=1, grad_clip=0.0,
                             split_dims={"weight": megatron_engine.REPLICATED}, tp_group=None,
                             device=torch.device("meta"), optimizer=SimpleNamespace(
                                 step=lambda: None, zero_grad=lambda set_to_none: None),
                             schedule=SimpleNamespace(step=lambda: None), ema=None,
                             force_finite=lambda parameters: None, finish_step=lambda: None)
    engine.model.weight.grad = torch.ones(2, 2)
    with pytest.raises(RuntimeError, match="meta"):  # the meta norm cannot become a float
        megatron_engine.MegatronEngine.step(engine)
    assert seen == [("all_reduce(grad norm, tp)", [torch.device("meta")])]


# -- item 3: fp32-only inputs and buffers under bf16 ----------------------------------------------
def _randomised(model: nn.Module) -> nn.Module:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model


def _inputs(sigma: float = 0.5):
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(2, CONFIG.in_channels, CONFIG.num_frames, CONFIG.height, CONFIG.width,
                          generator=generator)
    text = torch.randn(2, CONFIG.max_text_tokens, CONFIG.text_dim, generator=generator)
    return latents, torch.full((2,), sigma), text


def _record_input_dtypes(model: nn.Module) -> dict[str, list[torch.dtype]]:
    """dtypes of the sigma reaching the root and the rotary angles reaching each block."""
    seen: dict[str, list[torch.dtype]] = {"sigma": [], "rope": []}
    model.register_forward_pre_hook(lambda module, args: seen["sigma"].append(args[1].dtype))
    for block in model.blocks:
        block.register_forward_pre_hook(lambda module, args: seen["rope"].append(args[3].dtype))
    return seen


@pytest.mark.parametrize("policy", ["fixed", "fsdp_default"])
def test_fsdp2_bf16_policy_keeps_sigma_and_rope_fp32(one_rank_group, policy):
    """fully_shard with the engine's bf16 policy: sigma and the rotary angles arrive fp32, and two
    sigmas one bf16 step apart give different outputs. Control: FSDP2's default policy (the old
    one, cast_forward_inputs=True) casts both, which is what the hooks would see."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from ddrl_scale.parallel.parallelize import apply_fsdp

    model = _randomised(VideoDiT(CONFIG))
    mesh = init_device_mesh("cpu", (1,))
    if policy == "fixed":
        apply_fsdp(model, mesh, torch.bfloat16)
    else:
        old = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in model.blocks:
            fully_shard(block, mesh=mesh, mp_policy=old)
        fully_shard(model, mesh=mesh, mp_policy=old)
    seen = _record_input_dtypes(model)
    latents, sigma, text = _inputs(0.5)
    with torch.no_grad():
        if policy == "fsdp_default":
            model(latents, sigma, text)
            assert seen["sigma"] == [torch.bfloat16] and set(seen["rope"]) == {torch.bfloat16}
            return
        first = model(latents, sigma, text)
        second = model(latents, torch.full((2,), 0.5 + 1e-3), text)  # one bf16 value: 0.5
    assert set(seen["sigma"]) == {torch.float32} and set(seen["rope"]) == {torch.float32}
    assert not torch.equal(first, second)


def test_half_precision_module_casts_keep_the_rotary_angles_fp32():
    """model.bfloat16() / .half() (a blanket cast, as DeepSpeed's bf16 did before it kept
    buffers): parameters become half precision, the rotary angles stay fp32 and unchanged; an
    upcast (.double(), reference checks) still applies."""
    model = VideoDiT(CONFIG)
    before = model.rope.clone()
    for cast in (nn.Module.bfloat16, nn.Module.half):
        cast(model)
        assert model.patch_embed.weight.dtype != torch.float32
        assert model.rope.dtype == torch.float32 and torch.equal(model.rope, before)
        model.float()
    assert model.double().rope.dtype == torch.float64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = VideoDiT(CONFIG).bfloat16()(*_inputs())  # bf16 params take fp32 latents
    assert out.dtype == torch.bfloat16


def test_deepspeed_bf16_config_leaves_buffers_alone():
    """DeepSpeed's bf16 casts parameters only unless buffer_dtype is set; our config sets none."""
    from ddrl_scale.config.schema import OptimSection, ParallelSection
    from ddrl_scale.parallel.deepspeed_engine import deepspeed_config

    config = deepspeed_config(OptimSection(), ParallelSection(engine="deepspeed"), "bf16", 1, 1)
    assert config["bf16"] == {"enabled": True} and "buffer_dtype" not in config


def test_wan_policy_keeps_its_rotary_tables_fp32():
    pytest.importorskip("diffusers")
    from ddrl_scale.models.wan import WanPolicy, WanPolicyConfig

    rope = nn.Module()
    rope.register_buffer("freqs_cos", torch.rand(4, 6), persistent=False)
    rope.register_buffer("freqs_sin", torch.rand(4, 6), persistent=False)
    transformer = nn.Module()
    transformer.rope, transformer.patch_embedding = rope, nn.Conv3d(2, 4, 1)
    policy = WanPolicy(transformer, WanPolicyConfig()).bfloat16()
    assert rope.freqs_cos.dtype == rope.freqs_sin.dtype == torch.float32
    assert transformer.patch_embedding.weight.dtype == torch.bfloat16
    assert policy is not None


# -- item 4: Megatron's layers on the engine's device ---------------------------------------------
def test_megatron_init_flags_follow_the_device():
    pytest.importorskip("megatron.core")
    from ddrl_scale.parallel.megatron_engine import megatron_config

    assert megatron_config(2, torch.device("cpu"), torch.float32).use_cpu_initialization
    cuda = megatron_config(2, torch.device("cuda", 0), torch.float32)
    assert not cuda.use_cpu_initialization and not cuda.perform_initialization


def test_megatron_layers_land_on_the_models_device(one_rank_group):
    """A model on the meta device (standing for cuda:N) keeps every parameter and buffer there
    after the TP swap; the layers used to be made, and stay, on the CPU."""
    pytest.importorskip("megatron.core")
    from megatron.core import parallel_state

    from ddrl_scale.parallel import megatron_compat
    from ddrl_scale.parallel.megatron_engine import apply_tensor_parallel

    megatron_compat.enable()
    try:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
        model = VideoDiT(CONFIG).to("meta")
        apply_tensor_parallel(model, 1)
        devices = {t.device.type for t in [*model.parameters(), *model.buffers()]}
        assert devices == {"meta"}
    finally:
        parallel_state.destroy_model_parallel()
        megatron_compat.disable()


# -- item 5: flash-attn under CUDA autocast --------------------------------------------------------
def test_flash_is_chosen_for_autocast_dtype_not_the_fp32_qk(monkeypatch):
    """q / k leave the RMSNorm in fp32 under autocast; the choice must follow autocast's bf16, and
    the flash path gets all three in bf16. CUDA is represented by the device type the choice reads
    (the CPU tensors' device reads as 'cuda' to it) and CPU autocast stands for CUDA autocast; the
    kernel is a recorder, not a result."""
    calls = []

    def fake_flash(q, k, v):
        calls.append((q.dtype, k.dtype, v.dtype, q.shape))
        return torch.zeros_like(q)

    monkeypatch.setattr(attention_module, "flash_attn_func", fake_flash)
    query, key = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)  # fp32, as after the RMSNorm
    value = torch.randn(1, 2, 4, 8, dtype=torch.bfloat16)
    cuda_like = SimpleNamespace(type="cuda")
    real_resolve = attention_module.resolve_backend
    monkeypatch.setattr(attention_module, "resolve_backend",
                        lambda requested, device, dtype: real_resolve(requested, cuda_like, dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 autocast, as a CUDA bf16 run has
        out = attention_module.attention(query, key, value, "auto")
    assert calls == [(torch.bfloat16, torch.bfloat16, torch.bfloat16, (1, 4, 2, 8))]
    assert out.shape == query.shape


def test_compute_dtype_reads_autocast():
    x = torch.zeros(2)
    assert attention_module.compute_dtype(x) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert attention_module.compute_dtype(x) == torch.bfloat16
    # the choice itself: an fp32 query would be refused for flash on CUDA
    monkey_flash = attention_module.flash_attn_func
    try:
        attention_module.flash_attn_func = lambda q, k, v: q
        assert attention_module.resolve_backend("auto", torch.device("cuda", 0), torch.float32) == "sdpa"
        assert attention_module.resolve_backend("auto", torch.device("cuda", 0), torch.bfloat16) == "flash"
    finally:
        attention_module.flash_attn_func = monkey_flash


# -- item 6 -----------------------------------------------------------------------------------------
class NCCLLikeWork:
    """NCCL's Work.wait as torch documents it: without a timeout it returns at once (it only
    orders the CUDA stream), with one it blocks and raises when the broadcast never completes."""

    def __init__(self):
        self.timeouts = []

    def wait(self, timeout: datetime.timedelta = datetime.timedelta(0)) -> bool:
        self.timeouts.append(timeout)
        if timeout == datetime.timedelta(0):
            return True
        raise dist.DistBackendError("Work timed out in blocking wait")


class HungNCCLGroup(FakeBackend):
    def __init__(self):
        super().__init__("gloo")  # the tensors here are CPU ones; the wait is NCCL's
        self.options = SimpleNamespace(_timeout=datetime.timedelta(seconds=10))
        self.work = NCCLLikeWork()

    def broadcast(self, tensors, options):
        return self.work


def test_publish_broadcast_errors_on_a_hung_nccl_peer():
    group = HungNCCLGroup()
    with pytest.raises(PeerError, match="failed or timed out"):
        publish._broadcast(group, torch.zeros(4))
    assert group.work.timeouts == [datetime.timedelta(seconds=9)]  # before NCCL's watchdog (10 s)


def test_one_nvml_error_drops_that_metric_only(caplog):
    from ddrl_scale.telemetry.gpu import TelemetrySampler
    from tests.test_telemetry import FakeNVML, FakeNVMLError, _gpu

    nvml = FakeNVML([_gpu()])
    sampler = TelemetrySampler(interval_s=1.0, nvml=nvml)
    read = nvml.nvmlDeviceGetPowerUsage
    nvml.nvmlDeviceGetPowerUsage = lambda handle: (_ for _ in ()).throw(FakeNVMLError(999, "Unknown"))
    with caplog.at_level(logging.WARNING, logger="ddrl_scale.telemetry.gpu"):
        for _ in range(3):
            sampler.sample()
    nvml.nvmlDeviceGetPowerUsage = read  # dropped for the run: not read again
    sampler.sample()
    metrics = sampler.snapshot()
    assert sampler.source == "nvml" and metrics["gpu0_util"] == 50.0 and "gpu0_power_w" not in metrics
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "gpu0_power_w" in warnings[0] and "left out" in warnings[0]


def test_reward_thread_binds_the_ranks_cuda_device(monkeypatch):
    from ddrl_scale.rewards.service import batcher

    bound = []
    monkeypatch.setattr(torch.cuda, "set_device",
                        lambda device: bound.append((threading.current_thread().name, device)))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)  # this rank's, set by init_world
    assert batcher.scoring_device("cuda") == torch.device("cuda", 3)
    assert batcher.scoring_device("cuda:1") == torch.device("cuda", 1)
    assert batcher.scoring_device("cpu") == torch.device("cpu")
    scorer = batcher.RewardBatcher(lambda videos, prompts: videos, "cuda")
    scorer.start()
    scorer.stop(timeout=10)
    assert bound == [("reward-batcher", torch.device("cuda", 3))]


def test_cuda_peak_memory_is_empty_on_cpu_and_read_on_cuda(monkeypatch):
    from ddrl_scale.telemetry import memory

    assert memory.cuda_peak_memory() == {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 2e9)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 3e9)
    assert memory.cuda_peak_memory() == {"cuda_peak_allocated_gb": 2.0, "cuda_peak_reserved_gb": 3.0}
    from ddrl_scale.telemetry.gpu import TelemetrySampler
    from tests.test_telemetry import FakeNVML, _gpu

    snapshot = TelemetrySampler(interval_s=1.0, nvml=FakeNVML([_gpu()])).snapshot()
    assert snapshot["cuda_peak_reserved_gb"] == 3.0
