"""Flower ClientApp for SecAgg+ runs (legacy client API with `secaggplus_mod`, as flwr 1.41 needs).

The local round is the same `appliance.federated.local.local_train` as in plain runs; the weights
leave the site masked by SecAgg+.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp

from appliance.federated.local import ConsortiumModel, consortium_tokenizer, initial_state, local_train, FED_DIR
from appliance.federated.secagg import float_keys, from_arrays, to_arrays
from appliance.workspace import open_workspace


class SiteClient(NumPyClient):
    def __init__(self, workspace: str, site: str):
        self.workspace, self.site = workspace, site

    def fit(self, parameters, config):
        model = ConsortiumModel(variant=str(config["variant"]), embed_dim=int(config["embed-dim"]),
                                text_max_tokens=int(config["text-max-tokens"]), norm=str(config["norm"]),
                                text_model_dir=str(config.get("text-model-dir", "")) or None)
        root = open_workspace(self.workspace).root
        template = initial_state(model, consortium_tokenizer(root / FED_DIR / "tokenizer", model))
        result = local_train(self.workspace, from_arrays(template, parameters), model=model,
                             run_id=str(config["run-name"]), server_round=int(config["server-round"]),
                             phase=str(config["phase"]), epochs=int(config["local-epochs"]))
        return to_arrays(result.state, float_keys(template)), result.num_examples, dict(result.metrics)


def client_fn(context: Context):
    return SiteClient(str(context.node_config["workspace"]),
                      str(context.node_config.get("site", context.node_id))).to_client()


app = ClientApp(client_fn=client_fn, mods=[secaggplus_mod])
