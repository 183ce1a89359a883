"""A site's side of a federated round, in-process: consortium tokenizer, local training from the
global weights with the site's own trainer, FedProx, local evaluation."""

from __future__ import annotations

import torch

from appliance.federated.local import (
    CONSORTIUM_FINDINGS,
    ConsortiumModel,
    consortium_tokenizer,
    initial_state,
    local_evaluate,
    local_train,
)
from appliance.train.data import collect_training_data

MODEL = ConsortiumModel(variant="lite", embed_dim=32, text_max_tokens=64)


def test_consortium_tokenizer_is_the_same_at_every_site(tmp_path):
    a = consortium_tokenizer(tmp_path / "a", MODEL)
    b = consortium_tokenizer(tmp_path / "b", MODEL)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    assert initial_state(MODEL, tmp_path / "a").keys() == initial_state(MODEL, tmp_path / "b").keys()
    for k, v in initial_state(MODEL, tmp_path / "a", seed=1).items():
        assert torch.equal(v, initial_state(MODEL, tmp_path / "b", seed=1)[k])


def test_consortium_findings_mask_what_the_site_does_not_label(trainable):
    own = collect_training_data(trainable)
    fixed = collect_training_data(trainable, findings=CONSORTIUM_FINDINGS + ("pneumothorax",))
    assert fixed.findings[-1] == "pneumothorax"
    assert all(it.labels[-1] == -1 for it in fixed.items)
    col = {f: i for i, f in enumerate(fixed.findings)}
    for a, b in zip(own.items, fixed.items):
        assert a.series_key == b.series_key
        assert all(a.labels[i] == b.labels[col[f]] for i, f in enumerate(own.findings))


def test_local_round_starts_from_the_global_weights_and_changes_them(trainable, tmp_path):
    start = initial_state(MODEL, tmp_path / "tok", seed=3)
    result = local_train(trainable.root, start, model=MODEL, run_id="run1", server_round=1, phase="stage1", epochs=1)
    assert result.num_examples > 0
    assert result.state.keys() == start.keys()
    moved = [k for k in start if start[k].is_floating_point() and not torch.equal(start[k], result.state[k])]
    assert moved, "local training changed nothing"
    assert (trainable.root / "runs" / "fed" / "run1" / "round-0001" / "model.pt").is_file()
    assert result.metrics["train_loss"] > 0

    evaluated = local_evaluate(trainable.root, result.state, model=MODEL)
    assert evaluated.num_examples >= 2
    assert 0.0 <= evaluated.metrics["zero_shot_auc"] <= 1.0


def test_fedprox_keeps_the_local_model_closer_to_the_global_one(trainable, tmp_path):
    start = initial_state(MODEL, tmp_path / "tok", seed=3)

    def drift(mu):
        out = local_train(trainable.root, start, model=MODEL, run_id=f"mu{mu}", server_round=1, epochs=3,
                          proximal_mu=mu).state
        return sum(float((out[k] - start[k]).float().norm() ** 2) for k in start if start[k].is_floating_point())

    assert drift(50.0) < drift(0.0)


def test_dp_round_reports_epsilon_and_refuses_past_the_budget(trainable, tmp_path):
    import pytest

    from appliance.errors import ApplianceError
    from appliance.federated.local import DpRound, local_train_dp

    model = ConsortiumModel(variant="lite", embed_dim=32, text_max_tokens=64, norm="group")
    start = initial_state(model, tmp_path / "tok", seed=0)
    dp = DpRound(target_epsilon=3.0, total_epochs=1)  # the whole run's budget, planned for one epoch
    first = local_train_dp(trainable.root, start, model=model, dp=dp, epochs=1)
    assert 0 < first.metrics["epsilon"] <= 3.0
    assert first.metrics["noise_multiplier"] > 0
    assert any(not torch.equal(start[k], first.state[k]) for k in start if start[k].is_floating_point())
    with pytest.raises(ApplianceError, match="privacy budget spent"):
        local_train_dp(trainable.root, first.state, model=model, dp=dp, epochs=1)
    with pytest.raises(ApplianceError, match="GroupNorm"):
        local_train_dp(trainable.root, start, model=MODEL, dp=dp)
