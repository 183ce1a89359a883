"""The labels stage over a workspace: rules on de-identified reports, cache and resume, review queue
round trip, consensus of two extractors, and the standalone extract/eval commands."""

from __future__ import annotations

import csv
import io
import json

import pytest
import yaml

from appliance.catalog import Catalog
from appliance.cli import main
from appliance.deid.stage import deidentify_workspace
from appliance.ingest import ingest_folder
from appliance.labels.fake_server import ScriptedLLMServer, correct, malformed
from appliance.labels.metrics import agreement
from appliance.labels.stage import export_review, import_review, label_workspace, review_items
from appliance.labels.vocabularies import load_vocabulary
from conftest import ground_truth

VOCAB = load_vocabulary("ct_rate_18")


@pytest.fixture
def ready(cohort, workspace):
    ingest_folder(workspace, cohort / "dicom")
    deidentify_workspace(workspace)
    return workspace


def _labels_csv(ws) -> dict[str, dict[str, int]]:
    rows = list(csv.DictReader(io.StringIO((ws.labels / "labels.csv").read_text())))
    return {r["study_key"]: {n: int(r[n]) for n in VOCAB.names} for r in rows}


def _truth_by_key(ws, cohort) -> dict[str, dict[str, int]]:
    by_uid = {s["study_instance_uid"]: s["labels"] for s in ground_truth(cohort)["studies"]}
    return {p.parent.name: by_uid[json.loads(p.read_text())["study_instance_uid"]] for p in ws.raw.glob("*/study.json")}


def _configure(ws, **labels):
    cfg = yaml.safe_load(ws.config_path.read_text())
    cfg.setdefault("labels", {}).update(labels)
    ws.config_path.write_text(yaml.safe_dump(cfg))


def test_rules_on_deidentified_reports_match_the_truth(cohort, ready):
    s = label_workspace(ready)
    truth = _truth_by_key(ready, cohort)
    assert s.reports == len(truth) and s.labelled == len(truth) and s.queued == 0
    pred = _labels_csv(ready)
    report = agreement(pred, truth, VOCAB.names, "strict")
    assert report.macro["f1"] >= 0.95
    again = label_workspace(ready)
    assert again.from_cache == len(truth) and again.labelled == 0
    with Catalog(ready.catalog_path) as cat:
        assert len(cat.keys_with_status("study", "labels")) == len(truth)


def test_failed_reports_are_queued_then_resolved_by_a_radiologist(ready, tmp_path):
    zeros = {n: 0 for n in VOCAB.names}
    with ScriptedLLMServer({"effusion": malformed()}, default=correct(zeros)) as server:
        _configure(ready, backend="openai", attempts=2, backoff_s=0.01,
                   openai={"base_url": server.url, "model": "scripted", "structured": "json_schema"})
        s = label_workspace(ready)
    assert s.queued > 0 and s.labelled + s.queued == s.reports
    assert s.retried >= s.queued
    items = review_items(ready)
    assert len(items) == s.queued and all(i["source"] == "extraction_failed" for i in items)
    out = tmp_path / "review.csv"
    assert export_review(ready, out) == s.queued
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert all("effusion" in r["report"].lower() for r in rows)
    for r in rows:  # the radiologist fills every finding
        r.update({n: "1" if n == "pleural effusion" else "0" for n in VOCAB.names})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    filled = tmp_path / "filled.csv"
    filled.write_text(buf.getvalue())
    assert import_review(ready, filled) == len(rows)
    with ScriptedLLMServer({"effusion": malformed()}, default=correct(zeros)) as server:
        _configure(ready, openai={"base_url": server.url, "model": "scripted", "structured": "json_schema"})
        after = label_workspace(ready)
    assert after.resolved_by_review == len(rows)
    labelled = _labels_csv(ready)
    assert len(labelled) == after.reports  # nobody left out
    assert all(labelled[r["study_key"]]["pleural effusion"] == 1 for r in rows)


def test_bad_review_csv_is_a_one_line_error(ready, tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("study_key,source," + ",".join(VOCAB.names) + "\nabc,extraction_failed," + ",".join(["2"] * 18) + "\n")
    assert main(["labels", "review", "import", str(bad), "-w", str(ready.root)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "row 2" in err and "1, 0 or -1" in err


def test_consensus_drops_findings_the_extractors_disagree_on(ready):
    zeros = {n: 0 for n in VOCAB.names}
    with ScriptedLLMServer(correct(zeros)) as server:
        _configure(ready, backend="rules", consensus_with="openai", consensus_threshold=0.9, review_disagreements=True,
                   backoff_s=0.01, openai={"base_url": server.url, "model": "all-negative", "structured": "none"})
        s = label_workspace(ready)
    consensus = json.loads((ready.labels / "consensus.json").read_text())
    rules = _labels_csv(ready)
    for finding in VOCAB.names:
        agree = sum(rules[k][finding] == 0 for k in rules) / len(rules)
        assert (finding in consensus["kept"]) == (agree > 0.9), finding
    assert s.findings_dropped and set(s.findings_dropped) | set(s.findings_kept) == set(VOCAB.names)
    assert s.disagreements_queued == sum(any(v != 0 for v in r.values()) for r in rules.values())


def test_standalone_extract_and_eval(cohort, tmp_path, capsys):
    gt = ground_truth(cohort)
    lines = [json.loads(x) for x in (cohort / "dicom" / "reports.jsonl").read_text().splitlines()]
    reports = tmp_path / "reports.jsonl"
    reports.write_text("".join(json.dumps({"id": r["accession_number"], "text": r["text"]}) + "\n" for r in lines)
                       + "not json\n" + json.dumps({"id": "x"}) + "\n")
    out = tmp_path / "labels.csv"
    assert main(["labels", "extract", "--reports", str(reports), "--out", str(out)]) == 0
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(rows) == len(lines) and list(rows[0]) == ["id", *VOCAB.names]
    rejected = [json.loads(x) for x in (tmp_path / "labels.rejected.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rejected] == [len(lines) + 1, len(lines) + 2]
    gold = tmp_path / "gold.csv"
    with gold.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", *VOCAB.names])
        for s in gt["studies"]:
            w.writerow([s["accession_number"], *(s["labels"][n] for n in VOCAB.names)])
    capsys.readouterr()
    assert main(["labels", "eval", "--gold", str(gold), "--pred", str(out), "--out", str(tmp_path / "eval")]) == 0
    result = json.loads((tmp_path / "eval" / "agreement.json").read_text())
    assert result["n_reports"] == len(lines)
    assert result["protocols"]["strict"]["macro"]["f1"] >= 0.95
    assert (tmp_path / "eval" / "confusion-strict.png").stat().st_size > 0
    # a second run is served from the cache
    assert main(["labels", "extract", "--reports", str(reports), "--out", str(out)]) == 0
    assert "from_cache" in capsys.readouterr().out


def test_a_killed_labelling_run_resumes_from_its_cache(ready):
    import os
    import subprocess
    import sys
    from pathlib import Path

    rfm = str(Path(sys.executable).parent / "rfm")
    env = dict(os.environ, RFM_FAULT_KILL_AT="label_report:3")
    killed = subprocess.run([rfm, "labels", "-w", str(ready.root)], env=env, capture_output=True, text=True)
    assert killed.returncode == -9
    s = label_workspace(ready)
    assert s.from_cache == 3 and s.labelled == s.reports - 3 and s.queued == 0
