"""Report-to-volume retrieval: ranks, Recall@K, groups of reconstructions, the random baseline, clipping."""

from __future__ import annotations

import numpy as np
import pytest

from appliance.evaluate import retrieval_bootstrap_ci, retrieval_ranks, retrieval_recall

# Four volumes in 2-D; report 0 points at volume 1's direction, reports 1-3 at their own volume.
TARGETS = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, -0.1]])
QUERIES = np.array([[0.0, 1.0], [0.0, 1.0], [1.0, 1.0], [-1.0, -0.1]])


def test_identity_embeddings_retrieve_at_rank_one():
    eye = np.eye(6)
    result = retrieval_recall(eye, 3 * eye, ks=(1, 5))
    assert result["recall"] == {1: 1.0, 5: 1.0} and result["n"] == 6 and result["ks_clipped"] == []
    assert result["median_rank"] == 1.0


def test_hand_made_ranks():
    # report 0 vs volumes: cos 0 (own), 1, 0.707, -0.0995 -> two others above its own -> rank 3
    np.testing.assert_array_equal(retrieval_ranks(QUERIES, TARGETS), [3, 1, 1, 1])
    result = retrieval_recall(10 * QUERIES, TARGETS, ks=(1, 2, 3))  # cosine: query scale is irrelevant
    assert result["recall"] == {1: 0.75, 2: 0.75, 3: 1.0}


def test_group_sibling_counts_as_a_hit():
    groups = np.array(["r0", "r0", "r1", "r2"])  # volumes 0 and 1 are reconstructions with one report
    np.testing.assert_array_equal(retrieval_ranks(QUERIES, TARGETS, groups), [1, 1, 1, 1])
    result = retrieval_recall(QUERIES, TARGETS, ks=(1, 2), groups=groups)
    assert result["recall"][1] == 1.0
    # correct targets per query g = 2, 2, 1, 1 of N = 4. k=1: g/N -> (0.5+0.5+0.25+0.25)/4 = 0.375
    # k=2: 1 - C(4-g, 2)/C(4, 2) -> g=2: 1 - 1/6, g=1: 1 - 3/6 -> (5/6 + 5/6 + 1/2 + 1/2)/4 = 2/3
    assert result["random"][1] == pytest.approx(0.375)
    assert result["random"][2] == pytest.approx(2 / 3)


def test_random_baseline_is_k_over_n_with_one_target_each():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 8))
    result = retrieval_recall(x, x + rng.normal(size=x.shape), ks=(1, 5, 10, 50))
    for k in (1, 5, 10, 50):
        assert result["random"][k] == pytest.approx(k / 50)
    assert result["recall"][50] == 1.0


def test_k_larger_than_the_test_set_is_clipped():
    result = retrieval_recall(QUERIES, TARGETS, ks=(1, 4, 5, 100))
    assert result["ks_clipped"] == [5, 100]
    assert result["recall"][5] == result["recall"][100] == 1.0
    assert result["random"][100] == 1.0 and result["random"][1] == pytest.approx(0.25)


def test_collapsed_embeddings_score_no_better_than_chance():
    same = np.ones((5, 3))
    np.testing.assert_array_equal(retrieval_ranks(same, same), [5] * 5)
    zeros = np.zeros((5, 3))  # zero vectors must not turn into NaN similarities
    assert retrieval_recall(zeros, zeros, ks=(1,))["recall"][1] == 0.0


def test_retrieval_bootstrap_ci():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(80, 16))
    y = x + 1.2 * rng.normal(size=x.shape)
    point = retrieval_recall(x, y, ks=(1, 5))["recall"]
    ci = retrieval_bootstrap_ci(x, y, ks=(1, 5), n_resamples=300, seed=4)
    for k in (1, 5):
        assert ci["recall"][k]["recall"] == point[k]
        assert ci["recall"][k]["low"] <= point[k] <= ci["recall"][k]["high"]
        assert ci["recall"][k]["low"] < ci["recall"][k]["high"]
    assert retrieval_bootstrap_ci(x, y, ks=(1, 5), n_resamples=300, seed=4) == ci


def test_mismatched_shapes_are_rejected():
    with pytest.raises(ValueError):
        retrieval_recall(np.ones((3, 2)), np.ones((4, 2)))
    with pytest.raises(ValueError, match="groups"):
        retrieval_recall(np.eye(3), np.eye(3), groups=np.array([0, 1]))
