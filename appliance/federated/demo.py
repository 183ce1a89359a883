"""`rfm fed demo`: a whole consortium on one machine, so sites can see federation work before joining.

Each site gets its own synthetic cohort (its own seed) taken through ingest, de-identification,
preprocessing and labels in its own workspace; a CA, a server certificate and one key per site are
made; a SuperLink (TLS, node authentication) and one SuperNode per site start on 127.0.0.1; the
rounds run; per-round and per-site metrics are printed and written as JSON, with the untrained
model's zero-shot AUC at each site for comparison.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from appliance.demo import fresh_demo_dir
from appliance.errors import ApplianceError
from appliance.federated.certs import make_consortium
from appliance.federated.deploy import Federation, write_app
from appliance.federated.local import ConsortiumModel, initial_state, local_evaluate
from appliance.workspace import init_workspace

DEMO_MARKER = ".rfm-fed-demo"


@dataclass
class FedDemoSettings:
    sites: int = 3
    rounds: int = 2
    studies_per_site: int = 24
    matrix: int = 48
    slices: int = 24
    local_epochs: int = 2
    strategy: str = "fedavg"
    seed: int = 0
    round_timeout_s: float = 900.0
    tracking: bool = True


# Small enough for a 2-core CPU: volumes at 8 mm, a lite model with a 32-d embedding.
SITE_SETTINGS = {
    "preprocess": {"spacing_mm": [8.0, 8.0, 10.0], "canvas": [48, 48, 32], "workers": 1},
    "deid": {"ocr": "off", "workers": 1},
    "train": {"crop": [40, 40, 28], "val_fraction": 0.0, "test_fraction": 0.3, "text_max_tokens": 96,
              "stage1": {"vision_lr": 1e-3, "text_lr": 3e-4},
              "plan": {"micro_batch": 4, "grad_accumulation": 1, "dataloader_workers": 0}},
    "tracking": {"enabled": False},
}
DEMO_MODEL = ConsortiumModel(variant="lite", embed_dim=32, text_max_tokens=96)


def prepare_site(root: Path, name: str, seed: int, settings: FedDemoSettings) -> Path:
    """A site workspace with its own synthetic cohort, taken through every stage before training."""
    from appliance.deid.stage import deidentify_workspace
    from appliance.ingest import ingest_folder
    from appliance.labels.stage import label_workspace
    from appliance.preprocess.stage import preprocess_workspace
    from appliance.synthetic import generate_cohort

    cohort = generate_cohort(root / f"{name}-cohort", n_studies=settings.studies_per_site, seed=seed,
                             matrix=settings.matrix, slices=settings.slices, enrich_findings=1.5, conspicuity=2.5)
    ws = init_workspace(root / name, name)
    cfg = yaml.safe_load(ws.config_path.read_text()) or {}
    for section, values in SITE_SETTINGS.items():
        cfg.setdefault(section, {}).update(values)
    ws.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    ws.config()
    ingest_folder(ws, cohort.dicom_dir)
    deidentify_workspace(ws)
    preprocess_workspace(ws)
    label_workspace(ws)
    return ws.root


def run_fed_demo(directory: Path, settings: FedDemoSettings = FedDemoSettings(), *, note=print) -> dict:
    t0 = time.perf_counter()
    root = fresh_demo_dir(directory, DEMO_MARKER, "rfm fed demo")
    names = [f"site-{chr(ord('a') + i)}" for i in range(settings.sites)]
    note(f"preparing {settings.sites} site workspaces ({settings.studies_per_site} synthetic studies each)")
    sites = {name: prepare_site(root / "sites", name, settings.seed + 101 * (i + 1), settings)
             for i, name in enumerate(names)}
    t_sites = time.perf_counter() - t0
    files = make_consortium(root / "certs", hosts=["127.0.0.1", "localhost"], sites=names)

    model = DEMO_MODEL
    start = initial_state(model, root / "server" / "tokenizer", seed=settings.seed)
    untrained = {name: local_evaluate(ws, start, model=model).metrics for name, ws in sites.items()}

    run_config = {"state-dir": str(root / "server"), "rounds": settings.rounds, "strategy": settings.strategy,
                  "min-nodes": settings.sites, "min-results": max(1, settings.sites - 1),
                  "local-epochs": settings.local_epochs, "variant": model.variant, "embed-dim": model.embed_dim,
                  "text-max-tokens": model.text_max_tokens, "seed": settings.seed,
                  "round-timeout-s": settings.round_timeout_s, "tracking": settings.tracking}
    t1 = time.perf_counter()
    with Federation.for_consortium(root / "coordinator", files) as fed:
        fed.start_sites(sites, files, threads=1)
        note(f"SuperLink on {fed.address} (TLS, node authentication); {settings.sites} SuperNodes online")
        run_id = fed.submit(write_app(root / "app"), run_config)
        status = fed.wait_run(run_id, timeout=settings.round_timeout_s * (settings.rounds + 1))
        if not status.startswith("finished:completed"):
            tail = fed.server_log(run_id).strip().splitlines()[-5:]
            raise ApplianceError(f"federated run {run_id} ended {status}: {' | '.join(tail)[-400:]}")
    t_run = time.perf_counter() - t1
    summary = json.loads((root / "server" / "summary.json").read_text())
    result = {"sites": names, "rounds": summary["rounds"], "untrained": untrained, "run_id": run_id,
              "model": summary["model"], "seconds": {"sites": t_sites, "federation": t_run,
                                                     "total": time.perf_counter() - t0}}
    (root / "fed-demo-summary.json").write_text(json.dumps(result, indent=1) + "\n")
    return result
