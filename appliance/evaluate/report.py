"""Write an evaluation as evaluation.json, evaluation.md and PNG charts.

The `result` dict that write_evaluation_report expects (every key optional except `zero_shot`):

- "model": free-form dict describing the checkpoint (name, variant, run id, ...), listed at the top.
- "n_test_studies": int.
- "findings": list of finding names, in table order (default: the order of zero_shot["per_finding"]).
- "prompt_pair": index into zero_shot.PROMPT_PAIRS used for the zero-shot table (default DEFAULT_PROMPT_PAIR).
- "prompt_pairs": mean zero-shot AUC per prompt pair, a list indexed like PROMPT_PAIRS or a {index: auc} dict.
- "zero_shot": metrics.binary_metrics output for the chosen prompt pair.
- "zero_shot_ci": metrics.bootstrap_ci output for the same scores.
- "retrieval": retrieval.retrieval_recall output; "retrieval_ci": retrieval.retrieval_bootstrap_ci output.
- "linear_probe": probe.linear_probe output (its "scores" array is not written).
- "roc": roc_curves output, {finding: {"fpr": [...], "tpr": [...], "auc": float}}; when absent, "y_true" (N, C)
  and "scores" (N, C) arrays are used to compute it. Those two arrays are not written to the JSON.

Charts use matplotlib's object-oriented API on an Agg canvas, so pyplot and the global backend stay untouched.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_curve

from appliance.evaluate.metrics import fmt_ci, fmt_value
from appliance.evaluate.zero_shot import DEFAULT_PROMPT_PAIR, PROMPT_PAIRS

# Raw per-study arrays: inputs for the ROC curves, too big and too identifying for the summary.
_UNWRITTEN_KEYS = ("y_true", "scores")


def roc_curves(y_true: np.ndarray, scores: np.ndarray, names: list[str]) -> dict:
    """{finding: {"fpr", "tpr", "auc"}} for findings with both classes; -1 labels and NaN scores left out."""
    from sklearn.metrics import auc as area

    y_true, scores = np.asarray(y_true), np.asarray(scores, dtype=np.float64)
    curves: dict[str, dict] = {}
    for c, name in enumerate(names):
        rows = (y_true[:, c] != -1) & np.isfinite(scores[:, c])
        y = y_true[rows, c] == 1
        if y.all() or not y.any():
            continue
        fpr, tpr, _ = roc_curve(y, scores[rows, c])
        curves[name] = {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "auc": float(area(fpr, tpr))}
    return curves


def _jsonable(value):
    """Plain JSON types: numpy scalars and arrays unwrapped, NaN/inf as null, keys as strings."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def _summary(result: dict) -> dict:
    summary = {k: v for k, v in result.items() if k not in _UNWRITTEN_KEYS}
    if "linear_probe" in summary:
        summary["linear_probe"] = {k: v for k, v in summary["linear_probe"].items() if k != "scores"}
    if "roc" not in summary and "y_true" in result and "scores" in result:
        summary["roc"] = roc_curves(result["y_true"], result["scores"], _findings(result))
    return summary


def _findings(result: dict) -> list[str]:
    return list(result.get("findings") or result["zero_shot"]["per_finding"])


def _prompt_pair_aucs(result: dict) -> dict[int, float | None]:
    raw = result.get("prompt_pairs")
    if raw is None:
        return {}
    items = raw.items() if isinstance(raw, dict) else enumerate(raw)
    return {int(k): v for k, v in items}


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def _prompt_text(template: str) -> str:
    return f"`{template}`" if template else "(empty)"


def _markdown(result: dict, title: str, images: dict[str, Path]) -> str:
    names = _findings(result)
    zero_shot = result["zero_shot"]
    ci = result.get("zero_shot_ci") or {}
    probe = result.get("linear_probe") or {}
    pair = int(result.get("prompt_pair", DEFAULT_PROMPT_PAIR))
    lines = [f"# {title}", ""]
    for key, value in (result.get("model") or {}).items():
        lines.append(f"- {key}: {value}")
    if "n_test_studies" in result:
        lines.append(f"- test studies: {result['n_test_studies']}")
    pos, neg = PROMPT_PAIRS[pair]
    lines.append(f"- zero-shot prompt pair {pair}: {_prompt_text(pos)} / {_prompt_text(neg)}")
    if ci:
        level = round(100 * (1 - ci["alpha"]))
        unit = {"study": "studies", "group": "groups (e.g. patients)"}.get(ci["unit"], ci["unit"])
        lines.append(f"- CIs: {level}% percentile bootstrap, {ci['n_resamples']} resamples of {unit} "
                     f"(seed {ci['seed']})")
    lines += ["", "## Zero-shot classification", "",
              "| Finding | AUC [95% CI] | ACC | F1 | Precision | Sensitivity | Specificity | n pos/neg | Probe AUC |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        m = zero_shot["per_finding"][name]
        interval = (ci.get("per_finding") or {}).get(name) or {}
        probe_auc = ((probe.get("per_finding") or {}).get(name) or {}).get("auc")
        lines.append("| " + " | ".join([
            _cell(name), fmt_ci(m["auc"], interval.get("low"), interval.get("high")),
            *(fmt_value(m[k]) for k in ("acc", "f1", "precision", "sensitivity", "specificity")),
            f"{m['n_pos']}/{m['n_neg']}", fmt_value(probe_auc)]) + " |")
    mean, mean_ci = zero_shot["mean"], ci.get("mean_auc") or {}
    lines.append("| " + " | ".join([
        f"**Mean ({zero_shot['n_findings_scored']} findings)**",
        fmt_ci(mean["auc"], mean_ci.get("low"), mean_ci.get("high")),
        *(fmt_value(mean[k]) for k in ("acc", "f1", "precision", "sensitivity", "specificity")),
        "", fmt_value(probe.get("mean_auc"))]) + " |")
    if zero_shot["findings_unscored"]:
        lines += ["", "Not scored (no positive or no negative in the test set), left out of the mean: "
                  + ", ".join(zero_shot["findings_unscored"]) + "."]
    if probe.get("skipped"):
        lines += ["", "Linear probe skipped: " + "; ".join(f"{k}: {v}" for k, v in probe["skipped"].items()) + "."]
    pair_aucs = _prompt_pair_aucs(result)
    if pair_aucs:
        lines += ["", "## Prompt pairs", "", "| # | Positive | Negative | Mean AUC |", "|---|---|---|---|"]
        for index, (pos, neg) in enumerate(PROMPT_PAIRS):
            marker = f"**{index}** (used)" if index == pair else str(index)
            lines.append(f"| {marker} | {_prompt_text(pos)} | {_prompt_text(neg)} | "
                         f"{fmt_value(pair_aucs.get(index))} |")
    retrieval = result.get("retrieval")
    if retrieval:
        recall_ci = (result.get("retrieval_ci") or {}).get("recall") or {}
        lines += ["", f"## Report-to-volume retrieval (N = {retrieval['n']})", "", "| K | Recall@K | Random |",
                  "|---|---|---|"]
        for k, value in retrieval["recall"].items():
            interval = recall_ci.get(k) or recall_ci.get(str(k)) or {}
            lines.append(f"| {k} | {fmt_ci(value, interval.get('low'), interval.get('high'))} | "
                         f"{fmt_value(retrieval['random'][k])} |")
        if retrieval.get("ks_clipped"):
            lines += ["", "K larger than the test set (recall trivially 1): "
                      + ", ".join(str(k) for k in retrieval["ks_clipped"]) + "."]
    if images:
        lines += ["", "## Charts", ""] + [f"![{key}]({path.name})" for key, path in images.items()]
    return "\n".join(lines) + "\n"


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _plot_zero_shot_auc(result: dict, path: Path) -> Path:
    names = _findings(result)
    per_finding = result["zero_shot"]["per_finding"]
    ci = (result.get("zero_shot_ci") or {}).get("per_finding") or {}
    mean_ci = (result.get("zero_shot_ci") or {}).get("mean_auc") or {}
    labels = names + ["Mean"]
    aucs = [per_finding[n]["auc"] for n in names] + [result["zero_shot"]["mean"]["auc"]]
    intervals = [ci.get(n) or {} for n in names] + [mean_ci]
    values = np.array([np.nan if a is None else a for a in aucs])
    errors = np.zeros((2, len(labels)))
    for i, (auc, interval) in enumerate(zip(aucs, intervals)):
        if auc is not None and interval.get("low") is not None:
            errors[:, i] = (auc - interval["low"], interval["high"] - auc)
    fig = _figure(7.5, max(3.0, 1.2 + 0.32 * len(labels)))
    ax = fig.add_subplot()
    y = np.arange(len(labels))
    colours = ["tab:blue"] * len(names) + ["tab:orange"]
    ax.barh(y, np.nan_to_num(values), xerr=errors, color=colours, capsize=3, error_kw={"elinewidth": 1})
    ax.axvline(0.5, color="grey", linestyle="--", linewidth=1, label="chance")
    for i, auc in enumerate(aucs):
        if auc is None:
            ax.text(0.01, i, "not scored", va="center", fontsize=7, color="dimgray")
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("ROC-AUC")
    ax.set_title("Zero-shot AUC per finding (95% CI)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


def _plot_roc(curves: dict, path: Path) -> Path:
    fig = _figure(8, 6)
    ax = fig.add_subplot()
    for i, (name, curve) in enumerate(curves.items()):
        # ten colours in the cycle, so the line style tells findings 11-20 from 1-10
        linestyle = ("-", "--", ":")[min(i // 10, 2)]
        label = f"{name} ({curve['auc']:.2f})" if curve.get("auc") is not None else name
        ax.plot(curve["fpr"], curve["tpr"], linewidth=1.2, linestyle=linestyle, color=f"C{i % 10}", label=label)
    ax.plot([0, 1], [0, 1], color="grey", linestyle="-", linewidth=0.8, alpha=0.6)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("False positive rate (1 - specificity)")
    ax.set_ylabel("True positive rate (sensitivity)")
    ax.set_title("Zero-shot ROC curves")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    return path


def _plot_retrieval(result: dict, path: Path) -> Path:
    retrieval = result["retrieval"]
    ks = sorted(int(k) for k in retrieval["recall"])
    recall_of = {int(k): v for k, v in retrieval["recall"].items()}
    random_of = {int(k): v for k, v in retrieval["random"].items()}
    fig = _figure(6, 4.2)
    ax = fig.add_subplot()
    ax.plot(ks, [recall_of[k] for k in ks], marker="o", label="model")
    recall_ci = {int(k): v for k, v in ((result.get("retrieval_ci") or {}).get("recall") or {}).items()}
    if all(k in recall_ci for k in ks):
        ax.fill_between(ks, [recall_ci[k]["low"] for k in ks], [recall_ci[k]["high"] for k in ks], alpha=0.2,
                        label="95% CI")
    ax.plot(ks, [random_of[k] for k in ks], marker="s", linestyle="--", color="grey", label="random ranking")
    ax.set_xscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K")
    ax.set_title(f"Report-to-volume retrieval (N = {retrieval['n']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


def write_evaluation_report(result: dict, out_dir: Path, title: str) -> dict[str, Path]:
    """Write evaluation.json, evaluation.md and the charts the result has data for into `out_dir`.

    Returns {"json", "markdown", and where written "zero_shot_auc", "roc", "retrieval"}: paths.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = _summary(result)
    images: dict[str, Path] = {"zero_shot_auc": _plot_zero_shot_auc(summary, out_dir / "zero_shot_auc.png")}
    if summary.get("roc"):
        images["roc"] = _plot_roc(summary["roc"], out_dir / "roc.png")
    if summary.get("retrieval"):
        images["retrieval"] = _plot_retrieval(summary, out_dir / "retrieval.png")
    json_path = out_dir / "evaluation.json"
    json_path.write_text(json.dumps(_jsonable(summary), indent=2, allow_nan=False) + "\n")
    md_path = out_dir / "evaluation.md"
    md_path.write_text(_markdown(summary, title, images))
    return {"json": json_path, "markdown": md_path, **images}
