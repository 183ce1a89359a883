"""Burned-in pixel PHI: filter files, decision table, the text detector on the synthetic cohort, OCR when installed."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from appliance.deid import pixels
from appliance.deid.pixels import (
    PixelPolicy,
    PixelRegion,
    detect_text_regions,
    load_pixel_filters,
    parse_pixel_filters,
    scrub_pixels,
)
from appliance.errors import ConfigError
from appliance.synthetic import generate_cohort, render_text_mask

from conftest import GE_DIR

HAS_TESSERACT = shutil.which("tesseract") is not None
needs_tesseract = pytest.mark.skipif(not HAS_TESSERACT, reason="tesseract binary not installed (apt: tesseract-ocr)")
NO_OCR = PixelPolicy(ocr="off")


def example(name: str) -> Dataset:
    return pydicom.dcmread(get_testdata_file(name, download=False))


# --- filter file ------------------------------------------------------------------------------

FILTER_TEXT = """
# a comment
Top banner of a LOGIQ
{ Modality.equals("US") * (Manufacturer.containsIgnoreCase("g.e.") + Manufacturer.startsWith("GE "))
  * [0028,0010].equals("240") }
(0,0,320,56) (0,224,320,16)

{ !Modality.equals("US") * ManufacturerModelName.matches("RHAP.*") }
(10,10,20,20)
"""


def test_filter_file_parses_names_conditions_and_rectangles():
    filters = parse_pixel_filters(FILTER_TEXT)
    assert [f.name for f in filters] == ["Top banner of a LOGIQ", "filter 2"]
    assert filters[0].rectangles == ((0, 0, 320, 56), (0, 224, 320, 16))
    us, ct, mr = example("examples_rgb_color.dcm"), example("CT_small.dcm"), example("MR_small.dcm")
    assert filters[0].matches(us) and not filters[0].matches(ct)
    assert filters[1].matches(ct) and not filters[1].matches(us) and not filters[1].matches(mr)


@pytest.mark.parametrize("bad", ["{ Modality.equals(\"US\") }\n", "(0,0,1,1)\n", "{ Modality.frobnicate(\"x\") }\n(0,0,1,1)",
                                 "{ NotAKeyword.equals(\"x\") }\n(0,0,1,1)", "{ Modality.equals(\"US\")\n"])
def test_filter_file_errors(bad):
    with pytest.raises(ValueError):
        parse_pixel_filters(bad)


def test_packaged_filters_load_and_bad_file_is_a_config_error(tmp_path):
    filters = load_pixel_filters()
    assert len(filters) >= 5
    bad = tmp_path / "bad.txt"
    bad.write_text("{ Modality.equals(\"US\") }\n")
    with pytest.raises(ConfigError):
        load_pixel_filters(bad)


# --- ultrasound examples ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["examples_rgb_color.dcm", "examples_palette.dcm", "examples_ybr_color.dcm"])
def test_ultrasound_without_filter_or_ocr_needs_review(name):
    result = scrub_pixels(example(name), NO_OCR)
    assert result.status == "needs_review" and result.dataset is None
    assert "OCR unavailable" in result.reason


def test_ultrasound_marked_clean_in_header_is_untouched():
    ds = example("examples_rgb_color.dcm")
    ds.BurnedInAnnotation = "NO"
    result = scrub_pixels(ds, NO_OCR)
    assert result.status == "untouched" and result.dataset is ds


@pytest.mark.parametrize("name", ["examples_rgb_color.dcm", "examples_palette.dcm"])
def test_ultrasound_with_matching_filter_is_blanked_in_the_region_only(name):
    ds = example(name)
    before = ds.pixel_array.copy()
    banner = (0, 0, int(ds.Columns), 40)
    flt = parse_pixel_filters(f'test\n{{ Modality.equals("US") }}\n({",".join(map(str, banner))})\n')
    result = scrub_pixels(ds, PixelPolicy(filters=flt, ocr="off"))
    assert result.status == "cleaned"
    assert result.regions == [PixelRegion(None, 0, 0, int(ds.Columns), 40, "filter")]
    out = result.dataset
    after = out.pixel_array
    assert after.shape == before.shape and after.dtype == before.dtype
    assert np.array_equal(after[40:], before[40:])
    assert not np.array_equal(before[:40], after[:40])
    assert len(np.unique(after[:40].reshape(-1, *after.shape[2:]), axis=0)) == 1  # one fill colour
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert out.BurnedInAnnotation == "NO"
    assert out.PhotometricInterpretation == ds.PhotometricInterpretation
    assert np.array_equal(ds.pixel_array, before)  # the input is not modified


@pytest.mark.parametrize("name", ["examples_rgb_color.dcm", "examples_palette.dcm", "examples_ybr_color.dcm"])
def test_packaged_filters_match_the_example_ultrasounds(name):
    result = scrub_pixels(example(name), PixelPolicy(filters=load_pixel_filters(), ocr="off"))
    assert result.status == "cleaned" and result.regions
    assert all(r.source == "filter" for r in result.regions)


def test_multiframe_every_frame_is_blanked(tmp_path):
    ds = example("examples_ybr_color.dcm")
    before = ds.pixel_array.copy()  # decoded to RGB
    flt = parse_pixel_filters('banner\n{ Modality.equals("US") }\n(0,0,320,30)\n')
    out = scrub_pixels(ds, PixelPolicy(filters=flt, ocr="off")).dataset
    assert int(out.NumberOfFrames) == 30 and out.PhotometricInterpretation == "RGB"
    path = tmp_path / "out.dcm"
    out.save_as(path, enforce_file_format=True)
    after = pydicom.dcmread(path).pixel_array
    assert after.shape == before.shape == (30, 240, 320, 3)
    assert (after[:, :30] == 0).all()
    assert np.array_equal(after[:, 30:], before[:, 30:])


@needs_tesseract
def test_ocr_finds_the_ultrasound_banner_text():
    ds = example("examples_rgb_color.dcm")
    result = scrub_pixels(ds, PixelPolicy(ocr="on"), known_phi=[str(ds.PatientName), ds.PatientID])
    assert result.status == "cleaned"
    assert any(r.source == "ocr" and r.y0 < 20 and r.x0 < 20 for r in result.regions)  # "BAPTIST MED CTR"
    words = {w.text for w in pixels.ocr_words(result.dataset)}
    assert not {"BAPTIST", "MED", "CTR"} & words


def test_ocr_on_without_tesseract_is_a_config_error(monkeypatch):
    monkeypatch.setattr(pixels.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError):
        scrub_pixels(example("CT_small.dcm"), PixelPolicy(ocr="on"))
    assert scrub_pixels(example("CT_small.dcm"), PixelPolicy(ocr="auto")).status == "untouched"


# --- CT / MR ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_ct_mr_without_text_are_untouched(name):
    ds = example(name)
    result = scrub_pixels(ds, PixelPolicy(ocr="auto"))
    assert result.status == "untouched" and result.dataset is ds and result.regions == []


@pytest.mark.parametrize("ocr", ["off", "auto"])
def test_ct_marked_burned_in_with_nothing_detectable_needs_review(ocr):
    ds = example("CT_small.dcm")
    ds.BurnedInAnnotation = "YES"
    result = scrub_pixels(ds, PixelPolicy(ocr=ocr))
    assert result.status == "needs_review" and result.dataset is None


def test_series_regions_clean_a_burned_in_slice_without_detectable_text():
    ds = example("CT_small.dcm")
    ds.BurnedInAnnotation = "YES"
    result = scrub_pixels(ds, NO_OCR, series_regions=[PixelRegion(None, 0, 0, 30, 10, "detector")])
    assert result.status == "cleaned" and result.regions[0].source == "series"


def test_detector_is_quiet_on_real_ge_ct():
    files = sorted(GE_DIR.glob("*.dcm"))[:8] if GE_DIR.is_dir() else []
    if not files:
        pytest.skip("real GE CT sample not present")
    for f in files:
        assert detect_text_regions(pydicom.dcmread(f)) == []


# --- synthetic cohort -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    summary = generate_cohort(tmp_path_factory.mktemp("pixels") / "c", n_studies=8, seed=0, matrix=96, slices=16)
    truth = json.loads(summary.ground_truth_path.read_text())
    slices = []
    for study in truth["studies"]:
        for series in study["series"]:
            for path in sorted((summary.dicom_dir.parent / series["path"]).iterdir()):
                ds = pydicom.dcmread(path)
                slices.append((study, series, path, ds, int(ds.InstanceNumber) in series["burned_in_instance_numbers"]))
    assert any(s[4] for s in slices), "the cohort must contain burned-in slices"
    return slices


def _text_value(ds: Dataset) -> int:
    return round((2000.0 - float(ds.RescaleIntercept)) / float(ds.RescaleSlope))  # the writer burns text at 2000 HU


@pytest.mark.parametrize("ocr", ["off", pytest.param("auto", marks=needs_tesseract)])
def test_synthetic_burned_in_text_is_blanked_and_other_slices_untouched(cohort, ocr):
    policy = PixelPolicy(ocr=ocr)
    for study, series, path, ds, burned in cohort:
        result = scrub_pixels(ds, policy, known_phi=study["phi"])
        if burned:
            assert result.status == "cleaned", result.reason
            before, after = ds.pixel_array, result.dataset.pixel_array
            mask = render_text_mask(study["burned_in_lines"], int(ds.Rows), int(ds.Columns))
            assert (before[mask] == _text_value(ds)).sum() > 50
            assert not (after == _text_value(ds)).any()  # every text pixel is gone
            inside = np.zeros(mask.shape, dtype=bool)
            for r in result.regions:
                inside[r.y0:r.y1, r.x0:r.x1] = True
            assert np.array_equal(after[~inside], before[~inside])  # nothing else changed
            ys, xs = np.nonzero(mask)
            near_text = np.zeros(mask.shape, dtype=bool)
            near_text[max(ys.min() - 4, 0):ys.max() + 5, max(xs.min() - 4, 0):xs.max() + 5] = True
            stray = (inside & ~near_text).sum()  # OCR may also box a few spurious "words" in anatomy
            assert stray == 0 if ocr == "off" else stray < 0.05 * mask.size
        elif series["burned_in_annotation"] == "YES":
            # the series says YES but this slice has nothing detectable: conservative
            assert result.status == "needs_review"
        else:
            assert result.status == "untouched" and result.dataset is ds
            assert ds.PixelData == pydicom.dcmread(path).PixelData


def test_synthetic_yes_series_is_cleaned_with_regions_from_its_burned_slices(cohort):
    by_series: dict[str, list] = {}
    for study, series, path, ds, burned in cohort:
        if series["burned_in_annotation"] == "YES":
            by_series.setdefault(series["series_instance_uid"], []).append((ds, burned))
    assert by_series
    for members in by_series.values():
        found = [r for ds, burned in members if burned for r in scrub_pixels(ds, NO_OCR).regions]
        shared = [PixelRegion(None, r.x0, r.y0, r.x1, r.y1, r.source) for r in found]
        for ds, burned in members:
            assert scrub_pixels(ds, NO_OCR, series_regions=shared).status == "cleaned"


def test_synthetic_cleaned_slice_roundtrips_through_a_file(cohort, tmp_path):
    ds = next(s for s in cohort if s[4])[3]
    out = scrub_pixels(ds, NO_OCR).dataset
    out.save_as(tmp_path / "x.dcm", enforce_file_format=True)
    back = pydicom.dcmread(tmp_path / "x.dcm")
    assert back.pixel_array.dtype == ds.pixel_array.dtype and back.pixel_array.shape == ds.pixel_array.shape
    assert back.BitsStored == ds.BitsStored and back.PixelRepresentation == ds.PixelRepresentation
    assert back.BurnedInAnnotation == "NO"


@needs_tesseract
def test_synthetic_ocr_reads_no_phi_after_cleaning(cohort):
    checked = 0
    for study, series, path, ds, burned in cohort:
        if not burned:
            continue
        tokens = {pixels._normalise(t) for line in study["burned_in_lines"] for t in line.replace(",", " ").split()}
        before = {pixels._normalise(w.text) for w in pixels.ocr_words(ds)}
        assert tokens & before  # OCR can read the burned-in text at all
        after = {pixels._normalise(w.text) for w in pixels.ocr_words(scrub_pixels(ds, NO_OCR).dataset)}
        assert not tokens & after
        checked += 1
        if checked >= 4:
            break
    assert checked
