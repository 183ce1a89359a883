"""The site pipeline as a Prefect flow: one task per stage, each calling the same plain stage
function the CLI calls.

Run it with `rfm demo` or `rfm run`, or from Python after `prepare_prefect_env(workspace)`.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError

from appliance.deid.stage import deidentify_workspace
from appliance.distill.stage import distill_workspace
from appliance.evaluate.stage import evaluate_run
from appliance.export import export_run
from appliance.ingest import ingest_folder
from appliance.labels.stage import label_workspace
from appliance.preprocess.stage import preprocess_workspace
from appliance.progress import LogProgress, default_progress
from appliance.train import latest_run, train_workspace
from appliance.workspace import open_workspace


def is_transient(task, task_run, state) -> bool:
    """Retry disk and database hiccups; bad input and bugs are not retried."""
    try:
        state.result()
    except (OSError, sqlite3.OperationalError):
        return True
    except BaseException:
        return False
    return False


def _progress():
    """The CLI's bars when it set them, else the Prefect run logger (a plain logger when a task's
    function is called outside a flow run)."""
    if default_progress() is not None:
        return default_progress()
    try:
        return LogProgress(get_run_logger())
    except MissingContextError:
        return LogProgress()


@task(name="ingest", cache_policy=NO_CACHE, retry_condition_fn=is_transient)
def ingest_task(workspace: str, source: str, force: bool = False) -> dict:
    ws = open_workspace(workspace)
    return ingest_folder(ws, Path(source), force=force, progress=_progress()).to_dict()


@task(name="deid", cache_policy=NO_CACHE, retry_condition_fn=is_transient)
def deid_task(workspace: str, force: bool = False) -> dict:
    ws = open_workspace(workspace)
    return deidentify_workspace(ws, force=force, progress=_progress()).to_dict()


@task(name="labels", cache_policy=NO_CACHE, retry_condition_fn=is_transient)
def labels_task(workspace: str, force: bool = False) -> dict:
    ws = open_workspace(workspace)
    return label_workspace(ws, force=force, progress=_progress()).to_dict()


@task(name="preprocess", cache_policy=NO_CACHE, retry_condition_fn=is_transient)
def preprocess_task(workspace: str, force: bool = False) -> dict:
    ws = open_workspace(workspace)
    return preprocess_workspace(ws, force=force, progress=_progress()).to_dict()


@task(name="train", cache_policy=NO_CACHE, retry_condition_fn=is_transient)
def train_task(workspace: str) -> dict:
    """Train GreenRFM; an unfinished run (killed process, task retry) is resumed, not restarted."""
    ws = open_workspace(workspace)
    resume = latest_run(ws, finished=False) is not None
    return train_workspace(ws, resume=resume, progress=_progress()).to_dict()


@task(name="eval", cache_policy=NO_CACHE, retry_condition_fn=is_transient)
def eval_task(workspace: str, run_dir: str | None = None) -> dict:
    ws = open_workspace(workspace)
    return evaluate_run(ws, Path(run_dir) if run_dir else None, progress=_progress())


@task(name="distill", cache_policy=NO_CACHE, retry_condition_fn=is_transient)
def distill_task(workspace: str, run_dir: str | None = None, outcomes: str | None = None) -> dict:
    ws = open_workspace(workspace)
    return distill_workspace(ws, Path(run_dir) if run_dir else None, outcomes=Path(outcomes) if outcomes else None,
                             progress=_progress()).to_dict()


@task(name="pretrain", cache_policy=NO_CACHE, retry_condition_fn=is_transient)
def pretrain_task(workspace: str, objective: str | None = None) -> dict:
    """Continue pre-training the 2D encoder; an unfinished run (killed process, task retry) is resumed."""
    from appliance.train.pretrain import pretrain_workspace

    ws = open_workspace(workspace)
    resume = latest_run(ws, finished=False, kind="pretrain") is not None
    return pretrain_workspace(ws, resume=resume, objective=None if resume else objective,
                              progress=_progress()).to_dict()


@task(name="probe", cache_policy=NO_CACHE, retry_condition_fn=is_transient)
def probe_task(workspace: str, encoders: list[str] | None = None) -> dict:
    """Frozen-encoder probe: the open weights against the newest pre-training run (or the given ones)."""
    from appliance.evaluate.probe2d import probe_workspace

    ws = open_workspace(workspace)
    result = probe_workspace(ws, encoders or (), progress=_progress())
    return {k: result[k] for k in ("run_dir", "report_md", "baseline", "n_images", "seconds")} | {
        "macro": {name: e["metrics"]["macro"] for name, e in result["encoders"].items()}}


@task(name="export", cache_policy=NO_CACHE, retry_condition_fn=is_transient)
def export_task(workspace: str, run_dir: str | None = None) -> dict:
    ws = open_workspace(workspace)
    return export_run(ws, Path(run_dir) if run_dir else None, progress=_progress()).to_dict()


def retry_options(workspace: str) -> dict:
    cfg = open_workspace(workspace).config().workflow
    return {"retries": cfg.task_retries, "retry_delay_seconds": cfg.retry_delay_s}


def intake(workspace: str, source: str | None, force: bool, retry: dict) -> dict[str, dict]:
    """Ingest (when a source folder is given), de-identify, preprocess and label: both pipelines' start."""
    results: dict[str, dict] = {}
    if source is not None:
        results["ingest"] = ingest_task.with_options(**retry)(workspace, source, force)
    results["deid"] = deid_task.with_options(**retry)(workspace, force)
    results["preprocess"] = preprocess_task.with_options(**retry)(workspace, force)
    results["labels"] = labels_task.with_options(**retry)(workspace, force)
    return results


@flow(name="radiograph-pipeline", log_prints=False)
def radiograph_pipeline(workspace: str, source: str | None = None, force: bool = False,
                        objective: str | None = None) -> dict:
    """The 2D path: ingest (when a source folder is given), de-identify, preprocess and label the
    radiographs, continue pre-training the open-weight encoder, then probe it against the open weights."""
    retry = retry_options(workspace)
    results = intake(workspace, source, force, retry)
    results["pretrain"] = pretrain_task.with_options(**retry)(workspace, objective)
    results["probe"] = probe_task.with_options(**retry)(workspace, ["start", results["pretrain"]["run_dir"]])
    return results


@flow(name="site-pipeline", log_prints=False)
def site_pipeline(workspace: str, source: str | None = None, force: bool = False, train: bool = True,
                  outcomes: str | None = None) -> dict:
    """Ingest (when a source folder is given), de-identify, preprocess, label, then (unless
    train=False) train, evaluate, distil (task heads for the outcomes CSV, if any; full -> Lite
    when the run is the full model) and export; returns each stage's summary."""
    retry = retry_options(workspace)
    results = intake(workspace, source, force, retry)
    if train:
        results["train"] = train_task.with_options(**retry)(workspace)
        results["eval"] = eval_task.with_options(**retry)(workspace, results["train"]["run_dir"])
        results["distill"] = distill_task.with_options(**retry)(workspace, results["train"]["run_dir"], outcomes)
        results["export"] = export_task.with_options(**retry)(workspace, results["train"]["run_dir"])
    return results
