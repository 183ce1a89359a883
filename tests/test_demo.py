"""`rfm demo` end to end: synthetic cohort, planted bad input, Prefect flow, summary table + JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_demo_runs_the_flow_and_writes_the_summary(tmp_path):
    demo_dir = tmp_path / "demo"
    env = dict(os.environ, COLUMNS="200")
    proc = subprocess.run([str(Path(sys.executable).parent / "rfm"), "demo", "--dir", str(demo_dir), "--studies", "12",
                           "--epochs", "1"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((demo_dir / "site" / "demo-summary.json").read_text())
    ing, pre = summary["stages"]["ingest"], summary["stages"]["preprocess"]
    assert ing["series_accepted"] == summary["cohort"]["series"]
    assert set(ing["quarantined"]) == {"not_dicom", "truncated", "incomplete_series", "missing_slice",
                                       "mixed_orientation"}
    deid = summary["stages"]["deid"]
    assert deid["series_done"] == ing["series_accepted"] and deid["audit_hits"] == 0
    assert deid["reports_done"] == summary["cohort"]["studies"]
    assert pre["series_done"] == ing["series_accepted"]
    labels = summary["stages"]["labels"]
    assert labels["reports"] == summary["cohort"]["studies"] and labels["queued"] == 0
    assert [r["stage"] for r in summary["table"]] == ["synthesise", "ingest", "deid", "preprocess", "labels", "train",
                                                      "eval", "distill", "export", "total"]
    train, ev = summary["stages"]["train"], summary["stages"]["eval"]
    assert [p["name"] for p in train["phases"]] == ["stage1", "stage2"] and all(p["steps"] > 0 for p in train["phases"])
    assert 0.0 <= ev["zero_shot_auc"] <= 1.0 and ev["n_test_studies"] >= 1
    assert Path(ev["report"]["markdown"]).is_file()
    di = summary["stages"]["distill"]
    assert di["outcomes"]["matched"] == summary["cohort"]["studies"]
    assert set(di["targets"]) == {"adverse_event_12m", "pleural_effusion"}
    assert di["encoder"]["skipped"] and (Path(di["run_dir"]) / "report.md").is_file()
    ex = summary["stages"]["export"]
    assert ex["parity"]["image_onnx"]["image_embedding"]["cosine_min"] >= 0.9999
    assert (Path(ex["out_dir"]) / "model_card.md").is_file() and "greenrfm_image" in ex["triton_models"]
    for word in ("Demo", "ingest", "preprocess", "quarantined", "zero-shot mean AUC", "R@1", "R@5",
                 "Export of run", "TensorRT skipped"):
        assert word in proc.stdout
    # nothing identifying in what the operator sees
    gt = json.loads((demo_dir / "cohort" / "ground_truth.json").read_text())
    phi = {v for s in gt["studies"] for v in s["phi"] if len(str(v)) >= 4}
    shown = proc.stdout + proc.stderr
    assert not [v for v in phi if v in shown]
    # a second demo replaces the first
    again = subprocess.run([str(Path(sys.executable).parent / "rfm"), "demo", "--dir", str(demo_dir), "--studies", "10",
                            "--epochs", "0"], capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((demo_dir / "site" / "demo-summary.json").read_text())["cohort"]["studies"] == 10


def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    from appliance.demo import fresh_demo_dir
    from appliance.errors import ApplianceError

    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(ApplianceError, match="not made by"):
        fresh_demo_dir(tmp_path)
    assert (tmp_path / "precious.txt").exists()
