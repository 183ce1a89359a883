"""Retention: raw/ series go only when de-identified and preprocessed, the catalog records it, later
stages keep working, and nothing outside raw/ and quarantine/ is touched."""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta, timezone

import pydicom
from pydicom.uid import generate_uid

from appliance.catalog import Catalog
from appliance.cli import main
from appliance.deid.stage import audit_output, deidentify_workspace
from appliance.errors import BadInputError
from appliance.ingest import ingest_folder
from appliance.preprocess.stage import preprocess_workspace
from appliance.quarantine import quarantine_item
from appliance.retention import enforce_retention
from conftest import set_config

LATER = datetime.now(timezone.utc) + timedelta(days=31)
UNTOUCHED = ("deid", "cache", "labels", "runs", "exports", "audit")


def _tree_hashes(ws) -> dict[str, str]:
    out = {}
    for name in UNTOUCHED:
        for p in sorted((ws.root / name).rglob("*")):
            if p.is_file():
                out[str(p.relative_to(ws.root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _raw_series_dirs(ws) -> list:
    return sorted(d for d in ws.raw.glob("*/*") if d.is_dir())


def test_no_policy_removes_nothing(trainable, capsys):
    summary = enforce_retention(trainable, apply=True, now=LATER + timedelta(days=10_000))
    assert summary.items == [] and summary.files_removed == 0
    assert len(_raw_series_dirs(trainable)) == 6
    assert main(["retention", "-w", str(trainable.root)]) == 0
    assert "no retention policy" in capsys.readouterr().out


def test_dry_run_then_apply_removes_only_finished_raw_series(trainable):
    ws = trainable
    set_config(ws, retention={"raw_days": 30})
    with Catalog(ws.catalog_path) as cat:
        unfinished = cat.all_series()[0]
        cat.set_status("series", unfinished.key, "preprocess", "failed", detail="test")
        n_series = len(cat.all_series())
    before = _tree_hashes(ws)

    recent = enforce_retention(ws)  # ingested today: too recent for a 30-day policy
    assert recent.to_remove == [] and recent.too_recent == n_series

    dry = enforce_retention(ws, now=LATER)
    assert dry.count("series") == n_series - 1 and dry.count("study") == n_series - 1
    kept = [i for i in dry.items if not i.remove]
    assert [(i.kind, i.key) for i in kept] == [("series", unfinished.key)]
    assert "preprocess not done (failed)" in kept[0].reason
    assert len(_raw_series_dirs(ws)) == n_series, "a dry run deletes nothing"
    with Catalog(ws.catalog_path) as cat:
        assert cat.raw_removed_keys("series") == set()

    done = enforce_retention(ws, apply=True, now=LATER)
    assert done.files_removed == sum(i.n_files for i in dry.to_remove) > 0
    assert [d.name for d in _raw_series_dirs(ws)] == [unfinished.key]
    assert (ws.raw / ".key_salt").is_file()
    remaining_studies = [d.name for d in ws.raw.iterdir() if d.is_dir()]
    assert remaining_studies == [unfinished.study_key], "reports and study.json go with a study's last series"
    assert (ws.raw / unfinished.study_key / "study.json").is_file()
    assert _tree_hashes(ws) == before, "deid/, cache/, labels/, runs/, exports/, audit/ are never touched"
    with Catalog(ws.catalog_path) as cat:
        assert cat.raw_removed_keys("series") == {i.key for i in dry.items if i.kind == "series" and i.remove}
        assert len(cat.raw_removed_keys("study")) == n_series - 1
    assert enforce_retention(ws, apply=True, now=LATER).to_remove == [], "a second run has nothing left to do"


def test_later_stages_still_work_after_removal(trainable, small_cohort, tmp_path):
    ws = trainable
    set_config(ws, retention={"raw_days": 30})
    enforce_retention(ws, apply=True, now=LATER)
    assert _raw_series_dirs(ws) == []
    deid_before = _tree_hashes(ws)

    # new de-identification settings would redo every series from raw/: the removed ones keep their output
    set_config(ws, deid={"clean_descriptors": False})
    summary = deidentify_workspace(ws)
    assert summary.series_done == 0 and summary.series_skipped == 6
    assert preprocess_workspace(ws).series_skipped == 6
    assert audit_output(ws).clean  # patterns only for series without a raw copy; no crash
    assert _tree_hashes(ws) == deid_before

    # the same studies sent again are known: nothing is copied back into raw/
    again = ingest_folder(ws, small_cohort / "dicom")
    assert again.series_accepted == 0 and again.skipped.get("already_ingested", 0) > 0
    assert _raw_series_dirs(ws) == []

    # an extra slice of a series whose earlier slices are gone cannot be validated: quarantined, one line
    first = sorted((small_cohort / "dicom").rglob("IM*"))[0]
    ds = pydicom.dcmread(first)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    (tmp_path / "late").mkdir()
    ds.save_as(tmp_path / "late" / "IM99999")
    late = ingest_folder(ws, tmp_path / "late")
    assert late.quarantined == {"raw_removed": 1}
    with Catalog(ws.catalog_path) as cat:
        assert cat.quarantined()[-1].code == "raw_removed"


def test_quarantine_retention_keeps_the_catalog_row(trainable):
    ws = trainable
    with Catalog(ws.catalog_path) as cat:
        quarantine_item(ws, cat, stage="ingest", kind="file", error=BadInputError("not a DICOM file", "not_dicom"),
                        files={"00000_SMITH_JOHN.dcm": b"junk"}, sources=["/pacs/SMITH_JOHN.dcm"])
    set_config(ws, retention={"keep_quarantine_days": 10})
    dry = enforce_retention(ws, now=datetime.now(timezone.utc) + timedelta(days=11))
    assert [(i.kind, i.key, i.remove) for i in dry.items] == [("quarantine", "q000001", True)]
    assert dry.count("series") == 0, "raw_days is not set: raw/ is left alone"
    enforce_retention(ws, apply=True, now=datetime.now(timezone.utc) + timedelta(days=11))
    assert not (ws.quarantine / "q000001").exists()
    assert len(_raw_series_dirs(ws)) == 6
    with Catalog(ws.catalog_path) as cat:
        assert [q.code for q in cat.quarantined()] == ["not_dicom"], "the reason stays in the catalog"
        assert cat.raw_removed_keys("quarantine") == {"q000001"}


def test_a_removal_interrupted_after_recording_is_finished_next_time(trainable):
    ws = trainable
    set_config(ws, retention={"raw_days": 30})
    with Catalog(ws.catalog_path) as cat:
        series = cat.all_series()[0]
        with cat.transaction():  # what a run killed between recording and deleting leaves behind
            cat.record_raw_removed("series", series.key, series.n_instances, series.nbytes, "test")
    plan = enforce_retention(ws)  # today: nothing is old enough, but the recorded removal is finished
    assert [(i.key, i.reason) for i in plan.to_remove] == [(series.key, "finishing an earlier removal")]
    enforce_retention(ws, apply=True)
    assert not (ws.root / series.raw_dir).exists()
    assert len(_raw_series_dirs(ws)) == 5


def test_cli_dry_run_and_apply(trainable, capsys):
    ws = trainable
    set_config(ws, retention={"raw_days": 0})
    assert main(["retention", "-w", str(ws.root)]) == 0
    out = capsys.readouterr().out
    assert "would remove: 6 series" in out and "nothing was deleted" in out
    assert len(_raw_series_dirs(ws)) == 6
    assert main(["retention", "-w", str(ws.root), "--apply"]) == 0
    assert "removed: 6 series" in capsys.readouterr().out
    assert _raw_series_dirs(ws) == []
    assert main(["status", "-w", str(ws.root)]) == 0
