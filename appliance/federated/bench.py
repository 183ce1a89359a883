"""`rfm bench fed`: seconds per round split into local training, transfer and aggregation, and bytes
per round, for a federation of real processes (SuperLink + SuperNodes, TLS, node auth) on loopback.

The full-size model is GreenRFM (r3d_18 vision, 33M parameters) with a BERT-base text encoder
(110M, CXR-BERT's shape, random weights built here: nothing is downloaded), as a consortium with
CXR-BERT would train it. The split of a round:

- local training: the slowest site's own training time (what the sites report);
- transfer and overhead: the rest of the train phase (weights down and up, serialisation, Flower's
  polling, and starting the ClientApp process that imports torch);
- aggregation: the strategy's weighted mean at the coordinator;
- evaluation: the cross-site evaluation round (weights down again, each site scores them).
Bytes: what the SuperLink counted for the run (in + out), divided by the rounds.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from appliance.errors import ApplianceError
from appliance.federated.deploy import CONNECTION


def _bert_base_folder(folder: Path, model) -> str:
    """A CXR-BERT-shaped BERT with random weights and the consortium tokenizer, in `folder`."""
    from transformers import BertConfig, BertModel
    from transformers.utils import logging as hf_logging

    from appliance.bench import BERT_BASE

    hf_logging.disable_progress_bar()  # the bars would draw over the CLI's status line
    from appliance.federated.local import _tokenizer_corpus
    from appliance.models import build_site_tokenizer

    tokenizer = build_site_tokenizer(_tokenizer_corpus(model.findings), max_length=model.text_max_tokens)
    tokenizer.save(folder)
    config = BertConfig(**{**BERT_BASE, "vocab_size": max(BERT_BASE["vocab_size"], tokenizer.vocab_size)})
    BertModel(config, add_pooling_layer=False).save_pretrained(str(folder))
    return str(folder)


def bench_fed(sites: int = 3, rounds: int = 1, studies: int = 8, variant: str = "standard", text: str = "bert-base",
              embed_dim: int = 768, workdir: Path | None = None, note=lambda msg: None) -> dict:
    import torch

    from appliance.federated.certs import make_consortium
    from appliance.federated.demo import FedDemoSettings, prepare_site
    from appliance.federated.deploy import Federation, write_app
    from appliance.federated.local import ConsortiumModel, initial_state

    if text not in ("bert-base", "tiny"):
        raise ValueError("text: bert-base or tiny")
    tmp = tempfile.TemporaryDirectory(prefix="rfm-bench-fed-") if workdir is None else None
    root = Path(workdir or tmp.name)
    try:
        names = [f"site-{i + 1}" for i in range(sites)]
        note(f"preparing {sites} site workspaces")
        settings = FedDemoSettings(studies_per_site=studies)
        workspaces = {n: prepare_site(root / "sites", n, 31 * (i + 1), settings) for i, n in enumerate(names)}
        model = ConsortiumModel(variant=variant, embed_dim=embed_dim, text_max_tokens=96)
        if text == "bert-base":
            model = ConsortiumModel(variant=variant, embed_dim=embed_dim, text_max_tokens=96,
                                    text_model_dir=_bert_base_folder(root / "bert-base", model))
        state = initial_state(model, root / "server" / "tokenizer")
        params = {part: sum(v.numel() for k, v in state.items() if k.startswith(part + ".") and v.is_floating_point())
                  for part in ("vision", "text")}
        params["total"] = sum(v.numel() for v in state.values() if v.is_floating_point())
        model_mb = sum(v.numel() * v.element_size() for v in state.values()) / 2**20
        del state
        files = make_consortium(root / "certs", hosts=["localhost"], sites=names)
        run_config = {"state-dir": str(root / "server"), "rounds": rounds, "min-nodes": sites, "min-results": sites,
                      "local-epochs": 1, "variant": model.variant, "embed-dim": model.embed_dim,
                      "text-max-tokens": model.text_max_tokens, "text-model-dir": model.text_model_dir or "",
                      "round-timeout-s": 3600.0, "tracking": False}
        t0 = time.perf_counter()
        with Federation.for_consortium(root / "coordinator", files) as fed:
            fed.start_sites(workspaces, files, threads=max(1, (torch.get_num_threads() or 1) // sites))
            note(f"{sites} SuperNodes online; running {rounds} round(s)")
            run_id = fed.submit(write_app(root / "app"), run_config)
            status = fed.wait_run(run_id, timeout=3600.0 * (rounds + 1))
            traffic = _traffic(fed, run_id)
        if not status.startswith("finished:completed"):
            raise ApplianceError(f"benchmark run ended {status}")
        history = json.loads((root / "server" / "rounds.json").read_text())
        per_round = []
        for r in history:
            t = r["timing"]
            per_round.append({"round": r["round"], "seconds": r["seconds"], "local_training_s": t["local_train_max"],
                              "transfer_and_overhead_s": max(0.0, t["train_phase"] - t["local_train_max"]),
                              "aggregation_s": t["aggregate"], "evaluation_round_s": t["evaluate_phase"]})
        return {"sites": sites, "rounds": rounds, "model": {"variant": variant, "text": text, "parameters": params,
                                                            "state_dict_mb": model_mb},
                "per_round": per_round,
                "bytes_per_round": {k: v / rounds for k, v in traffic.items()},
                "wall_seconds": time.perf_counter() - t0,
                "notes": ["transport: HTTPS on 127.0.0.1 (TLS on, node authentication on)",
                          "local training = the slowest site's own training time; transfer and overhead = the rest "
                          "of the train phase (weights both ways, serialisation, polling, ClientApp start-up)",
                          "bytes = the SuperLink's count for the run (train and evaluation messages)"]}
    finally:
        if tmp is not None:
            tmp.cleanup()


def _traffic(fed, run_id: int) -> dict[str, float]:
    cp = fed.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json", check=False)
    try:
        t = json.loads(cp.stdout)["runs"][0]["network-traffic"]
        return {"in": float(t["inbound-bytes"]), "out": float(t["outbound-bytes"]), "total": float(t["total-bytes"])}
    except (ValueError, KeyError, IndexError):
        return {}
