"""The de-identification stage on the synthetic cohort: zero planted PHI survives, output is usable,
deterministic per key, audited, and resumable."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import shutil

import numpy as np
import pydicom
import pytest

from appliance.catalog import Catalog
from appliance.cli import main
from appliance.deid.keys import DeidKeys
from appliance.deid.stage import audit_output, deidentify_workspace, load_keys
from appliance.ingest import ingest_folder
from appliance.preprocess import PreprocessSettings, load_series, resample_to_canvas
from conftest import ground_truth, make_workspace


@pytest.fixture
def deidentified(cohort, workspace):
    ingest_folder(workspace, cohort / "dicom")
    summary = deidentify_workspace(workspace)
    return workspace, summary


def _deid_files(ws):
    return sorted(p for p in ws.deid.rglob("*") if p.is_file())


def _parse_date(value: str) -> dt.date | None:
    for fmt in ("%Y%m%d", "%m/%d/%Y"):
        try:
            return dt.datetime.strptime(value, fmt).date()
        except ValueError:
            pass
    return None


def _shifted_dates(gt: dict, keys) -> set[str]:
    """Every planted date as the de-identifier legitimately rewrites it (each patient's own offset, both formats).

    A shifted date can by chance equal some real date (say the same patient's prior exam): that is a
    coincidence of the random key, not a surviving date, so such a value is not looked for as a string."""
    out = set()
    for study in gt["studies"]:
        offset = dt.timedelta(days=keys.date_offset_days(study["patient_id"]))
        for value in study["phi"]:
            d = _parse_date(str(value).strip()) if len(str(value).strip()) in (8, 10) else None
            if d is not None:
                out |= {(d + offset).strftime("%Y%m%d"), (d + offset).strftime("%m/%d/%Y")}
    return out


def _assert_no_planted_phi(ws, gt: dict) -> set[str]:
    """Fails on any planted PHI string or original UID in the de-identified output; returns the dates let pass."""
    coincidences = _shifted_dates(gt, load_keys(ws))
    blob = b"".join(p.read_bytes() for p in _deid_files(ws)).lower()
    # The replacement UIDs (2.25.<39 random digits>, thousands of them) hold any given 6-digit planted
    # value by chance in about one run in 30; the original UIDs are looked for whole below.
    values_blob = re.sub(rb"2\.25\.\d+", b"2.25.", blob)
    for study in gt["studies"]:
        for value in study["phi"]:
            v = str(value).strip()
            if len(v) < 4 or v in coincidences:
                continue
            for enc in ("latin-1", "utf-8", "utf-16-le"):
                assert v.lower().encode(enc, "ignore") not in values_blob, \
                    f"planted PHI survived ({len(v)} chars, {enc})"
        assert study["study_instance_uid"].encode() not in blob
        for series in study["series"]:
            assert series["series_instance_uid"].encode() not in blob
    return {v for v in coincidences if v.lower().encode() in blob}


def test_no_planted_phi_survives_anywhere(cohort, deidentified):
    ws, summary = deidentified
    gt = ground_truth(cohort)
    assert summary.series_quarantined == 0 and summary.reports_quarantined == 0 and summary.audit_hits == 0
    assert summary.series_done == sum(len(s["series"]) for s in gt["studies"])
    assert summary.reports_done == len(gt["studies"])
    _assert_no_planted_phi(ws, gt)


def test_shifted_date_equal_to_a_real_date_is_no_leak(cohort, workspace):
    """A key whose offset moves one exam date exactly onto another planted date (about 1 run in 200 with a
    random key): the output then holds that date string legitimately, and the check must tell the two apart."""
    gt = ground_truth(cohort)
    planted = {str(v) for st in gt["studies"] for v in st["phi"]}
    planted_dates = {_parse_date(v) for v in planted if len(v) in (8, 10)} - {None}
    study = gt["studies"][0]
    exam = dt.datetime.strptime(study["study_date"], "%Y%m%d").date()
    target = max((d - exam).days for d in planted_dates if -3650 <= (d - exam).days <= -30)
    key = next(k for k in (hashlib.sha256(str(i).encode()).hexdigest() for i in range(200_000))
               if DeidKeys(bytes.fromhex(k)).date_offset_days(study["patient_id"]) == target)
    (workspace.root / workspace.config().deid.key_file).write_text(key + "\n")
    ingest_folder(workspace, cohort / "dicom")
    summary = deidentify_workspace(workspace)
    assert summary.series_quarantined == 0 and summary.reports_quarantined == 0
    let_pass = _assert_no_planted_phi(workspace, gt)
    assert let_pass & planted, "the forced coincidence is in the output"


def test_output_is_marked_and_still_usable(cohort, deidentified):
    """Same geometry and intensities as the raw series, except where burned-in text was blanked."""
    ws, _ = deidentified
    burned = {se["series_instance_uid"]: set(se["burned_in_instance_numbers"])
              for st in ground_truth(cohort)["studies"] for se in st["series"]}
    settings = PreprocessSettings(spacing_mm=(6.0, 6.0, 8.0), canvas=(64, 64, 40))
    with Catalog(ws.catalog_path) as cat:
        for row in cat.all_series():
            out = ws.root / cat.status("series", row.key, "deid")["output"]
            files = sorted(out.glob("*.dcm"))
            assert len(files) == row.n_instances
            ds = pydicom.dcmread(files[0])
            assert ds.PatientIdentityRemoved == "YES"
            assert len(ds.DeidentificationMethodCodeSequence) >= 2
            assert ds.preamble == b"\x00" * 128
            raw_files = [ws.root / r for r in cat.series_files(row.key)]
            series_uid = pydicom.dcmread(raw_files[0], stop_before_pixels=True).SeriesInstanceUID
            for raw_path in raw_files:
                raw = pydicom.dcmread(raw_path)
                new = next(pydicom.dcmread(f) for f in files
                           if pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient == raw.ImagePositionPatient)
                same = np.array_equal(raw.pixel_array, new.pixel_array)
                has_text = int(raw.InstanceNumber) in burned[series_uid]
                if has_text:
                    assert not same, "burned-in text blanked"
                elif raw.get("BurnedInAnnotation") != "YES":
                    # (a series flagged YES has its text region blanked on every slice, by design)
                    assert same, "slices without text keep their pixels"
                assert new.ImageOrientationPatient == raw.ImageOrientationPatient
                assert (new.RescaleSlope, new.RescaleIntercept) == (raw.RescaleSlope, raw.RescaleIntercept)
            if not burned[series_uid]:
                raw_vol, _ = resample_to_canvas(load_series(raw_files), settings)
                deid_vol, _ = resample_to_canvas(load_series(files), settings)
                assert np.array_equal(raw_vol, deid_vol), "preprocesses into the same volume"


def test_same_key_same_bytes_other_key_other_uids(cohort, tmp_path):
    a = make_workspace(tmp_path / "a")
    b = make_workspace(tmp_path / "b")
    shutil.copy(a.root / "secrets" / "deid.key", b.root / "secrets" / "deid.key")
    c = make_workspace(tmp_path / "c")
    for ws in (a, b, c):
        ingest_folder(ws, cohort / "dicom")
        deidentify_workspace(ws)
    files_a = {p.relative_to(a.deid): p.read_bytes() for p in _deid_files(a)}
    files_b = {p.relative_to(b.deid): p.read_bytes() for p in _deid_files(b)}
    # folder names are per-site keys (salted); compare contents as sets
    assert sorted(files_a.values()) == sorted(files_b.values())
    uids = lambda ws: {pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID
                       for p in ws.deid.rglob("*.dcm")}
    assert uids(a) == uids(b) and not uids(a) & uids(c)


def test_patient_links_across_studies_and_dates_shift_consistently(cohort, deidentified):
    ws, _ = deidentified
    gt = ground_truth(cohort)
    by_patient: dict[str, list[str]] = {}
    for s in gt["studies"]:
        by_patient.setdefault(s["patient_id"], []).append(s["study_date"])
    pseudonyms: dict[str, set[str]] = {}
    offsets: dict[str, set[int]] = {}
    import datetime as dt

    raw_by_uid = {}
    with Catalog(ws.catalog_path) as cat:
        for row in cat.all_series():
            raw = pydicom.dcmread(ws.root / cat.series_files(row.key)[0], stop_before_pixels=True)
            out = sorted((ws.root / cat.status("series", row.key, "deid")["output"]).glob("*.dcm"))[0]
            new = pydicom.dcmread(out, stop_before_pixels=True)
            pseudonyms.setdefault(raw.PatientID, set()).add(str(new.PatientID))
            shift = (dt.datetime.strptime(new.StudyDate, "%Y%m%d") - dt.datetime.strptime(raw.StudyDate, "%Y%m%d")).days
            offsets.setdefault(raw.PatientID, set()).add(shift)
            raw_by_uid[raw.StudyInstanceUID] = new.StudyInstanceUID
    assert all(len(p) == 1 for p in pseudonyms.values()), "one pseudonym per patient"
    assert len({next(iter(p)) for p in pseudonyms.values()}) == len(pseudonyms), "distinct patients stay distinct"
    assert all(len(o) == 1 and 0 not in o for o in offsets.values()), "one non-zero offset per patient"


def test_report_dates_shift_with_the_patient_offset(deidentified):
    """Every date written in a report moves by the same days as the study's header dates."""
    import datetime as dt
    import re

    ws, _ = deidentified
    date_rx = re.compile(r"\b(\d{2})/(\d{2})/(\d{4})\b")
    checked = 0
    with Catalog(ws.catalog_path) as cat:
        for r in cat.db.execute("SELECT study_key, raw_path FROM reports").fetchall():
            key = r["study_key"]
            series_key = cat.db.execute("SELECT key FROM series WHERE study_key = ?", (key,)).fetchone()["key"]
            raw = pydicom.dcmread(ws.root / cat.series_files(series_key)[0], stop_before_pixels=True)
            out_dir = ws.root / cat.status("series", series_key, "deid")["output"]
            new = pydicom.dcmread(sorted(out_dir.glob("*.dcm"))[0], stop_before_pixels=True)
            parse = lambda d: dt.date(int(d[:4]), int(d[4:6]), int(d[6:8]))
            offset = parse(new.StudyDate) - parse(raw.StudyDate)
            raw_dates = [dt.date(int(y), int(m), int(d)) for m, d, y in date_rx.findall((ws.root / r["raw_path"]).read_text())]
            out_text = (ws.deid / key / "report.txt").read_text()
            out_dates = [dt.date(int(y), int(m), int(d)) for m, d, y in date_rx.findall(out_text)]
            assert [d + offset for d in raw_dates] == out_dates
            assert "IMPRESSION" in out_text
            checked += len(raw_dates)
    assert checked > 0


def test_audit_command_is_clean_then_catches_a_leak(deidentified, capsys):
    ws, _ = deidentified
    assert audit_output(ws).clean
    assert main(["deid", "audit", "-w", str(ws.root)]) == 0
    # plant a raw (identifiable) file among the de-identified output: the audit must fail
    with Catalog(ws.catalog_path) as cat:
        row = cat.all_series()[0]
        out = ws.root / cat.status("series", row.key, "deid")["output"]
        shutil.copy(ws.root / cat.series_files(row.key)[0], out / "zz_leak.dcm")
    report = audit_output(ws)
    assert not report.clean and all(h["file"].endswith("zz_leak.dcm") for h in report.hits)
    capsys.readouterr()
    assert main(["deid", "audit", "-w", str(ws.root)]) == 2
    captured = capsys.readouterr()
    assert "audit failed" in captured.err
    raw = pydicom.dcmread(out / "zz_leak.dcm", stop_before_pixels=True)
    assert str(raw.PatientName) not in captured.out + captured.err, "the audit never prints the values"


def test_rerun_skips_and_key_change_redoes(deidentified):
    ws, first = deidentified
    again = deidentify_workspace(ws)
    assert again.series_done == 0 and again.series_skipped == first.series_done
    assert again.reports_skipped == first.reports_done
    (ws.root / "secrets" / "deid.key").unlink()
    from appliance.deid.keys import DeidKeys

    DeidKeys.generate(ws.root / "secrets" / "deid.key")
    redo = deidentify_workspace(ws)
    assert redo.series_done == first.series_done


def test_missing_key_is_a_one_line_error(deidentified, capsys):
    ws, _ = deidentified
    (ws.root / "secrets" / "deid.key").unlink()
    assert main(["deid", "-w", str(ws.root), "--force"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "key" in err.lower()


def test_audit_records_hold_no_values(cohort, deidentified):
    ws, _ = deidentified
    text = "".join(p.read_text() for p in (ws.audit / "deid").glob("*.json"))
    phi = {v for s in ground_truth(cohort)["studies"] for v in s["phi"] if len(str(v)) >= 4}
    assert text and not [v for v in phi if v in text]
    series_records = [p for p in (ws.audit / "deid").glob("*.json") if not p.name.endswith(".report.json")]
    record = json.loads(series_records[0].read_text())
    assert record["files"] and "actions" in record["files"][0]
