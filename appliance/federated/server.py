"""The coordinator's side of a federated run: rounds, rules for too few results, checkpoints, resume.

Flower's strategies (FedAvg, FedProx, FedAdam from `flwr.serverapp.strategy`) choose the sites and
aggregate; this module runs the rounds itself rather than through `Strategy.start`, because a
hospital consortium needs what `start` does not do:

* a bounded wait for `min_nodes` sites (Flower waits for ever),
* a minimum number of results per round: fewer (a site dropped out, a site's round failed) and the
  round is retried `round_retries` times, then the run stops with a one-line reason and the last
  good global model kept (Flower would aggregate whatever came back, even one site),
* the global model, the strategy's own state (FedAdam's moments) and the metrics checkpointed
  atomically after every completed round, so that a restarted server resumes from the last
  completed round (Flower does not resume a run),
* per-round and per-site metrics in MLflow, and the final global model registered there,
* a cross-site evaluation after every round: each site scores the global model on its own
  held-out patients.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from appliance.config import TrainSection
from appliance.errors import ApplianceError
from appliance.federated.local import ConsortiumModel, consortium_tokenizer, initial_state, model_spec

log = logging.getLogger("rfm.fed.server")

STRATEGIES = ("fedavg", "fedprox", "fedadam")
CHECKPOINT = "global.pt"


class FederationError(ApplianceError):
    """A round that cannot be completed under the run's rules."""


@dataclass
class FedRunConfig:
    """Everything the ServerApp reads from `flwr run --run-config` (flat keys, dashes or underscores)."""

    state_dir: str = "fed-server"
    rounds: int = 2
    strategy: str = "fedavg"
    proximal_mu: float = 0.01
    server_lr: float = 0.01  # FedAdam's eta
    min_nodes: int = 2
    min_results: int = 2
    wait_nodes_s: float = 120.0
    round_timeout_s: float = 1800.0
    round_retries: int = 1
    local_epochs: int = 1
    phase: str = "stage1"
    variant: str = "lite"
    embed_dim: int = 768
    text_max_tokens: int = 128
    norm: str = "batch"
    text_model_dir: str = ""  # a BERT folder at this path at every site (and here); "": tiny BERT
    seed: int = 0
    dp: bool = False  # client-side DP-SGD (Opacus); stage 1 and norm=group only
    dp_target_epsilon: float = 8.0
    dp_delta: float = 1e-5
    dp_max_grad_norm: float = 1.0
    secagg: bool = False  # SecAgg+ (server/secagg_app.py): the coordinator sees only the sum of the weights
    secagg_num_shares: int = 3
    secagg_reconstruction_threshold: int = 2
    secagg_clip: float = 8.0
    tracking: bool = True
    tracking_uri: str = ""
    experiment: str = "greenrfm-federated"

    @classmethod
    def from_run_config(cls, run_config: dict) -> FedRunConfig:
        known = {f.name: f for f in fields(cls)}
        values = {}
        for key, value in run_config.items():
            name = key.replace("-", "_")
            if name in known:
                values[name] = type(getattr(cls(), name))(value)
        cfg = cls(**values)
        cfg.check()
        return cfg

    def check(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ApplianceError(f"strategy {self.strategy!r} is unknown; allowed: {', '.join(STRATEGIES)}")
        if self.phase not in ("stage1", "stage2", "joint"):
            raise ApplianceError(f"phase {self.phase!r} is unknown; allowed: stage1, stage2, joint")
        if self.min_results < 1 or self.min_nodes < self.min_results:
            raise ApplianceError("need 1 <= min_results <= min_nodes")
        if self.dp and (self.phase != "stage1" or self.norm != "group"):
            raise ApplianceError("dp needs phase=stage1 and norm=group (DP-SGD clips per sample; InfoNCE couples "
                                 "the samples of a batch, and BatchNorm mixes them)")

    @property
    def model(self) -> ConsortiumModel:
        return ConsortiumModel(variant=self.variant, embed_dim=self.embed_dim, text_max_tokens=self.text_max_tokens,
                               norm=self.norm, text_model_dir=self.text_model_dir or None)


@dataclass
class RoundRecord:
    round: int
    sites: int
    failures: int
    attempts: int
    seconds: float
    train: dict = field(default_factory=dict)
    evaluate: dict = field(default_factory=dict)
    per_site: dict = field(default_factory=dict)
    timing: dict = field(default_factory=dict)  # seconds: train phase, aggregation, evaluation phase


def make_strategy(cfg: FedRunConfig):
    from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

    common = dict(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=cfg.min_results,
                  min_evaluate_nodes=cfg.min_results, min_available_nodes=cfg.min_nodes)
    if cfg.strategy == "fedprox":
        return FedProx(proximal_mu=cfg.proximal_mu, **common)
    if cfg.strategy == "fedadam":
        return FedAdam(eta=cfg.server_lr, eta_l=cfg.server_lr, beta_1=0.9, beta_2=0.99, **common)
    return FedAvg(**common)


_STRATEGY_STATE = ("current_arrays", "m_t", "v_t")


def save_global(path: Path, completed_round: int, state: dict, strategy, history: list[dict], run_id: str | None,
                cfg: FedRunConfig) -> None:
    """Atomically: the global weights after `completed_round`, the strategy's state and the history."""
    blob = {"round": completed_round, "state_dict": state, "history": history, "mlflow_run_id": run_id,
            "config": asdict(cfg), "strategy": {k: getattr(strategy, k, None) for k in _STRATEGY_STATE}}
    tmp = path.with_suffix(".tmp")
    torch.save(blob, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_global(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise FederationError(f"global checkpoint {path.name} is unreadable ({type(exc).__name__}); "
                              "move it away to start the run again from round 0") from None


def _wait_for_nodes(grid, cfg: FedRunConfig, server_round: int) -> list[int]:
    deadline = time.monotonic() + cfg.wait_nodes_s
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= cfg.min_nodes:
            return nodes
        if time.monotonic() > deadline:
            raise FederationError(f"round {server_round}: {len(nodes)} of the {cfg.min_nodes} sites needed are "
                                  f"connected after {cfg.wait_nodes_s:.0f} s; the global model is kept from round "
                                  f"{server_round - 1}")
        time.sleep(1.0)


def _site_name(reply) -> str:
    info = reply.content.config_records.get("site") if hasattr(reply.content, "config_records") else None
    return str(info["name"]) if info is not None and "name" in info else f"node-{reply.metadata.src_node_id}"


def _metrics(reply) -> dict[str, float]:
    out = {}
    for record in reply.content.metric_records.values():
        for k, v in record.items():
            if isinstance(v, (int, float)) and math.isfinite(float(v)):
                out[k] = float(v)
    return out


def _summarise(replies: list) -> dict[str, float]:
    """Example-weighted means of every metric the sites returned."""
    rows = [_metrics(r) for r in replies]
    total = sum(m.get("num-examples", 0.0) for m in rows) or 1.0
    keys = sorted({k for m in rows for k in m if k != "num-examples"})
    return {k: sum(m.get(k, 0.0) * m.get("num-examples", 0.0) for m in rows) / total for k in keys}


def round_config(cfg: FedRunConfig, server_round: int):
    from flwr.app import ConfigRecord

    return ConfigRecord({"server-round": server_round, "local-epochs": cfg.local_epochs, "phase": cfg.phase,
                         "variant": cfg.variant, "embed-dim": cfg.embed_dim, "text-max-tokens": cfg.text_max_tokens,
                         "norm": cfg.norm, "run-name": Path(cfg.state_dir).name, "text-model-dir": cfg.text_model_dir,
                         "proximal-mu": cfg.proximal_mu if cfg.strategy == "fedprox" else 0.0,
                         "dp": cfg.dp, "dp-target-epsilon": cfg.dp_target_epsilon, "dp-delta": cfg.dp_delta,
                         "dp-max-grad-norm": cfg.dp_max_grad_norm, "dp-total-epochs": cfg.rounds * cfg.local_epochs})


def _send(grid, messages, cfg: FedRunConfig) -> tuple[list, list]:
    replies = list(grid.send_and_receive(messages=messages, timeout=cfg.round_timeout_s))
    good = [r for r in replies if not r.has_error()]
    bad = [r for r in replies if r.has_error()]
    for r in bad:
        log.warning("site node-%s failed: %s", r.metadata.src_node_id, str(r.error.reason).splitlines()[0][:200])
    return good, bad


def _cross_site_evaluation(grid, strategy, server_round: int, arrays, cfg: FedRunConfig) -> list:
    """Every connected site scores the global model. With fewer sites than `min_nodes` connected
    (one dropped out this round) the ones there evaluate: Flower's sampler would wait for ever."""
    online = len(list(grid.get_node_ids()))
    if online == 0:
        return []
    saved = strategy.min_available_nodes, strategy.min_evaluate_nodes
    strategy.min_available_nodes = strategy.min_evaluate_nodes = min(online, cfg.min_nodes)
    try:
        evaluated, _ = _send(grid, strategy.configure_evaluate(server_round, arrays, round_config(cfg, server_round),
                                                               grid), cfg)
    finally:
        strategy.min_available_nodes, strategy.min_evaluate_nodes = saved
    return evaluated


def run_federation(grid, cfg: FedRunConfig, *, on_round=None) -> dict:
    """All rounds of a run (resuming after the last checkpointed one); returns the summary."""
    from flwr.app import ArrayRecord

    from appliance.tracking import open_run

    state_dir = Path(cfg.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = state_dir / CHECKPOINT
    saved = load_global(ckpt_path)
    strategy = make_strategy(cfg)
    model = cfg.model
    tokenizer_dir = consortium_tokenizer(state_dir / "tokenizer", model)
    if saved is None:
        state, history, done, run_id = initial_state(model, tokenizer_dir, cfg.seed), [], 0, None
    else:
        state, history, done, run_id = saved["state_dict"], saved["history"], saved["round"], saved["mlflow_run_id"]
        for k, v in (saved.get("strategy") or {}).items():
            if v is not None:
                setattr(strategy, k, v)
        log.info("resuming after round %d of %d", done, cfg.rounds)
    t_run = time.perf_counter()
    with open_run(state_dir, experiment=cfg.experiment, run_name=f"fed-{state_dir.name}",
                  uri=cfg.tracking_uri or None, enabled=cfg.tracking, resume_run_id=run_id,
                  tags={"stage": "federated", "strategy": cfg.strategy}) as tracker:
        if run_id is None:
            tracker.log_params({"federation": asdict(cfg) | {"state_dir": None, "tracking_uri": None}})
        arrays = ArrayRecord(state)
        for server_round in range(done + 1, cfg.rounds + 1):
            t0 = time.perf_counter()
            for attempt in range(1, cfg.round_retries + 2):
                _wait_for_nodes(grid, cfg, server_round)
                t_train = time.perf_counter()
                good, bad = _send(grid, strategy.configure_train(server_round, arrays, round_config(cfg, server_round),
                                                                 grid), cfg)
                if len(good) >= cfg.min_results:
                    break
                log.warning("round %d attempt %d: %d results, %d needed", server_round, attempt, len(good),
                            cfg.min_results)
            else:
                raise FederationError(f"round {server_round}: only {len(good)} site(s) returned results after "
                                      f"{cfg.round_retries + 1} attempt(s) (minimum {cfg.min_results}); the global "
                                      f"model is kept from round {server_round - 1}")
            t_aggregate = time.perf_counter()
            new_arrays, _ = strategy.aggregate_train(server_round, good)
            arrays = new_arrays
            train_summary = _summarise(good)
            t_evaluate = time.perf_counter()
            evaluated = _cross_site_evaluation(grid, strategy, server_round, arrays, cfg)
            timing = {"train_phase": t_aggregate - t_train, "aggregate": t_evaluate - t_aggregate,
                      "evaluate_phase": time.perf_counter() - t_evaluate,
                      "local_train_max": max((_metrics(r).get("train_seconds", 0.0) for r in good), default=0.0)}
            record = RoundRecord(round=server_round, sites=len(good), failures=len(bad), attempts=attempt,
                                 seconds=time.perf_counter() - t0, train=train_summary,
                                 evaluate=_summarise(evaluated),
                                 per_site={_site_name(r): _metrics(r) for r in evaluated}, timing=timing)
            for r in good:
                record.per_site.setdefault(_site_name(r), {}).update({f"train_{k}" if not k.startswith("train")
                                                                      else k: v for k, v in _metrics(r).items()})
            history.append(asdict(record))
            state = arrays.to_torch_state_dict()
            save_global(ckpt_path, server_round, state, strategy, history, tracker.run_id, cfg)
            tracker.log_metrics({f"train/{k}": v for k, v in record.train.items()}
                                | {f"eval/{k}": v for k, v in record.evaluate.items()}
                                | {f"site/{s}/{k}": v for s, m in record.per_site.items() for k, v in m.items()}
                                | {"round/sites": record.sites, "round/failures": record.failures,
                                   "round/seconds": record.seconds}, step=server_round)
            (state_dir / "rounds.json").write_text(json.dumps(history, indent=1) + "\n")
            if on_round is not None:
                on_round(record)
        final = state_dir / "model.pt"  # with tokenizer/ beside it: load_trained_model(state_dir) reads it
        save_final_model(final, state, cfg, tokenizer_dir)
        tracker.log_artifact(final, "model")
        if not model.text_model_dir:  # a BERT folder is the consortium's own, not this run's
            tracker.log_artifacts(tokenizer_dir, "model/tokenizer")
        _register(tracker, cfg)
    summary = {"rounds": history, "completed": len(history), "resumed_after": done,
               "model": str(final), "seconds": time.perf_counter() - t_run}
    (state_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def save_final_model(path: Path, state: dict, cfg: FedRunConfig, tokenizer_dir: Path) -> None:
    """The final global model in the same format as a training run's model.pt (rfm eval/export read it)."""
    from appliance.models import load_tokenizer
    from appliance.train.checkpoint import save_checkpoint

    model = cfg.model
    tokenizer = load_tokenizer(tokenizer_dir, model.text_max_tokens)
    save_checkpoint(path, {"spec": model_spec(model, tokenizer.vocab_size).to_dict(), "findings": list(model.findings),
                           "state_dict": state, "crop": list(TrainSection().crop),
                           "tokenizer": None if model.text_model_dir else "tokenizer",
                           "text_max_tokens": model.text_max_tokens, "impression_first": True})


def _register(tracker, cfg: FedRunConfig) -> str | None:
    """The final global model as a new version of the registered model `<experiment>-global`."""
    if not hasattr(tracker, "register_model_version"):
        return None  # tracking off
    return tracker.register_model_version(f"{cfg.experiment}-global", "model")
