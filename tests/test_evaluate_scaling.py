"""Power-law fit of a probe metric against the pre-training set size, and its chart (evaluate/scaling.py)."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.image import imread

from appliance.evaluate.scaling import fit_power_law, plot_scaling, scaling_fits

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_power_law_recovers_a_and_k_from_noisy_points():
    rng = np.random.default_rng(0)
    x = np.array([1_000, 3_000, 10_000, 30_000, 100_000, 300_000])
    for a, k in ((0.3, 0.1), (2.0, -0.25), (0.05, 0.4)):
        y = a * x ** k * (1 + 0.01 * rng.standard_normal(x.size))
        fit = fit_power_law(x.tolist(), y.tolist())
        assert fit["a"] == pytest.approx(a, rel=0.1) and fit["k"] == pytest.approx(k, abs=0.01)
        assert fit["r2"] > 0.98 and fit["n_points"] == 6 and fit["method"] == "curve_fit"
    exact = fit_power_law([10, 100], [1.0, 2.0])  # two points: a curve through both
    assert exact["k"] == pytest.approx(np.log10(2)) and exact["r2"] == pytest.approx(1.0)


def test_least_squares_on_the_metric_not_on_its_log():
    # One low point: the log-log line is pulled by it more than the least-squares curve on the metric is.
    x = np.array([1e3, 1e4, 1e5, 1e6])
    y = np.array([0.02, 0.50, 0.56, 0.62])
    fit = fit_power_law(x, y)
    k_loglog = np.polyfit(np.log(x), np.log(y), 1)[0]
    residual = np.sum((y - fit["a"] * x ** fit["k"]) ** 2)
    a_ll = np.exp(np.polyfit(np.log(x), np.log(y), 1)[1])
    assert residual < np.sum((y - a_ll * x ** k_loglog) ** 2)
    assert fit["k"] != pytest.approx(k_loglog, abs=1e-3)


@pytest.mark.parametrize("x, y, message", [
    ([1000], [0.5], "two distinct"),
    ([1000, 1000], [0.5, 0.6], "two distinct"),
    ([0, 1000], [0.5, 0.6], "> 0"),
    ([100, 1000], [0.5], "equal length"),
    ([100, 1000], [0.5, float("nan")], "finite"),
])
def test_bad_points_are_clear_errors(x, y, message):
    with pytest.raises(ValueError, match=message):
        fit_power_law(x, y)


def test_scaling_plot_is_a_png_with_curves(tmp_path):
    points = {"rad-dino + site": ([1_000, 5_000, 30_000], [0.41, 0.47, 0.52]),
              "clip + site": ([1_000, 5_000, 30_000], [0.38, 0.45, 0.49]),
              "one point": ([2_000], [0.4])}
    fits = scaling_fits(points)
    assert fits["one point"]["fit"] is None and "two distinct" in fits["one point"]["fit_error"]
    assert fits["clip + site"]["fit"]["k"] > 0
    out = plot_scaling(points, tmp_path / "charts" / "scaling.png")
    assert out.read_bytes()[:8] == PNG_MAGIC
    pixels = imread(out)
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 300
    assert pixels[..., :3].std() > 0.05  # not a blank canvas
