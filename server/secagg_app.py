"""Flower ServerApp with SecAgg+: the coordinator sees only the sum of the sites' weights.

In flwr 1.41 SecAgg+ runs only in Flower's legacy workflow (`LegacyContext` + `DefaultWorkflow` with
`SecAggPlusWorkflow` and a `flwr.server.strategy` strategy), so this app drives that workflow
instead of `appliance.federated.server.run_federation`. It keeps what the rest of the appliance
expects: the same run config, the same global checkpoint after every round and `rounds.json`, the
final model in the same format. Only floating-point weights travel (SecAgg+ quantises them within
`secagg_clip`); the sites' metrics are not masked.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from flwr.app import Context
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid, ServerApp

from appliance.federated.local import consortium_tokenizer, initial_state
from appliance.federated.secagg import float_keys, from_arrays, to_arrays
from appliance.federated.server import CHECKPOINT, FedRunConfig, round_config, save_final_model, save_global

app = ServerApp()


def _weighted(metrics):
    total = sum(n for n, _ in metrics) or 1
    keys = sorted({k for _, m in metrics for k in m})
    return {k: sum(n * m.get(k, 0.0) for n, m in metrics) / total for k in keys}


class CheckpointingFedAvg(FedAvg):
    """Legacy FedAvg that checkpoints the global model after every aggregated round."""

    def __init__(self, cfg: FedRunConfig, template: dict, **kwargs):
        super().__init__(**kwargs)
        self.cfg, self.template, self.history = cfg, template, []

    def aggregate_fit(self, server_round, results, failures):
        t0 = time.perf_counter()
        params, metrics = super().aggregate_fit(server_round, results, failures)
        if params is not None:
            state = from_arrays(self.template, parameters_to_ndarrays(params))
            self.history.append({"round": server_round, "sites": len(results), "failures": len(failures),
                                 "attempts": 1, "seconds": time.perf_counter() - t0, "train": metrics,
                                 "evaluate": {}, "per_site": {}, "secagg": True})
            state_dir = Path(self.cfg.state_dir)
            save_global(state_dir / CHECKPOINT, server_round, state, self, self.history, None, self.cfg)
            (state_dir / "rounds.json").write_text(json.dumps(self.history, indent=1) + "\n")
        return params, metrics


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = FedRunConfig.from_run_config(dict(context.run_config))
    state_dir = Path(cfg.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = consortium_tokenizer(state_dir / "tokenizer", cfg.model)
    template = initial_state(cfg.model, tokenizer_dir, cfg.seed)
    keys = float_keys(template)
    strategy = CheckpointingFedAvg(
        cfg, template, fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=cfg.min_results,
        min_available_clients=cfg.min_nodes, initial_parameters=ndarrays_to_parameters(to_arrays(template, keys)),
        on_fit_config_fn=lambda r: dict(round_config(cfg, r)), fit_metrics_aggregation_fn=_weighted)
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=cfg.rounds), strategy=strategy)
    workflow = DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(
        num_shares=cfg.secagg_num_shares, reconstruction_threshold=cfg.secagg_reconstruction_threshold,
        clipping_range=cfg.secagg_clip, timeout=cfg.round_timeout_s))
    t0 = time.perf_counter()
    workflow(grid, legacy)
    final = legacy.state.array_records["parameters"].to_numpy_ndarrays()
    state = from_arrays(template, final)
    save_final_model(state_dir / "model.pt", state, cfg, tokenizer_dir)
    summary = {"rounds": strategy.history, "completed": len(strategy.history), "resumed_after": 0,
               "model": str(state_dir / "model.pt"), "seconds": time.perf_counter() - t0, "secagg": True,
               "config": asdict(cfg)}
    (state_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
