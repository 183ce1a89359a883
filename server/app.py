"""Flower ServerApp: the consortium's rounds (`appliance.federated.server.run_federation`).

Settings come from `flwr run --run-config` (see `FedRunConfig`); `rfm fed run` fills them in.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from appliance.federated.server import FedRunConfig, run_federation

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_federation(grid, FedRunConfig.from_run_config(dict(context.run_config)))
