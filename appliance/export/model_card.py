"""The model card written next to an export (Markdown + JSON).

Everything in it comes from the run folder, the catalog and the de-identified zone: counts,
de-identified (shifted) study years, modalities, label prevalences, the hardware plan, evaluation
metrics with their confidence intervals, the input contract and file checksums. No identifier,
name, UID or source path is read or written.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from appliance.catalog import Catalog
from appliance.workspace import Workspace

INTENDED_USE = (
    "Feature extraction from non-contrast and contrast chest CT volumes for downstream research models at "
    "the site that trained it: zero-shot finding scores, linear or attention heads, report-to-volume retrieval. "
    "It is not a medical device and its outputs are not diagnoses; any clinical use needs its own validation "
    "and regulatory clearance.")
LIMITATIONS = [
    "Trained on one site's own studies and labels: performance on other scanners, protocols and populations "
    "is unknown until measured there.",
    "Labels were extracted from reports by rules or a local LLM, not by image review; label noise, and "
    "findings left out by the label consensus, limit what it learnt.",
    "Zero-shot scores are uncalibrated probabilities from two prompts; choose thresholds on local data.",
    "The input contract below must be followed exactly; a volume preprocessed differently (spacing, HU "
    "window, orientation, crop) gives embeddings the model never saw.",
    "Metrics are on held-out patients of the same site (split by patient), with bootstrap confidence "
    "intervals; small test sets give wide intervals.",
]


def training_data_summary(ws: Workspace, run_dir: Path) -> dict:
    """Counts, modalities, de-identified study years and label prevalences of the run's data."""
    import csv
    import io

    split = json.loads((run_dir / "split.json").read_text())
    findings = list(split["findings"])
    series_split = {key: part for part in ("train", "val", "test") for key in split[part]}
    with Catalog(ws.catalog_path) as catalog:
        rows = catalog.db.execute(
            "SELECT s.key, s.study_key, s.modality, st.patient_key, st.created_at FROM series s "
            "JOIN studies st ON st.key = s.study_key").fetchall()
    rows = [r for r in rows if r["key"] in series_split]
    per_split: dict[str, dict] = {}
    for part in ("train", "val", "test"):
        mine = [r for r in rows if series_split[r["key"]] == part]
        per_split[part] = {"series": len(mine), "studies": len({r["study_key"] for r in mine}),
                           "patients": len({r["patient_key"] or r["study_key"] for r in mine})}
    ingested = sorted(r["created_at"][:10] for r in rows)
    labels_csv = ws.labels / "labels.csv"
    train_studies = {r["study_key"] for r in rows if series_split[r["key"]] == "train"}
    prevalence = {}
    if labels_csv.is_file():
        label_rows = [r for r in csv.DictReader(io.StringIO(labels_csv.read_text())) if r["study_key"] in train_studies]
        for finding in findings:
            values = Counter(int(r[finding]) for r in label_rows if finding in r)
            known = values[1] + values[0]
            prevalence[finding] = {"present": values[1], "absent": values[0], "uncertain": values[-1],
                                   "prevalence": round(values[1] / known, 4) if known else None}
    return {
        "series": len(rows), "studies": len({r["study_key"] for r in rows}),
        "patients": len({r["patient_key"] or r["study_key"] for r in rows}),
        "split": per_split, "split_unit": "patient",
        "modalities": dict(Counter(r["modality"] for r in rows)),
        "ingested": {"first": ingested[0], "last": ingested[-1]} if ingested else None,
        "study_years_deidentified": _deidentified_study_years(ws, {r["key"] for r in rows}),
        "label_prevalence_train": prevalence,
        "findings": findings,
    }


def _deidentified_study_years(ws: Workspace, series_keys: set[str]) -> dict | None:
    """Study years as the de-identified headers hold them (one file per series). With date shifting
    on they are shifted back 30-3650 days per patient, so the true years are the same or up to ten
    later; the year is the only part shown."""
    import pydicom

    years = []
    for series_dir in ws.deid.glob("*/*"):
        if series_dir.name not in series_keys or not series_dir.is_dir():
            continue
        first = next((p for p in sorted(series_dir.iterdir()) if p.is_file() and p.suffix != ".json"), None)
        if first is None:
            continue
        try:
            date = str(pydicom.dcmread(first, stop_before_pixels=True, specific_tags=["StudyDate"]).get("StudyDate", ""))
        except Exception:
            continue
        if len(date) >= 4 and date[:4].isdigit():
            years.append(int(date[:4]))
    if not years:
        return None
    return {"first": min(years), "last": max(years),
            "note": "years of the de-identified (date-shifted) headers, not of the acquisitions"}


def metrics_summary(run_dir: Path) -> dict | None:
    """The run's evaluation (rfm eval) with its confidence intervals, or None when it was not evaluated."""
    path = run_dir / "eval" / "evaluation.json"
    if not path.is_file():
        return None
    ev = json.loads(path.read_text())
    ci = ev.get("zero_shot_ci", {})
    per_finding = {name: {"auc": m.get("auc"),
                          "ci": [ci.get("per_finding", {}).get(name, {}).get(k) for k in ("low", "high")]}
                   for name, m in ev["zero_shot"]["per_finding"].items()}
    return {
        "test_studies": ev.get("n_test_studies"), "test_patients": ev.get("n_test_patients"),
        "zero_shot_mean_auc": ev["zero_shot"]["mean"].get("auc"),
        "zero_shot_mean_auc_ci": [ci.get("mean_auc", {}).get(k) for k in ("low", "high")],
        "prompt_pair": ev.get("prompt_pair"),
        "zero_shot_per_finding": per_finding,
        "classifier_mean_auc": ev.get("classifier", {}).get("mean", {}).get("auc"),
        "linear_probe_mean_auc": ev.get("linear_probe", {}).get("mean_auc"),
        "retrieval_recall": ev.get("retrieval", {}).get("recall"),
        "retrieval_random": ev.get("retrieval", {}).get("random"),
        "bootstrap": {"resamples": ci.get("n_resamples"), "unit": ci.get("unit"), "alpha": ci.get("alpha")},
    }


def input_contract(run_dir: Path, preprocess: dict, crop_xyz: tuple[int, int, int]) -> dict:
    x, y, z = crop_xyz
    low, high = preprocess["hu_clip"]
    offset, scale = preprocess.get("hu_offset", 400.0), preprocess.get("hu_scale", 600.0)
    return {
        "tensor": f"float32 (B, 1, {z}, {y}, {x}) = (batch, channel, z, y, x)",
        "orientation": "array[z, y, x] on the DICOM patient (LPS) axes: x to patient left, y to posterior, z to head",
        "spacing_mm_xyz": list(preprocess["spacing_mm"]),
        "resampling": "linear along and across slices from the real slice geometry (gantry tilt removed); "
                      "in-plane Gaussian prefilter when downsampling by more than 1.5x",
        "hu_window": [low, high],
        "intensity": f"value = (clip(HU, {low:g}, {high:g}) + {offset:g}) / {scale:g}; air and padding = "
                     f"{(low + offset) / scale:g}",
        "canvas_xyz": list(preprocess["canvas"]),
        "crop_xyz": [x, y, z],
        "crop": "centre crop of the canvas (padding with air where the canvas is smaller)",
        "text": "report text: IMPRESSION then FINDINGS, tokenised with tokenizer/ (truncated to the max tokens)",
    }


def write_model_card(out_dir: Path, card: dict) -> tuple[Path, Path]:
    json_path = out_dir / "model_card.json"
    json_path.write_text(json.dumps(card, indent=2, allow_nan=False, default=str) + "\n")
    md_path = out_dir / "model_card.md"
    md_path.write_text(model_card_markdown(card))
    return md_path, json_path


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def model_card_markdown(card: dict) -> str:
    m = card["model"]
    data = card["training_data"]
    lines = [f"# Model card: {m['name']}", "",
             f"Site **{card['site']}**, training run `{m['run']}`, exported {card['exported_at']} by rfm-appliance "
             f"{card['software']['rfm_appliance']}.", "",
             "## Model", "",
             f"- GreenRFM{'-L' if m['variant'] == 'lite' else ''} ({m['variant']}): 3D ResNet-18 behind a "
             f"{m['patch']}-voxel patchify stem, {m['embed_dim']}-d joint embedding, one classifier over "
             f"{len(m['findings'])} findings shared by image and text.",
             f"- Text encoder: {m['text_encoder']}.",
             f"- Parameters: image encoder {m['image_parameters']:,}, text encoder {m['text_parameters']:,}.", "",
             "## Intended use", "", card["intended_use"], "",
             "## Limitations", "", *[f"- {item}" for item in card["limitations"]], "",
             "## Training data", "",
             f"- {data['series']} series from {data['studies']} studies of {data['patients']} patients; modalities "
             + ", ".join(f"{k} ({v})" for k, v in data["modalities"].items()) + ".",
             "- Split by patient: " + "; ".join(f"{part} {v['series']} series / {v['studies']} studies / "
                                                f"{v['patients']} patients" for part, v in data["split"].items()) + "."]
    if data.get("ingested"):
        lines.append(f"- Ingested by the appliance between {data['ingested']['first']} and {data['ingested']['last']}.")
    if data.get("study_years_deidentified"):
        years = data["study_years_deidentified"]
        lines.append(f"- Study years {years['first']}-{years['last']} ({years['note']}).")
    lines += ["", "Label prevalence in the training split (present / absent / uncertain):", "",
              "| finding | present | absent | uncertain | prevalence |", "|---|---|---|---|---|"]
    for name, p in data["label_prevalence_train"].items():
        lines.append(f"| {name} | {p['present']} | {p['absent']} | {p['uncertain']} | {_fmt(p['prevalence'])} |")
    plan = card["hardware_plan"]
    lines += ["", "## Training", "",
              f"- Hardware plan `{plan.get('name')}`: {plan.get('device')}, {plan.get('n_gpus')} GPU(s), micro-batch "
              f"{plan.get('micro_batch')} x {plan.get('grad_accumulation')} accumulation, {plan.get('precision')}, "
              f"{plan.get('distributed')}.",
              "- Phases: " + "; ".join(f"{p['name']} {p['epochs']} epochs, {p['steps']} steps" for p in card["phases"]) + ".",
              ""]
    metrics = card.get("metrics")
    lines += ["## Evaluation (held-out patients)", ""]
    if metrics is None:
        lines += ["Not evaluated: run `rfm eval` before `rfm export` to put metrics here.", ""]
    else:
        lo, hi = metrics["zero_shot_mean_auc_ci"]
        ci = f" (95% CI {_fmt(lo)}-{_fmt(hi)})" if lo is not None else ""
        lines += [f"- Zero-shot mean AUC {_fmt(metrics['zero_shot_mean_auc'])}{ci} on {metrics['test_studies']} "
                  f"studies of {metrics['test_patients']} patients; bootstrap by {metrics['bootstrap']['unit']}, "
                  f"{metrics['bootstrap']['resamples']} resamples.",
                  f"- Shared-classifier AUC {_fmt(metrics['classifier_mean_auc'])}; linear probe AUC "
                  f"{_fmt(metrics['linear_probe_mean_auc'])}.",
                  "- Report-to-volume recall: " + ", ".join(
                      f"R@{k} {_fmt(v, 2)} (random {_fmt((metrics['retrieval_random'] or {}).get(k), 2)})"
                      for k, v in (metrics["retrieval_recall"] or {}).items()) + ".", "",
                  "| finding | zero-shot AUC | 95% CI |", "|---|---|---|"]
        for name, v in metrics["zero_shot_per_finding"].items():
            ci = "-" if v["ci"][0] is None else f"{_fmt(v['ci'][0])}-{_fmt(v['ci'][1])}"
            lines.append(f"| {name} | {_fmt(v['auc'])} | {ci} |")
        lines.append("")
    contract = card["input_contract"]
    lines += ["## Input contract", "", *[f"- **{k}**: {v}" for k, v in contract.items()], ""]
    lines += ["## Exported files and parity", "",
              "| file | what | parity vs PyTorch (min cosine) | zero-shot AUC | sha256 |", "|---|---|---|---|---|"]
    for f in card["files"]:
        lines.append(f"| `{f['path']}` | {f['what']} | {_fmt(f.get('cosine_min'), 6)} | {_fmt(f.get('zero_shot_auc'))} | "
                     f"`{f['sha256'][:16]}...` |")
    lines += ["", f"PyTorch zero-shot AUC on the same {card['parity']['n_series']} parity series: "
              f"{_fmt(card['parity']['pytorch_zero_shot_auc'])}. Full checksums: `SHA256SUMS` "
              "(`sha256sum -c SHA256SUMS`).", ""]
    if card.get("tensorrt_skipped"):
        lines += [f"TensorRT engine not built: {card['tensorrt_skipped']}.", ""]
    sw = card["software"]
    lines += ["## Software", "", ", ".join(f"{k} {v}" for k, v in sw.items() if v), ""]
    return "\n".join(lines)
