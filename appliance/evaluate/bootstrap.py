"""Multi-label AUPRC/AUROC with patient bootstrap CIs, and the paired hierarchical bootstrap test (RECIPES.md 3).

Labels are (N, C) with 1 / 0 / -1 (uncertain); an image whose label is -1 for a task, or whose score is not
finite, is left out of that task only. A task is "scored" when its usable images hold both classes; macro means
are unweighted over scored tasks, separately for findings and for lines/tubes.

Paired hierarchical bootstrap (two encoders scored on the same test images): patients are drawn with
replacement within strata (patients with / without a positive for the task; each stratum keeps its size, so
the class proportions of patients stay fixed), then each drawn patient's images are drawn with replacement.
Both encoders are scored on the same resamples; the difference B - A gets a percentile CI and a two-sided
p-value 2 * min(P(diff <= 0), P(diff >= 0)) with the usual +1 correction, capped at 1. The macro test
resamples all tasks of a group jointly (so correlation between tasks through shared patients is kept),
stratified by "patient has a positive for any task of the group".
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from appliance.evaluate.metrics import resample_weights, weighted_auc, weighted_average_precision

METRICS = ("auprc", "auroc")
TASK_GROUPS = ("findings", "lines_tubes")
_MAX_DRAWS_PER_CHUNK = 4_000_000  # bounds the memory of one vectorised chunk of image draws


def _check_labels(y: np.ndarray, task_names: Sequence[str] | None, *score_arrays: np.ndarray
                  ) -> tuple[np.ndarray, list[str], list[np.ndarray]]:
    y = np.asarray(y)
    if y.ndim != 2:
        raise ValueError(f"labels must be (N, C), got shape {y.shape}")
    if not np.isin(y, (-1, 0, 1)).all():
        raise ValueError("labels must be 1, 0 or -1")
    names = list(task_names) if task_names is not None else [f"task_{c}" for c in range(y.shape[1])]
    if len(names) != y.shape[1]:
        raise ValueError(f"{len(names)} task names for {y.shape[1]} label columns")
    scores = [np.asarray(s, dtype=np.float64) for s in score_arrays]
    for s in scores:
        if s.shape != y.shape:
            raise ValueError(f"scores {s.shape} and labels {y.shape} differ in shape")
    return y.astype(np.int64), names, scores


def task_groups(task_names: Sequence[str], lines_tubes: Collection[str] = ()) -> dict[str, list[str]]:
    """{"findings": [...], "lines_tubes": [...]} in task order; a group without tasks is left out."""
    unknown = set(lines_tubes) - set(task_names)
    if unknown:
        raise ValueError(f"lines/tubes not among the tasks: {sorted(unknown)}")
    groups = {"findings": [t for t in task_names if t not in set(lines_tubes)],
              "lines_tubes": [t for t in task_names if t in set(lines_tubes)]}
    return {k: v for k, v in groups.items() if v}


def _usable(y: np.ndarray, *scores: np.ndarray, c: int) -> np.ndarray:
    rows = y[:, c] != -1
    for s in scores:
        rows &= np.isfinite(s[:, c])
    return rows


def _both_classes(y: np.ndarray) -> bool:
    return bool((y == 1).any() and (y == 0).any())


def _point(y: np.ndarray, s: np.ndarray) -> dict[str, float]:
    return {"auprc": float(average_precision_score(y == 1, s)), "auroc": float(roc_auc_score(y == 1, s))}


def _resampled(y: np.ndarray, s: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    return {"auprc": weighted_average_precision(y, s, weights), "auroc": weighted_auc(y, s, weights)}


def _percentile_ci(values: np.ndarray, alpha: float) -> list[float] | None:
    used = values[np.isfinite(values)]
    if used.size == 0:
        return None
    return [float(v) for v in np.percentile(used, [100 * alpha / 2, 100 * (1 - alpha / 2)])]


def _macro_over_resamples(per_task: list[np.ndarray]) -> np.ndarray:
    """Per resample, the mean over the tasks defined in it (NaN where none is)."""
    stacked = np.stack(per_task)
    defined = np.isfinite(stacked)
    with np.errstate(invalid="ignore"):
        return np.where(defined.any(axis=0), np.where(defined, stacked, 0.0).sum(axis=0) / defined.sum(axis=0),
                        np.nan)


def task_metrics(y: np.ndarray, scores: np.ndarray, task_names: Sequence[str], patient_ids: Sequence,
                 lines_tubes: Collection[str] = (), n_resamples: int = 500, seed: int = 0,
                 alpha: float = 0.05) -> dict:
    """AUPRC and AUROC per task and macro means per task group, with patient-level percentile bootstrap CIs.

    Whole patients are resampled (metrics.resample_weights with groups), jointly for all tasks. Returns
    {"per_task": {task: {"auprc", "auroc", "auprc_ci95", "auroc_ci95", "n_pos", "n_neg", "prevalence",
    "scored"}}, "macro": {group: {"auprc", "auroc", "auprc_ci95", "auroc_ci95", "n_tasks", "unscored"}},
    "n_images", "n_patients", "n_resamples", "seed", "alpha"}. Unscored values are None.
    """
    y, names, (scores,) = _check_labels(y, task_names, scores)
    patient_ids = np.asarray(patient_ids)
    if patient_ids.shape != (y.shape[0],):
        raise ValueError(f"one patient id per image needed ({y.shape[0]}), got shape {patient_ids.shape}")
    weights, _, n_patients = resample_weights(y.shape[0], n_resamples, np.random.default_rng(seed), patient_ids)
    per_task: dict[str, dict] = {}
    boot: dict[str, dict[str, np.ndarray]] = {}
    for c, name in enumerate(names):
        rows = _usable(y, scores, c=c)
        yc, sc = y[rows, c], scores[rows, c]
        n_pos, n_neg = int((yc == 1).sum()), int((yc == 0).sum())
        entry = {"auprc": None, "auroc": None, "auprc_ci95": None, "auroc_ci95": None, "n_pos": n_pos,
                 "n_neg": n_neg, "prevalence": n_pos / (n_pos + n_neg) if n_pos + n_neg else None,
                 "scored": _both_classes(yc)}
        if entry["scored"]:
            entry.update(_point(yc, sc))
            boot[name] = _resampled(yc, sc, weights[:, rows])
            for metric in METRICS:
                entry[f"{metric}_ci95"] = _percentile_ci(boot[name][metric], alpha)
        per_task[name] = entry
    macro = {}
    for group, members in task_groups(names, lines_tubes).items():
        scored = [t for t in members if per_task[t]["scored"]]
        entry = {"n_tasks": len(scored), "unscored": [t for t in members if t not in scored]}
        for metric in METRICS:
            entry[metric] = float(np.mean([per_task[t][metric] for t in scored])) if scored else None
            entry[f"{metric}_ci95"] = (_percentile_ci(_macro_over_resamples([boot[t][metric] for t in scored]),
                                                      alpha) if scored else None)
        macro[group] = entry
    return {"per_task": per_task, "macro": macro, "n_images": int(y.shape[0]), "n_patients": n_patients,
            "n_resamples": n_resamples, "seed": seed, "alpha": alpha}


def hierarchical_resample_weights(patient_of_image: np.ndarray, n_resamples: int, rng: np.random.Generator,
                                  patient_stratum: np.ndarray | None = None) -> np.ndarray:
    """(R, N) multiplicity of each image in each two-level resample.

    `patient_of_image` holds patient codes 0..P-1 (one per image); `patient_stratum` (P,) a stratum per patient.
    Level 1: within each stratum, as many patients as it holds are drawn with replacement. Level 2: each drawn
    patient contributes as many images as it has, drawn with replacement from its own images.
    """
    codes = np.asarray(patient_of_image, dtype=np.int64)
    n_images = codes.size
    images_per_patient = np.bincount(codes)
    n_patients = images_per_patient.size
    if n_images == 0 or (images_per_patient == 0).any():
        raise ValueError("patient codes must be 0..P-1 with at least one image each")
    strata = np.zeros(n_patients, dtype=np.int64) if patient_stratum is None else np.asarray(patient_stratum)
    if strata.shape != (n_patients,):
        raise ValueError(f"one stratum per patient needed ({n_patients}), got shape {strata.shape}")
    by_patient = np.argsort(codes, kind="stable")  # images grouped by patient
    first_image = np.concatenate([[0], np.cumsum(images_per_patient)[:-1]])
    members = [np.flatnonzero(strata == s) for s in np.unique(strata)]
    weights = np.zeros((n_resamples, n_images))
    chunk = max(1, _MAX_DRAWS_PER_CHUNK // n_images)
    for start in range(0, n_resamples, chunk):
        r = min(chunk, n_resamples - start)
        drawn = np.concatenate([m[rng.integers(0, m.size, size=(r, m.size))] for m in members], axis=1)  # (r, P)
        sizes = images_per_patient[drawn].ravel()
        offsets = np.repeat(first_image[drawn].ravel(), sizes) + rng.integers(0, np.repeat(sizes, sizes))
        row = np.repeat(np.repeat(np.arange(r), n_patients), sizes)
        flat = row * n_images + by_patient[offsets]
        weights[start:start + r] = np.bincount(flat, minlength=r * n_images).reshape(r, n_images)
    return weights


def bootstrap_p_value(diff: np.ndarray) -> float | None:
    """Two-sided p of H0 "no difference": 2 * min(P(diff <= 0), P(diff >= 0)) with the +1 correction, <= 1."""
    used = diff[np.isfinite(diff)]
    if used.size == 0:
        return None
    n = used.size
    tail = min((np.sum(used <= 0) + 1) / (n + 1), (np.sum(used >= 0) + 1) / (n + 1))
    return float(min(1.0, 2.0 * tail))


def _difference(point_a: float, point_b: float, boot_a: np.ndarray, boot_b: np.ndarray, alpha: float) -> dict:
    diff = boot_b - boot_a
    used = diff[np.isfinite(diff)]
    return {"a": point_a, "b": point_b, "diff": point_b - point_a,
            "diff_mean": float(used.mean()) if used.size else None, "ci95": _percentile_ci(diff, alpha),
            "p_value": bootstrap_p_value(diff), "n_used": int(used.size)}


def paired_hierarchical_bootstrap(y: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray,
                                  patient_ids: Sequence, n_resamples: int = 500, seed: int = 0, *,
                                  task_names: Sequence[str] | None = None, lines_tubes: Collection[str] = (),
                                  alpha: float = 0.05) -> dict:
    """Difference B - A of AUPRC and AUROC per task and of their macro means per task group; see module doc.

    Returns {"per_task": {task: {"auprc": D, "auroc": D, "n_pos", "n_neg", "n_patients"} or {"scored": False,
    ...}}, "macro": {group: {"auprc": D, "auroc": D, "n_tasks"}}, "n_images", "n_patients", "n_resamples",
    "seed", "alpha", "method"} where D = {"a", "b", "diff" (point, full test set), "diff_mean" (over
    resamples), "ci95", "p_value", "n_used" (resamples where the metric was defined)}.
    """
    y, names, (scores_a, scores_b) = _check_labels(y, task_names, scores_a, scores_b)
    patient_ids = np.asarray(patient_ids)
    if patient_ids.shape != (y.shape[0],):
        raise ValueError(f"one patient id per image needed ({y.shape[0]}), got shape {patient_ids.shape}")
    _, patient_codes = np.unique(patient_ids, return_inverse=True)
    streams = np.random.SeedSequence(seed).spawn(len(names) + len(TASK_GROUPS))
    per_task: dict[str, dict] = {}
    for c, name in enumerate(names):
        rows = _usable(y, scores_a, scores_b, c=c)
        yc = y[rows, c]
        _, codes = np.unique(patient_codes[rows], return_inverse=True)
        entry = {"n_pos": int((yc == 1).sum()), "n_neg": int((yc == 0).sum()),
                 "n_patients": int(codes.max()) + 1 if codes.size else 0, "scored": _both_classes(yc)}
        if entry["scored"]:
            has_positive = np.bincount(codes, weights=(yc == 1).astype(float)) > 0
            weights = hierarchical_resample_weights(codes, n_resamples, np.random.default_rng(streams[c]),
                                                    has_positive)
            pa, pb = _point(yc, scores_a[rows, c]), _point(yc, scores_b[rows, c])
            ba, bb = _resampled(yc, scores_a[rows, c], weights), _resampled(yc, scores_b[rows, c], weights)
            for metric in METRICS:
                entry[metric] = _difference(pa[metric], pb[metric], ba[metric], bb[metric], alpha)
        per_task[name] = entry
    macro = {}
    for g, (group, members) in enumerate(task_groups(names, lines_tubes).items()):
        scored = [t for t in members if per_task[t]["scored"]]
        if not scored:
            macro[group] = {"n_tasks": 0, "auprc": None, "auroc": None}
            continue
        cols = [names.index(t) for t in scored]
        group_y = y[:, cols]
        has_positive = np.bincount(patient_codes, weights=(group_y == 1).any(axis=1).astype(float)) > 0
        weights = hierarchical_resample_weights(patient_codes, n_resamples,
                                                np.random.default_rng(streams[len(names) + g]), has_positive)
        entry = {"n_tasks": len(scored)}
        boot = {"a": {m: [] for m in METRICS}, "b": {m: [] for m in METRICS}}
        for c in cols:
            rows = _usable(y, scores_a, scores_b, c=c)
            for side, s in (("a", scores_a), ("b", scores_b)):
                for metric, values in _resampled(y[rows, c], s[rows, c], weights[:, rows]).items():
                    boot[side][metric].append(values)
        for metric in METRICS:
            entry[metric] = _difference(float(np.mean([per_task[t][metric]["a"] for t in scored])),
                                        float(np.mean([per_task[t][metric]["b"] for t in scored])),
                                        _macro_over_resamples(boot["a"][metric]),
                                        _macro_over_resamples(boot["b"][metric]), alpha)
        macro[group] = entry
    return {"per_task": per_task, "macro": macro, "n_images": int(y.shape[0]),
            "n_patients": int(patient_codes.max()) + 1 if patient_codes.size else 0, "n_resamples": n_resamples,
            "seed": seed, "alpha": alpha,
            "method": "paired hierarchical bootstrap: patients stratified by positive status, then images "
                      "within patients"}
