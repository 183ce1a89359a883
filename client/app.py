"""Flower ClientApp: a site's local round and its evaluation of the global model.

The SuperNode tells the app where the site's workspace is (`--node-config 'workspace="/srv/rfm/site"'`);
the work itself is `appliance.federated.local` (the appliance's own trainer). Only weights, example
counts and metrics leave the site.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from appliance.federated.local import ConsortiumModel, DpRound, local_evaluate, local_train, local_train_dp

app = ClientApp()


def _model(config) -> ConsortiumModel:
    return ConsortiumModel(variant=str(config["variant"]), embed_dim=int(config["embed-dim"]),
                           text_max_tokens=int(config["text-max-tokens"]), norm=str(config["norm"]),
                           text_model_dir=str(config.get("text-model-dir", "")) or None)


def _site(context: Context) -> tuple[str, str]:
    workspace = str(context.node_config["workspace"])
    return workspace, str(context.node_config.get("site", f"node-{context.node_id}"))


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    workspace, site = _site(context)
    state = msg.content["arrays"].to_torch_state_dict()
    if bool(config.get("dp", False)):
        dp = DpRound(target_epsilon=float(config["dp-target-epsilon"]), delta=float(config["dp-delta"]),
                     max_grad_norm=float(config["dp-max-grad-norm"]), total_epochs=int(config["dp-total-epochs"]))
        result = local_train_dp(workspace, state, model=_model(config), dp=dp, epochs=int(config["local-epochs"]),
                                phase=str(config["phase"]))
    else:
        result = local_train(workspace, state, model=_model(config), run_id=str(config["run-name"]),
                             server_round=int(config["server-round"]), phase=str(config["phase"]),
                             epochs=int(config["local-epochs"]), proximal_mu=float(config.get("proximal-mu", 0.0)))
    metrics = MetricRecord({**result.metrics, "num-examples": result.num_examples})
    return Message(RecordDict({"arrays": ArrayRecord(result.state), "metrics": metrics,
                               "site": ConfigRecord({"name": site})}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    workspace, site = _site(context)
    result = local_evaluate(workspace, msg.content["arrays"].to_torch_state_dict(), model=_model(config))
    metrics = MetricRecord({**result.metrics, "num-examples": result.num_examples})
    return Message(RecordDict({"metrics": metrics, "site": ConfigRecord({"name": site})}), reply_to=msg)
