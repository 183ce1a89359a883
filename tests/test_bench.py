"""`rfm bench ingest` writes the figures it prints (no timing is asserted)."""

import json

from appliance.cli import main
from conftest import GE_DIR  # the real series, when ../shared is beside the checkout


def test_bench_ingest_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["bench", "ingest", "--studies", "2", "--out", str(out), "--workers", "1"]
    if GE_DIR.is_dir():
        args += ["--real", str(GE_DIR)]
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert result["stage"] == "ingest"
    synthetic = result["datasets"]["synthetic-2"]
    for key in ("series_per_s", "slices_per_s", "mb_per_s", "peak_rss_mb", "ingest_s", "preprocess_s"):
        assert synthetic[key] > 0
    assert synthetic["series"] == synthetic["cached"] >= 2
    peer = synthetic["peer_dcm2niix"]
    assert "ratio" in peer or "skipped" in peer
    if GE_DIR.is_dir():
        assert result["datasets"][f"real:{GE_DIR.name}"]["slices"] == 28
    assert "rfm bench ingest" in capsys.readouterr().out


def test_bench_deid_writes_json_with_the_peer(tmp_path, capsys):
    out = tmp_path / "bench-deid.json"
    assert main(["bench", "deid", "--studies", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    r = result["datasets"]["synthetic-2"]
    assert r["files"] > 0 and r["full_stage"]["files_per_s"] > 0 and r["headers_only"]["files_per_s"] > 0
    assert r["full_stage"]["quarantined"] == 0
    peer = r["peer_dicognito"]
    if "files_per_s" in peer:
        assert r["ratio_headers_only_vs_dicognito"] > 0
    else:
        assert peer["skipped"]
    assert "rfm bench deid" in capsys.readouterr().out


def test_bench_labels_measures_rules_and_client_concurrency():
    from appliance.bench import bench_labels

    result = bench_labels(studies=10, latency_s=0.02, max_in_flight=8, n_requests=40)
    assert result["rules"]["reports_per_s"] > 0
    concurrent = result["openai_client"]["concurrent"]
    assert concurrent["labelled"] == concurrent["reports"] == 40
    assert concurrent["server_max_in_flight"] == 8  # the client really kept 8 requests open
    assert result["openai_client"]["one_at_a_time"]["server_max_in_flight"] == 1
