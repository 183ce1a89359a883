"""Report-to-volume retrieval: Recall@K over the test set with cosine similarity (RECIPES.md section 1).

Row i of the queries (a report) belongs with row i of the targets (its volume). When several reconstructions
share one report, pass `groups` (one id per row): any volume of the query's group then counts as a hit.
Ties in similarity are broken against the model, so a collapsed encoder (all embeddings equal) scores like
chance rather than perfectly.
"""

from __future__ import annotations

import numpy as np

from appliance.evaluate.metrics import resample_weights

DEFAULT_KS = (1, 5, 10, 50, 100)
_QUERY_CHUNK = 1024  # bounds the (chunk, N) similarity block on large test sets


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def _group_index(n: int, groups: np.ndarray | None) -> np.ndarray:
    if groups is None:
        return np.arange(n)
    groups = np.asarray(groups)
    if groups.shape != (n,):
        raise ValueError(f"groups must have one entry per row ({n}), got shape {groups.shape}")
    return np.unique(groups, return_inverse=True)[1]


def retrieval_ranks(query_emb: np.ndarray, target_emb: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
    """1-based rank of each query's best correct target among all targets (ties count against the model)."""
    queries, targets = _l2_normalise(query_emb), _l2_normalise(target_emb)
    if queries.ndim != 2 or queries.shape != targets.shape:
        raise ValueError(f"queries and targets must both be (N, D); got {queries.shape} and {targets.shape}")
    group_of = _group_index(queries.shape[0], groups)
    ranks = np.empty(queries.shape[0], dtype=np.int64)
    for start in range(0, queries.shape[0], _QUERY_CHUNK):
        stop = min(start + _QUERY_CHUNK, queries.shape[0])
        sim = queries[start:stop] @ targets.T
        correct = group_of[start:stop, None] == group_of[None, :]
        best_correct = np.where(correct, sim, -np.inf).max(axis=1, keepdims=True)
        ranks[start:stop] = 1 + ((sim >= best_correct) & ~correct).sum(axis=1)
    return ranks


def _random_recall(n: int, n_correct: np.ndarray, k: int) -> float:
    """Expected recall@k of a uniformly random ranking: mean over queries of 1 - C(N-g, k) / C(N, k)."""
    if k >= n:
        return 1.0
    miss = np.ones(n_correct.shape, dtype=np.float64)
    # C(N-g, k) / C(N, k) = prod_{i<k} (N-g-i) / (N-i); a factor hits zero once k > N-g
    for i in range(k):
        miss *= np.clip(n - n_correct - i, 0, None) / (n - i)
    return float(1.0 - miss.mean())


def retrieval_recall(query_emb: np.ndarray, target_emb: np.ndarray, ks: tuple[int, ...] = DEFAULT_KS,
                     groups: np.ndarray | None = None) -> dict:
    """Recall@K of reports retrieving their volume, against the exact random-ranking baseline.

    Returns {"recall": {k: share of queries with a hit in the top k}, "random": {k: expected recall of a random
    ranking}, "n": N, "ks_clipped": [k > N, where recall is trivially 1.0], "median_rank": float}.
    """
    ranks = retrieval_ranks(query_emb, target_emb, groups)
    n = ranks.size
    group_of = _group_index(n, groups)
    n_correct = np.bincount(group_of)[group_of]
    recall = {int(k): float((ranks <= k).mean()) for k in ks}
    random = {int(k): _random_recall(n, n_correct, int(k)) for k in ks}
    return {"recall": recall, "random": random, "n": n, "ks_clipped": [int(k) for k in ks if k > n],
            "median_rank": float(np.median(ranks))}


def retrieval_bootstrap_ci(query_emb: np.ndarray, target_emb: np.ndarray, ks: tuple[int, ...] = DEFAULT_KS,
                           groups: np.ndarray | None = None, n_resamples: int = 1000, seed: int = 0,
                           alpha: float = 0.05) -> dict:
    """Percentile CIs of Recall@K, resampling queries (whole groups when given); the gallery stays the full set.

    Returns {"recall": {k: {"recall", "low", "high"}}, "n_resamples", "seed", "alpha", "unit"}.
    """
    ranks = retrieval_ranks(query_emb, target_emb, groups)
    n = ranks.size
    weights, unit, _ = resample_weights(n, n_resamples, np.random.default_rng(seed), groups)
    total = weights.sum(axis=1)
    out: dict[int, dict] = {}
    for k in ks:
        hits = (weights * (ranks <= k)).sum(axis=1) / total
        low, high = np.percentile(hits, [100 * alpha / 2, 100 * (1 - alpha / 2)])
        out[int(k)] = {"recall": float((ranks <= k).mean()), "low": float(low), "high": float(high)}
    return {"recall": out, "n_resamples": n_resamples, "seed": seed, "alpha": alpha, "unit": unit}
