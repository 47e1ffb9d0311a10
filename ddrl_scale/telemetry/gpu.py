"""Device telemetry sampled in a background thread, for the trainer's metrics stream.

With NVML (nvidia-ml-py, imported as `pynvml`) it reads per GPU: utilisation (%), memory used (GB),
power (W), temperature (C) and SM clock (MHz). A reading that fails (not supported by the GPU, or
an NVML error) drops that metric alone for the rest of the run, said once; when every reading of a
sample fails (the GPU fell off the bus, the driver went away) or there is no NVML (no GPU, no
driver), it falls back to this process's CPU % and RSS from psutil and says so once. On CUDA each
snapshot also carries this process's CUDA allocator peaks since the start
(`cuda_peak_allocated_gb`, `cuda_peak_reserved_gb`: telemetry/memory.py). `snapshot()` hands the
train loop flat metric names (`gpu0_util`, `gpu0_mem_gb`, ..., or `cpu_percent`, `rss_gb`): means
over the samples since the previous snapshot, plus `_max` of the memory figures, since the peak is
what decides an out-of-memory.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from collections.abc import Callable, Sequence
from types import ModuleType, TracebackType
from typing import Any

logger = logging.getLogger(__name__)

GB = 1e9  # decimal gigabytes, as the metric names say
NVML_NOT_SUPPORTED = 3  # NVML_ERROR_NOT_SUPPORTED: a query this GPU model does not answer
PEAK_TRACKED = ("mem_gb", "rss_gb")  # metric suffixes that also get a `_max`


def visible_gpu_indices(nvml: Any, count: int) -> list[int]:
    """NVML indices of the GPUs this process may use: CUDA_VISIBLE_DEVICES (indices or GPU-
    UUIDs) when set, else all `count`. NVML itself ignores CUDA_VISIBLE_DEVICES."""
    setting = os.environ.get("CUDA_VISIBLE_DEVICES")
    if setting is None:
        return list(range(count))
    indices = []
    for entry in (item.strip() for item in setting.split(",") if item.strip()):
        if entry.isdigit():
            indices.append(int(entry))
        elif entry.startswith("GPU-"):
            indices.append(int(nvml.nvmlDeviceGetIndex(nvml.nvmlDeviceGetHandleByUUID(entry))))
        else:  # MIG instances and other forms: the whole board is the honest figure
            logger.info("telemetry: CUDA_VISIBLE_DEVICES entry %r is not an index or GPU UUID; "
                        "sampling all %d GPUs", entry, count)
            return list(range(count))
    return [index for index in indices if index < count]


class TelemetrySampler:
    """Samples every `interval_s` seconds in a daemon thread; `snapshot()` returns and resets.

    devices: NVML indices (as nvidia-smi numbers them) to sample; None = the visible ones.
    nvml: a module with pynvml's interface, to use instead of importing pynvml (tests pass a
    stand-in). Metric names use the NVML index: `gpu{index}_util` and so on. gpus=False: a run
    on the CPU, straight to psutil without looking for NVML (and without saying it is missing).
    """

    def __init__(self, interval_s: float = 1.0, devices: Sequence[int] | None = None, *,
                 nvml: ModuleType | Any | None = None, gpus: bool = True):
        if not interval_s > 0:
            raise ValueError(f"TelemetrySampler interval_s: expected a number of seconds > 0, "
                             f"got {interval_s!r}")
        self.interval_s = float(interval_s)
        self._lock = threading.Lock()  # the running sums
        self._switch_lock = threading.Lock()  # the NVML -> psutil switch
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self._maxima: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fallback_said = False
        self._unsupported: set[str] = set()
        self._nvml: Any | None = None
        self._handles: dict[int, Any] = {}
        self._process = None
        self._closed = False
        self.source = "none"
        if gpus:
            self._open_nvml(nvml, devices)
        if self._nvml is None:
            self._open_psutil()

    # -- sources --------------------------------------------------------------------------------
    def _open_nvml(self, nvml: Any | None, devices: Sequence[int] | None) -> None:
        try:
            module = nvml if nvml is not None else importlib.import_module("pynvml")
        except ImportError as error:
            self._say_fallback(f"nvidia-ml-py is not installed ({error})")
            return
        try:
            module.nvmlInit()
            count = int(module.nvmlDeviceGetCount())
            indices = visible_gpu_indices(module, count) if devices is None else list(devices)
        except Exception as error:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...: no usable NVML
            self._say_fallback(f"NVML is not usable ({type(error).__name__}: {error})")
            return
        wrong = [index for index in indices if not 0 <= index < count]
        if wrong:
            module.nvmlShutdown()
            raise ValueError(f"TelemetrySampler devices: NVML indices {wrong} do not exist; this "
                             f"machine has {count} GPUs (0..{count - 1})")
        if not indices:
            module.nvmlShutdown()
            self._say_fallback("NVML sees no GPU for this process")
            return
        try:
            self._handles = {index: module.nvmlDeviceGetHandleByIndex(index) for index in indices}
        except Exception as error:
            module.nvmlShutdown()
            self._say_fallback(f"NVML could not open the GPUs ({type(error).__name__}: {error})")
            return
        self._nvml, self.source = module, "nvml"

    def _open_psutil(self) -> None:
        try:
            import psutil
        except ImportError:
            logger.warning("telemetry: neither NVML nor psutil is available; no device telemetry "
                           "(pip install nvidia-ml-py psutil)")
            self.source = "none"
            return
        self._process = psutil.Process()
        self._process.cpu_percent(None)  # the first call only starts psutil's interval
        self.source = "psutil"

    def _say_fallback(self, reason: str) -> None:
        if not self._fallback_said:
            self._fallback_said = True
            logger.warning("telemetry: %s; falling back to CPU %% and RSS from psutil", reason)

    # -- sampling -------------------------------------------------------------------------------
    def _query(self, name: str, read: Callable[[], float]) -> float | None:
        """One NVML reading; a query this GPU does not support is dropped (once), others raise."""
        if name in self._unsupported:
            return None
        try:
            return float(read())
        except Exception as error:
            if getattr(error, "value", None) != NVML_NOT_SUPPORTED:
                raise
            self._unsupported.add(name)
            logger.info("telemetry: %s is not supported by this GPU; left out", name)
            return None

    def _drop(self, failed: dict[str, Exception]) -> None:
        """Leave out the metrics whose reading raised, each said once; the others go on."""
        for name, error in failed.items():
            self._unsupported.add(name)
            logger.warning("telemetry: NVML failed reading %s (%s: %s); that metric is left out for "
                           "the rest of the run, the others go on", name, type(error).__name__, error)

    def _sample_nvml(self) -> dict[str, float]:
        """Every reading; one that raises is dropped alone, unless all of them raise (then the
        first error propagates and sample() falls back to psutil)."""
        nvml, values, failed = self._nvml, {}, {}
        for index, handle in self._handles.items():
            readings = {
                "util": lambda h=handle: nvml.nvmlDeviceGetUtilizationRates(h).gpu,
                "mem_gb": lambda h=handle: nvml.nvmlDeviceGetMemoryInfo(h).used / GB,
                "power_w": lambda h=handle: nvml.nvmlDeviceGetPowerUsage(h) / 1000.0,  # mW
                "temp_c": lambda h=handle: nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU),
                "sm_clock_mhz": lambda h=handle: nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM),
            }
            for suffix, read in readings.items():
                name = f"gpu{index}_{suffix}"
                try:
                    value = self._query(name, read)
                except Exception as error:  # one query's NVML error: that metric only
                    failed[name] = error
                    continue
                if value is not None:
                    values[name] = value
        if failed and not values:
            raise next(iter(failed.values()))
        self._drop(failed)
        return values

    def _sample_psutil(self) -> dict[str, float]:
        if self._process is None:
            return {}
        return {"cpu_percent": float(self._process.cpu_percent(None)),
                "rss_gb": self._process.memory_info().rss / GB}

    def sample(self) -> dict[str, float]:
        """Read the figures once now (the thread calls this) and add them to the running means."""
        values: dict[str, float] = {}
        if self._nvml is not None:
            try:
                values = self._sample_nvml()
            except Exception as error:  # the GPU fell off the bus, the driver went away, ...
                with self._switch_lock:  # the thread and an on-demand snapshot may both get here
                    if self._nvml is not None:
                        self._close_nvml()
                        self._say_fallback(f"NVML failed while sampling "
                                           f"({type(error).__name__}: {error})")
                        self._open_psutil()
        if self._nvml is None:
            values = self._sample_psutil()
        with self._lock:
            for name, value in values.items():
                self._sums[name] = self._sums.get(name, 0.0) + value
                self._counts[name] = self._counts.get(name, 0) + 1
                self._maxima[name] = max(self._maxima.get(name, value), value)
        return values

    def snapshot(self) -> dict[str, float]:
        """Means (and `_max` of memory) since the last snapshot; samples now if none came since
        (unless stopped: then it returns what was gathered, possibly nothing)."""
        with self._lock:
            empty = not self._counts
        if empty and not self._closed:
            self.sample()
        with self._lock:
            out = {name: self._sums[name] / self._counts[name] for name in self._sums}
            out.update({f"{name}_max": value for name, value in self._maxima.items()
                        if name.endswith(PEAK_TRACKED)})
            self._sums, self._counts, self._maxima = {}, {}, {}
        from ddrl_scale.telemetry.memory import cuda_peak_memory  # torch only where it is used

        out.update(cuda_peak_memory())  # the current device: this rank's (init_world sets it)
        return out

    # -- thread ---------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
            except Exception:  # telemetry must never stop training: log and keep going
                logger.exception("telemetry: sampling failed")
            self._stop.wait(self.interval_s)

    def start(self) -> TelemetrySampler:
        if self._thread is not None:
            raise RuntimeError("TelemetrySampler.start: already running")
        if self._closed:
            raise RuntimeError("TelemetrySampler.start: this sampler was stopped; make a new one")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="ddrl-telemetry", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop and join the thread (at most one interval's wait), then release NVML."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        self._closed = True
        self._close_nvml()

    def _close_nvml(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception as error:  # shutting down a broken NVML: nothing left to save
                logger.debug("telemetry: nvmlShutdown failed: %s", error)
            self._nvml, self._handles = None, {}

    @property
    def running(self) -> bool:
        return self._thread is not None

    def __enter__(self) -> TelemetrySampler:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()
