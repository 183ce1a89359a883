"""`rfm distill`: the two kinds of distillation a site runs after training.

(a) Privileged information (RECIPES.md section 2). Reports exist for the training images but
    not at inference. Task heads are trained over the frozen encoder's tokens for each per-study
    outcome (labels/outcomes.csv):
    - an image-only baseline and a linear probe;
    - a teacher that also reads the report;
    - a self-distilled student (its teacher is image-only);
    - a student distilled from the text teacher.
    All on the training run's patient split, over several seeds, with bootstrap CIs. The report
    shows whether the text helped.
(b) Full -> Lite encoder: when the trained run is the full GreenRFM (or when asked), a GreenRFM-L
    image encoder is distilled from it on the unlabeled cache and scored with the same zero-shot
    protocol (appliance/distill/encoder.py).

Results land in runs/distill/<stamp>/ (report.json, report.md) and in MLflow.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from appliance.errors import ApplianceError
from appliance.fsutil import atomic_write
from appliance.progress import Progress, SilentProgress
from appliance.workspace import Workspace

VAL_FRACTION_WHEN_NONE = 0.2  # of the training patients, when the run kept no validation split


@dataclass
class DistillResult:
    run_dir: Path
    teacher_run: str
    outcomes: dict | None
    targets: dict = field(default_factory=dict)   # target -> compare_methods() result
    encoder: dict = field(default_factory=dict)   # encoder distillation summary, or {"skipped": why}
    skipped: str | None = None                    # why no task heads were trained
    seconds: float = 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["run_dir"] = str(self.run_dir)
        return d


def distill_workspace(ws: Workspace, run_dir: Path | None = None, *, outcomes: Path | None = None,
                      targets: list[str] | None = None, seeds: int | None = None, encoder: str | None = None,
                      progress: Progress | None = None, device: str | None = None) -> DistillResult:
    """Privileged-information distillation for every outcome target, and full -> Lite encoder
    distillation when it applies. `outcomes`/`targets`/`seeds`/`encoder` override site.yaml."""
    from appliance.distill.encoder import new_run_dir
    from appliance.distill.outcomes import import_outcomes, read_outcomes
    from appliance.evaluate.stage import inference_device, load_trained_model
    from appliance.train import latest_run

    t0 = time.perf_counter()
    site = ws.config()
    cfg = site.distill
    progress = progress or SilentProgress()
    encoder = encoder or cfg.encoder
    if encoder not in ("auto", "on", "off"):
        raise ApplianceError(f"--encoder {encoder}: use auto, on or off")
    teacher_run = Path(run_dir) if run_dir else latest_run(ws, finished=True)
    if teacher_run is None or not (teacher_run / "result.json").is_file():
        raise ApplianceError("no finished training run in runs/train: run `rfm train` first")
    device = device or inference_device(site)

    imported = None
    source = outcomes or (ws.root / cfg.outcomes if cfg.outcomes else None)
    if source is not None:
        imported = asdict(import_outcomes(ws, Path(source), list(targets or cfg.targets or []) or None))
    known_targets, values = read_outcomes(ws)
    wanted = list(targets or cfg.targets or known_targets)
    unknown = [t for t in wanted if t not in known_targets]
    if unknown:
        raise ApplianceError(f"outcome {unknown[0]} was never imported; give `--outcomes FILE` with that column")

    loaded = load_trained_model(teacher_run, device)
    variant = loaded.spec["variant"]
    if encoder == "on" and variant != "standard":
        raise ApplianceError(f"run {teacher_run.name} is already GreenRFM-L; encoder distillation needs the full model")
    out_dir = new_run_dir(ws, "heads")
    result = DistillResult(out_dir, teacher_run.name, imported)
    if wanted:
        tokens = _extract_tokens(ws, teacher_run, loaded, values, cfg, device, progress)
        for target in wanted:
            progress.note(f"distill: task heads for outcome {target!r} ({cfg.seeds if seeds is None else seeds} seeds)")
            result.targets[target] = _compare_for_target(tokens, values, target, cfg, seeds or cfg.seeds)
    else:
        result.skipped = "no outcomes imported (give `rfm distill --outcomes FILE` or distill.outcomes in site.yaml)"

    del loaded
    if encoder == "on" or (encoder == "auto" and variant == "standard"):
        from appliance.distill.encoder import distill_encoder

        result.encoder = _encoder_summary(distill_encoder(ws, teacher_run, epochs=cfg.encoder_epochs, lr=cfg.encoder_lr,
                                                          progress=progress, device=device))
    else:
        result.encoder = {"skipped": "the trained run is already GreenRFM-L" if variant == "lite"
                          else "distill.encoder is off"}
    result.seconds = time.perf_counter() - t0
    _write_report(out_dir, result)
    _log_to_mlflow(ws, site, result)
    return result


def _encoder_summary(res) -> dict:
    d = res.to_dict() if hasattr(res, "to_dict") else dict(res)
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


# --- tokens from the frozen encoder ------------------------------------------------------------


@torch.no_grad()
def _extract_tokens(ws: Workspace, teacher_run: Path, loaded, values: dict, cfg, device: str,
                    progress: Progress) -> dict:
    """Image tokens (the vision encoder's last feature map, average-pooled to at most
    image_token_grid) and report tokens (the text encoder's last hidden states) of every series
    whose study has an outcome; the frozen encoder runs once per series."""
    from torch.utils.data import DataLoader

    from appliance.train.data import VolumeReportDataset, collect_training_data

    split = json.loads((teacher_run / "split.json").read_text())
    part_of = {key: part for part in ("train", "val", "test") for key in split[part]}
    data = collect_training_data(ws, impression_first_order=loaded.impression_first, findings=loaded.findings)
    items = [it for it in data.items if it.study_key in values and it.series_key in part_of]
    if not items:
        raise ApplianceError("no cached series of the training run's split has an outcome")
    model = loaded.model
    ds = VolumeReportDataset(items, loaded.findings, loaded.tokenizer, loaded.crop, train=False)
    image, text, masks = [], [], []
    progress.start("distill: encode volumes and reports (frozen encoder)", len(items))
    for batch in DataLoader(ds, batch_size=4, num_workers=0):
        fmap = model.vision.feature_map(batch["volume"].to(device))
        grid = tuple(min(g, s) for g, s in zip(cfg.image_token_grid, fmap.shape[2:]))
        fmap = torch.nn.functional.adaptive_avg_pool3d(fmap, grid)
        image.append(fmap.flatten(2).transpose(1, 2).half().cpu())
        mask = batch["attention_mask"].to(device)
        hidden = model.text(input_ids=batch["input_ids"].to(device), attention_mask=mask).last_hidden_state
        text.append(hidden.half().cpu())
        masks.append(mask.bool().cpu())
        progress.advance(len(batch["volume"]))
    return {"items": items, "part": [part_of[it.series_key] for it in items],
            "image": torch.cat(image), "text": torch.cat(text), "mask": torch.cat(masks)}


def _compare_for_target(tokens: dict, values: dict, target: str, cfg, seeds: int) -> dict:
    from appliance.distill.heads import HeadConfig, TokenSet, compare_methods

    rows = [i for i, it in enumerate(tokens["items"]) if target in values[it.study_key]]
    parts = {p: [i for i in rows if tokens["part"][i] == p] for p in ("train", "val", "test")}
    if not parts["val"]:  # the run kept no validation patients: set some training patients aside
        patients = sorted({tokens["items"][i].patient_key for i in parts["train"]},
                          key=lambda p: hashlib.sha256(f"distill-val:{p}".encode()).hexdigest())
        held = set(patients[:max(1, int(round(len(patients) * VAL_FRACTION_WHEN_NONE)))])
        parts["val"] = [i for i in parts["train"] if tokens["items"][i].patient_key in held]
        parts["train"] = [i for i in parts["train"] if tokens["items"][i].patient_key not in held]
    y_all = {i: values[tokens["items"][i].study_key][target] for i in rows}
    classes = sorted(set(y_all.values()))
    for part in ("train", "val", "test"):
        present = {y_all[i] for i in parts[part]}
        if len(present) < 2:
            return {"skipped": f"the {part} split has {len(parts[part])} series with an outcome and "
                               f"{len(present)} class(es); two are needed"}
    index = {c: k for k, c in enumerate(classes)}

    def token_set(idx: list[int]) -> TokenSet:
        sel = torch.tensor(idx, dtype=torch.long)
        return TokenSet(image_tokens=tokens["image"][sel].float(), text_tokens=tokens["text"][sel].float(),
                        text_mask=tokens["mask"][sel], y=torch.tensor([index[y_all[i]] for i in idx]),
                        groups=np.array([tokens["items"][i].patient_key for i in idx]))

    head_cfg = HeadConfig(lr=cfg.lr, batch_size=cfg.batch_size, max_epochs=cfg.max_epochs, patience=cfg.patience,
                          attn_dropout=cfg.attn_dropout, dim=cfg.head_dim, lam=cfg.lam, tau=cfg.tau)
    result = compare_methods(token_set(parts["train"]), token_set(parts["val"]), token_set(parts["test"]), head_cfg,
                             seeds=tuple(range(seeds)), n_bootstrap=cfg.bootstrap)
    result["classes"] = classes
    return result


# --- report ------------------------------------------------------------------------------------

METHOD_NAMES = {
    "linear_probe": "linear probe (image)",
    "baseline": "attention head, image only",
    "self_distilled": "student, self-distilled (image teacher)",
    "text_distilled": "student, distilled from the report teacher",
    "teacher_text": "teacher: image + report (privileged; not available at inference)",
}


def _fmt(v, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _ci(ci) -> str:
    if not ci or ci[0] is None:
        return "-"
    return f"{_fmt(ci[0])}-{_fmt(ci[1])}"


def report_markdown(result: dict) -> str:
    lines = [f"# Distillation: run {Path(result['run_dir']).name}", "",
             f"Encoder: training run `{result['teacher_run']}` (frozen).", ""]
    imported = result.get("outcomes")
    if imported:
        lines += [f"Outcomes imported: {imported['matched']} of {imported['rows']} rows matched an ingested study "
                  f"({imported['unmatched']} unmatched, {imported['duplicate_rows']} repeating a study); targets "
                  f"{', '.join(imported['targets'])}.", ""]
    if result.get("skipped"):
        lines += [f"Task heads: skipped ({result['skipped']}).", ""]
    for target, r in result["targets"].items():
        lines += [f"## Outcome `{target}`", ""]
        if "skipped" in r:
            lines += [f"Skipped: {r['skipped']}.", ""]
            continue
        lines += [f"{r['n_train']} train / {r['n_val']} validation / {r['n_test']} test series; classes "
                  f"{r.get('classes')}; seeds {r['seeds']}; lambda {r['cfg']['lam']}, tau {r['cfg']['tau']}.", "",
                  "AUC and AUPRC: mean ± sd of the per-seed test scores; 95% CI: bootstrap (by "
                  f"{r['bootstrap_unit']}) of the seed-averaged predictions.", "",
                  "| method | AUC (mean ± sd over seeds) | 95% CI | AUPRC | 95% CI |", "|---|---|---|---|---|"]
        for key, name in METHOD_NAMES.items():
            m = r["methods"].get(key)
            if m is None:
                continue
            avg = m["seed_averaged"]
            lines.append(f"| {name} | {_fmt(m['auc_mean'])} ± {_fmt(m['auc_std'])} | {_ci(avg['auc_ci95'])} | "
                         f"{_fmt(m['auprc_mean'])} | {_ci(avg['auprc_ci95'])} |")
        lines += ["", "| paired difference | mean AUC delta | 95% CI | per seed |", "|---|---|---|---|"]
        for key, d in r["paired"].items():
            lines.append(f"| {key.replace('-', ' - ')} | {_fmt(d['auc_delta_mean'])} | {_ci(d['auc_delta_ci95'])} | "
                         + ", ".join(_fmt(x) for x in d["auc_delta_per_seed"]) + " |")
        lines.append("")
    enc = result.get("encoder") or {}
    lines += ["## Full -> Lite encoder", ""]
    if "skipped" in enc:
        lines += [f"Skipped: {enc['skipped']}.", ""]
    else:
        cmp = enc.get("comparison", enc)
        lines += [f"Student run `{Path(str(enc.get('run_dir', ''))).name}`: zero-shot mean AUC teacher "
                  f"{_fmt(cmp.get('teacher_zero_shot_auc'))}, student {_fmt(cmp.get('student_zero_shot_auc'))} "
                  f"(retained {_fmt(cmp.get('retained_fraction'))}, above chance {_fmt(cmp.get('retained_above_chance'))}); "
                  f"inference speed-up {_fmt(cmp.get('speedup'), 2)}x.", ""]
    return "\n".join(lines)


def _write_report(out_dir: Path, result: DistillResult) -> None:
    d = result.to_dict()
    atomic_write(out_dir / "report.json", json.dumps(d, indent=2, default=str))
    atomic_write(out_dir / "report.md", report_markdown(d))


def _log_to_mlflow(ws: Workspace, site, result: DistillResult) -> None:
    from appliance.tracking import open_run

    metrics: dict[str, float | None] = {}
    for target, r in result.targets.items():
        for method, m in r.get("methods", {}).items():
            metrics[f"distill/{target}/{method}_auc"] = m.get("auc_mean")
            metrics[f"distill/{target}/{method}_auprc"] = m.get("auprc_mean")
        for key, d in r.get("paired", {}).items():
            metrics[f"distill/{target}/{key.replace('-', '_minus_')}_auc"] = d.get("auc_delta_mean")
    with open_run(ws.root, experiment=site.tracking.experiment, run_name=f"distill-{result.run_dir.name}",
                  uri=site.tracking.uri, enabled=site.tracking.enabled,
                  tags={"stage": "distill", "teacher_run": result.teacher_run, "site": site.site.name}) as tracker:
        tracker.log_params({"distill": site.distill.model_dump(mode="json") | {"outcomes": None}})
        tracker.log_metrics(metrics, step=0)
        for name in ("report.json", "report.md"):
            tracker.log_artifact(result.run_dir / name)
