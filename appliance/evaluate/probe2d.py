"""`rfm probe`: frozen-encoder evaluation of 2D encoders on the site's radiographs, as in the
continual pre-training paper (RECIPES.md section 3).

Encoders are named by reference: `start` (the site's open weights, `pretrain.encoder`), a
pre-training run folder (its `encoder/`), or a folder of open weights. All are scored on the same
images with the pre-training split (the test patients were never pre-trained on): features from
several blocks, a multi-layer attention probe per seed, AUPRC and AUROC per finding and per
line/tube with patient CIs, a paired hierarchical bootstrap of every encoder against the first,
subgroup tables, and a power law of the metric against the number of pre-training images when
runs of one objective differ in `max_images`. Results land in runs/probe/<stamp>/.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from appliance.errors import ApplianceError
from appliance.evaluate.frozen import ProbeConfig, evaluate_frozen_encoders, extract_layer_features
from appliance.evaluate.frozen_report import write_probe_report
from appliance.evaluate.scaling import scaling_fits
from appliance.evaluate.stage import inference_device
from appliance.models.encoders2d import EncoderSpec2D, build_image_encoder
from appliance.progress import Progress, SilentProgress
from appliance.train.data import split_by_patient
from appliance.train.pretrain import DEFAULT_RADIOGRAPH_SIZE, ENCODER_DIR, RESULT
from appliance.train.pretrain_data import RadiographItem, collect_radiographs, load_image, resize
from appliance.train.trainer import _new_run_dir, _write_json, latest_run
from appliance.workspace import Workspace

START = "start"
LINES_TUBES_VOCABULARY = "cxr_lines_tubes_10"


@dataclass(frozen=True)
class EncoderRef:
    name: str
    spec: EncoderSpec2D
    objective: str | None = None
    n_images: int | None = None  # pre-training images, for the scaling curve


def resolve_encoders(ws: Workspace, refs: Sequence[str]) -> list[EncoderRef]:
    """`start`, pre-training run folders and weights folders -> encoders to build; default: the
    site's open weights and the newest finished pre-training run."""
    site = ws.config()
    enc = site.pretrain.encoder
    size = enc.image_size or getattr(site.preprocess, "radiograph_size", DEFAULT_RADIOGRAPH_SIZE)
    if not refs:
        newest = latest_run(ws, finished=True, kind="pretrain")
        if newest is None:
            raise ApplianceError("no finished pre-training run to compare with the open weights: run `rfm pretrain` "
                                 "first, or name the encoders to probe")
        refs = [START, str(newest)]
    out, names = [], set()
    for ref in refs:
        if ref == START:
            weights = enc.weights_dir
            weights = str(weights if weights.is_absolute() else ws.root / weights) if weights else None
            item = EncoderRef("open weights" if weights else "random init", EncoderSpec2D(enc.family, enc.name, weights, size))
        else:
            path = Path(ref)
            path = path if path.is_absolute() or path.exists() else ws.root / path
            if (path / RESULT).is_file() and (path / ENCODER_DIR).is_dir():
                result = json.loads((path / RESULT).read_text())
                spec = EncoderSpec2D(**{**result["encoder"], "weights_dir": str(path / ENCODER_DIR),
                                        "activation_checkpointing": False})
                item = EncoderRef(f"{result['objective']} {path.name}", spec, result["objective"],
                                  result["n_images"]["train"])
            elif path.is_dir():
                item = EncoderRef(path.name, EncoderSpec2D(enc.family, enc.name, str(path), size))
            else:
                raise ApplianceError(f"encoder {ref}: not `start`, a pre-training run folder or a weights folder")
        if item.name in names:
            raise ApplianceError(f"encoder {item.name} named twice")
        names.add(item.name)
        out.append(item)
    return out


def _image_batches(items: Sequence[RadiographItem], size: int, batch_size: int) -> Iterator[np.ndarray]:
    for i in range(0, len(items), batch_size):
        yield torch.stack([resize(load_image(it.npy), size) for it in items[i:i + batch_size]]).numpy()


def lines_tubes_names() -> set[str]:
    from appliance.labels.vocabularies import load_vocabulary

    return set(load_vocabulary(LINES_TUBES_VOCABULARY).names)


def probe_workspace(ws: Workspace, encoders: Sequence[str] = (), *, seeds: int | None = None,
                    bootstrap: int | None = None, progress: Progress | None = None) -> dict:
    """Probe the encoders on the site's radiographs; returns the report's dict (paths included)."""
    from appliance.tracking import open_run

    t0 = time.perf_counter()
    site = ws.config()
    cfg, pcfg = site.probe, site.pretrain
    progress = progress or SilentProgress()
    refs = resolve_encoders(ws, list(encoders))
    data = collect_radiographs(ws, need_text=True)
    split = split_by_patient(data.items, pcfg.seed, pcfg.val_fraction, pcfg.test_fraction)
    if not split["val"] or not split["test"]:
        raise ApplianceError("the probe needs validation and test patients: set pretrain.val_fraction and "
                             "pretrain.test_fraction above 0")
    items = split["train"] + split["val"] + split["test"]  # contiguous splits
    split_of = ["train"] * len(split["train"]) + ["val"] * len(split["val"]) + ["test"] * len(split["test"])
    device = torch.device(inference_device(site))
    features = {}
    for ref in refs:
        progress.start(f"features {ref.name}", len(items))
        encoder = build_image_encoder(ref.spec)
        batches = _image_batches(items, ref.spec.image_size, 32)

        def counted(batches=batches):
            for b in batches:
                yield b
                progress.advance(len(b))

        features[ref.name] = extract_layer_features(encoder, counted(), layers=cfg.layers, device=device)
        del encoder
    lines_tubes = lines_tubes_names() & set(data.findings)
    config = ProbeConfig(lr=cfg.lr, batch_size=cfg.batch_size, max_epochs=cfg.max_epochs, patience=cfg.patience)
    n_seeds = seeds or cfg.seeds
    n_resamples = cfg.bootstrap if bootstrap is None else bootstrap
    progress.start("probe heads and bootstrap", None)
    result = evaluate_frozen_encoders(
        features, np.array([it.labels for it in items]), list(data.findings), split_of,
        [it.patient_key for it in items], lines_tubes=lines_tubes, meta=[it.meta for it in items],
        baseline=refs[0].name, seeds=tuple(range(n_seeds)), config=config, n_resamples=n_resamples,
        device=device)
    result.pop("test_scores")
    by_objective: dict[str, list[EncoderRef]] = {}
    for ref in refs:
        if ref.objective is not None:
            by_objective.setdefault(ref.objective, []).append(ref)
    curves = {obj: ([r.n_images for r in rs], [result["encoders"][r.name]["metrics"]["macro"]["findings"]["auprc"]
                                                 for r in rs])
              for obj, rs in by_objective.items() if len({r.n_images for r in rs}) >= 3}
    if curves:
        result["scaling"] = scaling_fits(curves)
    result["encoder_specs"] = {r.name: r.spec.to_dict() | {"objective": r.objective, "pretrain_images": r.n_images}
                               for r in refs}
    result["skipped"] = data.skipped
    run_dir = _new_run_dir(ws, "probe")
    json_path, md_path = write_probe_report(result, run_dir)
    result["report_json"], result["report_md"] = str(json_path), str(md_path)
    result["run_dir"] = str(run_dir)
    result["seconds"] = time.perf_counter() - t0
    _write_json(run_dir / "summary.json", {k: result[k] for k in ("baseline", "comparisons", "n_images", "seconds")})
    with open_run(ws.root, experiment=site.tracking.experiment, run_name=f"probe-{run_dir.name}",
                  uri=site.tracking.uri, enabled=site.tracking.enabled,
                  tags={"stage": "probe", "site": site.site.name,
                        "run_dir": run_dir.relative_to(ws.root).as_posix()}) as tracker:
        for i, ref in enumerate(refs):
            macro = result["encoders"][ref.name]["metrics"]["macro"]
            tracker.log_metrics({f"probe/encoder{i}/{group}_{m}": v for group, d in macro.items()
                                 for m, v in d.items() if m in ("auprc", "auroc") and v is not None}, step=0)
        for i, comp in enumerate(result["comparisons"], start=1):
            tracker.log_metrics({f"probe/encoder{i}_vs_0/{group}_{m}_p": d["p_value"]
                                 for group, by_metric in comp["macro"].items() for m, d in by_metric.items()
                                 if isinstance(d, dict) and d.get("p_value") is not None}, step=0)
        tracker.log_params({"encoders": [r.name for r in refs], "seeds": n_seeds, "bootstrap": n_resamples})
        tracker.log_artifacts(run_dir, "probe")
    return result
