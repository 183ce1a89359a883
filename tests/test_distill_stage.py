"""`rfm distill` on a trained workspace: outcome import by accession or UID (nothing identifying
kept), task heads for a prognostic and a diagnostic target over the frozen encoder, the report
(JSON, Markdown, MLflow), the flow task, and the clear errors."""

from __future__ import annotations

import csv
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.errors import ApplianceError
from conftest import TINY_TRAIN, make_workspace, set_config

RFM = str(Path(sys.executable).parent / "rfm")
FAST_HEADS = {"seeds": 2, "max_epochs": 15, "patience": 5, "head_dim": 16, "bootstrap": 50, "batch_size": 32}


@pytest.fixture(scope="session")
def prognosis_cohort(tmp_path_factory) -> Path:
    from appliance.synthetic import generate_cohort

    out = tmp_path_factory.mktemp("prognosis") / "cohort"
    generate_cohort(out, n_studies=36, seed=11, matrix=48, slices=16, enrich_findings=1.5, prognosis=True)
    return out


@pytest.fixture(scope="session")
def trained_prognosis_site(prognosis_cohort, tmp_path_factory) -> Path:
    """The prognosis cohort taken through every stage up to a (tiny) trained run. Read-only."""
    from appliance.deid.stage import deidentify_workspace
    from appliance.ingest import ingest_folder
    from appliance.labels.stage import label_workspace
    from appliance.preprocess.stage import preprocess_workspace
    from appliance.train import train_workspace

    ws = make_workspace(tmp_path_factory.mktemp("distill") / "site",
                        train=TINY_TRAIN | {"val_fraction": 0.25, "test_fraction": 0.3},
                        tracking={"enabled": True}, distill=FAST_HEADS)
    ingest_folder(ws, prognosis_cohort / "dicom")
    deidentify_workspace(ws)
    preprocess_workspace(ws)
    label_workspace(ws)
    train_workspace(ws)
    return ws.root


@pytest.fixture
def site(trained_prognosis_site, tmp_path):
    import shutil

    from appliance.workspace import open_workspace

    shutil.copytree(trained_prognosis_site, tmp_path / "site")
    return open_workspace(tmp_path / "site")


def test_generator_writes_outcomes_that_depend_on_report_only_status(prognosis_cohort):
    truth = json.loads((prognosis_cohort / "ground_truth.json").read_text())
    reports = {json.loads(line)["study_instance_uid"]: json.loads(line)["text"]
               for line in (prognosis_cohort / "dicom" / "reports.jsonl").read_text().splitlines()}
    rows = list(csv.DictReader((prognosis_cohort / "outcomes.csv").open()))
    assert len(rows) == len(truth["studies"])
    for s, row in zip(truth["studies"], rows):
        o = s["outcome"]
        assert row["study_instance_uid"] == s["study_instance_uid"] and int(row["adverse_event_12m"]) == o["adverse_event_12m"]
        assert o["clinical_status"] in ("stable", "deteriorating", "critical")
        impression = reports[s["study_instance_uid"]].split("IMPRESSION:")[1]
        assert {"stable": "stable", "deteriorating": "deteriorat", "critical": "critical"}[o["clinical_status"]] \
            in impression.lower()
    events = [s["outcome"]["adverse_event_12m"] for s in truth["studies"]]
    assert 0 < sum(events) < len(events)


def test_outcomes_import_by_accession_or_uid_keeps_no_identifier(site, prognosis_cohort, tmp_path):
    from appliance.distill.outcomes import import_outcomes, read_outcomes

    rows = list(csv.DictReader((prognosis_cohort / "outcomes.csv").open()))
    extract = tmp_path / "extract.csv"
    with extract.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["accession_number", "study_instance_uid", "adverse_event_12m"])
        for i, r in enumerate(rows):  # half matched by accession only, half by UID only
            w.writerow([r["accession_number"] if i % 2 else "", "" if i % 2 else r["study_instance_uid"],
                        "oops" if i == 3 else r["adverse_event_12m"]])
        w.writerow(["NOPE123", "", "1"])
        w.writerow([rows[0]["accession_number"], "", "1"])  # the same study again: the first row stands
    result = import_outcomes(site, extract)
    assert result.matched == len(rows) and result.unmatched == 1 and result.invalid_values == {"adverse_event_12m": 1}
    assert result.duplicate_rows == 1
    text = (site.labels / "outcomes.csv").read_text()
    assert not [r for r in rows if r["accession_number"] in text or r["study_instance_uid"] in text]
    targets, values = read_outcomes(site)
    assert targets == ["adverse_event_12m"] and sum(1 for v in values.values() if "adverse_event_12m" in v) == len(rows) - 1

    with pytest.raises(ApplianceError, match="column nope is not in"):
        import_outcomes(site, extract, ["nope"])
    bad = tmp_path / "bad.csv"
    bad.write_text("mrn,outcome\n1,0\n")
    with pytest.raises(ApplianceError, match="accession_number or study_instance_uid"):
        import_outcomes(site, bad)


def test_distill_compares_methods_per_outcome_and_records_them(site, prognosis_cohort):
    from appliance.distill.stage import distill_workspace

    result = distill_workspace(site, outcomes=prognosis_cohort / "outcomes.csv").to_dict()
    assert result["outcomes"]["matched"] == 36
    assert set(result["targets"]) == {"adverse_event_12m", "pleural_effusion"}
    for target, r in result["targets"].items():
        if "skipped" in r:  # a tiny split can lack a class; the reason says so
            assert "class" in r["skipped"]
            continue
        assert set(r["methods"]) >= {"linear_probe", "baseline", "teacher_text", "self_distilled", "text_distilled"}
        for m in r["methods"].values():
            assert len(m["per_seed"]) == 2 and 0 <= m["auc_mean"] <= 1
            low, high = m["seed_averaged"]["auc_ci95"]
            assert low is None or low <= high
        assert {"text_distilled-baseline", "text_distilled-self_distilled"} <= set(r["paired"])
    assert any("skipped" not in r for r in result["targets"].values())
    assert result["encoder"]["skipped"] == "the trained run is already GreenRFM-L"
    run = Path(result["run_dir"])
    md = (run / "report.md").read_text()
    assert "report teacher" in md and "self-distilled" in md and "## Full -> Lite encoder" in md
    assert json.loads((run / "report.json").read_text())["teacher_run"] == result["teacher_run"]
    db = sqlite3.connect(site.runs / "mlflow.sqlite")
    keys = {k for (k,) in db.execute("SELECT key FROM metrics WHERE key LIKE 'distill/%'")}
    assert any(k.endswith("text_distilled_auc") for k in keys)
    assert any(k.endswith("text_distilled_minus_baseline_auc") for k in keys)


def test_without_outcomes_the_heads_are_skipped_with_the_reason(site):
    from flows.site import distill_task

    result = distill_task.fn(str(site.root))
    assert "no outcomes imported" in result["skipped"] and result["targets"] == {}


def test_cli_one_line_errors(site, tmp_path):
    env = dict(os.environ, COLUMNS="300")
    proc = subprocess.run([RFM, "distill", "--workspace", str(site.root), "--outcomes", str(tmp_path / "missing.csv")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and "outcomes file missing.csv not found" in proc.stderr
    proc = subprocess.run([RFM, "distill", "--workspace", str(site.root), "--encoder", "on"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and "already GreenRFM-L" in proc.stderr
    assert len([line for line in proc.stderr.splitlines() if line.strip()]) == 1
    set_config(site, distill={"seeds": 1})
    proc = subprocess.run([RFM, "distill", "--workspace", str(site.root), "--target", "nope"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and "outcome nope was never imported" in proc.stderr
