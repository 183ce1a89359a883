"""The coordinator's round rules, in-process: a stand-in for Flower's Grid whose sites answer, fail or
are missing, so each rule is tested exactly (the real processes are in test_fed_deploy.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from appliance.federated.server import CHECKPOINT, FederationError, FedRunConfig, load_global, run_federation


@pytest.fixture(autouse=True)
def serverapp_identity():
    """What Flower sets in a real ServerApp process before `main` runs (Message needs a run id)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


@pytest.fixture(autouse=True)
def small_global_model(monkeypatch):
    """The round rules do not depend on the network: a two-tensor "model" keeps these tests fast
    (the real GreenRFM travels in test_fed_deploy.py)."""
    def small_state(model, tokenizer_dir, seed=0):
        torch.manual_seed(seed)
        return {"w": torch.randn(4, 3), "bn.num_batches_tracked": torch.tensor(0)}

    monkeypatch.setattr("appliance.federated.server.initial_state", small_state)
    monkeypatch.setattr("appliance.federated.server.save_final_model", lambda path, state, cfg, tok: torch.save(state, path))


class Reply:
    def __init__(self, node: int, content: RecordDict | None = None, error: str | None = None):
        self.content = content
        self.metadata = SimpleNamespace(src_node_id=node)
        self.error = SimpleNamespace(reason=error, code=5)

    def has_error(self) -> bool:
        return self.error.reason is not None


class FakeGrid:
    """Sites by node id: "ok" trains (adds its id to every float weight), "fail" returns an error."""

    def __init__(self, sites: dict[int, str]):
        self.sites = sites
        self.sent: list[tuple[int, str, int]] = []  # (round, type, node)

    def get_node_ids(self):
        return list(self.sites)

    def send_and_receive(self, messages, timeout):
        replies = []
        for m in messages:
            node, kind = m.metadata.dst_node_id, m.metadata.message_type
            self.sent.append((int(m.content["config"]["server-round"]), kind, node))
            if self.sites[node] == "fail":
                replies.append(Reply(node, error="RuntimeError: the site's round failed"))
                continue
            site = ConfigRecord({"name": f"site{node}"})
            if kind == "train":
                state = {k: (v + node if v.is_floating_point() else v)
                         for k, v in m.content["arrays"].to_torch_state_dict().items()}
                content = RecordDict({"arrays": ArrayRecord(state), "site": site,
                                      "metrics": MetricRecord({"num-examples": 10 * node, "train_loss": 1.0 / node})})
            else:
                content = RecordDict({"site": site, "metrics": MetricRecord({"num-examples": 5,
                                                                              "zero_shot_auc": 0.5 + node / 100})})
            replies.append(Reply(node, content))
        return replies


def _cfg(tmp_path, **kw) -> FedRunConfig:
    base = dict(state_dir=str(tmp_path / "server"), rounds=2, min_nodes=2, min_results=2, wait_nodes_s=2.0,
                round_timeout_s=5.0, round_retries=1, embed_dim=32, text_max_tokens=64, tracking=False)
    return FedRunConfig(**(base | kw))


def test_rounds_aggregate_weighted_and_checkpoint_each_round(tmp_path):
    grid = FakeGrid({1: "ok", 2: "ok", 3: "ok"})
    summary = run_federation(grid, _cfg(tmp_path, rounds=2))
    assert summary["completed"] == 2 and summary["resumed_after"] == 0
    rounds = summary["rounds"]
    assert [r["sites"] for r in rounds] == [3, 3]
    assert set(rounds[0]["per_site"]) == {"site1", "site2", "site3"}
    assert rounds[0]["evaluate"]["zero_shot_auc"] == pytest.approx(0.52)
    saved = load_global(tmp_path / "server" / CHECKPOINT)
    assert saved["round"] == 2
    # weighted by examples (10, 20, 30): each round adds (1*10 + 2*20 + 3*30) / 60 to every float weight
    from appliance.federated import server

    start = server.initial_state(None, None, seed=0)
    assert torch.allclose(saved["state_dict"]["w"], start["w"] + 2 * 140 / 60, atol=1e-4)
    assert (tmp_path / "server" / "model.pt").is_file()


def test_too_few_results_retry_then_fail_clearly_without_aggregating(tmp_path):
    grid = FakeGrid({1: "ok", 2: "fail", 3: "fail"})
    with pytest.raises(FederationError, match=r"round 1: only 1 site\(s\) returned results after 2 attempt\(s\) "
                                              r"\(minimum 2\)"):
        run_federation(grid, _cfg(tmp_path))
    assert sorted(s for s in grid.sent if s[1] == "train") == sorted([(1, "train", n) for n in (1, 2, 3)] * 2)
    assert not (tmp_path / "server" / CHECKPOINT).exists()  # nothing aggregated from one site


def test_waiting_for_sites_is_bounded(tmp_path):
    with pytest.raises(FederationError, match="1 of the 2 sites needed are connected"):
        run_federation(FakeGrid({1: "ok"}), _cfg(tmp_path))


def test_a_failed_site_is_left_out_when_enough_others_answer(tmp_path):
    summary = run_federation(FakeGrid({1: "ok", 2: "ok", 3: "fail"}), _cfg(tmp_path, rounds=1))
    assert summary["rounds"][0]["sites"] == 2 and summary["rounds"][0]["failures"] == 1


def test_restarted_server_resumes_after_the_last_completed_round(tmp_path):
    first = FakeGrid({1: "ok", 2: "ok"})
    run_federation(first, _cfg(tmp_path, rounds=1, strategy="fedadam"))
    saved = load_global(tmp_path / "server" / CHECKPOINT)
    assert saved["round"] == 1 and saved["strategy"]["m_t"] is not None  # FedAdam's moments are kept
    second = FakeGrid({1: "ok", 2: "ok"})
    summary = run_federation(second, _cfg(tmp_path, rounds=3, strategy="fedadam"))
    assert summary["resumed_after"] == 1
    assert sorted({r for r, kind, _ in second.sent if kind == "train"}) == [2, 3]
    assert [r["round"] for r in summary["rounds"]] == [1, 2, 3]


def test_unreadable_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "server").mkdir()
    (tmp_path / "server" / CHECKPOINT).write_bytes(b"not a checkpoint")
    with pytest.raises(FederationError, match="unreadable"):
        run_federation(FakeGrid({1: "ok", 2: "ok"}), _cfg(tmp_path))


def test_run_config_is_checked():
    from appliance.errors import ApplianceError

    assert FedRunConfig.from_run_config({"rounds": 3, "min-results": 2, "strategy": "fedprox"}).rounds == 3
    with pytest.raises(ApplianceError, match="strategy"):
        FedRunConfig.from_run_config({"strategy": "fedsgd"})
    with pytest.raises(ApplianceError, match="min_results"):
        FedRunConfig.from_run_config({"min-nodes": 1, "min-results": 2})
