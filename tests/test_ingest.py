"""Ingest: acceptance, idempotence, quarantine of bad input, reports, zips, partial pushes, resume."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from appliance.catalog import Catalog
from appliance.ingest import ingest_folder
from appliance.synthetic.bad_inputs import plant_bad_inputs
from conftest import ground_truth, make_workspace


def _series_dirs(source: Path) -> list[Path]:
    return sorted({p.parent for p in (source / "dicom").rglob("*") if p.is_file() and p.name != "reports.jsonl"})


def _all_phi(source: Path) -> set[str]:
    return {v for s in ground_truth(source)["studies"] for v in s["phi"] if len(str(v)) >= 4}


def test_accepts_the_cohort_and_links_reports(cohort, workspace):
    gt = ground_truth(cohort)
    n_series = sum(len(s["series"]) for s in gt["studies"])
    s = ingest_folder(workspace, cohort / "dicom")
    assert s.series_accepted == n_series
    assert s.files_accepted == s.files_seen == sum(x["n_slices"] for st in gt["studies"] for x in st["series"])
    assert s.n_quarantined == 0 and s.n_skipped == 0
    assert s.reports_linked == len(gt["studies"]) and s.studies_without_report == 0
    with Catalog(workspace.catalog_path) as cat:
        assert cat.counts()["studies"] == len(gt["studies"])
        assert len(cat.keys_with_status("series", "ingest")) == n_series
        for row in cat.all_series():
            files = cat.series_files(row.key)
            assert len(files) == row.n_instances and all((workspace.root / f).is_file() for f in files)
    # the raw copies are byte-identical DICOM
    any_raw = next(workspace.raw.rglob("*.dcm"))
    assert pydicom.dcmread(any_raw).Modality == "CT"


def test_catalog_and_summary_hold_no_phi(cohort, workspace):
    s = ingest_folder(workspace, cohort / "dicom")
    phi = _all_phi(cohort)
    blob = workspace.catalog_path.read_bytes()
    for wal in workspace.root.glob("catalog.sqlite*"):
        blob += wal.read_bytes()
    text = blob.decode("latin-1") + json.dumps(s.to_dict())
    leaked = [v for v in phi if v in text]
    assert not leaked, f"PHI in catalog or summary: {leaked[:3]}"
    uids = {st["study_instance_uid"] for st in ground_truth(cohort)["studies"]}
    assert not [u for u in uids if u in text], "UIDs must not be in the catalog"


def test_rerun_skips_and_force_redoes(cohort, workspace):
    first = ingest_folder(workspace, cohort / "dicom")
    with Catalog(workspace.catalog_path) as cat:
        before = cat.counts()
    again = ingest_folder(workspace, cohort / "dicom")
    assert again.series_accepted == 0 and again.files_accepted == 0
    assert again.skipped == {"already_ingested": first.files_accepted, "report_already_ingested": first.reports_linked}
    forced = ingest_folder(workspace, cohort / "dicom", force=True)
    assert forced.series_accepted == first.series_accepted
    with Catalog(workspace.catalog_path) as cat:
        assert cat.counts() == before


def test_bad_input_is_quarantined_and_nothing_is_lost(cohort, workspace):
    planted = plant_bad_inputs(cohort / "dicom")
    s = ingest_folder(workspace, cohort / "dicom")
    assert s.quarantined == {"not_dicom": 1, "truncated": 1, "incomplete_series": 1, "missing_slice": 1,
                             "mixed_orientation": 1}
    gt = ground_truth(cohort)
    assert s.series_accepted == sum(len(x["series"]) for x in gt["studies"]), "good series unaffected"
    # every file seen is accounted for: accepted, skipped, or sitting in quarantine
    quarantined_files = [f for f in workspace.quarantine.rglob("*") if f.is_file() and f.name != "reason.json"]
    assert s.files_seen == s.files_accepted + s.n_skipped + len(quarantined_files)
    with Catalog(workspace.catalog_path) as cat:
        rows = cat.quarantined()
    assert len(rows) == 5
    for row in rows:
        reason = json.loads((workspace.quarantine / row.folder / "reason.json").read_text())
        assert reason["code"] == row.code and reason["sources"]
        assert "\n" not in row.reason and "/" not in row.reason  # one line, no paths
    truncated = next(r for r in rows if r.code == "truncated")
    reason = json.loads((workspace.quarantine / truncated.folder / "reason.json").read_text())
    assert reason["sources"] == [planted["truncated_file"]]
    missing = next(r for r in rows if r.code == "missing_slice")
    assert "gap" in missing.reason or "InstanceNumber" in missing.reason or "slice" in missing.reason


def test_non_image_objects_localizers_and_other_modalities_are_skipped(cohort, workspace):
    extra = cohort / "dicom" / "extra"
    extra.mkdir()
    sr = Dataset()
    sr.file_meta = FileMetaDataset()
    sr.file_meta.MediaStorageSOPClassUID = sr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    sr.file_meta.MediaStorageSOPInstanceUID = sr.SOPInstanceUID = "2.25.1"
    sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sr.StudyInstanceUID, sr.SeriesInstanceUID, sr.Modality = "2.25.2", "2.25.3", "SR"
    sr.save_as(extra / "report.sr", enforce_file_format=True)
    first = _series_dirs(cohort)[0]
    ds = pydicom.dcmread(next(first.iterdir()))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "2.25.4"
    ds.SeriesInstanceUID = "2.25.5"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.save_as(extra / "scout", enforce_file_format=True)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "2.25.6"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Modality = "MR"
    ds.save_as(extra / "mr", enforce_file_format=True)
    s = ingest_folder(workspace, cohort / "dicom")
    assert s.skipped == {"non_image_object": 1, "localizer": 1, "modality_MR_not_accepted": 1}
    assert s.n_quarantined == 0


def test_zip_archives_and_odd_names(cohort, workspace):
    series = _series_dirs(cohort)[0]
    archive = cohort / "dicom" / "export.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i, f in enumerate(sorted(series.iterdir())):
            zf.write(f, f"DICOM/{i:08X}")
    shutil.rmtree(series)
    s = ingest_folder(workspace, cohort / "dicom")
    gt = ground_truth(cohort)
    assert s.series_accepted == sum(len(x["series"]) for x in gt["studies"])
    assert s.n_quarantined == 0


def test_series_arriving_in_two_parts_is_merged(cohort, workspace):
    series = _series_dirs(cohort)[0]
    files = sorted(series.iterdir(), key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]))
    later = cohort.parent / "later"
    later.mkdir()
    for f in files[len(files) // 2:]:
        shutil.move(str(f), later / f.name)
    first = ingest_folder(workspace, cohort / "dicom")
    assert first.n_quarantined == 0
    shutil.rmtree(series)
    shutil.move(str(later), series)
    second = ingest_folder(workspace, cohort / "dicom")
    assert second.series_accepted == 1 and second.n_quarantined == 0
    with Catalog(workspace.catalog_path) as cat:
        sizes = sorted(r.n_instances for r in cat.all_series())
    truth = sorted(x["n_slices"] for st in ground_truth(cohort)["studies"] for x in st["series"])
    assert sizes == truth, "the half series grew to the whole series; no second copy"
    assert first.files_accepted + second.files_accepted == sum(truth)


def test_reports_csv_pending_and_bad_rows(cohort, workspace):
    gt = ground_truth(cohort)
    (cohort / "dicom" / "reports.jsonl").unlink()
    studies = gt["studies"]
    rows = [
        {"study_instance_uid": "", "accession_number": studies[0]["accession_number"], "text": "FINDINGS: clear lungs."},
        {"study_instance_uid": studies[1]["study_instance_uid"], "accession_number": "", "text": "   "},
        {"study_instance_uid": "", "accession_number": "", "text": "orphan text"},
        {"study_instance_uid": "2.25.999", "accession_number": "", "text": "FINDINGS: images come later."},
    ]
    import csv

    with (cohort / "dicom" / "reports.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["study_instance_uid", "accession_number", "text"])
        w.writeheader()
        w.writerows(rows)
    (cohort / "more.jsonl").write_text('{"study_instance_uid": "x", "text": "ok"}\nnot json\n')
    s = ingest_folder(workspace, cohort / "dicom")
    assert s.reports_linked == 1
    assert s.quarantined == {"empty_report": 1, "unkeyed_report": 1}
    assert s.reports_pending == 1  # the report for images not ingested yet waits
    assert s.studies_without_report == len(studies) - 1
    s2 = ingest_folder(workspace, cohort / "dicom", reports=cohort / "more.jsonl")
    assert s2.quarantined == {"malformed_report": 1}
    assert s2.reports_pending == 2


def test_missing_source_is_a_clear_error(workspace, tmp_path):
    from appliance.errors import BadInputError

    with pytest.raises(BadInputError, match="does not exist"):
        ingest_folder(workspace, tmp_path / "nope")


def _rfm(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([str(Path(sys.executable).parent / "rfm"), *args], capture_output=True, text=True, env=env)


def _catalog_state(ws_root: Path) -> dict:
    with Catalog(ws_root / "catalog.sqlite") as cat:
        shas = sorted(r["sha256"] for r in cat.db.execute("SELECT sha256 FROM instances"))
        return {"counts": cat.counts(), "stages": cat.stage_counts(), "shas": shas}


def test_resume_after_kill(cohort, tmp_path):
    reference = make_workspace(tmp_path / "reference")
    assert _rfm("ingest", str(cohort / "dicom"), "-w", str(reference.root)).returncode == 0

    ws = make_workspace(tmp_path / "killed")
    killed = _rfm("ingest", str(cohort / "dicom"), "-w", str(ws.root), env_extra={"RFM_FAULT_KILL_AT": "ingest_series:3"})
    assert killed.returncode == -9, killed.stderr
    with Catalog(ws.catalog_path) as cat:
        assert len(cat.keys_with_status("series", "ingest")) == 3
        assert not cat.keys_with_status("series", "preprocess")
    resumed = _rfm("ingest", str(cohort / "dicom"), "-w", str(ws.root), env_extra={"RFM_FAULT_KILL_AT": "deid_series:2"})
    assert resumed.returncode == -9, resumed.stderr
    with Catalog(ws.catalog_path) as cat:
        assert len(cat.keys_with_status("series", "deid")) == 2
    resumed = _rfm("ingest", str(cohort / "dicom"), "-w", str(ws.root), env_extra={"RFM_FAULT_KILL_AT": "preprocess_series:2"})
    assert resumed.returncode == -9, resumed.stderr
    with Catalog(ws.catalog_path) as cat:
        assert len(cat.keys_with_status("series", "preprocess")) == 2
    final = _rfm("ingest", str(cohort / "dicom"), "-w", str(ws.root))
    assert final.returncode == 0, final.stderr
    assert _catalog_state(ws.root) == _catalog_state(reference.root)
    assert not list(ws.raw.rglob("*.partial")) and not list(ws.quarantine.glob(".incoming-*"))
    assert not list(ws.deid.glob("*/.staging-*"))
    assert sorted(p.name for p in ws.cache.glob("*.npy")) and len(list(ws.cache.glob("*.npy"))) == len(
        list(reference.cache.glob("*.npy")))


def test_compressed_series_are_ingested_and_decode_to_the_same_volume(cohort, tmp_path):
    from pydicom.uid import JPEG2000Lossless, RLELossless

    from appliance.deid.stage import deidentify_workspace
    from appliance.preprocess import load_cached_volume
    from appliance.preprocess.stage import preprocess_workspace

    plain = make_workspace(tmp_path / "plain")
    ingest_folder(plain, cohort / "dicom")
    deidentify_workspace(plain)
    preprocess_workspace(plain)
    for series, syntax in zip(_series_dirs(cohort)[:2], (RLELossless, JPEG2000Lossless)):
        for f in series.iterdir():
            ds = pydicom.dcmread(f)
            ds.compress(syntax)
            ds.save_as(f, enforce_file_format=True)
    packed = make_workspace(tmp_path / "packed")
    s = ingest_folder(packed, cohort / "dicom")
    assert s.n_quarantined == 0
    assert deidentify_workspace(packed).series_quarantined == 0
    assert preprocess_workspace(packed).series_done == s.series_accepted
    # cache file names are per-site keys, so compare the volumes as sorted sets
    volumes_plain = sorted(load_cached_volume(p)[0].tobytes() for p in plain.cache.glob("*.npy"))
    volumes_packed = sorted(load_cached_volume(p)[0].tobytes() for p in packed.cache.glob("*.npy"))
    assert volumes_plain == volumes_packed


def test_dicomdir_media_is_read_and_its_index_skipped(cohort, workspace, tmp_path):
    """A CD/DVD-style export (DICOMDIR + IHE folder names) written by pydicom's FileSet."""
    from pydicom.fileset import FileSet

    series = _series_dirs(cohort)[0]
    media = tmp_path / "media"
    fs = FileSet()
    for f in sorted(series.iterdir()):
        fs.add(pydicom.dcmread(f))
    fs.write(media)
    assert (media / "DICOMDIR").is_file()
    s = ingest_folder(workspace, media)
    assert s.series_accepted == 1 and s.files_accepted == len(list(series.iterdir()))
    assert s.skipped == {"dicomdir_index": 1} and s.n_quarantined == 0
