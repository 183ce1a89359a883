"""Chest radiographs through the site pipeline: ingest (projection geometry), deid, radiograph cache, labels."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pydicom
import pytest

from appliance.catalog import Catalog
from appliance.deid.audit import scan_bytes
from appliance.deid.stage import audit_output, deidentify_workspace
from appliance.ingest import ingest_folder
from appliance.labels.metrics import agreement
from appliance.labels.stage import label_workspace
from appliance.labels.vocabularies import load_vocabulary
from appliance.preprocess.radiograph import (RadiographSettings, display_values, load_cached_radiograph,
                                             resize_square, uniform_border)
from appliance.preprocess.stage import preprocess_workspace
from appliance.workspace import open_workspace
from conftest import ground_truth, make_workspace, set_config

CXR_SITE = {"ingest": {"modalities": ["CR", "DX"], "min_slices": 1},
            "labels": {"vocabulary": "cxr_19+cxr_lines_tubes_10"}, "preprocess": {"radiograph_size": 64}}


@pytest.fixture(scope="module")
def cxr_site(tmp_path_factory, small_cxr_cohort):
    """The small CXR cohort taken through ingest, deid, preprocess and labels once. Read-only."""
    ws = make_workspace(tmp_path_factory.mktemp("cxr_site") / "site", **CXR_SITE)
    summaries = {"ingest": ingest_folder(ws, small_cxr_cohort / "dicom"), "deid": deidentify_workspace(ws),
                 "preprocess": preprocess_workspace(ws), "labels": label_workspace(ws)}
    return ws, summaries


def _by_series_key(ws, cohort) -> dict[str, tuple[dict, dict]]:
    return {ws.opaque_key("series", s["series_instance_uid"]): (study, s)
            for study in ground_truth(cohort)["studies"] for s in study["series"]}


def test_every_stage_takes_every_radiograph(cxr_site, small_cxr_cohort):
    ws, s = cxr_site
    n_series = len(_by_series_key(ws, small_cxr_cohort))
    n_studies = len(ground_truth(small_cxr_cohort)["studies"])
    assert s["ingest"].series_accepted == s["ingest"].files_accepted == n_series
    assert s["ingest"].n_quarantined == s["ingest"].n_skipped == 0 and s["ingest"].reports_linked == n_studies
    assert s["deid"].series_done == n_series and s["deid"].series_quarantined == 0 and s["deid"].audit_hits == 0
    assert s["deid"].files_pixels_cleaned >= 1 and s["deid"].reports_done == n_studies
    assert s["preprocess"].series_done == n_series
    assert s["preprocess"].series_quarantined == s["preprocess"].series_failed == 0
    assert s["labels"].labelled == n_studies


def test_catalog_has_projection_geometry(cxr_site, small_cxr_cohort):
    ws, _ = cxr_site
    truth = _by_series_key(ws, small_cxr_cohort)
    with Catalog(ws.catalog_path) as cat:
        rows = cat.all_series()
    assert {r.key for r in rows} == set(truth)
    for row in rows:
        _, s = truth[row.key]
        g = row.geometry
        assert row.modality == s["modality"] and g["kind"] == "projection" and g["n_images"] == 1
        assert (g["rows"], g["cols"]) == (s["rows"], s["cols"]) and g["view_position"] == s["view_position"]
        assert g["photometric"] == s["photometric"] and g["pixel_spacing_mm"][0] == pytest.approx(
            s["imager_pixel_spacing_mm"], abs=1e-3)
        assert g["spacing_source"] == ("PixelSpacing" if s["modality"] == "DX" else "ImagerPixelSpacing")
        assert g["content_sha"]


def test_deid_keeps_what_training_needs_and_scrubs_the_rest(cxr_site, small_cxr_cohort):
    ws, _ = cxr_site
    truth = _by_series_key(ws, small_cxr_cohort)
    cleaned_boxes = 0
    for key, (study, s) in truth.items():
        (path,) = (ws.deid / ws.opaque_key("study", study["study_instance_uid"]) / key).glob("*.dcm")
        ds, raw = pydicom.dcmread(path), pydicom.dcmread(small_cxr_cohort / s["path"])
        # Retain Patient Characteristics and Retain Device Identity (the default profile options)
        assert ds.PatientSex == study["sex"] and ds.PatientAge == f"{study['patient_age']:03d}Y"
        assert ds.Manufacturer == study["manufacturer"]
        for keyword in ("ViewPosition", "ImagerPixelSpacing", "PhotometricInterpretation", "BitsStored",
                        "PresentationIntentType", "VOILUTSequence", "WindowCenter", "VOILUTFunction"):
            assert (keyword in ds) == (keyword in raw), keyword
            if keyword in raw and keyword != "VOILUTSequence":
                assert ds[keyword].value == raw[keyword].value, keyword
        if "VOILUTSequence" in raw:
            assert list(ds.VOILUTSequence[0].LUTData) == list(raw.VOILUTSequence[0].LUTData)
        assert str(ds.PatientName) != study["patient_name"] and "InstitutionName" not in ds
        assert ds.PatientIdentityRemoved == "YES"
        if s["burned_in_box"]:
            r0, c0, r1, c1 = s["burned_in_box"]
            box = ds.pixel_array[r0:r1, c0:c1]
            assert box.min() == box.max(), "burned-in text blanked"
            assert ds.BurnedInAnnotation == "NO"
            cleaned_boxes += 1
        else:
            assert np.array_equal(ds.pixel_array, raw.pixel_array)  # no text, pixels untouched
    assert cleaned_boxes >= 2
    assert audit_output(ws).clean


def test_radiograph_cache_contract(cxr_site, small_cxr_cohort):
    ws, _ = cxr_site
    truth = _by_series_key(ws, small_cxr_cohort)
    vois = set()
    for key, (study, s) in truth.items():
        image, meta = load_cached_radiograph(ws.cache / key)
        assert image.shape == (64, 64) and image.dtype == np.float16
        assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0 and float(image.std()) > 0.05
        assert meta["kind"] == "projection" and meta["view_position"] == s["view_position"]
        assert meta["sex"] == study["sex"] and meta["age_years"] == study["patient_age"]
        assert meta["manufacturer"] == study["manufacturer"] and meta["modality"] == s["modality"]
        assert meta["source_shape"] == [s["rows"], s["cols"]]
        r0, c0, r1, c1 = meta["crop_box"]
        border = s["border_px"]
        # the shutter is cropped (blanking burned-in text may widen the flat edge by its margin)
        assert r0 >= border["top"] and c0 >= border["left"]
        assert r1 <= s["rows"] - border["bottom"] and c1 <= s["cols"] - border["right"]
        assert r0 <= border["top"] + 3 and s["rows"] - r1 <= border["bottom"] + 3
        expected = {"lut": "lut", "window": "window LINEAR", "sigmoid": "window SIGMOID",
                    "none": "percentile (for processing)"}[s["voi"]]
        assert meta["voi"] == expected
        vois.add(expected)
    assert len(vois) == 4


def _cache_value(image: np.ndarray, meta: dict, point) -> float:
    r0, c0 = meta["crop_box"][:2]
    r = int(round((point[0] - r0) * meta["scale"] + meta["pad"][0]))
    c = int(round((point[1] - c0) * meta["scale"] + meta["pad"][1]))
    return float(image[max(r - 1, 0):r + 2, max(c - 1, 0):c + 2].astype(np.float32).mean())


def test_monochrome1_and_for_processing_come_out_lungs_dark(cxr_site, small_cxr_cohort):
    ws, _ = cxr_site
    kinds = set()
    for key, (study, s) in _by_series_key(ws, small_cxr_cohort).items():
        image, meta = load_cached_radiograph(ws.cache / key)
        marks = s["landmarks_px"]
        if s["view_position"] == "LL":
            assert _cache_value(image, meta, marks["retrosternal"]) < _cache_value(image, meta, marks["spine"])
            continue
        mediastinum = _cache_value(image, meta, marks["mediastinum"])
        for lung in ("right_lung", "left_lung"):
            assert _cache_value(image, meta, marks[lung]) < mediastinum - 0.1, (s["photometric"], s["voi"], lung)
        kinds.add((s["photometric"], s["voi"]))
    assert {p for p, _ in kinds} == {"MONOCHROME1", "MONOCHROME2"} and ("MONOCHROME1", "none") in kinds


def test_no_planted_phi_in_cache(cxr_site, small_cxr_cohort):
    ws, _ = cxr_site
    studies = ground_truth(small_cxr_cohort)["studies"]
    phi = {str(v) for st in studies for v in st["phi"]} | {st["study_instance_uid"] for st in studies}
    phi |= {s["series_instance_uid"] for st in studies for s in st["series"]}
    files = sorted(ws.cache.iterdir())
    assert len(files) == 2 * sum(len(st["series"]) for st in studies)
    for f in files:
        assert not scan_bytes(f.read_bytes(), phi, name=f.name), f.name
    text = "".join(f.read_text() for f in files if f.suffix == ".json")
    assert not [v for v in phi if len(v) >= 4 and v in text]


def test_labels_agree_with_ground_truth(cxr_site, small_cxr_cohort):
    ws, _ = cxr_site
    vocabulary = load_vocabulary("cxr_19+cxr_lines_tubes_10")
    with (ws.labels / "labels.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0])[1:] == list(vocabulary.names)
    pred = {r["study_key"]: {k: int(v) for k, v in r.items() if k != "study_key"} for r in rows}
    gold = {ws.opaque_key("study", st["study_instance_uid"]): st["labels"]
            for st in ground_truth(small_cxr_cohort)["studies"]}
    assert set(pred) == set(gold)
    report = agreement(pred, gold, list(vocabulary.names), protocol="ignore_uncertain")
    assert report.macro["f1"] > 0.95 and report.macro["accuracy"] > 0.98
    assert any(v == 1 for labels in gold.values() for k, v in labels.items() if k in vocabulary.names[19:])


def test_rerun_skips_and_a_new_size_redoes_only_radiographs(cxr_site, tmp_path):
    ws, s = cxr_site
    shutil.copytree(ws.root, tmp_path / "site")
    copy = open_workspace(tmp_path / "site")
    again = preprocess_workspace(copy)
    assert again.series_done == 0 and again.series_skipped == s["preprocess"].series_done
    set_config(copy, preprocess={"radiograph_size": 32})
    redo = preprocess_workspace(copy)
    assert redo.series_done == s["preprocess"].series_done
    image, meta = load_cached_radiograph(next(copy.cache.glob("*.npy")))
    assert image.shape == (32, 32) and meta["settings"]["size"] == 32
    forced = preprocess_workspace(copy, force=True)
    assert forced.series_done == s["preprocess"].series_done


def test_bad_radiographs_are_quarantined_and_the_rest_carry_on(small_cxr_cohort, tmp_path):
    cohort = tmp_path / "cohort"
    shutil.copytree(small_cxr_cohort, cohort)
    series = [s for st in ground_truth(cohort)["studies"] for s in st["series"]]
    truncated, wrong_rows, no_pixels, tiny, twin = (cohort / s["path"] for s in series[:5])
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) - len(data) // 4])
    ds = pydicom.dcmread(wrong_rows)
    ds.Rows = ds.Rows // 2  # the pixel data is now twice what the header says
    ds.save_as(wrong_rows, enforce_file_format=True)
    ds = pydicom.dcmread(no_pixels)
    del ds.PixelData
    ds.save_as(no_pixels, enforce_file_format=True)
    ds = pydicom.dcmread(tiny)
    ds.Rows = ds.Columns = 16
    ds.PixelData = np.zeros((16, 16), np.uint16).tobytes()
    ds.save_as(tiny, enforce_file_format=True)
    ds = pydicom.dcmread(twin)  # a second image in the same series: not bad, but not cached as one image
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "2.25.1234567890"
    ds.InstanceNumber = 2
    ds.save_as(twin.with_name("second_image.dcm"), enforce_file_format=True)

    ws = make_workspace(tmp_path / "site", **CXR_SITE)
    ing = ingest_folder(ws, cohort / "dicom")
    assert ing.quarantined == {"truncated": 1, "bad_dimensions": 2, "no_pixel_data": 1}
    assert ing.series_accepted == len(series) - 4
    with Catalog(ws.catalog_path) as cat:
        reasons = [q.reason for q in cat.quarantined()]
        assert all("\n" not in r for r in reasons) and any("wrong image dimensions" in r for r in reasons)
        bad_key = ws.opaque_key("series", series[0]["series_instance_uid"])
        assert cat.status("series", bad_key, "ingest")["status"] == "quarantined"
        twin_key = ws.opaque_key("series", series[4]["series_instance_uid"])
        assert cat.series(twin_key).geometry["n_images"] == 2
    deid = deidentify_workspace(ws)
    assert deid.series_done == len(series) - 4 and deid.series_quarantined == 0
    pre = preprocess_workspace(ws)
    assert pre.series_done == len(series) - 5 and pre.series_quarantined == 1 and pre.series_failed == 0
    with Catalog(ws.catalog_path) as cat:
        (q,) = [q for q in cat.quarantined() if q.stage == "preprocess"]
        assert q.code == "multiple_projections" and q.item_key == twin_key
    # a re-run after a fix: nothing done twice, the quarantined series stays out until re-ingested
    again = preprocess_workspace(ws)
    assert again.series_done == 0 and again.series_skipped == len(series) - 5


def test_ct_only_site_skips_radiographs(small_cxr_cohort, workspace):
    s = ingest_folder(workspace, small_cxr_cohort / "dicom")
    assert s.series_accepted == 0 and s.n_quarantined == 0
    assert set(s.skipped) <= {"modality_CR_not_accepted", "modality_DX_not_accepted"} and s.n_skipped == s.files_seen


def test_display_values_voi_paths_and_polarity(small_cxr_cohort):
    settings = RadiographSettings(size=64)
    studies = ground_truth(small_cxr_cohort)["studies"]
    linear = next(s for st in studies for s in st["series"] if s["voi"] == "sigmoid")
    ds = pydicom.dcmread(small_cxr_cohort / linear["path"])
    ds.VOILUTFunction = "LINEAR"
    mono2, how = display_values(ds, settings)
    assert how == "window LINEAR"
    # the same picture stored the other way round must display the same
    maxv = 2**ds.BitsStored - 1
    inverted = pydicom.dcmread(small_cxr_cohort / linear["path"])
    inverted.VOILUTFunction = "LINEAR"
    inverted.PixelData = (maxv - inverted.pixel_array).astype("<u2").tobytes()
    inverted.PhotometricInterpretation = "MONOCHROME1"
    inverted.WindowCenter = f"{maxv - float(ds.WindowCenter) + 1}"
    mono1, _ = display_values(inverted, settings)
    assert np.abs(mono1 - mono2).max() < 0.01
    del ds.WindowCenter, ds.WindowWidth
    assert display_values(ds, settings)[1] == "percentile (no VOI in header)"
    ds.WindowCenter, ds.WindowWidth = "100", "0"
    assert display_values(ds, settings)[1] == "percentile (unusable window)"
    ds.PresentationIntentType, ds.PixelIntensityRelationship = "FOR PROCESSING", "LIN"
    img, how = display_values(ds, settings)
    assert how == "percentile (for processing)" and 0 <= img.min() and img.max() <= 1


def test_border_crop_and_square_resize():
    img = np.zeros((40, 30), np.float32)
    img[5:37, 2:28] = np.random.default_rng(0).random((32, 26))
    assert uniform_border(img) == (5, 2, 37, 28)
    flat = np.zeros((40, 30), np.float32)
    flat[:, 15] = 1.0  # mostly flat: not a border to crop
    assert uniform_border(flat) == (0, 0, 40, 30)
    out, scale, pad = resize_square(img[5:37, 2:28], 64)
    assert out.shape == (64, 64) and scale == pytest.approx(2.0) and pad == (0, 6)
    assert out[:, :6].max() == 0 and out[:, 58:].max() == 0 and out[:, 6:58].mean() > 0.3
