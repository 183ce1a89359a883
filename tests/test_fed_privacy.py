"""Client-side differential privacy (appliance/federated/privacy.py): the GroupNorm model, the
budget plan and ledger, budget enforcement, per-sample clipping, stage 2 refused.

Most rounds run on a synthetic 8-sample dataset of 16^3 volumes with the vision encoder's layers 3
and 4 frozen (most of the per-sample-gradient time); one round runs on a real labelled workspace at
the TINY_TRAIN crop with every weight trained.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from appliance.errors import ApplianceError, ConfigError
from appliance.federated.privacy import (
    DpSettings,
    PrivacyLedger,
    check_dp_phase,
    dp_train_stage1,
    epsilon_of,
    ledger_path,
    noise_for_budget,
    per_sample_masked_bce,
    sample_rate_for,
)
from appliance.models import ModelSpec, build_greenrfm
from appliance.train.losses import masked_bce

torch.set_num_threads(max(1, min(4, torch.get_num_threads())))

N_CLASSES, VOCAB, TOKENS = 5, 120, 16


class TinySet(Dataset):
    """Items shaped like VolumeReportDataset's: 8 samples, 16^3 volumes, 16 tokens, 1/0/-1 labels."""

    def __init__(self, n: int = 8, side: int = 16):
        g = torch.Generator().manual_seed(11)
        self.volumes = torch.randn(n, 1, side, side, side, generator=g)
        self.ids = torch.randint(5, VOCAB, (n, TOKENS), generator=g)
        self.ids[:, 0] = 2
        self.mask = torch.ones(n, TOKENS, dtype=torch.long)
        self.mask[::2, 10:] = 0
        self.labels = torch.randint(-1, 2, (n, N_CLASSES), generator=g).float()

    def __len__(self):
        return len(self.volumes)

    def __getitem__(self, i):
        return {"index": i, "volume": self.volumes[i], "input_ids": self.ids[i], "attention_mask": self.mask[i],
                "labels": self.labels[i]}


SPEC = ModelSpec(variant="lite", n_classes=N_CLASSES, embed_dim=32, text_vocab_size=VOCAB, norm="group")


@pytest.fixture(scope="module")
def built() -> nn.Module:
    """One GroupNorm model per module (building and fixing one takes seconds); tests take copies."""
    torch.manual_seed(0)
    return build_greenrfm(SPEC)


def private_copy(built: nn.Module, train_vision: str = "none") -> nn.Module:
    """A copy of the built model. train_vision "none": the whole vision encoder frozen (the rounds
    that test accounting, budget and clipping then skip its backward pass); "shallow": the stem and
    layers 1-2 trained, layers 3-4 frozen; "all": every weight."""
    model = copy.deepcopy(built)
    frozen = {"none": model.vision, "shallow": model.vision.layers[2:], "all": nn.Module()}[train_vision]
    for p in frozen.parameters():
        p.requires_grad_(False)
    return model


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


ROUND = {"batch_size": 2, "lr_vision": 1e-3, "lr_text": 1e-3, "weight_decay": 0.0}


# ---------------------------------------------------------------- the GroupNorm model


def test_group_norm_model_is_private_compatible(built):
    from opacus.validators import ModuleValidator

    model = private_copy(built, "all")
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    groups = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert len(groups) == 20 and {(g.num_groups, g.num_channels) for g in groups} >= {(32, 64), (32, 512)}
    assert ModuleValidator.validate(model, strict=True) == []
    assert not any(isinstance(m, nn.ReLU) and m.inplace for m in model.modules())
    # the same weights by name as the BatchNorm model, less the BatchNorm statistics
    plain = build_greenrfm(ModelSpec(variant="lite", n_classes=N_CLASSES, embed_dim=32, text_vocab_size=VOCAB))
    assert any(isinstance(m, nn.BatchNorm3d) for m in plain.modules())
    assert set(model.state_dict()) == {k for k in plain.state_dict() if "running_" not in k and "num_batches" not in k}
    data = TinySet()
    batch = {k: torch.stack([data[i][k] for i in range(3)]) for k in ("volume", "input_ids", "attention_mask")}
    with torch.no_grad():
        out = model.eval()(batch["volume"], batch["input_ids"], batch["attention_mask"])
    assert out["image_logits"].shape == out["text_logits"].shape == (3, N_CLASSES)
    assert torch.isfinite(out["image_logits"]).all() and torch.isfinite(out["text_logits"]).all()


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_per_sample_gradients_of_the_group_model_are_exact(built):
    """Opacus' hooks on the fixed model (out-of-place residuals, per-sample BERT position ids) give
    every trainable tensor one gradient per sample, equal to that sample's own gradient."""
    from opacus import GradSampleModule

    model = private_copy(built, "shallow").train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    data = TinySet()
    batch = {k: torch.stack([data[i][k] for i in range(2)]) for k in ("volume", "input_ids", "attention_mask")}

    def loss(net, sl):
        out = net(batch["volume"][sl], batch["input_ids"][sl], batch["attention_mask"][sl])
        return (out["image_logits"] ** 2).sum() + (out["text_logits"] ** 2).sum()

    gsm = GradSampleModule(model, loss_reduction="sum")
    loss(gsm, slice(0, 2)).backward()
    per_sample = {n: p.grad_sample.clone() for n, p in model.named_parameters() if p.requires_grad}
    gsm._close()
    assert {n: g.shape[0] for n, g in per_sample.items()} == {n: 2 for n in per_sample}
    assert "text.embeddings.position_embeddings.weight" in per_sample
    for i in range(2):
        model.zero_grad()
        loss(model, slice(i, i + 1)).backward()
        for n, p in model.named_parameters():
            if p.requires_grad:
                assert torch.allclose(per_sample[n][i], p.grad, atol=1e-5, rtol=1e-3), n


def test_default_spec_is_unchanged_and_old_specs_load():
    spec = ModelSpec(variant="lite", n_classes=3, embed_dim=16, text_vocab_size=50)
    saved = spec.to_dict()
    assert "norm" not in saved and ModelSpec(**saved) == spec and spec.norm == "batch"
    group = ModelSpec(**(saved | {"norm": "group"}))
    assert group.to_dict()["norm"] == "group" and ModelSpec(**group.to_dict()) == group
    with pytest.raises(ConfigError, match="norm"):
        build_greenrfm(ModelSpec(variant="lite", n_classes=3, embed_dim=16, text_vocab_size=50, norm="layer"))


# ---------------------------------------------------------------- budget, ledger, enforcement


def test_per_sample_bce_is_masked_bce_of_each_row():
    g = torch.Generator().manual_seed(3)
    logits, labels = torch.randn(4, 6, generator=g), torch.randint(-1, 2, (4, 6), generator=g).float()
    labels[2] = -1  # nothing known: 0
    for unc in ("mask", "zero"):
        rows = torch.stack([masked_bce(logits[i:i + 1], labels[i:i + 1], unc) for i in range(4)])
        assert torch.allclose(per_sample_masked_bce(logits, labels, unc), rows, atol=1e-6)
    assert per_sample_masked_bce(logits, labels)[2] == 0


def test_noise_for_budget_lands_just_under_the_target():
    settings = DpSettings(target_epsilon=2.0, total_epochs=10)
    q = sample_rate_for(1000, 10)
    assert q == 0.01
    sigma = noise_for_budget(settings, q, 1000)
    eps = epsilon_of([(sigma, q, 1000)], settings.delta)
    assert 0.97 * 2.0 <= eps <= 2.0
    assert noise_for_budget(DpSettings(target_epsilon=8.0, total_epochs=10), q, 1000) < sigma
    assert sample_rate_for(7, 2) == 1 / 4  # 1 / ceil(N / batch), as Opacus' loader draws


def test_rounds_add_up_to_the_planned_budget_then_training_is_refused(built, tmp_path):
    settings = DpSettings(target_epsilon=4.0, total_epochs=2, max_grad_norm=1.0)
    path = ledger_path(tmp_path)
    assert path == tmp_path / "runs" / "fed" / "privacy.json"
    ledger = PrivacyLedger.load(path, settings)
    model, data = private_copy(built), TinySet()

    first = dp_train_stage1(model, data, settings=settings, ledger=ledger, epochs=1, seed=1, **ROUND)
    assert 0 < first.epsilon < settings.target_epsilon and math.isfinite(first.epsilon)
    assert first.steps == 4 and first.sample_rate == 0.25 and first.noise_multiplier > 0
    assert not first.budget_exhausted and math.isfinite(first.losses["loss"])
    on_disk = json.loads(path.read_text())
    assert on_disk["history"] == [[first.noise_multiplier, 0.25, 4]] and on_disk["epsilon"] == first.epsilon

    # a new process: the ledger from disk; physical batches of 1 (BatchMemoryManager), same accounting
    reloaded = PrivacyLedger.load(path, settings)
    assert reloaded.history == ledger.history and reloaded.epsilon == ledger.epsilon == first.epsilon
    assert reloaded.plan == ledger.plan and reloaded.local_epochs == 1
    second = dp_train_stage1(model, data, settings=settings, ledger=reloaded, epochs=1, seed=2,
                             max_physical_batch_size=1, **ROUND)
    assert second.steps == 4 and second.noise_multiplier == first.noise_multiplier
    assert second.epsilon > first.epsilon and second.epsilon_round == pytest.approx(second.epsilon - first.epsilon)
    # planned for 2 epochs: after 2 epochs the budget is spent (to within ~1 %, never above)
    assert 0.9 * settings.target_epsilon <= second.epsilon <= settings.target_epsilon
    assert second.budget_exhausted and not second.stopped_early
    assert PrivacyLedger.load(path).history == [(first.noise_multiplier, 0.25, 8)]

    before, ledger_before = weights(model), path.read_text()
    with pytest.raises(ApplianceError, match="privacy budget spent: epsilon .* of 4; training refused"):
        dp_train_stage1(model, data, settings=settings, ledger=PrivacyLedger.load(path, settings), epochs=1,
                        **ROUND)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert path.read_text() == ledger_before


def test_a_round_stops_where_the_budget_ends(built, tmp_path):
    settings = DpSettings(target_epsilon=4.0, total_epochs=2)  # as above: the plan is not computed again
    ledger = PrivacyLedger.load(tmp_path / "privacy.json", settings)
    result = dp_train_stage1(private_copy(built), TinySet(), settings=settings, ledger=ledger, epochs=3, seed=0,
                             **ROUND)
    assert result.stopped_early and result.budget_exhausted
    assert result.steps == 8  # the two planned epochs, not three
    assert result.epsilon <= settings.target_epsilon
    assert PrivacyLedger.load(tmp_path / "privacy.json").rounds[-1]["stopped_early"] is True


def test_the_plan_is_remade_when_the_sample_rate_changes(tmp_path):
    """The site's data grew after a round: the rest of the budget is planned over the remaining epochs."""
    from appliance.federated.privacy import _planned_noise

    settings = DpSettings(target_epsilon=2.0, total_epochs=3)
    ledger = PrivacyLedger.new(tmp_path / "privacy.json", settings)
    first = _planned_noise(settings, ledger, sample_rate_for(400, 20), 20)  # q = 0.05
    assert ledger.plan["total_steps"] == 60 and _planned_noise(settings, ledger, 0.05, 20) == first
    ledger.history, ledger.local_epochs = [(first, 0.05, 20)], 1  # one epoch done
    later = _planned_noise(settings, ledger, sample_rate_for(800, 20), 40)  # q = 0.025, 2 epochs left
    assert ledger.plan["sample_rate"] == 0.025 and ledger.plan["total_steps"] == 20 + 80
    eps = epsilon_of([(first, 0.05, 20), (later, 0.025, 80)], settings.delta)
    assert 0.97 * 2.0 <= eps <= 2.0


def test_an_empty_poisson_draw_is_a_noise_only_step(built, tmp_path):
    settings = DpSettings(target_epsilon=1e3, total_epochs=1, noise_multiplier=1.0)
    model = private_copy(built)
    ledger = PrivacyLedger.load(tmp_path / "privacy.json", settings)
    before = weights(model)
    batches = []
    result = dp_train_stage1(model, TinySet(), settings=settings, ledger=ledger, epochs=1, seed=5, batch_size=1,
                             lr_vision=1e-3, lr_text=1e-3, weight_decay=0.0, on_step=lambda s: batches.append(s))
    sizes = [s["batch"] for s in batches]
    assert result.steps == 8 == len(sizes) and 0 in sizes and sum(sizes) == result.samples
    assert ledger.history == [(1.0, 1 / 8, 8)]
    assert not torch.equal(model.text_proj.weight, before["text_proj.weight"])


def test_a_budget_cannot_change_half_way(tmp_path):
    settings = DpSettings(target_epsilon=3.0, total_epochs=1)
    ledger = PrivacyLedger.load(tmp_path / "privacy.json", settings)
    ledger.save()
    with pytest.raises(ConfigError, match="budget"):
        PrivacyLedger.load(tmp_path / "privacy.json", DpSettings(target_epsilon=30.0, total_epochs=1))
    with ledger.locked(), pytest.raises(ApplianceError, match="another process"):  # a round in progress
        dp_train_stage1(nn.Module(), TinySet(), settings=settings, ledger=PrivacyLedger.load(ledger.path), epochs=1,
                        **ROUND)
    (tmp_path / "privacy.json").write_text("{not json")
    with pytest.raises(ApplianceError, match="damaged"):
        PrivacyLedger.load(tmp_path / "privacy.json")


# ---------------------------------------------------------------- clipping really happens


def test_per_sample_gradients_are_clipped(built, tmp_path):
    """No noise, a tiny clipping norm, plain SGD at lr 1: each step moves the weights by at most
    max_grad_norm x (samples drawn / expected batch); without clipping they would move ~1e4 x more."""
    clip = 1e-5
    settings = DpSettings(target_epsilon=math.inf, total_epochs=1, noise_multiplier=0.0, max_grad_norm=clip)
    model, data = private_copy(built, "shallow"), TinySet()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    start = weights(model)

    # the unclipped gradient of the same objective over the whole dataset, for scale
    batch = {k: torch.stack([data[i][k] for i in range(len(data))]) for k in ("volume", "input_ids", "attention_mask",
                                                                              "labels")}
    out = model.train()(batch["volume"], batch["input_ids"], batch["attention_mask"])
    loss = (per_sample_masked_bce(out["image_logits"], batch["labels"])
            + per_sample_masked_bce(out["text_logits"], batch["labels"])).mean()
    loss.backward()
    full_norm = torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters() if p.grad is not None)).item()
    model.zero_grad(set_to_none=True)

    ledger = PrivacyLedger.load(tmp_path / "privacy.json", settings)
    result = dp_train_stage1(model, data, settings=settings, ledger=ledger, epochs=1, seed=0, optimizer="sgd",
                             batch_size=2, lr_vision=1.0, lr_text=1.0, weight_decay=0.0)
    assert result.epsilon == math.inf and result.steps == 4
    moved = torch.sqrt(sum(((model.state_dict()[n] - start[n]) ** 2).sum() for n in trainable)).item()
    expected_batch = int(len(data) * result.sample_rate)
    bound = clip * result.samples / expected_batch
    assert 0 < moved <= bound * 1.001 + 1e-9
    assert full_norm > 1e3 * bound  # so the bound above is not met by accident


def test_no_noise_means_no_privacy(built, tmp_path):
    settings = DpSettings(target_epsilon=10.0, total_epochs=1, noise_multiplier=0.0)
    model = private_copy(built)
    before = weights(model)
    with pytest.raises(ApplianceError, match="privacy budget"):
        dp_train_stage1(model, TinySet(), settings=settings, ledger=PrivacyLedger.load(tmp_path / "p.json", settings),
                        epochs=1, **ROUND)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ---------------------------------------------------------------- what DP refuses


def test_stage2_and_joint_are_refused_with_dp():
    check_dp_phase("stage1")
    for phase in ("stage2", "joint"):
        with pytest.raises(ConfigError, match="only stage1 is trained locally.*InfoNCE"):
            check_dp_phase(phase)
    with pytest.raises(ConfigError):
        check_dp_phase("stage3")


def test_a_batchnorm_model_is_refused(built, tmp_path):
    settings = DpSettings(target_epsilon=3.0, total_epochs=1)
    plain = build_greenrfm(ModelSpec(variant="lite", n_classes=N_CLASSES, embed_dim=32, text_vocab_size=VOCAB))
    with pytest.raises(ConfigError, match="norm='group'"):
        dp_train_stage1(plain, TinySet(), settings=settings, ledger=PrivacyLedger.load(tmp_path / "p.json", settings),
                        epochs=1, **ROUND)
    checkpointed = private_copy(built)
    checkpointed.vision.activation_checkpointing = True
    with pytest.raises(ConfigError, match="activation checkpointing"):
        dp_train_stage1(checkpointed, TinySet(), settings=settings,
                        ledger=PrivacyLedger.load(tmp_path / "p.json", settings), epochs=1, **ROUND)
    with pytest.raises(ConfigError):
        DpSettings(target_epsilon=0, total_epochs=1)
    with pytest.raises(ConfigError):
        DpSettings(target_epsilon=1, total_epochs=1, accountant="moments")


# ---------------------------------------------------------------- a real site


def test_a_dp_round_on_a_labelled_site(trainable):
    """The TINY_TRAIN crop on the site's cached volumes and reports, every weight trained: the
    weights come back as a plain state dict the federated client can send."""
    from appliance.models import build_site_tokenizer
    from appliance.train.data import VolumeReportDataset, collect_training_data

    data = collect_training_data(trainable)
    tokenizer = build_site_tokenizer([it.text for it in data.items], max_length=64)
    dataset = VolumeReportDataset(data.items, data.findings, tokenizer, (48, 48, 32), train=True, seed=0)
    spec = ModelSpec(variant="lite", n_classes=len(data.findings), embed_dim=32, text_vocab_size=tokenizer.vocab_size,
                     norm="group")
    torch.manual_seed(0)
    model = build_greenrfm(spec)
    start = weights(model)
    settings = DpSettings(target_epsilon=50.0, total_epochs=4, noise_multiplier=1.0, max_grad_norm=1.0)
    ledger = PrivacyLedger.load(ledger_path(trainable.root), settings)
    steps = []
    result = dp_train_stage1(model, dataset, settings=settings, ledger=ledger, epochs=1, batch_size=3,
                             lr_vision=1e-3, lr_text=1e-3, weight_decay=0.01, on_step=steps.append)
    assert result.steps == 2 == len(steps) and 0 < result.epsilon < 50 and math.isfinite(result.epsilon)
    assert steps[-1]["epsilon"] == result.epsilon and steps[0]["epsilon"] < steps[1]["epsilon"]
    assert all(math.isfinite(v) for v in result.losses.values())
    assert set(result.state_dict) == set(start) and not any(k.startswith("_module") for k in result.state_dict)
    fresh = build_greenrfm(spec)
    fresh.load_state_dict(result.state_dict, strict=True)
    assert any(not torch.equal(result.state_dict[k], start[k]) for k in start)
    # the model is a plain module again: no Opacus hooks or per-sample attributes left
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    saved = json.loads((trainable.root / "runs" / "fed" / "privacy.json").read_text())
    assert saved["epsilon"] == result.epsilon and saved["steps"] == 2 and saved["delta"] == 1e-5
