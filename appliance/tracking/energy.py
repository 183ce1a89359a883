"""Energy used by a training job, and its CO2e: GreenRFM reports what a model cost to train.

    with EnergyMeter(grid_intensity_g_per_kwh=cfg_value) as meter:
        train(...)
        run.log_metrics(meter.read().to_metrics(), step=epoch)   # running total
    run.log_metrics(meter.report.to_metrics(), step=last_step)
    run.log_dict(meter.report.to_dict(), "energy.json")

GPU: NVML (nvidia-ml-py). Per GPU the driver's total-energy counter (millijoules since the driver
loaded; Volta and newer) when it answers, else a background thread samples the board power every
`sample_every_s` and integrates it (trapezoid rule). Both measure the whole board, including other
processes on the same GPU.

CPU: Linux RAPL package counters, /sys/class/powercap/intel-rapl:<n>/energy_uj (also present on AMD
Zen), top-level packages only: sub-zones (core, uncore, dram) are parts of their package, and a
"psys" zone covers the whole platform, so either would count energy twice. DRAM outside the package
is not counted. The counters wrap at max_energy_range_uj (minutes to an hour at full load), so they
are read every `sample_every_s` too. On current kernels energy_uj is readable by root only; then the
CPU energy is None with that reason.

Grid intensity (gCO2e per kWh) is the site's: set it in site.yaml for the local grid (e.g. ~30 in
France, ~350 in Germany, ~400 the world average); 400 is only a default.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METHOD_COUNTER = "nvml-energy-counter"
METHOD_SAMPLING = "nvml-power-sampling"
METHOD_RAPL = "rapl-energy-counter"
DEFAULT_GRID_INTENSITY = 400.0

_MJ_PER_KWH = 3.6e9  # millijoules
_UJ_PER_KWH = 3.6e12  # microjoules
_RAPL_PACKAGE = re.compile(r"^intel-rapl:\d+$")


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:200] if text else type(exc).__name__


@dataclass
class EnergyReport:
    seconds: float
    gpu_kwh: float | None
    cpu_kwh: float | None
    total_kwh: float | None  # the sum of what was measured; None when nothing was
    co2e_g: float | None  # total_kwh * grid_intensity_g_per_kwh
    grid_intensity_g_per_kwh: float
    gpu_method: str  # METHOD_COUNTER, METHOD_SAMPLING, "mixed: ...", "unavailable: <reason>"
    cpu_method: str  # METHOD_RAPL, "disabled", "unavailable: <reason>"
    per_gpu: list[dict[str, Any]] = field(default_factory=list)  # index, name, method, kwh

    def to_metrics(self) -> dict[str, float]:
        """Flat floats for MLflow; what was not measured is left out."""
        values = {
            "energy_gpu_kwh": self.gpu_kwh,
            "energy_cpu_kwh": self.cpu_kwh,
            "energy_total_kwh": self.total_kwh,
            "co2e_g": self.co2e_g,
            "energy_seconds": self.seconds,
        }
        return {k: float(v) for k, v in values.items() if v is not None}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class _Gpu:
    index: int
    name: str | None
    handle: Any
    method: str
    start_mj: float = 0.0  # counter value at start
    counter_mj: float = 0.0  # energy since start, counter method
    sampled_mj: float = 0.0  # integrated energy, sampling method
    last_t: float | None = None
    last_mw: float | None = None

    @property
    def kwh(self) -> float | None:
        if self.method == METHOD_COUNTER:
            return self.counter_mj / _MJ_PER_KWH
        if self.method == METHOD_SAMPLING:
            return self.sampled_mj / _MJ_PER_KWH
        return None


@dataclass
class _Package:
    path: Path
    max_range_uj: int | None
    last_uj: int
    total_uj: int = 0


class EnergyMeter:
    """Measures GPU and CPU energy between start() and stop(); also a context manager.

    gpu_indices: NVML indices to measure (default: all GPUs). sample_every_s: the power-sampling and
    RAPL polling period. rapl_root: the powercap folder (a parameter for tests).
    """

    def __init__(
        self,
        gpu_indices: list[int] | None = None,
        sample_every_s: float = 1.0,
        cpu_rapl: bool = True,
        grid_intensity_g_per_kwh: float = DEFAULT_GRID_INTENSITY,
        rapl_root: Path = Path("/sys/class/powercap"),
    ):
        if sample_every_s <= 0:
            raise ValueError("sample_every_s must be > 0")
        self.gpu_indices = None if gpu_indices is None else list(gpu_indices)
        self.sample_every_s = float(sample_every_s)
        self.cpu_rapl = cpu_rapl
        self.grid_intensity_g_per_kwh = float(grid_intensity_g_per_kwh)
        self.rapl_root = Path(rapl_root)
        self.report: EnergyReport | None = None  # set by stop()
        self._lock = threading.Lock()
        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml: Any = None
        self._gpus: list[_Gpu] = []
        self._gpu_unavailable: str | None = None
        self._packages: list[_Package] = []
        self._cpu_method = "disabled"
        self._t0: float | None = None
        self._t1: float | None = None

    # ---------------------------------------------------------------------------------- lifecycle

    def start(self) -> EnergyMeter:
        if self._t0 is not None:
            raise RuntimeError("EnergyMeter already started")
        self._t0 = time.monotonic()
        self._start_gpus()
        self._start_rapl()
        if any(g.method == METHOD_SAMPLING for g in self._gpus) or self._packages:
            self._thread = threading.Thread(target=self._run, name="energy-meter", daemon=True)
            self._thread.start()
        return self

    def read(self) -> EnergyReport:
        """The totals so far (the meter keeps running)."""
        if self._t0 is None:
            raise RuntimeError("EnergyMeter not started")
        if self._t1 is not None:
            return self.report
        self._poll(counters=True)
        return self._report(time.monotonic())

    def stop(self) -> EnergyReport:
        if self._t0 is None:
            raise RuntimeError("EnergyMeter not started")
        if self._t1 is not None:
            return self.report
        self._stop_event.set()
        if self._thread is not None:
            self._thread.join()
        self._poll(counters=True)
        self._t1 = time.monotonic()
        self.report = self._report(self._t1)
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
        return self.report

    def __enter__(self) -> EnergyMeter:
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stop()

    # ---------------------------------------------------------------------------------- GPU

    def _start_gpus(self) -> None:
        try:
            nvml = importlib.import_module("pynvml")
        except ImportError:
            self._gpu_unavailable = "nvidia-ml-py (pynvml) is not installed"
            return
        try:
            nvml.nvmlInit()
        except Exception as exc:  # no driver, no library
            self._gpu_unavailable = f"NVML did not start ({_reason(exc)})"
            return
        self._nvml = nvml
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except Exception as exc:
            self._gpu_unavailable = f"NVML cannot count GPUs ({_reason(exc)})"
            return
        indices = list(range(count)) if self.gpu_indices is None else self.gpu_indices
        if not indices:
            self._gpu_unavailable = "no GPU"
            return
        now = time.monotonic()
        for index in indices:
            if not 0 <= index < count:
                self._gpus.append(_Gpu(index, None, None, f"unavailable: no GPU {index} (NVML sees {count})"))
                continue
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
            except Exception as exc:
                self._gpus.append(_Gpu(index, None, None, f"unavailable: {_reason(exc)}"))
                continue
            name = None
            try:
                name = nvml.nvmlDeviceGetName(handle)
                name = name.decode() if isinstance(name, bytes) else str(name)
            except Exception:
                pass
            gpu = _Gpu(index, name, handle, METHOD_COUNTER)
            try:
                gpu.start_mj = float(nvml.nvmlDeviceGetTotalEnergyConsumption(handle))
            except Exception:  # pre-Volta, or not supported on this board/driver
                gpu.method = METHOD_SAMPLING
                try:
                    gpu.last_mw = float(nvml.nvmlDeviceGetPowerUsage(handle))
                    gpu.last_t = now
                except Exception as exc:
                    gpu.method = f"unavailable: neither energy counter nor power reading ({_reason(exc)})"
            self._gpus.append(gpu)

    def _sample_power(self, gpu: _Gpu, now: float) -> None:
        try:
            mw = float(self._nvml.nvmlDeviceGetPowerUsage(gpu.handle))
        except Exception:  # a missed sample: the next one spans the gap
            return
        if gpu.last_t is not None and gpu.last_mw is not None:
            gpu.sampled_mj += (gpu.last_mw + mw) / 2.0 * (now - gpu.last_t)
        gpu.last_t, gpu.last_mw = now, mw

    def _read_counter(self, gpu: _Gpu) -> None:
        try:
            value = float(self._nvml.nvmlDeviceGetTotalEnergyConsumption(gpu.handle))
        except Exception:  # keep the last good reading
            return
        gpu.counter_mj = max(0.0, value - gpu.start_mj)

    # ---------------------------------------------------------------------------------- CPU

    def _start_rapl(self) -> None:
        if not self.cpu_rapl:
            self._cpu_method = "disabled"
            return
        try:
            zones = sorted(p for p in self.rapl_root.iterdir() if _RAPL_PACKAGE.match(p.name))
        except OSError:
            zones = []
        packages, denied = [], False
        for zone in zones:
            try:
                if (zone / "name").read_text().strip() == "psys":
                    continue
            except OSError:
                pass
            try:
                start = int((zone / "energy_uj").read_text().strip())
            except PermissionError:
                denied = True
                continue
            except (OSError, ValueError):
                continue
            try:
                max_range = int((zone / "max_energy_range_uj").read_text().strip())
            except (OSError, ValueError):
                max_range = None
            packages.append(_Package(zone, max_range, start))
        if packages:
            self._packages = packages
            self._cpu_method = METHOD_RAPL
        elif denied:
            self._cpu_method = "unavailable: RAPL energy_uj is not readable (root only on current kernels)"
        elif zones:
            self._cpu_method = "unavailable: RAPL package counters could not be read"
        else:
            self._cpu_method = "unavailable: no RAPL package counters (not Linux, or no powercap driver)"

    def _read_rapl(self, pkg: _Package) -> None:
        try:
            value = int((pkg.path / "energy_uj").read_text().strip())
        except (OSError, ValueError):
            return
        delta = value - pkg.last_uj
        if delta < 0:  # the counter wrapped
            delta = value + pkg.max_range_uj - pkg.last_uj if pkg.max_range_uj else 0
        pkg.total_uj += max(0, delta)
        pkg.last_uj = value

    # ---------------------------------------------------------------------------------- polling

    def _run(self) -> None:
        while not self._stop_event.wait(self.sample_every_s):
            self._poll(counters=False)

    def _poll(self, counters: bool) -> None:
        """Integrate power samples and accumulate RAPL deltas; read the GPU energy counters only
        when asked (they need no polling: 64-bit millijoules do not wrap)."""
        with self._lock:
            now = time.monotonic()
            for gpu in self._gpus:
                if gpu.method == METHOD_SAMPLING:
                    self._sample_power(gpu, now)
                elif gpu.method == METHOD_COUNTER and counters:
                    self._read_counter(gpu)
            for pkg in self._packages:
                self._read_rapl(pkg)

    def _report(self, now: float) -> EnergyReport:
        with self._lock:
            per_gpu = [{"index": g.index, "name": g.name, "method": g.method, "kwh": g.kwh} for g in self._gpus]
            if self._gpu_unavailable is not None:
                gpu_method = f"unavailable: {self._gpu_unavailable}"
            else:
                methods = list(dict.fromkeys(g.method for g in self._gpus))
                gpu_method = methods[0] if len(methods) == 1 else "mixed: " + "; ".join(methods)
            measured = [g["kwh"] for g in per_gpu if g["kwh"] is not None]
            gpu_kwh = sum(measured) if measured else None
            cpu_kwh = sum(p.total_uj for p in self._packages) / _UJ_PER_KWH if self._packages else None
        parts = [v for v in (gpu_kwh, cpu_kwh) if v is not None]
        total = sum(parts) if parts else None
        return EnergyReport(
            seconds=now - self._t0,
            gpu_kwh=gpu_kwh,
            cpu_kwh=cpu_kwh,
            total_kwh=total,
            co2e_g=None if total is None else total * self.grid_intensity_g_per_kwh,
            grid_intensity_g_per_kwh=self.grid_intensity_g_per_kwh,
            gpu_method=gpu_method,
            cpu_method=self._cpu_method,
            per_gpu=per_gpu,
        )
