"""`rfm bench export` on a tiny crop: every backend row is there, ratios and parity are consistent,
unusable backends are skipped with a reason, and the JSON the CLI writes is what it printed
(no timing is asserted)."""

import contextlib
import io
import json

import pytest

from appliance.cli import main

TINY_CROP = (32, 32, 16)  # GreenRFM-L: stem stride 4, then r3d_18's three stride-2 stages -> 1x1x1 left


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """One CLI run (lite, batch 1 and 2, 1 warm-up + 2 timed calls) at the tiny crop: exit code,
    JSON path and what it printed."""
    import appliance.bench

    out = tmp_path_factory.mktemp("bench") / "bench-export.json"
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.setattr(appliance.bench, "DEMO_CROP", TINY_CROP)  # --quick's crop, read when the command runs
        code = main(["bench", "export", "--quick", "--device", "cpu", "--iterations", "2", "--warmup", "1",
                     "--out", str(out)])
    return code, out, printed.getvalue()


def test_cli_writes_readable_json(bench):
    code, out, printed = bench
    assert code == 0, printed
    # a narrow console truncates the table cells; the title, notes and last line are whole
    assert "rfm bench export" in printed and "tensorrt-fp16 skipped: " in printed and f"written to {out}" in printed
    result = json.loads(out.read_text())
    assert result["stage"] == "export" and result["device"] == "cpu" and result["gpu"] is None
    assert result["crops"] == [list(TINY_CROP)] and result["batch_sizes"] == [1, 2] and result["cpu_count"] >= 1
    assert result["torch"] and result["onnxruntime"]
    assert any("MONAI" in n for n in result["notes"])


def test_every_backend_row_with_ratios_and_parity(bench):
    result = json.loads(bench[1].read_text())
    rows = {(r["backend"], r["batch"]): r for r in result["results"]}
    assert len(rows) == len(result["results"]) == 5 * 2  # lite x tiny crop x 5 backends x 2 batch sizes
    for batch in (1, 2):
        eager, amp = rows[("pytorch-eager-fp32", batch)], rows[("pytorch-amp", batch)]
        for backend in ("pytorch-eager-fp32", "pytorch-amp", "onnxruntime-cpu"):
            r = rows[(backend, batch)]
            assert r["variant"] == "lite" and r["crop"] == list(TINY_CROP)
            assert r["volumes_per_s"] > 0 and r["iterations"] == 2 and r["peak_rss_mb"] > 0
            assert 0 < r["latency_ms_median"] <= r["latency_ms_p90"]
            assert r["vs_eager"] == pytest.approx(r["volumes_per_s"] / eager["volumes_per_s"])
            assert r["vs_amp"] == pytest.approx(r["volumes_per_s"] / amp["volumes_per_s"])
        assert eager["parity"] == "reference" and eager["vs_eager"] == pytest.approx(1.0)
        assert rows[("onnxruntime-cpu", batch)]["cosine_min"] >= 0.9999
        assert rows[("onnxruntime-cpu", batch)]["parity"]["n"] == batch
        assert amp["precision"] == "autocast bf16" and amp["cosine_min"] > 0.99  # bf16: close, not exact
        for backend in ("onnxruntime-cuda", "tensorrt-fp16"):
            assert rows[(backend, batch)]["skipped"]  # a reason, no figures
            assert "volumes_per_s" not in rows[(backend, batch)]
    notes = " ".join(result["notes"])
    assert "tensorrt-fp16 skipped: " in notes and "onnxruntime-cuda skipped: " in notes


def test_bad_options_are_one_line_errors(capsys):
    assert main(["bench", "export", "--batch-sizes", "1,x"]) == 2
    assert "--batch-sizes" in capsys.readouterr().err
    assert main(["bench", "export", "--tensorrt", "on"]) == 2
    assert "--tensorrt on" in capsys.readouterr().err
