"""probe_report.json and probe_report.md from evaluate_frozen_encoders' result (plus scaling.png if given).

The result may also carry "scaling": scaling.scaling_fits output (points and power-law fits per encoder); the
report then has a scaling table and chart. Per-image arrays ("test_scores") are never written; the result holds
no patient or series identifiers, only counts and metrics.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from appliance.evaluate.metrics import fmt_ci, fmt_value
from appliance.evaluate.report import _jsonable
from appliance.evaluate.scaling import plot_scaling

_UNWRITTEN_KEYS = ("test_scores",)
GROUP_TITLES = {"findings": "Findings", "lines_tubes": "Lines/tubes"}


def _cell(text) -> str:
    return str(text).replace("|", "\\|")


def _row(cells) -> str:
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def _with_ci(entry: dict | None, metric: str) -> str:
    if not entry:
        return "n/a"
    ci = entry.get(f"{metric}_ci95") or [None, None]
    return fmt_ci(entry.get(metric), ci[0], ci[1])


def _p(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _diff(d: dict | None) -> str:
    if not d:
        return "n/a"
    ci = d.get("ci95") or [None, None]
    sign = "+" if d["diff"] is not None and d["diff"] >= 0 else ""
    return sign + fmt_ci(d["diff"], ci[0], ci[1])


def _setup(result: dict) -> list[str]:
    groups = result["groups"]
    counts = ", ".join(f"{len(v)} {GROUP_TITLES.get(k, k).lower()}" for k, v in groups.items())
    n_img, n_pat = result["n_images"], result["n_patients"]
    cfg = result["probe_config"]
    return [
        f"- tasks: {len(result['tasks'])} ({counts})",
        f"- images train/val/test: {n_img['train']}/{n_img['val']}/{n_img['test']}; "
        f"patients: {n_pat['train']}/{n_pat['val']}/{n_pat['test']}",
        f"- probe: per-layer Linear to {cfg['proj_dim']}, concatenated, attention pooling ({cfg['n_heads']} heads, "
        f"learned query), Linear; masked BCE, Adam lr {cfg['lr']}, early stopping on validation mean AUPRC "
        f"(patience {cfg['patience']}); seeds {result['seeds']}, test scores averaged over seeds",
        f"- CIs: 95% percentile bootstrap over patients, {result['n_resamples']} resamples; comparisons: paired "
        "hierarchical bootstrap (patients stratified by positive status, then images within patients), "
        "two-sided p-values",
    ]


def _macro_table(result: dict) -> list[str]:
    groups = list(result["groups"])
    header = ["Encoder"]
    for g in groups:
        header += [f"{GROUP_TITLES.get(g, g)} AUPRC [95% CI]", f"{GROUP_TITLES.get(g, g)} AUROC [95% CI]"]
    header.append("Per-seed AUPRC, mean ± sd")
    lines = ["## Macro results (seed-averaged probe)", "", _row(header), _row(["---"] * len(header))]
    for name, enc in result["encoders"].items():
        macro = enc["metrics"]["macro"]
        cells = [name + (" (baseline)" if name == result["baseline"] else "")]
        for g in groups:
            cells += [_with_ci(macro.get(g), "auprc"), _with_ci(macro.get(g), "auroc")]
        seed_vals = [s["test_macro"][groups[0]]["auprc"] for s in enc["per_seed"]]
        seed_vals = [v for v in seed_vals if v is not None]
        cells.append(f"{np.mean(seed_vals):.3f} ± {np.std(seed_vals, ddof=1) if len(seed_vals) > 1 else 0:.3f}"
                     if seed_vals else "n/a")
        lines.append(_row(cells))
    unscored = {t for enc in result["encoders"].values() for g in enc["metrics"]["macro"].values()
                for t in g["unscored"]}
    if unscored:
        lines += ["", "Not scored (no positive or no negative among the definite test labels), left out of the "
                  "macro means: " + ", ".join(sorted(unscored)) + "."]
    return lines


def _comparison_tables(result: dict) -> list[str]:
    if not result["comparisons"]:
        return []
    lines = ["## Comparisons (B - A)", "", _row(["A", "B", "Tasks", "Metric", "A", "B", "B - A [95% CI]", "p"]),
             _row(["---"] * 8)]
    for comp in result["comparisons"]:
        for g, entry in comp["macro"].items():
            for metric in ("auprc", "auroc"):
                d = entry.get(metric)
                lines.append(_row([comp["a"], comp["b"], f"{GROUP_TITLES.get(g, g)} ({entry['n_tasks']})",
                                   metric.upper(), fmt_value(d and d["a"]), fmt_value(d and d["b"]), _diff(d),
                                   _p(d and d["p_value"])]))
    for comp in result["comparisons"]:
        lines += ["", f"### {comp['b']} - {comp['a']} per task", "",
                  _row(["Task", "n pos/neg", "Patients", "AUPRC B - A [95% CI]", "p", "AUROC B - A [95% CI]", "p"]),
                  _row(["---"] * 7)]
        for task, entry in comp["per_task"].items():
            if not entry["scored"]:
                lines.append(_row([task, f"{entry['n_pos']}/{entry['n_neg']}", entry["n_patients"],
                                   "not scored", "", "not scored", ""]))
                continue
            lines.append(_row([task, f"{entry['n_pos']}/{entry['n_neg']}", entry["n_patients"],
                               _diff(entry["auprc"]), _p(entry["auprc"]["p_value"]), _diff(entry["auroc"]),
                               _p(entry["auroc"]["p_value"])]))
    return lines


def _task_table(result: dict) -> list[str]:
    names = list(result["encoders"])
    group_of = {t: g for g, tasks in result["groups"].items() for t in tasks}
    header = ["Task", "Group", "n pos/neg", "Prevalence"]
    for name in names:
        header += [f"{name} AUPRC [95% CI]", f"{name} AUROC [95% CI]"]
    lines = ["## Per task (test set)", "", _row(header), _row(["---"] * len(header))]
    first = result["encoders"][names[0]]["metrics"]["per_task"]
    for task in result["tasks"]:
        cells = [task, GROUP_TITLES.get(group_of[task], group_of[task]),
                 f"{first[task]['n_pos']}/{first[task]['n_neg']}", fmt_value(first[task]["prevalence"])]
        for name in names:
            entry = result["encoders"][name]["metrics"]["per_task"][task]
            cells += [_with_ci(entry, "auprc"), _with_ci(entry, "auroc")]
        lines.append(_row(cells))
    return lines


def _subgroup_tables(result: dict) -> list[str]:
    if not result.get("subgroups"):
        return []
    names, groups = list(result["encoders"]), list(result["groups"])
    lines = ["## Subgroups (test set)", "",
             "Macro AUPRC per subgroup [95% CI, patient bootstrap]; small groups and groups without both classes "
             "are listed without metrics."]
    for key, table in result["subgroups"].items():
        header = ["Group", "n images", "n patients", "Status"]
        header += [f"{n} {GROUP_TITLES.get(g, g)} AUPRC" for n in names for g in groups]
        lines += ["", f"### {key.replace('_', ' ')}", "", _row(header), _row(["---"] * len(header))]
        for value, entry in table.items():
            cells = [value, entry["n_images"], entry["n_patients"], entry["status"]]
            for n in names:
                macro = (entry["encoders"].get(n) or {}).get("macro", {})
                for g in groups:
                    m = macro.get(g)
                    cells.append(_with_ci(m, "auprc") + (f" ({m['n_tasks']} tasks)" if m else ""))
            lines.append(_row(cells))
    return lines


def _scaling_table(result: dict, png: Path | None) -> list[str]:
    scaling = result.get("scaling")
    if not scaling:
        return []
    lines = ["## Scaling with pre-training set size: f(x) = a * x^k", "",
             _row(["Encoder", "Points", "a", "k", "R²"]), _row(["---"] * 5)]
    for name, entry in scaling.items():
        fit = entry.get("fit")
        points = ", ".join(f"{n}: {fmt_value(m)}" for n, m in zip(entry["n_images"], entry["metric"]))
        if fit:
            lines.append(_row([name, points, f"{fit['a']:.4g}", f"{fit['k']:.4f}", f"{fit['r2']:.3f}"]))
        else:
            lines.append(_row([name, points, "n/a", "n/a", entry.get("fit_error", "n/a")]))
    if png is not None:
        lines += ["", f"![scaling]({png.name})"]
    return lines


def write_probe_report(result: dict, out_dir: str | Path, title: str = "Frozen-encoder probe evaluation"
                       ) -> tuple[Path, Path]:
    """Write probe_report.json (strict JSON, NaN as null) and probe_report.md into out_dir; returns both."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {k: v for k, v in result.items() if k not in _UNWRITTEN_KEYS}
    png = None
    if result.get("scaling"):
        points = {name: (e["n_images"], e["metric"]) for name, e in result["scaling"].items()}
        png = plot_scaling(points, out_dir / "scaling.png")
    json_path = out_dir / "probe_report.json"
    json_path.write_text(json.dumps(_jsonable(summary), indent=2, allow_nan=False) + "\n")
    lines = [f"# {title}", "", *_setup(result), "", *_macro_table(result)]
    for section in (_comparison_tables(result), _task_table(result), _subgroup_tables(result),
                    _scaling_table(result, png)):
        if section:
            lines += ["", *section]
    md_path = out_dir / "probe_report.md"
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path
