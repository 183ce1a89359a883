"""Scaling of a probe metric with the pre-training set size: f(x) = a * x^k (RECIPES.md section 3).

The fit is scipy's curve_fit (least squares on the metric itself), started from the straight-line fit of
log(metric) on log(x). The chart uses matplotlib's object-oriented API on an Agg canvas (no pyplot, no global
backend change), log x axis, points and fitted curves per encoder.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from scipy.optimize import OptimizeWarning, curve_fit


def power_law(x: np.ndarray, a: float, k: float) -> np.ndarray:
    return a * np.power(x, k)


def _r2(y: np.ndarray, fitted: np.ndarray) -> float:
    ss_res = float(np.sum((y - fitted) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    if ss_tot == 0.0:
        return 1.0 if ss_res == 0.0 else 0.0
    return 1.0 - ss_res / ss_tot


def fit_power_law(n_images: Sequence[int], metric: Sequence[float]) -> dict:
    """Fit metric = a * n_images^k; returns {"a", "k", "r2", "n_points", "method"}.

    `method` is "curve_fit", or "log-log" when curve_fit does not converge (the starting fit is kept).
    Needs at least two distinct sizes, all > 0, and finite metrics.
    """
    x = np.asarray(n_images, dtype=np.float64)
    y = np.asarray(metric, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"n_images and metric must be 1-D of equal length, got {x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("power-law fit needs finite sizes and metrics")
    if (x <= 0).any():
        raise ValueError("power-law fit needs pre-training set sizes > 0")
    if np.unique(x).size < 2:
        raise ValueError("power-law fit needs at least two distinct pre-training set sizes")
    if (y > 0).all():
        k0, log_a0 = np.polyfit(np.log(x), np.log(y), 1)
        p0 = (float(np.exp(log_a0)), float(k0))
    else:
        p0 = (float(y.mean()), 0.0)
    method = "curve_fit"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OptimizeWarning)  # no covariance from 2 points; only a, k are used
            (a, k), _ = curve_fit(power_law, x, y, p0=p0, maxfev=10_000)
    except (RuntimeError, ValueError):
        (a, k), method = p0, "log-log"
    a, k = float(a), float(k)
    return {"a": a, "k": k, "r2": _r2(y, power_law(x, a, k)), "n_points": int(x.size), "method": method}


def scaling_fits(points_by_encoder: Mapping[str, tuple[Sequence[int], Sequence[float]]]) -> dict:
    """{encoder: {"n_images", "metric", "fit"}}; "fit" is None (with "fit_error") when it cannot be fitted."""
    out = {}
    for name, (n_images, metric) in points_by_encoder.items():
        entry = {"n_images": [int(v) for v in n_images], "metric": [float(v) for v in metric], "fit": None}
        try:
            entry["fit"] = fit_power_law(n_images, metric)
        except ValueError as err:
            entry["fit_error"] = str(err)
        out[name] = entry
    return out


def plot_scaling(points_by_encoder: Mapping[str, tuple[Sequence[int], Sequence[float]]], out_png: str | Path,
                 metric_label: str = "macro AUPRC", title: str = "Probe metric vs pre-training set size") -> Path:
    """Scatter of (pre-training images, metric) per encoder with its fitted power law; writes a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fits = scaling_fits(points_by_encoder)
    fig = Figure(figsize=(6.4, 4.4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, (name, entry) in enumerate(fits.items()):
        colour = f"C{i % 10}"
        x, y = np.asarray(entry["n_images"], float), np.asarray(entry["metric"], float)
        ax.scatter(x, y, color=colour, zorder=3)
        fit = entry["fit"]
        label = name
        if fit is not None:
            grid = np.geomspace(x.min(), x.max(), 100)
            ax.plot(grid, power_law(grid, fit["a"], fit["k"]), color=colour)
            label = f"{name}: {fit['a']:.3g} x^{fit['k']:.3f} (R² {fit['r2']:.2f})"
        ax.plot([], [], color=colour, marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("pre-training images")
    ax.set_ylabel(metric_label)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if fits:
        ax.legend(fontsize=8)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, format="png")
    return out_png
