"""Free-text chest radiograph reports with known labels for the 19 findings and the 10 lines and tubes.

Labels follow the CT writer's convention (1 present, 0 absent or unmentioned, -1 uncertain) over the
composite vocabulary `cxr_19+cxr_lines_tubes_10`: each device is "<device>" and "<device> malpositioned".
Each sentence names only its own finding (a test runs the rules labeller over every template), so the
labels here are what a careful reader of the report would extract.
"""

from __future__ import annotations

import numpy as np

from appliance.synthetic.reports import FALSE_UNCERTAIN_RATE, POSITIVE_REPORT_RATE, ReportContext, _cap, _pick

CXR_FINDINGS: tuple[str, ...] = (
    "hyperinflation", "interstitial lung disease pattern", "atelectasis", "costophrenic angle blunting",
    "pleural effusion", "pneumothorax", "adenopathy", "enlarged pulmonary artery", "arterial calcification",
    "osseous abnormalities", "rib fracture", "bronchial wall thickening", "hernia", "subcutaneous air/emphysema",
    "opacity", "vascular congestion", "cardiomegaly", "diaphragm elevation", "pulmonary edema",
)
DEVICES: tuple[str, ...] = (
    "internal jugular central venous catheter", "peripherally inserted central catheter",
    "subclavian central venous catheter or port", "endotracheal tube", "tracheostomy tube", "nasogastric tube",
    "swan-ganz catheter", "chest tube", "mediastinal drain", "intra-aortic balloon pump",
)
DEVICE_LABELS: tuple[str, ...] = tuple(x for d in DEVICES for x in (d, f"{d} malpositioned"))
ALL_LABELS: tuple[str, ...] = CXR_FINDINGS + DEVICE_LABELS

_NEGATION_RATE = {
    "pleural effusion": 0.7, "pneumothorax": 0.6, "cardiomegaly": 0.6, "opacity": 0.6, "pulmonary edema": 0.35,
    "vascular congestion": 0.2, "costophrenic angle blunting": 0.2, "osseous abnormalities": 0.3, "rib fracture": 0.1,
    "adenopathy": 0.1, "subcutaneous air/emphysema": 0.08,
}
_DEFAULT_NEGATION_RATE = 0.03

_SECTION = {
    "hyperinflation": "lungs", "interstitial lung disease pattern": "lungs", "atelectasis": "lungs", "opacity": "lungs",
    "pulmonary edema": "lungs", "vascular congestion": "lungs", "bronchial wall thickening": "lungs",
    "costophrenic angle blunting": "pleura", "pleural effusion": "pleura", "pneumothorax": "pleura",
    "cardiomegaly": "heart", "enlarged pulmonary artery": "heart", "adenopathy": "heart", "arterial calcification": "heart",
    "hernia": "heart", "osseous abnormalities": "bones", "rib fracture": "bones", "subcutaneous air/emphysema": "bones",
    "diaphragm elevation": "bones",
}
_SECTION_TITLES = {"devices": "Lines/tubes", "lungs": "Lungs", "pleura": "Pleura", "heart": "Heart and mediastinum",
                   "bones": "Bones and soft tissues"}
_FILLER = {
    "lungs": ["The trachea is midline."],
    "heart": ["Mediastinal contours are within normal limits."],
    "bones": ["Visualized upper abdomen is unremarkable."],
}
_INDICATIONS = {
    "outpatient": ["cough", "shortness of breath", "chest pain", "pre-operative evaluation", "follow-up", "fever",
                   "dyspnea on exertion"],
    "inpatient": ["fever", "hypoxia", "shortness of breath", "line placement", "cough", "chest pain"],
    "icu": ["respiratory failure", "line placement", "post-operative", "hypoxia", "tube position", "sepsis"],
}
_ORDINAL = {1: "1st", 2: "2nd", 3: "3rd"}
_SHORT = {  # short names of devices as radiologists write them
    "internal jugular central venous catheter": "internal jugular central venous catheter",
    "peripherally inserted central catheter": "PICC",
    "subclavian central venous catheter or port": "subclavian central venous catheter",
    "endotracheal tube": "endotracheal tube", "tracheostomy tube": "tracheostomy tube",
    "nasogastric tube": "nasogastric tube", "swan-ganz catheter": "Swan-Ganz catheter", "chest tube": "chest tube",
    "mediastinal drain": "mediastinal drain", "intra-aortic balloon pump": "intra-aortic balloon pump",
}


def _ord(n: int) -> str:
    return _ORDINAL.get(n, f"{n}th")


def _side_of(d: dict, default: str = "right") -> str:
    return d.get("side") or default


def _positive(name: str, d: dict, rng) -> tuple[str, str, set[str]]:
    """(findings sentence, impression phrase, other findings the sentence states as present)."""
    if name == "cardiomegaly":
        sev = d.get("severity", "moderate")
        s = _pick(rng, ["The heart is enlarged.", "Cardiomegaly.", f"{_cap(sev)} cardiomegaly.",
                        "The cardiac silhouette is enlarged."])
        return s, f"{_cap(sev)} cardiomegaly.", set()
    if name == "pleural effusion":
        sev, side = d.get("severity", "small"), _side_of(d)
        if side == "bilateral":
            s = _pick(rng, [f"{_cap(sev)} bilateral pleural effusions.", f"There are {sev} bilateral pleural effusions."])
            return s, f"{_cap(sev)} bilateral pleural effusions.", set()
        if rng.random() < 0.35:
            return (f"{_cap(sev)} {side} pleural effusion with blunting of the {side} costophrenic angle.",
                    f"{_cap(sev)} {side} pleural effusion.", {"costophrenic angle blunting"})
        s = _pick(rng, [f"{_cap(sev)} {side} pleural effusion.", f"There is a {sev} {side} pleural effusion.",
                        f"{_cap(sev)} {side}-sided pleural effusion."])
        return s, f"{_cap(sev)} {side} pleural effusion.", set()
    if name == "costophrenic angle blunting":
        side = _side_of(d)
        if side == "bilateral":
            return "Blunting of the bilateral costophrenic angles.", "Blunted costophrenic angles.", set()
        s = _pick(rng, [f"Blunting of the {side} costophrenic angle.", f"Mild blunting of the {side} costophrenic angle.",
                        f"The {side} costophrenic angle is blunted."])
        return s, f"Blunting of the {side} costophrenic angle.", set()
    if name == "pneumothorax":
        side, size = _side_of(d), d.get("size", "small")
        s = _pick(rng, [f"{_cap(size)} {side} apical pneumothorax.",
                        f"There is a {size} {side} pneumothorax with a visible visceral pleural line.",
                        f"{_cap(size)} {side}-sided pneumothorax."])
        return s, f"{_cap(size)} {side} pneumothorax.", set()
    if name == "opacity":
        lobe, kind = d.get("lobe", "right lower lobe"), d.get("kind", "consolidation")
        if kind == "nodule":
            size = int(d.get("size_mm", 15))
            s = _pick(rng, [f"A {size} mm nodule in the {lobe}.", f"Rounded {size} mm nodular opacity in the {lobe}."])
            return s, f"{_cap(lobe)} nodule, CT recommended for further evaluation.", set()
        s = _pick(rng, [f"Focal consolidation in the {lobe}.", f"Patchy airspace opacity in the {lobe}.",
                        f"Airspace consolidation in the {lobe} with air bronchograms."])
        return s, f"{_cap(lobe)} airspace opacity, compatible with pneumonia in the appropriate clinical setting.", set()
    if name == "atelectasis":
        side = _side_of(d, "bilateral")
        if side == "bilateral":
            s = _pick(rng, ["Bibasilar subsegmental atelectasis.", "Linear atelectasis at both lung bases."])
            return s, "Bibasilar atelectasis.", set()
        s = _pick(rng, [f"Linear atelectasis at the {side} lung base.", f"Plate-like atelectasis in the {side} lower zone."])
        return s, f"{_cap(side)} basilar atelectasis.", set()
    if name == "pulmonary edema":
        sev = d.get("severity", "moderate")
        s = _pick(rng, [f"{_cap(sev)} pulmonary edema.", f"{_cap(sev)} interstitial pulmonary edema with Kerley B lines.",
                        "Perihilar haziness and Kerley B lines consistent with pulmonary edema."])
        return s, f"{_cap(sev)} pulmonary edema.", set()
    if name == "vascular congestion":
        s = _pick(rng, ["Pulmonary vascular congestion.", "Cephalization of the pulmonary vasculature.",
                        "There is pulmonary vascular congestion."])
        return s, "Pulmonary vascular congestion.", set()
    if name == "hyperinflation":
        s = _pick(rng, ["The lungs are hyperinflated with flattening of the hemidiaphragms.",
                        "Hyperinflated lungs, consistent with COPD.", "Hyperinflation with flattened hemidiaphragms."])
        return s, "Hyperinflation, consistent with COPD.", set()
    if name == "interstitial lung disease pattern":
        s = _pick(rng, ["Coarse reticular opacities at both lung bases, compatible with interstitial lung disease.",
                        "Increased interstitial markings at the lung bases.", "Basilar predominant reticular pattern."])
        return s, "Basilar interstitial lung disease pattern.", set()
    if name == "bronchial wall thickening":
        s = _pick(rng, ["Peribronchial cuffing.", "Bronchial wall thickening in the perihilar regions."])
        return s, "Bronchial wall thickening.", set()
    if name == "adenopathy":
        s = _pick(rng, ["Bilateral hilar adenopathy.", "Lobulated hilar lymphadenopathy, right greater than left."])
        return s, "Hilar adenopathy.", set()
    if name == "enlarged pulmonary artery":
        s = _pick(rng, ["The main pulmonary artery is enlarged.", "Enlarged central pulmonary arteries.",
                        "Prominent pulmonary arteries."])
        return s, "Enlarged pulmonary arteries.", set()
    if name == "arterial calcification":
        s = _pick(rng, ["Aortic knob calcification.", "Atherosclerotic calcification of the aortic arch.",
                        "Calcified aortic knob."])
        return s, "Aortic atherosclerosis.", set()
    if name == "hernia":
        s = _pick(rng, ["Retrocardiac air-fluid level consistent with a hiatal hernia.", "Moderate hiatal hernia."])
        return s, "Hiatal hernia.", set()
    if name == "subcutaneous air/emphysema":
        side = _side_of(d)
        s = _pick(rng, [f"Subcutaneous emphysema along the {side} chest wall.",
                        f"Subcutaneous air in the {side} lateral chest wall."])
        return s, f"{_cap(side)} chest wall subcutaneous emphysema.", set()
    if name == "osseous abnormalities":
        s = _pick(rng, ["Scoliosis of the thoracic spine.", "Mild dextroscoliosis of the thoracic spine.",
                        "S-shaped scoliosis of the thoracic spine."])
        return s, "Thoracic scoliosis.", set()
    if name == "rib fracture":
        side, rib = _side_of(d), int(d.get("rib", 6))
        if d.get("healing"):
            return (f"Healing fracture of the {side} {_ord(rib)} posterior rib.", f"Healing {side} {_ord(rib)} rib fracture.",
                    set())
        s = _pick(rng, [f"Acute fracture of the {side} {_ord(rib)} posterior rib.",
                        f"Displaced fracture of the {side} {_ord(rib)} rib."])
        return s, f"Acute {side} {_ord(rib)} rib fracture.", set()
    if name == "diaphragm elevation":
        side = _side_of(d)
        s = _pick(rng, [f"Elevation of the {side} hemidiaphragm.", f"The {side} hemidiaphragm is elevated."])
        return s, f"Elevated {side} hemidiaphragm.", set()
    raise KeyError(name)


_UNCERTAIN = {
    "cardiomegaly": (["Borderline cardiomegaly.", "The heart is possibly mildly enlarged."], "Borderline heart size."),
    "pleural effusion": (["Possible small {side} pleural effusion.", "A small {side} pleural effusion cannot be excluded."],
                         "Possible small pleural effusion."),
    "costophrenic angle blunting": (["Possible mild blunting of the {side} costophrenic angle."], "Possible costophrenic blunting."),
    "pneumothorax": (["Questionable tiny {side} apical pneumothorax.", "Possible small {side} pneumothorax."],
                     "Possible small pneumothorax, follow-up radiograph suggested."),
    "opacity": (["Possible subtle opacity in the {lobe}.", "Questionable faint opacity in the {lobe}."],
                "Possible subtle {lobe} opacity."),
    "atelectasis": (["Possible subsegmental atelectasis at the {side} base."], "Possible basilar atelectasis."),
    "pulmonary edema": (["Possible mild interstitial edema."], "Possible mild pulmonary edema."),
    "vascular congestion": (["Questionable mild vascular congestion."], "Possible mild vascular congestion."),
    "hyperinflation": (["Possible mild hyperinflation."], "Possible hyperinflation."),
    "interstitial lung disease pattern": (["Possible mild interstitial prominence at the bases."],
                                          "Possible interstitial prominence."),
    "bronchial wall thickening": (["Possible mild peribronchial cuffing."], "Possible bronchial wall thickening."),
    "adenopathy": (["Questionable {side} hilar adenopathy."], "Possible hilar adenopathy."),
    "enlarged pulmonary artery": (["The pulmonary arteries are possibly enlarged."], "Possible pulmonary artery enlargement."),
    "arterial calcification": (["Possible aortic knob calcification."], "Possible aortic calcification."),
    "hernia": (["Possible small hiatal hernia."], "Possible small hiatal hernia."),
    "subcutaneous air/emphysema": (["Possible trace subcutaneous air in the {side} chest wall."],
                                   "Possible trace subcutaneous air."),
    "osseous abnormalities": (["Possible mild scoliosis."], "Possible mild scoliosis."),
    "rib fracture": (["Possible nondisplaced fracture of the {side} {rib} rib."], "Possible {side} rib fracture."),
    "diaphragm elevation": (["Possible mild elevation of the {side} hemidiaphragm."], "Possible hemidiaphragm elevation."),
}

_NEGATED = {
    "pleural effusion": ["No pleural effusion.", "There is no pleural effusion."],
    "pneumothorax": ["No pneumothorax.", "There is no pneumothorax."],
    "cardiomegaly": ["Heart size is normal.", "Normal heart size.", "The cardiac silhouette is normal in size."],
    "opacity": ["No focal consolidation.", "The lungs are clear.", "No focal airspace opacity."],
    "pulmonary edema": ["No pulmonary edema."],
    "vascular congestion": ["No vascular congestion.", "Pulmonary vasculature is normal."],
    "costophrenic angle blunting": ["The costophrenic angles are sharp."],
    "osseous abnormalities": ["No acute osseous abnormality."],
    "rib fracture": ["No displaced rib fracture."],
    "adenopathy": ["No hilar adenopathy."],
    "subcutaneous air/emphysema": ["No subcutaneous emphysema."],
    "atelectasis": ["No atelectasis."],
    "hyperinflation": ["No hyperinflation."],
    "interstitial lung disease pattern": ["No interstitial lung disease pattern."],
    "bronchial wall thickening": ["No bronchial wall thickening."],
    "enlarged pulmonary artery": ["No enlarged pulmonary artery."],
    "arterial calcification": ["No aortic calcification."],
    "hernia": ["No hiatal hernia."],
    "diaphragm elevation": ["No elevated hemidiaphragm."],
}


def _uncertain(name: str, d: dict, rng) -> tuple[str, str]:
    options, short = _UNCERTAIN[name]
    side = d.get("side") if d.get("side") in ("left", "right") else _pick(rng, ["right", "left"])
    lobe = d.get("lobe") or _pick(rng, ["right lower lobe", "left lower lobe", "right upper lobe", "left upper lobe"])
    rib = _ord(int(d.get("rib", 6)))
    return _pick(rng, options).format(side=side, lobe=lobe, rib=rib), short.format(side=side, lobe=lobe)


# --- lines and tubes -----------------------------------------------------------------------------------

def device_sentence(name: str, d: dict, rng) -> tuple[str, str | None]:
    """(findings sentence, impression phrase when the placement needs action) for a device in the image."""
    side = d.get("side", "right")
    bad = d.get("placement") == "malpositioned"
    how = d.get("malposition", "")
    if name == "endotracheal tube":
        if not bad:
            cm = d.get("tip_above_carina_cm", 4)
            return _pick(rng, [f"Endotracheal tube tip {cm} cm above the carina.",
                               f"The endotracheal tube terminates {cm} cm above the carina.",
                               f"ETT in satisfactory position, {cm} cm above the carina."]), None
        if how == "right mainstem":
            return ("The endotracheal tube tip is in the right main bronchus; recommend withdrawal by 3 cm.",
                    "Endotracheal tube in the right main bronchus, should be withdrawn by 3 cm.")
        return ("The endotracheal tube tip is at the thoracic inlet and should be advanced.",
                "Endotracheal tube too high, should be advanced.")
    if name == "tracheostomy tube":
        if not bad:
            return _pick(rng, ["Tracheostomy tube in standard position.", "Tracheostomy tube tip projects over the mid trachea."]), None
        return "The tracheostomy tube tip is too low, near the carina.", "Tracheostomy tube too low."
    if name == "nasogastric tube":
        short = _pick(rng, ["nasogastric tube", "enteric tube", "NG tube"])
        if not bad:
            return _pick(rng, [f"The {short} courses below the diaphragm with the tip in the stomach.",
                               f"{_cap(short)} tip in the stomach."]), None
        if how == "distal esophagus":
            return (f"The {short} tip is in the distal esophagus and should be advanced.",
                    f"{_cap(short)} tip in the distal esophagus, should be advanced.")
        if how == "coiled in the esophagus":
            return f"The {short} is coiled in the esophagus.", f"{_cap(short)} coiled in the esophagus, repositioning is recommended."
        return (f"The {short} courses into the right mainstem bronchus with the tip in the right lower lobe.",
                f"{_cap(short)} in the right lower lobe, remove and replace.")
    if name == "internal jugular central venous catheter":
        if not bad:
            return _pick(rng, [f"{_cap(side)} internal jugular central venous catheter with the tip at the cavoatrial junction.",
                               f"{_cap(side)} IJ central line terminates in the low SVC."]), None
        if how == "into the subclavian":
            return (f"The {side} internal jugular catheter courses into the subclavian vein.",
                    f"The {side} internal jugular catheter is malpositioned.")
        return (f"The {side} internal jugular catheter tip is in the right ventricle; recommend retraction.",
                f"{_cap(side)} internal jugular catheter too deep, in the right ventricle.")
    if name == "peripherally inserted central catheter":
        if not bad:
            return _pick(rng, [f"{_cap(side)} arm PICC with the tip at the cavoatrial junction.",
                               f"{_cap(side)} PICC terminates in the lower SVC."]), None
        if how == "into the internal jugular":
            return (f"The {side} PICC is directed cephalad into the internal jugular vein.",
                    "PICC directed cephalad, repositioning is recommended.")
        return (f"The {side} PICC tip is too deep, in the right atrium.", "PICC too deep, should be retracted by 3 cm.")
    if name == "subclavian central venous catheter or port":
        if d.get("port"):
            if not bad:
                return f"{_cap(side)} chest wall port with the catheter tip at the cavoatrial junction.", None
            return (f"The {side} chest port catheter is directed cephalad, with the tip in the neck.",
                    "Chest port catheter directed cephalad, repositioning is recommended.")
        if not bad:
            return f"{_cap(side)} subclavian central venous catheter with the tip at the cavoatrial junction.", None
        return (f"The {side} subclavian catheter is directed cephalad, with the tip in the neck.",
                "Subclavian catheter directed cephalad, repositioning is recommended.")
    if name == "swan-ganz catheter":
        if not bad:
            return _pick(rng, ["Swan-Ganz catheter tip in the right main pulmonary artery.",
                               "Pulmonary artery catheter with the tip in the proximal right pulmonary artery."]), None
        return ("The Swan-Ganz catheter tip is too distal, in the right lower lobe pulmonary artery.",
                "Swan-Ganz catheter too distal, should be retracted.")
    if name == "chest tube":
        if not bad:
            return _pick(rng, [f"{_cap(side)} chest tube with the tip at the apex.",
                               f"{_cap(side)}-sided chest tube in place, tip directed toward the apex."]), None
        return (f"The {side} chest tube is in the soft tissues of the chest wall.",
                f"{_cap(side)} chest tube in the soft tissues, repositioning is recommended.")
    if name == "mediastinal drain":
        if not bad:
            return _pick(rng, ["Mediastinal drain in place.", "Mediastinal drain projects over the heart."]), None
        return "The mediastinal drain is kinked.", "Kinked mediastinal drain."
    if name == "intra-aortic balloon pump":
        if not bad:
            return "Intra-aortic balloon pump with the radiopaque tip in the proximal descending thoracic aorta.", None
        if how == "in the aortic arch":
            return ("The intra-aortic balloon pump tip projects in the aortic arch; retraction is recommended.",
                    "Intra-aortic balloon pump too high, in the aortic arch.")
        return ("The intra-aortic balloon pump tip is too low and should be advanced.",
                "Intra-aortic balloon pump too low, should be advanced.")
    raise KeyError(name)


def _removed_sentence(name: str) -> str:
    return f"Interval removal of the {_SHORT[name]}."


def write_cxr_report(rng: np.random.Generator, findings: dict[str, dict], devices: dict[str, dict],
                     ctx: ReportContext, *, views: list[str], setting: str,
                     removed_devices: list[str] = ()) -> tuple[str, dict[str, int]]:
    """Report text and its labels for every finding and device label (ALL_LABELS); PHI used goes to ctx.phi.

    `views` are the ViewPositions of the study's images ("PA", "LL", "AP"); `removed_devices` are devices
    of the patient's previous study that are gone now (sometimes reported as removed)."""
    statements: dict[str, list[str]] = {k: [] for k in _SECTION_TITLES}
    impression: list[str] = []
    labels: dict[str, int] = {name: 0 for name in ALL_LABELS}
    rank = {1: 3, -1: 2, 0: 1}

    def state(name: str, value: int) -> None:
        if rank[value] > rank[labels[name]] or value == 1:
            labels[name] = value

    negated: list[str] = []
    for name in CXR_FINDINGS:
        if name in findings:
            if rng.random() < POSITIVE_REPORT_RATE:
                sentence, short, also = _positive(name, findings[name], rng)
                state(name, 1)
                for other in also:
                    state(other, 1)
            else:
                sentence, short = _uncertain(name, findings[name], rng)
                state(name, -1)
            statements[_SECTION[name]].append(sentence)
            impression.append(short)
        elif rng.random() < FALSE_UNCERTAIN_RATE / 2:
            sentence, short = _uncertain(name, {}, rng)
            state(name, -1)
            statements[_SECTION[name]].append(sentence)
            if rng.random() < 0.5:
                impression.append(short)
        elif rng.random() < _NEGATION_RATE.get(name, _DEFAULT_NEGATION_RATE):
            negated.append(name)
    if "pleural effusion" in negated and "pneumothorax" in negated and rng.random() < 0.6:
        statements["pleura"].append("No pleural effusion or pneumothorax.")
        negated = [n for n in negated if n not in ("pleural effusion", "pneumothorax")]
    for name in negated:
        if labels[name] == 0:
            statements[_SECTION[name]].append(_pick(rng, _NEGATED[name]))

    for name in DEVICES:
        if name in devices:
            sentence, action = device_sentence(name, devices[name], rng)
            statements["devices"].append(sentence)
            state(name, 1)
            if devices[name].get("placement") == "malpositioned":
                state(f"{name} malpositioned", 1)
                impression.insert(0, action or sentence)
        elif name in removed_devices and rng.random() < 0.6:
            statements["devices"].append(_removed_sentence(name))
    if devices and not any(d.get("placement") == "malpositioned" for d in devices.values()) and rng.random() < 0.5:
        impression.insert(0, "Lines and tubes in satisfactory position.")
    elif not devices and setting == "icu" and rng.random() < 0.5:
        statements["devices"].append("No support devices.")
    for section, lines in _FILLER.items():
        for line in lines:
            if rng.random() < 0.4:
                statements[section].append(line)

    use_headings = rng.random() < 0.5
    paragraphs = []
    for section, title in _SECTION_TITLES.items():
        lines = statements[section]
        if not lines:
            continue
        order = rng.permutation(len(lines)) if section != "devices" else range(len(lines))
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
    frontal = "AP" if "AP" in views else "PA"
    if "LL" in views:
        exam, technique = "Chest radiograph, PA and lateral views", "PA and lateral views of the chest."
    elif frontal == "AP":
        exam, technique = "Portable AP chest radiograph", "Single portable AP view of the chest."
    else:
        exam, technique = "Chest radiograph, single PA view", "Single PA view of the chest."
    head.append(f"EXAM: {exam}, {ctx.exam_date}")
    ctx.phi.append(ctx.exam_date)
    sex = {"M": "man", "F": "woman"}.get(ctx.sex, "patient")
    head.append(f"INDICATION: {ctx.age}-year-old {sex} with {_pick(rng, _INDICATIONS[setting])}.")
    if ctx.prior_date:
        head.append(f"COMPARISON: Chest radiograph dated {ctx.prior_date}.")
        ctx.phi.append(ctx.prior_date)
    else:
        head.append("COMPARISON: None.")
    head.append(f"TECHNIQUE: {technique}")

    if impression:
        imp = "\n".join(f"{n + 1}. {line}" for n, line in enumerate(impression))
    else:
        imp = _pick(rng, ["No acute cardiopulmonary process.", "No acute cardiopulmonary abnormality."])
    tail = []
    if any(v == 1 for v in labels.values()) and rng.random() < 0.4:
        tail.append(f"Findings discussed with Dr. {ctx.discussed_with} by telephone on {ctx.exam_date}.")
        ctx.phi.append(ctx.discussed_with)
    if rng.random() < 0.7:
        tail.append(f"Electronically signed by {ctx.radiologist}, MD on {ctx.exam_date}.")
        ctx.phi.append(ctx.radiologist)
    body = "\n".join(paragraphs) if paragraphs else "No acute findings."
    text = "\n".join(head) + "\n\nFINDINGS: " + body + "\n\nIMPRESSION:\n" + imp
    if tail:
        text += "\n\n" + "\n".join(tail)
    return text, labels
