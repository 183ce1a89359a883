"""A deterministic synthetic cohort: DICOM chest CT studies, a report sidecar and the ground truth."""

from __future__ import annotations

import csv
import datetime as dt
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from appliance.labels.vocabularies import CT_RATE_18
from appliance.synthetic.dicom_writer import axial_geometry, write_ct_series
from appliance.synthetic.phantom import make_chest_phantom
from appliance.synthetic.reports import ReportContext, write_report
from appliance.synthetic.uids import derived_rng, derived_seed, synthetic_uid

GENERATOR_VERSION = 1
OUTCOMES_CSV = "outcomes.csv"  # with prognosis=True: the EHR-like outcome extract beside dicom/
PRIVATE_CREATOR = "RFM SYNTHETIC PHI"
PRIVATE_GROUP = 0x0071

_FIRST = {"M": ["JOHN", "ALAN", "OMAR", "LUIS", "IVAN", "PETER", "KEN", "RAJ", "TOM", "MARK"],
          "F": ["MARY", "ANA", "LENA", "SARA", "MEI", "ROSA", "JUNE", "NORA", "EVA", "KATE"]}
_LAST = ["SMITH", "GARCIA", "NGUYEN", "MUELLER", "KOWALSKI", "OKAFOR", "TANAKA", "ROSSI", "DUBOIS", "BROWN",
         "PATEL", "KIM", "SILVA", "JOHNSON", "NOVAK", "HANSEN", "COHEN", "MORALES", "LEE", "FISCHER"]
_DOCTORS = [("JANE", "ROE"), ("SAMUEL", "OKONJO"), ("HELEN", "VOSS"), ("DAVID", "CHEN"), ("MARIA", "LOPEZ"),
            ("ERIK", "LINDQVIST"), ("AISHA", "RAHMAN"), ("PAUL", "BERGER")]
_INSTITUTIONS = [("Mercy General Hospital", "1200 Harbor Way, Springfield, IL 62701", "MGH"),
                 ("St. Brigid Medical Center", "45 Abbey Road, Riverton, WY 82501", "SBMC"),
                 ("Lakeside University Hospital", "9 Shore Drive, Lakeview, OR 97630", "LUH")]
# Manufacturer, model, soft kernel, sharp kernel, stored pixel layout, GE-style padding outside the FOV circle
_VENDORS = [
    dict(Manufacturer="SIEMENS", ManufacturerModelName="SOMATOM Definition AS+", kernels=("B31f", "B70f"),
         PixelRepresentation=0, RescaleIntercept="-1024", BitsStored=12, fov_padding=False),
    dict(Manufacturer="GE MEDICAL SYSTEMS", ManufacturerModelName="LightSpeed VCT", kernels=("STANDARD", "LUNG"),
         PixelRepresentation=1, RescaleIntercept="-1024", BitsStored=16, fov_padding=True),
    dict(Manufacturer="Philips", ManufacturerModelName="iCT 256", kernels=("B", "YC"),
         PixelRepresentation=0, RescaleIntercept="-1024", BitsStored=12, fov_padding=False),
    dict(Manufacturer="TOSHIBA", ManufacturerModelName="Aquilion ONE", kernels=("FC13", "FC52"),
         PixelRepresentation=1, RescaleIntercept="0", BitsStored=16, fov_padding=False),
]
_MONTHS = ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"]
_CHRONIC = {"emphysema", "arterial wall calcification", "coronary artery wall calcification", "hiatal hernia",
            "medical material", "pulmonary fibrotic sequela", "bronchiectasis", "lung nodule"}


@dataclass
class CohortSummary:
    """What generate_cohort wrote and how long it took."""

    out_dir: Path
    dicom_dir: Path
    reports_path: Path
    ground_truth_path: Path
    n_studies: int
    n_series: int
    n_files: int
    seconds: float


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + np.exp(-x))


def _latent_factors(rng: np.random.Generator) -> dict:
    age = int(rng.integers(35, 89))
    old = age >= 70
    smoker = bool(rng.random() < 0.35)
    heart_failure = bool(rng.random() < 0.07 + 0.15 * old)
    return {
        "age": age,
        "sex": "M" if rng.random() < 0.55 else "F",
        "smoker": smoker,
        "heart_failure": heart_failure,
        "malignancy": bool(rng.random() < 0.06 + 0.08 * smoker),
        "device": bool(rng.random() < 0.05 + 0.3 * heart_failure + 0.05 * old),
    }


def _draw_findings(rng: np.random.Generator, f: dict, infection: bool, enrich: float = 0.0) -> set[str]:
    """Findings planted in one study from latent causes (heart failure, smoking/age, infection, malignancy).

    `enrich` is added to every finding's log-odds: 0 gives the realistic prevalences (2-25 %);
    a small cohort meant for training and testing a model uses a positive value so that every
    finding has enough positive studies to learn from and to measure an AUC on."""
    hf, sm, mal, dev = (float(f[k]) for k in ("heart_failure", "smoker", "malignancy", "device"))
    inf, age = float(infection), (f["age"] - 60) / 10.0
    logits = {
        "cardiomegaly": -3.0 + 3.2 * hf + 0.3 * age,
        "pericardial effusion": -3.6 + 2.4 * hf + 1.0 * mal,
        "emphysema": -2.9 + 2.6 * sm + 0.2 * age,
        "lung nodule": -1.7 + 0.9 * sm + 2.2 * mal + 0.1 * age,
        "arterial wall calcification": -1.8 + 0.7 * age + 0.8 * sm,
        "coronary artery wall calcification": -2.0 + 0.6 * age + 0.8 * sm + 0.8 * hf,
        "consolidation": -3.6 + 3.8 * inf,
        "lung opacity": -2.3 + 2.2 * inf + 0.9 * hf,
        "medical material": -3.8 + 4.5 * dev,
        "hiatal hernia": -2.6 + 0.4 * age,
        "lymphadenopathy": -2.8 + 2.8 * mal + 1.0 * inf,
        "pulmonary fibrotic sequela": -2.4 + 0.4 * age + 0.6 * sm,
        "mosaic attenuation pattern": -3.3 + 0.6 * sm,
        "peribronchial thickening": -3.0 + 1.2 * inf + 0.6 * sm,
        "bronchiectasis": -3.1 + 0.5 * sm + 0.6 * inf,
        "interlobular septal thickening": -3.4 + 2.2 * hf,
        "pleural effusion": -3.3 + 2.6 * hf + 1.6 * inf + 1.8 * mal,
    }
    found = {name for name, logit in logits.items() if rng.random() < _sigmoid(logit + enrich)}
    atel = -2.0 + 1.0 * inf + 1.2 * ("pleural effusion" in found) + 0.2 * age + enrich
    if rng.random() < _sigmoid(atel):
        found.add("atelectasis")
    return found


# The prognostic outcome (`prognosis=True`): an adverse event within 12 months whose log-odds add
# the disease burden visible in the images to the clinical status that only the report states.
ACUITY_LEVELS = ("stable", "deteriorating", "critical")
_ACUITY_SENTENCES = {
    "stable": ["Clinically stable outpatient per the referring team.", "Referring team reports a stable clinical course."],
    "deteriorating": ["Referring team reports clinical deterioration.", "Clinical status: deteriorating per the ward team."],
    "critical": ["Patient in intensive care, critical condition per the referring team.",
                 "Clinical status: critical, admitted to intensive care."],
}
_BURDEN_WEIGHTS = {"cardiomegaly": 1.0, "pleural effusion": 1.0, "consolidation": 1.0, "emphysema": 0.8,
                   "lung nodule": 0.6, "lymphadenopathy": 0.8, "pericardial effusion": 0.8, "lung opacity": 0.6}
_SEVERITY_SCALE = {"small": 0.7, "mild": 0.7, "moderate": 1.0, "large": 1.5, "severe": 1.5}


def _prognosis(rng: np.random.Generator, findings: dict[str, dict], infection: bool) -> dict:
    """Clinical status (report only) and the 12-month adverse event it drives with the image burden."""
    burden = sum(weight * _SEVERITY_SCALE.get(str(findings[name].get("severity", "moderate")), 1.0)
                 for name, weight in _BURDEN_WEIGHTS.items() if name in findings)
    p = np.array([0.6, 0.3, 0.1]) if not infection else np.array([0.4, 0.4, 0.2])
    acuity = int(rng.choice(3, p=p))
    logit = -2.6 + 0.9 * burden + 1.6 * acuity
    return {"clinical_status": ACUITY_LEVELS[acuity], "image_burden": round(burden, 3),
            "event_probability": round(float(_sigmoid(logit)), 4),
            "adverse_event_12m": int(rng.random() < _sigmoid(logit)),
            "sentence": str(rng.choice(_ACUITY_SENTENCES[ACUITY_LEVELS[acuity]]))}


def _dicom_date(d: dt.date) -> str:
    return d.strftime("%Y%m%d")


def _us_date(d: dt.date) -> str:
    return d.strftime("%m/%d/%Y")


def _plan_patients(rng: np.random.Generator, n_studies: int) -> list[tuple[int, int]]:
    """(patient index, visit number) per study; about 20 % of patients have two or three studies."""
    plan: list[tuple[int, int]] = []
    patient = 0
    while len(plan) < n_studies:
        visits = 1 if rng.random() >= 0.2 else int(rng.choice([2, 2, 3]))
        for v in range(visits):
            plan.append((patient, v))
        patient += 1
    plan = plan[:n_studies]
    order = rng.permutation(n_studies)  # a PACS export is not sorted by patient
    return [plan[i] for i in order]


def _patient_identity(seed: int, patient: int) -> dict:
    rng = derived_rng(seed, "patient", patient)
    f = _latent_factors(rng)
    birth = dt.date(2024 - f["age"], 1, 1) + dt.timedelta(days=int(rng.integers(0, 365)))
    inst = _INSTITUTIONS[int(rng.integers(len(_INSTITUTIONS)))]
    return {
        **f,
        "first": str(rng.choice(_FIRST[f["sex"]])),
        "last": str(rng.choice(_LAST)),
        "middle": str(rng.choice(list("ABCDEJKLMRST"))),
        "mrn": f"{int(rng.integers(10**7, 10**8))}",
        "other_id": f"H{int(rng.integers(10**6, 10**7))}",
        "birth": birth,
        "institution": inst,
        "vendor": int(rng.integers(len(_VENDORS))),
        "anatomy_seed": derived_seed(seed, "anatomy", patient),
        "first_visit": dt.date(2019, 1, 1) + dt.timedelta(days=int(rng.integers(0, 4 * 365))),
    }


def _private_block(ds: Dataset, pt: dict, date: dt.date, referring: str) -> None:
    """A vendor-style private block carrying identifiers, including a private sequence."""
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "PN", f"{pt['last']}^{pt['first']}")
    block.add_new(0x02, "LO", pt["mrn"])
    block.add_new(0x03, "LO", f"Exam {date.day:02d}-{_MONTHS[date.month - 1]}-{date.year}")
    item = Dataset()
    item_block = item.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    item_block.add_new(0x10, "LO", f"Referred by {referring}")
    item_block.add_new(0x11, "LO", f"Alt ID {pt['other_id']}")
    block.add_new(0x04, "SQ", Sequence([item]))


def generate_cohort(
    out_dir: Path,
    n_studies: int = 20,
    seed: int = 0,
    matrix: int = 96,
    slices: int = 48,
    progress: Callable[[int], None] | None = None,
    enrich_findings: float = 0.0,
    conspicuity: float = 1.0,
    prognosis: bool = False,
) -> CohortSummary:
    """Write `n_studies` synthetic chest CT studies with reports, planted PHI and ground truth under `out_dir`.

    Layout: `dicom/` is what a site would hand to `rfm ingest`: a PACS-export-like folder tree with the
    report sidecar `dicom/reports.jsonl` (one report per study, matched by study_instance_uid or
    accession_number). `ground_truth.json` sits beside it, outside what is ingested. Same arguments,
    same bytes.
    `progress(k)` is called after the k-th study is written. `enrich_findings` raises every finding's
    prevalence (log-odds added); `conspicuity` draws findings larger (see `make_chest_phantom`).
    Both default to the realistic cohort. `prognosis` adds a per-study outcome (an adverse event
    within 12 months) driven partly by image findings and partly by a clinical status that only the
    report's impression states; outcomes are written to `outcomes.csv` beside the DICOM folder (as
    a site's EHR extract would be: accession number, study UID, outcome) and to the ground truth.
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    dicom_dir = out_dir / "dicom"
    dicom_dir.mkdir(parents=True, exist_ok=True)
    rng = derived_rng(seed, "cohort")
    plan = _plan_patients(rng, n_studies)
    patients: dict[int, dict] = {}
    visits_done: dict[int, list[dict]] = {}
    records, reports = [], []
    n_series = n_files = 0

    # visits of one patient must be generated in date order, whatever the export order
    for study_index, (patient, visit) in sorted(enumerate(plan), key=lambda x: (x[1][0], x[1][1])):
        pt = patients.setdefault(patient, _patient_identity(seed, patient))
        srng = derived_rng(seed, "study", study_index)
        prior = visits_done.get(patient, [])
        date = pt["first_visit"] if not prior else prior[-1]["date"] + dt.timedelta(days=int(srng.integers(60, 500)))
        infection = bool(srng.random() < 0.18)
        findings = _draw_findings(srng, pt, infection, enrich_findings)
        if prior:  # chronic findings persist at follow-up
            findings |= prior[-1]["findings"] & _CHRONIC
        rec, report, files, series_count = _write_study(
            dicom_dir, seed, study_index, pt, visit, date, findings, prior[-1] if prior else None,
            srng, matrix, slices, infection, conspicuity, prognosis)
        visits_done.setdefault(patient, []).append({"date": date, "findings": findings, "rec": rec})
        records.append((study_index, rec))
        reports.append((study_index, report))
        n_files += files
        n_series += series_count
        if progress is not None:
            progress(len(records))

    records.sort(key=lambda r: r[0])
    reports.sort(key=lambda r: r[0])
    reports_path = dicom_dir / "reports.jsonl"
    with reports_path.open("w", encoding="utf-8") as fh:
        for _, rep in reports:
            fh.write(json.dumps(rep, ensure_ascii=False) + "\n")
    truth = {
        "generator": {"name": "appliance.synthetic.generate_cohort", "version": GENERATOR_VERSION, "seed": seed,
                      "n_studies": n_studies, "matrix": matrix, "slices": slices,
                      "enrich_findings": enrich_findings, "conspicuity": conspicuity}
                     | ({"prognosis": True} if prognosis else {}),
        "vocabulary": list(CT_RATE_18),
        "studies": [r for _, r in records],
    }
    if prognosis:
        with (out_dir / OUTCOMES_CSV).open("w", encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["accession_number", "study_instance_uid", "adverse_event_12m", "pleural_effusion"])
            for _, r in records:
                writer.writerow([r["accession_number"], r["study_instance_uid"], r["outcome"]["adverse_event_12m"],
                                 r["image_truth"]["pleural effusion"]])
    truth_path = out_dir / "ground_truth.json"
    truth_path.write_text(json.dumps(truth, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return CohortSummary(out_dir=out_dir, dicom_dir=dicom_dir, reports_path=reports_path, ground_truth_path=truth_path,
                         n_studies=n_studies, n_series=n_series, n_files=n_files, seconds=time.perf_counter() - t0)


def _file_namer(rng: np.random.Generator, style: int, n_slices: int) -> Callable[[int], str]:
    """PACS-export-like file names; some exports number files in an order unrelated to the anatomy."""
    order = rng.permutation(n_slices) if rng.random() < 0.3 else np.arange(n_slices)
    if style == 0:
        return lambda i: f"IM{int(order[i]) + 1:05d}"
    if style == 1:
        return lambda i: f"IM{int(order[i]) + 1:05d}.dcm"
    return lambda i: f"{int(order[i]) + 1:08X}"


def _write_study(dicom_dir, seed, study_index, pt, visit, date, findings, prior, srng, matrix, slices, infection,
                 conspicuity=1.0, prognosis=False):
    vendor = _VENDORS[pt["vendor"]]
    inst_name, inst_addr, inst_code = pt["institution"]
    contrast = bool(srng.random() < 0.35)
    study_uid = synthetic_uid("study", seed, study_index)
    accession = f"{inst_code}{date.year % 100:02d}{int(srng.integers(10**6, 10**7))}"
    study_time = f"{int(srng.integers(7, 20)):02d}{int(srng.integers(0, 60)):02d}{int(srng.integers(0, 60)):02d}"
    referring = _DOCTORS[int(srng.integers(len(_DOCTORS)))]
    performing = _DOCTORS[int(srng.integers(len(_DOCTORS)))]
    radiologist = _DOCTORS[int(srng.integers(len(_DOCTORS)))]
    discussed = referring
    operator = f"{srng.choice(_LAST)!s}^{srng.choice(_FIRST['F'] + _FIRST['M'])!s}"
    station = f"{inst_code}CT{int(srng.integers(1, 9)):02d}"
    serial = f"{int(srng.integers(10**5, 10**6))}"
    rp_id, sps_id = f"RP{int(srng.integers(10**6, 10**7))}", f"SPS{int(srng.integers(10**6, 10**7))}"
    age = pt["age"] + (date.year - pt["first_visit"].year)
    dicom_name = f"{pt['last']}^{pt['first']}^{pt['middle']}"
    phi: list[str] = [dicom_name, pt["mrn"], pt["other_id"], _dicom_date(pt["birth"]), _dicom_date(date), accession,
                      inst_name, inst_addr, f"{referring[1]}^{referring[0]}", f"{performing[1]}^{performing[0]}",
                      operator, station, serial, rp_id, sps_id,
                      f"{pt['last']}^{pt['first']}", f"Exam {date.day:02d}-{_MONTHS[date.month - 1]}-{date.year}",
                      f"Referred by {referring[1]}^{referring[0]}", f"Alt ID {pt['other_id']}"]

    def seq_item(**kw) -> Dataset:
        item = Dataset()
        for k, v in kw.items():
            setattr(item, k, v)
        return item

    study_attrs = {
        "PatientName": dicom_name, "PatientID": pt["mrn"], "PatientBirthDate": _dicom_date(pt["birth"]),
        "PatientSex": pt["sex"], "PatientAge": f"{age:03d}Y", "OtherPatientIDs": pt["other_id"],
        "OtherPatientIDsSequence": [seq_item(PatientID=pt["other_id"], IssuerOfPatientID=f"{inst_code}-LEGACY",
                                             TypeOfPatientID="TEXT")],
        "StudyInstanceUID": study_uid, "StudyDate": _dicom_date(date), "StudyTime": study_time,
        "SeriesDate": _dicom_date(date), "AcquisitionDate": _dicom_date(date), "ContentDate": _dicom_date(date),
        "AccessionNumber": accession, "StudyID": f"{int(srng.integers(1000, 99999))}",
        "StudyDescription": "CT CHEST WITH CONTRAST" if contrast else "CT CHEST WITHOUT CONTRAST",
        "InstitutionName": inst_name, "InstitutionAddress": inst_addr,
        "ReferringPhysicianName": f"{referring[1]}^{referring[0]}",
        "PerformingPhysicianName": f"{performing[1]}^{performing[0]}", "OperatorsName": operator,
        "StationName": station, "DeviceSerialNumber": serial,
        "Manufacturer": vendor["Manufacturer"], "ManufacturerModelName": vendor["ManufacturerModelName"],
        "RequestAttributesSequence": [seq_item(RequestedProcedureID=rp_id, ScheduledProcedureStepID=sps_id,
                                               AccessionNumber=accession,
                                               RequestedProcedureDescription="CT CHEST")],
        "ReferencedStudySequence": [seq_item(ReferencedSOPClassUID="1.2.840.10008.3.1.2.3.1",
                                             ReferencedSOPInstanceUID=study_uid)],
        "PixelRepresentation": vendor["PixelRepresentation"], "RescaleIntercept": vendor["RescaleIntercept"],
        "BitsStored": vendor["BitsStored"], "HighBit": vendor["BitsStored"] - 1,
        "KVP": str(int(srng.choice([100, 120, 120, 140]))), "XRayTubeCurrent": int(srng.integers(80, 400)),
        "GantryDetectorTilt": "0", "RotationDirection": "CW", "PatientWeight": f"{srng.uniform(50, 110):.0f}",
    }
    if contrast:
        study_attrs["ContrastBolusAgent"] = "IOHEXOL 350"

    # scanner geometry with per-study FOV, slice spacing, table height and patient position
    pixel_mm = round(360.0 / matrix * float(srng.uniform(1.0, 1.12)), 4)  # the widest patients still fit
    slice_mm = round(300.0 / slices * float(srng.uniform(0.92, 1.06)), 3)
    z_center = float(srng.uniform(-320, -120))
    origin = (-pixel_mm * (matrix - 1) / 2, -pixel_mm * (matrix - 1) / 2, z_center - slice_mm * (slices - 1) / 2)
    center = (float(srng.normal(0, 8)), float(srng.uniform(-15, 12)), z_center + float(srng.normal(0, 8)))
    phantom = make_chest_phantom(pt["anatomy_seed"], findings, (slices, matrix, matrix), (pixel_mm, pixel_mm, slice_mm),
                                 origin_mm=origin, center_mm=center, contrast=contrast,
                                 findings_seed=derived_seed(seed, "findings", study_index), conspicuity=conspicuity)
    study_dir = f"S{study_index + 1:04d}"
    style = int(srng.integers(3))
    transfer = ImplicitVRLittleEndian if srng.random() < 0.1 else ExplicitVRLittleEndian

    burned = bool(srng.random() < 0.25)
    burned_lines: list[str] = []
    if burned:
        max_chars = max((matrix - 4) // 6, 4)
        burned_lines = [s[:max_chars] for s in (f"{pt['last']}, {pt['first']}", pt["mrn"], _us_date(date))]
        phi += burned_lines

    series_specs = [dict(number=2, kernel=vendor["kernels"][0], n=slices, spacing=slice_mm, desc="Chest 5mm soft")]
    if srng.random() < 0.15:
        series_specs.append(dict(number=3, kernel=vendor["kernels"][1], n=2 * slices - 1, spacing=slice_mm / 2,
                                 desc="Chest thin lung"))
    series_out = []
    n_files = 0
    for spec in series_specs:
        geometry = axial_geometry(phantom, matrix, matrix, pixel_mm, spec["n"], spec["spacing"])
        series_uid = synthetic_uid("series", seed, study_index, spec["number"])
        burn_slices = sorted(int(i) for i in srng.choice(spec["n"], size=min(spec["n"], int(srng.integers(3, 7))),
                                                         replace=False)) if burned and spec["number"] == 2 else []
        series_attrs = {
            "SeriesInstanceUID": series_uid, "SeriesNumber": spec["number"], "SeriesDescription": spec["desc"],
            "SeriesTime": study_time, "AcquisitionTime": study_time, "ContentTime": study_time,
            "FrameOfReferenceUID": synthetic_uid("frame-of-reference", seed, study_index),
            "WindowCenter": "-600" if spec["number"] == 3 else "40",
            "WindowWidth": "1500" if spec["number"] == 3 else "400",
            "ReconstructionDiameter": f"{pixel_mm * matrix:.1f}",
        }
        roll = srng.random()
        if burn_slices:
            annotation = "YES" if roll < 0.55 else ("NO" if roll < 0.7 else None)
        else:
            annotation = "NO" if roll < 0.5 else None
        if annotation is not None:
            series_attrs["BurnedInAnnotation"] = annotation
        namer = _file_namer(srng, style, spec["n"])
        rel = f"{study_dir}/SE{spec['number']}"
        files = write_ct_series(
            phantom, geometry, dicom_dir / rel, seed=derived_seed(seed, "series-noise", study_index, spec["number"]),
            study=study_attrs, series=series_attrs, transfer_syntax=transfer, file_name=namer,
            kernel=spec["kernel"], burned_in_lines=burned_lines, burned_in_slices=burn_slices,
            fov_padding=vendor["fov_padding"],
            decorate=lambda ds: _private_block(ds, pt, date, f"{referring[1]}^{referring[0]}"),
        )
        n_files += len(files)
        series_out.append({
            "series_instance_uid": series_uid, "series_number": spec["number"], "series_description": spec["desc"],
            "path": f"dicom/{rel}", "n_slices": len(files), "kernel": spec["kernel"],
            "manufacturer": vendor["Manufacturer"], "pixel_spacing_mm": pixel_mm, "slice_spacing_mm": spec["spacing"],
            "slice_thickness_mm": geometry.slice_thickness_mm, "transfer_syntax": str(transfer),
            "pixel_representation": vendor["PixelRepresentation"], "rescale_intercept": float(vendor["RescaleIntercept"]),
            "fov_padding": vendor["fov_padding"], "burned_in_instance_numbers": [i + 1 for i in burn_slices],
            "burned_in_annotation": annotation,
        })

    ctx = ReportContext(
        patient_first=pt["first"].title(), patient_last=pt["last"].title(), mrn=pt["mrn"], accession=accession,
        age=age, sex=pt["sex"], exam_date=_us_date(date), prior_date=_us_date(prior["date"]) if prior else None,
        radiologist=f"{radiologist[0].title()} {radiologist[1].title()}",
        discussed_with=f"{discussed[0].title()} {discussed[1].title()}", contrast=contrast)
    outcome = _prognosis(derived_rng(seed, "prognosis", study_index), phantom.findings, infection) if prognosis else None
    text, labels = write_report(derived_rng(seed, "report", study_index), phantom.findings, ctx,
                                clinical_status=outcome.pop("sentence") if outcome else None)
    phi += ctx.phi
    record = {
        "study_instance_uid": study_uid,
        "accession_number": accession,
        "patient_id": pt["mrn"],
        "patient_name": dicom_name,
        "study_date": _dicom_date(date),
        "patient_age": age,
        "visit": visit,
        "prior_study_instance_uid": prior["rec"]["study_instance_uid"] if prior else None,
        "latent": {k: pt[k] for k in ("age", "sex", "smoker", "heart_failure", "malignancy", "device")} | {"infection": infection},
        "contrast": contrast,
        "labels": labels,
        "image_truth": {name: int(name in phantom.findings) for name in CT_RATE_18},
        "findings_detail": phantom.findings,
        "phi": list(dict.fromkeys(phi)),
        "burned_in_text": burned,
        "burned_in_lines": burned_lines,
        "series": series_out,
    }
    if outcome is not None:
        record["outcome"] = outcome
    report = {"study_instance_uid": study_uid, "accession_number": accession, "text": text}
    return record, report, n_files, len(series_out)
