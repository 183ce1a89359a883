"""Hardware detection and the readable profile rule."""

import pytest

from appliance.hardware import (
    EFFECTIVE_BATCH,
    PROFILE_TIERS,
    GpuInfo,
    HardwareInfo,
    apply_overrides,
    detect_hardware,
    halve_micro_batch,
    plan_profile,
    training_plan,
)


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


# ---------------------------------------------------------------- plans from NVML-like readings
# (name, memory total / 2**30 rounded to 0.1 GB as detect_hardware reports it, compute capability)


def _nvml(name, mib, cc, i=0):
    return GpuInfo(i, name, round(mib / 1024, 1), cc, "555.42.06")


def _samples_per_step(p):
    return p.micro_batch * p.grad_accumulation * max(1, p.n_gpus)


def test_profile_tiers_are_ordered_and_end_at_5gb():
    assert [t.min_vram_gb for t in PROFILE_TIERS] == sorted((t.min_vram_gb for t in PROFILE_TIERS), reverse=True)
    assert PROFILE_TIERS[-1].min_vram_gb == 5.0 and PROFILE_TIERS[-1].variant == "lite"


def test_plan_for_a_6gb_laptop_gpu():
    p = plan_profile(_machine(_nvml("NVIDIA GeForce RTX 3060 Laptop GPU", 6144, (8, 6))))
    assert (p.name, p.device, p.n_gpus, p.distributed) == ("gpu-6gb", "cuda", 1, "none")
    assert (p.variant, p.micro_batch, p.grad_accumulation, p.precision) == ("lite", 1, 10, "bf16")
    assert p.activation_checkpointing is True
    assert "RTX 3060 Laptop" in p.reasons[0] and "gpu-6gb" in p.reasons[0]


def test_plan_for_a_24gb_card():
    p = plan_profile(_machine(_nvml("NVIDIA GeForce RTX 4090", 24564, (8, 9))))  # NVML: 23.99 GiB
    assert (p.name, p.variant, p.precision) == ("gpu-16-24gb", "standard", "bf16")
    assert (p.micro_batch, p.grad_accumulation, p.activation_checkpointing) == (2, 5, True)
    assert _samples_per_step(p) == EFFECTIVE_BATCH


def test_plan_for_a_turing_24gb_card_uses_fp16():
    p = plan_profile(_machine(_nvml("Quadro RTX 6000", 24576, (7, 5))))
    assert (p.name, p.variant, p.precision) == ("gpu-16-24gb", "standard", "fp16")
    assert any("fp16" in r and "scaler" in r for r in p.reasons)


def test_plan_for_8x_h100():
    hw = _machine(*(_nvml("NVIDIA H100 80GB HBM3", 81559, (9, 0), i) for i in range(8)))  # 79.6 GB each
    p = plan_profile(hw)
    assert (p.name, p.device, p.n_gpus, p.distributed) == ("gpu-80gb-x8", "cuda", 8, "ddp")
    assert (p.variant, p.micro_batch, p.grad_accumulation, p.precision) == ("standard", 10, 1, "bf16")
    assert p.activation_checkpointing is False
    assert _samples_per_step(p) >= EFFECTIVE_BATCH
    assert any("DDP" in r for r in p.reasons)
    assert p.dataloader_workers >= 1


def test_plan_for_a_4gb_gpu_is_refused():
    with pytest.raises(ValueError, match="GTX 1650"):
        plan_profile(_machine(_nvml("NVIDIA GeForce GTX 1650", 4096, (7, 5))))


def test_cpu_plan_keeps_the_effective_batch():
    p = plan_profile(_machine())
    assert (p.device, p.precision, p.variant, p.n_gpus, p.distributed) == ("cpu", "fp32", "lite", 0, "none")
    assert p.micro_batch * p.grad_accumulation == EFFECTIVE_BATCH


# ---------------------------------------------------------------- site.yaml overrides


def test_micro_batch_override_recomputes_accumulation():
    base = plan_profile(_machine(_gpu(80.0, (9, 0))))
    assert (base.micro_batch, base.grad_accumulation) == (10, 1)
    p = apply_overrides(base, {"micro_batch": 4})
    assert (p.micro_batch, p.grad_accumulation) == (4, 3)  # ceil(10 / 4)
    assert "micro_batch=4" in p.reasons[-1] and "train.plan" in p.reasons[-1]
    assert p.reasons[:-1] == base.reasons
    assert (base.micro_batch, base.grad_accumulation) == (10, 1)  # the original plan is left alone


def test_micro_batch_override_counts_every_gpu():
    base = plan_profile(_machine(*(_gpu(24.0, (8, 9), i) for i in range(2))))
    p = apply_overrides(base, {"micro_batch": 1})
    assert (p.micro_batch, p.grad_accumulation) == (1, 5)  # 1 x 2 GPUs x 5 = 10


def test_explicit_accumulation_and_other_fields_are_kept():
    base = plan_profile(_machine(_gpu(24.0, (8, 9))))
    p = apply_overrides(base, {"micro_batch": 4, "grad_accumulation": 7, "precision": "fp16",
                               "activation_checkpointing": False, "variant": None})
    assert (p.micro_batch, p.grad_accumulation, p.precision, p.activation_checkpointing) == (4, 7, "fp16", False)
    assert p.variant == base.variant  # None means "not set"
    assert "variant" not in p.reasons[-1] and "grad_accumulation=7" in p.reasons[-1]


def test_empty_overrides_change_nothing():
    base = plan_profile(_machine(_gpu(24.0, (8, 9))))
    assert apply_overrides(base, {}) == base
    assert apply_overrides(base, {"micro_batch": None, "precision": None}) == base


def test_bf16_on_cpu_is_refused():
    cpu = plan_profile(_machine())
    with pytest.raises(ValueError, match="bf16"):
        apply_overrides(cpu, {"precision": "bf16"})
    assert apply_overrides(cpu, {"precision": "fp32"}).precision == "fp32"
    assert apply_overrides(cpu, {"micro_batch": 1}).grad_accumulation == 10


def test_training_plan_is_plan_plus_overrides():
    hw = _machine(_gpu(6.0, (8, 6)))
    assert training_plan(hw, "auto", {}) == plan_profile(hw)
    p = training_plan(hw, "auto", {"variant": "standard"})
    assert p.variant == "standard" and "variant=standard" in p.reasons[-1]
    forced = training_plan(hw, "cpu", {"micro_batch": 5})
    assert (forced.device, forced.micro_batch, forced.grad_accumulation) == ("cpu", 5, 2)
    with pytest.raises(ValueError):
        training_plan(hw, "cpu", {"precision": "fp16"})


# ---------------------------------------------------------------- out-of-memory back-off


def test_halve_micro_batch_keeps_the_effective_batch():
    p = plan_profile(_machine(_gpu(80.0, (9, 0))))
    seen = []
    while p is not None:
        seen.append((p.micro_batch, p.grad_accumulation))
        assert p.micro_batch * p.grad_accumulation == EFFECTIVE_BATCH
        last, p = p, halve_micro_batch(p)
    assert seen == [(10, 1), (5, 2), (2, 5), (1, 10)]
    assert "out of memory" in last.reasons[-1] and "2 -> 1" in last.reasons[-1]
    assert halve_micro_batch(plan_profile(_machine(_gpu(6.0, (8, 6))))) is None


def test_halve_micro_batch_never_shrinks_the_effective_batch():
    p = plan_profile(_machine(*(_gpu(40.0, (8, 0), i) for i in range(2))))
    assert (p.micro_batch, p.grad_accumulation, p.n_gpus) == (5, 1, 2)
    halved = halve_micro_batch(p)
    assert halved.micro_batch == 2
    assert _samples_per_step(halved) >= EFFECTIVE_BATCH
