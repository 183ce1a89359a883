"""appliance.tracking.energy: GPU energy through a fake NVML, CPU energy through a fake RAPL folder."""

from __future__ import annotations

import sys
import threading
import time
import types
from pathlib import Path

import pytest

from appliance.tracking.energy import METHOD_COUNTER, METHOD_RAPL, METHOD_SAMPLING, EnergyMeter, EnergyReport

MJ_PER_KWH = 3.6e9


class FakeNVMLError(Exception):
    pass


def fake_nvml(*, energy_mj: list[float] | None = None, power_mw: float | None = None, count: int | None = None,
              init_error: str | None = None) -> types.ModuleType:
    """A pynvml stand-in. energy_mj: each GPU's total-energy counter (None: the call fails as on
    pre-Volta boards); power_mw: every GPU's constant board power."""
    mod = types.ModuleType("pynvml")
    mod.NVMLError = FakeNVMLError
    mod.energy_mj = energy_mj
    mod.power_calls = 0
    mod.shutdowns = 0
    mod.lock = threading.Lock()
    n = count if count is not None else (len(energy_mj) if energy_mj else 1)

    def nvmlInit():
        if init_error:
            raise FakeNVMLError(init_error)

    def nvmlShutdown():
        mod.shutdowns += 1

    def nvmlDeviceGetTotalEnergyConsumption(handle):
        if mod.energy_mj is None:
            raise FakeNVMLError("Not Supported")
        return int(mod.energy_mj[handle])

    def nvmlDeviceGetPowerUsage(handle):
        if power_mw is None:
            raise FakeNVMLError("Not Supported")
        with mod.lock:
            mod.power_calls += 1
        return int(power_mw)

    mod.nvmlInit = nvmlInit
    mod.nvmlShutdown = nvmlShutdown
    mod.nvmlDeviceGetCount = lambda: n
    mod.nvmlDeviceGetHandleByIndex = lambda i: i
    mod.nvmlDeviceGetName = lambda h: b"Fake H100"
    mod.nvmlDeviceGetTotalEnergyConsumption = nvmlDeviceGetTotalEnergyConsumption
    mod.nvmlDeviceGetPowerUsage = nvmlDeviceGetPowerUsage
    return mod


def test_energy_counter_gives_exact_kwh(monkeypatch, tmp_path):
    fake = fake_nvml(energy_mj=[5_000_000.0, 7_000_000.0])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    meter = EnergyMeter(cpu_rapl=False, grid_intensity_g_per_kwh=50.0)
    with meter:
        fake.energy_mj = [5_000_000.0 + 0.25 * MJ_PER_KWH, 7_000_000.0 + 0.5 * MJ_PER_KWH]
        running = meter.read()
        assert running.gpu_kwh == pytest.approx(0.75, abs=1e-12)
        fake.energy_mj = [5_000_000.0 + 1.0 * MJ_PER_KWH, 7_000_000.0 + 1.5 * MJ_PER_KWH]
    report = meter.report
    assert report.gpu_method == METHOD_COUNTER
    assert report.gpu_kwh == pytest.approx(2.5, abs=1e-12)
    assert [g["kwh"] for g in report.per_gpu] == [pytest.approx(1.0), pytest.approx(1.5)]
    assert {g["method"] for g in report.per_gpu} == {METHOD_COUNTER}
    assert report.per_gpu[0]["name"] == "Fake H100"
    assert report.cpu_kwh is None and report.cpu_method == "disabled"
    assert report.total_kwh == pytest.approx(2.5)
    assert report.co2e_g == pytest.approx(2.5 * 50.0)
    assert report.grid_intensity_g_per_kwh == 50.0
    assert report.seconds >= 0
    assert fake.shutdowns == 1
    assert meter.stop() is report  # a second stop returns the same report

    metrics = report.to_metrics()
    assert metrics == {"energy_gpu_kwh": pytest.approx(2.5), "energy_total_kwh": pytest.approx(2.5),
                       "co2e_g": pytest.approx(125.0), "energy_seconds": pytest.approx(report.seconds)}
    assert all(isinstance(v, float) for v in metrics.values())


def test_gpu_indices_select_gpus(monkeypatch):
    fake = fake_nvml(energy_mj=[0.0, 0.0])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    with EnergyMeter(gpu_indices=[1, 3], cpu_rapl=False) as meter:
        fake.energy_mj = [MJ_PER_KWH, 2 * MJ_PER_KWH]
    report = meter.report
    assert [g["index"] for g in report.per_gpu] == [1, 3]
    assert report.per_gpu[1]["method"].startswith("unavailable: no GPU 3")
    assert report.gpu_kwh == pytest.approx(2.0)
    assert report.gpu_method.startswith("mixed: ")


def test_power_sampling_integrates_when_the_counter_fails(monkeypatch):
    watts = 250.0
    fake = fake_nvml(energy_mj=None, power_mw=watts * 1000, count=1)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    with EnergyMeter(sample_every_s=0.02, cpu_rapl=False) as meter:
        time.sleep(0.3)
    report = meter.report
    assert report.gpu_method == METHOD_SAMPLING
    assert report.per_gpu[0]["method"] == METHOD_SAMPLING
    assert fake.power_calls >= 5, "the background thread samples the power"
    expected = watts * report.seconds / 3.6e6
    assert report.gpu_kwh == pytest.approx(expected, rel=0.05)
    assert report.co2e_g == pytest.approx(report.gpu_kwh * 400.0)
    assert not any(t.name == "energy-meter" and t.is_alive() for t in threading.enumerate())


def test_no_nvml_gives_none_with_a_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    with EnergyMeter(cpu_rapl=False) as meter:
        pass
    report = meter.report
    assert report.gpu_kwh is None and report.total_kwh is None and report.co2e_g is None
    assert report.gpu_method.startswith("unavailable:") and "pynvml" in report.gpu_method
    assert report.per_gpu == []
    assert report.to_metrics() == {"energy_seconds": pytest.approx(report.seconds)}

    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(init_error="Driver Not Loaded"))
    with EnergyMeter(cpu_rapl=False) as meter:
        pass
    assert meter.report.gpu_kwh is None
    assert meter.report.gpu_method.startswith("unavailable: NVML did not start")
    assert "Driver Not Loaded" in meter.report.gpu_method

    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(energy_mj=[], count=0))
    with EnergyMeter(cpu_rapl=False) as meter:
        pass
    assert meter.report.gpu_kwh is None and meter.report.gpu_method == "unavailable: no GPU"


def _zone(root: Path, name: str, label: str, energy_uj: int, max_uj: int) -> Path:
    zone = root / name
    zone.mkdir(parents=True)
    (zone / "name").write_text(f"{label}\n")
    (zone / "energy_uj").write_text(f"{energy_uj}\n")
    (zone / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return zone


def test_rapl_packages_with_wrap_around(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    root = tmp_path / "powercap"
    pkg0 = _zone(root, "intel-rapl:0", "package-0", 900_000, 1_000_000)
    pkg1 = _zone(root, "intel-rapl:1", "package-1", 5_000, 10**12)
    core = _zone(root, "intel-rapl:0:0", "core", 0, 1_000_000)  # a sub-zone: part of package 0
    psys = _zone(root, "intel-rapl:2", "psys", 0, 10**12)  # the whole platform: would count twice
    (root / "intel-rapl").mkdir()  # the control type folder

    meter = EnergyMeter(sample_every_s=60, cpu_rapl=True, grid_intensity_g_per_kwh=100.0, rapl_root=root)
    meter.start()
    (pkg0 / "energy_uj").write_text("990000\n")  # +90_000
    (core / "energy_uj").write_text("999999\n")
    (psys / "energy_uj").write_text("999999999\n")
    assert meter.read().cpu_kwh == pytest.approx(90_000 / 3.6e12)
    (pkg0 / "energy_uj").write_text("10000\n")  # wrapped: +20_000
    meter.read()
    (pkg0 / "energy_uj").write_text("980000\n")  # +970_000
    meter.read()
    (pkg0 / "energy_uj").write_text("100000\n")  # wrapped again: +120_000
    (pkg1 / "energy_uj").write_text("3605000\n")  # +3_600_000
    report = meter.stop()

    total_uj = 90_000 + 20_000 + 970_000 + 120_000 + 3_600_000
    assert report.cpu_method == METHOD_RAPL
    assert report.cpu_kwh == pytest.approx(total_uj / 3.6e12, rel=1e-12)
    assert report.gpu_kwh is None
    assert report.total_kwh == pytest.approx(report.cpu_kwh)
    assert report.co2e_g == pytest.approx(report.cpu_kwh * 100.0)
    assert set(report.to_metrics()) == {"energy_cpu_kwh", "energy_total_kwh", "co2e_g", "energy_seconds"}


def test_gpu_and_cpu_add_up(monkeypatch, tmp_path):
    fake = fake_nvml(energy_mj=[0.0])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    root = tmp_path / "powercap"
    pkg = _zone(root, "intel-rapl:0", "package-0", 0, 10**12)
    with EnergyMeter(sample_every_s=60, rapl_root=root) as meter:
        fake.energy_mj = [2 * MJ_PER_KWH]
        (pkg / "energy_uj").write_text(f"{int(0.5 * 3.6e12)}\n")
    report = meter.report
    assert (report.gpu_kwh, report.cpu_kwh) == (pytest.approx(2.0), pytest.approx(0.5))
    assert report.total_kwh == pytest.approx(2.5)
    assert report.co2e_g == pytest.approx(2.5 * 400.0)


def test_no_rapl_gives_none_with_a_reason(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    with EnergyMeter(rapl_root=tmp_path / "missing") as meter:
        pass
    assert meter.report.cpu_kwh is None
    assert meter.report.cpu_method.startswith("unavailable:")


def test_report_is_a_plain_dict():
    report = EnergyReport(seconds=1.0, gpu_kwh=None, cpu_kwh=0.1, total_kwh=0.1, co2e_g=40.0,
                          grid_intensity_g_per_kwh=400.0, gpu_method="unavailable: x", cpu_method=METHOD_RAPL)
    assert report.to_dict()["per_gpu"] == []
    assert report.to_metrics() == {"energy_cpu_kwh": 0.1, "energy_total_kwh": 0.1, "co2e_g": 40.0,
                                   "energy_seconds": 1.0}
