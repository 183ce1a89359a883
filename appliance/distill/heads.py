"""Task heads over frozen encoder tokens and distillation with privileged information (RECIPES.md section 2).

A teacher sees image tokens AND report-text tokens; an image-only student is trained on
(1 - lam) * CE(student, y) + lam * CE(student, softmax(teacher / tau)). compare_methods runs the student
against a hard-label baseline, a linear probe, the text teacher (privileged reference) and self-distillation
(an image-only teacher), so a gain can be attributed to the text rather than to distillation itself.
Pure torch/numpy on precomputed tokens: no workspace I/O.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score, roc_auc_score
from torch import nn

from appliance.evaluate.metrics import resample_weights, weighted_auc, weighted_average_precision

METHODS = ("linear_probe", "baseline", "teacher_text", "self_distilled", "text_distilled")
PAIRS = (("text_distilled", "baseline"), ("text_distilled", "self_distilled"))


@dataclass
class TokenSet:
    """Frozen-encoder tokens of N studies: image (N, Ni, Di), report text (N, Nt, Dt) with mask, labels (N,)."""

    image_tokens: torch.Tensor
    text_tokens: torch.Tensor
    text_mask: torch.Tensor
    y: torch.Tensor
    groups: np.ndarray | None = None

    def __post_init__(self):
        n = self.y.shape[0]
        sizes = {self.image_tokens.shape[0], self.text_tokens.shape[0], self.text_mask.shape[0]}
        if sizes != {n} or (self.groups is not None and len(self.groups) != n):
            raise ValueError(f"TokenSet fields disagree on the number of studies ({n})")

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def n_classes(self) -> int:
        return int(self.y.max()) + 1 if len(self) else 0

    def subset(self, idx) -> TokenSet:
        idx = np.asarray(idx.cpu() if isinstance(idx, torch.Tensor) else idx)
        idx_t = torch.as_tensor(np.flatnonzero(idx) if idx.dtype == bool else idx, dtype=torch.long)
        groups = None if self.groups is None else np.asarray(self.groups)[idx_t.numpy()]
        return TokenSet(self.image_tokens[idx_t], self.text_tokens[idx_t], self.text_mask[idx_t], self.y[idx_t],
                        groups)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return x.mean(dim=1)
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


class AttentionPool(nn.Module):
    """Single-head self-attention over tokens (learnable Q/K/V, dropout on the weights), masked mean pool."""

    def __init__(self, dim_in: int, dim: int, attn_dropout: float = 0.2):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(dim_in, dim) for _ in range(3))
        self.drop = nn.Dropout(attn_dropout)
        self.scale = 1.0 / math.sqrt(dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        scores = self.q(x) @ self.k(x).transpose(1, 2) * self.scale
        if mask is not None:
            # A finite fill keeps an all-padding row finite; it is dropped by the masked mean anyway.
            scores = scores.masked_fill(~mask.bool().unsqueeze(1), torch.finfo(scores.dtype).min)
        attn = self.drop(scores.softmax(dim=-1))
        return _masked_mean(attn @ self.v(x), mask)


class AttentionHead(nn.Module):
    """Image-only head: AttentionPool + Linear -> logits."""

    def __init__(self, dim_in: int, n_classes: int, dim: int = 128, attn_dropout: float = 0.2):
        super().__init__()
        self.pool = AttentionPool(dim_in, dim, attn_dropout)
        self.fc = nn.Linear(dim, n_classes)

    def forward(self, image_tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc(self.pool(image_tokens, mask))


class LinearProbe(nn.Module):
    """Masked mean of tokens -> Linear."""

    def __init__(self, dim_in: int, n_classes: int):
        super().__init__()
        self.fc = nn.Linear(dim_in, n_classes)

    def forward(self, image_tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc(_masked_mean(image_tokens, mask))


class PrivilegedTeacher(nn.Module):
    """Image and text each through their own AttentionPool and LayerNorm, concatenated, one Linear."""

    def __init__(self, image_dim: int, text_dim: int, n_classes: int, dim: int = 128, attn_dropout: float = 0.2):
        super().__init__()
        self.image_pool = AttentionPool(image_dim, dim, attn_dropout)
        self.text_pool = AttentionPool(text_dim, dim, attn_dropout)
        self.image_norm, self.text_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.fc = nn.Linear(2 * dim, n_classes)

    def forward(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        img = self.image_norm(self.image_pool(image_tokens))
        txt = self.text_norm(self.text_pool(text_tokens, text_mask))
        return self.fc(torch.cat([img, txt], dim=-1))


@dataclass
class HeadConfig:
    lr: float = 1e-4
    batch_size: int = 64
    max_epochs: int = 200
    patience: int = 20
    weight_decay: float = 0.0
    attn_dropout: float = 0.2
    dim: int = 128
    lam: float = 0.5
    tau: float = 0.25


def _logits(model: nn.Module, tokens: TokenSet, idx, uses_text: bool) -> torch.Tensor:
    if uses_text:
        return model(tokens.image_tokens[idx], tokens.text_tokens[idx], tokens.text_mask[idx])
    return model(tokens.image_tokens[idx])


@torch.no_grad()
def _eval_logits(model: nn.Module, tokens: TokenSet, uses_text: bool, batch_size: int = 512) -> torch.Tensor:
    model.eval()
    n = len(tokens)
    return torch.cat([_logits(model, tokens, slice(i, i + batch_size), uses_text) for i in range(0, n, batch_size)])


def predict_proba(model: nn.Module, tokens: TokenSet, uses_text: bool = False) -> np.ndarray:
    """(N, C) class probabilities, model in eval mode."""
    return _eval_logits(model, tokens, uses_text).softmax(dim=-1).numpy()


def teacher_targets(teacher: nn.Module, tokens: TokenSet, tau: float, uses_text: bool = False) -> torch.Tensor:
    """softmax(teacher logits / tau), teacher in eval mode (no attention dropout)."""
    return (_eval_logits(teacher, tokens, uses_text) / tau).softmax(dim=-1)


def distill_loss(logits: torch.Tensor, y: torch.Tensor, soft_targets: torch.Tensor | None, lam: float) -> torch.Tensor:
    """CE(y), or (1 - lam) * CE(logits, y) + lam * CE(logits, soft_targets)."""
    hard = F.cross_entropy(logits, y)
    if soft_targets is None:
        return hard
    soft = -(soft_targets * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()
    return (1.0 - lam) * hard + lam * soft


def _scored_classes(y: np.ndarray, n_classes: int) -> list[int]:
    """Binary: class 1; multi-class: every class present in y (one-vs-rest, macro-averaged)."""
    return [1] if n_classes == 2 else [c for c in range(n_classes) if (y == c).any()]


def auc_score(y: np.ndarray, proba: np.ndarray) -> float:
    """Binary: ROC-AUC of P(class 1); multi-class: macro one-vs-rest over classes in y. NaN when undefined."""
    y = np.asarray(y)
    if len(np.unique(y)) < 2:
        return float("nan")
    return float(np.mean([roc_auc_score(y == c, proba[:, c]) for c in _scored_classes(y, proba.shape[1])]))


def auprc_score(y: np.ndarray, proba: np.ndarray) -> float:
    """Binary: average precision of class 1; multi-class: macro over classes in y. NaN when undefined."""
    y = np.asarray(y)
    if len(np.unique(y)) < 2:
        return float("nan")
    return float(np.mean([average_precision_score(y == c, proba[:, c]) for c in _scored_classes(y, proba.shape[1])]))


def train_early_stopped(model: nn.Module, n_train: int, batch_loss: Callable[[torch.Tensor], torch.Tensor],
                        validate: Callable[[], tuple[float, dict]], *, lr: float, weight_decay: float,
                        batch_size: int, max_epochs: int, patience: int, seed: int) -> tuple[nn.Module, dict]:
    """Adam over shuffled mini-batches of row indices; early stopping; the best weights restored.

    `batch_loss(idx)` is the loss of one batch of training rows; `validate()` returns (score, info) after each
    epoch, higher is better. Training stops `patience` epochs after the last improvement. Returns the model in
    eval mode and {"best_epoch", **info of the best epoch, "epochs_run"}.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    best_score, best_state, best_epoch, best_info = -math.inf, None, 0, {}
    epoch = 0
    for epoch in range(1, max_epochs + 1):
        model.train()
        for idx in torch.randperm(n_train, generator=gen).split(batch_size):
            loss = batch_loss(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        score, info = validate()
        if score > best_score:
            best_score, best_epoch, best_info = score, epoch, info
            best_state = copy.deepcopy(model.state_dict())
        elif epoch - best_epoch >= patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return model, {"best_epoch": best_epoch, **best_info, "epochs_run": epoch}


def train_head(model: nn.Module, train: TokenSet, val: TokenSet, cfg: HeadConfig, seed: int,
               soft_targets: torch.Tensor | None = None, uses_text: bool = False) -> tuple[nn.Module, dict]:
    """Adam on hard (or distillation) loss; early stop on validation AUC; best weights restored.

    With a single class in `val`, the validation loss selects the checkpoint instead (info["selected_by"]).
    """
    if soft_targets is not None:
        soft_targets = torch.as_tensor(soft_targets, dtype=torch.float32)
        if soft_targets.ndim != 2 or soft_targets.shape[0] != len(train):
            raise ValueError(f"soft_targets shape {tuple(soft_targets.shape)} does not match the training set")
    by_auc = len(torch.unique(val.y)) > 1

    def batch_loss(idx):
        return distill_loss(_logits(model, train, idx, uses_text), train.y[idx],
                            None if soft_targets is None else soft_targets[idx], cfg.lam)

    def validate():
        val_logits = _eval_logits(model, val, uses_text)
        val_loss = float(F.cross_entropy(val_logits, val.y))
        val_auc = auc_score(val.y.numpy(), val_logits.softmax(dim=-1).numpy()) if by_auc else None
        return (val_auc if by_auc else -val_loss), {"best_val_auc": val_auc, "best_val_loss": val_loss}

    model, info = train_early_stopped(model, len(train), batch_loss, validate, lr=cfg.lr,
                                      weight_decay=cfg.weight_decay, batch_size=cfg.batch_size,
                                      max_epochs=cfg.max_epochs, patience=cfg.patience, seed=seed)
    return model, {**info, "selected_by": "val_auc" if by_auc else "val_loss"}


def bootstrap_metrics(y: np.ndarray, proba: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    """Per-resample AUC and AUPRC (as auc_score / auprc_score) for each row of study multiplicities (R, n)."""
    classes = _scored_classes(y, proba.shape[1])
    aucs = np.stack([weighted_auc((y == c).astype(int), proba[:, c], weights) for c in classes])
    aps = np.stack([weighted_average_precision((y == c).astype(int), proba[:, c], weights) for c in classes])
    return {"auc": aucs.mean(axis=0), "auprc": aps.mean(axis=0)}  # NaN where a resample lacks a class


def _ci(values: np.ndarray, alpha: float = 0.05) -> list[float | None]:
    used = values[np.isfinite(values)]
    if used.size == 0:
        return [None, None]
    return [float(v) for v in np.percentile(used, [100 * alpha / 2, 100 * (1 - alpha / 2)])]


def _mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def _no_nan(obj):
    """Undefined metrics (a test split missing a class) as None: strict JSON has no NaN."""
    if isinstance(obj, dict):
        return {k: _no_nan(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_no_nan(v) for v in obj]
    return None if isinstance(obj, float) and not math.isfinite(obj) else obj


def _fresh(kind: str, train: TokenSet, n_classes: int, cfg: HeadConfig, seed: int) -> nn.Module:
    torch.manual_seed(seed)  # the same seed gives baseline and students the same initial weights (paired runs)
    di = train.image_tokens.shape[-1]
    if kind == "probe":
        return LinearProbe(di, n_classes)
    if kind == "teacher":
        return PrivilegedTeacher(di, train.text_tokens.shape[-1], n_classes, cfg.dim, cfg.attn_dropout)
    return AttentionHead(di, n_classes, cfg.dim, cfg.attn_dropout)


def _run_seed(train: TokenSet, val: TokenSet, test: TokenSet, n_classes: int, cfg: HeadConfig,
              seed: int) -> dict[str, tuple[np.ndarray, dict]]:
    def fit(kind, uses_text=False, soft=None):
        return train_head(_fresh(kind, train, n_classes, cfg, seed), train, val, cfg, seed, soft, uses_text)

    out = {}
    probe, info = fit("probe")
    out["linear_probe"] = (predict_proba(probe, test), info)
    base, info = fit("head")
    out["baseline"] = (predict_proba(base, test), info)
    teacher, t_info = fit("teacher", uses_text=True)
    out["teacher_text"] = (predict_proba(teacher, test, uses_text=True), t_info)
    # The image-only self-distillation teacher is trained exactly like the baseline, so it is the baseline.
    student, info = fit("head", soft=teacher_targets(base, train, cfg.tau))
    out["self_distilled"] = (predict_proba(student, test), {**info, "teacher": out["baseline"][1]})
    student, info = fit("head", soft=teacher_targets(teacher, train, cfg.tau, uses_text=True))
    out["text_distilled"] = (predict_proba(student, test), {**info, "teacher": t_info})
    return out


def compare_methods(train: TokenSet, val: TokenSet, test: TokenSet, cfg: HeadConfig | None = None,
                    seeds=(0, 1, 2), n_bootstrap: int = 1000, bootstrap_seed: int = 0) -> dict:
    """Train every method for each seed and score it on `test`; JSON-able results (None where undefined).

    Per method: per-seed test AUC/AUPRC, mean and sample std over seeds, and a 95% percentile bootstrap CI of
    the seed-averaged test probabilities (studies resampled, or whole groups when test.groups is given).
    Paired text_distilled - baseline / - self_distilled: per-seed deltas, their mean, and a bootstrap CI of
    the delta of the seed-averaged predictions on the same resamples. teacher_text uses the report at test time:
    it is the privileged upper reference, not a deployable model.
    """
    cfg = cfg or HeadConfig()
    seeds = [int(s) for s in seeds]
    n_classes = max(train.n_classes, val.n_classes, test.n_classes, 2)
    runs = [_run_seed(train, val, test, n_classes, cfg, s) for s in seeds]
    y_test = test.y.numpy()
    weights, unit, n_units = resample_weights(len(test), n_bootstrap, np.random.default_rng(bootstrap_seed),
                                              test.groups)
    methods, boot, per_seed = {}, {}, {}
    for name in METHODS:
        probas = [run[name][0] for run in runs]
        per_seed[name] = {"auc": [auc_score(y_test, p) for p in probas],
                          "auprc": [auprc_score(y_test, p) for p in probas]}
        ens = np.mean(probas, axis=0)
        boot[name] = bootstrap_metrics(y_test, ens, weights)
        auc_mean, auc_std = _mean_std(per_seed[name]["auc"])
        ap_mean, ap_std = _mean_std(per_seed[name]["auprc"])
        methods[name] = {
            "uses_text_at_test": name == "teacher_text",
            "per_seed": [{"seed": s, "auc": a, "auprc": p, **run[name][1]}
                         for s, a, p, run in zip(seeds, per_seed[name]["auc"], per_seed[name]["auprc"], runs)],
            "auc_mean": auc_mean, "auc_std": auc_std, "auprc_mean": ap_mean, "auprc_std": ap_std,
            "seed_averaged": {"auc": auc_score(y_test, ens), "auc_ci95": _ci(boot[name]["auc"]),
                              "auprc": auprc_score(y_test, ens), "auprc_ci95": _ci(boot[name]["auprc"])},
        }
    paired = {}
    for a, b in PAIRS:
        entry = {}
        for metric in ("auc", "auprc"):
            deltas = [float(x - y) for x, y in zip(per_seed[a][metric], per_seed[b][metric])]
            entry[f"{metric}_delta_per_seed"] = deltas
            entry[f"{metric}_delta_mean"] = float(np.mean(deltas))
            entry[f"{metric}_delta_seed_averaged"] = (methods[a]["seed_averaged"][metric]
                                                      - methods[b]["seed_averaged"][metric])
            entry[f"{metric}_delta_ci95"] = _ci(boot[a][metric] - boot[b][metric])
        paired[f"{a}-{b}"] = entry

    def counts(ts):
        return np.bincount(ts.y.numpy(), minlength=n_classes).tolist()

    return _no_nan({"n_train": len(train), "n_val": len(val), "n_test": len(test), "n_classes": n_classes,
            "class_counts": {"train": counts(train), "val": counts(val), "test": counts(test)},
            "cfg": asdict(cfg), "seeds": seeds, "n_bootstrap": n_bootstrap, "bootstrap_seed": bootstrap_seed,
            "bootstrap_unit": unit, "bootstrap_n_units": n_units, "methods": methods, "paired": paired})
