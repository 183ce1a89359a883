"""Hardware detection and the readable profile rule."""

import pytest

from appliance.hardware import EFFECTIVE_BATCH, GpuInfo, HardwareInfo, detect_hardware, plan_profile


def _machine(*gpus):
    return HardwareInfo("test cpu", 8, 16, 64.0, 500.0, "/", tuple(gpus))


def _gpu(vram, cc=(8, 0), i=0):
    return GpuInfo(i, f"GPU{vram}", vram, cc, "555.1")


def test_detect_runs_here(tmp_path):
    hw = detect_hardware(tmp_path / "not-yet-created")
    assert hw.cores_logical >= 1 and hw.ram_gb > 0 and hw.disk_free_gb > 0
    if not hw.gpus:
        assert plan_profile(hw).device == "cpu"


@pytest.mark.parametrize("vram,cc,tier,variant,precision", [
    (6.0, (8, 6), "gpu-6gb", "lite", "bf16"),
    (8.0, (7, 5), "gpu-8-12gb", "lite", "fp16"),
    (11.0, (6, 1), "gpu-8-12gb", "lite", "fp16"),
    (24.0, (8, 9), "gpu-16-24gb", "standard", "bf16"),
    (48.0, (8, 6), "gpu-40gb", "standard", "bf16"),
    (80.0, (9, 0), "gpu-80gb", "standard", "bf16"),
])
def test_tiers(vram, cc, tier, variant, precision):
    p = plan_profile(_machine(_gpu(vram, cc)))
    assert (p.name, p.variant, p.precision) == (tier, variant, precision)
    assert p.micro_batch * p.grad_accumulation >= EFFECTIVE_BATCH
    assert p.reasons


def test_multi_gpu_uses_smallest_and_ddp():
    p = plan_profile(_machine(*(_gpu(80.0, (9, 0), i) for i in range(7)), _gpu(40.0, (8, 0), 7)))
    assert p.name == "gpu-40gb-x8" and p.distributed == "ddp" and p.n_gpus == 8
    assert p.grad_accumulation == 1


def test_cpu_profile_and_forced_cpu():
    assert plan_profile(_machine()).precision == "fp32"
    forced = plan_profile(_machine(_gpu(80.0)), device="cpu")
    assert forced.device == "cpu" and "forced" in forced.reasons[0]


def test_too_small_gpu_is_clear():
    with pytest.raises(ValueError, match="at least 5 GB"):
        plan_profile(_machine(_gpu(4.0)))
