"""The evaluation report: JSON, Markdown tables and PNG charts from an assembled result."""

from __future__ import annotations

import json

import numpy as np
import pytest

from appliance.evaluate import (binary_metrics, bootstrap_ci, linear_probe, retrieval_bootstrap_ci,
                                retrieval_recall, roc_curves, write_evaluation_report)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NAMES = ["emphysema", "lung nodule", "hiatal hernia"]


def _result(with_roc: bool = True) -> dict:
    rng = np.random.default_rng(0)
    n = 60
    y = (rng.random((n, 3)) < 0.4).astype(np.int64)
    y[:, 2] = 0  # no positive: unscored
    y[:5, 0] = -1
    scores = 1 / (1 + np.exp(-(2 * y + rng.normal(size=y.shape))))
    emb = rng.normal(size=(n, 8))
    volumes = emb + rng.normal(size=emb.shape)
    probe = linear_probe(emb + y[:, :1], y, emb + y[:, :1], y, NAMES)
    result = {
        "model": {"name": "greenrfm-test", "variant": "lite"},
        "n_test_studies": n,
        "prompt_pair": 2,
        "prompt_pairs": [0.61, 0.58, 0.66, 0.64, np.float64(0.63)],
        "zero_shot": binary_metrics(y, scores, NAMES),
        "zero_shot_ci": bootstrap_ci(y, scores, NAMES, n_resamples=200),
        "retrieval": retrieval_recall(emb, volumes, ks=(1, 5, 10, 50, 100)),
        "retrieval_ci": retrieval_bootstrap_ci(emb, volumes, n_resamples=100),
        "linear_probe": probe,
    }
    if with_roc:
        result["roc"] = roc_curves(y, scores, NAMES)
    else:
        result["y_true"], result["scores"] = y, scores
    return result


def test_roc_curves_only_for_scored_findings():
    result = _result()
    assert set(result["roc"]) == {"emphysema", "lung nodule"}
    curve = result["roc"]["emphysema"]
    assert curve["fpr"][0] == 0.0 and curve["tpr"][-1] == 1.0
    assert curve["auc"] == pytest.approx(result["zero_shot"]["per_finding"]["emphysema"]["auc"])


def test_report_files_markdown_and_json(tmp_path):
    result = _result()
    paths = write_evaluation_report(result, tmp_path / "eval", "Zero-shot evaluation")
    assert set(paths) == {"json", "markdown", "zero_shot_auc", "roc", "retrieval"}
    assert all(p.parent == tmp_path / "eval" and p.is_file() for p in paths.values())
    assert paths["json"].name == "evaluation.json" and paths["markdown"].name == "evaluation.md"

    md = paths["markdown"].read_text()
    assert md.startswith("# Zero-shot evaluation\n")
    auc = result["zero_shot"]["per_finding"]["emphysema"]["auc"]
    interval = result["zero_shot_ci"]["per_finding"]["emphysema"]
    row = next(line for line in md.splitlines() if line.startswith("| emphysema |"))
    assert f"{auc:.3f} [{interval['low']:.3f}, {interval['high']:.3f}]" in row
    assert row.endswith(f"| {result['linear_probe']['per_finding']['emphysema']['auc']:.3f} |")
    assert any(line.startswith("| lung nodule |") for line in md.splitlines())
    assert any(line.startswith("| hiatal hernia | n/a |") for line in md.splitlines())
    mean_row = next(line for line in md.splitlines() if line.startswith("| **Mean (2 findings)** |"))
    assert f"{result['zero_shot']['mean']['auc']:.3f} [" in mean_row
    assert "Not scored" in md and "hiatal hernia" in md
    assert "`There is {p}.` / `There is no {p}.`" in md and "| **2** (used) |" in md and "| 0.660 |" in md
    r1, r1_ci = result["retrieval"]["recall"][1], result["retrieval_ci"]["recall"][1]
    assert f"| 1 | {r1:.3f} [{r1_ci['low']:.3f}, {r1_ci['high']:.3f}] | 0.017 |" in md  # random 1/60
    assert "| 100 | 1.000" in md and "trivially 1): 100." in md  # R@100 > N = 60 is clipped
    assert "200 resamples of studies (seed 0)" in md
    assert "![roc](roc.png)" in md

    loaded = json.loads(paths["json"].read_text())
    assert loaded["zero_shot"]["mean"]["auc"] == pytest.approx(result["zero_shot"]["mean"]["auc"])
    assert loaded["retrieval"]["recall"]["5"] == result["retrieval"]["recall"][5]
    assert loaded["prompt_pairs"][4] == 0.63
    assert loaded["model"] == {"name": "greenrfm-test", "variant": "lite"}
    assert "scores" not in loaded["linear_probe"] and "y_true" not in loaded
    assert json.loads(json.dumps(loaded)) == loaded


def test_pngs_are_real_images(tmp_path):
    from PIL import Image

    paths = write_evaluation_report(_result(), tmp_path, "t")
    for key in ("zero_shot_auc", "roc", "retrieval"):
        data = paths[key].read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000, key
        with Image.open(paths[key]) as image:
            assert image.width > 400 and image.height > 300
            assert len(image.convert("L").getcolors(maxcolors=1 << 16) or ()) > 20  # not a blank canvas


def test_roc_from_arrays_and_missing_sections(tmp_path):
    result = _result(with_roc=False)
    del result["retrieval"], result["retrieval_ci"], result["prompt_pairs"]
    paths = write_evaluation_report(result, tmp_path, "t")
    assert "retrieval" not in paths and not (tmp_path / "retrieval.png").exists()
    assert paths["roc"].read_bytes()[:8] == PNG_MAGIC
    loaded = json.loads(paths["json"].read_text())
    assert set(loaded["roc"]) == {"emphysema", "lung nodule"}
    assert "scores" not in loaded and "y_true" not in loaded
    md = paths["markdown"].read_text()
    assert "## Report-to-volume retrieval" not in md and "## Prompt pairs" not in md
