"""Agreement metrics: Cohen's kappa against hand-computed values, the three protocols, degenerate cases, the PNG."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from appliance.labels.metrics import (PROTOCOLS, agreement, cohen_kappa, confusion_matrix_png,
                                      report_agreement_consensus)


def _as_labels(values, finding="x"):
    return {str(i): {finding: v} for i, v in enumerate(values)}


def test_kappa_hand_computed_binary():
    # 50 items: yes/yes 20, yes/no 5, no/yes 10, no/no 15 -> po = 0.70, pe = 0.5*0.6 + 0.5*0.4 = 0.50, kappa = 0.40
    a = [1] * 25 + [0] * 25
    b = [1] * 20 + [0] * 5 + [1] * 10 + [0] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.40)


def test_kappa_hand_computed_three_classes():
    # rows gold (-1, 0, 1), columns pred: [[2,1,0],[1,5,1],[0,1,4]], n = 15
    # po = 11/15; marginals gold (3,7,5), pred (3,7,5): pe = (9+49+25)/225 = 83/225
    # kappa = (11/15 - 83/225) / (1 - 83/225) = (165 - 83) / (225 - 83) = 82/142
    pairs = [(-1, -1)] * 2 + [(-1, 0)] + [(0, -1)] + [(0, 0)] * 5 + [(0, 1)] + [(1, 0)] + [(1, 1)] * 4
    gold, pred = zip(*pairs)
    assert cohen_kappa(gold, pred) == pytest.approx(82 / 142)
    report = agreement(_as_labels(pred), _as_labels(gold), ["x"], "strict")
    fa = report.per_finding[0]
    assert fa.kappa == pytest.approx(82 / 142)
    assert fa.accuracy == pytest.approx(11 / 15)
    # per class P/R: -1: 2/3, 2/3; 0: 5/7, 5/7; 1: 4/5, 4/5 -> macro = mean
    expected = ((2 / 3) + (5 / 7) + (4 / 5)) / 3
    assert fa.precision == pytest.approx(expected) and fa.recall == pytest.approx(expected)
    assert fa.f1 == pytest.approx(expected)
    assert fa.support_pos == 5 and fa.n == 15


def test_protocols_treat_uncertain_differently():
    gold = {"a": {"x": 1}, "b": {"x": -1}, "c": {"x": 0}, "d": {"x": 1}, "e": {"x": 0}}
    pred = {"a": {"x": 1}, "b": {"x": 0}, "c": {"x": -1}, "d": {"x": 1}, "e": {"x": 0}}
    strict = agreement(pred, gold, ["x"], "strict").per_finding[0]
    ignore = agreement(pred, gold, ["x"], "ignore_uncertain").per_finding[0]
    as_neg = agreement(pred, gold, ["x"], "uncertain_as_negative").per_finding[0]
    assert strict.n == 5 and strict.accuracy == pytest.approx(3 / 5)
    assert ignore.n == 3 and ignore.accuracy == 1.0 and ignore.kappa == pytest.approx(1.0)
    assert as_neg.n == 5 and as_neg.accuracy == 1.0 and as_neg.f1 == 1.0
    assert {r.protocol for r in (agreement(pred, gold, ["x"], p) for p in PROTOCOLS)} == set(PROTOCOLS)


def test_binary_precision_recall():
    gold = _as_labels([1, 1, 1, 0, 0, 0, 0, 0])
    pred = _as_labels([1, 1, 0, 1, 0, 0, 0, 0])
    fa = agreement(pred, gold, ["x"], "ignore_uncertain").per_finding[0]
    assert fa.precision == pytest.approx(2 / 3) and fa.recall == pytest.approx(2 / 3) and fa.f1 == pytest.approx(2 / 3)


def test_degenerate_cases_report_none_not_nan():
    # all one class on both sides: kappa undefined, binary P/R/F1 undefined, accuracy 1
    fa = agreement(_as_labels([0, 0, 0]), _as_labels([0, 0, 0]), ["x"], "uncertain_as_negative").per_finding[0]
    assert fa.kappa is None and fa.precision is None and fa.recall is None and fa.f1 is None and fa.accuracy == 1.0
    # nothing to compare
    empty = agreement({}, {}, ["x", "y"], "strict")
    assert all(f.n == 0 and f.kappa is None and f.f1 is None for f in empty.per_finding)
    assert empty.macro["f1"] is None and empty.macro["n_findings"] == 2
    # all pairs dropped by ignore_uncertain; a finding missing from pred; None labels are skipped
    fa = agreement(_as_labels([-1, -1]), _as_labels([1, 0]), ["x"], "ignore_uncertain").per_finding[0]
    assert fa.n == 0 and fa.kappa is None
    fa = agreement({"a": {}, "b": {"x": None}}, {"a": {"x": 1}, "b": {"x": 0}}, ["x"], "strict").per_finding[0]
    assert fa.n == 0
    json.dumps(empty.to_dict())  # serialisable, no NaN
    with pytest.raises(ValueError):
        agreement({}, {}, ["x"], "lenient")


def test_macro_averages_defined_findings():
    gold = {"a": {"x": 1, "y": 0}, "b": {"x": 0, "y": 0}}
    pred = {"a": {"x": 1, "y": 0}, "b": {"x": 1, "y": 0}}
    rep = agreement(pred, gold, ["x", "y"], "uncertain_as_negative")
    assert rep.per_finding[1].f1 is None
    assert rep.macro["f1"] == pytest.approx(rep.per_finding[0].f1)
    assert rep.macro["accuracy"] == pytest.approx((0.5 + 1.0) / 2)
    assert rep.to_dict()["per_finding"][0]["finding"] == "x"


def test_consensus_keeps_findings_above_threshold():
    a = {str(i): {"x": 1 if i < 5 else 0, "y": 1, "z": -1} for i in range(20)}
    b = {str(i): {"x": 1 if i < 4 else 0, "y": 1 if i else 0, "z": -1} for i in range(20)}
    b["extra"] = {"x": 1, "y": 1, "z": 1}
    out = report_agreement_consensus(a, b, ["x", "y", "z", "w"], threshold=0.90)
    assert out["agreement"]["x"] == pytest.approx(0.95) and out["agreement"]["y"] == pytest.approx(0.95)
    assert out["agreement"]["z"] == 1.0 and out["agreement"]["w"] is None
    assert out["kept"] == ["x", "y", "z"] and out["dropped"] == ["w"] and out["n_reports"] == 20
    assert report_agreement_consensus(a, b, ["x"], threshold=0.95)["kept"] == []  # "more than" the threshold


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_confusion_matrix_png(tmp_path, protocol):
    findings = [f"finding number {i} with a long descriptive name" for i in range(6)]
    gold = {str(i): {f: (i + j) % 3 - 1 for j, f in enumerate(findings)} for i in range(30)}
    pred = {str(i): {f: (i * j) % 3 - 1 for j, f in enumerate(findings)} for i in range(30)}
    path = confusion_matrix_png(pred, gold, findings, tmp_path / "sub" / "cm.png", protocol=protocol)
    with Image.open(path) as img:
        img.load()
        assert img.format == "PNG" and img.width > 400 and img.height > 200
        assert len(img.getcolors(maxcolors=100000) or []) > 2  # drawn, not blank
