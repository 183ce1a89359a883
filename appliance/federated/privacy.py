"""Client-side differential privacy for a site's local federated round: DP-SGD with Opacus.

What is protected: each training series of this site (one sample of the dataset). Every local
optimiser step clips each sample's gradient to `max_grad_norm` and adds Gaussian noise of
std `noise_multiplier * max_grad_norm` to their sum (Opacus' DPOptimizer); batches are drawn by
Poisson sampling (each sample independently, with probability `sample_rate`), which is what the
accountant's subsampling amplification assumes. The weights sent to the server after a round are
then (epsilon, delta)-DP with respect to this site's data, whatever the server does with them.
The unit is one dataset item (a series): a patient with k series in the training set is protected
only at the group-privacy level (about k x epsilon); give one series per patient for patient-level DP.

The budget is for the whole federation, not for one round: the noise is planned once so that
`total_epochs` local epochs (over every round the site will take part in) end exactly at the
target epsilon (`noise_for_budget`), and the accountant's history (a list of (noise multiplier,
sample rate, steps)) is kept in a ledger file (`<workspace>/runs/fed/privacy.json`), restored before
each round and saved after every step, so that epsilon adds up across rounds and processes.

Enforcement, decided here: a step is taken only if the epsilon after it stays within the target.
- Before a round: if the ledger's epsilon has reached the target, or even one more step would
  pass it, `dp_train_stage1` raises ApplianceError("privacy budget spent: ...; training refused")
  and the model is not touched.
- During a round: when the next step would pass the target, the round stops there, without an
  error, and reports `stopped_early=True` (and `budget_exhausted=True`, which a round that ends
  exactly on the planned last step reports too); the weights trained so far are within the budget
  and may be sent. A federated client should send them and then leave: its next round is refused.
The ledger is written (fsync + rename) after every step, under a lock held for the whole round:
a crash loses at most the record of a step whose weights were never sent, and a second process
cannot spend the same budget at the same time.

Only stage 1 is trained with DP. Stage 1's loss (BCE of the image logits and of the report-text
logits, both through the shared classifier) is a sum of per-sample terms, which is what per-sample
clipping bounds. Stage 2's InfoNCE (and the one-stage joint phase) scores every sample against all
the others of its batch: a sample's "gradient" then depends on the other samples, so clipping it
does not bound one sample's influence and the DP guarantee would not hold. `check_dp_phase` refuses
those phases with DP on. The trainer's optional "label sentence" term is left out too.

Stage 1 per sample: BCE of each modality is the mean over that sample's own known labels (the
trainer divides by the batch's known-label count, which would make each sample's gradient depend
on the others' labels), then the batch loss is the mean over samples (Opacus' loss_reduction="mean").

The model must be built with `ModelSpec(norm="group")` (BatchNorm mixes the samples of a batch;
Opacus' ModuleValidator replaces it by GroupNorm); a BatchNorm model is refused.

Randomness: with `seed=None` (the default) Poisson sampling and the noise come from generators
seeded from the OS entropy pool. A fixed seed makes the noise and the batches reproducible, which
is for tests only: anyone who knows the seed can recompute the noise and remove it. (Opacus'
`secure_mode`, a cryptographic generator, is not used.)

Training is in fp32 (no autocast), in the calling process (no loader workers), one device.

Not covered by the guarantee: the per-round losses and sample counts in `DpRoundResult` (they are
computed from the private data without noise): keep them in the site's own logs; the number of
examples a FedAvg client reports is the dataset size, which the consortium normally knows anyway.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import secrets
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from appliance.errors import ApplianceError, ConfigError

LEDGER = Path("runs") / "fed" / "privacy.json"
ACCOUNTANTS = ("rdp", "prv")
DP_PHASES = ("stage1",)


def ledger_path(workspace_root: Path | str) -> Path:
    """Where a site keeps its privacy ledger: <workspace>/runs/fed/privacy.json."""
    return Path(workspace_root) / LEDGER


def check_dp_phase(phase: str) -> None:
    """With DP on, only stage 1 may be trained locally (see the module docstring)."""
    if phase in DP_PHASES:
        return
    if phase in ("stage2", "joint"):
        raise ConfigError(f"differential privacy is on: only stage1 is trained locally, not {phase}; its InfoNCE "
                          "contrasts every sample with the others of its batch, so per-sample clipping does not "
                          "bound one sample's influence (train the alignment without DP, or not at all)")
    raise ConfigError(f"training phase {phase!r} is unknown; with differential privacy only stage1 is trained")


# ---------------------------------------------------------------------------------------------
# settings and planning


def steps_per_epoch(n_samples: int, batch_size: int) -> int:
    """Optimiser steps in one epoch: ceil(N / batch), as Opacus' Poisson loader takes them."""
    if n_samples < 1 or batch_size < 1:
        raise ConfigError(f"differential privacy needs at least one sample and a batch of at least one "
                          f"(got {n_samples} samples, batch {batch_size})")
    return math.ceil(n_samples / batch_size)


def sample_rate_for(n_samples: int, batch_size: int) -> float:
    """Poisson sampling rate: 1 / ceil(N / batch), which is batch / N when batch divides N.

    It is exactly the rate PrivacyEngine.make_private accounts for (1 / len(data_loader)), so the
    plan and the ledger agree to the last bit."""
    return 1 / steps_per_epoch(n_samples, batch_size)


@dataclass(frozen=True)
class DpSettings:
    """A site's privacy budget and clipping. `total_epochs`: the local epochs over the whole
    federation (all rounds) the budget is planned for. `noise_multiplier`: None plans it from the
    budget (the normal case); a number forces it (0 = clipping only, no privacy: epsilon is then
    infinite, which only a target of inf allows; for tests and diagnostics)."""

    target_epsilon: float
    total_epochs: int
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "rdp"
    noise_multiplier: float | None = None

    def __post_init__(self):
        if not self.target_epsilon > 0:
            raise ConfigError(f"privacy target_epsilon must be > 0, not {self.target_epsilon}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"privacy delta must be in (0, 1), not {self.delta}")
        if not self.max_grad_norm > 0 or not math.isfinite(self.max_grad_norm):
            raise ConfigError(f"privacy max_grad_norm must be a positive number, not {self.max_grad_norm}")
        if int(self.total_epochs) != self.total_epochs or self.total_epochs < 1:
            raise ConfigError(f"privacy total_epochs must be a whole number >= 1, not {self.total_epochs}")
        if self.accountant not in ACCOUNTANTS:
            raise ConfigError(f"privacy accountant {self.accountant!r} is unknown; allowed: {', '.join(ACCOUNTANTS)}")
        if self.noise_multiplier is not None and not (self.noise_multiplier >= 0
                                                      and math.isfinite(self.noise_multiplier)):
            raise ConfigError(f"noise_multiplier must be >= 0, not {self.noise_multiplier}")

    def sample_rate(self, n_samples: int, batch_size: int) -> float:
        return sample_rate_for(n_samples, batch_size)


def _accountant(name: str, history=()):
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=name)
    acc.history = [tuple(h) for h in history]
    return acc


@functools.lru_cache(maxsize=256)
def _rdp_one_step(sample_rate: float, noise_multiplier: float):
    """RDP of one step at each of RDPAccountant's orders. RDP adds up over steps, and Opacus
    computes `steps` steps as this times `steps`, so caching it gives RDPAccountant's epsilon to
    the last bit at a fraction of the cost (the fractional orders take ~1 s per (q, sigma) at q=0.5)."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp

    return rdp.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                           orders=RDPAccountant.DEFAULT_ALPHAS)


def epsilon_of(history, delta: float, accountant: str = "rdp") -> float:
    """Epsilon spent by an accountant history [(noise_multiplier, sample_rate, steps), ...]
    (what Opacus' accountant of that name reports for it)."""
    history = [tuple(h) for h in history if h[2] > 0]
    if not history:
        return 0.0
    if any(nm == 0 for nm, _, _ in history):
        return math.inf  # no noise: no privacy (and the accountants would divide by zero)
    if accountant != "rdp":
        return float(_accountant(accountant, history).get_epsilon(delta=delta))
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp

    total = sum([_rdp_one_step(float(q), float(nm)) * steps for nm, q, steps in history])
    eps, _ = rdp.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=total, delta=delta)
    return float(eps)


def _with_steps(history, noise_multiplier: float, sample_rate: float, steps: int) -> list[tuple]:
    """`history` plus `steps` more steps, merged the way the accountants merge them."""
    out = [tuple(h) for h in history]
    if steps <= 0:
        return out
    if out and out[-1][0] == noise_multiplier and out[-1][1] == sample_rate:
        out[-1] = (noise_multiplier, sample_rate, out[-1][2] + steps)
    else:
        out.append((noise_multiplier, sample_rate, steps))
    return out


@functools.lru_cache(maxsize=64)
def noise_for_budget(settings: DpSettings, sample_rate: float, total_steps: int) -> float:
    """The noise multiplier with which `total_steps` steps at `sample_rate` spend the target
    epsilon (at delta): the result lands within 1 % below the target, never above it."""
    from opacus.accountants.utils import get_noise_multiplier

    if total_steps < 1:
        raise ConfigError("the privacy plan needs at least one step")
    if math.isinf(settings.target_epsilon):
        return 0.0
    try:
        with _quiet_search():
            return float(get_noise_multiplier(target_epsilon=settings.target_epsilon, target_delta=settings.delta,
                                              sample_rate=sample_rate, steps=int(total_steps),
                                              accountant=settings.accountant,
                                              epsilon_tolerance=max(1e-4, 0.01 * settings.target_epsilon)))
    except ValueError as exc:
        raise ConfigError(f"privacy target epsilon {settings.target_epsilon} cannot be met for {total_steps} steps "
                          f"({exc})") from None


@contextlib.contextmanager
def _quiet_search():
    """The bisections try large noise multipliers, whose best RDP order is the largest one; Opacus
    warns about that each time, which says nothing about the plan they return."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        yield


def _noise_for_remaining(settings: DpSettings, history, sample_rate: float, steps: int) -> float:
    """Like noise_for_budget, for `steps` more steps after `history` (the plan changed: another
    dataset size or batch). The same bisection on sigma as opacus' get_noise_multiplier."""
    target = settings.target_epsilon

    def eps(sigma: float) -> float:
        return epsilon_of(_with_steps(history, sigma, sample_rate, steps), settings.delta, settings.accountant)

    with _quiet_search():
        lo, hi = 0.0, 10.0
        while eps(hi) > target:
            lo, hi = hi, 2 * hi
            if hi > 1e6:
                raise _budget_error(epsilon_of(history, settings.delta, settings.accountant), target)
        tolerance = max(1e-4, 0.01 * target)
        while target - eps(hi) > tolerance and hi - lo > 1e-6:
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if eps(mid) < target else (mid, hi)
    return hi


# ---------------------------------------------------------------------------------------------
# the ledger


def _num(x: float) -> float | str:
    return float(x) if math.isfinite(x) else str(float(x))  # JSON has no inf


@dataclass
class PrivacyLedger:
    """The privacy spent by one site, kept across rounds and processes in a JSON file.

    `history` is the Opacus accountant history [(noise_multiplier, sample_rate, steps), ...];
    `epsilon` is what it spends at `delta` (recomputed from the history, stored for people and the
    server); `plan` is the noise the budget was planned with and for what (sample rate, steps)."""

    path: Path
    target_epsilon: float
    delta: float
    accountant: str = "rdp"
    history: list[tuple[float, float, int]] = field(default_factory=list)
    epsilon: float = 0.0
    plan: dict = field(default_factory=dict)
    local_epochs: int = 0
    rounds: list[dict] = field(default_factory=list)

    @classmethod
    def new(cls, path: Path | str, settings: DpSettings) -> PrivacyLedger:
        return cls(Path(path), settings.target_epsilon, settings.delta, settings.accountant)

    @classmethod
    def load(cls, path: Path | str, settings: DpSettings | None = None) -> PrivacyLedger:
        """The ledger in `path`; a new (empty) one for `settings` where there is none yet. With
        settings, the ledger's budget must be theirs (a budget cannot be changed half-way)."""
        path = Path(path)
        if not path.is_file():
            if settings is None:
                raise ApplianceError(f"no privacy ledger at {path} yet")
            return cls.new(path, settings)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            ledger = cls(path=path, target_epsilon=float(d["target_epsilon"]), delta=float(d["delta"]),
                         accountant=str(d.get("accountant", "rdp")),
                         history=[(float(nm), float(q), int(n)) for nm, q, n in d.get("history", [])],
                         epsilon=float(d.get("epsilon", 0.0)), plan=dict(d.get("plan") or {}),
                         local_epochs=int(d.get("local_epochs", 0)), rounds=list(d.get("rounds", [])))
        except (ValueError, KeyError, TypeError) as exc:
            raise ApplianceError(f"the privacy ledger {path} is damaged ({type(exc).__name__}); "
                                 "it cannot be trusted: training refused") from None
        ledger.epsilon = ledger.spent()
        if settings is not None:
            ledger.check_settings(settings)
        return ledger

    def check_settings(self, settings: DpSettings) -> None:
        mine = (self.target_epsilon, self.delta, self.accountant)
        theirs = (settings.target_epsilon, settings.delta, settings.accountant)
        if mine != theirs:
            raise ConfigError(f"the privacy settings (epsilon, delta, accountant) {theirs} differ from the budget "
                              f"this site's ledger was started with {mine}; a budget cannot change half-way")

    def spent(self) -> float:
        return epsilon_of(self.history, self.delta, self.accountant)

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> float:
        return epsilon_of(_with_steps(self.history, noise_multiplier, sample_rate, steps), self.delta,
                          self.accountant)

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history)

    @property
    def exhausted(self) -> bool:
        return self.epsilon >= self.target_epsilon

    def to_dict(self) -> dict:
        return {"target_epsilon": _num(self.target_epsilon), "delta": self.delta, "accountant": self.accountant,
                "epsilon": _num(self.epsilon), "steps": self.steps, "local_epochs": self.local_epochs,
                "history": [[nm, q, n] for nm, q, n in self.history], "plan": self.plan, "rounds": self.rounds}

    def save(self) -> None:
        """Atomically: a temporary file beside it, fsync, rename over the ledger, fsync the folder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.partial")
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(self.to_dict(), indent=1))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)
        with contextlib.suppress(OSError):
            fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    @contextlib.contextmanager
    def locked(self):
        """Held for a whole round: a second process training on the same ledger is refused."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(f".{self.path.name}.lock"), "a") as lock:
            try:
                import fcntl

                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except ImportError:  # not POSIX: no lock
                pass
            except OSError:
                raise ApplianceError("another process is training on this site's privacy ledger; "
                                     "training refused") from None
            yield self  # closing the file releases the lock

    def _reload(self) -> None:
        """Take over what is on disk (another process may have spent budget since this was read)."""
        if self.path.is_file():
            disk = PrivacyLedger.load(self.path)
            if (disk.target_epsilon, disk.delta, disk.accountant) != (self.target_epsilon, self.delta,
                                                                       self.accountant):
                raise ConfigError("the privacy ledger on disk has another budget than the one in memory")
            self.history, self.plan, self.local_epochs, self.rounds = (disk.history, disk.plan, disk.local_epochs,
                                                                       disk.rounds)
        self.epsilon = self.spent()


def _fmt(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.4g}"


def _budget_error(spent: float, target: float) -> ApplianceError:
    return ApplianceError(f"privacy budget spent: epsilon {_fmt(spent)} of {_fmt(target)}; training refused")


# ---------------------------------------------------------------------------------------------
# training


@dataclass
class DpRoundResult:
    epsilon: float            # spent in total after this round (all rounds so far)
    delta: float
    steps: int                # optimiser steps this round
    samples: int              # samples drawn this round (Poisson: about epochs x N)
    losses: dict              # mean per-sample losses this round (local log only: not private)
    state_dict: dict = field(default_factory=dict)   # the trained weights, no `_module.` prefix
    epsilon_round: float = 0.0   # epsilon before -> after: what this round added
    noise_multiplier: float = 0.0
    sample_rate: float = 0.0
    target_epsilon: float = 0.0
    budget_exhausted: bool = False   # not one more step fits in the budget: the next round is refused
    stopped_early: bool = False      # the budget ran out before the round's epochs were done
    seconds: float = 0.0


def per_sample_masked_bce(logits: torch.Tensor, labels: torch.Tensor, uncertain: str = "mask") -> torch.Tensor:
    """(B,) BCE per sample: appliance.train.losses.masked_bce of each row on its own."""
    labels = labels.to(logits.dtype)
    if uncertain == "zero":
        known = torch.ones_like(labels, dtype=torch.bool)
    elif uncertain == "mask":
        known = labels >= 0
    else:
        raise ValueError(f"uncertain must be 'mask' or 'zero', not {uncertain!r}")
    per_label = F.binary_cross_entropy_with_logits(logits, labels.clamp(min=0), reduction="none")
    return (per_label * known).sum(dim=1) / known.sum(dim=1).clamp(min=1)


def _stage1_losses(net: nn.Module, batch: dict, uncertain: str) -> dict[str, torch.Tensor]:
    out = net(batch["volume"], batch["input_ids"], batch["attention_mask"])
    bce_image = per_sample_masked_bce(out["image_logits"].float(), batch["labels"], uncertain)
    bce_text = per_sample_masked_bce(out["text_logits"].float(), batch["labels"], uncertain)
    return {"loss": (bce_image + bce_text).mean(), "bce_image": bce_image.detach(), "bce_text": bce_text.detach()}


def _optimizer(model: nn.Module, kind: str, lr_vision: float, lr_text: float,
               weight_decay: float) -> torch.optim.Optimizer:
    """The trainer's stage-1 groups: text encoder + its projection at lr_text, the rest at lr_vision."""
    text_params = [p for p in list(model.text.parameters()) + list(model.text_proj.parameters()) if p.requires_grad]
    text_ids = {id(p) for p in text_params}
    other = [p for p in model.parameters() if id(p) not in text_ids and p.requires_grad]
    groups = [{"params": other, "lr": lr_vision}, {"params": text_params, "lr": lr_text}]
    if kind == "adamw":
        return torch.optim.AdamW(groups, weight_decay=weight_decay)
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr_vision, weight_decay=weight_decay)
    raise ConfigError(f"optimizer {kind!r} is unknown; allowed: adamw, sgd")


def _check_model(model: nn.Module) -> None:
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ConfigError("the model cannot be trained with differential privacy (build it with "
                          f"ModelSpec(norm='group')): {str(errors[0]).splitlines()[0]}")
    vision = getattr(model, "vision", None)
    if getattr(vision, "activation_checkpointing", False):
        raise ConfigError("activation checkpointing cannot be combined with differential privacy (Opacus' per-sample "
                          "gradient hooks get nothing from recomputed layers); bound memory with max_physical_batch_size")


def _generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(secrets.randbits(63) if seed is None else int(seed))
    return g


def _batch_len(batch) -> int:
    return len(batch["index"]) if isinstance(batch, dict) and "index" in batch else 0


def dp_train_stage1(model: nn.Module, dataset: Dataset, *, settings: DpSettings, ledger: PrivacyLedger, epochs: int,
                    batch_size: int, lr_vision: float, lr_text: float, weight_decay: float, uncertain: str = "mask",
                    device: str | torch.device = "cpu", seed: int | None = None,
                    max_physical_batch_size: int | None = None, optimizer: str = "adamw",
                    on_step: Callable[[dict], None] | None = None) -> DpRoundResult:
    """One local round of DP stage-1 training of `model` (a GroupNorm GreenRFM) on `dataset`
    (items as VolumeReportDataset gives them). The model is trained in place and is a plain module
    again afterwards; the result carries its state dict (no `_module.` prefix) and the epsilon
    spent so far. `batch_size` is the expected (Poisson) batch; `max_physical_batch_size` splits
    the drawn batches for memory (BatchMemoryManager) without changing the privacy accounting.
    `on_step` gets {"step", "epoch", "epsilon", "batch", "loss"} after every step."""
    from opacus import PrivacyEngine
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    t0 = time.perf_counter()
    ledger.check_settings(settings)
    _check_model(model)
    if epochs < 1:
        raise ConfigError(f"a DP round needs at least one epoch, not {epochs}")
    if max_physical_batch_size is not None and max_physical_batch_size < 1:
        raise ConfigError(f"max_physical_batch_size must be >= 1, not {max_physical_batch_size}")
    n = len(dataset)
    per_epoch = steps_per_epoch(n, batch_size)
    q = sample_rate_for(n, batch_size)
    device = torch.device(device)

    with ledger.locked():
        ledger._reload()
        sigma = _planned_noise(settings, ledger, q, per_epoch)
        if ledger.epsilon >= ledger.target_epsilon or ledger.epsilon_after(sigma, q) > ledger.target_epsilon:
            raise _budget_error(ledger.epsilon, ledger.target_epsilon)
        eps_before = ledger.epsilon

        model.to(device).train()
        opt = _optimizer(model, optimizer, lr_vision, lr_text, weight_decay)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0,
                            generator=_generator(seed, "cpu"))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG turned off.*")
            engine = PrivacyEngine(accountant=settings.accountant)
        engine.accountant.history = list(ledger.history)
        steps = samples = epoch = 0
        sums = {"loss": 0.0, "bce_image": 0.0, "bce_text": 0.0}
        exhausted = stopped_early = False
        private = None
        try:
            private, dp_opt, dp_loader = engine.make_private(
                module=model, optimizer=opt, data_loader=loader, noise_multiplier=sigma,
                max_grad_norm=settings.max_grad_norm, poisson_sampling=True,
                noise_generator=_generator(None if seed is None else seed + 1, device))
            if len(dp_loader) != per_epoch or dp_loader.sample_rate != q:
                raise RuntimeError(f"Opacus draws {len(dp_loader)} batches at rate {dp_loader.sample_rate}, "
                                   f"planned {per_epoch} at {q}")
            params = [p for group in dp_opt.param_groups for p in group["params"] if p.requires_grad]
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
                for epoch in range(epochs):
                    if hasattr(dataset, "set_epoch"):
                        dataset.set_epoch(ledger.local_epochs + epoch)  # other crops every round
                    manager = (BatchMemoryManager(data_loader=dp_loader, max_physical_batch_size=max_physical_batch_size,
                                                  optimizer=dp_opt) if max_physical_batch_size
                               else contextlib.nullcontext(dp_loader))
                    epoch_steps = 0
                    with manager as batches:
                        for batch in batches:
                            m = _batch_len(batch)
                            if m == 0:
                                # an empty Poisson draw is still a step: the update is noise only
                                for p in params:
                                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
                            else:
                                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                                         for k, v in batch.items()}
                                losses = _stage1_losses(private, batch, uncertain)
                                losses["loss"].backward()
                                samples += m
                                sums["loss"] += float(losses["loss"].detach()) * m
                                sums["bce_image"] += float(losses["bce_image"].sum())
                                sums["bce_text"] += float(losses["bce_text"].sum())
                            before = _n_steps(engine.accountant.history)
                            dp_opt.step()
                            dp_opt.zero_grad(set_to_none=True)
                            if _n_steps(engine.accountant.history) == before:
                                continue  # a physical part of a larger logical batch
                            steps += 1
                            epoch_steps += 1
                            ledger.history = [tuple(h) for h in engine.accountant.history]
                            ledger.epsilon = ledger.spent()
                            ledger.save()
                            if on_step is not None:
                                on_step({"step": steps, "epoch": epoch, "epsilon": ledger.epsilon, "batch": m,
                                         "loss": float(losses["loss"].detach()) if m else None})
                            if ledger.epsilon_after(sigma, q) > ledger.target_epsilon:
                                exhausted = True
                                stopped_early = epoch < epochs - 1 or epoch_steps < per_epoch
                                break
                    if exhausted:
                        break
        finally:
            ledger.history = [tuple(h) for h in engine.accountant.history]
            ledger.epsilon = ledger.spent()
            if private is not None:
                private._close()  # hooks and per-sample attributes off: `model` is a plain module again
            for p in model.parameters():
                p.grad = None
                for attr in ("summed_grad", "grad_sample"):
                    if hasattr(p, attr):
                        delattr(p, attr)
        epochs_done = epoch if stopped_early else epochs  # a partial epoch is not counted
        ledger.local_epochs += epochs_done
        result = DpRoundResult(
            epsilon=ledger.epsilon, delta=ledger.delta, steps=steps, samples=samples,
            losses={k: v / samples for k, v in sums.items()} if samples else {},
            state_dict={k: v.detach().clone() for k, v in model.state_dict().items()},
            epsilon_round=ledger.epsilon - eps_before, noise_multiplier=sigma, sample_rate=q,
            target_epsilon=ledger.target_epsilon, budget_exhausted=exhausted, stopped_early=stopped_early,
            seconds=time.perf_counter() - t0)
        ledger.rounds.append({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "steps": steps,
                              "epochs": epochs_done, "epsilon": _num(ledger.epsilon),
                              "noise_multiplier": sigma, "sample_rate": q, "budget_exhausted": exhausted,
                              "stopped_early": stopped_early})
        ledger.save()
    return result


def _n_steps(history) -> int:
    return sum(h[2] for h in history)


def _planned_noise(settings: DpSettings, ledger: PrivacyLedger, q: float, per_epoch: int) -> float:
    """The noise multiplier for this round: forced by the settings, or the ledger's plan (made on
    the first round for the whole federation), re-planned over the remaining epochs if the sample
    rate changed (another dataset size or batch)."""
    if settings.noise_multiplier is not None:
        return float(settings.noise_multiplier)
    plan = ledger.plan
    if plan.get("sample_rate") == q and plan.get("noise_multiplier") is not None:
        return float(plan["noise_multiplier"])
    if not ledger.history:
        total = settings.total_epochs * per_epoch
        sigma = noise_for_budget(settings, q, total)
    else:
        remaining = max(1, settings.total_epochs - ledger.local_epochs) * per_epoch
        total = ledger.steps + remaining
        sigma = _noise_for_remaining(settings, ledger.history, q, remaining)
    ledger.plan = {"noise_multiplier": sigma, "sample_rate": q, "steps_per_epoch": per_epoch,
                   "total_epochs": settings.total_epochs, "total_steps": total,
                   "max_grad_norm": settings.max_grad_norm}
    return sigma
