"""Federation for real: a SuperLink and three SuperNodes as separate processes on 127.0.0.1, TLS and
node authentication on, each SuperNode with its own synthetic site workspace; faults injected."""

from __future__ import annotations

import json
import socket
import ssl
import time
from pathlib import Path

import pytest

from appliance.federated.certs import make_consortium
from appliance.federated.demo import DEMO_MODEL, FedDemoSettings, prepare_site
from appliance.federated.deploy import Federation, write_app
from appliance.federated.local import initial_state, local_evaluate

SITES = ["site-a", "site-b", "site-c"]
pytestmark = pytest.mark.timeout(1500)
SETTINGS = FedDemoSettings(studies_per_site=12)


@pytest.fixture(scope="module")
def consortium(tmp_path_factory):
    """Three site workspaces (own cohorts) and the consortium's certificates, made once."""
    root = tmp_path_factory.mktemp("consortium")
    sites = {name: prepare_site(root / "sites", name, 11 * (i + 1), SETTINGS) for i, name in enumerate(SITES)}
    files = make_consortium(root / "certs", hosts=["localhost"], sites=SITES + ["rogue"])
    return root, sites, files


def _run_config(state_dir: Path, **extra) -> dict:
    return {"state-dir": str(state_dir), "rounds": 2, "min-nodes": 3, "min-results": 2, "local-epochs": 1,
            "variant": DEMO_MODEL.variant, "embed-dim": DEMO_MODEL.embed_dim,
            "text-max-tokens": DEMO_MODEL.text_max_tokens, "round-timeout-s": 900.0, "wait-nodes-s": 120.0,
            "tracking": False} | extra


def _federation(tmp_path, consortium, sites=SITES, database=None) -> Federation:
    root, workspaces, files = consortium
    fed = Federation.for_consortium(tmp_path / "coordinator", files)
    fed.start_sites({name: workspaces[name] for name in sites}, files, threads=1, database=database)
    return fed


def _wait_for(predicate, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_three_sites_two_rounds_with_tls_and_node_auth(consortium, tmp_path):
    root, workspaces, files = consortium
    state = tmp_path / f"fed-{tmp_path.name}"  # also the run name in the shared site workspaces
    with _federation(tmp_path, consortium) as fed:
        # the SuperLink speaks TLS with the consortium's certificate, and nothing else
        ctx = ssl.create_default_context(cafile=str(files.ca.cert))
        with socket.create_connection(("127.0.0.1", fed.port)) as raw, \
                ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
        # a site whose key was never registered is refused, and the federation goes on without it
        rogue = fed.start_supernode("rogue", workspaces["site-b"], files.sites["rogue"].private_key, max_retries=1)
        assert rogue.wait(120) != 0
        assert len([n for n in fed.nodes() if n.get("status") == "online"]) == 3
        run_id = fed.submit(write_app(tmp_path / "app"), _run_config(state, **{"min-results": 3, "tracking": True}))
        status = fed.wait_run(run_id, timeout=900)
    assert status == "finished:completed", fed.server_log(run_id)[-2000:]
    rounds = json.loads((state / "rounds.json").read_text())
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["sites"] == 3 and r["failures"] == 0 for r in rounds)
    assert set(rounds[-1]["per_site"]) == set(SITES)  # cross-site evaluation: every site scored the model

    final = json.loads((state / "summary.json").read_text())
    from appliance.evaluate.stage import load_trained_model

    model = load_trained_model(state)
    trained = {k: v for k, v in model.model.state_dict().items()}
    start = initial_state(DEMO_MODEL, tmp_path / "tok", seed=0)
    untrained = [local_evaluate(ws, start, model=DEMO_MODEL) for ws in workspaces.values()]
    after = [local_evaluate(ws, trained, model=DEMO_MODEL) for ws in workspaces.values()]
    mean = lambda rows, k: sum(r.metrics[k] for r in rows) / len(rows)  # noqa: E731
    # the global model learned something every site can measure on its own held-out patients
    assert mean(after, "classifier_bce") < mean(untrained, "classifier_bce")

    def pooled_zero_shot_auc(results):  # all sites' held-out series together: more positives per finding
        import numpy as np

        from appliance.evaluate.metrics import binary_metrics

        y = np.concatenate([r.scores["labels"] for r in results])
        s = np.concatenate([r.scores["zero_shot"] for r in results])
        return binary_metrics(y, s, list(DEMO_MODEL.findings))["mean"]["auc"]

    # Reported, not asserted: two short rounds on 3 x 12 studies do not move the mean zero-shot AUC beyond
    # its noise on these few held-out series (measured 0.37 -> 0.35, 0.46 -> 0.56, 0.39 -> 0.45, and
    # 0.49 -> 0.49 on 41 held-out series), so asserting a gain failed CI by chance; the held-out BCE above
    # is the reliable sign of learning at this size.
    before_auc, after_auc = pooled_zero_shot_auc(untrained), pooled_zero_shot_auc(after)
    print(f"zero-shot AUC on held-out data: untrained {before_auc:.3f}, after 2 rounds {after_auc:.3f}")
    assert 0.0 <= before_auc <= 1.0 and 0.0 <= after_auc <= 1.0
    assert final["completed"] == 2

    # MLflow: one run with per-round and per-site metrics, and the final model registered
    from mlflow.tracking import MlflowClient

    from appliance.tracking import default_tracking_uri

    client = MlflowClient(default_tracking_uri(state))
    run = client.search_runs([client.get_experiment_by_name("greenrfm-federated").experiment_id])[0]
    assert {"eval/zero_shot_auc", "train/train_loss", "site/site-a/zero_shot_auc"} <= set(run.data.metrics)
    assert client.search_model_versions("name='greenrfm-federated-global'")


def test_site_killed_mid_round_then_superlink_killed_and_restarted(consortium, tmp_path):
    """Round 1: site-c is killed while training; the round is aggregated from the two others and
    round 2 goes on with them (no hang). Then the SuperLink is killed and restarted: the run is
    submitted again and resumes after the last checkpointed round."""
    state = tmp_path / f"fed-{tmp_path.name}"  # also the run name in the shared site workspaces
    database = tmp_path / "superlink.db"  # registered keys and run history survive the restart
    with _federation(tmp_path, consortium, database=database) as fed:
        app = write_app(tmp_path / "app")
        config = _run_config(state, **{"rounds": 3, "min-nodes": 2, "min-results": 2, "round-timeout-s": 900.0})
        run_id = fed.submit(app, config)
        round_dir = consortium[1]["site-c"] / "runs" / "fed" / state.name / "round-0001"
        _wait_for(round_dir.exists, 300, "site-c to start its round-1 training")
        fed.kill("supernode-site-c")
        rounds_file = state / "rounds.json"
        _wait_for(lambda: rounds_file.exists() and len(json.loads(rounds_file.read_text())) >= 2, 900,
                  "round 2 with the two remaining sites")
        fed.kill("superlink")
        fed.start_superlink(database)
        fed.wait_online(2, timeout=180)
        assert not fed.run_status(run_id).startswith("finished:completed")
        again = fed.submit(app, config)
        status = fed.wait_run(again, timeout=900)
    assert status == "finished:completed", fed.server_log(again)[-2000:]
    summary = json.loads((state / "summary.json").read_text())
    assert summary["resumed_after"] == 2
    rounds = summary["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert [r["sites"] for r in rounds] == [2, 2, 2]
    assert set(rounds[1]["per_site"]) == {"site-a", "site-b"}


def test_secure_aggregation_round_with_three_sites(consortium, tmp_path):
    """SecAgg+ (Flower's legacy workflow, the only one that has it in flwr 1.41): the coordinator
    gets the sum of the masked updates, and the result equals the plain weighted mean."""
    state = tmp_path / f"fed-{tmp_path.name}"
    with _federation(tmp_path, consortium) as fed:
        run_id = fed.submit(write_app(tmp_path / "app", secagg=True),
                            _run_config(state, **{"rounds": 1, "min-results": 3, "secagg": True}))
        status = fed.wait_run(run_id, timeout=900)
    assert status == "finished:completed", fed.server_log(run_id)[-2000:]
    summary = json.loads((state / "summary.json").read_text())
    assert summary["secagg"] and summary["completed"] == 1 and summary["rounds"][0]["sites"] == 3

    import torch

    from appliance.train.checkpoint import load_checkpoint

    # each site kept its own round's weights: their example-weighted mean is what SecAgg+ revealed
    rounds = [consortium[1][s] / "runs" / "fed" / state.name / "round-0001" for s in SITES]
    sites = [load_checkpoint(r / "model.pt")["state_dict"] for r in rounds]
    n = [json.loads((r / "result.json").read_text())["n_items"]["train"] for r in rounds]
    merged = load_checkpoint(state / "model.pt")["state_dict"]
    key = "vision.stem.0.weight"
    expected = sum(w * s[key] for w, s in zip(n, sites)) / sum(n)
    assert torch.allclose(merged[key], expected, atol=1e-3)


def test_bench_fed_splits_a_round(tmp_path):
    from appliance.federated.bench import bench_fed

    result = bench_fed(sites=2, rounds=1, studies=8, variant="lite", text="tiny", embed_dim=32, workdir=tmp_path)
    (r,) = result["per_round"]
    assert r["local_training_s"] > 0 and r["transfer_and_overhead_s"] >= 0 and r["aggregation_s"] >= 0
    assert r["seconds"] >= r["local_training_s"]
    assert result["model"]["parameters"]["vision"] > 30e6  # the r3d_18 trunk, whatever the text encoder
    # weights went down and up to two sites at least once each
    assert result["bytes_per_round"]["total"] > 4 * result["model"]["state_dict_mb"] * 2**20 * 0.9
