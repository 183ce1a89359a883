"""`rfm receive` and `rfm serve`: the two long-running services of a site (registered in appliance/cli.py)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from appliance.errors import ApplianceError

console = Console()
WorkspaceOpt = Annotated[Path, typer.Option("--workspace", "-w", envvar="RFM_WORKSPACE",
                                            help="Site workspace folder (or $RFM_WORKSPACE).")]


def _service_logging() -> None:
    """One line per event on stderr (journald / docker logs); the appliance never logs PHI."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in ("httpx", "httpcore"):  # one line per HTTP request to Prefect's API
        logging.getLogger(chatty).setLevel(logging.WARNING)


def configure_prefect(ws) -> str:
    """Point Prefect at the site's server (workflow.prefect_api_url) or its local API; call before
    Prefect is imported. Returns the API in words."""
    from appliance.workflow import prepare_prefect_env

    url = ws.config().workflow.prefect_api_url
    if url and not os.environ.get("PREFECT_API_URL"):
        os.environ["PREFECT_API_URL"] = url
    prepare_prefect_env(ws.root)
    return os.environ.get("PREFECT_API_URL") or f"Prefect's local API (state in {ws.root / 'runs' / 'prefect'})"


PortOpt = Annotated[Optional[int], typer.Option(min=0, max=65535, help="DICOM port (default: receiver.port).")]
BindOpt = Annotated[Optional[str], typer.Option(help="Address to listen on (default: receiver.bind).")]
PoolOpt = Annotated[Optional[str], typer.Option(help="Work pool for --worker (default: workflow.work_pool).")]


def receive(workspace: WorkspaceOpt = Path("."), port: PortOpt = None, bind: BindOpt = None) -> None:
    """Receive studies from the PACS (DICOM C-STORE, C-ECHO) and reports (HTTP, drop folder) until Ctrl-C."""
    from appliance.receive import serve_receiver
    from appliance.workspace import open_workspace

    ws = open_workspace(workspace)
    settings = ws.config().receiver
    settings = settings.model_copy(update={k: v for k, v in (("port", port), ("bind", bind)) if v is not None})
    _service_logging()

    def started(handle) -> None:
        host, p = handle.address
        callers = ("any caller (allow_any)" if settings.allow_any else
                   f"{len(settings.allowed_callers)} allowed caller(s)" if settings.allowed_callers else
                   "[red]no allowed caller: every association is refused[/red] (set receiver.allowed_callers)")
        console.print(f"receiving as AE [bold]{settings.ae_title}[/bold] on {host}:{p} "
                      f"(TLS {'on' if settings.tls else 'off'}); {callers}")
        console.print(f"  reports: {handle.report_url + '/reports' if handle.report_url else 'HTTP endpoint off'}"
                      f"; drop folder: {settings.report_drop or 'off'}")
        console.print(f"  a study is ingested {settings.quiet_period_s:g} s after its last instance; Ctrl-C stops")

    handle = serve_receiver(ws, settings, on_start=started)
    s = handle.stats
    console.print(f"stopped: {s['associations']} associations, {s['stored']} instances stored, "
                  f"{s['failed']} quarantined, {s['refused']} callers refused")


def serve(workspace: WorkspaceOpt = Path("."), pool: PoolOpt = None,
          worker: Annotated[bool, typer.Option("--worker", help="Register the deployments with the work pool on the "
                                               "Prefect server and work it, instead of serving in-process.")] = False
          ) -> None:
    """Run the scheduled jobs (nightly intake, retrain when enough new studies, weekly evaluation) until Ctrl-C."""
    from appliance.workspace import open_workspace

    ws = open_workspace(workspace)
    api = configure_prefect(ws)
    if worker and not os.environ.get("PREFECT_API_URL"):
        raise ApplianceError("--worker needs a Prefect server: set workflow.prefect_api_url in site.yaml "
                             "(or PREFECT_API_URL)")
    _service_logging()
    from flows.scheduled import run_worker, serve_schedules, site_deployments

    for d in site_deployments(ws.root):
        cron = d.schedules[0].schedule.cron if d.schedules else "-"
        console.print(f"  {d.flow_name}/{d.name}: cron '{cron}' ({ws.config().site.timezone})")
    if worker:
        name = pool or ws.config().workflow.work_pool
        console.print(f"working pool [bold]{name}[/bold] on {api}; Ctrl-C stops")
        run_worker(ws.root, name)
    else:
        console.print(f"serving in this process on {api}; Ctrl-C stops")
        serve_schedules(ws.root)
