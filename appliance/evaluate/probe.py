"""Linear probe: one standardised logistic regression per finding on frozen embeddings."""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


def _single_class_reason(split: str, y: np.ndarray) -> str | None:
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    if n_pos and n_neg:
        return None
    return f"{split} has a single class ({n_pos} positive, {n_neg} negative after masking uncertain)"


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 names: list[str], seed: int = 0, C: float = 1.0) -> dict:
    """Fit StandardScaler + balanced LogisticRegression per finding on train rows labelled 0/1; AUC on test.

    Uncertain (-1) rows are left out of both fitting and scoring for that finding. A finding with a single
    class in train or in test is skipped. Returns {"per_finding": {name: {"auc", "n_train", "n_test"}} (auc
    None when skipped), "mean_auc": mean over fitted findings or None, "skipped": {name: reason},
    "scores": (N_test, C) probabilities, NaN in skipped columns}.
    """
    train_x, test_x = np.asarray(train_x, dtype=np.float64), np.asarray(test_x, dtype=np.float64)
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    if train_y.shape != (train_x.shape[0], len(names)) or test_y.shape != (test_x.shape[0], len(names)):
        raise ValueError(f"labels must be (N, {len(names)}); got train {train_y.shape}, test {test_y.shape}")
    scores = np.full((test_x.shape[0], len(names)), np.nan)
    per_finding: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    for c, name in enumerate(names):
        train_rows, test_rows = train_y[:, c] != -1, test_y[:, c] != -1
        entry = {"auc": None, "n_train": int(train_rows.sum()), "n_test": int(test_rows.sum())}
        per_finding[name] = entry
        reason = (_single_class_reason("train", train_y[train_rows, c])
                  or _single_class_reason("test", test_y[test_rows, c]))
        if reason:
            skipped[name] = reason
            continue
        model = make_pipeline(StandardScaler(), LogisticRegression(C=C, class_weight="balanced", max_iter=2000,
                                                                    random_state=seed))
        model.fit(train_x[train_rows], train_y[train_rows, c])
        scores[:, c] = model.predict_proba(test_x)[:, 1]
        entry["auc"] = float(roc_auc_score(test_y[test_rows, c], scores[test_rows, c]))
    aucs = [entry["auc"] for entry in per_finding.values() if entry["auc"] is not None]
    return {"per_finding": per_finding, "mean_auc": float(np.mean(aucs)) if aucs else None, "skipped": skipped,
            "scores": scores}
