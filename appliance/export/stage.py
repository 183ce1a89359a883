"""`rfm export`: a trained run -> ONNX graphs, parity on the site's own held-out volumes, TensorRT
engines (when a GPU and tensorrt are present), a Triton model repository and a model card.

Everything is built in `exports/.<run>.partial/` and renamed to `exports/<run>/` only when every
check passed, so an export that fails (a parity miss, a killed process) publishes nothing and the
next `rfm export` starts clean.
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from appliance.errors import ApplianceError
from appliance.export.model_card import (INTENDED_USE, LIMITATIONS, input_contract, metrics_summary,
                                         training_data_summary, write_model_card)
from appliance.export.onnx_export import (IMAGE_INPUT, ExportError, export_image_encoder, export_text_encoder,
                                          onnx_io)
from appliance.export.runtime import OrtRunner, embedding_parity, file_sha256, link_or_copy, quantize_int8
from appliance.export.triton import TritonModel, validate_triton_repository, write_triton_repository
from appliance.progress import Progress, SilentProgress
from appliance.workspace import Workspace

IMAGE_ONNX = "image_encoder.onnx"
TEXT_ONNX = "text_encoder.onnx"
IMAGE_FP16_ONNX = "image_encoder.fp16.onnx"
IMAGE_INT8_ONNX = "image_encoder.int8.onnx"
FP16_PLAN = "image_encoder.fp16.plan"
INT8_PLAN = "image_encoder.int8.plan"
TRITON_IMAGE, TRITON_TEXT = "greenrfm_image", "greenrfm_text"
TRITON_IMAGE_TRT, TRITON_IMAGE_TRT_INT8 = "greenrfm_image_trt", "greenrfm_image_trt_int8"
TEXT_MAX_BATCH = 64  # prompts and reports are embedded in small batches
BATCH = 4            # parity batches (a multiple-of-one; any size the graphs accept)


@dataclass
class ExportResult:
    out_dir: Path
    run: str
    exporter: dict
    parity: dict
    tensorrt: dict
    triton_models: list[str]
    files: list[dict]
    seconds: float
    timings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out_dir"] = str(self.out_dir)
        return d


@dataclass
class _ParityData:
    volumes: np.ndarray       # (N, 1, Z, Y, X) float32, centre crop
    labels: np.ndarray        # (N, C) 1 / 0 / -1
    texts: list[str]          # the series' report texts
    source: str               # which split they came from


def export_run(ws: Workspace, run_dir: Path | None = None, *, progress: Progress | None = None,
               tensorrt: str | None = None, int8: bool | None = None) -> ExportResult:
    """Export a finished training run (default: the newest). `tensorrt` (auto|on|off) and `int8`
    override site.yaml's export section."""
    from appliance.evaluate.stage import load_trained_model
    from appliance.train import latest_run

    t0 = time.perf_counter()
    site = ws.config()
    cfg = site.export
    tensorrt = tensorrt or cfg.tensorrt
    int8 = cfg.int8 if int8 is None else int8
    if tensorrt not in ("auto", "on", "off"):
        raise ApplianceError(f"--tensorrt {tensorrt}: use auto, on or off")
    if tensorrt == "on":  # asked for: say so before minutes of export work, not after
        from appliance.export.tensorrt import tensorrt_status

        usable, why = tensorrt_status()
        if not usable:
            raise ExportError(f"TensorRT was asked for (tensorrt: on) but cannot run here: {why}")
    progress = progress or SilentProgress()
    run_dir = Path(run_dir) if run_dir else latest_run(ws, finished=True)
    if run_dir is None:
        raise ApplianceError("no finished training run in runs/train: run `rfm train` first")
    if not (run_dir / "result.json").is_file():
        raise ApplianceError(f"run {run_dir.name} has not finished (no result.json); finish it with `rfm train --resume`")
    loaded = load_trained_model(run_dir, "cpu")
    model, findings, crop = loaded.model, loaded.findings, loaded.crop

    ws.exports.mkdir(parents=True, exist_ok=True)
    staging = ws.exports / f".{run_dir.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)  # what a killed or failed export left
    staging.mkdir()
    timings: dict[str, float] = {}
    steps = 6 + (1 if int8 else 0)
    progress.start(f"export: run {run_dir.name}", steps)

    def timed(name: str, fn, *args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        timings[name] = round(time.perf_counter() - start, 2)
        progress.advance()
        return out

    try:
        image_graph = timed("onnx_image", export_image_encoder, model, crop, staging / IMAGE_ONNX, exporter=cfg.exporter)
        text_graph = timed("onnx_text", export_text_encoder, model, loaded.tokenizer.max_length, staging / TEXT_ONNX,
                           exporter=cfg.exporter)
        loaded.tokenizer.save(staging / "tokenizer")
        data = _parity_data(ws, run_dir, loaded, cfg.parity_series)
        reference = _torch_outputs(loaded, data, site.evaluate.prompt_pair)
        parity = timed("parity_onnx", _onnx_parity, staging, loaded, data, reference, site.evaluate)
        _require(parity["image_onnx"]["image_embedding"], cfg.min_cosine_fp32, IMAGE_ONNX)
        _require(parity["image_onnx"]["logits"], cfg.min_cosine_fp32, f"{IMAGE_ONNX} logits")
        _require(parity["text_onnx"]["text_embedding"], cfg.min_cosine_fp32, TEXT_ONNX)
        _write_zero_shot(staging / "zero_shot.json", findings, reference, site.evaluate.prompt_pair)

        if int8:
            calibration = _calibration_volumes(ws, run_dir, loaded, cfg.calibration_series)
            quant = timed("int8_quantise", quantize_int8, staging / IMAGE_ONNX, staging / IMAGE_INT8_ONNX,
                          iter(calibration), cfg.calibration_method)
            parity["image_int8_onnx"] = _image_parity(_image_outputs(OrtRunner(staging / IMAGE_INT8_ONNX).run, data),
                                                      data, reference, findings, site.evaluate) | {"quantisation": quant}
            _require(parity["image_int8_onnx"]["image_embedding"], cfg.min_cosine_int8, IMAGE_INT8_ONNX)

        trt = timed("tensorrt", _tensorrt_engines, staging, model, crop, data, reference, findings, site.evaluate,
                    cfg, tensorrt, int8, parity)
        triton_models = timed("triton", _triton_repository, staging, image_graph.path, text_graph.path, trt, cfg)
        files = _file_table(staging, parity)
        card = _model_card(ws, run_dir, loaded, site, parity, trt, files, data)
        write_model_card(staging, card)
        exporter = {"image": {"exporter": image_graph.exporter, "opset": image_graph.opset,
                              "fallback_reason": image_graph.fallback_reason},
                    "text": {"exporter": text_graph.exporter, "opset": text_graph.opset,
                             "fallback_reason": text_graph.fallback_reason}}
        result = ExportResult(ws.exports / run_dir.name, run_dir.name, exporter, parity, trt, triton_models, files,
                              time.perf_counter() - t0, timings)
        (staging / "export.json").write_text(json.dumps(result.to_dict() | {"out_dir": None}, indent=2, default=str))
        _write_checksums(staging)
        progress.advance()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    out = ws.exports / run_dir.name
    if out.exists():
        previous = ws.exports / f".{run_dir.name}.previous"
        shutil.rmtree(previous, ignore_errors=True)
        out.rename(previous)
        staging.rename(out)
        shutil.rmtree(previous, ignore_errors=True)
    else:
        staging.rename(out)
    result.seconds = time.perf_counter() - t0
    _log_to_mlflow(ws, site, run_dir, result)
    return result


# --- parity ------------------------------------------------------------------------------------


def _parity_data(ws: Workspace, run_dir: Path, loaded, n: int) -> _ParityData:
    """Up to n held-out test series of the run (the validation or training split when it has none)."""
    split = json.loads((run_dir / "split.json").read_text())
    part = next((p for p in ("test", "val", "train") if split.get(p)), None)
    items = _items(ws, loaded, split[part][:n] if part else [])
    if not items:
        raise ExportError("no cached series of this run are left to check the export on (rebuild with `rfm preprocess`)")
    from appliance.train.data import VolumeReportDataset

    ds = VolumeReportDataset(items, loaded.findings, loaded.tokenizer, loaded.crop, train=False)
    volumes = np.stack([ds[i]["volume"].numpy() for i in range(len(ds))]).astype(np.float32)
    labels = np.array([it.labels for it in items], dtype=int)
    return _ParityData(volumes, labels, [it.text for it in items], part)


def _items(ws: Workspace, loaded, keys: list[str]):
    from appliance.train.data import collect_training_data

    data = collect_training_data(ws, impression_first_order=loaded.impression_first, findings=loaded.findings)
    by_key = {it.series_key: it for it in data.items}
    return [by_key[k] for k in keys if k in by_key]


def _calibration_volumes(ws: Workspace, run_dir: Path, loaded, n: int) -> list[np.ndarray]:
    """INT8 calibration: up to n training series (never the test ones the parity is measured on)."""
    from appliance.train.data import VolumeReportDataset

    split = json.loads((run_dir / "split.json").read_text())
    items = _items(ws, loaded, split["train"][:n])
    ds = VolumeReportDataset(items, loaded.findings, loaded.tokenizer, loaded.crop, train=False)
    return [ds[i]["volume"].numpy()[None].astype(np.float32) for i in range(len(ds))]


def _batches(n: int, size: int = BATCH):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


@torch.no_grad()
def _torch_outputs(loaded, data: _ParityData, prompt_pair: int) -> dict:
    """PyTorch fp32 (CPU) outputs: the reference every exported graph is compared with."""
    from appliance.evaluate.zero_shot import PROMPT_PAIRS, prompts_for

    model = loaded.model
    emb, logits = [], []
    for s in _batches(len(data.volumes)):
        z = model.encode_image(torch.from_numpy(data.volumes[s]))
        emb.append(z.numpy())
        logits.append(model.image_logits(z).numpy())
    texts = _text_inputs(loaded, data)
    ids, mask = loaded.tokenizer.encode(texts)
    text_emb = np.concatenate([model.encode_text(ids[s], mask[s]).numpy() for s in _batches(len(texts), 16)])
    n_reports = len(data.texts)
    prompts = {}
    offset = n_reports
    for pair in range(len(PROMPT_PAIRS)):
        pos, neg = prompts_for(loaded.findings, pair)
        k = len(pos)
        prompts[pair] = {"positive": pos, "negative": neg, "positive_embedding": text_emb[offset:offset + k],
                         "negative_embedding": text_emb[offset + k:offset + 2 * k]}
        offset += 2 * k
    return {"image_embedding": np.concatenate(emb), "logits": np.concatenate(logits), "text_embedding": text_emb,
            "n_reports": n_reports, "prompts": prompts, "prompt_pair": prompt_pair}


def _text_inputs(loaded, data: _ParityData) -> list[str]:
    from appliance.evaluate.zero_shot import PROMPT_PAIRS, prompts_for

    texts = list(data.texts)
    for pair in range(len(PROMPT_PAIRS)):
        pos, neg = prompts_for(loaded.findings, pair)
        texts += pos + neg
    return texts


def _zero_shot_auc(image_embedding: np.ndarray, prompts: dict, labels: np.ndarray, findings: list[str],
                   threshold: float) -> float | None:
    from appliance.evaluate.metrics import binary_metrics
    from appliance.evaluate.zero_shot import zero_shot_probabilities

    probs = zero_shot_probabilities(image_embedding, prompts["positive_embedding"], prompts["negative_embedding"])
    return binary_metrics(labels, probs, findings, threshold)["mean"].get("auc")


def _image_outputs(run, data: _ParityData) -> dict[str, np.ndarray]:
    """Run an exported image graph or engine (`run(volume=...)`) over the parity volumes."""
    outputs: dict[str, list[np.ndarray]] = {"image_embedding": [], "logits": []}
    for s in _batches(len(data.volumes)):
        out = run(**{IMAGE_INPUT: data.volumes[s]})
        for name in outputs:
            outputs[name].append(np.asarray(out[name], dtype=np.float32))
    return {k: np.concatenate(v) for k, v in outputs.items()}


def _image_parity(got: dict[str, np.ndarray], data: _ParityData, reference: dict, findings: list[str],
                  eval_cfg) -> dict:
    prompts = reference["prompts"][reference["prompt_pair"]]
    return {"image_embedding": embedding_parity(reference["image_embedding"], got["image_embedding"]),
            "logits": embedding_parity(reference["logits"], got["logits"]),
            "zero_shot_auc": _zero_shot_auc(got["image_embedding"], prompts, data.labels, findings, eval_cfg.threshold)}


def _onnx_parity(staging: Path, loaded, data: _ParityData, reference: dict, eval_cfg) -> dict:
    findings = loaded.findings
    image_out = _image_outputs(OrtRunner(staging / IMAGE_ONNX).run, data)
    text_runner = OrtRunner(staging / TEXT_ONNX)
    texts = _text_inputs(loaded, data)
    ids, mask = loaded.tokenizer.encode(texts)
    text_emb = np.concatenate([text_runner.run(input_ids=ids[s].numpy(), attention_mask=mask[s].numpy())["text_embedding"]
                               for s in _batches(len(texts), 16)])
    pair = reference["prompt_pair"]
    n = reference["n_reports"] + 2 * len(findings) * pair
    k = len(findings)
    onnx_prompts = {"positive_embedding": text_emb[n:n + k], "negative_embedding": text_emb[n + k:n + 2 * k]}
    prompts = reference["prompts"][pair]
    return {
        "n_series": len(data.volumes), "split": data.source, "prompt_pair": pair,
        "pytorch_zero_shot_auc": _zero_shot_auc(reference["image_embedding"], prompts, data.labels, findings,
                                                eval_cfg.threshold),
        "image_onnx": _image_parity(image_out, data, reference, findings, eval_cfg),
        "text_onnx": {"text_embedding": embedding_parity(reference["text_embedding"], text_emb),
                      "n_texts": len(texts)},
        # both halves exported: image and prompt embeddings from the ONNX graphs
        "onnx_end_to_end_zero_shot_auc": _zero_shot_auc(image_out["image_embedding"], onnx_prompts, data.labels,
                                                        findings, eval_cfg.threshold),
    }


def _require(measure: dict, minimum: float, what: str) -> None:
    if not measure.get("finite", True) or not measure["cosine_min"] >= minimum:
        raise ExportError(f"{what} does not match PyTorch: min cosine {measure['cosine_min']:.6f} < {minimum} "
                          f"(max abs diff {measure['max_abs_diff']:.3g}); nothing was exported")


def _write_zero_shot(path: Path, findings: list[str], reference: dict, prompt_pair: int) -> None:
    """Prompt embeddings for every prompt pair, so an inference system scores findings zero-shot
    without running the text encoder: P = sigmoid(img . pos - img . neg)."""
    pairs = [{"pair": pair, "positive": p["positive"], "negative": p["negative"],
              "positive_embedding": np.round(p["positive_embedding"], 7).tolist(),
              "negative_embedding": np.round(p["negative_embedding"], 7).tolist()}
             for pair, p in reference["prompts"].items()]
    path.write_text(json.dumps({"findings": findings, "default_pair": prompt_pair,
                                "score": "P(finding) = sigmoid(image_embedding . positive - image_embedding . negative)",
                                "pairs": pairs}))


# --- TensorRT and Triton -----------------------------------------------------------------------


def _tensorrt_engines(staging: Path, model, crop, data, reference, findings, eval_cfg, cfg, mode: str, int8: bool,
                      parity: dict) -> dict:
    from appliance.export.tensorrt import EngineProfile, TensorRTRunner, build_engine, tensorrt_status

    if mode == "off":
        return {"built": [], "skipped": "export.tensorrt is off"}
    usable, why = tensorrt_status()
    if not usable:
        return {"built": [], "skipped": why}
    x, y, z = crop
    profile = EngineProfile(cfg.min_batch, cfg.opt_batch, cfg.max_batch)
    export_image_encoder(model, crop, staging / IMAGE_FP16_ONNX, exporter=cfg.exporter, dtype=torch.float16)
    engines = {"fp16": (staging / IMAGE_FP16_ONNX, staging / FP16_PLAN, cfg.min_cosine_fp16)}
    if int8:
        engines["int8"] = (staging / IMAGE_INT8_ONNX, staging / INT8_PLAN, cfg.min_cosine_int8)
    out = {"built": [], "status": why, "profile": asdict(profile), "engines": {}}
    for precision, (graph, plan, minimum) in engines.items():
        info = build_engine(graph, plan, IMAGE_INPUT, (z, y, x), profile, cfg.workspace_gb)
        key = f"image_tensorrt_{precision}"
        parity[key] = _image_parity(_image_outputs(TensorRTRunner(plan).run, data), data, reference, findings, eval_cfg)
        _require(parity[key]["image_embedding"], minimum, plan.name)
        out["engines"][precision] = info | {"file": plan.name}
        out["built"].append(precision)
    return out


def _triton_repository(staging: Path, image_onnx: Path, text_onnx: Path, trt: dict, cfg) -> list[str]:
    image_io = onnx_io(image_onnx)
    preferred = tuple(sorted({cfg.opt_batch, cfg.max_batch}))
    models = [TritonModel(TRITON_IMAGE, "onnxruntime_onnx", image_onnx, image_io, cfg.max_batch, preferred),
              TritonModel(TRITON_TEXT, "onnxruntime_onnx", text_onnx, onnx_io(text_onnx), TEXT_MAX_BATCH)]
    for precision, name in (("fp16", TRITON_IMAGE_TRT), ("int8", TRITON_IMAGE_TRT_INT8)):
        if precision in trt.get("built", []):
            models.append(TritonModel(name, "tensorrt_plan", staging / trt["engines"][precision]["file"], image_io,
                                      cfg.max_batch, preferred, gpu_only=True))
    repository = staging / "triton"
    write_triton_repository(repository, models, link_or_copy)
    problems = validate_triton_repository(repository)
    if problems:
        raise ExportError(f"the Triton repository is not valid: {problems[0]}")
    return [m.name for m in models]


# --- files, card, tracking ---------------------------------------------------------------------

FILE_ROLES = {
    IMAGE_ONNX: ("image encoder, ONNX fp32", "image_onnx"),
    TEXT_ONNX: ("text encoder + projection, ONNX fp32", "text_onnx"),
    IMAGE_FP16_ONNX: ("image encoder, ONNX fp16 weights (TensorRT source)", None),
    IMAGE_INT8_ONNX: ("image encoder, ONNX INT8 Q/DQ", "image_int8_onnx"),
    FP16_PLAN: ("image encoder, TensorRT FP16 engine", "image_tensorrt_fp16"),
    INT8_PLAN: ("image encoder, TensorRT INT8 engine", "image_tensorrt_int8"),
    "zero_shot.json": ("prompt embeddings for zero-shot scoring", None),
}


def _file_table(staging: Path, parity: dict) -> list[dict]:
    rows = []
    for name, (what, key) in FILE_ROLES.items():
        path = staging / name
        if not path.is_file():
            continue
        row = {"path": name, "what": what, "bytes": path.stat().st_size, "sha256": file_sha256(path)}
        if key and key in parity:
            measure = parity[key].get("image_embedding") or parity[key].get("text_embedding")
            row["cosine_min"] = measure["cosine_min"]
            row["zero_shot_auc"] = parity[key].get("zero_shot_auc")
        rows.append(row)
    return rows


def _write_checksums(staging: Path) -> None:
    lines = [f"{file_sha256(p)}  {p.relative_to(staging).as_posix()}" for p in sorted(staging.rglob("*"))
             if p.is_file() and p.name != "SHA256SUMS"]
    (staging / "SHA256SUMS").write_text("\n".join(lines) + "\n")


def _software() -> dict:
    from importlib import metadata

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {"rfm_appliance": version("rfm-appliance"), "python": platform.python_version(), "torch": torch.__version__,
            "onnx": version("onnx"), "onnxruntime": version("onnxruntime") or version("onnxruntime-gpu"),
            "tensorrt": version("tensorrt") or version("tensorrt-cu12") or version("tensorrt-cu13")}


def _model_card(ws: Workspace, run_dir: Path, loaded, site, parity: dict, trt: dict, files: list[dict],
                data: _ParityData) -> dict:
    from appliance.models.greenrfm import PATCH_SIZES

    result = json.loads((run_dir / "result.json").read_text())
    model = loaded.model
    spec = loaded.spec
    count = lambda module: sum(p.numel() for p in module.parameters())
    cache_settings = _cache_settings(ws) or site.preprocess.model_dump(mode="json")
    return {
        "site": site.site.name,
        "exported_at": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "model": {"name": f"greenrfm-{'l' if spec['variant'] == 'lite' else 'full'}-{site.site.name}-{run_dir.name}",
                  "run": run_dir.name, "variant": spec["variant"], "patch": PATCH_SIZES[spec["variant"]],
                  "embed_dim": spec["embed_dim"], "findings": loaded.findings,
                  "text_encoder": "local BERT folder" if spec.get("text_model_dir") else
                                  "BERT trained from scratch with a site WordPiece vocabulary",
                  "image_parameters": count(model.vision) + count(model.image_proj) + count(model.classifier),
                  "text_parameters": count(model.text) + count(model.text_proj)},
        "intended_use": INTENDED_USE,
        "limitations": LIMITATIONS,
        "training_data": training_data_summary(ws, run_dir),
        "hardware_plan": {k: v for k, v in result["plan"].items() if k != "reasons"} | {"reasons": result["plan"].get("reasons")},
        "phases": [{"name": p["name"], "epochs": p["epochs"], "steps": p["steps"]} for p in result["phases"]],
        "energy": {k: result.get("energy", {}).get(k) for k in ("total_kwh", "co2e_g", "gpu_method")},
        "metrics": metrics_summary(run_dir),
        "input_contract": input_contract(run_dir, cache_settings, loaded.crop),
        "parity": {"n_series": parity["n_series"], "split": parity["split"],
                   "pytorch_zero_shot_auc": parity["pytorch_zero_shot_auc"],
                   "onnx_end_to_end_zero_shot_auc": parity["onnx_end_to_end_zero_shot_auc"]},
        "tensorrt_skipped": trt.get("skipped"),
        "files": files,
        "software": _software(),
    }


def _cache_settings(ws: Workspace) -> dict | None:
    """The preprocessing settings the cached volumes were actually made with."""
    meta = next(iter(sorted(ws.cache.glob("*.json"))), None) if ws.cache.is_dir() else None
    return json.loads(meta.read_text()).get("settings") if meta else None


def _log_to_mlflow(ws: Workspace, site, run_dir: Path, result: ExportResult) -> None:
    from appliance.tracking import open_run

    saved = json.loads((run_dir / "result.json").read_text())
    p = result.parity
    metrics = {"export/onnx_image_cosine_min": p["image_onnx"]["image_embedding"]["cosine_min"],
               "export/onnx_text_cosine_min": p["text_onnx"]["text_embedding"]["cosine_min"],
               "export/onnx_zero_shot_auc": p["image_onnx"]["zero_shot_auc"],
               "export/pytorch_zero_shot_auc": p["pytorch_zero_shot_auc"], "export/seconds": result.seconds}
    for precision in result.tensorrt.get("built", []):
        metrics[f"export/tensorrt_{precision}_cosine_min"] = p[f"image_tensorrt_{precision}"]["image_embedding"]["cosine_min"]
    with open_run(ws.root, experiment=site.tracking.experiment, run_name=f"train-{run_dir.name}",
                  uri=site.tracking.uri, enabled=site.tracking.enabled,
                  resume_run_id=saved.get("mlflow_run_id")) as tracker:
        tracker.log_metrics(metrics, step=0)
        for name in ("model_card.md", "model_card.json", "export.json", "SHA256SUMS"):
            tracker.log_artifact(result.out_dir / name, "export")
