"""The site's scheduled jobs as Prefect flows and deployments (prefect.yaml declares the same three):

- nightly-intake/nightly (02:00): received studies and reports -> ingest, de-identify,
  preprocess, label; only what is new is done (every stage skips finished items).
- retrain-if-enough/retrain-check (03:00): when at least N trainable studies arrived since the last
  model, train a new run continuing from its weights, holding the "gpu" concurrency slot (1).
- weekly-evaluation/weekly (Sunday 04:00): evaluate the newest model and write its report.

`rfm serve` serves them (in-process runner on Prefect's local API, or a Prefect server from
workflow.prefect_api_url), or works the site's work pool with `--worker`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency

from appliance.receive.landing import ingest_received
from appliance.train import latest_run, train_workspace
from appliance.train.continual import new_trainable_studies
from appliance.workspace import open_workspace
from flows.site import _progress, eval_task, intake, is_transient, retry_options

GPU_LIMIT = "gpu"
NIGHTLY, RETRAIN, WEEKLY = "nightly", "retrain-check", "weekly"


def ensure_gpu_limit(slots: int = 1) -> None:
    """The global concurrency limit every GPU job takes a slot of: created with `slots` if missing,
    left as the operator set it otherwise."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(GPU_LIMIT)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GPU_LIMIT, limit=slots))
            except ObjectAlreadyExists:
                pass  # another job created it first


@task(name="ingest-received", cache_policy=NO_CACHE, retry_condition_fn=is_transient)
def ingest_received_task(workspace: str) -> dict:
    """Studies quiet for receiver.quiet_period_s and queued reports -> the ingest stage."""
    return ingest_received(open_workspace(workspace), progress=_progress()).to_dict()


@task(name="continue-training", cache_policy=NO_CACHE, retry_condition_fn=is_transient)
def continue_training_task(workspace: str, init_from: str | None) -> dict:
    """A new run from `init_from`'s weights; an unfinished run (killed, retried) is resumed instead."""
    ws = open_workspace(workspace)
    if latest_run(ws, finished=False) is not None:
        return train_workspace(ws, resume=True, progress=_progress()).to_dict()
    return train_workspace(ws, init_from=Path(init_from) if init_from else None, progress=_progress()).to_dict()


@flow(name="nightly-intake", log_prints=False)
def nightly_intake(workspace: str) -> dict:
    """Ingest what the receiver spooled, then de-identify, preprocess and label what is new."""
    retry = retry_options(workspace)
    results = {"receive": ingest_received_task.with_options(**retry)(workspace)}
    results |= intake(workspace, None, False, retry)
    r = results["receive"]
    get_run_logger().info("nightly intake: %d studies ingested from the spool (%d waiting), %d series "
                          "de-identified, %d preprocessed, %d reports labelled", r["studies_ingested"],
                          r["studies_waiting"], results["deid"]["series_done"], results["preprocess"]["series_done"],
                          results["labels"]["labelled"])
    return results


@flow(name="retrain-if-enough", log_prints=False)
def retrain_if_enough(workspace: str, min_new_studies: int | None = None) -> dict:
    """Continue training from the newest model once `min_new_studies` (default:
    workflow.retrain_min_new_studies) trainable studies are new since it."""
    ws = open_workspace(workspace)
    threshold = min_new_studies or ws.config().workflow.retrain_min_new_studies
    previous = latest_run(ws, finished=True)
    new = new_trainable_studies(ws, previous)
    out = {"retrained": False, "new_studies": len(new), "min_new_studies": threshold,
           "previous_run": previous.name if previous else None}
    logger = get_run_logger()
    if len(new) < threshold:
        logger.info("%d trainable studies new since %s; retraining waits for %d", len(new),
                    previous.name if previous else "the start (no model yet)", threshold)
        return out
    logger.info("%d trainable studies new since %s: training%s", len(new),
                previous.name if previous else "the start", f" from {previous.name}" if previous else " from scratch")
    ensure_gpu_limit()
    with concurrency(GPU_LIMIT, occupy=1, strict=True):
        result = continue_training_task.with_options(**retry_options(workspace))(workspace,
                                                                          str(previous) if previous else None)
    return out | {"retrained": True, "run_dir": result["run_dir"], "resumed": result["resumed"],
                  "n_items": result["n_items"]}


@flow(name="weekly-evaluation", log_prints=False)
def weekly_evaluation(workspace: str) -> dict:
    """Evaluate the newest finished model (report in <run>/eval/) and keep a dated summary in runs/weekly/."""
    ws = open_workspace(workspace)
    run = latest_run(ws, finished=True)
    if run is None:
        get_run_logger().info("no finished training run yet: nothing to evaluate")
        return {"evaluated": False}
    ensure_gpu_limit()
    with concurrency(GPU_LIMIT, occupy=1, strict=True):
        result = eval_task.with_options(**retry_options(workspace))(workspace, str(run))
    out = ws.runs / "weekly"
    out.mkdir(parents=True, exist_ok=True)
    summary = {"date": time.strftime("%Y-%m-%d"), "run": run.name} | {
        k: result.get(k) for k in ("zero_shot_auc", "zero_shot_auc_ci", "classifier_auc", "recall",
                                   "linear_probe_auc", "n_test_studies", "report")}
    (out / f"{summary['date']}-{run.name}.json").write_text(json.dumps(summary, indent=1, default=str))
    get_run_logger().info("weekly evaluation of %s: zero-shot AUC %s on %s test studies", run.name,
                          result.get("zero_shot_auc"), result.get("n_test_studies"))
    return {"evaluated": True, **summary}


def site_deployments(workspace: str | Path, work_pool: str | None = None) -> list:
    """The three deployments with the site's schedules (workflow.*_cron, site.timezone)."""
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    ws = open_workspace(workspace)
    cfg = ws.config()
    tz, wf = cfg.site.timezone, cfg.workflow
    common = {"tags": ["rfm", f"site:{cfg.site.name}"], "entrypoint_type": EntrypointType.MODULE_PATH,
              "work_pool_name": work_pool, "concurrency_limit": 1}  # a slow night never overlaps the next
    root = str(ws.root)
    return [
        nightly_intake.to_deployment(NIGHTLY, schedules=[Cron(wf.nightly_cron, timezone=tz)],
                                     parameters={"workspace": root}, **common),
        retrain_if_enough.to_deployment(RETRAIN, schedules=[Cron(wf.retrain_cron, timezone=tz)],
                                        parameters={"workspace": root,
                                                    "min_new_studies": wf.retrain_min_new_studies}, **common),
        weekly_evaluation.to_deployment(WEEKLY, schedules=[Cron(wf.weekly_eval_cron, timezone=tz)],
                                        parameters={"workspace": root}, **common),
    ]


def start_local_api() -> str:
    """Start Prefect's local API server once for this process and the flow-run processes a runner
    spawns (they inherit PREFECT_API_URL). Left alone, each flow-run process would start its own
    temporary server over the same SQLite file: slower, and the two lock each other out."""
    import os

    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the instance Prefect's clients in this process use too
    server.start()
    os.environ["PREFECT_API_URL"] = server.api_url
    return server.api_url


def serve_schedules(workspace: str | Path) -> None:
    """Run the deployments in this process until Ctrl-C (Prefect's local API, or PREFECT_API_URL)."""
    import os

    from prefect import serve

    if not os.environ.get("PREFECT_API_URL"):
        start_local_api()
    # no pausing on shutdown: schedules stay on, and a local API stopping with this process is not asked to
    serve(*site_deployments(workspace), print_starting_message=False, pause_on_shutdown=False)


def run_worker(workspace: str | Path, pool: str) -> None:
    """Register the deployments with `pool` on the Prefect server and work the pool until Ctrl-C."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
    for deployment in site_deployments(workspace, work_pool=pool):
        deployment.apply(work_pool_name=pool)
    ensure_gpu_limit()

    async def work() -> None:
        async with ProcessWorker(work_pool_name=pool) as worker:
            await worker.start()

    asyncio.run(work())
