"""Header de-identification over real files: no original identifier survives anywhere in the written bytes."""

import json
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from appliance.deid.annex_e import load_table
from appliance.deid.dicom import SAFE_PRIVATE, DeidOptions, _is_well_known_uid, deidentify_dataset, write_deidentified
from appliance.deid.keys import DeidKeys

KEYS = DeidKeys(b"\x11" * 32)
OTHER_KEYS = DeidKeys(b"\x22" * 32)
PYDICOM_FILES = ["CT_small.dcm", "MR_small.dcm", "UN_sequence.dcm", "nested_priv_SQ.dcm", "priv_SQ.dcm",
                 "examples_overlay.dcm"]
DICOMDIR_TESTS = Path(get_testdata_file("CT_small.dcm", download=False)).parent / "dicomdirtests"
from conftest import GE_DIR as GE_SERIES
PHI_KEYWORDS = {"PatientID", "OtherPatientIDs", "AccessionNumber", "InstitutionName", "InstitutionAddress",
                "StationName", "DeviceSerialNumber", "RequestedProcedureID", "ScheduledProcedureStepID"}
GEOMETRY = ["ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness", "RescaleSlope",
            "RescaleIntercept", "Rows", "Columns", "BitsAllocated", "PixelRepresentation", "SOPClassUID"]


def _private_parsed(elem, encoding="iso8859"):
    from appliance.deid.dicom import _parse_un_sequence
    return _parse_un_sequence(elem, encoding)


def _walk(ds: Dataset, private: bool = False):
    """Every element at every depth, with whether it sits under a private tag (UN sequences parsed)."""
    for elem in ds:
        is_private = private or elem.tag.is_private
        yield elem, is_private
        if elem.VR == "SQ":
            for item in elem.value or []:
                yield from _walk(item, is_private)
        elif elem.VR == "UN" and isinstance(elem.value, bytes):
            seq = _private_parsed(elem)
            for item in seq or []:
                yield from _walk(item, is_private)


def phi_values(ds: Dataset) -> set[str]:
    """Original values of the PHI-bearing attributes: names, IDs, dates, UIDs, institution, private strings."""
    values, public_values = set(), set()
    for elem, private in _walk(ds):
        if elem.tag.element <= 0x00FF and elem.tag.is_private:
            continue  # private creator names are vendor labels
        vals = [str(v).strip() for v in (elem.value if isinstance(elem.value, list | pydicom.multival.MultiValue)
                                         else [elem.value]) if v is not None and not isinstance(v, bytes | Dataset)]
        if private:
            values.update(v for v in vals if any(c.isalpha() for c in v))
        elif elem.VR in ("PN", "DA", "DT") or elem.keyword in PHI_KEYWORDS:
            values.update(vals)
        elif elem.VR == "UI":
            values.update(v for v in vals if not _is_well_known_uid(v))
        else:
            public_values.update(vals)
    public_text = "\n".join(public_values)  # e.g. a private copy of ManufacturerModelName is not PHI
    return {v for v in values if len(v) >= 4 and v not in public_text}


def assert_absent(values, path: Path):
    data = path.read_bytes()
    text = data.decode("latin-1")
    leaked = [v for v in values if v in text or v.encode("utf-16-le") in data]
    assert not leaked, f"{len(leaked)} original values survive in {path.name}"


def check_file(src: Path, out: Path, keys=KEYS, options: DeidOptions | None = None) -> tuple[Dataset, Dataset]:
    options = options or DeidOptions()
    original = pydicom.dcmread(src, force=True)
    result = deidentify_dataset(original, keys, options)
    write_deidentified(result, out)
    data = out.read_bytes()
    assert data[:128] == b"\x00" * 128 and data[128:132] == b"DICM"
    back = pydicom.dcmread(out)
    assert back.PatientIdentityRemoved == "YES"
    codes = [item.CodeValue for item in back.DeidentificationMethodCodeSequence]
    assert codes == [c for c, _, _ in options.method_codes()]
    assert all(item.CodingSchemeDesignator == "DCM" for item in back.DeidentificationMethodCodeSequence)
    assert_absent(phi_values(original), out)
    assert not [t for t in back.keys() if t.is_private]
    assert not [t for t in back.keys() if (t.group & 0xFF00) in (0x5000, 0x6000)]
    for kw in GEOMETRY:
        if kw in original:
            assert back[kw].value == original[kw].value, kw
    if "PixelData" in original:
        assert back.PixelData == original.PixelData
    meta = back.file_meta
    assert meta.ImplementationVersionName == "RFM_DEID_1"
    assert "SourceApplicationEntityTitle" not in meta
    assert meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    if "SOPInstanceUID" in back:
        assert meta.MediaStorageSOPInstanceUID == back.SOPInstanceUID != original.SOPInstanceUID
    if result.removed_values:
        assert all(isinstance(v, str) for v in result.removed_values)
    for action in result.actions:
        assert set(action) == {"path", "keyword", "action"}
    return original, back


def test_table_is_the_full_annex_e():
    table = load_table()
    assert len(table) > 600
    assert table.rule_for(0x00100010).basic == "Z"  # Patient's Name
    assert table.rule_for(0x00080018).basic == "U"  # SOP Instance UID
    assert table.rule_for(0x60023000).name == "Overlay Data"
    assert table.rule_for(0x50100000) is not None  # (50xx,xxxx) curves
    assert table.rule_for(0x00101010).option("retain_patient_characteristics") == "K"  # Patient's Age
    assert table.rule_for(0x00080020).option("retain_long_modified_dates") == "C"  # Study Date
    assert table.rule_for(0x00081030).option("clean_descriptors") == "C"  # Study Description
    assert table.private.basic == "X"


def test_method_codes_match_cid_7050():
    from pydicom.sr._concepts_dict import concepts
    dcm = {code: meaning for entries in concepts["DCM"].values() for code, (meaning, _) in entries.items()}
    everything = DeidOptions(retain_safe_private=True)
    for value, scheme, meaning in everything.method_codes():
        assert scheme == "DCM" and dcm[value] == meaning
    assert [c[0] for c in everything.method_codes()] == ["113100", "113101", "113105", "113107", "113108",
                                                          "113109", "113111"]


@pytest.mark.parametrize("name", PYDICOM_FILES)
def test_pydicom_files(tmp_path, name):
    src = Path(get_testdata_file(name, download=False))
    original, back = check_file(src, tmp_path / name)
    if name == "CT_small.dcm":
        assert original.preamble != b"\x00" * 128  # the TIFF header that must not be copied
        assert back.Manufacturer == original.Manufacturer  # device identity (model) retained
        assert back.PatientSex == original.PatientSex  # patient characteristics retained
        assert back.StudyDate != original.StudyDate and back.LongitudinalTemporalInformationModified == "MODIFIED"
        assert back.PatientBirthDate == ""
    if name == "examples_overlay.dcm":
        assert any((t.group & 0xFF00) == 0x6000 for t in original.keys())
    if name == "UN_sequence.dcm":
        data = (tmp_path / name).read_bytes().decode("latin-1")
        assert "1.2.840.113619.2.327.3.185221411.476" not in data


def test_no_options_removes_dates_and_characteristics(tmp_path):
    src = Path(get_testdata_file("CT_small.dcm", download=False))
    options = DeidOptions(retain_longitudinal_modified_dates=False, retain_patient_characteristics=False,
                          retain_device_identity=False, clean_descriptors=False, clean_pixel_data=False)
    _, back = check_file(src, tmp_path / "ct.dcm", options=options)
    assert "StudyDate" not in back or back.StudyDate == ""
    assert "PatientSex" not in back or back.PatientSex == ""
    assert "Manufacturer" not in back and "StudyDescription" not in back
    assert back.LongitudinalTemporalInformationModified == "REMOVED"


def test_calibration_dates_are_not_shifted():
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    ds.DateOfLastCalibration = "20200101"
    ds.DateOfLastDetectorCalibration = "20200102"
    out = deidentify_dataset(ds, KEYS).dataset
    assert "DateOfLastCalibration" not in out and "DateOfLastDetectorCalibration" not in out


def test_descriptor_with_patient_name_is_removed():
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    ds.PatientName = "Kowalski^Anna"
    ds.StudyDescription = "CT chest for KOWALSKI"
    ds.SeriesDescription = "Chest 5mm soft"
    ds.ImageComments = "scan 12/03/2021"
    out = deidentify_dataset(ds, KEYS).dataset
    assert "StudyDescription" not in out and "ImageComments" not in out
    assert out.SeriesDescription == "Chest 5mm soft"


def test_safe_private_keeps_only_listed_numeric_elements():
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    block = ds.private_block(0x0043, "GEMS_PARM_01", create=True)
    block.add_new(0x27, "SH", "0.984:1")
    block.add_new(0x28, "LO", "Secret note")
    out = deidentify_dataset(ds, KEYS, DeidOptions(retain_safe_private=True)).dataset
    kept = {int(t): out[t].value for t in out.keys() if t.is_private}
    assert kept[0x00430010] == "GEMS_PARM_01" and kept[0x00431027] == "0.984:1"
    assert 0x00431028 not in kept and "Secret note" not in str(kept)
    creators = {(t >> 16, t & 0xFF): v for t, v in kept.items() if (t & 0xFFFF) <= 0xFF}
    data_tags = [t for t in kept if (t & 0xFFFF) > 0xFF]
    assert data_tags and all((t >> 16, creators[(t >> 16, (t >> 8) & 0xFF)], t & 0xFF) in SAFE_PRIVATE
                             for t in data_tags)
    assert 0x00190023 in {(t & 0xFFFF00FF) for t in data_tags}  # CT_small's own GEMS_ACQU_01 table speed
    assert "113111" in [i.CodeValue for i in out.DeidentificationMethodCodeSequence]


def test_input_dataset_is_not_modified():
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    before = (str(ds.PatientName), ds.SOPInstanceUID, len(ds))
    deidentify_dataset(ds, KEYS)
    assert (str(ds.PatientName), ds.SOPInstanceUID, len(ds)) == before


def test_deterministic_bytes_and_keyed_uids(tmp_path):
    src = Path(get_testdata_file("CT_small.dcm", download=False))
    for i in (1, 2):
        write_deidentified(deidentify_dataset(pydicom.dcmread(src), KEYS), tmp_path / f"same{i}.dcm")
    assert (tmp_path / "same1.dcm").read_bytes() == (tmp_path / "same2.dcm").read_bytes()
    other = deidentify_dataset(pydicom.dcmread(src), OTHER_KEYS)
    write_deidentified(other, tmp_path / "other.dcm")
    a, b = pydicom.dcmread(tmp_path / "same1.dcm"), pydicom.dcmread(tmp_path / "other.dcm")
    for kw in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "PatientID"):
        assert a[kw].value != b[kw].value, kw


def _dicomdir_files() -> list[Path]:
    return sorted(p for p in DICOMDIR_TESTS.rglob("*")
                  if p.is_file() and p.name not in ("DICOMDIR", "README", "README.txt"))


def test_dicomdir_studies_link_per_patient(tmp_path):
    files = _dicomdir_files()
    assert len(files) > 50
    per_patient: dict[str, set] = {}
    study_map: dict[str, set] = {}
    studies_per_patient: dict[str, set] = {}
    for i, src in enumerate(files):
        original, back = check_file(src, tmp_path / f"{i:03d}.dcm")
        pid = str(original.get("PatientID", ""))
        result = deidentify_dataset(original, KEYS)
        per_patient.setdefault(pid, set()).add((result.patient_pseudonym, result.date_offset_days))
        studies_per_patient.setdefault(pid, set()).add(original.get("StudyInstanceUID"))
        if "StudyInstanceUID" in original:
            study_map.setdefault(original.StudyInstanceUID, set()).add(back.StudyInstanceUID)
    assert all(len(v) == 1 for v in per_patient.values())  # one pseudonym and one offset per patient
    assert any(len(s) > 1 for s in studies_per_patient.values())  # ... across several studies
    assert len({next(iter(v))[0] for v in per_patient.values()}) == len(per_patient)
    assert all(len(v) == 1 for v in study_map.values())  # a study keeps one new UID across its files
    assert all(next(iter(v))[1] != 0 for v in per_patient.values())


def test_references_point_at_the_remapped_instances(tmp_path):
    files = [f for f in _dicomdir_files() if "98892003" in str(f)][:2]
    a, b = (pydicom.dcmread(f) for f in files)
    ref = Dataset()
    ref.ReferencedSOPClassUID = b.SOPClassUID
    ref.ReferencedSOPInstanceUID = b.SOPInstanceUID
    a.ReferencedImageSequence = Sequence([ref])
    series_ref = Dataset()
    series_ref.SeriesInstanceUID = b.SeriesInstanceUID
    series_ref.ReferencedInstanceSequence = Sequence([Dataset()])
    series_ref.ReferencedInstanceSequence[0].ReferencedSOPClassUID = b.SOPClassUID
    series_ref.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID = b.SOPInstanceUID
    a.ReferencedSeriesSequence = Sequence([series_ref])
    new_a, new_b = deidentify_dataset(a, KEYS).dataset, deidentify_dataset(b, KEYS).dataset
    assert new_a.ReferencedImageSequence[0].ReferencedSOPInstanceUID == new_b.SOPInstanceUID
    assert new_a.ReferencedImageSequence[0].ReferencedSOPClassUID == b.SOPClassUID  # class UIDs never remapped
    item = new_a.ReferencedSeriesSequence[0]
    assert item.SeriesInstanceUID == new_b.SeriesInstanceUID
    assert item.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == new_b.SOPInstanceUID


@pytest.mark.skipif(not GE_SERIES.is_dir(), reason="real GE series not present")
def test_real_ge_series(tmp_path):
    files = sorted(GE_SERIES.glob("*.dcm"))
    assert files
    series_uids = set()
    for src in files:
        _, back = check_file(src, tmp_path / src.name)
        series_uids.add(back.SeriesInstanceUID)
    assert len(series_uids) == 1


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from appliance.synthetic import generate_cohort
    summary = generate_cohort(tmp_path_factory.mktemp("deid") / "c", n_studies=4, seed=1, matrix=48, slices=12)
    return summary


def _header_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    pixel_tag = data.rfind(b"\xe0\x7f\x10\x00")
    return data[:pixel_tag] if pixel_tag > 0 else data


def test_synthetic_cohort_header_phi_removed(cohort, tmp_path):
    truth = json.loads(Path(cohort.ground_truth_path).read_text())
    studies = truth["studies"] if isinstance(truth, dict) else truth
    checked = 0
    for study in studies:
        for series in study["series"]:
            for src in sorted((Path(cohort.out_dir) / series["path"]).iterdir()):
                header = _header_bytes(src).decode("latin-1")
                planted = [p for p in study["phi"] if p in header]
                assert planted
                original = pydicom.dcmread(src)
                out = tmp_path / f"{checked:04d}.dcm"
                result = deidentify_dataset(original, KEYS)
                write_deidentified(result, out)
                data = out.read_bytes()
                leaked = [p for p in planted if p in data.decode("latin-1") or p.encode("utf-16-le") in data]
                assert not leaked, f"{len(leaked)} planted identifiers survive"
                back = pydicom.dcmread(out)
                assert back.PatientIdentityRemoved == "YES"
                assert not [t for t in back.keys() if t.is_private]
                assert "OtherPatientIDsSequence" not in back and "ReferencedStudySequence" not in back
                for item in back.get("RequestAttributesSequence", []):
                    assert "RequestedProcedureID" not in item and "ScheduledProcedureStepID" not in item
                    assert item.AccessionNumber == back.AccessionNumber
                checked += 1
    assert checked > 0


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "examples_overlay.dcm"])
def test_deidentified_pydicom_files_keep_their_pixels(name, tmp_path):
    src = pydicom.dcmread(get_testdata_file(name, download=False))
    out = tmp_path / "out.dcm"
    write_deidentified(deidentify_dataset(src, KEYS), out)
    new = pydicom.dcmread(out)
    assert (new.pixel_array == src.pixel_array).all()


def test_deidentified_ge_series_preprocesses_into_the_same_volume(tmp_path):
    """The real tilted, unevenly spaced series: identical volume from the de-identified copy."""
    import numpy as np

    from appliance.preprocess import PreprocessSettings, load_series, resample_to_canvas

    if not GE_SERIES.is_dir():
        pytest.skip(f"real GE series not found at {GE_SERIES}")
    raw_files = sorted(GE_SERIES.glob("*.dcm"))
    out_files = []
    for i, f in enumerate(raw_files):
        out_files.append(tmp_path / f"{i:05d}.dcm")
        write_deidentified(deidentify_dataset(pydicom.dcmread(f), KEYS), out_files[-1])
    settings = PreprocessSettings()
    raw_volume, raw_meta = resample_to_canvas(load_series(raw_files), settings)
    deid_volume, deid_meta = resample_to_canvas(load_series(out_files), settings)
    assert np.array_equal(raw_volume, deid_volume)
    assert raw_meta["origin_lps_mm"] == deid_meta["origin_lps_mm"]
