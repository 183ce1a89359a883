"""The synthetic cohort generator: determinism, valid DICOM, geometry, planted findings, PHI, reports."""

from __future__ import annotations

import filecmp
import json
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import UID, CTImageStorage, ImplicitVRLittleEndian, RLELossless

from appliance.labels.vocabularies import CT_RATE_18
from appliance.synthetic import (
    PLANTABLE_FINDINGS,
    Tissue,
    axial_geometry,
    generate_cohort,
    make_chest_phantom,
    render_text_mask,
    write_ct_series,
)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort")
    done: list[int] = []
    summary = generate_cohort(out, n_studies=20, seed=0, progress=done.append)
    truth = json.loads(summary.ground_truth_path.read_text())
    reports = [json.loads(line) for line in summary.reports_path.read_text().splitlines()]
    return summary, truth, reports, done


def _hu(ds) -> np.ndarray:
    return pydicom.pixels.apply_rescale(ds.pixel_array, ds)


def _series_files(root: Path, series: dict) -> list[Path]:
    return sorted((root / series["path"]).iterdir())


def _all_text(ds, out: list[str]) -> list[str]:
    """Every value in a dataset (nested and private elements included) as text."""
    for elem in ds:
        if elem.tag == 0x7FE00010:
            continue
        if elem.VR == "SQ":
            for item in elem.value:
                _all_text(item, out)
        elif isinstance(elem.value, bytes):
            out.append(elem.value.decode("latin-1"))
        else:
            out.append(str(elem.value))
    return out


def _small_phantom(findings=frozenset(), seed=3):
    return make_chest_phantom(seed, findings, shape_zyx=(40, 80, 80), spacing_mm=(4.5, 4.5, 7.5))


def test_summary_layout_and_progress(cohort):
    summary, truth, reports, done = cohort
    assert done == list(range(1, 21))
    assert summary.n_studies == 20 == len(truth["studies"]) == len(reports)
    files = [p for p in summary.dicom_dir.rglob("*") if p.is_file() and p != summary.reports_path]
    assert len(files) == summary.n_files
    assert summary.reports_path.parent == summary.dicom_dir  # found by `rfm ingest dicom/`
    assert summary.ground_truth_path.parent == summary.out_dir  # never ingested
    assert summary.n_series == sum(len(s["series"]) for s in truth["studies"]) >= 20
    assert truth["vocabulary"] == list(CT_RATE_18)
    assert truth["generator"]["seed"] == 0
    names = {s["patient_name"].split("^")[0] for s in truth["studies"]}
    assert not any(n in str(p) for p in files for n in names), "paths must not carry patient names"
    assert any(p.suffix == ".dcm" for p in files) or any(p.suffix == "" for p in files)
    assert [r["study_instance_uid"] for r in reports] == [s["study_instance_uid"] for s in truth["studies"]]
    assert [r["accession_number"] for r in reports] == [s["accession_number"] for s in truth["studies"]]


def test_same_seed_same_bytes_different_seed_differs(tmp_path):
    a = generate_cohort(tmp_path / "a", n_studies=3, seed=7, matrix=48, slices=12)
    b = generate_cohort(tmp_path / "b", n_studies=3, seed=7, matrix=48, slices=12)
    c = generate_cohort(tmp_path / "c", n_studies=3, seed=8, matrix=48, slices=12)
    rel_a = sorted(p.relative_to(a.out_dir) for p in a.out_dir.rglob("*") if p.is_file())
    rel_b = sorted(p.relative_to(b.out_dir) for p in b.out_dir.rglob("*") if p.is_file())
    assert rel_a == rel_b
    for rel in rel_a:
        assert filecmp.cmp(a.out_dir / rel, b.out_dir / rel, shallow=False), rel
    assert a.reports_path.read_text() != c.reports_path.read_text()
    assert json.loads(a.ground_truth_path.read_text())["studies"] != json.loads(c.ground_truth_path.read_text())["studies"]


def test_files_are_valid_ct_with_consistent_geometry(cohort):
    summary, truth, _, _ = cohort
    for study in truth["studies"][:6]:
        for series in study["series"]:
            dss = [pydicom.dcmread(f) for f in _series_files(summary.out_dir, series)]
            assert len(dss) == series["n_slices"]
            ds0 = dss[0]
            assert ds0.SOPClassUID == CTImageStorage == ds0.file_meta.MediaStorageSOPClassUID
            assert ds0.file_meta.TransferSyntaxUID == series["transfer_syntax"]
            for ds in dss:
                for uid in (ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.FrameOfReferenceUID):
                    assert UID(uid).is_valid and uid.startswith("2.25.")
                assert ds.StudyInstanceUID == study["study_instance_uid"]
                assert ds.Modality == "CT" and ds.BodyPartExamined == "CHEST" and ds.PatientPosition == "HFS"
                assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
                assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.BitsAllocated == 16
            assert len({ds.SOPInstanceUID for ds in dss}) == len(dss)
            iop = np.array(ds0.ImageOrientationPatient, float)
            assert np.allclose(iop, [1, 0, 0, 0, 1, 0])
            normal = np.cross(iop[:3], iop[3:])
            dss.sort(key=lambda d: int(d.InstanceNumber))
            along = np.array([np.dot(np.array(d.ImagePositionPatient, float), normal) for d in dss])
            steps = np.diff(along)
            assert np.allclose(steps, -float(ds0.SpacingBetweenSlices), atol=1e-3)  # first slice is most superior
            assert np.allclose(np.abs(steps), series["slice_spacing_mm"], atol=1e-3)
            assert np.allclose([float(d.SliceLocation) for d in dss], along, atol=1e-3)
            assert float(ds0.PixelSpacing[0]) == pytest.approx(series["pixel_spacing_mm"])


def test_pixel_hu_is_plausible(cohort):
    summary, truth, _, _ = cohort
    for study in truth["studies"][:5]:
        series = study["series"][0]
        files = _series_files(summary.out_dir, series)
        dss = sorted((pydicom.dcmread(f) for f in files), key=lambda d: int(d.InstanceNumber))
        mid = dss[len(dss) // 2]
        hu = _hu(mid)
        n = hu.shape[0]
        rr, cc = np.mgrid[:n, :n]
        in_fov = (rr - n / 2) ** 2 + (cc - n / 2) ** 2 < (0.45 * n) ** 2
        corner_air = hu[:4, n // 2 - 4 : n // 2 + 4]  # anterior to the patient, inside the FOV circle
        assert abs(float(np.median(corner_air)) + 1000) < 30
        lung = hu[in_fov & (hu > -950) & (hu < -700)]
        assert lung.size > 200 and abs(float(np.median(lung)) + 850) < 60
        assert hu.max() > 300  # bone
        assert hu[in_fov].min() >= -1024
        assert np.all(mid.pixel_array.astype(np.int64) * float(mid.RescaleSlope) + float(mid.RescaleIntercept) == hu)


def test_written_hu_equals_phantom_on_its_own_grid(tmp_path):
    phantom = _small_phantom({"lung nodule"})
    nz, ny, nx = phantom.hu.shape
    geometry = axial_geometry(phantom, ny, nx, phantom.spacing_mm[0], nz, phantom.spacing_mm[2])
    for pr, intercept in ((0, "-1024"), (1, "0")):
        files = write_ct_series(phantom, geometry, tmp_path / f"pr{pr}", noise_hu=0, psf_sigma_px=0,
                                series={"PixelRepresentation": pr, "RescaleIntercept": intercept})
        for k, f in enumerate(files):
            ds = pydicom.dcmread(f)
            expected = np.rint(phantom.hu[nz - 1 - k])  # slices go head to feet, the grid feet to head
            assert np.array_equal(_hu(ds), expected)
    tissue = phantom.tissue
    assert abs(float(np.median(phantom.hu[tissue == Tissue.LUNG])) + 850) < 40
    assert float(np.median(phantom.hu[tissue == Tissue.BONE])) > 200
    assert float(np.median(phantom.hu[tissue == Tissue.AIR])) == -1000


def test_findings_planted_and_labelled_across_cohort(cohort):
    _, truth, _, _ = cohort
    planted = {name for s in truth["studies"] for name, v in s["image_truth"].items() if v}
    assert len(planted) >= 6
    values = {v for s in truth["studies"] for v in s["labels"].values()}
    assert values == {1, 0, -1}
    for s in truth["studies"]:
        assert set(s["labels"]) == set(CT_RATE_18) == set(s["image_truth"])
        for name, present in s["image_truth"].items():
            if not present:
                assert s["labels"][name] in (0, -1)
            else:
                assert s["labels"][name] in (1, -1)
                assert name in s["findings_detail"]
    prevalence = np.mean([[s["image_truth"][n] for n in CT_RATE_18] for s in truth["studies"]], axis=0)
    assert prevalence.max() <= 0.7


def test_every_finding_can_be_planted():
    phantom = _small_phantom(set(PLANTABLE_FINDINGS))
    assert set(phantom.findings) == set(PLANTABLE_FINDINGS) == set(CT_RATE_18)
    assert np.isfinite(phantom.hu).all() and phantom.hu.min() >= -1024 and phantom.hu.max() <= 3071
    with pytest.raises(ValueError):
        make_chest_phantom(0, {"broken leg"})


def test_nodule_is_the_only_difference_and_is_dense():
    plain = _small_phantom()
    with_nodule = _small_phantom({"lung nodule"})
    nodules = with_nodule.findings["lung nodule"]["nodules"]
    assert nodules
    changed = np.argwhere(np.abs(with_nodule.hu - plain.hu) > 1.0)
    assert changed.size
    # every changed voxel lies within a nodule (plus one voxel of partial volume)
    pos = np.asarray(with_nodule.origin_mm) + changed[:, ::-1] * np.asarray(with_nodule.spacing_mm)
    reach = np.full(len(pos), np.inf)
    for n in nodules:
        d = np.linalg.norm(pos - np.asarray(n["center_mm"]), axis=1) - n["diameter_mm"] / 2
        reach = np.minimum(reach, d)
    assert reach.max() <= max(with_nodule.spacing_mm) + 0.5
    for n in nodules:
        assert with_nodule.hu_at(n["center_mm"]) > -400
        assert plain.hu_at(n["center_mm"]) < -500


@pytest.mark.parametrize("finding", ["lung nodule", "coronary artery wall calcification", "medical material",
                                     "bronchiectasis"])
def test_conspicuity_draws_findings_larger(finding):
    """The demo's coarse voxels need larger findings; 1 is the realistic default and changes nothing."""
    plain = _small_phantom()

    def changed(c):
        ph = make_chest_phantom(3, {finding}, shape_zyx=(40, 80, 80), spacing_mm=(4.5, 4.5, 7.5), conspicuity=c)
        return int((np.abs(ph.hu - plain.hu) > 50).sum())

    assert np.array_equal(make_chest_phantom(3, {finding}, shape_zyx=(40, 80, 80), spacing_mm=(4.5, 4.5, 7.5),
                                             conspicuity=1.0).hu, _small_phantom({finding}).hu)
    assert changed(2.5) > 1.5 * changed(1.0) > 0
    with pytest.raises(ValueError, match="conspicuity"):
        make_chest_phantom(3, {finding}, conspicuity=0.5)


def test_planted_nodules_visible_in_cohort_dicom(cohort):
    summary, truth, _, _ = cohort
    checked = 0
    for study in truth["studies"]:
        if not study["image_truth"]["lung nodule"]:
            continue
        series = study["series"][0]
        dss = [pydicom.dcmread(f) for f in _series_files(summary.out_dir, series)]
        z = np.array([float(d.ImagePositionPatient[2]) for d in dss])
        for n in study["findings_detail"]["lung nodule"]["nodules"]:
            x, y, zc = n["center_mm"]
            ds = dss[int(np.argmin(np.abs(z - zc)))]
            ipp, (dr, dc) = np.array(ds.ImagePositionPatient, float), np.array(ds.PixelSpacing, float)
            r, c = round((y - ipp[1]) / dr), round((x - ipp[0]) / dc)
            hu = _hu(ds)
            assert hu[r - 1 : r + 2, c - 1 : c + 2].max() > -550, n
            checked += 1
    assert checked >= 1


def test_every_phi_string_is_planted_somewhere(cohort):
    summary, truth, reports, _ = cohort
    report_by_uid = {r["study_instance_uid"]: r["text"] for r in reports}
    for study in truth["studies"]:
        texts = [report_by_uid[study["study_instance_uid"]], *study["burned_in_lines"]]
        for series in study["series"]:
            ds = pydicom.dcmread(_series_files(summary.out_dir, series)[0])
            _all_text(ds, texts)
        blob = "\n".join(texts)
        missing = [p for p in study["phi"] if p not in blob]
        assert not missing, missing
        assert study["patient_id"] in study["phi"] and study["accession_number"] in study["phi"]
    # private block, private sequence and nested identifiers are really in the header
    ds = pydicom.dcmread(_series_files(summary.out_dir, truth["studies"][0]["series"][0])[0])
    block = ds.private_block(0x0071, "RFM SYNTHETIC PHI")
    assert block[0x02].value == truth["studies"][0]["patient_id"]
    assert ds.RequestAttributesSequence[0].AccessionNumber == ds.AccessionNumber
    assert ds.OtherPatientIDsSequence[0].PatientID == ds.OtherPatientIDs


def test_burned_in_text_is_in_the_pixels(cohort, tmp_path):
    summary, truth, _, _ = cohort
    burned = [s for s in truth["studies"] if s["burned_in_text"]]
    assert burned and len(burned) < len(truth["studies"])
    annotations = set()
    for study in burned:
        series = study["series"][0]
        annotations.add(series["burned_in_annotation"])
        for f in _series_files(summary.out_dir, series):
            ds = pydicom.dcmread(f)
            corner = _hu(ds)[:36, :60]
            has_text = int(ds.InstanceNumber) in series["burned_in_instance_numbers"]
            assert (corner.max() >= 1900) == has_text
    # same series with and without text: only the rendered glyph pixels differ
    phantom = _small_phantom()
    geometry = axial_geometry(phantom, 80, 80, 4.5, 6, 7.5)
    lines = ["DOE, JANE", "12345678", "03/14/2024"]
    plain = write_ct_series(phantom, geometry, tmp_path / "plain", seed=1)
    text = write_ct_series(phantom, geometry, tmp_path / "text", seed=1, burned_in_lines=lines, burned_in_slices=[2])
    mask = render_text_mask(lines, 80, 80)
    for k, (a, b) in enumerate(zip(plain, text)):
        diff = _hu(pydicom.dcmread(a)) != _hu(pydicom.dcmread(b))
        if k == 2:
            assert diff.any() and not (diff & ~mask).any()
        else:
            assert not diff.any()


def test_reports_have_positive_negated_uncertain_and_phi(cohort):
    _, truth, reports, _ = cohort
    texts = [r["text"] for r in reports]
    for t in texts:
        assert "FINDINGS:" in t and "IMPRESSION:" in t and t.index("FINDINGS:") < t.index("IMPRESSION:")
    joined = "\n".join(texts)
    assert re.search(r"\bNo [a-z]", joined)
    assert re.search(r"(?i)possible|cannot be excluded|cannot exclude|questionable", joined)
    assert any(v == -1 for s in truth["studies"] for v in s["labels"].values())
    assert "Comparison" in joined or "COMPARISON" in joined
    assert re.search(r"\d{2}/\d{2}/\d{4}", joined)


def test_patients_with_several_studies_share_identity(cohort):
    _, truth, _, _ = cohort
    by_patient: dict[str, list[dict]] = {}
    for s in truth["studies"]:
        by_patient.setdefault(s["patient_id"], []).append(s)
    repeat = [v for v in by_patient.values() if len(v) > 1]
    assert repeat
    for studies in repeat:
        assert len({s["patient_name"] for s in studies}) == 1
        assert len({s["study_instance_uid"] for s in studies}) == len(studies)
        followups = [s for s in studies if s["visit"] > 0]
        assert followups and all(s["prior_study_instance_uid"] for s in followups)


def test_tilted_uneven_series_geometry(tmp_path):
    phantom = _small_phantom()
    gaps = [1.08, 2.5, 6.99, 3.0, 3.0, 4.2, 1.5]
    geometry = axial_geometry(phantom, 64, 64, 5.0, len(gaps) + 1, 3.0, tilt_deg=18.5, gaps_mm=gaps)
    files = write_ct_series(phantom, geometry, tmp_path, file_name=lambda i: f"sub/{i:03d}")
    dss = [pydicom.dcmread(f) for f in files]
    t = np.deg2rad(18.5)
    for ds in dss:
        assert np.allclose(np.array(ds.ImageOrientationPatient, float), [1, 0, 0, 0, np.cos(t), -np.sin(t)], atol=1e-6)
        assert "SpacingBetweenSlices" not in ds
    ipp = np.array([np.array(d.ImagePositionPatient, float) for d in dss])
    assert np.allclose(ipp[:, :2], ipp[0, :2])  # the stack moves along z only
    assert np.allclose(-np.diff(ipp[:, 2]), gaps[::-1], atol=1e-3)
    normal = np.cross([1, 0, 0], [0, np.cos(t), -np.sin(t)])
    assert np.allclose(np.abs(np.diff(ipp @ normal)), np.array(gaps[::-1]) * np.cos(t), atol=1e-3)


def test_fast_encoder_matches_dcmwrite_and_compression_roundtrips(tmp_path):
    phantom = _small_phantom()
    geometry = axial_geometry(phantom, 64, 64, 5.0, 4, 7.5)
    for ts in (pydicom.uid.ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        fast = write_ct_series(phantom, geometry, tmp_path / f"fast{ts}", transfer_syntax=ts, fov_padding=True,
                               study={"PatientName": "DOE^JANE"}, series={"BurnedInAnnotation": "NO"})
        slow = write_ct_series(phantom, geometry, tmp_path / f"slow{ts}", transfer_syntax=ts, fov_padding=True,
                               study={"PatientName": "DOE^JANE"}, series={"BurnedInAnnotation": "NO"}, _use_dcmwrite=True)
        assert all(filecmp.cmp(a, b, shallow=False) for a, b in zip(fast, slow))
    raw = write_ct_series(phantom, geometry, tmp_path / "raw", slice_subset=[0, 2, 3])
    rle = write_ct_series(phantom, geometry, tmp_path / "rle", transfer_syntax=RLELossless, slice_subset=[0, 2, 3])
    assert [int(pydicom.dcmread(f).InstanceNumber) for f in rle] == [1, 3, 4]
    for a, b in zip(raw, rle):
        da, db = pydicom.dcmread(a), pydicom.dcmread(b)
        assert db.file_meta.TransferSyntaxUID == RLELossless
        assert np.array_equal(da.pixel_array, db.pixel_array)
