"""The `rfm` command line: thin wrappers over the stage functions, with rich progress and tables.

Errors print as one line; `--verbose` adds the traceback.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from appliance.errors import ApplianceError

DEMO_STUDIES = 360  # keep equal to appliance.demo.DEMO_STUDIES (not imported: the CLI starts fast)

console = Console()
err_console = Console(stderr=True)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Site appliance for center-specific radiology foundation models.")
bench_app = typer.Typer(no_args_is_help=True, help="Measure a stage: throughput, peak memory, peer ratio; writes JSON.")
app.add_typer(bench_app, name="bench")


def _add_fed_commands() -> None:
    from appliance.federated.cli import fed_app

    app.add_typer(fed_app, name="fed")


_add_fed_commands()


def _add_ops_commands() -> None:
    from appliance.ops_cli import register  # backup, backup-key, restore, retention, models

    register(app)


_add_ops_commands()


def _add_service_commands() -> None:
    from appliance.service_cli import receive, serve

    app.command("receive")(receive)
    app.command("serve")(serve)


_add_service_commands()

WorkspaceOpt = Annotated[Path, typer.Option("--workspace", "-w", envvar="RFM_WORKSPACE",
                                            help="Site workspace folder (or $RFM_WORKSPACE).")]


class RichProgress:
    """The Progress protocol (appliance.progress) drawn as rich bars; notes print above them."""

    def __init__(self, progress: Progress):
        self.bars = progress
        self.task = None

    def start(self, description: str, total: int | None) -> None:
        if self.task is not None:
            self.bars.update(self.task, visible=False)
        self.task = self.bars.add_task(description, total=total)

    def advance(self, n: int = 1) -> None:
        if self.task is not None:
            self.bars.advance(self.task, n)

    def note(self, message: str) -> None:
        self.bars.console.print(f"[yellow]![/yellow] {escape(message)}", highlight=False)


def progress_bars() -> Progress:
    return Progress(TextColumn("[bold]{task.description:<18}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console,
                    transient=False)


@app.callback()
def _root(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks on errors.")] = False) -> None:
    """Site appliance: ingest, de-identify, label, train, distil, evaluate and export."""


# --- init / doctor ------------------------------------------------------------------------------
@app.command()
def init(workspace: Annotated[Path, typer.Argument(help="Folder to create (or complete).")],
         site_name: Annotated[Optional[str], typer.Option(help="Site name in site.yaml.")] = None) -> None:
    """Create a site workspace: folders, a commented site.yaml and the catalog."""
    from appliance.workspace import STAGE_DIRS, init_workspace

    ws = init_workspace(workspace, site_name)
    console.print(f"[green]workspace ready[/green] at {ws.root}")
    console.print(f"  folders: {', '.join(STAGE_DIRS)}; settings: site.yaml; catalog: catalog.sqlite")
    console.print(f"  next: rfm ingest SRC -w {ws.root}")


@app.command()
def doctor(workspace: WorkspaceOpt = Path("."),
           as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
           quick: Annotated[bool, typer.Option("--quick", help="Only the fast workspace checks (no GPU, no torch); "
                                               "exit 1 if one fails: for service health checks.")] = False) -> None:
    """Check this machine: CPU, RAM, disk, GPUs (NVML) and the training profile they give."""
    from appliance.doctor import quick_checks, run_checks

    if quick:
        checks = quick_checks(workspace)
        if as_json:
            console.print_json(json.dumps({"checks": checks}))
        else:
            for name, ok, detail in checks:
                console.print(f"{name}: {'ok' if ok else 'problem'}: {detail}", highlight=False, markup=False,
                              soft_wrap=True)
        if not all(ok for _, ok, _ in checks):
            raise typer.Exit(1)
        return
    report = run_checks(workspace)
    if as_json:
        console.print_json(json.dumps(report, default=str))
        return
    hw, prof = report["hardware"], report["profile"]
    t = Table(title="Machine", show_header=False)
    t.add_row("CPU", f"{hw['cpu_model']} ({hw['cores_physical']} cores, {hw['cores_logical']} threads)")
    t.add_row("RAM", f"{hw['ram_gb']} GB")
    t.add_row("Disk free", f"{hw['disk_free_gb']} GB at {hw['disk_path']}")
    if hw["gpus"]:
        for g in hw["gpus"]:
            cc = ".".join(map(str, g["compute_capability"]))
            t.add_row(f"GPU {g['index']}", f"{g['name']}, {g['vram_gb']} GB, compute {cc}, driver {g['driver']}")
    else:
        t.add_row("GPU", f"no GPU ({hw['nvml_error'] or 'NVML reports none'})")
    console.print(t)
    p = Table(title=f"Training profile: {prof['name']}", show_header=False)
    for key in ("device", "variant", "micro_batch", "grad_accumulation", "effective_batch", "precision",
                "activation_checkpointing", "channels_last_3d", "dataloader_workers", "distributed"):
        p.add_row(key, str(prof[key]))
    p.add_row("why", "; ".join(prof["reasons"]))
    console.print(p)
    c = Table(title="Checks")
    c.add_column("check")
    c.add_column("result")
    for name, ok, detail in report["checks"]:
        c.add_row(name, ("[green]ok[/green] " if ok else "[red]problem[/red] ") + detail)
    console.print(c)


# --- synth / ingest / preprocess ---------------------------------------------------------------
@app.command()
def synth(out: Annotated[Path, typer.Argument(help="Folder to write the cohort into.")],
          studies: Annotated[int, typer.Option(min=1, help="Number of studies.")] = 20,
          seed: Annotated[int, typer.Option(help="Random seed (same seed, same files).")] = 0,
          matrix: Annotated[int, typer.Option(min=32, help="In-plane matrix.")] = 96,
          slices: Annotated[int, typer.Option(min=8, help="Slices per series.")] = 48,
          enrich: Annotated[float, typer.Option(min=0.0, max=4.0, help="Added to every finding's log-odds "
                                                "(0: realistic prevalences).")] = 0.0,
          conspicuity: Annotated[float, typer.Option(min=1.0, max=4.0, help="Draw findings this much larger "
                                                     "(1: realistic sizes; the demo uses more).")] = 1.0,
          prognosis: Annotated[bool, typer.Option("--prognosis", help="Add a 12-month outcome per study (image "
                                                  "findings + a clinical status only the report states) and "
                                                  "outcomes.csv.")] = False,
          cxr: Annotated[bool, typer.Option("--cxr", help="Chest radiographs (CR/DX, PA/AP/lateral, findings and "
                                            "lines/tubes) instead of chest CT.")] = False,
          size: Annotated[int, typer.Option(min=64, max=4096, help="With --cxr: detector matrix in pixels.")] = 256
          ) -> None:
    """Write a synthetic chest-CT (or, with --cxr, chest X-ray) cohort: DICOM, reports.jsonl, ground_truth.json."""
    from types import SimpleNamespace

    from appliance.synthetic import generate_cohort, generate_cxr_cohort

    with progress_bars() as bars:
        task = bars.add_task("synthesise", total=studies)
        if cxr:
            summary = SimpleNamespace(**generate_cxr_cohort(out, n_studies=studies, seed=seed, size=size,
                                                            progress=lambda k: bars.update(task, completed=k)))
        else:
            summary = generate_cohort(out, n_studies=studies, seed=seed, matrix=matrix, slices=slices,
                                      enrich_findings=enrich, conspicuity=conspicuity, prognosis=prognosis,
                                      progress=lambda k: bars.update(task, completed=k))
    t = Table(title="Synthetic cohort", show_header=False)
    t.add_row("studies", str(summary.n_studies))
    t.add_row("series", str(summary.n_series))
    t.add_row("DICOM files", str(summary.n_files))
    t.add_row("reports", str(summary.reports_path))
    t.add_row("ground truth", str(summary.ground_truth_path))
    t.add_row("seconds", f"{summary.seconds:.1f}")
    console.print(t)
    modalities = "  (set ingest.modalities: [CR, DX] in site.yaml first)" if cxr else ""
    console.print(f"ingest it with: rfm ingest {summary.dicom_dir} -w WORKSPACE{modalities}")


@app.command()
def ingest(source: Annotated[Path, typer.Argument(help="Folder of DICOM files (any names, zips ok).")],
           workspace: WorkspaceOpt = Path("."),
           reports: Annotated[Optional[Path], typer.Option(help="Report sidecar (JSONL/CSV).")] = None,
           force: Annotated[bool, typer.Option("--force", help="Redo series already ingested.")] = False,
           then: Annotated[Optional[bool], typer.Option(
               "--continue/--ingest-only",
               help="De-identify and preprocess afterwards (default: ingest.deid_and_preprocess).")] = None) -> None:
    """Ingest DICOM studies and their reports; quarantine bad input; then de-identify and preprocess."""
    from appliance.ingest import ingest_folder
    from appliance.workspace import open_workspace

    ws = open_workspace(workspace)
    with progress_bars() as bars:
        summary = ingest_folder(ws, source, reports=reports, force=force, progress=RichProgress(bars))
    print_ingest_summary(summary.to_dict())
    if then if then is not None else ws.config().ingest.deid_and_preprocess:
        _deid(ws, force=False)
        _preprocess(ws, force=False, workers=None)


deid_app = typer.Typer(no_args_is_help=False, invoke_without_command=True,
                       help="De-identify ingested series and reports (rfm deid), or audit the output (rfm deid audit).")
app.add_typer(deid_app, name="deid")


@deid_app.callback()
def deid(ctx: typer.Context, workspace: WorkspaceOpt = Path("."),
         force: Annotated[bool, typer.Option("--force", help="Redo what is already de-identified.")] = False) -> None:
    """De-identify every ingested series and report (Annex E profile, pixels, report text), audited."""
    if ctx.invoked_subcommand is not None:
        return
    from appliance.workspace import open_workspace

    _deid(open_workspace(workspace), force=force)


def _deid(ws, force: bool) -> None:
    from appliance.deid.stage import deidentify_workspace

    with progress_bars() as bars:
        summary = deidentify_workspace(ws, force=force, progress=RichProgress(bars))
    print_deid_summary(summary.to_dict())


@deid_app.command("audit")
def deid_audit(directory: Annotated[Optional[Path], typer.Argument(help="Folder to scan (default: the workspace's deid/).")] = None,
               workspace: WorkspaceOpt = Path(".")) -> None:
    """Re-scan de-identified output byte-wise for every removed value and PHI pattern; exit 1 on any hit."""
    from appliance.deid.stage import audit_output
    from appliance.workspace import open_workspace

    ws = open_workspace(workspace)
    with progress_bars() as bars:
        report = audit_output(ws, directory, progress=RichProgress(bars))
    t = Table(title="De-identification audit", show_header=False)
    t.add_row("files scanned", str(report.files_scanned))
    t.add_row("files with hits", str(report.files_with_hits))
    console.print(t)
    if not report.clean:
        h = Table(title="Hits (values are never shown; the hash tells equal values apart)")
        for col in ("file", "kind", "encoding", "value hash"):
            h.add_column(col)
        for hit in report.hits[:50]:
            h.add_row(hit["file"], hit["kind"], hit["encoding"], hit["value_hash"])
        console.print(h)
        raise ApplianceError(f"audit failed: {len(report.hits)} hit(s) in {report.files_with_hits} file(s)")
    console.print("[green]audit clean[/green]: no removed value or PHI pattern found")


def print_deid_summary(s: dict) -> None:
    t = Table(title="De-identify", show_header=False)
    t.add_row("series written", f"{s['series_done']} ({s['files_written']} files, "
                                f"{s['files_pixels_cleaned']} with burned-in text blanked)")
    t.add_row("already done", str(s["series_skipped"]))
    t.add_row("quarantined for review", f"{s['series_quarantined']} series, {s['reports_quarantined']} reports")
    t.add_row("reports written", f"{s['reports_done']} ({s['reports_skipped']} already done)")
    t.add_row("audit hits", str(s["audit_hits"]))
    t.add_row("seconds", f"{s['seconds']:.1f}")
    console.print(t)


@app.command("preprocess")
def preprocess_cmd(workspace: WorkspaceOpt = Path("."),
                   force: Annotated[bool, typer.Option("--force", help="Redo series already cached.")] = False,
                   workers: Annotated[Optional[int], typer.Option(min=1, help="Worker processes.")] = None) -> None:
    """Turn every de-identified series into a training-ready volume in cache/."""
    from appliance.workspace import open_workspace

    _preprocess(open_workspace(workspace), force=force, workers=workers)


def _preprocess(ws, force: bool, workers: int | None) -> None:
    from appliance.preprocess.stage import preprocess_workspace

    with progress_bars() as bars:
        summary = preprocess_workspace(ws, force=force, workers=workers, progress=RichProgress(bars))
    print_preprocess_summary(summary.to_dict())


def print_ingest_summary(s: dict) -> None:
    t = Table(title="Ingest", show_header=False)
    t.add_row("files seen", str(s["files_seen"]))
    t.add_row("accepted", f"{s['files_accepted']} files in {s['series_accepted']} series "
                          f"({s['bytes_accepted'] / 2**20:.1f} MiB), {s['studies_touched']} studies")
    t.add_row("quarantined", _counts(s["quarantined"]))
    t.add_row("skipped", _counts(s["skipped"]))
    t.add_row("reports", f"{s['reports_linked']} linked, {s['reports_pending']} waiting for images, "
                         f"{s['studies_without_report']} studies without report")
    t.add_row("seconds", f"{s['seconds']:.1f}")
    console.print(t)


def print_preprocess_summary(s: dict) -> None:
    t = Table(title="Preprocess", show_header=False)
    t.add_row("series cached", str(s["series_done"]))
    t.add_row("already cached", str(s["series_skipped"]))
    t.add_row("quarantined", str(s["series_quarantined"]))
    t.add_row("failed (re-run to retry)", str(s["series_failed"]))
    t.add_row("waiting for de-identification", str(s["series_waiting_for_deid"]))
    t.add_row("seconds", f"{s['seconds']:.1f}")
    console.print(t)


def _counts(d: dict[str, int]) -> str:
    total = sum(d.values())
    return f"{total}" + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(d.items()))})" if d else "")


# --- labels ------------------------------------------------------------------------------------
labels_app = typer.Typer(no_args_is_help=False, invoke_without_command=True,
                         help="Turn reports into 1/0/-1 labels per finding (rules or a local LLM).")
app.add_typer(labels_app, name="labels")
review_app = typer.Typer(no_args_is_help=True, help="Reports waiting for a radiologist: list, export, import.")
labels_app.add_typer(review_app, name="review")


@labels_app.callback()
def labels(ctx: typer.Context, workspace: WorkspaceOpt = Path("."),
           force: Annotated[bool, typer.Option("--force", help="Label again, ignoring the cache.")] = False) -> None:
    """Label every de-identified report of the workspace with the extractor(s) in site.yaml."""
    if ctx.invoked_subcommand is not None:
        return
    from appliance.workspace import open_workspace

    _labels(open_workspace(workspace), force=force)


def _labels(ws, force: bool) -> None:
    from appliance.labels.stage import label_workspace

    with progress_bars() as bars:
        summary = label_workspace(ws, force=force, progress=RichProgress(bars))
    print_labels_summary(summary.to_dict())


def print_labels_summary(s: dict) -> None:
    t = Table(title="Labels", show_header=False)
    t.add_row("reports", str(s["reports"]))
    t.add_row("labelled now", f"{s['labelled']} ({s['retried']} needed retries)")
    t.add_row("from cache", str(s["from_cache"]))
    t.add_row("queued for review", f"{s['queued']} failed extraction, {s['disagreements_queued']} disagreements")
    t.add_row("resolved by review", str(s["resolved_by_review"]))
    t.add_row("findings kept", f"{len(s['findings_kept'])}" + (f" (dropped by consensus: {', '.join(s['findings_dropped'])})"
                                                                 if s["findings_dropped"] else ""))
    t.add_row("seconds", f"{s['seconds']:.1f}")
    console.print(t)


@labels_app.command("extract")
def labels_extract(reports: Annotated[Path, typer.Option(help="JSONL: one object per line with id and text.")],
                   out: Annotated[Path, typer.Option(help="CSV to write: id + one column per finding.")],
                   vocabulary: Annotated[str, typer.Option(help="Built-in name or YAML file.")] = "ct_rate_18",
                   backend: Annotated[str, typer.Option(help="rules, openai or transformers.")] = "rules",
                   base_url: Annotated[str, typer.Option(help="openai: server URL.")] = "http://127.0.0.1:8000/v1",
                   model: Annotated[str, typer.Option(help="openai: model name.")] = "",
                   model_dir: Annotated[Optional[Path], typer.Option(help="transformers: local model folder.")] = None,
                   max_in_flight: Annotated[int, typer.Option(min=1, help="openai: requests in flight.")] = 16,
                   attempts: Annotated[int, typer.Option(min=1, help="Attempts per report.")] = 3) -> None:
    """Label a plain JSONL file of reports outside any workspace (cached next to --out, resumable)."""
    from appliance.labels.standalone import extract_file

    with progress_bars() as bars:
        result = extract_file(reports, out, vocabulary=vocabulary, backend=backend, base_url=base_url, model=model,
                              model_dir=model_dir, max_in_flight=max_in_flight, attempts=attempts,
                              progress=RichProgress(bars))
    t = Table(title="labels extract", show_header=False)
    for k in ("reports", "labelled", "from_cache", "retried", "queued", "bad_lines"):
        t.add_row(k, str(result[k]))
    t.add_row("written", str(out))
    console.print(t)


@labels_app.command("eval")
def labels_eval(gold: Annotated[Path, typer.Option(help="CSV of reference labels (id + findings).")],
                pred: Annotated[Path, typer.Option(help="CSV of labels to judge (id + findings).")],
                out: Annotated[Path, typer.Option(help="Folder for agreement.json and confusion PNGs.")] = Path("labels-eval"),
                vocabulary: Annotated[str, typer.Option(help="Built-in name or YAML file.")] = "ct_rate_18") -> None:
    """Agreement of labels with a reference: kappa, accuracy, P, R, F1 per finding and macro, 3 protocols."""
    from appliance.labels.standalone import evaluate_files

    result = evaluate_files(gold, pred, out, vocabulary)
    t = Table(title=f"Agreement on {result['n_reports']} reports")
    for col in ("protocol", "kappa", "accuracy", "precision", "recall", "F1"):
        t.add_column(col)
    for protocol, r in result["protocols"].items():
        m = r["macro"]
        t.add_row(protocol, *(("-" if m.get(k) is None else f"{m[k]:.3f}")
                              for k in ("kappa", "accuracy", "precision", "recall", "f1")))
    console.print(t)
    console.print(f"per-finding tables and confusion matrices in {out}")


@review_app.command("list")
def review_list(workspace: WorkspaceOpt = Path("."),
                all_: Annotated[bool, typer.Option("--all", help="Include resolved items.")] = False) -> None:
    """Reports waiting for review, and why."""
    from appliance.labels.stage import review_items
    from appliance.workspace import open_workspace

    items = review_items(open_workspace(workspace), include_resolved=all_)
    t = Table(title=f"Label review queue ({len(items)})")
    for col in ("study", "source", "reason", "queued", "resolved"):
        t.add_column(col)
    for i in items:
        t.add_row(i["study_key"], i["source"], i["reason"], i["created_at"], i["resolved_at"] or "")
    console.print(t)


@review_app.command("export")
def review_export(out: Annotated[Path, typer.Argument(help="CSV to write.")], workspace: WorkspaceOpt = Path(".")) -> None:
    """Write the queue as a CSV (de-identified report text + a column per finding) for a radiologist."""
    from appliance.labels.stage import export_review
    from appliance.workspace import open_workspace

    n = export_review(open_workspace(workspace), out)
    console.print(f"{n} report(s) written to {out}; fill every finding with 1, 0 or -1 and import it back")


@review_app.command("import")
def review_import(path: Annotated[Path, typer.Argument(help="The filled-in CSV.")], workspace: WorkspaceOpt = Path(".")) -> None:
    """Load a radiologist's labels back; labels.csv is rewritten with them."""
    from appliance.labels.stage import import_review
    from appliance.workspace import open_workspace

    ws = open_workspace(workspace)
    n = import_review(ws, path)
    console.print(f"{n} report(s) resolved")
    _labels(ws, force=False)


# --- status / quarantine -----------------------------------------------------------------------
# --- train / eval ------------------------------------------------------------------------------
@app.command()
def train(workspace: WorkspaceOpt = Path("."),
          resume: Annotated[bool, typer.Option("--resume", help="Continue the newest unfinished run.")] = False) -> None:
    """Train GreenRFM (stage 1 supervised, stage 2 alignment) with the hardware plan `rfm doctor` shows."""
    from appliance.workspace import open_workspace

    _train(open_workspace(workspace), resume=resume)


def _train(ws, resume: bool) -> dict:
    from appliance.train import train_workspace

    with progress_bars() as bars:
        result = train_workspace(ws, resume=resume, progress=RichProgress(bars)).to_dict()
    print_train_summary(result)
    return result


def print_train_summary(r: dict) -> None:
    plan = r["plan"]
    t = Table(title="Train")
    for col in ("phase", "epochs", "optimiser steps", "samples/s", "last losses", "validation"):
        t.add_column(col)
    for p in r["phases"]:
        losses = ", ".join(f"{k} {v:.3f}" for k, v in p["last_losses"].items())
        val = ", ".join(f"{k} {v:.3f}" for k, v in (p.get("val") or {}).items() if v is not None)
        t.add_row(p["name"], str(p["epochs"]), str(p["steps"]), f"{p['samples_per_s']:.2f}", losses, val or "-")
    console.print(t)
    energy = r["energy"]
    kwh = energy.get("total_kwh")
    console.print(f"plan {plan['name']}: {plan['variant']}, micro-batch {plan['micro_batch']} x {plan['grad_accumulation']}"
                  f" accumulation, {plan['precision']} on {plan['device']}"
                  + (f"; {r['oom_backoffs']} out-of-memory back-offs" if r["oom_backoffs"] else ""))
    console.print(f"studies: {r['n_items']['train']} train, {r['n_items']['val']} val, {r['n_items']['test']} test series; "
                  f"{len(r['findings'])} findings; {r['seconds']:.0f} s"
                  + (f"; energy {kwh:.4f} kWh ({energy['co2e_g']:.1f} g CO2e)" if kwh is not None else
                     f"; energy not measured ({energy['gpu_method']})"))
    if r.get("skipped"):
        console.print("[yellow]![/yellow] series left out: " + ", ".join(f"{k}: {v}" for k, v in r["skipped"].items())
                      + " (rebuild them with `rfm preprocess --force`)")
    console.print(f"model: {r['model_path']}" + (f"  (MLflow run {r['mlflow_run_id']})" if r["mlflow_run_id"] else ""))


@app.command("eval")
def eval_cmd(workspace: WorkspaceOpt = Path("."),
             run: Annotated[Optional[Path], typer.Option(help="Run folder (default: newest finished run).")] = None) -> None:
    """Zero-shot AUC, retrieval R@K, linear probe and bootstrap CIs on the held-out test studies."""
    from appliance.workspace import open_workspace

    _eval(open_workspace(workspace), run)


def _eval(ws, run: Path | None) -> dict:
    from appliance.evaluate.stage import evaluate_run

    with progress_bars() as bars:
        result = evaluate_run(ws, run, progress=RichProgress(bars))
    print_eval_summary(result)
    return result


def print_eval_summary(r: dict) -> None:
    t = Table(title="Evaluation (held-out test studies)", show_header=False)
    lo, hi = r["zero_shot_auc_ci"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"
    t.add_row("zero-shot mean AUC", fmt(r["zero_shot_auc"]) + (f" [95% CI {lo:.3f}-{hi:.3f}]" if lo is not None else "")
              + f" over {r['findings_scored']} findings")
    t.add_row("zero-shot AUC per prompt pair", ", ".join(fmt(v) for v in r["prompt_pairs"]))
    t.add_row("shared-classifier AUC", fmt(r["classifier_auc"]))
    t.add_row("linear-probe AUC", fmt(r["linear_probe_auc"]))
    t.add_row("report->volume recall", ", ".join(f"R@{k} {v:.2f} (random {r['random_recall'][k]:.2f})"
                                                 for k, v in r["recall"].items()))
    t.add_row("test studies", str(r["n_test_studies"]))
    t.add_row("report", r["report"].get("markdown", "-"))
    console.print(t)


@app.command("distill")
def distill_cmd(workspace: WorkspaceOpt = Path("."),
                run: Annotated[Optional[Path], typer.Option(help="Training run whose encoder is used (default: newest finished).")] = None,
                outcomes: Annotated[Optional[Path], typer.Option(help="CSV of per-study outcomes (accession_number or study_instance_uid + target columns).")] = None,
                target: Annotated[Optional[list[str]], typer.Option(help="Outcome column(s) to model (default: all).")] = None,
                seeds: Annotated[Optional[int], typer.Option(min=1, max=20, help="Seeds per method (default: site.yaml).")] = None,
                encoder: Annotated[Optional[str], typer.Option(help="Full -> Lite encoder distillation: auto, on or off.")] = None) -> None:
    """Task heads with report-privileged distillation per outcome; full -> Lite encoder distillation."""
    from appliance.workspace import open_workspace

    _distill(open_workspace(workspace), run, outcomes, target, seeds, encoder)


def _distill(ws, run=None, outcomes=None, targets=None, seeds=None, encoder=None) -> dict:
    from appliance.distill.stage import distill_workspace

    with progress_bars() as bars:
        result = distill_workspace(ws, run, outcomes=outcomes, targets=targets, seeds=seeds, encoder=encoder,
                                   progress=RichProgress(bars)).to_dict()
    print_distill_summary(result)
    return result


def print_distill_summary(r: dict) -> None:
    from appliance.distill.stage import METHOD_NAMES

    fmt = lambda v: "-" if v is None else f"{v:.3f}"
    if r.get("skipped"):
        console.print(f"[yellow]![/yellow] task heads skipped: {escape(r['skipped'])}")
    for target, res in r["targets"].items():
        if "skipped" in res:
            console.print(f"[yellow]![/yellow] outcome {target}: skipped ({escape(res['skipped'])})")
            continue
        t = Table(title=f"Outcome {target}: {res['n_train']} train / {res['n_val']} val / {res['n_test']} test series, "
                        f"{len(res['seeds'])} seeds")
        for col in ("method", "AUC mean ± sd", "95% CI", "AUPRC mean", "95% CI"):
            t.add_column(col)
        for key, name in METHOD_NAMES.items():
            m = res["methods"].get(key)
            if m:
                avg = m["seed_averaged"]
                t.add_row(name, f"{fmt(m['auc_mean'])} ± {fmt(m['auc_std'])}", "-".join(fmt(x) for x in avg["auc_ci95"]),
                          fmt(m["auprc_mean"]), "-".join(fmt(x) for x in avg["auprc_ci95"]))
        for key, d in res["paired"].items():
            t.add_row(key.replace("-", " - ") + " (paired)", fmt(d["auc_delta_mean"]),
                      "-".join(fmt(x) for x in d["auc_delta_ci95"]), "", "")
        console.print(t)
    enc = r.get("encoder") or {}
    if "skipped" in enc:
        console.print(f"full -> Lite encoder: skipped ({escape(enc['skipped'])})")
    elif enc:
        c = enc.get("comparison", enc)
        console.print(f"full -> Lite encoder: zero-shot AUC teacher {fmt(c.get('teacher_zero_shot_auc'))}, student "
                      f"{fmt(c.get('student_zero_shot_auc'))} (retained {fmt(c.get('retained_fraction'))}); "
                      f"inference {fmt(c.get('speedup'))}x faster; student run {enc.get('run_dir')}")
    console.print(f"report: {r['run_dir']}/report.md ({r['seconds']:.0f} s)")


@app.command("pretrain")
def pretrain_cmd(workspace: WorkspaceOpt = Path("."),
                 objective: Annotated[Optional[str], typer.Option(help="clip, unicl or dino (default: pretrain.objective).")] = None,
                 weights: Annotated[Optional[Path], typer.Option(help="Open weights to start from (default: pretrain.encoder.weights_dir).")] = None,
                 max_images: Annotated[Optional[int], typer.Option(min=2, help="Use only this many training images (scaling curves).")] = None,
                 epochs: Annotated[Optional[int], typer.Option(min=1, help="Epochs (default: pretrain.epochs).")] = None,
                 resume: Annotated[bool, typer.Option("--resume", help="Continue the newest unfinished run.")] = False) -> None:
    """Keep training an open-weight 2D encoder (RAD-DINO, a timm ViT/ConvNeXt/ResNet) on the site's radiographs."""
    from appliance.workspace import open_workspace

    if objective is not None and objective not in ("clip", "unicl", "dino"):
        raise ApplianceError(f"--objective {objective}: use clip, unicl or dino")
    _pretrain(open_workspace(workspace), objective=objective, weights=weights.resolve() if weights else None,
              max_images=max_images, epochs=epochs,
              resume=resume)


def _pretrain(ws, **kwargs) -> dict:
    from appliance.train.pretrain import pretrain_workspace

    resume = kwargs.pop("resume", False)
    weights = kwargs.pop("weights", None)
    with progress_bars() as bars:
        result = pretrain_workspace(ws, resume=resume, progress=RichProgress(bars), weights_dir=weights,
                                    **kwargs).to_dict()
    print_pretrain_summary(result)
    return result


def print_pretrain_summary(r: dict) -> None:
    plan, enc = r["plan"], r["encoder"]
    t = Table(title=f"Pre-train ({r['objective']})", show_header=False)
    t.add_row("encoder", f"{enc['family']} {enc['name']} at {enc['image_size']} px, from "
              + (enc["weights_dir"] or "random initialisation"))
    t.add_row("images", f"{r['n_images']['train']} train (pre-training), {r['n_images']['val']} val, "
              f"{r['n_images']['test']} test (held out for rfm probe)")
    t.add_row("steps", f"{r['steps']} over {r['epochs']} epochs, {r['samples_per_s']:.2f} images/s")
    t.add_row("plan", f"{plan['name']}: micro-batch {plan['micro_batch']} x {plan['grad_accumulation']} accumulation, "
              f"{plan['precision']} on {plan['device']}" + (", activation checkpointing" if plan["activation_checkpointing"] else "")
              + (f"; {r['oom_backoffs']} out-of-memory back-offs" if r["oom_backoffs"] else ""))
    t.add_row("last losses", ", ".join(f"{k} {v:.3f}" for k, v in r["last_losses"].items()))
    if r["val"]:
        t.add_row("validation", ", ".join(f"{k} {v:.3f}" for k, v in r["val"].items()))
    kwh = r["energy"].get("total_kwh")
    t.add_row("energy", f"{kwh:.4f} kWh ({r['energy']['co2e_g']:.1f} g CO2e)" if kwh is not None
              else f"not measured ({r['energy']['gpu_method']})")
    console.print(t)
    if r.get("skipped"):
        console.print("[yellow]![/yellow] images left out: " + ", ".join(f"{k}: {v}" for k, v in r["skipped"].items()))
    console.print(f"encoder: {r['encoder_dir']}" + (f"  (MLflow run {r['mlflow_run_id']})" if r["mlflow_run_id"] else ""))


@app.command("probe")
def probe_cmd(encoders: Annotated[Optional[list[str]], typer.Argument(help="`start` (the open weights), pre-training run folders or weights folders; the first is the baseline. Default: start and the newest pre-training run.")] = None,
              workspace: WorkspaceOpt = Path("."),
              seeds: Annotated[Optional[int], typer.Option(min=1, help="Probe seeds per encoder (default: probe.seeds).")] = None,
              bootstrap: Annotated[Optional[int], typer.Option(min=0, help="Bootstrap resamples (default: probe.bootstrap).")] = None) -> None:
    """Frozen-encoder probe of 2D encoders: AUPRC/AUROC per finding and line/tube, paired bootstrap test, subgroups."""
    from appliance.evaluate.probe2d import probe_workspace
    from appliance.workspace import open_workspace

    with progress_bars() as bars:
        result = probe_workspace(open_workspace(workspace), encoders or (), seeds=seeds, bootstrap=bootstrap,
                                 progress=RichProgress(bars))
    print_probe_summary(result)


def print_probe_summary(r: dict) -> None:
    def ci(entry: dict, metric: str) -> str:
        value, interval = entry.get(metric), entry.get(f"{metric}_ci95")
        if value is None:
            return "-"
        return f"{value:.3f}" + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")

    groups = list(r["groups"])
    t = Table(title=f"Frozen-encoder probe ({r['n_images']['test']} test images, {len(r['seeds'])} seeds)")
    t.add_column("encoder")
    for g in groups:
        t.add_column(f"{g.replace('_', '/')} AUPRC")
        t.add_column(f"{g.replace('_', '/')} AUROC")
    for name, e in r["encoders"].items():
        macro = e["metrics"]["macro"]
        t.add_row(name, *[ci(macro[g], m) for g in groups for m in ("auprc", "auroc")])
    console.print(t)
    for c in r["comparisons"]:
        for g in groups:
            d = c["macro"].get(g, {}).get("auprc")
            if isinstance(d, dict) and d.get("ci95"):
                console.print(f"{c['b']} - {c['a']}, {g.replace('_', '/')} AUPRC: {d['diff']:+.3f} "
                              f"[{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}], p = {d['p_value']:.3f} "
                              f"(paired hierarchical bootstrap, {c['n_resamples']} resamples)")
    for name, s in (r.get("scaling") or {}).items():
        fit = s.get("fit")
        if fit:
            console.print(f"scaling {name}: AUPRC = {fit['a']:.3g} x n^{fit['k']:.3f} (R2 {fit['r2']:.2f}, "
                          f"{fit['n_points']} runs)")
    console.print(f"report: {r['report_md']}")


@app.command("export")
def export_cmd(workspace: WorkspaceOpt = Path("."),
               run: Annotated[Optional[Path], typer.Option(help="Run folder (default: newest finished run).")] = None,
               tensorrt: Annotated[Optional[str], typer.Option(help="TensorRT engine: auto, on or off (default: site.yaml).")] = None,
               int8: Annotated[Optional[bool], typer.Option("--int8/--no-int8", help="Also an INT8 graph/engine calibrated on the cache (default: site.yaml).")] = None) -> None:
    """ONNX image and text encoders, parity with PyTorch, TensorRT engine, Triton repository, model card."""
    from appliance.workspace import open_workspace

    _export(open_workspace(workspace), run, tensorrt, int8)


def _export(ws, run: Path | None, tensorrt: str | None = None, int8: bool | None = None) -> dict:
    from appliance.export import export_run

    with progress_bars() as bars:
        result = export_run(ws, run, progress=RichProgress(bars), tensorrt=tensorrt, int8=int8).to_dict()
    print_export_summary(result)
    return result


def print_export_summary(r: dict) -> None:
    p = r["parity"]
    fmt = lambda v, f="{:.3f}": "-" if v is None else f.format(v)
    t = Table(title=f"Export of run {r['run']} (parity on {p['n_series']} {p['split']} series)")
    for col in ("artifact", "max abs diff", "min cosine", "zero-shot AUC", "size MB"):
        t.add_column(col)
    sizes = {f["path"]: f["bytes"] / 1e6 for f in r["files"]}
    t.add_row("PyTorch fp32 (reference)", "-", "-", fmt(p["pytorch_zero_shot_auc"]), "-")
    rows = [("image_onnx", "image_encoder.onnx", "image_embedding"), ("text_onnx", "text_encoder.onnx", "text_embedding"),
            ("image_int8_onnx", "image_encoder.int8.onnx", "image_embedding"),
            ("image_tensorrt_fp16", "image_encoder.fp16.plan", "image_embedding"),
            ("image_tensorrt_int8", "image_encoder.int8.plan", "image_embedding")]
    for key, name, output in rows:
        if key in p:
            m = p[key][output]
            t.add_row(name, fmt(m["max_abs_diff"], "{:.2e}"), fmt(m["cosine_min"], "{:.6f}"),
                      fmt(p[key].get("zero_shot_auc")), fmt(sizes.get(name), "{:.1f}"))
    console.print(t)
    exp = r["exporter"]
    console.print("ONNX exporter: " + "; ".join(
        f"{k} {v['exporter']} (opset {v['opset']})" + (f", fell back: {v['fallback_reason']}" if v["fallback_reason"] else "")
        for k, v in exp.items()))
    trt = r["tensorrt"]
    console.print(f"TensorRT: built {', '.join(trt['built'])}" if trt.get("built") else
                  f"[yellow]![/yellow] TensorRT skipped: {escape(str(trt.get('skipped')))}")
    console.print(f"Triton models: {', '.join(r['triton_models'])}")
    console.print(f"written to {r['out_dir']} (model_card.md, SHA256SUMS) in {r['seconds']:.0f} s")


@app.command()
def status(workspace: WorkspaceOpt = Path(".")) -> None:
    """What the catalog holds and where each stage stands."""
    from appliance.catalog import Catalog
    from appliance.workspace import open_workspace

    ws = open_workspace(workspace)
    with Catalog(ws.catalog_path) as cat:
        counts, stages = cat.counts(), cat.stage_counts()
    t = Table(title=f"Catalog of {ws.root.name}", show_header=False)
    for k, v in counts.items():
        t.add_row(k, str(v))
    console.print(t)
    s = Table(title="Stages")
    statuses = ("done", "running", "failed", "quarantined", "queued")
    for col in ("stage", *statuses):
        s.add_column(col)
    for stage, by in stages.items():
        s.add_row(stage, *(str(by.get(k, 0)) for k in statuses))
    console.print(s)


@app.command()
def quarantine(workspace: WorkspaceOpt = Path(".")) -> None:
    """List quarantined items with their reasons (files and sources are in quarantine/q<id>/)."""
    from appliance.catalog import Catalog
    from appliance.workspace import open_workspace

    ws = open_workspace(workspace)
    with Catalog(ws.catalog_path) as cat:
        rows = cat.quarantined()
    t = Table(title=f"Quarantine ({len(rows)})")
    for col in ("id", "stage", "kind", "code", "reason", "when"):
        t.add_column(col)
    for r in rows:
        t.add_row(r.folder, r.stage, r.kind, r.code, r.reason, r.created_at)
    console.print(t)


# --- demo / bench ------------------------------------------------------------------------------
@app.command()
def demo(directory: Annotated[Path, typer.Option("--dir", help="Folder for the demo source and workspace.")] = Path("demo"),
         studies: Annotated[int, typer.Option(min=2, help="Synthetic studies.")] = DEMO_STUDIES,
         seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
         epochs: Annotated[Optional[int], typer.Option(min=0, help="Epochs per training stage (default: the demo's).")] = None) -> None:
    """Run the whole site pipeline (Prefect flow) on a fresh synthetic cohort and summarise it."""
    from appliance.demo import run_demo
    from appliance.progress import set_default_progress

    with progress_bars() as bars:
        set_default_progress(RichProgress(bars))
        try:
            result = run_demo(directory, studies=studies, seed=seed, epochs=epochs)
        finally:
            set_default_progress(None)
    print_ingest_summary(result["stages"]["ingest"])
    print_deid_summary(result["stages"]["deid"])
    print_preprocess_summary(result["stages"]["preprocess"])
    print_labels_summary(result["stages"]["labels"])
    print_train_summary(result["stages"]["train"])
    print_eval_summary(result["stages"]["eval"])
    print_distill_summary(result["stages"]["distill"])
    print_export_summary(result["stages"]["export"])
    t = Table(title="Demo")
    for col in ("stage", "result", "seconds"):
        t.add_column(col)
    for row in result["table"]:
        t.add_row(row["stage"], escape(row["result"]), f"{row['seconds']:.1f}")
    console.print(t)
    console.print(f"summary written to {result['summary_path']}")


@bench_app.command("ingest")
def bench_ingest(studies: Annotated[int, typer.Option(min=1, help="Synthetic studies.")] = 20,
                 out: Annotated[Path, typer.Option(help="JSON output file.")] = Path("bench-ingest.json"),
                 real: Annotated[Optional[Path], typer.Option(help="Real DICOM series folder to measure too.")] = None,
                 workers: Annotated[Optional[int], typer.Option(min=1, help="Preprocess workers (default: one per core).")] = None) -> None:
    """ingest + preprocess throughput (series/s, slices/s, MB/s), peak RSS, and dcm2niix as a peer."""
    from appliance.bench import bench_ingest as run

    with console.status("benchmarking ingest + preprocess ..."):
        result = run(studies=studies, real=real, workers=workers)
    t = Table(title="rfm bench ingest")
    for col in ("dataset", "series", "slices", "MB", "ingest s", "preprocess s", "series/s", "slices/s", "MB/s",
                "peak RSS MB", "dcm2niix s", "ratio vs dcm2niix"):
        t.add_column(col)
    for name, r in result["datasets"].items():
        peer = r.get("peer_dcm2niix") or {}
        t.add_row(name, str(r["series"]), str(r["slices"]), f"{r['mb']:.1f}", f"{r['ingest_s']:.2f}",
                  f"{r['preprocess_s']:.2f}", f"{r['series_per_s']:.2f}", f"{r['slices_per_s']:.0f}",
                  f"{r['mb_per_s']:.1f}", f"{r['peak_rss_mb']:.0f}",
                  f"{peer['seconds']:.2f}" if peer.get("seconds") is not None else "-",
                  f"{peer['ratio']:.2f}x" if peer.get("ratio") is not None else peer.get("skipped", "-"))
    console.print(t)
    out.write_text(json.dumps(result, indent=2))
    console.print(f"written to {out}")


@bench_app.command("deid")
def bench_deid_cmd(studies: Annotated[int, typer.Option(min=1, help="Synthetic studies.")] = 20,
                   out: Annotated[Path, typer.Option(help="JSON output file.")] = Path("bench-deid.json"),
                   real: Annotated[Optional[Path], typer.Option(help="Real DICOM folder to measure too.")] = None) -> None:
    """De-identification files/s and MB/s, with dicognito on the same files as the peer."""
    from appliance.bench import bench_deid

    with console.status("benchmarking de-identification ..."):
        result = bench_deid(studies=studies, real=real)
    t = Table(title="rfm bench deid")
    for col in ("dataset", "files", "MB", "full stage files/s", "full MB/s", "headers files/s", "dicognito files/s",
                "headers vs dicognito", "full vs dicognito", "peak RSS MB"):
        t.add_column(col)
    fmt = lambda v, f="{:.1f}": "-" if v is None else f.format(v)
    for name, r in result["datasets"].items():
        peer = r["peer_dicognito"]
        t.add_row(name, str(r["files"]), f"{r['mb']:.1f}", fmt(r["full_stage"]["files_per_s"]),
                  fmt(r["full_stage"]["mb_per_s"]), fmt(r["headers_only"]["files_per_s"]),
                  fmt(peer.get("files_per_s")) if "files_per_s" in peer else peer.get("skipped", "-"),
                  fmt(r["ratio_headers_only_vs_dicognito"], "{:.2f}x"), fmt(r["ratio_full_stage_vs_dicognito"], "{:.2f}x"),
                  f"{r['peak_rss_mb']:.0f}")
    console.print(t)
    out.write_text(json.dumps(result, indent=2))
    console.print(f"written to {out}")


@bench_app.command("fed")
def bench_fed_cmd(out: Annotated[Path, typer.Option(help="JSON output file.")] = Path("bench-fed.json"),
                  sites: Annotated[int, typer.Option(min=2, max=8)] = 3,
                  rounds: Annotated[int, typer.Option(min=1)] = 1,
                  quick: Annotated[bool, typer.Option("--quick", help="GreenRFM-L with the tiny BERT instead of the "
                                                                      "full-size model.")] = False) -> None:
    """Seconds per federated round (local training, transfer, aggregation) and bytes per round, real
    SuperLink and SuperNodes on loopback with TLS; the full-size model (33M vision + 110M BERT) by default."""
    from appliance.federated.bench import bench_fed

    with console.status("benchmarking a federated round ...") as status:
        result = bench_fed(sites=sites, rounds=rounds, variant="lite" if quick else "standard",
                           text="tiny" if quick else "bert-base", embed_dim=32 if quick else 768,
                           note=lambda msg: status.update(msg))
    p = result["model"]["parameters"]
    t = Table(title=f"rfm bench fed: {sites} sites, {result['model']['variant']} + {result['model']['text']} text "
                    f"({p['vision'] / 1e6:.1f}M vision + {p['text'] / 1e6:.1f}M text parameters)")
    for col in ("round", "seconds", "local training s", "transfer + overhead s", "aggregation s", "evaluation round s",
                "MB per round"):
        t.add_column(col)
    mb = result["bytes_per_round"].get("total", float("nan")) / 2**20
    for r in result["per_round"]:
        t.add_row(str(r["round"]), f"{r['seconds']:.1f}", f"{r['local_training_s']:.1f}",
                  f"{r['transfer_and_overhead_s']:.1f}", f"{r['aggregation_s']:.2f}", f"{r['evaluation_round_s']:.1f}",
                  f"{mb:.0f}")
    console.print(t)
    out.write_text(json.dumps(result, indent=1) + "\n")
    console.print(f"written to {out}")


@bench_app.command("labels")
def bench_labels_cmd(out: Annotated[Path, typer.Option(help="JSON output file.")] = Path("bench-labels.json"),
                     latency: Annotated[float, typer.Option(help="Scripted server latency per request, s.")] = 0.2,
                     max_in_flight: Annotated[int, typer.Option(min=1, help="Client requests in flight.")] = 16) -> None:
    """Reports/s: rules on CPU, and the OpenAI client against a local fixed-latency server."""
    from appliance.bench import bench_labels

    with console.status("benchmarking labels ..."):
        result = bench_labels(latency_s=latency, max_in_flight=max_in_flight)
    t = Table(title="rfm bench labels")
    for col in ("extractor", "reports", "reports/s", "note"):
        t.add_column(col)
    r = result["rules"]
    t.add_row("rules (CPU)", str(r["reports"]), f"{r['reports_per_s']:.0f}", f"peak RSS {r['peak_rss_mb']:.0f} MB")
    c = result["openai_client"]
    for name in ("concurrent", "one_at_a_time"):
        m = c[name]
        t.add_row(f"openai client, {m['max_in_flight']} in flight", str(m["reports"]), f"{m['reports_per_s']:.1f}",
                  f"latency {m['latency_s']} s, ceiling {m['ceiling_per_s']}/s, server saw {m['server_max_in_flight']} at once")
    console.print(t)
    console.print(f"concurrency speed-up vs one at a time: {c['speedup_vs_one_at_a_time']:.1f}x")
    out.write_text(json.dumps(result, indent=2))
    console.print(f"written to {out}")


@bench_app.command("train")
def bench_train_cmd(out: Annotated[Path, typer.Option(help="JSON output file.")] = Path("bench-train.json"),
                    steps: Annotated[int, typer.Option(min=1, help="Timed optimiser steps per stage.")] = 3,
                    warmup: Annotated[int, typer.Option(min=0, help="Untimed optimiser steps before them.")] = 1,
                    quick: Annotated[bool, typer.Option("--quick", help="Only the demo crop (56x56x36), not 192x192x96.")] = False,
                    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
                    emulate_gb: Annotated[Optional[float], typer.Option(min=1.0, help="Plan for a GPU of this many GB and cap torch's allocator to it.")] = None,
                    text: Annotated[str, typer.Option(help="Text encoder: auto (bert-base on GPU, tiny on CPU), tiny or bert-base.")] = "auto",
                    radiograph: Annotated[bool, typer.Option("--radiograph/--no-radiograph", help="Also the 2D encoders (rfm pretrain): images/s per objective and the ViT-B/14 plans.")] = True) -> None:
    """Training samples/s per stage, inference samples/s, peak GPU memory and RSS, and loader samples/s, per variant
    and crop; then the 2D encoders' pre-training images/s per objective and the plan for ViT-B/14 at 518 px."""
    from appliance.bench import DEMO_CROP, RECIPE_CROP, bench_train

    if device not in ("auto", "cpu", "cuda"):
        raise ApplianceError(f"--device {device}: use auto, cpu or cuda")
    if text not in ("auto", "tiny", "bert-base"):
        raise ApplianceError(f"--text {text}: use auto, tiny or bert-base")
    crops = (DEMO_CROP,) if quick else (RECIPE_CROP, DEMO_CROP)
    with console.status("benchmarking training steps (one process per variant and crop) ..."):
        result = bench_train(crops=crops, steps=steps, warmup=warmup, device=device, memory_fraction_gb=emulate_gb,
                             text=text)
    rows = result["results"]
    texts = sorted({r["text_encoder"] for r in rows})
    title = (f"rfm bench train ({result['gpu'] or 'CPU'}, torch {result['torch']}, text encoder {'/'.join(texts)}"
             + (f", card emulated at {emulate_gb:g} GB" if emulate_gb and result["gpu"] else "") + ")")
    backoffs = any(r["oom_backoffs"] or not r["finished"] for r in rows)
    t = Table(title=title)
    for col in ("variant", "crop", "micro x accum", "precision", "stage1 samples/s", "stage2 samples/s",
                "inference samples/s", "loader samples/s", "peak GPU GB",
                "peak RSS MB") + (("OOM back-offs",) if backoffs else ()):
        t.add_column(col)
    fmt = lambda v, f="{:.2f}": "-" if v is None else f.format(v)
    for r in rows:
        plan = r["plan"]
        cells = [r["variant"], "x".join(str(c) for c in r["crop"]), f"{plan['micro_batch']} x {plan['grad_accumulation']}",
                 plan["precision"], fmt(r["stage1_samples_per_s"]),
                 fmt(r["stage2_samples_per_s"]) if r["finished"] else "OOM", fmt(r.get("inference_samples_per_s")),
                 fmt(r["loader_samples_per_s"], "{:.1f}"),
                 fmt(r["peak_gpu_mem_gb"]), f"{r['peak_rss_mb']:.0f}"]
        if backoffs:
            cells.append(f"{r['oom_backoffs']} (micro {r['final_micro_batch']})" if r["finished"]
                         else f"OOM: {r['failure']}")
        t.add_row(*cells)
    console.print(t)
    for note in result["notes"]:
        console.print(f"- {note}")
    speed = {(r["variant"], tuple(r["crop"])): r.get("inference_samples_per_s") for r in rows}
    for crop in dict.fromkeys(tuple(r["crop"]) for r in rows):
        lite, standard = speed.get(("lite", crop)), speed.get(("standard", crop))
        if lite and standard:
            console.print(f"- inference speed-up GreenRFM-L / GreenRFM at {'x'.join(map(str, crop))}: "
                          f"{lite / standard:.2f}x ({lite:.2f} vs {standard:.2f} samples/s)")
    if radiograph:
        from appliance.train.pretrain_bench import bench_pretrain

        with console.status("benchmarking 2D pre-training (one process per objective) ..."):
            result["radiograph"] = bench_pretrain(steps=steps, warmup=warmup, device=device, emulate_gb=emulate_gb)
        print_pretrain_bench(result["radiograph"])
    out.write_text(json.dumps(result, indent=2))
    console.print(f"written to {out}")


def print_pretrain_bench(r: dict) -> None:
    fmt = lambda v, f="{:.2f}": "-" if v is None else f.format(v)
    first = r["rows"][0]
    t = Table(title=f"2D encoders: {first['encoder']} at {first['image_size']} px ({first['gpu'] or 'CPU'})")
    for col in ("objective", "params (M)", "micro-batch", "precision", "checkpointing", "train images/s",
                "inference images/s", "peak GPU GB", "peak RSS MB"):
        t.add_column(col)
    for row in r["rows"]:
        plan = row["plan"]
        t.add_row(row["objective"], f"{row['parameters_m']:.1f}", str(plan["micro_batch"]), plan["precision"],
                  "on" if plan["activation_checkpointing"] else "off", fmt(row["train_images_per_s"]),
                  fmt(row["inference_images_per_s"]), fmt(row["peak_gpu_mem_gb"]), f"{row['peak_rss_mb']:.0f}")
    console.print(t)
    t = Table(title="plan for ViT-B/14 at 518 px (RAD-DINO), effective batch 64")
    for col in ("objective", "card", "micro-batch x accumulation", "checkpointing", "precision"):
        t.add_column(col)
    for p in r["plans"]:
        t.add_row(p["objective"], f"{p['card_gb']} GB", f"{p['micro_batch']} x {p['grad_accumulation']}",
                  "on" if p["activation_checkpointing"] else "off", p["precision"])
    console.print(t)
    for note in r["notes"]:
        console.print(f"- {note}")


@bench_app.command("distill")
def bench_distill_cmd(out: Annotated[Path, typer.Option(help="JSON output file.")] = Path("bench-distill.json"),
                      batch: Annotated[int, typer.Option(min=1, help="Encoder distillation batch.")] = 8,
                      steps: Annotated[int, typer.Option(min=1, help="Timed distillation steps.")] = 3,
                      head_epochs: Annotated[int, typer.Option(min=1, help="Epochs per task head.")] = 20,
                      recipe_crop: Annotated[bool, typer.Option("--recipe-crop", help="192x192x96 instead of the demo crop.")] = False,
                      device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto") -> None:
    """Task-head samples/s and the cost of report distillation; full -> Lite step samples/s and the Lite speed-up."""
    from appliance.bench import DEMO_CROP, RECIPE_CROP
    from appliance.distill.bench import bench_distill

    crop = RECIPE_CROP if recipe_crop else DEMO_CROP
    with console.status("benchmarking distill ..."):
        result = bench_distill(crop=crop, batch=batch, steps=steps, head_epochs=head_epochs, device=device)
    heads = result["heads"]
    t = Table(title=f"rfm bench distill: task heads ({heads['shape']['n_train']} studies, {head_epochs} epochs)")
    for col in ("head", "parameters", "seconds", "train samples/s"):
        t.add_column(col)
    for kind, r in heads["heads"].items():
        t.add_row(kind, f"{r['parameters']:,}", f"{r['seconds']:.2f}", f"{r['train_samples_per_s']:.0f}")
    console.print(t)
    console.print(f"report-distilled student (teacher + student) costs {heads['report_distilled_vs_image_only_cost']:.1f}x "
                  f"the image-only head; peak RSS {heads['peak_rss_mb']:.0f} MB")
    enc = result["encoder"]
    step = enc["distillation_step"]
    t = Table(title=f"full -> Lite encoder at {'x'.join(map(str, enc['crop']))} on {enc['device']} ({enc['precision']})")
    for col in ("batch", "GreenRFM volumes/s", "GreenRFM-L volumes/s", "Lite speed-up"):
        t.add_column(col)
    for b, ratio in enc["student_speedup"].items():
        t.add_row(b, f"{enc['inference']['teacher'][b]['volumes_per_s']:.2f}",
                  f"{enc['inference']['student'][b]['volumes_per_s']:.2f}", f"{ratio:.2f}x")
    console.print(t)
    gpu = f", peak GPU {step['peak_gpu_mem_gb']:.2f} GB" if step["peak_gpu_mem_gb"] is not None else ""
    console.print(f"distillation step: {step['samples_per_s']:.2f} samples/s at batch {step['batch']}{gpu}; "
                  f"GMACs ratio {enc['gmacs_ratio']:.2f}; peak RSS {enc['peak_rss_mb']:.0f} MB")
    for note in result["notes"]:
        console.print(f"- {note}")
    out.write_text(json.dumps(result, indent=2))
    console.print(f"written to {out}")


@bench_app.command("export")
def bench_export_cmd(out: Annotated[Path, typer.Option(help="JSON output file.")] = Path("bench-export.json"),
                     quick: Annotated[bool, typer.Option("--quick", help="Demo crop (56x56x36), GreenRFM-L, batch 1,2 (an explicit --variant or --batch-sizes wins).")] = False,
                     variant: Annotated[Optional[str], typer.Option(help="all, lite or standard (default: all; lite with --quick).")] = None,
                     batch_sizes: Annotated[Optional[str], typer.Option(help="Comma-separated, e.g. 1,2,4 (default: 1,2,4 on CPU, 1,4,8,16 on CUDA).")] = None,
                     iterations: Annotated[int, typer.Option(min=1, help="Timed calls per backend and batch size.")] = 10,
                     warmup: Annotated[int, typer.Option(min=0, help="Untimed calls before them.")] = 2,
                     device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
                     tensorrt: Annotated[str, typer.Option(help="auto (when usable) or off.")] = "auto") -> None:
    """Latency, volumes/s, peak memory and embedding parity of the exported image encoder per batch size:
    PyTorch eager and AMP, onnxruntime CPU/CUDA, TensorRT FP16, with ratios vs PyTorch."""
    from appliance.bench import DEMO_CROP, RECIPE_CROP
    from appliance.export.bench import bench_export

    if device not in ("auto", "cpu", "cuda"):
        raise ApplianceError(f"--device {device}: use auto, cpu or cuda")
    if tensorrt not in ("auto", "off"):
        raise ApplianceError(f"--tensorrt {tensorrt}: use auto or off")
    variant = variant or ("lite" if quick else "all")
    if variant not in ("all", "lite", "standard"):
        raise ApplianceError(f"--variant {variant}: use all, lite or standard")
    try:
        sizes = tuple(int(b) for b in batch_sizes.split(",") if b.strip()) if batch_sizes else ((1, 2) if quick else None)
    except ValueError:
        raise ApplianceError(f"--batch-sizes {batch_sizes!r}: use comma-separated integers, e.g. 1,2,4") from None
    if sizes is not None and (not sizes or min(sizes) < 1):
        raise ApplianceError(f"--batch-sizes {batch_sizes!r}: every batch size must be >= 1")
    with console.status("benchmarking the exported image encoder (one process per variant and crop) ..."):
        result = bench_export(variants=("lite", "standard") if variant == "all" else (variant,),
                              crops=(DEMO_CROP,) if quick else (RECIPE_CROP,), batch_sizes=sizes,
                              iterations=iterations, warmup=warmup, device=device, tensorrt=tensorrt)
    t = Table(title=f"rfm bench export ({result['gpu'] or 'CPU'}, torch {result['torch']}, onnxruntime "
                    f"{result['onnxruntime']}, tensorrt {result['tensorrt'] or '-'})")
    for col in ("variant", "crop", "backend", "batch", "median ms", "p90 ms", "volumes/s", "x eager", "x AMP",
                "peak memory", "cosine"):
        t.add_column(col)
    fmt = lambda v, f="{:.2f}": "-" if v is None else f.format(v)
    shown_skips = set()
    for r in result["results"]:
        head = [r["variant"], "x".join(str(c) for c in r["crop"]), r["backend"]]
        if "skipped" in r:  # once per variant, crop and backend; the reason is in the notes
            if (r["variant"], tuple(r["crop"]), r["backend"]) not in shown_skips:
                shown_skips.add((r["variant"], tuple(r["crop"]), r["backend"]))
                t.add_row(*head, "all", "skipped", *[""] * 6)
            continue
        if "volumes_per_s" not in r:
            failure = f"OOM: {r['oom']}" if "oom" in r else f"error: {r.get('error')}"
            t.add_row(*head, str(r["batch"]), escape(failure[:80]), *[""] * 6)
            continue
        memory = (f"{r['peak_gpu_mb']:.0f} MB GPU" if r.get("peak_gpu_mb") is not None
                  else f"{r['peak_rss_mb']:.0f} MB RSS")
        cosine = "ref" if r.get("parity") == "reference" else fmt(r.get("cosine_min"), "{:.6f}")
        t.add_row(*head, str(r["batch"]), fmt(r["latency_ms_median"], "{:.1f}"), fmt(r["latency_ms_p90"], "{:.1f}"),
                  fmt(r["volumes_per_s"]), fmt(r.get("vs_eager"), "{:.2f}x"), fmt(r.get("vs_amp"), "{:.2f}x"), memory,
                  cosine)
    console.print(t)
    for note in result["notes"]:
        console.print(f"- {escape(note)}")
    out.write_text(json.dumps(result, indent=2))
    console.print(f"written to {out}")


# --- entry point -------------------------------------------------------------------------------
def _usage_errors() -> tuple[type[BaseException], ...]:
    # typer >= 0.21 has its own exception base; older typer raises click's (flwr pins typer < 0.21)
    if hasattr(typer, "TyperException"):
        return (typer.TyperException,)
    import click

    return (click.ClickException,)


_USAGE_ERRORS = _usage_errors()


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    # --verbose is accepted anywhere on the line, not only before the command
    verbose = any(a in ("--verbose", "-v") for a in args)
    args = [a for a in args if a not in ("--verbose", "-v")]
    try:
        result = app(args=args, prog_name="rfm", standalone_mode=False)
    except typer.Exit as exc:
        return int(getattr(exc, "exit_code", 0) or 0)
    except typer.Abort:
        err_console.print("aborted")
        return 130
    except _USAGE_ERRORS as exc:  # usage errors: typer prints them its own way
        show = getattr(exc, "show", None)
        show() if show else err_console.print(str(exc))
        return int(getattr(exc, "exit_code", 2))
    except ApplianceError as exc:
        _print_error(str(exc), verbose)
        return 2
    except KeyboardInterrupt:
        err_console.print("interrupted: finished items are kept; run the same command again to resume")
        return 130
    except Exception as exc:  # a bug: still one line, traceback with --verbose
        first = str(exc).splitlines()[0] if str(exc) else ""
        _print_error(f"unexpected {type(exc).__name__}: {first}", verbose)
        return 1
    return result if isinstance(result, int) else 0


def _print_error(message: str, verbose: bool) -> None:
    if verbose:
        err_console.print(traceback.format_exc(), highlight=False, markup=False)
    err_console.print(f"[red]error:[/red] {escape(message)}" + ("" if verbose else "  (--verbose for details)"),
                      highlight=False, soft_wrap=True)


if __name__ == "__main__":
    sys.exit(main())
