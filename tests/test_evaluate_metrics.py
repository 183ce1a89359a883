"""Zero-shot probabilities, per-finding metrics, the bootstrap and the linear probe against hand-computed values."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from appliance.evaluate import (DEFAULT_PROMPT_PAIR, PROMPT_PAIRS, binary_metrics, bootstrap_ci, fmt_ci,
                                linear_probe, prompts_for, resample_weights, weighted_auc, zero_shot_probabilities)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# --- zero-shot -------------------------------------------------------------------------------------------

def test_zero_shot_softmax_hand_computed():
    images = np.array([[1.0, 0.0], [0.0, 2.0]])
    pos = np.array([[1.0, 0.0], [0.0, 1.0]])
    neg = np.array([[0.0, 1.0], [1.0, 0.0]])
    # study 0: finding 0 logits (1, 0), finding 1 (0, 1); study 1: finding 0 (0, 2), finding 1 (2, 0)
    expected = np.array([[math.e / (math.e + 1), 1 / (1 + math.e)],
                         [1 / (1 + math.e ** 2), math.e ** 2 / (math.e ** 2 + 1)]])
    probs = zero_shot_probabilities(images, pos, neg)
    assert probs.shape == (2, 2) and probs.dtype == np.float64
    np.testing.assert_allclose(probs, expected, rtol=1e-12)
    assert probs[0, 0] == pytest.approx(_sigmoid(1.0))


def test_zero_shot_large_raw_logits_do_not_overflow():
    # raw dot products of unnormalised embeddings reach the thousands; a naive softmax returns nan
    images = np.array([[30.0, 0.0], [0.0, 30.0]])
    pos, neg = np.array([[30.0, 0.0]]), np.array([[0.0, 30.0]])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        probs = zero_shot_probabilities(images, pos, neg)
    np.testing.assert_array_equal(probs, [[1.0], [0.0]])


def test_zero_shot_rejects_mismatched_dimensions():
    with pytest.raises(ValueError, match="embedding sizes differ"):
        zero_shot_probabilities(np.ones((2, 3)), np.ones((1, 4)), np.ones((1, 4)))


def test_prompts_for_default_pair_and_empty_negative():
    assert DEFAULT_PROMPT_PAIR == 2 and len(PROMPT_PAIRS) == 5
    pos, neg = prompts_for(["emphysema", "lung nodule"], DEFAULT_PROMPT_PAIR)
    assert pos == ["There is emphysema.", "There is lung nodule."]
    assert neg == ["There is no emphysema.", "There is no lung nodule."]
    assert prompts_for(["cardiomegaly"], 1) == (["cardiomegaly."], [""])
    assert prompts_for(["cardiomegaly"], 0) == (["cardiomegaly."], ["not cardiomegaly."])
    assert prompts_for(["x"], 4) == (["Findings are compatible with x."], ["Findings are not compatible with x."])
    with pytest.raises(ValueError):
        prompts_for(["x"], 5)


# --- binary metrics --------------------------------------------------------------------------------------

SCORES = [0.9, 0.6, 0.4, 0.7, 0.55, 0.1]


def _hand_example():
    names = ["plain", "masked", "only_pos"]
    y = np.array([[1, 1, 1, 0, 0, 0],
                  [1, -1, 1, 0, -1, 0],
                  [1, 1, 1, 1, -1, 1]]).T
    s = np.array([SCORES] * 3).T
    return y, s, names


def test_binary_metrics_hand_computed():
    y, s, names = _hand_example()
    result = binary_metrics(y, s, names)
    plain = result["per_finding"]["plain"]
    # positives 0.9, 0.6, 0.4 vs negatives 0.7, 0.55, 0.1: 3 + 2 + 1 of 9 pairs ordered -> 2/3
    # at 0.5: predicted 1,1,0,1,1,0 -> tp 2, fn 1, fp 2, tn 1
    assert plain["auc"] == pytest.approx(2 / 3)
    assert plain["acc"] == pytest.approx(3 / 6)
    assert plain["precision"] == pytest.approx(2 / 4)
    assert plain["sensitivity"] == pytest.approx(2 / 3)
    assert plain["specificity"] == pytest.approx(1 / 3)
    assert plain["f1"] == pytest.approx(4 / 7)  # 2tp / (2tp + fp + fn)
    assert (plain["n_pos"], plain["n_neg"], plain["threshold"]) == (3, 3, 0.5)


def test_uncertain_labels_are_masked_per_finding():
    y, s, names = _hand_example()
    masked = binary_metrics(y, s, names)["per_finding"]["masked"]
    # kept: positives 0.9, 0.4; negatives 0.7, 0.1 -> 2 + 1 of 4 pairs -> 3/4; tp 1, fn 1, fp 1, tn 1
    assert masked["auc"] == pytest.approx(3 / 4)
    assert (masked["n_pos"], masked["n_neg"]) == (2, 2)
    for key in ("acc", "precision", "sensitivity", "specificity", "f1"):
        assert masked[key] == pytest.approx(0.5)
    # reading -1 as negative adds 0.6 and 0.55 as negatives: 4 + 1 of 8 pairs -> 5/8
    as_negative = binary_metrics(np.maximum(y, 0), s, names)["per_finding"]["masked"]
    assert as_negative["auc"] == pytest.approx(5 / 8) and as_negative["n_neg"] == 4


def test_single_class_finding_is_unscored_and_left_out_of_the_mean():
    y, s, names = _hand_example()
    result = binary_metrics(y, s, names)
    only_pos = result["per_finding"]["only_pos"]
    assert only_pos["auc"] is None and only_pos["specificity"] is None and only_pos["n_neg"] == 0
    assert only_pos["sensitivity"] == pytest.approx(3 / 5)  # 0.9, 0.6, 0.7 of 0.9, 0.6, 0.4, 0.7, 0.1
    assert result["findings_unscored"] == ["only_pos"] and result["n_findings_scored"] == 2
    assert result["mean"]["auc"] == pytest.approx((2 / 3 + 3 / 4) / 2)
    assert result["mean"]["acc"] == pytest.approx(0.5)  # only_pos's 3/5 does not count
    assert result["mean"]["specificity"] == pytest.approx((1 / 3 + 1 / 2) / 2)


def test_nothing_predicted_positive_gives_no_precision():
    y = np.array([[1], [0], [0], [1]])
    s = np.full((4, 1), 0.2)
    m = binary_metrics(y, s, ["x"])["per_finding"]["x"]
    assert m["precision"] is None and m["f1"] == 0.0 and m["sensitivity"] == 0.0 and m["specificity"] == 1.0
    assert m["auc"] == pytest.approx(0.5)  # all tied


def test_binary_metrics_rejects_bad_labels():
    with pytest.raises(ValueError, match="1, 0 or -1"):
        binary_metrics(np.array([[2]]), np.array([[0.3]]), ["x"])


# --- bootstrap -------------------------------------------------------------------------------------------

def _synthetic(n: int, n_findings: int = 3, seed: int = 0, uncertain: float = 0.1):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, n_findings)) < 0.3).astype(np.int64)
    scores = 1 / (1 + np.exp(-(1.5 * y + rng.normal(size=y.shape))))
    y[rng.random(y.shape) < uncertain] = -1
    return y, scores, [f"f{i}" for i in range(n_findings)]


def test_weighted_auc_equals_roc_auc_on_the_resampled_arrays():
    y, s, _ = _synthetic(60, 1)
    s = np.round(s[:, 0], 1)  # plenty of ties
    rows = y[:, 0] != -1
    weights, _, _ = resample_weights(60, 20, np.random.default_rng(3), None)
    aucs = weighted_auc(y[rows, 0], s[rows], weights[:, rows])
    for r in range(20):
        picked = np.repeat(np.flatnonzero(rows), weights[r, rows].astype(int))
        assert aucs[r] == pytest.approx(roc_auc_score(y[picked, 0], s[picked]))


def test_bootstrap_ci_contains_point_and_is_deterministic():
    y, s, names = _synthetic(200)
    ci = bootstrap_ci(y, s, names, n_resamples=500, seed=1)
    point = binary_metrics(y, s, names)
    assert ci["mean_auc"]["auc"] == pytest.approx(point["mean"]["auc"])
    assert ci["mean_auc"]["low"] < ci["mean_auc"]["auc"] < ci["mean_auc"]["high"]
    for name in names:
        interval = ci["per_finding"][name]
        assert interval["auc"] == pytest.approx(point["per_finding"][name]["auc"])
        assert interval["low"] < interval["auc"] < interval["high"] and interval["n_used"] == 500
    assert ci["unit"] == "study" and ci["n_units"] == 200
    assert bootstrap_ci(y, s, names, n_resamples=500, seed=1) == ci
    assert bootstrap_ci(y, s, names, n_resamples=500, seed=2)["mean_auc"] != ci["mean_auc"]


def test_bootstrap_ci_narrows_with_more_studies():
    def width(n):
        ci = bootstrap_ci(*_synthetic(n), n_resamples=300)["mean_auc"]
        return ci["high"] - ci["low"]

    # the width scales roughly as 1/sqrt(N): 16x the studies, about a quarter of the width
    assert width(3200) < 0.5 * width(200)


def test_bootstrap_skips_resamples_missing_a_class():
    y = np.zeros((20, 1), dtype=np.int64)
    y[0, 0] = 1
    s = np.linspace(0, 1, 20)[:, None]
    ci = bootstrap_ci(y, s, ["rare"], n_resamples=1000)
    # P(the single positive is drawn at least once) = 1 - (19/20)^20 = 0.64
    assert 550 < ci["per_finding"]["rare"]["n_used"] < 730
    assert ci["mean_auc"]["n_complete"] == ci["per_finding"]["rare"]["n_used"]


def test_bootstrap_unscored_finding_has_no_interval():
    y, s, names = _synthetic(100)
    y[:, 2] = np.where(y[:, 2] == -1, -1, 1)
    ci = bootstrap_ci(y, s, names, n_resamples=100)
    assert ci["per_finding"]["f2"] == {"auc": None, "low": None, "high": None, "n_used": 0}
    assert ci["mean_auc"]["auc"] == pytest.approx(binary_metrics(y, s, names)["mean"]["auc"])


def test_group_resampling_draws_whole_patients():
    y, s, names = _synthetic(50)
    # every patient contributes four identical studies: the honest sample size is 50, not 200
    y4, s4 = np.repeat(y, 4, axis=0), np.repeat(s, 4, axis=0)
    patients = np.repeat([f"patient-{i}" for i in range(50)], 4)
    weights, unit, n_units = resample_weights(200, 30, np.random.default_rng(0), patients)
    assert unit == "group" and n_units == 50
    blocks = weights.reshape(30, 50, 4)
    assert (blocks == blocks[:, :, :1]).all()  # a patient's studies are drawn together
    assert (weights.sum(axis=1) == 200).all()
    by_group = bootstrap_ci(y4, s4, names, n_resamples=400, groups=patients)["mean_auc"]
    by_study = bootstrap_ci(y4, s4, names, n_resamples=400)["mean_auc"]
    assert by_group["auc"] == pytest.approx(by_study["auc"])
    assert by_group["high"] - by_group["low"] > 1.5 * (by_study["high"] - by_study["low"])


def test_bootstrap_is_fast_enough():
    y, s, names = _synthetic(200, 18)
    start = time.perf_counter()
    ci = bootstrap_ci(y, s, names, n_resamples=1000)
    assert time.perf_counter() - start < 3.0
    assert len(ci["per_finding"]) == 18


def test_fmt_ci():
    assert fmt_ci(0.81234, 0.7801, 0.845) == "0.812 [0.780, 0.845]"
    assert fmt_ci(0.5) == "0.500"
    assert fmt_ci(None, 0.1, 0.2) == "n/a"


# --- linear probe ----------------------------------------------------------------------------------------

def _probe_data(n: int, seed: int):
    rng = np.random.default_rng(seed)
    y = np.stack([np.arange(n) % 2, np.zeros(n, dtype=np.int64), (np.arange(n) // 2) % 2], axis=1)
    # feature 0 carries finding 0 with a wide margin; the rest is noise
    x = np.concatenate([5.0 * y[:, :1] + 0.1 * rng.normal(size=(n, 1)), rng.normal(size=(n, 4))], axis=1)
    return x, y


def test_linear_probe_separable_and_single_class():
    names = ["separable", "never_present", "noise"]
    train_x, train_y = _probe_data(40, 0)
    test_x, test_y = _probe_data(20, 1)
    test_y[:3, 0] = -1  # uncertain test labels are not scored
    result = linear_probe(train_x, train_y, test_x, test_y, names)
    assert result["per_finding"]["separable"] == {"auc": 1.0, "n_train": 40, "n_test": 17}
    assert result["skipped"] == {"never_present": "train has a single class (0 positive, 40 negative after "
                                                   "masking uncertain)"}
    assert result["per_finding"]["never_present"]["auc"] is None
    scores = result["scores"]
    assert scores.shape == (20, 3)
    assert np.isnan(scores[:, 1]).all() and np.isfinite(scores[:, [0, 2]]).all()
    noise_auc = result["per_finding"]["noise"]["auc"]
    assert result["mean_auc"] == pytest.approx((1.0 + noise_auc) / 2)
    assert linear_probe(train_x, train_y, test_x, test_y, names)["mean_auc"] == result["mean_auc"]


def test_linear_probe_skips_single_class_in_test():
    train_x, train_y = _probe_data(40, 0)
    test_x, test_y = _probe_data(10, 1)
    test_y[:, 0] = np.where(test_y[:, 0] == 1, -1, 0)  # only negatives left once -1 is masked
    result = linear_probe(train_x, train_y[:, :1], test_x, test_y[:, :1], ["x"])
    assert result["skipped"]["x"].startswith("test has a single class (0 positive, 5 negative")
    assert result["mean_auc"] is None
