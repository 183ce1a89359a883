"""The catalog-driven preprocess stage: cache files, skip/redo by fingerprint, quarantine bad pixels."""

from __future__ import annotations

import json

import numpy as np
import pydicom
import yaml
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless

from appliance.catalog import Catalog
from appliance.deid.stage import deidentify_workspace
from appliance.ingest import ingest_folder
from appliance.preprocess.stage import preprocess_workspace
from conftest import SMALL_PREPROCESS, ground_truth


def _ingest_and_deid(workspace, cohort):
    ing = ingest_folder(workspace, cohort / "dicom")
    deidentify_workspace(workspace)
    return ing


def test_caches_every_series_and_skips_on_rerun(cohort, workspace):
    ing = ingest_folder(workspace, cohort / "dicom")
    waiting = preprocess_workspace(workspace)
    assert waiting.series_done == 0 and waiting.series_waiting_for_deid == ing.series_accepted
    deidentify_workspace(workspace)
    s = preprocess_workspace(workspace)
    assert s.series_done == ing.series_accepted and s.series_failed == s.series_quarantined == 0
    for npy in workspace.cache.glob("*.npy"):
        vol = np.load(npy, mmap_mode="r")
        assert vol.dtype == np.float16 and vol.shape == tuple(reversed(SMALL_PREPROCESS["canvas"]))
        assert float(vol.min()) >= -1.0 and float(vol.max()) <= 1.0
        meta = json.loads(npy.with_suffix(".json").read_text())
        assert meta  # geometry sidecar written next to the volume
    again = preprocess_workspace(workspace)
    assert again.series_done == 0 and again.series_skipped == ing.series_accepted


def test_changed_settings_redo_everything(cohort, workspace):
    _ingest_and_deid(workspace, cohort)
    first = preprocess_workspace(workspace)
    cfg = yaml.safe_load(workspace.config_path.read_text())
    cfg["preprocess"]["hu_clip"] = [-1000, 400]
    workspace.config_path.write_text(yaml.safe_dump(cfg))
    redo = preprocess_workspace(workspace)
    assert redo.series_done == first.series_done and redo.series_skipped == 0


def test_cache_metadata_has_no_phi(cohort, workspace):
    _ingest_and_deid(workspace, cohort)
    preprocess_workspace(workspace)
    phi = {v for s in ground_truth(cohort)["studies"] for v in s["phi"] if len(str(v)) >= 4}
    phi |= {s["study_instance_uid"] for s in ground_truth(cohort)["studies"]}
    text = "".join(p.read_text() for p in workspace.cache.glob("*.json"))
    assert not [v for v in phi if v in text]


def test_undecodable_pixels_are_quarantined_before_training(cohort, workspace):
    """Compressed frames that parse but do not decode pass ingest; de-identification cannot check them
    for burned-in text, so the series is quarantined there and never reaches the cache."""
    series = sorted({p.parent for p in (cohort / "dicom").rglob("*") if p.is_file() and p.suffix != ".jsonl"})[0]
    victim = sorted(series.iterdir())[3]
    ds = pydicom.dcmread(victim)
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 64])  # a J2K marker, then nonsense
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds["PixelData"].VR = "OB"
    ds.save_as(victim, enforce_file_format=True)
    ing = ingest_folder(workspace, cohort / "dicom")
    assert ing.n_quarantined == 0
    deid = deidentify_workspace(workspace)
    assert deid.series_quarantined == 1
    s = preprocess_workspace(workspace)
    assert s.series_quarantined == 0 and s.series_done == ing.series_accepted - 1
    with Catalog(workspace.catalog_path) as cat:
        (row,) = cat.quarantined()
        assert row.stage == "deid" and row.code == "undecodable_pixels" and "\n" not in row.reason
        assert len(cat.keys_with_status("series", "preprocess")) == ing.series_accepted - 1
