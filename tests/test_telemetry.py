"""Telemetry: the NVML / psutil sampler, phase timers, FLOPs hand count, throughput and MFU."""

from __future__ import annotations

import logging
import sys
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from ddrl_scale.config import load_config
from ddrl_scale.models import dit_config_from
from ddrl_scale.models.dit import flops_per_sample
from ddrl_scale.telemetry import throughput
from ddrl_scale.telemetry.devices import DEVICES, device_spec, spec_for_device_name
from ddrl_scale.telemetry.flops import ddrl_iteration_flops
from ddrl_scale.telemetry.gpu import TelemetrySampler
from ddrl_scale.telemetry.throughput import device_peak_flops, math_mode, step_throughput
from ddrl_scale.telemetry.timers import PhaseTimer

LOGGER = "ddrl_scale.telemetry.gpu"


# -- a stand-in NVML module -------------------------------------------------------------------------
class FakeNVMLError(Exception):
    def __init__(self, value: int, text: str = "fake NVML error"):
        super().__init__(text)
        self.value = value


class FakeNVML:
    """pynvml's interface over a list of GPUs whose readings tests set and change."""

    NVMLError = FakeNVMLError
    NVML_TEMPERATURE_GPU = 0
    NVML_CLOCK_SM = 1

    def __init__(self, gpus: list[dict], init_error: Exception | None = None):
        self.gpus, self.init_error = gpus, init_error
        self.initialised = self.shut_down = False
        self.fail_with: Exception | None = None  # raised by every reading once set
        self.unsupported: set[str] = set()

    def nvmlInit(self):
        if self.init_error is not None:
            raise self.init_error
        self.initialised = True

    def nvmlShutdown(self):
        self.shut_down = True

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index):
        return ("handle", index)

    def nvmlDeviceGetHandleByUUID(self, uuid):
        return ("handle", next(i for i, gpu in enumerate(self.gpus) if gpu["uuid"] == uuid))

    def nvmlDeviceGetIndex(self, handle):
        return handle[1]

    def _read(self, handle, key):
        if self.fail_with is not None:
            raise self.fail_with
        if key in self.unsupported:
            raise FakeNVMLError(3, "Not Supported")
        return self.gpus[handle[1]][key]

    def nvmlDeviceGetUtilizationRates(self, handle):
        return SimpleNamespace(gpu=self._read(handle, "util"), memory=0)

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(used=self._read(handle, "mem_bytes"), total=80e9, free=0)

    def nvmlDeviceGetPowerUsage(self, handle):
        return self._read(handle, "power_mw")

    def nvmlDeviceGetTemperature(self, handle, sensor):
        assert sensor == self.NVML_TEMPERATURE_GPU
        return self._read(handle, "temp")

    def nvmlDeviceGetClockInfo(self, handle, clock):
        assert clock == self.NVML_CLOCK_SM
        return self._read(handle, "sm_clock")


def _gpu(util=50, mem_bytes=10e9, power_mw=300_000, temp=60, sm_clock=1980, uuid="GPU-a"):
    return {"util": util, "mem_bytes": mem_bytes, "power_mw": power_mw, "temp": temp,
            "sm_clock": sm_clock, "uuid": uuid}


def _fallback_warnings(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING
            and "falling back" in r.getMessage()]


# -- sampler --------------------------------------------------------------------------------------
def test_sampler_without_nvml_falls_back_to_psutil_and_says_so_once(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` now raises ImportError
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        sampler = TelemetrySampler(interval_s=0.01)
        assert sampler.source == "psutil"
        with sampler:
            time.sleep(0.05)
        first = sampler.snapshot()
        for _ in range(3):
            sampler.sample()
        second = sampler.snapshot()
    assert len(_fallback_warnings(caplog)) == 1
    assert "nvidia-ml-py is not installed" in _fallback_warnings(caplog)[0].getMessage()
    for metrics in (first, second):
        assert set(metrics) == {"cpu_percent", "rss_gb", "rss_gb_max"}
        assert 0.01 < metrics["rss_gb"] <= metrics["rss_gb_max"] < 1000  # this process: 10 MB..1 TB
        assert metrics["cpu_percent"] >= 0


def test_a_cpu_run_samples_psutil_without_looking_for_nvml(caplog):
    """gpus=False (the trainer's choice for run.device=cpu): no NVML, and nothing said about it."""
    class Exploding:
        def nvmlInit(self):
            raise AssertionError("NVML must not be opened for a CPU run")

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        sampler = TelemetrySampler(interval_s=0.5, nvml=Exploding(), gpus=False)
    assert sampler.source == "psutil" and not _fallback_warnings(caplog)
    assert "rss_gb" in sampler.snapshot()


def test_sampler_with_the_real_pynvml_and_no_gpu_falls_back(caplog):
    pynvml = pytest.importorskip("pynvml", reason="needs nvidia-ml-py (the telemetry extra)")
    try:
        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        pytest.skip("NVML works on this machine (a GPU driver is present): nothing falls back")
    except pynvml.NVMLError:
        pass
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        sampler = TelemetrySampler(interval_s=0.5)
    assert sampler.source == "psutil"
    assert "NVML is not usable" in _fallback_warnings(caplog)[0].getMessage()
    assert "rss_gb" in sampler.snapshot()


def test_sampler_reads_a_stand_in_nvml_into_means_and_maxima():
    nvml = FakeNVML([_gpu(util=10, mem_bytes=20e9), _gpu(util=90, power_mw=450_500, uuid="GPU-b")])
    sampler = TelemetrySampler(interval_s=60.0, nvml=nvml)  # no thread: samples by hand
    assert sampler.source == "nvml" and nvml.initialised
    sampler.sample()
    nvml.gpus[0].update(util=30, mem_bytes=40e9)
    sampler.sample()
    metrics = sampler.snapshot()
    assert metrics["gpu0_util"] == pytest.approx(20.0)  # mean of 10 and 30
    assert metrics["gpu0_mem_gb"] == pytest.approx(30.0)
    assert metrics["gpu0_mem_gb_max"] == pytest.approx(40.0)
    assert metrics["gpu1_util"] == pytest.approx(90.0)
    assert metrics["gpu1_power_w"] == pytest.approx(450.5)  # NVML reports milliwatts
    assert metrics["gpu0_temp_c"] == 60.0 and metrics["gpu1_sm_clock_mhz"] == 1980.0
    assert len(metrics) == 2 * 5 + 2  # five figures per GPU, plus the memory maxima
    # the next snapshot holds only what came after: here one fresh sample taken on demand
    nvml.gpus[0].update(util=70)
    assert sampler.snapshot()["gpu0_util"] == pytest.approx(70.0)
    sampler.stop()
    assert nvml.shut_down


def test_sampler_thread_samples_in_the_background_and_stop_joins():
    nvml = FakeNVML([_gpu()])
    sampler = TelemetrySampler(interval_s=0.005, nvml=nvml)
    with sampler:
        thread = sampler._thread
        assert thread.daemon and thread.is_alive()
        deadline = time.monotonic() + 60.0  # a bound for a loaded machine, not an expected time
        while sampler._counts.get("gpu0_util", 0) < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
    assert not thread.is_alive() and not sampler.running
    assert sampler.snapshot()["gpu0_util"] == 50.0
    assert sampler.snapshot() == {}  # stopped: nothing new, and it does not sample any more
    with pytest.raises(RuntimeError, match="make a new one"):
        sampler.start()
    assert all(t.name != "ddrl-telemetry" for t in threading.enumerate())


def test_sampler_devices_select_gpus_and_bad_indices_are_named():
    nvml = FakeNVML([_gpu(), _gpu(util=77, uuid="GPU-b"), _gpu()])
    metrics = TelemetrySampler(interval_s=1.0, devices=[1], nvml=nvml).snapshot()
    assert {name.split("_")[0] for name in metrics} == {"gpu1"} and metrics["gpu1_util"] == 77.0
    with pytest.raises(ValueError, match=r"indices \[3\] do not exist.*3 GPUs"):
        TelemetrySampler(interval_s=1.0, devices=[0, 3], nvml=nvml)


def test_sampler_follows_cuda_visible_devices(monkeypatch):
    nvml = FakeNVML([_gpu(uuid="GPU-a"), _gpu(uuid="GPU-b"), _gpu(uuid="GPU-c")])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,GPU-b")
    metrics = TelemetrySampler(interval_s=1.0, nvml=nvml).snapshot()
    assert {name.split("_")[0] for name in metrics} == {"gpu1", "gpu2"}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU for this process
    assert TelemetrySampler(interval_s=1.0, nvml=FakeNVML([_gpu()])).source == "psutil"


def test_sampler_drops_an_unsupported_reading_and_keeps_the_rest(caplog):
    nvml = FakeNVML([_gpu()])
    nvml.unsupported = {"power_mw"}
    sampler = TelemetrySampler(interval_s=1.0, nvml=nvml)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        sampler.sample()
        sampler.sample()
    metrics = sampler.snapshot()
    assert "gpu0_power_w" not in metrics and metrics["gpu0_util"] == 50.0
    assert sum("not supported" in r.getMessage() for r in caplog.records) == 1
    assert sampler.source == "nvml"


def test_sampler_falls_back_once_when_nvml_fails_at_init_or_while_sampling(caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        broken = TelemetrySampler(interval_s=1.0, nvml=FakeNVML([], FakeNVMLError(9, "no driver")))
    assert broken.source == "psutil" and "no driver" in _fallback_warnings(caplog)[0].getMessage()
    caplog.clear()
    nvml = FakeNVML([_gpu()])
    sampler = TelemetrySampler(interval_s=1.0, nvml=nvml)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        sampler.sample()
        nvml.fail_with = FakeNVMLError(15, "GPU is lost")
        for _ in range(3):
            sampler.sample()
    assert sampler.source == "psutil" and nvml.shut_down
    assert len(_fallback_warnings(caplog)) == 1
    assert "GPU is lost" in _fallback_warnings(caplog)[0].getMessage()
    metrics = sampler.snapshot()
    assert metrics["gpu0_util"] == 50.0 and "rss_gb" in metrics  # before and after the failure


def test_sampler_rejects_a_bad_interval():
    with pytest.raises(ValueError, match="interval_s.*> 0"):
        TelemetrySampler(interval_s=0)


# -- phase timers ---------------------------------------------------------------------------------
class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_phase_timer_nested_phases_are_exclusive_and_sum_to_the_step():
    clock = FakeClock()
    timer = PhaseTimer(clock=clock)
    timer.start_step()
    clock.now += 1.0  # untimed: "other"
    with timer.phase("data"):
        clock.now += 2.0
    with timer.phase("rollout"):
        clock.now += 3.0
        with timer.phase("reward"):
            clock.now += 4.0
        clock.now += 5.0
    with timer.phase("forward"):
        clock.now += 0.5
    with timer.phase("forward"):  # the same phase twice in a step accumulates
        clock.now += 0.25
    clock.now += 6.0
    metrics = timer.step_metrics()
    assert metrics == {"time_data": 2.0, "time_rollout": 8.0, "time_reward": 4.0,
                       "time_forward": 0.75, "time_other": 7.0, "time_step": 21.75}
    # the next step starts at its first phase and keeps the columns of earlier phases at 0
    clock.now += 100.0
    with timer.phase("data"):
        clock.now += 1.5
    assert timer.step_metrics() == {"time_data": 1.5, "time_rollout": 0.0, "time_reward": 0.0,
                                    "time_forward": 0.0, "time_other": 0.0, "time_step": 1.5}
    # a checkpoint saved after the step was logged opens the next step; start_step keeps it
    with timer.phase("checkpoint"):
        clock.now += 2.0
    clock.now += 1.0
    timer.start_step()
    with timer.phase("data"):
        clock.now += 0.5
    metrics = timer.step_metrics()
    assert (metrics["time_checkpoint"], metrics["time_data"]) == (2.0, 0.5)
    assert (metrics["time_other"], metrics["time_step"]) == (1.0, 3.5)


def test_phase_timer_sums_to_the_measured_step_time():
    """A fake step of sleeps: the phases plus "other" add up to the wall time measured outside.

    Bounds, not a tolerance: the step lies inside the outside measurement and holds every sleep, so
    a loaded machine (late wake-ups) cannot fail it, while time lost between phases would."""
    timer = PhaseTimer()
    outside_start = time.perf_counter()
    timer.start_step()
    for name, seconds in (("data", 0.01), ("rollout", 0.03), ("forward", 0.02), ("backward", 0.02),
                          ("optimizer", 0.01)):
        with timer.phase(name):
            time.sleep(seconds)
            if name == "rollout":
                with timer.phase("reward"):
                    time.sleep(0.01)
        time.sleep(0.005)  # between phases: goes to "other"
    metrics = timer.step_metrics()
    outside = time.perf_counter() - outside_start
    phases = sum(value for key, value in metrics.items() if key != "time_step")
    assert phases == pytest.approx(metrics["time_step"], rel=1e-9)
    slept = 0.01 + 0.03 + 0.01 + 0.02 + 0.02 + 0.01 + 5 * 0.005
    assert slept <= phases <= outside
    assert metrics["time_rollout"] >= 0.03 and metrics["time_reward"] >= 0.01
    assert metrics["time_other"] >= 5 * 0.005


def test_phase_timer_synchronizes_cuda_at_every_boundary(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(str(device)))
    timer = PhaseTimer(synchronize=True, device="cuda:0", clock=FakeClock())
    timer.start_step()
    with timer.phase("forward"):
        with timer.phase("backward"):
            pass
    timer.step_metrics()
    assert calls == ["cuda:0"] * 6  # step start, 2 x enter, 2 x exit, step end
    calls.clear()
    cpu_timer = PhaseTimer(synchronize=True, device="cpu", clock=FakeClock())
    with cpu_timer.phase("forward"):
        pass
    cpu_timer.step_metrics()
    assert calls == []  # nothing to wait for on a CPU


def test_phase_timer_misuse_is_named():
    timer = PhaseTimer(clock=FakeClock())
    with pytest.raises(RuntimeError, match="no step was started"):
        timer.step_metrics()
    with pytest.raises(ValueError, match="other than 'other'"):
        with timer.phase("other"):
            pass
    with pytest.raises(RuntimeError, match=r"still open: \['rollout'\]"):
        with timer.phase("rollout"):
            timer.step_metrics()


# -- FLOPs, peaks, MFU ----------------------------------------------------------------------------
def test_flops_match_a_hand_count_of_the_tiny_dit(tiny_overrides):
    """The project's tiny DiT (tests/conftest.py): width 12, 1 block, 2 heads, MLP 48, 8 tokens
    of 3*2*4*4 = 96 values, 12 text tokens of width 8. Every matmul written out: 2 * rows * in *
    out for linears, 4 * N * M * width for an attention's scores and weighted sum."""
    config = load_config(None, tiny_overrides)
    dit = dit_config_from(config)
    assert (dit.num_tokens, dit.hidden_size, dit.mlp_hidden, dit.max_text_tokens) == (8, 12, 48, 12)
    patch_embed = 2 * 8 * 96 * 12  # 18432
    time_embed = 2 * (2 * 1 * 12 * 12)  # 576: two 12x12 linears on one row
    text_embed = 2 * 12 * 8 * 12 + 2 * 12 * 12 * 12  # 2304 + 3456
    self_attention = 3 * (2 * 8 * 12 * 12) + 2 * 8 * 12 * 12 + 4 * 8 * 8 * 12  # q,k,v; out; core
    cross_attention = (2 * 8 * 12 * 12 + 2 * (2 * 12 * 12 * 12) + 2 * 8 * 12 * 12
                       + 4 * 8 * 12 * 12)  # q; k,v on the text; out; core
    mlp = 2 * 8 * 12 * 48 + 2 * 8 * 48 * 12
    modulation = 2 * 1 * 12 * 72  # adaLN: 6 x width, once per sample
    final = 2 * 1 * 12 * 24 + 2 * 8 * 12 * 96
    forward = (patch_embed + time_embed + text_embed + self_attention + cross_attention + mlp
               + modulation + final)
    assert forward == 92352
    assert flops_per_sample(dit, training=False) == forward
    assert flops_per_sample(dit, training=True) == 3 * forward
    # an iteration: 2 prompts x 2 samples, 4 sampler steps of which 2 are trained (stride 2),
    # the data term on both trained steps for the 2 prompts; no KL reference
    iteration = ddrl_iteration_flops(config)
    assert iteration == {"rollout": 4 * 4 * forward, "policy": 2 * 4 * 3 * forward,
                         "data": 2 * 2 * 3 * forward}


def test_step_throughput_by_hand(tiny_overrides):
    config = load_config(None, tiny_overrides)
    figures = step_throughput(config, step_time_s=0.5, peak_flops=1e9, num_devices=2)
    model_flops = (16 + 24 + 12) * 92352  # the hand count above
    assert figures["samples_per_s"] == pytest.approx(4 / 0.5)
    assert figures["video_tokens_per_s"] == pytest.approx(4 * 8 / 0.5)
    assert figures["mfu"] == pytest.approx(model_flops / 0.5 / 2e9)
    with pytest.raises(ValueError, match="step_time_s"):
        step_throughput(config, step_time_s=0.0, peak_flops=1e9)


@pytest.mark.parametrize("name, key", [("NVIDIA H100 80GB HBM3", "h100-sxm"),
                                       ("NVIDIA H100 PCIe", "h100-pcie"), ("NVIDIA H200", "h200"),
                                       ("NVIDIA A100-SXM4-80GB", "a100"), ("NVIDIA L40S", "l40s"),
                                       ("NVIDIA B200", "b200"), ("NVIDIA H100 NVL", None),
                                       ("Tesla T4", None)])
def test_gpu_names_map_to_the_table(name, key):
    spec = spec_for_device_name(name)
    assert (spec.name if spec else None) == key


def test_table_peaks_are_dense_data_sheet_figures():
    # dense bf16 is half the data sheets' "with sparsity" tensor figure
    assert DEVICES["h100-sxm"].peak_flops["bf16"] == pytest.approx(1979e12 / 2, rel=1e-3)
    assert DEVICES["h100-pcie"].peak_flops["bf16"] == pytest.approx(1513e12 / 2, rel=1e-3)
    assert DEVICES["a100"].peak_flops["bf16"] == 312e12
    for spec in DEVICES.values():  # tensor cores beat the fp32 units; tf32 at half of bf16
        assert spec.peak_flops["bf16"] > spec.peak_flops["tf32"] > spec.peak_flops["fp32"]
        assert spec.peak_flops["tf32"] == pytest.approx(spec.peak_flops["bf16"] / 2, rel=0.03)
    assert device_spec("H100") is DEVICES["h100-sxm"]
    with pytest.raises(ValueError, match="unknown GPU type 'v100'; known: a100"):
        device_spec("v100")


def test_device_peak_flops_uses_the_table_for_known_gpus_else_the_probe(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert device_peak_flops("cuda:0", torch.bfloat16) == pytest.approx(989.4e12)
    assert device_peak_flops("cuda:0", torch.float32) == pytest.approx(66.9e12)
    probed = []
    monkeypatch.setattr(throughput, "_probed_peak", lambda device, dtype: probed.append(device) or 5e12)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    assert device_peak_flops("cuda:0", torch.bfloat16) == 5e12
    assert device_peak_flops("cpu", torch.float32) == 5e12
    assert probed == ["cuda:0", "cpu"]
    with pytest.raises(ValueError, match="no peak for dtype torch.int8"):
        math_mode(torch.int8)


def test_fp32_math_mode_follows_torchs_tf32_setting():
    previous = torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        assert math_mode(torch.float32) == "fp32"
        torch.set_float32_matmul_precision("high")
        assert math_mode(torch.float32) == "tf32"
    finally:
        torch.set_float32_matmul_precision(previous[0])
        torch.backends.cuda.matmul.allow_tf32 = previous[1]


def test_cpu_probe_measures_a_positive_cached_peak():
    throughput._probed_peak.cache_clear()
    first = device_peak_flops("cpu", torch.float32)
    assert 1e8 < first < 1e14  # between 0.1 GFLOP/s and 100 TFLOP/s on any CPU
    assert device_peak_flops("cpu", torch.float32) == first  # measured once per process
