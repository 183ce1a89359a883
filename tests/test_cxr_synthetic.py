"""Synthetic chest X-ray cohort: headers, pixels, planted findings and devices, prevalences, reports and labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_voi_lut

from appliance.cli import main
from appliance.errors import ConfigError
from appliance.labels.metrics import agreement
from appliance.labels.rules import label_report
from appliance.labels.vocabularies import load_vocabulary
from appliance.synthetic import generate_cxr_cohort
from appliance.synthetic.cxr import sample_cxr_reports
from appliance.synthetic.cxr_phantom import make_cxr_anatomy, make_pose, render_projection
from appliance.synthetic.cxr_reports import ALL_LABELS, CXR_FINDINGS, DEVICES, device_sentence
from conftest import ground_truth

COMPOSITE = load_vocabulary("cxr_19+cxr_lines_tubes_10")


def _series(cohort: Path) -> list[tuple[dict, dict, pydicom.Dataset]]:
    return [(study, s, pydicom.dcmread(cohort / s["path"])) for study in ground_truth(cohort)["studies"]
            for s in study["series"]]


def test_headers_vary_like_real_sites(small_cxr_cohort):
    items = _series(small_cxr_cohort)
    photometric, vois, intents, views, vendors, modalities = set(), set(), set(), set(), set(), set()
    for study, s, ds in items:
        assert ds.Modality == s["modality"] in ("CR", "DX")
        assert ds.SOPClassUID.name in ("Computed Radiography Image Storage",
                                       "Digital X-Ray Image Storage - For Presentation",
                                       "Digital X-Ray Image Storage - For Processing")
        if ds.Modality == "DX":
            intents.add(ds.PresentationIntentType)
            assert (ds.PresentationIntentType == "FOR PROCESSING") == ds.SOPClassUID.name.endswith("Processing")
        else:
            assert "PresentationIntentType" not in ds
        assert ds.ViewPosition == s["view_position"] and ds.ViewPosition in study["view_positions"]
        assert 10 <= ds.BitsStored <= 14 and ds.BitsAllocated == 16
        assert int(ds.pixel_array.max()) < 2**ds.BitsStored
        assert float(ds.ImagerPixelSpacing[0]) == pytest.approx(s["imager_pixel_spacing_mm"], abs=1e-3)
        assert ds.PatientSex == study["sex"] and ds.PatientAge == f"{study['patient_age']:03d}Y"
        assert ds.Manufacturer == study["manufacturer"] and str(ds.PatientName) == study["patient_name"]
        assert ds.InstitutionName and ds.PatientBirthDate and ds.AccessionNumber == study["accession_number"]
        photometric.add(ds.PhotometricInterpretation)
        views.add(ds.ViewPosition)
        vendors.add(ds.Manufacturer)
        modalities.add(ds.Modality)
        if "VOILUTSequence" in ds:
            vois.add("lut")
            lut = apply_voi_lut(ds.pixel_array, ds)
            assert lut.max() <= 4095 and lut.min() >= 0
        elif "WindowCenter" in ds:
            vois.add(str(ds.get("VOILUTFunction", "LINEAR")))
    assert photometric == {"MONOCHROME1", "MONOCHROME2"}
    assert vois == {"lut", "LINEAR", "SIGMOID"}
    assert intents == {"FOR PRESENTATION", "FOR PROCESSING"}
    assert views == {"PA", "AP", "LL"} and modalities == {"CR", "DX"} and len(vendors) >= 3


def test_burned_in_text_is_display_white_and_listed_as_phi(small_cxr_cohort):
    burned = [(study, s, ds) for study, s, ds in _series(small_cxr_cohort) if s["burned_in_box"]]
    assert burned and any(s["burned_in_annotation"] == "YES" for _, s, _ in burned)
    for study, s, ds in burned:
        r0, c0, r1, c1 = s["burned_in_box"]
        white = 0 if ds.PhotometricInterpretation == "MONOCHROME1" else 2**ds.BitsStored - 1
        box = ds.pixel_array[r0:r1, c0:c1]
        assert (box == white).mean() > 0.1  # glyph strokes
        assert (ds.pixel_array == white).sum() == (box == white).sum()  # nothing else is at that value
        assert set(study["burned_in_lines"]) <= set(study["phi"])


def test_same_seed_same_bytes(tmp_path):
    a = generate_cxr_cohort(tmp_path / "a", 3, seed=4, size=64)
    b = generate_cxr_cohort(tmp_path / "b", 3, seed=4, size=64)
    files_a = sorted(p.relative_to(a["out_dir"]) for p in a["out_dir"].rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b["out_dir"]) for p in b["out_dir"].rglob("*") if p.is_file())
    for rel in files_a:
        assert (a["out_dir"] / rel).read_bytes() == (b["out_dir"] / rel).read_bytes(), rel
    assert a["n_studies"] == 3 and a["n_files"] == a["n_series"] >= 3


def _render(findings=None, devices=None, view="PA", size=128):
    anatomy = make_cxr_anatomy(np.random.default_rng(1), "M", 62)
    pose = make_pose(np.random.default_rng(2), view, anatomy)
    return render_projection(anatomy, pose, size, findings or {}, devices or {}, np.random.default_rng(3))


# finding -> (details, sign of the change, where: rows "upper"/"lower"/None, columns "left"/"right"/"both"/None)
# Columns are as displayed: the patient's right is on the image left.
VISIBLE = {
    "cardiomegaly": ({"severity": "severe"}, +1, "lower", None),
    "pleural effusion": ({"side": "right", "severity": "moderate"}, +1, "lower", "left"),
    "costophrenic angle blunting": ({"side": "left"}, +1, "lower", "right"),
    "pneumothorax": ({"side": "left", "size": "large"}, -1, None, "right"),
    "opacity": ({"lobe": "right upper lobe", "kind": "consolidation", "size_mm": 60}, +1, "upper", "left"),
    "pulmonary edema": ({"severity": "severe"}, +1, None, "both"),
    "atelectasis": ({"side": "right"}, +1, "lower", "left"),
    "diaphragm elevation": ({"side": "left"}, +1, "lower", "right"),
    "hyperinflation": ({}, -1, "lower", "both"),
    "rib fracture": ({"side": "right", "rib": 6}, None, None, "left"),
    "subcutaneous air/emphysema": ({"side": "left"}, -1, None, "right"),
    "interstitial lung disease pattern": ({}, +1, "lower", "both"),
    "arterial calcification": ({}, +1, "upper", "right"),
    "adenopathy": ({}, +1, None, None),
    "enlarged pulmonary artery": ({}, +1, None, "right"),
    "bronchial wall thickening": ({}, +1, None, None),
    "hernia": ({}, None, "lower", None),
    "osseous abnormalities": ({"scoliosis_mm": 25}, None, None, None),
    "vascular congestion": ({}, +1, "upper", None),
}


def test_every_finding_has_a_planted_look():
    assert set(VISIBLE) == set(CXR_FINDINGS)


@pytest.mark.parametrize("name", sorted(VISIBLE))
def test_planted_finding_changes_the_image_where_it_should(name):
    details, sign, rows, cols = VISIBLE[name]
    base = _render()
    diff = _render({name: details}).attenuation - base.attenuation
    mass = np.abs(diff)
    assert mass.max() > 0.05, "the finding must be visible, not a rounding change"
    if sign is not None:
        assert np.sign(diff.sum()) == sign
    r, c = (float((mass * idx).sum() / mass.sum()) for idx in np.indices(diff.shape))
    carina_r, carina_c = base.landmarks_px["carina"]
    if rows == "upper":
        assert r < carina_r + 10
    elif rows == "lower":
        assert r > carina_r + 10
    half = diff.shape[1] // 2
    left, right = mass[:, :half].sum(), mass[:, half:].sum()
    if cols == "left":
        assert c < carina_c and left > 2 * right
    elif cols == "right":
        assert c > carina_c and right > 2 * left
    elif cols == "both":
        assert min(left, right) > 0.3 * max(left, right)


def test_lines_and_tubes_end_where_their_placement_says():
    ok = _render(devices={"endotracheal tube": {"placement": "correct", "tip_above_carina_cm": 4},
                          "nasogastric tube": {"placement": "correct"},
                          "chest tube": {"placement": "correct", "side": "left"}})
    bad = _render(devices={"endotracheal tube": {"placement": "malpositioned", "malposition": "right mainstem"},
                           "nasogastric tube": {"placement": "malpositioned", "malposition": "distal esophagus"}})
    base = _render()
    carina_r, carina_c = base.landmarks_px["carina"]
    px_per_cm = 10 / base.pixel_mm
    ett_r, ett_c = ok.device_tips_px["endotracheal tube"]
    assert carina_r - ett_r == pytest.approx(4 * px_per_cm, rel=0.25)  # 4 cm above the carina
    bad_r, bad_c = bad.device_tips_px["endotracheal tube"]
    assert bad_r > carina_r and bad_c < carina_c  # down the right main bronchus (image left)
    ng_r, ng_c = ok.device_tips_px["nasogastric tube"]
    assert ng_r > bad.device_tips_px["nasogastric tube"][0] and ng_c > carina_c  # stomach, below the left dome
    assert ok.device_tips_px["chest tube"][1] > carina_c
    for name, (r, c) in ok.device_tips_px.items():
        r, c = int(round(r)), int(round(c))
        window = (slice(max(r - 2, 0), r + 3), slice(max(c - 2, 0), c + 3))
        assert (ok.attenuation - base.attenuation)[window].max() > 0.1, f"{name} is radio-opaque at its tip"


def test_lateral_view_renders_anatomy_and_findings():
    lateral = _render(view="LL")
    effusion = _render({"pleural effusion": {"side": "bilateral", "severity": "moderate"}}, view="LL")
    assert lateral.attenuation.std() > 0.3
    diff = effusion.attenuation - lateral.attenuation
    assert diff.sum() > 0 and np.argmax(diff.sum(axis=1)) > lateral.landmarks_px["carina"][0]


def test_prevalences_and_age_correlation():
    studies = sample_cxr_reports(1500, seed=9)
    for name in CXR_FINDINGS:
        prevalence = np.mean([name in s["findings_detail"] for s in studies])
        assert 0.04 <= prevalence <= 0.4, (name, prevalence)
    for name in DEVICES:
        assert np.mean([name in s["devices"] for s in studies]) >= 0.03, name
    old = [s for s in studies if s["age"] >= 70]
    young = [s for s in studies if s["age"] < 55]
    for name in ("arterial calcification", "osseous abnormalities", "cardiomegaly"):
        p_old = np.mean([name in s["findings_detail"] for s in old])
        p_young = np.mean([name in s["findings_detail"] for s in young])
        assert p_old > 1.5 * p_young, name
    icu = [s for s in studies if s["setting"] == "icu"]
    assert all(s["view_positions"] == ["AP"] for s in icu)
    assert np.mean(["endotracheal tube" in s["devices"] for s in icu]) > 0.3


def test_rules_labeller_agrees_with_the_reports_ground_truth():
    studies = sample_cxr_reports(200, seed=21)
    pred = {str(i): label_report(s["text"], COMPOSITE).labels for i, s in enumerate(studies)}
    gold = {str(i): s["labels"] for i, s in enumerate(studies)}
    loose = agreement(pred, gold, list(COMPOSITE.names), protocol="ignore_uncertain")
    strict = agreement(pred, gold, list(COMPOSITE.names), protocol="strict")
    assert loose.macro["f1"] > 0.95 and strict.macro["f1"] > 0.9 and strict.macro["kappa"] > 0.9
    assert all(set(s["labels"]) == set(ALL_LABELS) for s in studies)
    assert any(v == -1 for s in studies for v in s["labels"].values())  # reports hedge sometimes
    assert any("malpositioned" in k and v == 1 for s in studies for k, v in s["labels"].items())


@pytest.mark.parametrize("device", DEVICES)
def test_every_device_sentence_labels_only_its_device(device):
    from appliance.synthetic.cxr import _MALPOSITIONS

    cases = [{"placement": "correct", "side": "left", "port": True}, {"placement": "correct", "side": "right"}]
    cases += [{"placement": "malpositioned", "malposition": m, "side": "right"} for m in _MALPOSITIONS[device]]
    for d in cases:
        for seed in range(4):
            sentence, action = device_sentence(device, d, np.random.default_rng(seed))
            for text in filter(None, (sentence, action)):
                labels = label_report(text, COMPOSITE).labels
                expected = {device: 1}
                if d["placement"] == "malpositioned":
                    expected[f"{device} malpositioned"] = 1
                assert {k: v for k, v in labels.items() if v} == expected, text


def test_composite_vocabulary():
    findings, devices = load_vocabulary("cxr_19"), load_vocabulary("cxr_lines_tubes_10")
    assert COMPOSITE.name == "cxr_19+cxr_lines_tubes_10"
    assert COMPOSITE.names == findings.names + devices.names == ALL_LABELS
    assert COMPOSITE.fingerprint() not in (findings.fingerprint(), devices.fingerprint())
    assert load_vocabulary("cxr_lines_tubes_10+cxr_19").names != COMPOSITE.names
    with pytest.raises(ConfigError, match="in both"):
        load_vocabulary("cxr_19+cxr_19")
    with pytest.raises(ConfigError, match="two or more"):
        load_vocabulary("cxr_19+")
    with pytest.raises(ConfigError, match="unknown vocabulary"):
        load_vocabulary("cxr_19+no_such_vocabulary")


def test_malposition_makes_the_device_present():
    labels = label_report("The PICC tip is too deep, in the right atrium.", COMPOSITE).labels
    assert labels["peripherally inserted central catheter"] == 1
    assert labels["peripherally inserted central catheter malpositioned"] == 1
    labels = label_report("No PICC. Right IJ central line terminates in the low SVC.", COMPOSITE).labels
    assert labels["peripherally inserted central catheter"] == 0
    assert labels["internal jugular central venous catheter"] == 1
    assert labels["internal jugular central venous catheter malpositioned"] == 0


def test_rfm_synth_cxr(tmp_path, capsys):
    out = tmp_path / "cxr"
    assert main(["synth", str(out), "--cxr", "--size", "64", "--studies", "2", "--seed", "3"]) == 0
    truth = json.loads((out / "ground_truth.json").read_text())
    assert truth["vocabulary"] == "cxr_19+cxr_lines_tubes_10" and len(truth["studies"]) == 2
    files = [out / s["path"] for st in truth["studies"] for s in st["series"]]
    assert all(pydicom.dcmread(f).Modality in ("CR", "DX") for f in files)
    assert len((out / "dicom" / "reports.jsonl").read_text().splitlines()) == 2
    assert "CR, DX" in capsys.readouterr().out
