"""Free-text chest CT reports with known per-finding labels (1 present, 0 absent/unmentioned, -1 uncertain)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from appliance.labels.vocabularies import CT_RATE_18

# How often a finding that is absent from the image is explicitly negated (else mostly unmentioned).
_NEGATION_RATE = {
    "pleural effusion": 0.75, "lung nodule": 0.6, "cardiomegaly": 0.7, "pericardial effusion": 0.6,
    "lymphadenopathy": 0.65, "consolidation": 0.55, "emphysema": 0.35, "medical material": 0.2,
}
_DEFAULT_NEGATION_RATE = 0.15
POSITIVE_REPORT_RATE = 0.87  # a planted finding is reported positive, else hedged (uncertain)
FALSE_UNCERTAIN_RATE = 0.04  # an absent finding is occasionally hedged anyway


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _a(n: int) -> str:
    """Indefinite article for a number as spoken ("an 8 mm", "an 11 mm", "a 9 mm")."""
    return "an" if str(n).startswith("8") or n in (11, 18) else "a"


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _lobe_of(details: dict, key: str = "lobe") -> str:
    return details.get(key) or "right lower lobe"


def _positive(name: str, d: dict, rng) -> tuple[str, str]:
    """(findings sentence, impression phrase) for a planted finding."""
    if name == "lung nodule":
        nods = sorted(d.get("nodules", []), key=lambda n: -n["diameter_mm"]) or [{"diameter_mm": 8, "lobe": "right upper lobe"}]
        big = nods[0]
        size, lobe = int(big["diameter_mm"]), big["lobe"]
        if len(nods) > 1:
            s = _pick(rng, [f"Multiple pulmonary nodules, the largest measuring {size} mm in the {lobe}.",
                            f"{len(nods)} solid pulmonary nodules are present; the largest is {size} mm in the {lobe}."])
            return s, f"Multiple pulmonary nodules, largest {size} mm in the {lobe}."
        s = _pick(rng, [f"{_cap(_a(size))} {size} mm solid nodule in the {lobe}.", f"There is {_a(size)} {size} mm pulmonary nodule in the {lobe}.",
                        f"{_cap(lobe)} nodule measuring {size} mm."])
        follow = " Recommend follow-up CT per Fleischner Society guidelines." if size < 15 else " Consider PET-CT or tissue sampling."
        return s, f"{size} mm {lobe} pulmonary nodule.{follow}"
    if name == "pleural effusion":
        sev, side = d.get("severity", "small"), d.get("side", "right")
        if side == "bilateral":
            s = _pick(rng, [f"{_cap(sev)} bilateral pleural effusions.", f"There are {sev} bilateral pleural effusions."])
            return s, f"{_cap(sev)} bilateral pleural effusions."
        s = _pick(rng, [f"{_cap(sev)} {side} pleural effusion.", f"There is a {sev} {side} pleural effusion.",
                        f"{_cap(sev)} {side}-sided pleural effusion with adjacent compressive changes."])
        return s, f"{_cap(sev)} {side} pleural effusion."
    if name == "cardiomegaly":
        s = _pick(rng, ["The heart is enlarged.", "Cardiomegaly.", "Moderate cardiomegaly.", "The cardiac silhouette is enlarged."])
        return s, "Cardiomegaly."
    if name == "pericardial effusion":
        size = d.get("size", "small")
        return _pick(rng, [f"{_cap(size)} pericardial effusion.", f"There is a {size} pericardial effusion."]), f"{_cap(size)} pericardial effusion."
    if name == "emphysema":
        sev = d.get("severity", "mild")
        s = _pick(rng, [f"{_cap(sev)} centrilobular emphysema, upper lobe predominant.",
                        f"{_cap(sev)} emphysematous changes in both upper lobes."])
        if d.get("bullae"):
            s += " Apical bullae are noted."
        return s, f"{_cap(sev)} emphysema."
    if name == "consolidation":
        lobe = _lobe_of(d)
        s = _pick(rng, [f"Consolidation in the {lobe} with air bronchograms.",
                        f"Airspace consolidation in the {lobe}, consistent with pneumonia in the appropriate clinical setting.",
                        f"Dense consolidation of the {lobe}."])
        return s, f"{_cap(lobe)} consolidation, likely pneumonia."
    if name == "atelectasis":
        if d.get("type") == "dependent":
            if d.get("side") in ("left", "right"):
                return f"Dependent atelectasis at the {d['side']} lung base.", f"{_cap(d['side'])} basilar atelectasis."
            s = _pick(rng, ["Dependent atelectasis at the lung bases.", "Bibasilar dependent atelectasis."])
            return s, "Bibasilar atelectasis."
        lobe = _lobe_of(d)
        return _pick(rng, [f"Linear atelectasis in the {lobe}.", f"Subsegmental atelectasis in the {lobe}."]), f"{_cap(lobe)} subsegmental atelectasis."
    if name == "lung opacity":
        lobes = sorted({p["lobe"] for p in d.get("patches", [])}) or ["right upper lobe"]
        where = " and ".join(lobes)
        s = _pick(rng, [f"Patchy ground-glass opacity in the {where}.", f"Ground-glass opacities in the {where}.",
                        f"Hazy ground-glass opacity involving the {where}."])
        return s, f"Ground-glass opacity in the {where}, likely infectious or inflammatory."
    if name == "arterial wall calcification":
        s = _pick(rng, ["Atherosclerotic calcifications of the thoracic aorta.", "Calcified atherosclerotic plaque in the aortic arch and descending aorta.",
                        "Aortic wall calcifications are present."])
        return s, "Aortic atherosclerosis."
    if name == "coronary artery wall calcification":
        vessels = ", ".join(d.get("vessels", ["LAD"]))
        s = _pick(rng, [f"Coronary artery calcifications ({vessels}).", f"Calcified plaque in the coronary arteries, involving the {vessels}.",
                        "Coronary artery wall calcifications are seen."])
        return s, "Coronary artery calcification."
    if name == "medical material":
        kind = d.get("type", "pacemaker")
        if kind == "pacemaker":
            s = f"A {d.get('side', 'left')}-sided pacemaker with leads terminating in the right atrium and right ventricle."
            return s, "Pacemaker in place."
        if kind == "central venous catheter":
            s = f"A {d.get('side', 'right')} internal jugular central venous catheter with the tip at the cavoatrial junction."
            return s, "Central venous catheter in satisfactory position."
        return _pick(rng, ["Median sternotomy wires are present.", "Sternotomy wires are intact."]), "Post-sternotomy changes."
    if name == "hiatal hernia":
        size = d.get("size", "small")
        return _pick(rng, [f"{_cap(size)} hiatal hernia.", f"A {size} hiatus hernia is present."]), f"{_cap(size)} hiatal hernia."
    if name == "lymphadenopathy":
        nodes = d.get("nodes") or [{"station": "subcarinal", "short_axis_mm": 14}]
        big = max(nodes, key=lambda n: n["short_axis_mm"])
        s = _pick(rng, [f"Enlarged {big['station']} lymph node measuring {big['short_axis_mm']} mm in short axis.",
                        f"Mediastinal and hilar lymphadenopathy, the largest {big['station']} node measuring {big['short_axis_mm']} mm."])
        return s, "Mediastinal lymphadenopathy."
    if name == "pulmonary fibrotic sequela":
        return _pick(rng, ["Subpleural reticulation and fibrotic changes at the lung bases.", "Fibrotic sequelae in both lower lobes."]), "Basilar fibrotic changes."
    if name == "mosaic attenuation pattern":
        return _pick(rng, ["Mosaic attenuation of the lungs.", "There is a mosaic attenuation pattern."]), "Mosaic attenuation."
    if name == "peribronchial thickening":
        return _pick(rng, ["Peribronchial thickening.", "Bronchial wall thickening of the central airways."]), "Peribronchial thickening."
    if name == "bronchiectasis":
        lobes = " and ".join(d.get("lobes") or ["lower lobes"])
        return f"Cylindrical bronchiectasis in the {lobes}.", "Bronchiectasis."
    if name == "interlobular septal thickening":
        return _pick(rng, ["Interlobular septal thickening in the lung periphery.", "Smooth interlobular septal thickening."]), "Interlobular septal thickening."
    raise KeyError(name)


_UNCERTAIN = {
    "lung nodule": (["Cannot exclude a small nodule in the {lobe}.", "A questionable 4 mm nodule in the {lobe}.",
                     "Tiny focus in the {lobe}, possibly a small nodule."], "Possible small {lobe} nodule."),
    "pleural effusion": (["Possible trace {side} pleural effusion.", "Questionable small pleural effusion."], "Possible trace pleural effusion."),
    "cardiomegaly": (["Heart size is at the upper limits of normal, possibly mildly enlarged.", "Borderline cardiomegaly."], "Borderline cardiomegaly."),
    "pericardial effusion": (["Possible trace pericardial effusion.", "Questionable small pericardial effusion."], "Possible trace pericardial effusion."),
    "emphysema": (["Possible mild emphysema.", "Questionable early emphysematous change."], "Possible mild emphysema."),
    "consolidation": (["Possible early consolidation in the {lobe}.", "Consolidation in the {lobe} cannot be excluded."], "Possible early consolidation."),
    "atelectasis": (["Minimal basilar changes, which may represent atelectasis.", "Possible subsegmental atelectasis in the {lobe}."], "Possible atelectasis."),
    "lung opacity": (["Questionable faint ground-glass opacity in the {lobe}.", "Possible subtle ground-glass opacity in the {lobe}."], "Possible subtle ground-glass opacity."),
    "arterial wall calcification": (["Possible minimal aortic wall calcification."], "Possible minimal aortic calcification."),
    "coronary artery wall calcification": (["Questionable coronary artery calcification.", "Possible minimal coronary artery calcification."], "Possible coronary calcification."),
    "medical material": (["A linear density along the superior vena cava, possibly a retained catheter fragment."], "Possible retained catheter fragment."),
    "hiatal hernia": (["Possible small hiatal hernia.", "Questionable small hiatus hernia."], "Possible small hiatal hernia."),
    "lymphadenopathy": (["Borderline enlarged subcarinal lymph node, possibly reactive lymphadenopathy."], "Possible mild lymphadenopathy."),
    "pulmonary fibrotic sequela": (["Possible early fibrotic change at the lung bases."], "Possible early fibrosis."),
    "mosaic attenuation pattern": (["Questionable mosaic attenuation."], "Possible mosaic attenuation."),
    "peribronchial thickening": (["Possible mild peribronchial thickening."], "Possible peribronchial thickening."),
    "bronchiectasis": (["Possible mild bronchiectasis in the {lobe}."], "Possible mild bronchiectasis."),
    "interlobular septal thickening": (["Questionable mild interlobular septal thickening."], "Possible septal thickening."),
}

_NEGATED = {
    "lung nodule": ["No pulmonary nodules.", "No suspicious pulmonary nodule or mass.", "No lung nodules are identified."],
    "pleural effusion": ["No pleural effusion.", "No pleural effusion or pneumothorax.", "There is no pleural effusion."],
    "cardiomegaly": ["Heart size is normal.", "Normal heart size.", "No cardiomegaly."],
    "pericardial effusion": ["No pericardial effusion.", "There is no pericardial effusion."],
    "emphysema": ["No emphysema.", "No evidence of emphysema."],
    "consolidation": ["No consolidation.", "No focal consolidation.", "The lungs are clear without evidence of consolidation."],
    "atelectasis": ["No atelectasis."],
    "lung opacity": ["No ground-glass opacity.", "No focal opacity."],
    "arterial wall calcification": ["No aortic wall calcification."],
    "coronary artery wall calcification": ["No coronary artery calcification."],
    "medical material": ["No lines or tubes.", "No support devices are present."],
    "hiatal hernia": ["No hiatal hernia."],
    "lymphadenopathy": ["No mediastinal or hilar lymphadenopathy.", "No enlarged lymph nodes."],
    "pulmonary fibrotic sequela": ["No fibrotic changes."],
    "mosaic attenuation pattern": ["No mosaic attenuation."],
    "peribronchial thickening": ["No bronchial wall thickening."],
    "bronchiectasis": ["No bronchiectasis."],
    "interlobular septal thickening": ["No interlobular septal thickening."],
}

_SECTION = {
    "medical material": "devices",
    "lung nodule": "lungs", "emphysema": "lungs", "consolidation": "lungs", "atelectasis": "lungs", "lung opacity": "lungs",
    "pulmonary fibrotic sequela": "lungs", "mosaic attenuation pattern": "lungs", "peribronchial thickening": "lungs",
    "bronchiectasis": "lungs", "interlobular septal thickening": "lungs",
    "pleural effusion": "pleura",
    "cardiomegaly": "heart", "pericardial effusion": "heart", "arterial wall calcification": "heart",
    "coronary artery wall calcification": "heart",
    "lymphadenopathy": "mediastinum", "hiatal hernia": "mediastinum",
}
_SECTION_TITLES = {"devices": "Lines/tubes", "lungs": "Lungs and airways", "pleura": "Pleura", "heart": "Heart and vessels",
                   "mediastinum": "Mediastinum", "other": "Other"}
_FILLER = {
    "lungs": ["The trachea and central airways are patent.", "No pneumothorax."],
    "heart": ["The main pulmonary artery is normal in caliber."],
    "mediastinum": ["The thyroid gland is unremarkable."],
    "other": ["Visualized upper abdomen is unremarkable.", "Mild degenerative changes of the thoracic spine.",
              "No acute osseous abnormality."],
}
_INDICATIONS = ["cough", "shortness of breath", "follow-up of pulmonary nodule", "chest pain", "fever", "weight loss",
                "smoking history, lung cancer screening", "dyspnea on exertion"]


@dataclass
class ReportContext:
    """Who and when, as written in the report (every string here is PHI)."""

    patient_first: str
    patient_last: str
    mrn: str
    accession: str
    age: int
    sex: str  # "M" | "F"
    exam_date: str  # as written, e.g. 03/14/2024
    prior_date: str | None
    radiologist: str  # "Jane Roe"
    discussed_with: str  # "John Smith"
    contrast: bool
    phi: list[str] = field(default_factory=list)


def write_report(rng: np.random.Generator, planted: dict[str, dict], ctx: ReportContext,
                 clinical_status: str | None = None) -> tuple[str, dict[str, int]]:
    """Report text and its labels for every CT-RATE finding; PHI strings used are appended to ctx.phi.

    `clinical_status` (a sentence) ends the impression: what the referring team said about the
    patient, which the images do not show (the cohort's prognostic outcome depends on it)."""
    statements: dict[str, list[str]] = {k: [] for k in _SECTION_TITLES}
    impression: list[str] = []
    labels: dict[str, int] = {}
    negated: list[str] = []
    for name in CT_RATE_18:
        section = _SECTION[name]
        if name in planted:
            if rng.random() < POSITIVE_REPORT_RATE:
                sentence, short = _positive(name, planted[name], rng)
                labels[name] = 1
            else:
                sentence, short = _uncertain(name, planted[name], rng)
                labels[name] = -1
            statements[section].append(sentence)
            impression.append(short)
        elif rng.random() < FALSE_UNCERTAIN_RATE:
            sentence, short = _uncertain(name, {}, rng)
            labels[name] = -1
            statements[section].append(sentence)
            if rng.random() < 0.5:
                impression.append(short)
        elif rng.random() < _NEGATION_RATE.get(name, _DEFAULT_NEGATION_RATE):
            labels[name] = 0
            negated.append(name)
        else:
            labels[name] = 0
    if "pleural effusion" in negated and "pericardial effusion" in negated and rng.random() < 0.5:
        statements["pleura"].append("No pleural or pericardial effusion.")
        negated = [n for n in negated if n not in ("pleural effusion", "pericardial effusion")]
    for name in negated:
        statements[_SECTION[name]].append(_pick(rng, _NEGATED[name]))
    for section, lines in _FILLER.items():
        for line in lines:
            if rng.random() < 0.5:
                statements[section].append(line)

    use_headings = rng.random() < 0.5
    paragraphs = []
    for section, title in _SECTION_TITLES.items():
        lines = statements[section]
        if not lines:
            continue
        order = rng.permutation(len(lines))
        body = " ".join(lines[i] for i in order)
        paragraphs.append(f"{title}: {body}" if use_headings else body)

    head = []
    if rng.random() < 0.6:
        name = f"{ctx.patient_first} {ctx.patient_last}"
        head.append(f"Patient: {name}   MRN: {ctx.mrn}")
        ctx.phi += [name, ctx.mrn]
    if rng.random() < 0.4:
        head.append(f"Accession: {ctx.accession}")
        ctx.phi.append(ctx.accession)
    head.append(f"EXAM: CT chest {'with' if ctx.contrast else 'without'} contrast, {ctx.exam_date}")
    ctx.phi.append(ctx.exam_date)
    sex = {"M": "man", "F": "woman"}.get(ctx.sex, "patient")
    head.append(f"CLINICAL HISTORY: {ctx.age}-year-old {sex} with {_pick(rng, _INDICATIONS)}.")
    if ctx.prior_date:
        head.append(f"COMPARISON: CT chest dated {ctx.prior_date}.")
        ctx.phi.append(ctx.prior_date)
    else:
        head.append("COMPARISON: None.")
    head.append("TECHNIQUE: Axial CT images of the chest were obtained"
                + (" after intravenous contrast." if ctx.contrast else " without intravenous contrast."))

    if impression:
        order = list(rng.permutation(len(impression)))
        imp = "\n".join(f"{n + 1}. {impression[i]}" for n, i in enumerate(order))
    else:
        imp = _pick(rng, ["No acute cardiopulmonary abnormality.", "Normal CT of the chest."])
    if clinical_status:
        imp += f"\n{clinical_status}"
    tail = []
    if any(v == 1 for v in labels.values()) and rng.random() < 0.5:
        tail.append(f"Findings discussed with Dr. {ctx.discussed_with} by telephone on {ctx.exam_date}.")
        ctx.phi.append(ctx.discussed_with)
    if rng.random() < 0.7:
        tail.append(f"Electronically signed by {ctx.radiologist}, MD on {ctx.exam_date}.")
        ctx.phi.append(ctx.radiologist)
    text = "\n".join(head) + "\n\nFINDINGS: " + "\n".join(paragraphs) + "\n\nIMPRESSION:\n" + imp
    if tail:
        text += "\n\n" + "\n".join(tail)
    return text, labels


def _uncertain(name: str, d: dict, rng) -> tuple[str, str]:
    options, short = _UNCERTAIN[name]
    lobe = d.get("lobe") or _pick(rng, ["right upper lobe", "right lower lobe", "left upper lobe", "left lower lobe"])
    if name == "lung nodule" and d.get("nodules"):
        lobe = d["nodules"][0]["lobe"]
    side = d.get("side") if d.get("side") in ("left", "right") else _pick(rng, ["right", "left"])
    return _pick(rng, options).format(lobe=lobe, side=side), short.format(lobe=lobe)
