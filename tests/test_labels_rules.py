"""Rules labeller: negation, uncertainty, scope, conflicts, normal phrasing; synthetic cohort; real Open-I text."""

from __future__ import annotations

import html
import io
import json
import os
import re
import tarfile
import zipfile
from collections import Counter
from pathlib import Path

import pytest

from appliance.labels.metrics import agreement
from appliance.labels.rules import label_report, split_sentences
from appliance.labels.vocabularies import CT_RATE_18, load_vocabulary

CT = load_vocabulary("ct_rate_18")
CXR = load_vocabulary("cxr_19")
CHEXPERT = load_vocabulary("chexpert_14")


def ct(text: str, finding: str) -> int:
    return label_report(text, CT).labels[finding]


@pytest.mark.parametrize("text, finding, expected", [
    # plain mentions, plurals, hyphens
    ("Small right pleural effusion.", "pleural effusion", 1),
    ("Bilateral pleural effusions.", "pleural effusion", 1),
    ("Patchy ground glass opacities in the left lower lobe.", "lung opacity", 1),
    ("Bibasilar atelectases.", "atelectasis", 1),
    # pre-negation
    ("No pleural effusion.", "pleural effusion", 0),
    ("There is no evidence of pericardial effusion.", "pericardial effusion", 0),
    ("Negative for lymphadenopathy.", "lymphadenopathy", 0),
    ("The lungs are free of consolidation.", "consolidation", 0),
    ("Without focal consolidation.", "consolidation", 0),
    ("No focal consolidation, suspicious pulmonary opacity, large pleural effusion, or bronchiectasis is identified.",
     "bronchiectasis", 0),
    ("Resolved right pleural effusion.", "pleural effusion", 0),
    ("Does not appear to be emphysema.", "emphysema", 0),
    # post-negation
    ("Pleural effusion is not seen.", "pleural effusion", 0),
    ("The previously seen consolidation has resolved.", "consolidation", 0),
    ("Hiatal hernia is absent.", "hiatal hernia", 0),
    ("Lymphadenopathy is not identified.", "lymphadenopathy", 0),
    # uncertainty
    ("Possible small hiatal hernia.", "hiatal hernia", -1),
    ("Cannot exclude a small nodule in the right upper lobe.", "lung nodule", -1),
    ("Consolidation in the left lower lobe cannot be excluded.", "consolidation", -1),
    ("Basilar opacity which may represent atelectasis.", "atelectasis", -1),
    ("Findings are suspicious for lymphadenopathy.", "lymphadenopathy", -1),
    ("Atelectasis versus consolidation in the lingula.", "atelectasis", -1),
    ("Atelectasis versus consolidation in the lingula.", "consolidation", -1),
    ("Borderline cardiomegaly.", "cardiomegaly", -1),
    ("Questionable mosaic attenuation.", "mosaic attenuation pattern", -1),
    ("Bronchiectasis?", "bronchiectasis", -1),
    ("Cardiomegaly and/or pericardial effusion.", "cardiomegaly", -1),
    ("Cardiomegaly and/or pericardial effusion.", "pericardial effusion", -1),
    ("Basilar opacities, likely atelectasis.", "atelectasis", -1),
    ("Basilar opacities, likely atelectasis.", "lung opacity", 1),
    ("Airspace consolidation, consistent with pneumonia.", "consolidation", 1),
    # scope ends at but/however and at a verb
    ("No pleural effusion but there is a small pericardial effusion.", "pericardial effusion", 1),
    ("No pneumothorax; however, small bilateral pleural effusions are present.", "pleural effusion", 1),
    ("No effusion is seen and the heart is enlarged.", "cardiomegaly", 1),
    ("Emphysema is present and bronchiectasis is not seen.", "emphysema", 1),
    # pseudo-negation
    ("No interval change in the right pleural effusion.", "pleural effusion", 1),
    ("No significant change in the size of the lung nodule.", "lung nodule", 1),
    # normal phrasing and gaps
    ("Heart size is normal.", "cardiomegaly", 0),
    ("The heart is not enlarged.", "cardiomegaly", 0),
    ("The heart is mildly enlarged.", "cardiomegaly", 1),
    ("Heart size is at the upper limits of normal, possibly mildly enlarged.", "cardiomegaly", -1),
    ("The lungs are clear.", "consolidation", 0),
    ("No acute cardiopulmonary process.", "consolidation", 0),
    # exclusions and shared head nouns
    ("Subcutaneous emphysema in the chest wall.", "emphysema", 0),
    ("Small pericardial effusion.", "pleural effusion", 0),
    ("Small pleural and pericardial effusions.", "pleural effusion", 1),
    ("Small pleural and pericardial effusions.", "pericardial effusion", 1),
    ("No pleural or pericardial effusion.", "pericardial effusion", 0),
    ("A 1 cm thyroid nodule.", "lung nodule", 0),
    ("Calcified plaque in the coronary arteries.", "arterial wall calcification", 0),
    ("Calcified plaque in the coronary arteries.", "coronary artery wall calcification", 1),
    ("Non-enlarged lymph nodes.", "lymphadenopathy", 0),
])
def test_unit_cases(text, finding, expected):
    assert ct(text, finding) == expected


def test_conflicting_mentions_positive_beats_uncertain_beats_negative():
    assert ct("No pleural effusion. Possible small pleural effusion.", "pleural effusion") == -1
    assert ct("Possible pleural effusion. Small left pleural effusion. No pleural effusion.", "pleural effusion") == 1
    result = label_report("No nodule. Questionable 4 mm nodule in the left lower lobe.", CT)
    assert result.evidence["lung nodule"] == "Questionable 4 mm nodule in the left lower lobe."


def test_history_sections_are_not_findings():
    text = ("CLINICAL HISTORY: Follow-up of pulmonary nodule.\nCOMPARISON: CT of 01/02/2023 showed a pleural effusion.\n"
            "TECHNIQUE: Axial CT.\n\nFINDINGS: No pleural effusion.\nIMPRESSION: No acute abnormality.")
    labels = label_report(text, CT).labels
    assert labels["lung nodule"] == 0 and labels["pleural effusion"] == 0


def test_sentence_splitting():
    text = ("FINDINGS: Nodule measuring approx. 3.2 cm in the RUL, e.g. a granuloma. Discussed with Dr. Roe.\n"
            "IMPRESSION:\n1. Small effusion\n2. No pneumothorax\nthe lungs are otherwise\nclear.")
    sentences = [s for _, s in split_sentences(text)]
    # a line starting in lower case continues the previous one (wrapped text)
    assert sentences == ["Nodule measuring approx. 3.2 cm in the RUL, e.g. a granuloma.", "Discussed with Dr. Roe.",
                         "Small effusion", "No pneumothorax the lungs are otherwise clear."]
    assert split_sentences("FINDINGS: x.")[0] == ("findings", "x.")


def test_every_finding_labelled_and_blank_option():
    result = label_report("", CT)
    assert list(result.labels) == list(CT_RATE_18) and set(result.labels.values()) == {0}
    blank = label_report("No pleural effusion. Small pericardial effusion.", CT, unmentioned=None)
    assert blank.labels["pleural effusion"] == 0 and blank.labels["pericardial effusion"] == 1
    assert blank.labels["emphysema"] is None
    assert set(blank.evidence) == {"pericardial effusion"}


def test_chexpert_no_finding_rule():
    assert label_report("Lungs are clear. Heart size is normal.", CHEXPERT).labels["No Finding"] == 1
    assert label_report("Right IJ catheter in place. Lungs are clear.", CHEXPERT).labels["No Finding"] == 1
    assert label_report("Possible small left pleural effusion.", CHEXPERT).labels["No Finding"] == 0


def test_lines_and_tubes():
    v = load_vocabulary("cxr_lines_tubes_10")
    labels = label_report("The endotracheal tube tip is in the right mainstem bronchus. Right IJ catheter tip in the SVC. "
                          "The nasogastric tube has been removed.", v).labels
    assert labels["endotracheal tube"] == 1 and labels["endotracheal tube malpositioned"] == 1
    assert labels["internal jugular central venous catheter"] == 1
    assert labels["internal jugular central venous catheter malpositioned"] == 0
    assert labels["nasogastric tube"] == 0


def test_synthetic_cohort_strict_macro_f1(tmp_path):
    from appliance.synthetic import generate_cohort

    summary = generate_cohort(tmp_path / "c", n_studies=60, seed=0, matrix=32, slices=8)
    reports = [json.loads(line) for line in summary.reports_path.read_text().splitlines()]
    truth = json.loads(summary.ground_truth_path.read_text())["studies"]
    pred = {str(i): label_report(r["text"], CT).labels for i, r in enumerate(reports)}
    gold = {str(i): s["labels"] for i, s in enumerate(truth)}
    strict = agreement(pred, gold, CT_RATE_18, "strict")
    assert strict.macro["f1"] >= 0.95, strict.to_dict()
    assert agreement(pred, gold, CT_RATE_18, "ignore_uncertain").macro["f1"] >= 0.95


# --- real report text: Open-I (Indiana University) chest X-ray reports inside the torchxrayvision wheel ------

def _openi_wheel() -> Path | None:
    """RFM_OPENI_WHEEL (a wheel file or a folder), else ~/.cache/rfm-appliance/wheels/torchxrayvision-*.whl."""
    env = os.environ.get("RFM_OPENI_WHEEL")
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rfm-appliance" / "wheels"
    for place in ([Path(env)] if env else []) + [cache]:
        if place.is_file():
            return place
        if place.is_dir():
            found = sorted(place.glob("torchxrayvision-*.whl"))
            if found:
                return found[-1]
    return None


def _openi_reports(wheel: Path) -> list[tuple[str, list[str]]]:
    """(report text, MeSH major terms) for every Open-I report; read in memory, never written out."""
    with zipfile.ZipFile(wheel) as z:
        blob = z.read("torchxrayvision/data/NLMCXR_reports.tgz")
    out = []
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        for member in tar.getmembers():
            if not member.isfile():
                continue
            xml = tar.extractfile(member).read().decode("utf-8")
            parts = {k: html.unescape(v) for k, v in re.findall(r'<AbstractText Label="(\w+)">(.*?)</AbstractText>', xml, re.S)}
            text = f"FINDINGS: {parts.get('FINDINGS', '')}\nIMPRESSION: {parts.get('IMPRESSION', '')}"
            out.append((text, [html.unescape(m) for m in re.findall(r"<major>(.*?)</major>", xml)]))
    return out


@pytest.fixture(scope="module")
def openi():
    wheel = _openi_wheel()
    if wheel is None:
        pytest.skip("Open-I reports need the torchxrayvision wheel: pip download --no-deps torchxrayvision "
                    "-d ~/.cache/rfm-appliance/wheels (or set RFM_OPENI_WHEEL to the .whl)")
    return _openi_reports(wheel)


def test_openi_real_reports(openi):
    assert len(openi) > 3900
    cxr = [label_report(text, CXR).labels for text, _ in openi]
    chexpert = [label_report(text, CHEXPERT).labels for text, _ in openi]
    n = len(openi)

    def prevalence(rows, finding):
        return Counter(r[finding] for r in rows)[1] / n

    # Open-I is mostly outpatient and about 40 % normal: plausible bands, not tuned values
    assert 0.04 < prevalence(cxr, "cardiomegaly") < 0.15
    assert 0.02 < prevalence(cxr, "pleural effusion") < 0.10
    assert prevalence(cxr, "pneumothorax") < 0.03
    assert 0.10 < prevalence(cxr, "opacity") < 0.45
    assert 0.40 < prevalence(chexpert, "No Finding") < 0.80
    # against the collection's own MeSH indexing, for findings indexed under one heading
    for finding, heading in (("cardiomegaly", "Cardiomegaly"), ("pleural effusion", "Pleural Effusion"),
                             ("pneumothorax", "Pneumothorax")):
        gold = [any(m.startswith(heading) for m in mesh) for _, mesh in openi]
        pred = [r[finding] == 1 for r in cxr]
        tp = sum(g and p for g, p in zip(gold, pred))
        assert tp / max(sum(pred), 1) > 0.75 and tp / max(sum(gold), 1) > 0.8, finding
