"""`rfm demo`: the site pipeline end to end on a fresh synthetic cohort, through the Prefect flow."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import yaml

from appliance.errors import ApplianceError
from appliance.workspace import init_workspace

DEMO_MARKER = ".rfm-demo"
# Sized for the whole demo (all stages, training included) to fit 10 minutes on a 2-core CPU:
# 360 studies of 64x64x32 voxels (~5.6 mm in-plane), volumes at 6 x 6 x 8 mm on a 64x64x40 canvas.
# A from-scratch 3D ResNet memorises a small cohort within a few epochs, so the demo spends its
# budget on more studies seen fewer times rather than on more epochs.
DEMO_STUDIES = 360
# Findings at higher prevalence (+1.5 log-odds: 2-25 % becomes 10-60 %), so that 360 studies hold
# enough positives of every finding to train on and to measure a held-out AUC; findings drawn 2.5x
# larger, so that small ones (calcifications, leads, airway walls) are not averaged away in 6 mm voxels.
# prognosis: a 12-month outcome per study (image findings + a clinical status only the report
# states) and outcomes.csv, for the privileged-information distillation.
DEMO_COHORT = {"matrix": 64, "slices": 32, "enrich_findings": 1.5, "conspicuity": 2.5, "prognosis": True}
DEMO_SETTINGS = {
    "site": {"name": "demo"},
    # The synthetic burned-in text is found by the pixel detector; OCR would add ~1 s per image.
    "deid": {"ocr": "off"},
    "preprocess": {"spacing_mm": [6.0, 6.0, 8.0], "canvas": [64, 64, 40]},
    # Random initialisation on a CPU: larger learning rates and more epochs than the recipe's
    # (which assume Kinetics/CXR-BERT weights and tens of thousands of studies), a crop to match the
    # small canvas, micro-batch 8 with no accumulation.
    "train": {"crop": [56, 56, 36], "text_max_tokens": 192, "checkpoint_every": 100,
              "stage1": {"epochs": 6, "vision_lr": 1.0e-3, "text_lr": 3.0e-4},
              "stage2": {"epochs": 1, "lr": 5.0e-5},
              "plan": {"micro_batch": 8, "grad_accumulation": 1}},
    "evaluate": {"bootstrap": 500},
}


def fresh_demo_dir(directory: Path, marker: str = DEMO_MARKER, command: str = "rfm demo") -> Path:
    """Empty a previous demo folder (only one `command` made, as its `marker` file says) or create a new one."""
    directory = Path(directory).expanduser().resolve()
    if directory.exists() and any(directory.iterdir()):
        if not (directory / marker).exists():
            raise ApplianceError(f"{directory} exists and was not made by `{command}`; choose another --dir")
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / marker).write_text(f"made by {command}; deleted by the next {command}\n")
    return directory


def _label_f1(ws, ground_truth_path: Path) -> float:
    """How well the labels match the synthetic truth (the demo knows it; a site would use `rfm labels eval`)."""
    import csv
    import io

    from appliance.labels.metrics import agreement

    truth = json.loads(ground_truth_path.read_text())
    by_uid = {s["study_instance_uid"]: s["labels"] for s in truth["studies"]}
    gold = {p.parent.name: by_uid[json.loads(p.read_text())["study_instance_uid"]] for p in ws.raw.glob("*/study.json")}
    rows = csv.DictReader(io.StringIO((ws.labels / "labels.csv").read_text()))
    names = truth["vocabulary"]
    pred = {r["study_key"]: {n: int(r[n]) for n in names} for r in rows}
    return agreement(pred, {k: gold[k] for k in pred}, names, "strict").macro["f1"]


def _train_row(tr: dict) -> dict:
    plan = tr["plan"]
    speeds = ", ".join(f"{p['name']} {p['steps']} steps at {p['samples_per_s']:.1f} samples/s" for p in tr["phases"])
    energy = tr["energy"]
    kwh = f"{energy['total_kwh']:.4f} kWh" if energy.get("total_kwh") is not None else "energy not measured on CPU"
    return {"stage": "train", "seconds": tr["seconds"],
            "result": f"GreenRFM-{'L' if plan['variant'] == 'lite' else 'full'} on {plan['device']} ({plan['name']} plan, "
                      f"{plan['micro_batch']}x{plan['grad_accumulation']} batch); {tr['n_items']['train']} train / "
                      f"{tr['n_items']['val']} val / {tr['n_items']['test']} test series; {speeds}; {kwh}"}


def _eval_row(ev: dict) -> dict:
    lo, hi = ev["zero_shot_auc_ci"]
    ci = f" [95% CI {lo:.2f}-{hi:.2f}]" if lo is not None else ""
    recall = ", ".join(f"R@{k} {v:.2f} (random {ev['random_recall'][k]:.2f})" for k, v in ev["recall"].items()
                       if int(k) <= 10)
    return {"stage": "eval", "seconds": ev["seconds"],
            "result": f"zero-shot mean AUC {ev['zero_shot_auc']:.3f}{ci} over {ev['findings_scored']} findings on "
                      f"{ev['n_test_studies']} held-out studies; linear probe AUC "
                      f"{ev['linear_probe_auc'] if ev['linear_probe_auc'] is None else round(ev['linear_probe_auc'], 3)}; "
                      f"{recall}"}


def _distill_row(di: dict) -> dict:
    parts = []
    for target, r in di["targets"].items():
        if "skipped" in r:
            parts.append(f"{target}: skipped ({r['skipped']})")
            continue
        m, d = r["methods"], r["paired"]
        parts.append(f"{target}: AUC image-only {_fmt3(m['baseline']['auc_mean'])}, self-distilled "
                     f"{_fmt3(m['self_distilled']['auc_mean'])}, report-distilled {_fmt3(m['text_distilled']['auc_mean'])} "
                     f"(paired gain vs image-only {_fmt3(d['text_distilled-baseline']['auc_delta_mean'])}), "
                     f"report teacher {_fmt3(m['teacher_text']['auc_mean'])}; {len(r['seeds'])} seeds")
    enc = di.get("encoder") or {}
    parts.append(f"full -> Lite: {enc['skipped']}" if "skipped" in enc else "full -> Lite encoder distilled")
    return {"stage": "distill", "seconds": di["seconds"], "result": "; ".join(parts)}


def _export_row(ex: dict) -> dict:
    p = ex["parity"]
    image, text = p["image_onnx"], p["text_onnx"]
    trt = ex["tensorrt"]
    return {"stage": "export", "seconds": ex["seconds"],
            "result": f"ONNX image + text encoders ({ex['exporter']['image']['exporter']} exporter); parity on "
                      f"{p['n_series']} held-out series: min cosine {image['image_embedding']['cosine_min']:.6f} "
                      f"(image), {text['text_embedding']['cosine_min']:.6f} (text), zero-shot AUC "
                      f"{_fmt3(image['zero_shot_auc'])} vs PyTorch {_fmt3(p['pytorch_zero_shot_auc'])}; "
                      + (f"TensorRT {', '.join(trt['built'])}" if trt.get("built") else f"TensorRT skipped ({trt['skipped']})")
                      + f"; Triton repository of {len(ex['triton_models'])} models; model card"}


def _fmt3(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def run_demo(directory: Path, studies: int = DEMO_STUDIES, seed: int = 0, epochs: int | None = None) -> dict:
    from appliance.synthetic import generate_cohort
    from appliance.synthetic.cohort import OUTCOMES_CSV
    from appliance.synthetic.bad_inputs import plant_bad_inputs
    from appliance.workflow import prepare_prefect_env

    t0 = time.perf_counter()
    root = fresh_demo_dir(Path(directory))
    cohort = generate_cohort(root / "cohort", n_studies=studies, seed=seed, **DEMO_COHORT)
    source = cohort.dicom_dir  # the "PACS export": series + reports.jsonl; ground truth stays outside
    planted = plant_bad_inputs(source)
    t_synth = time.perf_counter() - t0

    ws = init_workspace(root / "site", "demo")
    settings = yaml.safe_load(ws.config_path.read_text()) or {}
    for section, values in DEMO_SETTINGS.items():
        settings.setdefault(section, {}).update(values)
    if epochs is not None:
        settings["train"]["stage1"] = {**settings["train"]["stage1"], "epochs": epochs}
        settings["train"]["stage2"] = {**settings["train"]["stage2"], "epochs": epochs}
    ws.config_path.write_text("# rfm demo: the template's defaults with the demo's sizes\n"
                              + yaml.safe_dump(settings, sort_keys=False))
    ws.config()

    prepare_prefect_env(ws.root)
    from flows.site import site_pipeline

    t1 = time.perf_counter()
    outcomes = cohort.out_dir / OUTCOMES_CSV  # the "EHR extract", read where it lies
    stages = site_pipeline(str(ws.root), str(source), outcomes=str(outcomes))
    t_flow = time.perf_counter() - t1

    ing, deid, pre, lab = stages["ingest"], stages["deid"], stages["preprocess"], stages["labels"]
    table = [
        {"stage": "synthesise", "seconds": t_synth,
         "result": f"{cohort.n_studies} studies, {cohort.n_series} series, {cohort.n_files} files; "
                   f"planted bad input: {', '.join(planted)}"},
        {"stage": "ingest", "seconds": ing["seconds"],
         "result": f"{ing['series_accepted']} series accepted, {ing['n_quarantined']} quarantined, "
                   f"{ing['n_skipped']} skipped, {ing['reports_linked']} reports linked"},
        {"stage": "deid", "seconds": deid["seconds"],
         "result": f"{deid['series_done']} series ({deid['files_pixels_cleaned']} files with burned-in text blanked), "
                   f"{deid['reports_done']} reports; {deid['series_quarantined'] + deid['reports_quarantined']} "
                   f"quarantined for review; audit hits {deid['audit_hits']}"},
        {"stage": "preprocess", "seconds": pre["seconds"],
         "result": f"{pre['series_done']} volumes cached, {pre['series_quarantined']} quarantined, "
                   f"{pre['series_failed']} failed"},
        {"stage": "labels", "seconds": lab["seconds"],
         "result": f"{lab['labelled'] + lab['from_cache']} of {lab['reports']} reports labelled (rules), "
                   f"{lab['queued']} queued for review; {len(lab['findings_kept'])} findings kept; "
                   f"strict macro F1 vs the cohort's truth {_label_f1(ws, cohort.ground_truth_path):.3f}"},
        _train_row(stages["train"]),
        _eval_row(stages["eval"]),
        _distill_row(stages["distill"]),
        _export_row(stages["export"]),
        {"stage": "total", "seconds": time.perf_counter() - t0,
         "result": f"Prefect flow {t_flow:.1f} s (includes starting the local API)"},
    ]
    summary_path = ws.root / "demo-summary.json"
    result = {"workspace": str(ws.root), "source": str(source), "cohort": {
        "studies": cohort.n_studies, "series": cohort.n_series, "files": cohort.n_files, "seed": seed},
        "planted_bad_inputs": sorted(planted), "stages": stages, "table": table,
        "summary_path": str(summary_path)}
    summary_path.write_text(json.dumps(result, indent=2, default=str))
    return result
