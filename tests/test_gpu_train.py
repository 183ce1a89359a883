"""Training on a CUDA GPU: throughput and peak memory at the recipe's crop, and the 6 GB plan on an
emulated 6 GB card (torch's allocator capped with set_per_process_memory_fraction).

Skipped where torch sees no GPU; run them on one with `pytest -m gpu tests/test_gpu_train.py`.
"""

import json

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_bench_train_at_the_recipe_crop_reports_speed_and_memory():
    from appliance.bench import RECIPE_CROP, bench_train

    result = bench_train(crops=(RECIPE_CROP,), variants=("standard", "lite"), steps=2, warmup=1, device="cuda")
    json.loads(json.dumps(result))
    assert result["device"] == "cuda" and result["gpu"]
    by_variant = {r["variant"]: r for r in result["results"]}
    assert set(by_variant) == {"standard", "lite"}
    for r in by_variant.values():
        assert r["crop"] == list(RECIPE_CROP) and r["finished"], r["failure"]
        for key in ("stage1_samples_per_s", "stage2_samples_per_s", "loader_samples_per_s", "peak_rss_mb",
                    "peak_gpu_mem_gb"):
            assert r[key] > 0, key
        for stage in r["stages"].values():
            assert 0 < stage["peak_gpu_mem_gb"] <= stage["peak_gpu_reserved_gb"]
    # GreenRFM-L (4x4x4 patchify) does about 8x less vision work than GreenRFM at the same micro-batch
    std, lite = by_variant["standard"], by_variant["lite"]
    if std["plan"]["micro_batch"] == lite["plan"]["micro_batch"]:
        assert lite["stage1_samples_per_s"] > std["stage1_samples_per_s"]
        assert lite["peak_gpu_mem_gb"] < std["peak_gpu_mem_gb"]


def test_the_6gb_plan_fits_an_emulated_6gb_card():
    from appliance.bench import RECIPE_CROP, bench_train
    from appliance.hardware import GpuInfo, HardwareInfo, plan_profile

    cc = torch.cuda.get_device_capability(0)
    six = HardwareInfo("bench cpu", 8, 16, 64.0, 500.0, "/", (GpuInfo(0, "6 GB card", 6.0, cc, "test"),))
    plan = plan_profile(six)
    assert (plan.name, plan.variant, plan.micro_batch, plan.activation_checkpointing) == ("gpu-6gb", "lite", 1, True)

    result = bench_train(crops=(RECIPE_CROP,), variants=("lite",), steps=2, warmup=1, device="cuda",
                         memory_fraction_gb=6.0)
    (r,) = result["results"]
    got = r["plan"]
    assert (got["name"], got["variant"], got["micro_batch"], got["grad_accumulation"],
            got["activation_checkpointing"]) == (plan.name, "lite", 1, plan.grad_accumulation, True)
    assert r["memory_cap_gb"] == 6.0
    assert r["finished"], r["failure"]
    assert r["oom_backoffs"] == 0 and r["final_micro_batch"] == 1
    assert r["stage1_samples_per_s"] > 0 and r["stage2_samples_per_s"] > 0
    assert 0 < r["peak_gpu_mem_gb"] < 6.0
    assert r["peak_gpu_reserved_gb"] < 6.0  # the cap is on what the allocator reserves
