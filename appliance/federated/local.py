"""A site's side of a federated round: local training from the global weights, local evaluation.

What every site must share for their weights to be averaged is fixed by the consortium, not by the
site: the findings (CT-RATE's 18, in order; a finding a site does not label is -1, i.e. masked, at
that site), the tokenizer (built deterministically from the vocabulary's own wording, so every site
builds the same one without any text leaving it; with `train.text_model_dir` every site uses the
same local BERT folder instead), the model variant, the embedding size and the normalisation.
The site's own hardware plan still sets micro-batch, accumulation, precision and workers.

Federated: every weight of the model (vision encoder, text encoder, both projections, the shared
classifier), so that the global model is one complete GreenRFM. Local: the data, the split into
train/val/test (by patient, with the site's seed), BatchNorm statistics are averaged like weights.
"""

from __future__ import annotations

import shutil
import string
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from appliance.errors import ApplianceError
from appliance.labels.vocabularies import CT_RATE_18, load_vocabulary
from appliance.workspace import Workspace, open_workspace

CONSORTIUM_FINDINGS: tuple[str, ...] = tuple(CT_RATE_18)
FED_DIR = Path("runs") / "fed"


@dataclass(frozen=True)
class ConsortiumModel:
    """The model every site builds, fixed by the server's run config."""

    variant: str = "lite"
    embed_dim: int = 768
    text_max_tokens: int = 128
    norm: str = "batch"
    findings: tuple[str, ...] = CONSORTIUM_FINDINGS
    # a BERT folder (weights + tokenizer) at the same path at every site, e.g. CXR-BERT; None: the
    # tiny in-process BERT with the consortium tokenizer
    text_model_dir: str | None = None


@dataclass
class LocalRoundResult:
    state: dict[str, torch.Tensor]
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # local evaluation: labels and scores


def _tokenizer_corpus(findings: tuple[str, ...]) -> list[str]:
    from appliance.evaluate.zero_shot import PROMPT_PAIRS

    vocab = load_vocabulary("ct_rate_18")
    corpus = [string.ascii_lowercase + " " + " ".join(string.digits + string.punctuation)]
    for f in vocab.findings:
        corpus += [f.name, f.definition, *f.synonyms, *f.negative_phrases, *f.exclusions]
    corpus += [p.format(p=f) for f in findings for pair in PROMPT_PAIRS for p in pair]
    return corpus


def consortium_tokenizer(folder: Path, model: ConsortiumModel) -> Path:
    """The consortium's tokenizer in `folder` (built there once; the same bytes at every site)."""
    from appliance.models import build_site_tokenizer

    if model.text_model_dir:
        return Path(model.text_model_dir)
    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file():
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        build_site_tokenizer(_tokenizer_corpus(model.findings), max_length=model.text_max_tokens).save(tmp)
        shutil.rmtree(folder, ignore_errors=True)  # a half-written one from a killed process
        tmp.replace(folder)
    return folder


def model_spec(model: ConsortiumModel, vocab_size: int):
    from appliance.models import ModelSpec

    return ModelSpec(variant=model.variant, n_classes=len(model.findings), embed_dim=model.embed_dim,
                     text_model_dir=model.text_model_dir, text_vocab_size=vocab_size, norm=model.norm)


def initial_state(model: ConsortiumModel, tokenizer_dir: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """The round-0 global weights (the server's; every site then starts from these)."""
    from appliance.models import build_greenrfm, load_tokenizer

    tokenizer = load_tokenizer(consortium_tokenizer(tokenizer_dir, model), model.text_max_tokens)
    torch.manual_seed(seed)
    return build_greenrfm(model_spec(model, tokenizer.vocab_size)).state_dict()


def _site(workspace: Path | str) -> Workspace:
    try:
        return open_workspace(Path(workspace))
    except ApplianceError:
        raise
    except Exception as exc:  # noqa: BLE001 - one line for the server log, no path
        raise ApplianceError(f"site workspace cannot be opened ({type(exc).__name__})") from None


def local_train(workspace: Path | str, state: dict[str, torch.Tensor], *, model: ConsortiumModel, run_id: str,
                server_round: int, phase: str = "stage1", epochs: int = 1, proximal_mu: float = 0.0,
                progress=None) -> LocalRoundResult:
    """One local round: the appliance's own trainer from the global weights, on this site's data."""
    from appliance.train.trainer import FederatedRound, train_workspace

    ws = _site(workspace)
    tokenizer_dir = consortium_tokenizer(ws.root / FED_DIR / "tokenizer", model)
    run_dir = ws.root / FED_DIR / run_id / f"round-{server_round:04d}"
    result = train_workspace(ws, progress=progress, federated=FederatedRound(
        findings=list(model.findings), tokenizer_dir=tokenizer_dir, variant=model.variant, phase=phase,
        epochs=epochs, initial_state=state, run_dir=run_dir, proximal_mu=proximal_mu, norm=model.norm,
        embed_dim=model.embed_dim, text_max_tokens=model.text_max_tokens, text_model_dir=model.text_model_dir))
    from appliance.train.checkpoint import load_checkpoint

    trained = load_checkpoint(result.model_path)["state_dict"]
    phase_summary = result.phases[-1]
    metrics = {f"train_{k}": float(v) for k, v in (phase_summary.get("last_losses") or {}).items()}
    metrics |= {"train_seconds": float(result.seconds), "samples_per_s": float(phase_summary["samples_per_s"])}
    return LocalRoundResult(trained, int(result.n_items["train"]), metrics)


@dataclass(frozen=True)
class DpRound:
    """Client-side DP-SGD for a round (stage 1 only): the budget is for the whole federated run."""

    target_epsilon: float
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    total_epochs: int = 1  # rounds x local epochs: the noise is planned so that all of them fit the budget


def local_train_dp(workspace: Path | str, state: dict[str, torch.Tensor], *, model: ConsortiumModel, dp: DpRound,
                   epochs: int = 1, phase: str = "stage1") -> LocalRoundResult:
    """One local round with DP-SGD (Opacus): per-sample clipping and noise, epsilon accounted in the
    site's ledger (runs/fed/privacy.json) across rounds; refused once the budget is spent."""
    from appliance.federated.privacy import (
        DpSettings,
        PrivacyLedger,
        check_dp_phase,
        dp_train_stage1,
        ledger_path,
    )
    from appliance.models import build_greenrfm, load_tokenizer
    from appliance.train.data import VolumeReportDataset, collect_training_data, split_by_patient

    check_dp_phase(phase)
    if model.norm != "group":
        raise ApplianceError("DP-SGD needs the GroupNorm model: set norm=group in the run config")
    ws = _site(workspace)
    cfg = ws.config().train
    tokenizer = load_tokenizer(consortium_tokenizer(ws.root / FED_DIR / "tokenizer", model), model.text_max_tokens)
    net = build_greenrfm(model_spec(model, tokenizer.vocab_size))
    net.load_state_dict(state)
    data = collect_training_data(ws, impression_first_order=cfg.impression_first, findings=model.findings)
    train = split_by_patient(data.items, cfg.seed, cfg.val_fraction, cfg.test_fraction)["train"]
    dataset = VolumeReportDataset(train, list(model.findings), tokenizer, cfg.crop, train=True, seed=cfg.seed)
    settings = DpSettings(target_epsilon=dp.target_epsilon, total_epochs=dp.total_epochs, delta=dp.delta,
                          max_grad_norm=dp.max_grad_norm)
    ledger = PrivacyLedger.load(ledger_path(ws.root), settings)
    plan = ws.config().train.plan
    result = dp_train_stage1(net, dataset, settings=settings, ledger=ledger, epochs=epochs,
                             batch_size=max(2, (plan.micro_batch or 4) * (plan.grad_accumulation or 1)),
                             lr_vision=cfg.stage1.vision_lr, lr_text=cfg.stage1.text_lr,
                             weight_decay=cfg.stage1.weight_decay, uncertain=cfg.uncertain)
    # only privacy figures go back: the losses were computed without noise
    metrics = {"epsilon": float(result.epsilon), "epsilon_round": float(result.epsilon_round),
               "delta": float(result.delta), "noise_multiplier": float(result.noise_multiplier),
               "dp_steps": float(result.steps), "budget_exhausted": float(result.budget_exhausted)}
    return LocalRoundResult(result.state_dict, len(dataset), metrics)


@torch.no_grad()
def local_evaluate(workspace: Path | str, state: dict[str, torch.Tensor], *, model: ConsortiumModel,
                   device: str = "cpu") -> LocalRoundResult:
    """The global model on this site's held-out patients: zero-shot and classifier AUC."""
    from appliance.evaluate.metrics import binary_metrics
    from appliance.evaluate.stage import LoadedModel, encode_items, encode_texts
    from appliance.evaluate.zero_shot import prompts_for, zero_shot_probabilities
    from appliance.models import build_greenrfm, load_tokenizer
    from appliance.train.data import collect_training_data, split_by_patient
    from appliance.train.losses import masked_bce

    ws = _site(workspace)
    cfg = ws.config().train
    tokenizer = load_tokenizer(consortium_tokenizer(ws.root / FED_DIR / "tokenizer", model), model.text_max_tokens)
    net = build_greenrfm(model_spec(model, tokenizer.vocab_size))
    net.load_state_dict(state)
    net.to(device).eval()
    data = collect_training_data(ws, impression_first_order=cfg.impression_first, findings=model.findings)
    test = split_by_patient(data.items, cfg.seed, cfg.val_fraction, cfg.test_fraction)["test"]
    if len(test) < 2:
        raise ApplianceError(f"only {len(test)} held-out series at this site: too few to evaluate")
    loaded = LoadedModel(net, tokenizer, list(model.findings), tuple(cfg.crop), {}, cfg.impression_first)
    enc = encode_items(loaded, test, device)
    findings = list(model.findings)
    pos, neg = prompts_for(findings, ws.config().evaluate.prompt_pair)
    scores = zero_shot_probabilities(enc["image"], encode_texts(loaded, pos, device), encode_texts(loaded, neg, device))
    zero_shot = binary_metrics(enc["labels"], scores, findings)
    logits = net.classifier(torch.from_numpy(enc["image"]).to(device)).cpu()
    classifier = binary_metrics(enc["labels"], torch.sigmoid(logits).numpy(), findings)["mean"]
    bce = masked_bce(logits, torch.from_numpy(enc["labels"]).float(), cfg.uncertain)
    metrics = {"zero_shot_auc": _num(zero_shot["mean"].get("auc")), "classifier_auc": _num(classifier.get("auc")),
               "classifier_bce": float(bce), "findings_scored": float(zero_shot["n_findings_scored"])}
    return LocalRoundResult({}, len(test), metrics, {"labels": enc["labels"], "zero_shot": scores})


def _num(value) -> float:
    return float("nan") if value is None else float(value)
