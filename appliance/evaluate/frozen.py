"""Frozen-encoder evaluation of 2D image encoders as in RECIPES.md section 3.

1. `extract_layer_features`: tokens (CLS first) after several blocks of a frozen encoder, once per encoder,
   as an (N, L, T, D) float16 array (optionally written into a caller's memmap).
2. `train_frozen_probe` / `probe_scores`: a multi-label probe over those features: each layer's tokens
   projected (Linear D -> d), concatenated along the feature axis, attention pooling with a learned query,
   LayerNorm, Linear -> C logits; BCE with uncertain (-1) labels masked out, Adam, early stopping on the
   validation mean AUPRC (heads.train_early_stopped), one model per seed.
3. `evaluate_frozen_encoders`: the whole protocol for two or more encoders on the same labelled images:
   probes per seed, seed-averaged test scores, AUPRC/AUROC per task and macro per group (findings, lines/tubes)
   with patient bootstrap CIs, the paired hierarchical bootstrap of every encoder against a baseline, and
   subgroup tables (sex, age band, manufacturer, view position). `frozen_report.write_probe_report` writes it.

Only opaque keys (series keys, patient codes) ever reach this module; nothing here logs or writes them.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score
from torch import nn

from appliance.distill.heads import train_early_stopped
from appliance.errors import ApplianceError
from appliance.evaluate.bootstrap import paired_hierarchical_bootstrap, task_groups, task_metrics

DEFAULT_LAYERS = (-4, -3, -2, -1)
SUBGROUP_KEYS = ("sex", "age_band", "manufacturer", "view_position")
AGE_BANDS = ("<40", "40-59", "60-79", "80+")
UNKNOWN = "unknown"


@runtime_checkable
class FrozenImageEncoder(Protocol):
    """What the evaluation needs from an image encoder (appliance.models.encoders2d.ImageEncoder2D has it)."""

    embed_dim: int
    n_layers: int

    def layer_tokens(self, images: torch.Tensor, layers: Sequence[int]) -> list[torch.Tensor]:
        """images (B, 1, S, S) in [0, 1]; one (B, T, D) tensor per requested block index (negative = from the
        end), tokens including the CLS token first."""
        ...


# --- features ---------------------------------------------------------------------------------------------

def _image_batches(images: np.ndarray | Iterable[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
    if isinstance(images, np.ndarray):
        if images.ndim not in (3, 4) or len(images) == 0:
            raise ValueError(f"images must be a non-empty (N, S, S) or (N, 1, S, S) array, got {images.shape}")
        for start in range(0, len(images), batch_size):
            yield images[start:start + batch_size]
    else:
        yield from images


def _amp(device: torch.device, enabled: bool):
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def extract_layer_features(encoder: FrozenImageEncoder, images: np.ndarray | Iterable[np.ndarray],
                           layers: Sequence[int] = DEFAULT_LAYERS, batch_size: int = 32,
                           device: str | torch.device = "cpu", out: np.ndarray | None = None,
                           amp: bool = True) -> np.ndarray:
    """(N, L, T, D) float16 tokens after each block in `layers`, CLS first, from a frozen encoder.

    `images`: an (N, S, S) or (N, 1, S, S) array in [0, 1], or an iterable of such batches (e.g.
    cached_image_batches). The encoder runs in eval mode under inference_mode (float16 autocast on CUDA when
    `amp`); an nn.Module encoder is moved to `device` and its train/eval mode is restored afterwards.
    `out`: an optional preallocated (N, L, T, D) array (e.g. np.lib.format.open_memmap) filled in place and
    returned, for feature sets larger than memory.
    """
    layers = tuple(int(i) for i in layers)
    n_layers = int(encoder.n_layers)
    if not layers or any(not -n_layers <= i < n_layers for i in layers):
        raise ValueError(f"layers {layers} out of range for an encoder with {n_layers} blocks")
    device = torch.device(device)
    module = encoder if isinstance(encoder, nn.Module) else None
    was_training = module.training if module is not None else False
    if module is not None:
        module.to(device).eval()
    chunks: list[np.ndarray] = []
    n_done = 0
    try:
        with torch.inference_mode(), _amp(device, amp):
            for batch in _image_batches(images, batch_size):
                x = torch.as_tensor(np.asarray(batch)).to(device=device, dtype=torch.float32)
                x = x.unsqueeze(1) if x.ndim == 3 else x
                if x.ndim != 4 or x.shape[1] != 1:
                    raise ValueError(f"image batch must be (B, S, S) or (B, 1, S, S), got {tuple(x.shape)}")
                if x.numel() and (x.min() < -1e-3 or x.max() > 1 + 1e-3):
                    raise ValueError("images must be scaled to [0, 1] (the preprocessing cache format)")
                tokens = encoder.layer_tokens(x, layers)
                if len(tokens) != len(layers):
                    raise ValueError(f"encoder returned {len(tokens)} token layers for {len(layers)} requested")
                feats = torch.stack([t.float() for t in tokens], dim=1)  # (B, L, T, D)
                if feats.shape[0] != x.shape[0] or feats.shape[-1] != encoder.embed_dim:
                    raise ValueError(f"encoder tokens {tuple(feats.shape)} do not match batch {x.shape[0]} and "
                                     f"embed_dim {encoder.embed_dim}")
                if not torch.isfinite(feats).all():
                    raise ApplianceError("the encoder produced non-finite features (try amp=False)")
                arr = feats.to(torch.float16).cpu().numpy()
                if np.isinf(arr).any():
                    raise ApplianceError("features overflow float16; the encoder's activations are too large")
                if out is not None:
                    if n_done + len(arr) > len(out) or out.shape[1:] != arr.shape[1:]:
                        raise ValueError(f"out {out.shape} cannot hold features of shape {arr.shape[1:]} "
                                         f"for image {n_done + len(arr)}")
                    out[n_done:n_done + len(arr)] = arr
                else:
                    chunks.append(arr)
                n_done += len(arr)
    finally:
        if module is not None:
            module.train(was_training)
    if n_done == 0:
        raise ValueError("no images to extract features from")
    if out is not None:
        if n_done != len(out):
            raise ValueError(f"out holds {len(out)} rows but {n_done} images were given")
        return out
    return np.concatenate(chunks)


def check_cached_images(cache_dir: str | Path, series_keys: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """Keys whose cache/<key>.npy is a readable 2D image of the common size, and {key: reason} for the rest."""
    usable, problems, size = [], {}, None
    for key in series_keys:
        path = Path(cache_dir) / f"{key}.npy"
        try:
            arr = np.load(path, mmap_mode="r")
        except FileNotFoundError:
            problems[key] = "cached image missing"
            continue
        except (ValueError, OSError) as err:
            problems[key] = f"cached image unreadable ({type(err).__name__})"
            continue
        if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
            problems[key] = f"cached image has shape {arr.shape}, expected (S, S)"
        elif size is not None and arr.shape != size:
            problems[key] = f"cached image is {arr.shape}, others are {size}"
        else:
            size = arr.shape
            usable.append(key)
    return usable, problems


def cached_image_batches(cache_dir: str | Path, series_keys: Sequence[str], batch_size: int = 32
                         ) -> Iterator[np.ndarray]:
    """(B, S, S) float32 batches of cache/<key>.npy in key order (check_cached_images first)."""
    for start in range(0, len(series_keys), batch_size):
        yield np.stack([np.load(Path(cache_dir) / f"{key}.npy").astype(np.float32)
                        for key in series_keys[start:start + batch_size]])


def read_cached_meta(cache_dir: str | Path, series_keys: Sequence[str]) -> list[dict]:
    """cache/<key>.json per key (sex, age_years, manufacturer, view_position, modality); {} when absent."""
    out = []
    for key in series_keys:
        path = Path(cache_dir) / f"{key}.json"
        try:
            out.append(json.loads(path.read_text()))
        except (FileNotFoundError, json.JSONDecodeError):
            out.append({})
    return out


# --- probe ------------------------------------------------------------------------------------------------

@dataclass
class ProbeConfig:
    proj_dim: int = 64        # d, per layer; the pooled width is L * d
    n_heads: int = 4          # attention heads of the pooling query
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 64
    max_epochs: int = 100
    patience: int = 10


class MultiLayerAttentionProbe(nn.Module):
    """(B, L, T, D) tokens -> per-layer Linear D->d, concatenated (B, T, L*d) -> learned-query attention pool
    -> LayerNorm -> Linear -> (B, C) logits."""

    def __init__(self, n_layers: int, embed_dim: int, n_tasks: int, proj_dim: int = 64, n_heads: int = 4):
        super().__init__()
        width = n_layers * proj_dim
        if width % n_heads:
            raise ValueError(f"pooled width {width} (layers x proj_dim) is not divisible by n_heads {n_heads}")
        self.proj = nn.ModuleList(nn.Linear(embed_dim, proj_dim) for _ in range(n_layers))
        self.query = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.attn = nn.MultiheadAttention(width, n_heads, batch_first=True)
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, n_tasks)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        tokens = torch.cat([proj(features[:, i]) for i, proj in enumerate(self.proj)], dim=-1)
        pooled, _ = self.attn(self.query.expand(tokens.shape[0], -1, -1), tokens, tokens, need_weights=False)
        return self.fc(self.norm(pooled[:, 0]))


@dataclass
class ProbeModel:
    head: MultiLayerAttentionProbe
    feature_shape: tuple[int, int, int]  # (L, T, D)
    n_tasks: int
    seed: int
    config: ProbeConfig
    info: dict = field(default_factory=dict)  # best_epoch, epochs_run, best_val_macro_auprc, best_val_loss


def _check_xy(x: np.ndarray, y: np.ndarray, split: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"{split} features must be (N, L, T, D), got shape {x.shape}")
    if y.ndim != 2 or y.shape[0] != x.shape[0]:
        raise ValueError(f"{split} labels must be (N, C) with N = {x.shape[0]}, got shape {y.shape}")
    if not np.isin(y, (-1, 0, 1)).all():
        raise ValueError(f"{split} labels must be 1, 0 or -1")


def _rows(x: np.ndarray, idx: np.ndarray, device: torch.device) -> torch.Tensor:
    # Row-wise reads keep a memmapped feature file on disk; sorted indices read it in order.
    return torch.from_numpy(np.ascontiguousarray(x[idx])).to(device=device, dtype=torch.float32)


def masked_bce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean BCE over the (image, task) pairs with a definite label; uncertain (-1) pairs carry no loss."""
    mask = (y != -1).to(logits.dtype)
    loss = F.binary_cross_entropy_with_logits(logits, y.clamp_min(0).to(logits.dtype), reduction="none")
    return (loss * mask).sum() / mask.sum().clamp_min(1.0)


def scorable_tasks(y: np.ndarray) -> list[int]:
    """Columns of (N, C) 1/0/-1 labels that hold both a positive and a negative."""
    return [c for c in range(y.shape[1]) if (y[:, c] == 1).any() and (y[:, c] == 0).any()]


def mean_auprc(y: np.ndarray, scores: np.ndarray) -> float | None:
    """Mean average precision over tasks with both classes among the definite labels; None if there is none."""
    values = [average_precision_score(y[y[:, c] != -1, c], scores[y[:, c] != -1, c]) for c in scorable_tasks(y)]
    return float(np.mean(values)) if values else None


@torch.no_grad()
def _logits(head: nn.Module, x: np.ndarray, device: torch.device, batch_size: int) -> torch.Tensor:
    head.eval()
    return torch.cat([head(_rows(x, np.arange(i, min(i + batch_size, len(x))), device)).float().cpu()
                      for i in range(0, len(x), batch_size)])


def train_frozen_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, *,
                       seed: int, config: ProbeConfig | None = None, device: str | torch.device = "cpu"
                       ) -> ProbeModel:
    """Fit a MultiLayerAttentionProbe on (N, L, T, D) features and (N, C) 1/0/-1 labels.

    Early stopping on the validation mean AUPRC (tasks with both classes in `val`); with no such task, on the
    validation loss. Features may be float16 or a memmap: batches are converted on the fly.
    """
    config = config or ProbeConfig()
    train_y, val_y = np.asarray(train_y, dtype=np.int64), np.asarray(val_y, dtype=np.int64)
    _check_xy(train_x, train_y, "train")
    _check_xy(val_x, val_y, "validation")
    if train_x.shape[1:] != val_x.shape[1:] or train_y.shape[1] != val_y.shape[1]:
        raise ValueError(f"train {train_x.shape}/{train_y.shape} and validation {val_x.shape}/{val_y.shape} differ")
    device = torch.device(device)
    n_layers, _, dim = train_x.shape[1:]
    torch.manual_seed(seed)
    head = MultiLayerAttentionProbe(n_layers, dim, train_y.shape[1], config.proj_dim, config.n_heads).to(device)
    y_train_t = torch.from_numpy(train_y)
    by_auprc = bool(scorable_tasks(val_y))

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        idx = np.sort(idx.numpy())
        return masked_bce(head(_rows(train_x, idx, device)), y_train_t[idx].to(device))

    def validate() -> tuple[float, dict]:
        logits = _logits(head, val_x, device, 4 * config.batch_size)
        loss = float(masked_bce(logits, torch.from_numpy(val_y)))
        auprc = mean_auprc(val_y, torch.sigmoid(logits).numpy()) if by_auprc else None
        return (auprc if by_auprc else -loss), {"best_val_macro_auprc": auprc, "best_val_loss": loss}

    head, info = train_early_stopped(head, len(train_x), batch_loss, validate, lr=config.lr,
                                     weight_decay=config.weight_decay, batch_size=config.batch_size,
                                     max_epochs=config.max_epochs, patience=config.patience, seed=seed)
    info["selected_by"] = "val_macro_auprc" if by_auprc else "val_loss"
    return ProbeModel(head.cpu(), tuple(int(v) for v in train_x.shape[1:]), int(train_y.shape[1]), seed, config,
                      info)


def probe_scores(model: ProbeModel, x: np.ndarray, batch_size: int = 256,
                 device: str | torch.device = "cpu") -> np.ndarray:
    """(N, C) probabilities (sigmoid of the probe's logits) for (N, L, T, D) features."""
    if x.ndim != 4 or tuple(x.shape[1:]) != model.feature_shape:
        raise ValueError(f"features {x.shape} do not match the probe's (N, {', '.join(map(str, model.feature_shape))})")
    device = torch.device(device)
    head = model.head.to(device)
    try:
        return torch.sigmoid(_logits(head, x, device, batch_size)).double().numpy()
    finally:
        model.head.cpu()


# --- subgroups --------------------------------------------------------------------------------------------

def age_band(age_years) -> str:
    """"<40", "40-59", "60-79", "80+", or "unknown" when missing or not a number."""
    try:
        age = float(age_years)
    except (TypeError, ValueError):
        return UNKNOWN
    if not math.isfinite(age) or age < 0:
        return UNKNOWN
    return "<40" if age < 40 else "40-59" if age < 60 else "60-79" if age < 80 else "80+"


def subgroup_value(meta: Mapping, key: str) -> str:
    if key == "age_band":
        return age_band(meta.get("age_years"))
    value = meta.get(key)
    return UNKNOWN if value is None or str(value).strip() == "" else str(value).strip()


def _group_order(key: str, values: Collection[str]) -> list[str]:
    if key == "age_band":
        return [v for v in (*AGE_BANDS, UNKNOWN) if v in values]
    return sorted(v for v in values if v != UNKNOWN) + ([UNKNOWN] if UNKNOWN in values else [])


def subgroup_tables(y: np.ndarray, scores_by_encoder: Mapping[str, np.ndarray], meta: Sequence[Mapping],
                    patient_ids: Sequence, task_names: Sequence[str], lines_tubes: Collection[str] = (),
                    keys: Sequence[str] = SUBGROUP_KEYS, min_images: int = 20, n_resamples: int = 200,
                    seed: int = 0) -> dict:
    """Per subgroup of each key: n images / patients, prevalence per task, and per encoder task_metrics.

    A group with fewer than `min_images` images is reported with status "too small" and no metrics; within a
    group, a task without both classes is unscored (None) and left out of the macro means.
    Returns {key: {group: {"n_images", "n_patients", "status", "prevalence": {task: p}, "encoders": {name:
    {"macro": ..., "per_task": ...}}}}}.
    """
    y = np.asarray(y)
    patient_ids = np.asarray(patient_ids)
    if len(meta) != len(y) or len(patient_ids) != len(y):
        raise ValueError(f"meta ({len(meta)}) and patient ids ({len(patient_ids)}) must have one entry per image "
                         f"({len(y)})")
    tables = {}
    for key in keys:
        values = np.array([subgroup_value(m, key) for m in meta], dtype=object)
        groups = {}
        for value in _group_order(key, set(values)):
            rows = values == value
            gy = y[rows]
            definite = gy != -1
            prevalence = {t: (float((gy[:, c] == 1).sum() / definite[:, c].sum()) if definite[:, c].any() else None)
                          for c, t in enumerate(task_names)}
            entry = {"n_images": int(rows.sum()), "n_patients": int(np.unique(patient_ids[rows]).size),
                     "status": "ok", "prevalence": prevalence, "encoders": {}}
            if rows.sum() < min_images:
                entry["status"] = f"too small (< {min_images} images)"
            elif not scorable_tasks(gy):
                entry["status"] = "no task with both classes"
            else:
                for name, scores in scores_by_encoder.items():
                    m = task_metrics(gy, np.asarray(scores)[rows], task_names, patient_ids[rows], lines_tubes,
                                     n_resamples, seed)
                    entry["encoders"][name] = {"macro": m["macro"], "per_task": {
                        t: {k: v[k] for k in ("auprc", "auroc", "auprc_ci95", "scored")}
                        for t, v in m["per_task"].items()}}
            groups[value] = entry
        tables[key] = groups
    return tables


# --- the whole protocol -----------------------------------------------------------------------------------

def _split_rows(split: Sequence[str]) -> dict[str, np.ndarray]:
    split = np.asarray(split)
    rows = {name: np.flatnonzero(split == name) for name in ("train", "val", "test")}
    unknown = set(np.unique(split)) - set(rows)
    if unknown:
        raise ValueError(f"split values must be train/val/test, got {sorted(unknown)}")
    empty = [name for name, r in rows.items() if r.size == 0]
    if empty:
        raise ValueError(f"no images in split(s): {', '.join(empty)}")
    return rows


def _take(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """x[rows]; a slice (a view, so a memmap stays on disk) when the rows are contiguous."""
    if rows.size and rows[-1] - rows[0] + 1 == rows.size:
        return x[rows[0]:rows[-1] + 1]
    return x[rows]


def evaluate_frozen_encoders(features: Mapping[str, np.ndarray], labels: np.ndarray, task_names: Sequence[str],
                             split: Sequence[str], patient_ids: Sequence, *, lines_tubes: Collection[str] = (),
                             meta: Sequence[Mapping] | None = None, baseline: str | None = None,
                             seeds: Sequence[int] = (0, 1, 2), config: ProbeConfig | None = None,
                             n_resamples: int = 500, bootstrap_seed: int = 0,
                             subgroup_keys: Sequence[str] = SUBGROUP_KEYS, min_group_images: int = 20,
                             device: str | torch.device = "cpu") -> dict:
    """Probe every encoder's features on the same images and compare them; the result for write_probe_report.

    features: {encoder name: (N, L, T, D) array}, rows aligned with `labels` (N, C: 1/0/-1), `split`
    ("train"/"val"/"test" per row), `patient_ids` (opaque codes) and `meta` (dicts with sex, age_years,
    manufacturer, view_position). Rows of one split kept contiguous let memmapped features stay on disk.
    Each encoder gets one probe per seed; its test scores are the mean of the seeds' probabilities. Every
    encoder other than `baseline` (default: the first) is compared with it as B - A.
    Returns JSON-able results plus "test_scores" {name: (N_test, C)} (left out of the written report).
    """
    if len(features) < 1:
        raise ValueError("no encoder features given")
    labels = np.asarray(labels, dtype=np.int64)
    patient_ids = np.asarray(patient_ids)
    names = list(task_names)
    if labels.ndim != 2 or labels.shape[1] != len(names):
        raise ValueError(f"labels must be (N, {len(names)}), got shape {labels.shape}")
    n = labels.shape[0]
    if len(split) != n or len(patient_ids) != n or (meta is not None and len(meta) != n):
        raise ValueError(f"split, patient ids and meta need one entry per image ({n})")
    for enc, x in features.items():
        if x.ndim != 4 or x.shape[0] != n:
            raise ValueError(f"features of {enc!r} must be (N={n}, L, T, D), got shape {x.shape}")
    baseline = baseline if baseline is not None else next(iter(features))
    if baseline not in features:
        raise ValueError(f"baseline {baseline!r} is not among the encoders {list(features)}")
    rows = _split_rows(split)
    in_split = {s: set(patient_ids[r].tolist()) for s, r in rows.items()}
    shared = (in_split["train"] & in_split["val"]) | (in_split["train"] & in_split["test"]) | (
        in_split["val"] & in_split["test"])
    if shared:
        raise ValueError(f"{len(shared)} patients have images in more than one split; split by patient")
    config = config or ProbeConfig()
    groups = task_groups(names, lines_tubes)
    y_test, test_patients = labels[rows["test"]], patient_ids[rows["test"]]

    encoders, test_scores = {}, {}
    for enc, x in features.items():
        train_x, val_x, test_x = (_take(x, rows[s]) for s in ("train", "val", "test"))
        per_seed, probas = [], []
        for seed in seeds:
            model = train_frozen_probe(train_x, labels[rows["train"]], val_x, labels[rows["val"]], seed=int(seed),
                                       config=config, device=device)
            proba = probe_scores(model, test_x, device=device)
            point = task_metrics(y_test, proba, names, test_patients, lines_tubes, n_resamples=0)
            per_seed.append({"seed": int(seed), **model.info,
                             "test_macro": {g: {m: point["macro"][g][m] for m in ("auprc", "auroc")}
                                            for g in groups}})
            probas.append(proba)
        test_scores[enc] = np.mean(probas, axis=0)
        encoders[enc] = {"feature_shape": [int(v) for v in x.shape[1:]], "per_seed": per_seed,
                         "metrics": task_metrics(y_test, test_scores[enc], names, test_patients, lines_tubes,
                                                 n_resamples, bootstrap_seed)}
    comparisons = []
    for enc in features:
        if enc == baseline:
            continue
        test = paired_hierarchical_bootstrap(y_test, test_scores[baseline], test_scores[enc], test_patients,
                                             n_resamples, bootstrap_seed, task_names=names, lines_tubes=lines_tubes)
        comparisons.append({"a": baseline, "b": enc, **test})
    subgroups = {}
    if meta is not None:
        test_meta = [meta[i] for i in rows["test"]]
        subgroups = subgroup_tables(y_test, test_scores, test_meta, test_patients, names, lines_tubes,
                                    subgroup_keys, min_group_images, min(n_resamples, 200), bootstrap_seed)
    return {"tasks": names, "groups": groups, "baseline": baseline, "encoders": encoders,
            "comparisons": comparisons, "subgroups": subgroups,
            "n_images": {s: int(r.size) for s, r in rows.items()},
            "n_patients": {s: len(p) for s, p in in_split.items()},
            "seeds": [int(s) for s in seeds], "probe_config": asdict(config), "n_resamples": n_resamples,
            "bootstrap_seed": bootstrap_seed, "test_scores": test_scores}
