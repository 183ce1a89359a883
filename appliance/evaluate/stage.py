"""`rfm eval`: a trained GreenRFM run evaluated on its held-out test studies.

Zero-shot AUC (all five prompt pairs; full metrics, bootstrap CIs by patient and ROC curves for
the configured one), the shared classifier's AUC, report-to-volume retrieval and a linear probe on
frozen encoder features. Results land in runs/train/<run>/eval/ and in the run's MLflow record.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from appliance.errors import ApplianceError
from appliance.evaluate.metrics import binary_metrics, bootstrap_ci
from appliance.evaluate.probe import linear_probe
from appliance.evaluate.report import roc_curves, write_evaluation_report
from appliance.evaluate.retrieval import retrieval_bootstrap_ci, retrieval_recall
from appliance.evaluate.zero_shot import PROMPT_PAIRS, prompts_for, zero_shot_probabilities
from appliance.progress import Progress, SilentProgress
from appliance.workspace import Workspace


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    findings: list[str]
    crop: tuple[int, int, int]
    spec: dict
    impression_first: bool


def inference_device(site) -> str:
    """Where a finished model is run: the GPU when there is one, unless site.yaml pins the CPU."""
    return "cuda" if torch.cuda.is_available() and site.compute.device != "cpu" else "cpu"


def load_trained_model(run_dir: Path, device: str = "cpu") -> LoadedModel:
    """The final model of a training run (model.pt + its tokenizer), in eval mode."""
    from appliance.models import ModelSpec, build_greenrfm, load_tokenizer
    from appliance.train.checkpoint import load_checkpoint

    path = run_dir / "model.pt"
    if not path.is_file():
        raise ApplianceError(f"{run_dir.name} has no final model (model.pt); finish it with `rfm train --resume`")
    saved = load_checkpoint(path)
    spec = ModelSpec(**(saved["spec"] | {"kinetics_weights": None}))  # weights come from the state dict
    model = build_greenrfm(spec)
    model.load_state_dict(saved["state_dict"])
    model.to(device).eval()
    folder = run_dir / saved["tokenizer"] if saved.get("tokenizer") else Path(spec.text_model_dir)
    tokenizer = load_tokenizer(folder, saved.get("text_max_tokens", 128))
    return LoadedModel(model, tokenizer, list(saved["findings"]), tuple(saved["crop"]), spec.to_dict(),
                       saved.get("impression_first", True))


@torch.no_grad()
def encode_items(loaded: LoadedModel, items, device: str, batch_size: int = 4, progress: Progress | None = None,
                 with_text: bool = True) -> dict[str, np.ndarray]:
    """Centre-crop image features (512-d), image latents, report latents and labels for `items`."""
    from appliance.train.data import VolumeReportDataset

    ds = VolumeReportDataset(items, loaded.findings, loaded.tokenizer, loaded.crop, train=False)
    feats, img, txt, labels = [], [], [], []
    model = loaded.model
    for batch in DataLoader(ds, batch_size=batch_size, num_workers=0):
        volume = batch["volume"].to(device)
        f = model.vision(volume)
        feats.append(f.cpu())
        img.append(model.image_proj(f).cpu())
        if with_text:
            txt.append(model.encode_text(batch["input_ids"].to(device), batch["attention_mask"].to(device)).cpu())
        labels.append(batch["labels"])
        if progress is not None:
            progress.advance(len(volume))
    out = {"features": torch.cat(feats).numpy(), "image": torch.cat(img).numpy(),
           "labels": torch.cat(labels).numpy().astype(int)}
    if with_text:
        out["report"] = torch.cat(txt).numpy()
    return out


@torch.no_grad()
def encode_texts(loaded: LoadedModel, texts: list[str], device: str) -> np.ndarray:
    ids, mask = loaded.tokenizer.encode(texts)
    return loaded.model.encode_text(ids.to(device), mask.to(device)).cpu().numpy()


def evaluate_run(ws: Workspace, run_dir: Path | None = None, *, progress: Progress | None = None,
                 device: str | None = None) -> dict:
    """Evaluate a finished training run (default: the newest) and write its report."""
    from appliance.train import latest_run
    from appliance.train.data import collect_training_data

    t0 = time.perf_counter()
    site = ws.config()
    cfg = site.evaluate
    progress = progress or SilentProgress()
    run_dir = Path(run_dir) if run_dir else latest_run(ws, finished=True)
    if run_dir is None:
        raise ApplianceError("no finished training run in runs/train: run `rfm train` first")
    device = device or inference_device(site)
    loaded = load_trained_model(run_dir, device)
    split = json.loads((run_dir / "split.json").read_text())
    findings = loaded.findings
    data = collect_training_data(ws, impression_first_order=loaded.impression_first, findings=findings)
    by_key = {it.series_key: it for it in data.items}
    test = [by_key[k] for k in split["test"] if k in by_key]
    train = [by_key[k] for k in split["train"] if k in by_key]
    if len(test) < 2:
        raise ApplianceError(f"only {len(test)} test series: too few to evaluate (raise train.test_fraction)")

    progress.start("eval: encode test and training volumes", len(test) + len(train))
    enc_test = encode_items(loaded, test, device, progress=progress)
    enc_train = encode_items(loaded, train, device, progress=progress, with_text=False)
    y = enc_test["labels"]
    patients = np.array([it.patient_key for it in test])
    studies = np.array([it.study_key for it in test])

    per_pair = []
    scores_by_pair = []
    for pair in range(len(PROMPT_PAIRS)):
        pos, neg = prompts_for(findings, pair)
        probs = zero_shot_probabilities(enc_test["image"], encode_texts(loaded, pos, device),
                                        encode_texts(loaded, neg, device))
        scores_by_pair.append(probs)
        per_pair.append(binary_metrics(y, probs, findings, cfg.threshold)["mean"].get("auc"))
    scores = scores_by_pair[cfg.prompt_pair]
    zero_shot = binary_metrics(y, scores, findings, cfg.threshold)
    classifier_scores = torch.sigmoid(loaded.model.classifier(torch.from_numpy(enc_test["image"]).to(device))).cpu()
    classifier = binary_metrics(y, classifier_scores.detach().numpy(), findings, cfg.threshold)
    ks = tuple(cfg.recall_at)
    retrieval = retrieval_recall(enc_test["report"], enc_test["image"], ks=ks, groups=studies)
    result = {
        "model": {"run": run_dir.name, "variant": loaded.spec["variant"], "findings": len(findings),
                  "text_encoder": "local BERT folder" if loaded.spec["text_model_dir"] else "site BERT (from scratch)"},
        "findings": findings,
        "n_test_studies": int(len(set(studies))), "n_test_series": len(test), "n_test_patients": int(len(set(patients))),
        "n_train_series": len(train),
        "prompt_pair": cfg.prompt_pair, "prompt_pairs": per_pair,
        "zero_shot": zero_shot,
        "classifier": {"mean": classifier["mean"], "per_finding": {k: {"auc": v["auc"]} for k, v in
                                                                  classifier["per_finding"].items()}},
        "retrieval": retrieval,
        "roc": roc_curves(y, scores, findings),
    }
    if cfg.bootstrap:
        result["zero_shot_ci"] = bootstrap_ci(y, scores, findings, n_resamples=cfg.bootstrap, seed=0, groups=patients)
        result["retrieval_ci"] = retrieval_bootstrap_ci(enc_test["report"], enc_test["image"], ks=ks, groups=studies,
                                                        n_resamples=cfg.bootstrap, seed=0)
    if train:
        probe = linear_probe(enc_train["features"], enc_train["labels"], enc_test["features"], y, findings)
        probe.pop("scores", None)
        result["linear_probe"] = probe
    out_dir = run_dir / "eval"
    paths = write_evaluation_report(result, out_dir, title=f"GreenRFM evaluation: run {run_dir.name}")
    result["seconds"] = time.perf_counter() - t0
    _log_to_mlflow(ws, site, run_dir, result, paths)
    return {"run_dir": str(run_dir), "report": {k: str(v) for k, v in paths.items()},
            "zero_shot_auc": zero_shot["mean"].get("auc"),
            "zero_shot_auc_ci": [result.get("zero_shot_ci", {}).get("mean_auc", {}).get(k) for k in ("low", "high")],
            "classifier_auc": classifier["mean"].get("auc"),
            "prompt_pairs": per_pair, "recall": retrieval["recall"], "random_recall": retrieval["random"],
            "linear_probe_auc": result.get("linear_probe", {}).get("mean_auc"),
            "n_test_studies": result["n_test_studies"], "findings_scored": zero_shot["n_findings_scored"],
            "seconds": result["seconds"]}


def _log_to_mlflow(ws: Workspace, site, run_dir: Path, result: dict, paths: dict) -> None:
    from appliance.tracking import open_run

    saved = json.loads((run_dir / "result.json").read_text())
    metrics = {"eval/zero_shot_auc": result["zero_shot"]["mean"].get("auc"),
               "eval/classifier_auc": result["classifier"]["mean"].get("auc"),
               "eval/linear_probe_auc": result.get("linear_probe", {}).get("mean_auc")}
    for metric in ("acc", "f1", "precision", "sensitivity", "specificity"):
        metrics[f"eval/zero_shot_{metric}"] = result["zero_shot"]["mean"].get(metric)
    for k, v in result["retrieval"]["recall"].items():
        metrics[f"eval/recall_at_{k}"] = v
    for i, auc in enumerate(result["prompt_pairs"]):
        metrics[f"eval/zero_shot_auc_pair{i}"] = auc
    ci = result.get("zero_shot_ci", {}).get("mean_auc", {})
    metrics.update({"eval/zero_shot_auc_ci_low": ci.get("low"), "eval/zero_shot_auc_ci_high": ci.get("high")})
    with open_run(ws.root, experiment=site.tracking.experiment, run_name=f"train-{run_dir.name}",
                  uri=site.tracking.uri, enabled=site.tracking.enabled,
                  resume_run_id=saved.get("mlflow_run_id")) as tracker:
        tracker.log_metrics(metrics, step=0)
        for path in paths.values():
            tracker.log_artifact(Path(path), "eval")
