"""Operations commands: `rfm backup`, `rfm backup-key`, `rfm restore`, `rfm retention`, `rfm models ...`.

Registered on the main app by appliance/cli.py; the work is done by appliance.backup,
appliance.retention and appliance.model_registry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from appliance.errors import ApplianceError

WorkspaceOpt = Annotated[Path, typer.Option("--workspace", "-w", envvar="RFM_WORKSPACE",
                                            help="Site workspace folder (or $RFM_WORKSPACE).")]
RawKeyOpt = Annotated[Optional[Path], typer.Option("--raw-key", help="Key file for raw/ and quarantine/ "
                                                   "(from `rfm backup-key`; never the de-identification key).")]
models_app = typer.Typer(no_args_is_help=True, help="Local weight files: import (checked, hashed), list, verify.")


def register(app: typer.Typer) -> None:
    app.command("backup")(backup)
    app.command("backup-key")(backup_key)
    app.command("restore")(restore)
    app.command("retention")(retention)
    app.add_typer(models_app, name="models")


def _ui():
    from appliance.cli import RichProgress, console, progress_bars

    return console, progress_bars, RichProgress


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


# --- backup / restore ------------------------------------------------------------------------------
def backup(archive: Annotated[Path, typer.Argument(help="Archive to write (.tar), outside the workspace.")],
           workspace: WorkspaceOpt = Path("."),
           include_raw: Annotated[bool, typer.Option("--include-raw", help="Also raw/ and quarantine/ "
                                                     "(identifiable), encrypted with --raw-key.")] = False,
           raw_key: RawKeyOpt = None,
           models: Annotated[bool, typer.Option("--models/--no-models", help="Include models/ (imported "
                                                "weights; registry.json says what to re-import).")] = True) -> None:
    """Back up a workspace into one archive with a SHA-256 manifest (safe while the appliance runs)."""
    from appliance.backup import backup_workspace
    from appliance.workspace import open_workspace

    console, progress_bars, RichProgress = _ui()
    ws = open_workspace(workspace)
    with progress_bars() as bars:
        s = backup_workspace(ws, archive, include_raw=include_raw, raw_key_file=raw_key, include_models=models,
                             progress=RichProgress(bars))
    t = Table(title="Backup", show_header=False)
    t.add_row("archive", f"{s.archive} ({_mib(s.archive_bytes)})")
    t.add_row("sha256", s.archive_sha256)
    t.add_row("files", f"{s.files} ({_mib(s.bytes + s.raw_bytes)})")
    t.add_row("raw/ and quarantine/", f"{s.raw_files} files, encrypted" if s.include_raw else "not included")
    t.add_row("databases copied online", ", ".join(s.sqlite_snapshots) or "-")
    t.add_row("catalog schema", f"v{s.catalog_schema_version}")
    t.add_row("left out", "; ".join(s.skipped) or "-")
    t.add_row("seconds", f"{s.seconds:.1f}")
    console.print(t)
    console.print("the de-identification key (secrets/) is not in the backup: keep a copy of it separately "
                  "(docs/operations-backup.md)")


def backup_key(path: Annotated[Path, typer.Argument(help="Key file to create (mode 600); keep it away from "
                                                   "the backups it opens.")]) -> None:
    """Create a random 256-bit key for `rfm backup --include-raw`."""
    from appliance.backup import generate_backup_key

    console = _ui()[0]
    fingerprint = generate_backup_key(path)
    console.print(f"key written to {path} (fingerprint {fingerprint}); store a copy offline: without it an "
                  "encrypted raw/ cannot be restored")


def restore(archive: Annotated[Path, typer.Argument(help="Archive made by `rfm backup`.")],
            target: Annotated[Path, typer.Argument(help="Folder to restore into (new or empty).")],
            raw_key: RawKeyOpt = None,
            force: Annotated[bool, typer.Option("--force", help="Restore into a non-empty folder: its content is "
                                                "moved aside to <target>.before-restore-<time>.")] = False) -> None:
    """Restore a workspace: every checksum is verified before anything is written; the catalog is migrated."""
    from appliance.backup import restore_workspace

    console, progress_bars, RichProgress = _ui()
    with progress_bars() as bars:
        s = restore_workspace(archive, target, raw_key_file=raw_key, force=force, progress=RichProgress(bars))
    t = Table(title="Restore", show_header=False)
    t.add_row("workspace", str(s.target))
    t.add_row("files", f"{s.files} ({_mib(s.bytes)}), every SHA-256 checked")
    t.add_row("raw/ and quarantine/", f"{s.raw_files} files decrypted" if s.include_raw else
              f"not in the backup ({s.raw_recorded_missing.get('series', 0)} series recorded as without raw copy)")
    migrated = (f"v{s.catalog_schema_from} -> v{s.catalog_schema_to} (copy before: {s.catalog_copy_before_migration})"
                if s.catalog_schema_from != s.catalog_schema_to else f"v{s.catalog_schema_to}")
    t.add_row("catalog schema", migrated)
    if s.moved_aside:
        t.add_row("previous content", f"moved to {s.moved_aside}")
    t.add_row("seconds", f"{s.seconds:.1f}")
    console.print(t)
    if not s.deid_key_present:
        console.print(f"[yellow]![/yellow] the de-identification key is not in backups: put the site's copy at "
                      f"{s.deid_key_file} (mode 600) before de-identifying new data", highlight=False)


# --- retention -------------------------------------------------------------------------------------
def retention(workspace: WorkspaceOpt = Path("."),
              apply: Annotated[bool, typer.Option("--apply", help="Delete (default: only show what would go).")] = False,
              limit: Annotated[int, typer.Option(min=1, help="Rows shown in the table.")] = 50) -> None:
    """Apply site.yaml's retention policy to raw/ and quarantine/ (a dry run unless --apply)."""
    from appliance.retention import enforce_retention
    from appliance.workspace import open_workspace

    console, progress_bars, RichProgress = _ui()
    ws = open_workspace(workspace)
    with progress_bars() as bars:
        s = enforce_retention(ws, apply=apply, progress=RichProgress(bars))
    if s.raw_days is None and s.keep_quarantine_days is None:
        console.print("no retention policy: set retention.raw_days and/or retention.keep_quarantine_days in site.yaml")
        return
    verb = "removed" if apply else "would remove"
    t = Table(title=f"Retention ({'applied' if apply else 'dry run'}): raw_days={s.raw_days}, "
                    f"keep_quarantine_days={s.keep_quarantine_days}")
    for col in ("kind", "key", "age (days)", "files", "size", "action", "why"):
        t.add_column(col)
    for item in s.items[:limit]:
        t.add_row(item.kind, item.key, f"{item.age_days:.0f}", str(item.n_files), _mib(item.nbytes),
                  verb if item.remove else "keep", item.reason)
    if len(s.items) > limit:
        t.add_row("...", f"{len(s.items) - limit} more", "", "", "", "", "")
    console.print(t)
    gone = s.to_remove
    console.print(f"{verb}: {s.count('series')} series, {s.count('study')} studies' reports and identifiers, "
                  f"{s.count('quarantine')} quarantine folders ({sum(i.n_files for i in gone)} files, "
                  f"{_mib(sum(i.nbytes for i in gone))}); kept: {sum(1 for i in s.items if not i.remove)} waiting for "
                  f"a stage, {s.too_recent} too recent")
    if not apply and gone:
        console.print("nothing was deleted; run again with --apply to delete")


# --- models ----------------------------------------------------------------------------------------
@models_app.command("import")
def models_import(kind: Annotated[str, typer.Argument(help="r3d18-kinetics, cxr-bert, rad-dino, llm or other.")],
                  source: Annotated[Path, typer.Argument(help="The weight file or model folder.")],
                  workspace: WorkspaceOpt = Path("."),
                  name: Annotated[Optional[str], typer.Option(help="Name under models/ (default: from the source).")] = None,
                  link: Annotated[bool, typer.Option("--link", help="Hard-link instead of copying (same file system).")] = False,
                  replace: Annotated[bool, typer.Option("--replace", help="Replace a model of the same name.")] = False) -> None:
    """Check local weights for their kind, copy them to models/<name>/ and record every file's SHA-256."""
    from appliance.model_registry import SITE_YAML_KEY, import_model
    from appliance.workspace import open_workspace

    console, progress_bars, RichProgress = _ui()
    ws = open_workspace(workspace)
    with progress_bars() as bars:
        e = import_model(ws, kind, source, name=name, link=link, replace=replace, progress=RichProgress(bars))
    t = Table(title=f"Imported {e.name} ({e.kind})", show_header=False)
    t.add_row("files", f"{len(e.files)} ({_mib(e.total_bytes)}), {'hard-linked' if e.linked else 'copied'}")
    for k, v in e.details.items():
        if v not in (None, [], ""):
            t.add_row(k, ", ".join(map(str, v)) if isinstance(v, list) else str(v))
    t.add_row("path", e.reference)
    console.print(t)
    if e.kind in SITE_YAML_KEY:
        console.print(f"use it in site.yaml: {SITE_YAML_KEY[e.kind]}: {e.reference}", highlight=False)


@models_app.command("list")
def models_list(workspace: WorkspaceOpt = Path(".")) -> None:
    """Registered models: kind, files, size, path for site.yaml."""
    from appliance.model_registry import list_models
    from appliance.workspace import open_workspace

    console = _ui()[0]
    entries = list_models(open_workspace(workspace))
    t = Table(title=f"Models ({len(entries)})")
    for col in ("name", "kind", "files", "size", "imported", "path for site.yaml"):
        t.add_column(col)
    for e in entries:
        t.add_row(e.name, e.kind, str(len(e.files)), _mib(e.total_bytes), e.imported_at, e.reference)
    console.print(t)


@models_app.command("verify")
def models_verify(names: Annotated[Optional[list[str]], typer.Argument(help="Models to check (default: all).")] = None,
                  workspace: WorkspaceOpt = Path(".")) -> None:
    """Re-hash every registered file; report missing, changed and unregistered files (exit 2 on any)."""
    from appliance.model_registry import verify_models
    from appliance.workspace import open_workspace

    console, progress_bars, RichProgress = _ui()
    with progress_bars() as bars:
        results = verify_models(open_workspace(workspace), names or None, progress=RichProgress(bars))
    t = Table(title="Model verification")
    for col in ("name", "kind", "files", "result"):
        t.add_column(col)
    for r in results:
        problems = [f"{what}: {', '.join(files[:3])}{' ...' if len(files) > 3 else ''}"
                    for what, files in (("missing", r.missing), ("changed", r.changed), ("extra", r.extra)) if files]
        t.add_row(r.name, r.kind, str(r.files), "[green]ok[/green]" if r.ok else "[red]" + escape("; ".join(problems)) + "[/red]")
    console.print(t)
    bad = [r.name for r in results if not r.ok]
    if bad:
        raise ApplianceError(f"{len(bad)} model(s) differ from what was imported: {', '.join(bad)}")
