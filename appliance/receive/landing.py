"""Where received instances and reports wait until the ingest stage takes them.

Everything here is identifiable and stays inside raw/:

    raw/incoming/<study key>/<sop key>.dcm    instances, written atomically as they arrive
    raw/incoming_reports/<receipt>.jsonl|csv  reports from the HTTP endpoint or the drop folder
    raw/receive_unused/<study key>/           instances ingest neither stored nor quarantined
                                              (skipped: other modality, localizer, too few slices)

A study whose last instance arrived more than `quiet_period_s` ago is handed to `ingest_folder`,
the code path of `rfm ingest`; its spool files are removed only once the catalog holds them (or
quarantine/ has a copy). A crash anywhere loses nothing: the next sweep ingests what is left,
and ingest skips what it already has.
"""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pydicom

from appliance.catalog import Catalog
from appliance.errors import BadInputError
from appliance.ingest import ingest_folder
from appliance.ingest.stage import _check_pixel_data  # the same completeness check ingest applies
from appliance.progress import Progress, SilentProgress
from appliance.quarantine import quarantine_item, read_reason
from appliance.workspace import Workspace

log = logging.getLogger("appliance.receive")

STAGE = "receive"
REPORT_SUFFIXES = (".jsonl", ".csv")
_RECEIVING = ".receiving"  # temporary suffix; not `.partial`, which ingest removes on start


def spool_dir(ws: Workspace) -> Path:
    return ws.raw / "incoming"


def report_spool_dir(ws: Workspace) -> Path:
    return ws.raw / "incoming_reports"


def unused_dir(ws: Workspace) -> Path:
    return ws.raw / "receive_unused"


@dataclass
class ReceiveSummary:
    """One sweep of the spool: what went to the catalog, what waits, what was set aside."""

    studies_ingested: int = 0
    studies_waiting: int = 0
    studies_failed: int = 0  # an unexpected error; the folder stays in the spool for the next sweep
    instances_catalogued: int = 0
    instances_quarantined: int = 0
    instances_unused: int = 0
    report_files: int = 0
    report_files_failed: int = 0
    reports_linked: int = 0
    reports_pending: int = 0
    dropped_files: int = 0
    quarantine_ids: list[int] = field(default_factory=list)
    new_series: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


# --- instances ---------------------------------------------------------------------------------
def store_instance(ws: Workspace, data: bytes) -> str:
    """Check one received instance (a DICOM file's bytes) and write it into the spool; return its
    study key. Raises BadInputError for an instance ingest could never use."""
    _check_pixel_data(data)  # parses the whole file: truncated headers and pixel data both fail here
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    except Exception as exc:  # _check_pixel_data parsed it already; belt and braces
        raise BadInputError(f"DICOM header cannot be parsed ({type(exc).__name__})", "unreadable") from None
    study_uid, sop_uid = ds.get("StudyInstanceUID"), ds.get("SOPInstanceUID")
    if not study_uid or not sop_uid:
        raise BadInputError("instance without StudyInstanceUID or SOPInstanceUID", "missing_uid")
    study_key, sop_key = ws.opaque_key("study", str(study_uid)), ws.opaque_key("sop", str(sop_uid))
    _write_into(spool_dir(ws) / study_key, f"{sop_key}.dcm", data)
    return study_key


def _write_into(folder: Path, name: str, data: bytes) -> None:
    """Atomic write into `folder`, which a concurrent sweep may remove once it is empty."""
    for attempt in range(3):
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{name}.{threading.get_ident()}{_RECEIVING}"
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, folder / name)
            _fsync_dir(folder)  # the rename itself survives a power cut
            return
        except FileNotFoundError:
            if attempt == 2:
                raise


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def quarantine_received(ws: Workspace, error: BadInputError, data: bytes, *, kind: str = "file",
                        name: str = "instance.dcm", source: str = "") -> int:
    """Set aside something that arrived but cannot be used; `source` (caller AE/address, file
    name) goes into quarantine/q<id>/reason.json only."""
    with Catalog(ws.catalog_path) as catalog:
        return quarantine_item(ws, catalog, stage=STAGE, kind=kind, error=error, files={name: data},
                               sources=[source] if source else [])


def waiting_studies(ws: Workspace) -> list[Path]:
    spool = spool_dir(ws)
    return sorted(p for p in spool.iterdir() if p.is_dir() and not p.name.startswith(".")) if spool.is_dir() else []


def _last_arrival(folder: Path) -> float:
    """A file renamed into the folder updates its mtime: the time of the latest arrival."""
    return folder.stat().st_mtime


@contextmanager
def spool_lock(ws: Workspace) -> Iterator[None]:
    """One sweeper at a time across processes (the receiver's thread, the nightly flow).
    Receiving never takes it: instances keep arriving while a sweep runs."""
    spool_dir(ws).mkdir(parents=True, exist_ok=True)
    with open(spool_dir(ws) / ".sweep.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ingest_received(ws: Workspace, *, quiet_period_s: float | None = None, progress: Progress | None = None,
                    now: float | None = None) -> ReceiveSummary:
    """Move dropped report files into the report spool, ingest every study that has been quiet
    for `quiet_period_s` (default: receiver.quiet_period_s), then the queued reports."""
    t0 = time.perf_counter()
    cfg = ws.config().receiver
    quiet = cfg.quiet_period_s if quiet_period_s is None else quiet_period_s
    progress = progress or SilentProgress()
    summary = ReceiveSummary()
    with spool_lock(ws):
        _clean_stale_receiving(ws)
        if cfg.report_drop is not None:
            summary.dropped_files = collect_dropped_reports(ws, _resolve(ws, cfg.report_drop))
        now = time.time() if now is None else now
        for folder in waiting_studies(ws):
            if now - _last_arrival(folder) < quiet:
                summary.studies_waiting += 1
                continue
            try:
                _ingest_study_folder(ws, folder, summary, progress)
            except Exception as exc:  # one bad folder must not hold up the others
                summary.studies_failed += 1
                log.error("spool study %s not ingested (%s); kept for the next sweep", folder.name,
                          type(exc).__name__)
        _ingest_report_spool(ws, summary, progress)
    summary.seconds = time.perf_counter() - t0
    if summary.studies_ingested or summary.report_files or summary.instances_quarantined or summary.studies_failed:
        log.info("spool sweep: %d studies ingested (%d instances catalogued, %d quarantined, %d unused), "
                 "%d waiting, %d failed; %d report files (%d linked, %d pending)", summary.studies_ingested,
                 summary.instances_catalogued, summary.instances_quarantined, summary.instances_unused,
                 summary.studies_waiting, summary.studies_failed, summary.report_files, summary.reports_linked,
                 summary.reports_pending)
    return summary


def _ingest_study_folder(ws: Workspace, folder: Path, summary: ReceiveSummary, progress: Progress) -> None:
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not names:
        _remove_if_empty(folder)
        return
    result = ingest_folder(ws, folder, progress=progress)  # the `rfm ingest` code path
    summary.studies_ingested += 1
    summary.quarantine_ids += result.quarantine_ids
    summary.new_series += result.new_series
    summary.reports_linked += result.reports_linked
    summary.reports_pending = result.reports_pending
    quarantined = set()
    for qid in result.quarantine_ids:
        quarantined.update(read_reason(ws, f"q{qid:06d}").get("sources", []))
    with Catalog(ws.catalog_path) as catalog:
        for name in names:
            path = folder / name
            if catalog.instance_sha(Path(name).stem) is not None:
                summary.instances_catalogued += 1
                path.unlink()
            elif name in quarantined:
                summary.instances_quarantined += 1
                path.unlink()  # quarantine/ holds the copy
            else:
                summary.instances_unused += 1
                dest = unused_dir(ws) / folder.name
                dest.mkdir(parents=True, exist_ok=True)
                os.replace(path, dest / name)
    _remove_if_empty(folder)


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass  # not empty: an instance arrived during the sweep; the next sweep takes it


def _clean_stale_receiving(ws: Workspace) -> None:
    """Half-written files of a killed receiver (never a completed one: those were renamed)."""
    cutoff = time.time() - 3600
    for root in (spool_dir(ws), report_spool_dir(ws)):
        for tmp in root.rglob(f".*{_RECEIVING}") if root.is_dir() else ():
            try:
                if tmp.stat().st_mtime < cutoff:
                    tmp.unlink()
            except FileNotFoundError:
                pass


# --- reports -----------------------------------------------------------------------------------
def queue_report(ws: Workspace, report: dict) -> str:
    """Check one report (the HTTP contract in docs/receiver.md) and queue it; return a receipt id.
    Raises BadInputError with a one-line, PHI-free reason."""
    if not isinstance(report, dict):
        raise BadInputError("the body must be a JSON object", "malformed_report")
    unknown = set(report) - {"accession", "accession_number", "study_instance_uid", "text"}
    if unknown:
        raise BadInputError(f"unknown field(s): {', '.join(sorted(unknown))[:200]}", "malformed_report")
    accession = report.get("accession", report.get("accession_number"))
    uid = report.get("study_instance_uid")
    text = report.get("text")
    for name, value in (("accession", accession), ("study_instance_uid", uid)):
        if value is not None and not isinstance(value, str):
            raise BadInputError(f"'{name}' must be a string", "malformed_report")
    if not (accession or "").strip() and not (uid or "").strip():
        raise BadInputError("a report needs 'accession' or 'study_instance_uid'", "unkeyed_report")
    if not isinstance(text, str) or not text.strip():
        raise BadInputError("'text' must be a non-empty string", "empty_report")
    line = {"study_instance_uid": (uid or "").strip() or None,
            "accession_number": (accession or "").strip() or None, "text": text}
    receipt = f"{time.time_ns()}-{secrets.token_hex(4)}"
    _write_into(report_spool_dir(ws), f"{receipt}.jsonl", (json.dumps(line) + "\n").encode())
    return receipt


def collect_dropped_reports(ws: Workspace, drop: Path) -> int:
    """Move report files from the drop folder into the report spool; return how many.

    JSONL and CSV (the sidecar formats of docs/ingest.md) are taken as they are; a .json file holds
    one report object or a list of them. Hidden files are still being written (the contract:
    write to a name starting with a dot, then rename). Anything else is quarantined."""
    if not drop.is_dir():
        return 0
    moved = 0
    for path in sorted(p for p in drop.iterdir() if p.is_file() and not p.name.startswith(".")):
        data = path.read_bytes()
        receipt = f"{time.time_ns()}-{secrets.token_hex(4)}"
        suffix = path.suffix.lower()
        try:
            if suffix in REPORT_SUFFIXES:
                _write_into(report_spool_dir(ws), f"{receipt}{suffix}", data)
            elif suffix == ".json":
                _write_into(report_spool_dir(ws), f"{receipt}.jsonl", _json_to_jsonl(data))
            else:
                raise BadInputError(f"report file type '{suffix or 'none'}' not accepted (.jsonl, .csv, .json)",
                                    "malformed_report")
        except BadInputError as err:
            qid = quarantine_received(ws, err, data, kind="report", name="report" + suffix, source=path.name)
            log.warning("quarantined q%06d (report file): %s", qid, err.reason)
        path.unlink()
        moved += 1
    return moved


def _json_to_jsonl(data: bytes) -> bytes:
    try:
        obj = json.loads(data)
    except ValueError:
        raise BadInputError("report file is not valid JSON", "malformed_report") from None
    items = obj if isinstance(obj, list) else [obj]
    if not items or not all(isinstance(o, dict) for o in items):
        raise BadInputError("a .json report file holds an object or a list of objects", "malformed_report")
    lines = []
    for o in items:
        o = dict(o)
        if "accession" in o and "accession_number" not in o:
            o["accession_number"] = o.pop("accession")
        lines.append(json.dumps(o))
    return ("\n".join(lines) + "\n").encode()


def _ingest_report_spool(ws: Workspace, summary: ReceiveSummary, progress: Progress) -> None:
    spool = report_spool_dir(ws)
    files = sorted(p for p in spool.iterdir() if p.is_file() and not p.name.startswith(".")
                   and p.suffix in REPORT_SUFFIXES) if spool.is_dir() else []
    if not files:
        return
    nothing = spool / ".no-images"  # ingest_folder wants a source folder; reports come alone
    nothing.mkdir(exist_ok=True)
    for path in files:
        try:
            result = ingest_folder(ws, nothing, reports=path, progress=progress)  # the `rfm ingest` report path
        except Exception as exc:
            summary.report_files_failed += 1
            log.error("queued report file %s not ingested (%s); kept for the next sweep", path.stem, type(exc).__name__)
            continue
        summary.report_files += 1
        summary.reports_linked += result.reports_linked
        summary.reports_pending = result.reports_pending
        summary.quarantine_ids += result.quarantine_ids
        path.unlink()


def _resolve(ws: Workspace, path: Path) -> Path:
    return path if path.is_absolute() else ws.root / path
