"""`rfm bench ingest` writes the figures it prints (no timing is asserted)."""

import json

from appliance.cli import main
from conftest import GE_DIR  # the real series, when ../shared is beside the checkout


def test_bench_ingest_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["bench", "ingest", "--studies", "2", "--out", str(out), "--workers", "1"]
    if GE_DIR.is_dir():
        args += ["--real", str(GE_DIR)]
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert result["stage"] == "ingest"
    synthetic = result["datasets"]["synthetic-2"]
    for key in ("series_per_s", "slices_per_s", "mb_per_s", "peak_rss_mb", "ingest_s", "preprocess_s"):
        assert synthetic[key] > 0
    assert synthetic["series"] == synthetic["cached"] >= 2
    peer = synthetic["peer_dcm2niix"]
    assert "ratio" in peer or "skipped" in peer
    if GE_DIR.is_dir():
        assert result["datasets"][f"real:{GE_DIR.name}"]["slices"] == 28
    assert "rfm bench ingest" in capsys.readouterr().out


def test_bench_deid_writes_json_with_the_peer(tmp_path, capsys):
    out = tmp_path / "bench-deid.json"
    assert main(["bench", "deid", "--studies", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    r = result["datasets"]["synthetic-2"]
    assert r["files"] > 0 and r["full_stage"]["files_per_s"] > 0 and r["headers_only"]["files_per_s"] > 0
    assert r["full_stage"]["quarantined"] == 0
    peer = r["peer_dicognito"]
    if "files_per_s" in peer:
        assert r["ratio_headers_only_vs_dicognito"] > 0
    else:
        assert peer["skipped"]
    assert "rfm bench deid" in capsys.readouterr().out


def test_bench_labels_measures_rules_and_client_concurrency():
    from appliance.bench import bench_labels

    result = bench_labels(studies=10, latency_s=0.02, max_in_flight=8, n_requests=40)
    assert result["rules"]["reports_per_s"] > 0
    concurrent = result["openai_client"]["concurrent"]
    assert concurrent["labelled"] == concurrent["reports"] == 40
    assert concurrent["server_max_in_flight"] == 8  # the client really kept 8 requests open
    assert result["openai_client"]["one_at_a_time"]["server_max_in_flight"] == 1


def test_bench_train_on_cpu_reports_every_figure():
    """A tiny crop, both variants, one step per stage: every figure is there, positive and JSON-able."""
    import torch

    from appliance.bench import bench_train

    result = bench_train(crops=((32, 32, 16),), variants=("standard", "lite"), steps=1, warmup=0, device="cpu",
                         loader_passes=1)
    json.loads(json.dumps(result))
    assert result["device"] == "cpu" and result["gpu"] is None and result["torch"] == torch.__version__
    assert any("micro-batch x accumulation" in n for n in result["notes"])
    assert [(r["variant"], r["crop"]) for r in result["results"]] == [("standard", [32, 32, 16]), ("lite", [32, 32, 16])]
    for r in result["results"]:
        assert r["finished"] and r["failure"] is None
        assert set(r["stages"]) == {"stage1", "stage2"}
        for key in ("stage1_samples_per_s", "stage2_samples_per_s", "inference_samples_per_s", "loader_samples_per_s",
                    "peak_rss_mb"):
            assert r[key] > 0, key
        for stage in r["stages"].values():
            assert stage["samples"] == r["step_samples"] == 2 and stage["seconds"] > 0
        assert r["peak_gpu_mem_gb"] is None  # no GPU: nothing to report
        assert r["plan"]["variant"] == r["variant"] and r["plan"]["device"] == "cpu"
        assert (r["plan"]["micro_batch"], r["plan"]["grad_accumulation"]) == (2, 1)
        assert r["oom_backoffs"] == 0 and r["final_micro_batch"] == 2
        assert r["text_encoder"] == "tiny"
        assert r["inference"]["batch"] == r["plan"]["micro_batch"] and r["inference"]["samples"] >= 1


def test_bench_distill_on_cpu_reports_every_figure():
    """Tiny tokens and crop, one step: heads and the full -> Lite encoder each measured, positive, JSON-able."""
    from appliance.distill.bench import HEAD_KINDS, bench_distill

    shape = {"n_train": 40, "n_val": 10, "image_tokens": 4, "image_dim": 32, "text_tokens": 12, "text_dim": 16}
    result = bench_distill(crop=(32, 32, 16), batch=2, steps=1, warmup=0, head_epochs=2, shape=shape, device="cpu")
    json.loads(json.dumps(result))
    heads = result["heads"]
    assert heads["shape"] == shape and set(heads["heads"]) == set(HEAD_KINDS)
    for r in heads["heads"].values():
        assert r["epochs"] == 2 and r["seconds"] > 0 and r["train_samples_per_s"] > 0 and r["parameters"] > 0
    assert heads["heads"]["teacher_text"]["parameters"] > heads["heads"]["attention_head"]["parameters"]
    assert heads["report_distilled_vs_image_only_cost"] > 1 and heads["peak_rss_mb"] > 0
    enc = result["encoder"]
    assert enc["device"] == "cpu" and enc["precision"] == "fp32" and enc["crop"] == [32, 32, 16]
    assert enc["distillation_step"]["samples_per_s"] > 0 and enc["distillation_step"]["peak_gpu_mem_gb"] is None
    assert set(enc["student_speedup"]) == {"1", "2"} and all(v > 0 for v in enc["student_speedup"].values())
    assert enc["gmacs_ratio"] < 0.25 and enc["peak_rss_mb"] > 0


def test_bench_pretrain_on_cpu_reports_every_figure():
    """The 2D rows of `rfm bench train`: each objective's images/s and memory, and the ViT-B/14 plans."""
    from appliance.train.pretrain_bench import OBJECTIVES, PLAN_CARDS_GB, bench_pretrain

    result = bench_pretrain(steps=1, warmup=0, device="cpu", image_size=32, objectives=("unicl", "dino"))
    assert [r["objective"] for r in result["rows"]] == ["unicl", "dino"]  # clip's step is unicl's minus label texts
    for row in result["rows"]:
        assert row["train_images_per_s"] > 0 and row["inference_images_per_s"] > 0 and row["peak_rss_mb"] > 0
        assert row["plan"]["device"] == "cpu" and row["peak_gpu_mem_gb"] is None and row["image_size"] == 32
    plans = {(p["objective"], p["card_gb"]): p for p in result["plans"]}
    assert set(plans) == {(o, gb) for o in OBJECTIVES for gb in PLAN_CARDS_GB}
    for objective in OBJECTIVES:
        small, large = plans[(objective, 24)], plans[(objective, 80)]
        assert small["micro_batch"] * small["grad_accumulation"] >= 64 <= large["micro_batch"] * large["grad_accumulation"]
        assert large["micro_batch"] >= small["micro_batch"]
