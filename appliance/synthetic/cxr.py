"""A deterministic synthetic chest X-ray cohort: CR/DX DICOM images, reports with known labels, ground truth.

Each study has one frontal image (PA for outpatients, portable AP on the wards and in intensive care) and
often a lateral (LL). Findings of the `cxr_19` vocabulary and lines and tubes of `cxr_lines_tubes_10`
are drawn by the projection phantom (`cxr_phantom.py`) with prevalences driven by latent causes (age,
heart failure, COPD, infection, trauma, cardiac surgery, malignancy), as the CT generator does. Headers
vary the way real sites do: CR and DX (DX For Presentation, some For Processing), MONOCHROME1 on two
vendors, a window (LINEAR or SIGMOID) or a VOI LUT Sequence, 10 to 14 stored bits, ImagerPixelSpacing,
ViewPosition, identifiers and dates, some burned-in text. The layout matches `generate_cohort`:
`dicom/` (with `dicom/reports.jsonl`) is what `rfm ingest` reads; `ground_truth.json` sits beside it.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from scipy import ndimage

from appliance.synthetic.cohort import (
    _DOCTORS,
    _FIRST,
    _LAST,
    _MONTHS,
    _dicom_date,
    _file_namer,
    _patient_identity,
    _plan_patients,
    _private_block,
    _sigmoid,
    _us_date,
)
from appliance.synthetic.cxr_phantom import ZONES, make_cxr_anatomy, make_pose, render_projection
from appliance.synthetic.cxr_reports import ALL_LABELS, CXR_FINDINGS, DEVICES, write_cxr_report
from appliance.synthetic.dicom_writer import IMPLEMENTATION_CLASS_UID, render_text_mask
from appliance.synthetic.reports import ReportContext
from appliance.synthetic.uids import derived_rng, synthetic_uid

GENERATOR_VERSION = 1
VOCABULARY = "cxr_19+cxr_lines_tubes_10"

# Vendor conventions: how pixels are stored and which VOI the header carries.
CXR_VENDORS: dict[str, dict] = {
    "fuji": dict(Manufacturer="FUJIFILM Corporation", ManufacturerModelName="FCR PROFECT CS", modality="CR",
                 photometric="MONOCHROME1", bits=10, voi="window"),
    "agfa": dict(Manufacturer="Agfa", ManufacturerModelName="CR 85-X", modality="CR", photometric="MONOCHROME1",
                 bits=12, voi="lut"),
    "carestream": dict(Manufacturer="Carestream Health", ManufacturerModelName="DRX-Evolution", modality="DX",
                       photometric="MONOCHROME2", bits=12, voi="lut", rescale=True),
    "ge": dict(Manufacturer="GE Healthcare", ManufacturerModelName="Definium 8000", modality="DX",
               photometric="MONOCHROME2", bits=14, voi="sigmoid", for_processing_rate=0.35),
}
_CHRONIC = {"hyperinflation", "interstitial lung disease pattern", "arterial calcification", "osseous abnormalities",
            "hernia", "enlarged pulmonary artery"}
_MALPOSITIONS = {
    "endotracheal tube": ["right mainstem", "too high"],
    "tracheostomy tube": ["too low"],
    "nasogastric tube": ["distal esophagus", "coiled in the esophagus", "right lower lobe"],
    "internal jugular central venous catheter": ["right ventricle", "into the subclavian"],
    "peripherally inserted central catheter": ["into the internal jugular", "too deep"],
    "subclavian central venous catheter or port": ["directed cephalad"],
    "swan-ganz catheter": ["too distal"],
    "chest tube": ["in the soft tissues"],
    "mediastinal drain": ["kinked"],
    "intra-aortic balloon pump": ["too low", "in the aortic arch"],
}
MALPOSITION_RATE = 0.2


def _cxr_latents(seed: int, patient: int, base: dict) -> dict:
    """CXR-specific chronic causes on top of the shared identity (age, sex, smoker, heart failure, malignancy)."""
    rng = derived_rng(seed, "cxr-patient", patient)
    old = base["age"] >= 70
    return {
        "copd": bool(base["smoker"] and rng.random() < 0.45) or bool(rng.random() < 0.04 + 0.04 * old),
        "fibrosis": bool(rng.random() < 0.05 + 0.04 * old),
        "oncology_port": bool(base["malignancy"] and rng.random() < 0.6),
    }


def _setting(rng: np.random.Generator, pt: dict, age: int) -> str:
    p_icu = 0.2 + 0.2 * pt["heart_failure"] + 0.08 * (age >= 75)
    roll = rng.random()
    return "icu" if roll < p_icu else ("inpatient" if roll < p_icu + 0.28 else "outpatient")


def _draw_study(rng: np.random.Generator, pt: dict, age: int, setting: str) -> tuple[dict, dict[str, dict], dict[str, dict]]:
    """Latent events of this study, planted findings (with details) and devices (with placement)."""
    icu, ward = setting == "icu", setting != "outpatient"
    ev = {
        "infection": bool(rng.random() < 0.13 + 0.17 * ward),
        "trauma": bool(rng.random() < 0.05 + 0.07 * icu),
        "cardiac_surgery": bool(icu and rng.random() < 0.38),
    }
    hf, copd, mal = float(pt["heart_failure"]), float(pt["copd"]), float(pt["malignancy"])
    inf, tr, cs, fib = float(ev["infection"]), float(ev["trauma"]), float(ev["cardiac_surgery"]), float(pt["fibrosis"])
    a = (age - 60) / 10.0
    logits = {
        "cardiomegaly": -2.5 + 2.6 * hf + 0.25 * a + 0.8 * cs,
        "pleural effusion": -2.7 + 2.0 * hf + 1.1 * inf + 1.5 * mal + 1.2 * cs,
        "costophrenic angle blunting": -2.7 + 0.3 * a,
        "pneumothorax": -3.6 + 2.8 * tr + 1.6 * cs + 0.9 * copd,
        "adenopathy": -3.0 + 2.4 * mal + 0.9 * inf,
        "enlarged pulmonary artery": -3.4 + 1.6 * copd + 1.3 * hf + 0.2 * a,
        "arterial calcification": -2.2 + 0.7 * a + 0.5 * float(pt["smoker"]),
        "osseous abnormalities": -2.3 + 0.45 * a,
        "rib fracture": -3.4 + 3.2 * tr + 0.3 * a,
        "bronchial wall thickening": -3.1 + 1.3 * inf + 1.2 * copd,
        "hernia": -2.9 + 0.4 * a,
        "subcutaneous air/emphysema": -3.6 + 2.8 * tr + 2.3 * cs,
        "opacity": -2.3 + 2.6 * inf + 1.0 * mal + 0.5 * icu,
        "vascular congestion": -3.1 + 2.9 * hf + 0.5 * cs,
        "diaphragm elevation": -3.0 + 1.4 * cs + 0.2 * a,
        "hyperinflation": -3.4 + 3.6 * copd,
        "interstitial lung disease pattern": -3.5 + 4.0 * fib + 0.2 * a,
        "pulmonary edema": -3.3 + 2.7 * hf + 0.8 * icu + 0.6 * cs,
    }
    planted = {name for name, logit in logits.items() if rng.random() < _sigmoid(logit)}
    if "pleural effusion" in planted:
        planted.discard("costophrenic angle blunting")  # the effusion blunts the angle itself
    atel = -2.3 + 1.0 * icu + 0.9 * ("pleural effusion" in planted) + 1.2 * cs + 0.1 * a
    if rng.random() < _sigmoid(atel):
        planted.add("atelectasis")
    findings = {name: _finding_detail(rng, name) for name in CXR_FINDINGS if name in planted}

    chance = {
        "endotracheal tube": 0.55 * icu,
        "tracheostomy tube": 0.0,
        "nasogastric tube": 0.55 * icu + 0.08 * (setting == "inpatient"),
        "internal jugular central venous catheter": 0.42 * icu + 0.04 * (setting == "inpatient"),
        "peripherally inserted central catheter": 0.3 * (setting == "inpatient") + 0.1 * icu,
        "subclavian central venous catheter or port": 0.65 * pt["oncology_port"] + 0.03 + 0.06 * icu,
        "swan-ganz catheter": 0.6 * cs,
        "chest tube": 0.5 * cs + 0.55 * ("pneumothorax" in findings) + 0.15 * icu * ("pleural effusion" in findings) + 0.01,
        "mediastinal drain": 0.75 * cs,
        "intra-aortic balloon pump": 0.6 * cs,
    }
    present = {name for name, p in chance.items() if rng.random() < p}
    if icu and "endotracheal tube" not in present and rng.random() < 0.35:
        present.add("tracheostomy tube")
    elif setting == "inpatient" and rng.random() < 0.07:
        present.add("tracheostomy tube")
    devices = {}
    for name in DEVICES:
        if name not in present:
            continue
        d: dict = {"placement": "correct"}
        if rng.random() < MALPOSITION_RATE:
            d = {"placement": "malpositioned", "malposition": str(rng.choice(_MALPOSITIONS[name]))}
        if name == "endotracheal tube" and d["placement"] == "correct":
            d["tip_above_carina_cm"] = int(rng.integers(3, 7))
        if name in ("internal jugular central venous catheter", "peripherally inserted central catheter",
                    "subclavian central venous catheter or port", "chest tube"):
            d["side"] = "right" if rng.random() < 0.7 else "left"
        if name == "subclavian central venous catheter or port":
            d["port"] = bool(pt["oncology_port"] or rng.random() < 0.3)
        if name == "chest tube" and "pneumothorax" in findings:
            d["side"] = findings["pneumothorax"]["side"]
        devices[name] = d
    return ev, findings, devices


def _finding_detail(rng: np.random.Generator, name: str) -> dict:
    side = lambda: "right" if rng.random() < 0.55 else "left"  # noqa: E731
    if name == "cardiomegaly":
        return {"severity": str(rng.choice(["mild", "moderate", "severe"], p=[0.4, 0.4, 0.2]))}
    if name == "pleural effusion":
        return {"side": "bilateral" if rng.random() < 0.3 else side(),
                "severity": str(rng.choice(["small", "moderate", "large"], p=[0.5, 0.35, 0.15]))}
    if name == "costophrenic angle blunting":
        return {"side": side()}
    if name == "pneumothorax":
        return {"side": side(), "size": str(rng.choice(["small", "moderate", "large"], p=[0.5, 0.35, 0.15]))}
    if name == "opacity":
        nodule = rng.random() < 0.25
        return {"lobe": str(rng.choice(list(ZONES))), "kind": "nodule" if nodule else "consolidation",
                "size_mm": int(rng.integers(10, 25)) if nodule else int(rng.integers(35, 75))}
    if name == "atelectasis":
        return {"side": "bilateral" if rng.random() < 0.4 else side()}
    if name == "pulmonary edema":
        return {"severity": str(rng.choice(["mild", "moderate", "severe"], p=[0.4, 0.4, 0.2]))}
    if name in ("subcutaneous air/emphysema", "diaphragm elevation", "adenopathy"):
        return {"side": side()}
    if name == "rib fracture":
        return {"side": side(), "rib": int(rng.integers(4, 10)), "healing": bool(rng.random() < 0.3)}
    if name == "osseous abnormalities":
        return {"kind": "scoliosis", "scoliosis_mm": round(float(rng.uniform(12, 28)) * (1 if rng.random() < 0.6 else -1), 1)}
    return {}


def _views(rng: np.random.Generator, setting: str) -> list[str]:
    if setting == "icu":
        return ["AP"]
    roll = rng.random()
    if setting == "inpatient":
        return ["AP"] if roll < 0.55 else (["PA", "LL"] if roll < 0.9 else ["PA"])
    return ["PA", "LL"] if roll < 0.7 else ["PA"]


def _vendor_for(rng: np.random.Generator, views: list[str]) -> str:
    if "AP" in views:
        return str(rng.choice(["fuji", "agfa", "ge"], p=[0.4, 0.35, 0.25]))
    return str(rng.choice(["carestream", "ge", "fuji"], p=[0.45, 0.35, 0.2]))


# --- pixels --------------------------------------------------------------------------------------------

def _processed(att: np.ndarray, pixel_mm: float) -> np.ndarray:
    """What a vendor's image processing makes of the line integrals: edges enhanced, range compressed, in [0, 1]."""
    q = att + 0.7 * (att - ndimage.gaussian_filter(att, 3.0 / pixel_mm))
    q = q - 0.45 * ndimage.gaussian_filter(q, 40.0 / pixel_mm)
    lo = float(np.percentile(q, 0.5))
    hi = float(q.max())
    return np.clip((q - lo) / max(hi - lo, 1e-6), 0.0, 1.0)


def encode_pixels(att: np.ndarray, pixel_mm: float, vendor: dict, for_processing: bool,
                  rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Stored values (uint16) and the header attributes that say how to display them.

    No stored value of the image reaches the display-white extreme (maximum for MONOCHROME2, 0 for
    MONOCHROME1): that value is reserved for burned-in text, as a vendor's annotation overlay would be."""
    bits = vendor["bits"]
    maxv = 2**bits - 1
    noise = rng.standard_normal(att.shape).astype(np.float32) * 0.012 * np.exp(0.35 * att)
    raw = ndimage.gaussian_filter(att + noise, 0.6)
    attrs: dict = {"BitsStored": bits, "HighBit": bits - 1, "PixelRepresentation": 0}
    if for_processing:
        # log exposure, falling with attenuation: lungs stored high, shown dark (MONOCHROME1), sign +1
        stored = maxv * np.clip(0.85 - 0.12 * raw, 0.02, 0.95)
        attrs.update(PhotometricInterpretation="MONOCHROME1", PresentationIntentType="FOR PROCESSING",
                     PixelIntensityRelationship="LOG", PixelIntensityRelationshipSign=1)
        return np.rint(stored).astype(np.uint16), attrs
    lin = _processed(raw, pixel_mm)
    mono1 = vendor["photometric"] == "MONOCHROME1"
    voi = vendor["voi"]
    shown = lin ** 0.8 if voi == "window" else lin  # "window" vendors bake the tone curve into the pixels
    stored = (0.03 + 0.93 * shown) * maxv
    if mono1:
        stored = maxv - stored
    # Sign +1: lower values mean less X-ray intensity reached the detector (dense anatomy is low)
    attrs.update(PhotometricInterpretation=vendor["photometric"],
                 PixelIntensityRelationship="DISP" if voi == "window" else "LOG",
                 PixelIntensityRelationshipSign=1 if mono1 else -1)
    if vendor["modality"] == "DX":
        attrs["PresentationIntentType"] = "FOR PRESENTATION"
    if voi == "window":
        c = maxv / 2 + rng.normal(0, maxv * 0.02)
        attrs.update(WindowCenter=[f"{c:.0f}", f"{c * 0.9:.0f}"], WindowWidth=[f"{maxv * 0.95:.0f}", f"{maxv * 0.7:.0f}"],
                     WindowCenterWidthExplanation=["NORMAL", "HARDER"])
    elif voi == "sigmoid":
        c = maxv * (0.5 + rng.normal(0, 0.02))
        attrs.update(WindowCenter=f"{c:.0f}", WindowWidth=f"{maxv * 0.6:.0f}", VOILUTFunction="SIGMOID")
    else:  # a VOI LUT Sequence: a 12-bit sigmoid table over the stored range
        index = np.arange(maxv + 1, dtype=np.float64)
        curve = 1.0 / (1.0 + np.exp(-(index - maxv / 2) / (maxv / 7)))
        curve = (curve - curve[0]) / (curve[-1] - curve[0])
        item = Dataset()
        item.add_new(0x00283002, "US", [maxv + 1, 0, 12])  # LUTDescriptor: entries, first stored value, bits
        item.LUTExplanation = "DEFAULT"
        item.add_new(0x00283006, "US", [int(v) for v in np.rint(curve * 4095)])  # LUTData
        attrs["VOILUTSequence"] = Sequence([item])
    if vendor.get("rescale"):
        attrs.update(RescaleIntercept="0", RescaleSlope="1", RescaleType="US")
    return np.rint(stored).astype(np.uint16), attrs


def _shutter(stored: np.ndarray, attrs: dict, maxv: int, rng: np.random.Generator) -> dict[str, int]:
    """Blank a uniform collimator border on some sides, as processed images show it (display black)."""
    n = stored.shape[0]
    mono1 = attrs["PhotometricInterpretation"] == "MONOCHROME1"
    raw = attrs.get("PresentationIntentType") == "FOR PROCESSING"
    value = int(0.02 * maxv) if raw else (maxv if mono1 else 0)
    border = {side: int(n * rng.uniform(0.03, 0.08)) if rng.random() < 0.7 else 0 for side in ("top", "bottom", "left", "right")}
    if border["top"]:
        stored[: border["top"]] = value
    if border["bottom"]:
        stored[n - border["bottom"]:] = value
    if border["left"]:
        stored[:, : border["left"]] = value
    if border["right"]:
        stored[:, n - border["right"]:] = value
    return border


def _burn_text(stored: np.ndarray, attrs: dict, maxv: int, lines: list[str], border: dict[str, int]) -> list[int]:
    """Burn `lines` in display white just inside the shutter; returns the text box (row0, col0, row1, col1)."""
    rows, cols = stored.shape
    origin = (border["left"] + 3, border["top"] + 3)
    mask = render_text_mask(lines, rows, cols, origin_px=origin)
    white = 0 if attrs["PhotometricInterpretation"] == "MONOCHROME1" else maxv
    stored[mask] = white
    r, c = np.nonzero(mask)
    return [int(r.min()), int(c.min()), int(r.max()) + 1, int(c.max()) + 1] if r.size else []


# --- the cohort ----------------------------------------------------------------------------------------

def generate_cxr_cohort(out: Path, n_studies: int, seed: int = 0, size: int = 256, *,
                        progress: Callable[[int], None] | None = None) -> dict:
    """Write `n_studies` synthetic chest radiograph studies, their reports and the ground truth under `out`.

    Returns a summary dict (paths, counts, seconds). Same arguments, same bytes. `size` is the detector
    matrix (square); `progress(k)` is called after the k-th study."""
    if size < 64:
        raise ValueError("size must be at least 64 pixels")
    t0 = time.perf_counter()
    out = Path(out)
    dicom_dir = out / "dicom"
    dicom_dir.mkdir(parents=True, exist_ok=True)
    plan = _plan_patients(derived_rng(seed, "cxr-cohort"), n_studies)
    patients: dict[int, dict] = {}
    history: dict[int, list[dict]] = {}
    records, reports = [], []
    n_files = n_series = 0
    for study_index, (patient, visit) in sorted(enumerate(plan), key=lambda x: (x[1][0], x[1][1])):
        if patient not in patients:
            base = _patient_identity(seed, patient)
            arng = derived_rng(seed, "cxr-anatomy", patient)
            patients[patient] = {**base, **_cxr_latents(seed, patient, base),
                                 "anatomy": make_cxr_anatomy(arng, base["sex"], base["age"])}
        pt = patients[patient]
        prior = history.get(patient, [])
        record, report, files, series = _write_study(dicom_dir, seed, study_index, pt, visit,
                                                     prior[-1] if prior else None, size)
        history.setdefault(patient, []).append(record)
        records.append((study_index, record))
        reports.append((study_index, report))
        n_files += files
        n_series += series
        if progress is not None:
            progress(len(records))
    records.sort(key=lambda r: r[0])
    reports.sort(key=lambda r: r[0])
    reports_path = dicom_dir / "reports.jsonl"
    with reports_path.open("w", encoding="utf-8") as fh:
        for _, rep in reports:
            fh.write(json.dumps(rep, ensure_ascii=False) + "\n")
    truth = {
        "generator": {"name": "appliance.synthetic.generate_cxr_cohort", "version": GENERATOR_VERSION, "seed": seed,
                      "n_studies": n_studies, "size": size},
        "vocabulary": VOCABULARY,
        "findings": list(CXR_FINDINGS),
        "devices": list(DEVICES),
        "labels_order": list(ALL_LABELS),
        "studies": [{k: v for k, v in r.items() if not k.startswith("_")} for _, r in records],
    }
    truth_path = out / "ground_truth.json"
    truth_path.write_text(json.dumps(truth, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return {"out_dir": out, "dicom_dir": dicom_dir, "reports_path": reports_path, "ground_truth_path": truth_path,
            "n_studies": n_studies, "n_series": n_series, "n_files": n_files, "seconds": time.perf_counter() - t0}


def sample_cxr_reports(n_studies: int, seed: int = 0) -> list[dict]:
    """Reports of `n_studies` independent patients without any pixels: fast, for measuring a labeller.

    Each item: text, labels (the report's labels over ALL_LABELS), image_truth, findings_detail, devices,
    age, sex, setting, view_positions. Studies are drawn as `generate_cxr_cohort` draws them."""
    out = []
    for i in range(n_studies):
        base = _patient_identity(seed, 10**6 + i)
        pt = {**base, **_cxr_latents(seed, 10**6 + i, base)}
        rng = derived_rng(seed, "cxr-report-only", i)
        age = pt["age"]
        setting = _setting(rng, pt, age)
        _, findings, devices = _draw_study(rng, pt, age, setting)
        views = _views(rng, setting)
        ctx = ReportContext(patient_first=pt["first"].title(), patient_last=pt["last"].title(), mrn=pt["mrn"],
                            accession=f"A{int(rng.integers(10**7, 10**8))}", age=age, sex=pt["sex"],
                            exam_date=_us_date(pt["first_visit"]), prior_date=None, radiologist="Jane Roe",
                            discussed_with="Samuel Okonjo", contrast=False)
        text, labels = write_cxr_report(rng, findings, devices, ctx, views=views, setting=setting)
        truth = {name: int(name in findings) for name in CXR_FINDINGS}
        out.append({"text": text, "labels": labels, "image_truth": truth, "findings_detail": findings,
                    "devices": devices, "age": age, "sex": pt["sex"], "setting": setting, "view_positions": views})
    return out


def _write_study(dicom_dir: Path, seed: int, study_index: int, pt: dict, visit: int, prior: dict | None, size: int):
    srng = derived_rng(seed, "cxr-study", study_index)
    date = pt["first_visit"] if prior is None else prior["_date"] + dt.timedelta(days=int(srng.integers(20, 400)))
    age = pt["age"] + (date.year - pt["first_visit"].year)
    setting = _setting(srng, pt, age)
    events, findings, devices = _draw_study(srng, pt, age, setting)
    if prior is not None:  # chronic findings persist with their look; a port stays in
        for name in _CHRONIC & set(prior["findings_detail"]):
            findings[name] = prior["findings_detail"][name]
        port = "subclavian central venous catheter or port"
        if prior["devices"].get(port, {}).get("port") and port not in devices:
            devices[port] = dict(prior["devices"][port], placement="correct")
            devices[port].pop("malposition", None)
        findings = {name: findings[name] for name in CXR_FINDINGS if name in findings}
    removed = [d for d in (prior["devices"] if prior else {}) if d not in devices]
    views = _views(srng, setting)
    vendor_key = _vendor_for(srng, views)
    vendor = CXR_VENDORS[vendor_key]
    for_processing = bool(srng.random() < vendor.get("for_processing_rate", 0.0))

    inst_name, inst_addr, inst_code = pt["institution"]
    study_uid = synthetic_uid("cxr-study", seed, study_index)
    accession = f"{inst_code}X{date.year % 100:02d}{int(srng.integers(10**6, 10**7))}"
    study_time = f"{int(srng.integers(0, 24)):02d}{int(srng.integers(0, 60)):02d}{int(srng.integers(0, 60)):02d}"
    referring, radiologist = (_DOCTORS[int(srng.integers(len(_DOCTORS)))] for _ in range(2))
    operator = f"{srng.choice(_LAST)!s}^{srng.choice(_FIRST['F'] + _FIRST['M'])!s}"
    station = f"{inst_code}{'PORT' if 'AP' in views else 'XR'}{int(srng.integers(1, 9)):02d}"
    serial = f"{int(srng.integers(10**5, 10**6))}"
    dicom_name = f"{pt['last']}^{pt['first']}^{pt['middle']}"
    phi = [dicom_name, pt["mrn"], pt["other_id"], _dicom_date(pt["birth"]), _dicom_date(date), accession, inst_name,
           inst_addr, f"{referring[1]}^{referring[0]}", operator, station, serial, f"{pt['last']}^{pt['first']}",
           f"Referred by {referring[1]}^{referring[0]}", f"Alt ID {pt['other_id']}",
           f"Exam {date.day:02d}-{_MONTHS[date.month - 1]}-{date.year}"]
    portable = "AP" in views
    study_attrs = {
        "SpecificCharacterSet": "ISO_IR 100",
        "PatientName": dicom_name, "PatientID": pt["mrn"], "PatientBirthDate": _dicom_date(pt["birth"]),
        "PatientSex": pt["sex"], "PatientAge": f"{age:03d}Y", "OtherPatientIDs": pt["other_id"],
        "StudyInstanceUID": study_uid, "StudyDate": _dicom_date(date), "StudyTime": study_time,
        "SeriesDate": _dicom_date(date), "AcquisitionDate": _dicom_date(date), "ContentDate": _dicom_date(date),
        "AccessionNumber": accession, "StudyID": f"{int(srng.integers(1000, 99999))}",
        "StudyDescription": "XR CHEST PORTABLE" if portable else ("XR CHEST PA AND LATERAL" if "LL" in views else "XR CHEST PA"),
        "InstitutionName": inst_name, "InstitutionAddress": inst_addr,
        "ReferringPhysicianName": f"{referring[1]}^{referring[0]}", "OperatorsName": operator,
        "StationName": station, "DeviceSerialNumber": serial,
        "Manufacturer": vendor["Manufacturer"], "ManufacturerModelName": vendor["ManufacturerModelName"],
        "BodyPartExamined": "CHEST", "Modality": vendor["modality"],
        "KVP": str(int(srng.choice([90, 110, 120, 125]))),
    }
    burned = bool(srng.random() < 0.2)
    max_chars = max((size - 30) // 6, 6)
    burned_lines = [s[:max_chars] for s in (f"{pt['last']}, {pt['first']}", pt["mrn"], _us_date(date))] if burned else []
    phi += burned_lines
    anatomy = pt["anatomy"]
    style = int(srng.integers(3))
    transfer = ImplicitVRLittleEndian if srng.random() < 0.1 else ExplicitVRLittleEndian
    series_out = []
    for number, view in enumerate(views, start=1):
        vrng = derived_rng(seed, "cxr-view", study_index, view)
        pose = make_pose(vrng, view, anatomy)
        render = render_projection(anatomy, pose, size, findings, devices, vrng)
        stored, attrs = encode_pixels(render.attenuation, render.pixel_mm,
                                      vendor, for_processing and view != "LL", vrng)
        maxv = 2 ** vendor["bits"] - 1
        border = _shutter(stored, attrs, maxv, vrng)
        text_box: list[int] = []
        bia = None
        if burned and number == 1:
            text_box = _burn_text(stored, attrs, maxv, burned_lines, border)
            roll = vrng.random()
            bia = "YES" if roll < 0.5 else ("NO" if roll < 0.65 else None)
        elif vrng.random() < 0.4:
            bia = "NO"
        series_uid = synthetic_uid("cxr-series", seed, study_index, number)
        rel = f"X{study_index + 1:04d}/SE{number}"
        name = _file_namer(vrng, style, 1)(0)
        path = dicom_dir / rel / name
        _write_image(path, stored, render.pixel_mm, attrs, study_attrs, view, number, series_uid, transfer, bia,
                     vendor, pt, date, referring)
        series_out.append({
            "series_instance_uid": series_uid, "series_number": number, "path": f"dicom/{rel}/{name}",
            "view_position": view, "modality": vendor["modality"], "manufacturer": vendor["Manufacturer"],
            "photometric": attrs["PhotometricInterpretation"],
            "presentation_intent": attrs.get("PresentationIntentType"),
            "voi": "none" if "PresentationIntentType" in attrs and attrs["PresentationIntentType"] == "FOR PROCESSING"
            else vendor["voi"],
            "bits_stored": vendor["bits"], "rows": size, "cols": size, "imager_pixel_spacing_mm": round(render.pixel_mm, 4),
            "border_px": border, "burned_in_box": text_box, "burned_in_annotation": bia,
            "transfer_syntax": str(transfer), "landmarks_px": {k: [round(v, 2) for v in p] for k, p in render.landmarks_px.items()},
            "device_tips_px": render.device_tips_px,
        })

    ctx = ReportContext(
        patient_first=pt["first"].title(), patient_last=pt["last"].title(), mrn=pt["mrn"], accession=accession,
        age=age, sex=pt["sex"], exam_date=_us_date(date), prior_date=_us_date(prior["_date"]) if prior else None,
        radiologist=f"{radiologist[0].title()} {radiologist[1].title()}",
        discussed_with=f"{referring[0].title()} {referring[1].title()}", contrast=False)
    text, labels = write_cxr_report(derived_rng(seed, "cxr-report", study_index), findings, devices, ctx,
                                    views=views, setting=setting, removed_devices=removed)
    phi += ctx.phi
    image_truth = {name: int(name in findings) for name in CXR_FINDINGS}
    for name in DEVICES:
        image_truth[name] = int(name in devices)
        image_truth[f"{name} malpositioned"] = int(devices.get(name, {}).get("placement") == "malpositioned")
    record = {
        "study_instance_uid": study_uid, "accession_number": accession, "patient_id": pt["mrn"],
        "patient_name": dicom_name, "study_date": _dicom_date(date), "patient_age": age, "sex": pt["sex"],
        "visit": visit, "prior_study_instance_uid": prior["study_instance_uid"] if prior else None,
        "setting": setting, "view_positions": views, "manufacturer": vendor["Manufacturer"],
        "modality": vendor["modality"], "for_processing": for_processing,
        "latent": {k: pt[k] for k in ("age", "sex", "smoker", "heart_failure", "malignancy", "copd", "fibrosis")} | events,
        "labels": labels, "image_truth": image_truth, "findings_detail": findings, "devices": devices,
        "phi": list(dict.fromkeys(phi)), "burned_in_text": burned, "burned_in_lines": burned_lines,
        "series": series_out, "_date": date,
    }
    report = {"study_instance_uid": study_uid, "accession_number": accession, "text": text}
    return record, report, len(series_out), len(series_out)


def _write_image(path: Path, stored: np.ndarray, pixel_mm: float, attrs: dict, study_attrs: dict, view: str,
                 number: int, series_uid: str, transfer: str, bia: str | None, vendor: dict, pt: dict,
                 date: dt.date, referring: tuple[str, str]) -> None:
    ds = Dataset()
    for keyword, value in study_attrs.items():
        setattr(ds, keyword, value)
    processing = attrs.get("PresentationIntentType") == "FOR PROCESSING"
    if vendor["modality"] == "CR":
        ds.SOPClassUID = ComputedRadiographyImageStorage
    else:
        ds.SOPClassUID = DigitalXRayImageStorageForProcessing if processing else DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = synthetic_uid("cxr-instance", series_uid)
    ds.ImageType = ["ORIGINAL", "PRIMARY"] if vendor["modality"] == "CR" else ["ORIGINAL", "PRIMARY", ""]
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = number
    ds.InstanceNumber = 1
    ds.SeriesDescription = {"PA": "CHEST PA", "AP": "CHEST AP PORTABLE", "LL": "CHEST LATERAL"}[view]
    ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = study_attrs["StudyTime"]
    ds.ViewPosition = view
    ds.PatientOrientation = ["P", "F"] if view == "LL" else ["L", "F"]
    ds.ImagerPixelSpacing = [f"{pixel_mm:.4f}", f"{pixel_mm:.4f}"]
    if vendor["modality"] == "DX":
        ds.PixelSpacing = [f"{pixel_mm:.4f}", f"{pixel_mm:.4f}"]
        ds.DetectorType = "SCINTILLATOR"
    ds.DistanceSourceToDetector = "1000" if view == "AP" else "1800"
    ds.SamplesPerPixel = 1
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 16
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    if bia is not None:
        ds.BurnedInAnnotation = bia
    ds.PixelData = stored.astype("<u2").tobytes()
    ds["PixelData"].VR = "OW"
    _private_block(ds, pt, date, f"{referring[1]}^{referring[0]}")
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = UID(transfer)
    ds.file_meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    ds.file_meta.ImplementationVersionName = "RFM_SYNTH_1"
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
