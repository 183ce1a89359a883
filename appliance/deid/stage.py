"""De-identification stage over the catalog: raw/ series and reports -> deid/, audited.

Per series: pixels scrubbed (burned-in text), headers de-identified (Annex E + options, keyed
pseudonyms and date shifts), each file written and then re-scanned byte-wise for every value
that was removed. A series is written to deid/ only when every file passed; otherwise it is
quarantined for human review and never reaches training. Reports: scrubbed with a deny list
from the study's own headers and the patient's date offset, then audited the same way.
Audit records (audit/deid/) say what was done where, never with the values.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import pydicom

from appliance.catalog import Catalog, SeriesRow
from appliance.config import DeidSection
from appliance.deid.audit import scan_bytes, scan_file
from appliance.deid.dicom import DeidOptions, deidentify_dataset, write_deidentified
from appliance.deid.keys import DeidKeys
from appliance.deid.pixels import PixelPolicy, load_pixel_filters, scrub_pixels
from appliance.deid.text import deny_list_from_dataset, scrub_report
from appliance.errors import BadInputError
from appliance.faults import checkpoint
from appliance.fsutil import atomic_write
from appliance.preprocess.stage import worker_count
from appliance.progress import Progress, SilentProgress
from appliance.quarantine import quarantine_item
from appliance.workspace import Workspace

STAGE = "deid"
REPORT_STAGE = "deid_report"


@dataclass
class DeidSummary:
    series_done: int = 0
    series_skipped: int = 0
    series_quarantined: int = 0
    files_written: int = 0
    files_pixels_cleaned: int = 0
    reports_done: int = 0
    reports_skipped: int = 0
    reports_quarantined: int = 0
    audit_hits: int = 0
    bytes_in: int = 0
    quarantine_ids: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def options_from_config(cfg: DeidSection) -> DeidOptions:
    return DeidOptions(
        retain_longitudinal_modified_dates=cfg.retain_longitudinal_modified_dates,
        retain_patient_characteristics=cfg.retain_patient_characteristics,
        retain_device_identity=cfg.retain_device_identity,
        clean_descriptors=cfg.clean_descriptors,
        clean_pixel_data=cfg.clean_pixel_data,
        retain_safe_private=cfg.retain_safe_private,
    )


def load_keys(ws: Workspace) -> DeidKeys:
    path = ws.config().deid.key_file
    return DeidKeys.from_file(path if path.is_absolute() else ws.root / path)


def fingerprint(keys: DeidKeys, cfg: DeidSection) -> str:
    """Changes when the key, the options or the pixel/text settings change: output must be redone."""
    settings = json.dumps(cfg.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(f"{keys.fingerprint}|{settings}".encode()).hexdigest()[:16]


def deidentify_workspace(ws: Workspace, *, force: bool = False, progress: Progress | None = None) -> DeidSummary:
    """De-identify every ingested series and report that needs it."""
    cfg = ws.config().deid
    keys = load_keys(ws)
    options = options_from_config(cfg)
    _policy_from_spec(_policy_spec(ws, cfg))  # a bad filter file fails here, before any work
    fp = fingerprint(keys, cfg)
    progress = progress or SilentProgress()
    summary = DeidSummary()
    t0 = time.perf_counter()
    (ws.audit / "deid").mkdir(parents=True, exist_ok=True)
    _clean_staging(ws)
    with Catalog(ws.catalog_path) as catalog:
        run_id = catalog.start_run(STAGE)
        todo = []
        raw_removed = catalog.raw_removed_keys("series")
        for row in catalog.all_series():
            if not catalog.is_done("series", row.key, "ingest"):
                continue
            series_fp = f"{fp}:{row.geometry.get('content_sha', '')}"
            if not force and catalog.is_done("series", row.key, STAGE, series_fp):
                summary.series_skipped += 1
                continue
            if row.key in raw_removed:  # retention (or a backup without raw/) took the source: keep what exists
                summary.series_skipped += 1
                progress.note(f"series {row.key}: its raw copy was removed, so it keeps its earlier de-identification")
                continue
            todo.append((row, series_fp))
        progress.start("de-identify series", len(todo))
        _run_series_jobs(ws, catalog, todo, keys, options, _policy_spec(ws, cfg), cfg.workers, summary, progress)
        _deid_reports(ws, catalog, fp, keys, cfg, force, summary, progress)
        summary.seconds = time.perf_counter() - t0
        catalog.finish_run(run_id, "done", summary.to_dict())
    return summary


def _clean_staging(ws: Workspace) -> None:
    for staging in ws.deid.glob("*/.staging-*"):
        shutil.rmtree(staging, ignore_errors=True)


def _policy_spec(ws: Workspace, cfg: DeidSection) -> tuple[str | None, str]:
    """What a worker process needs to rebuild the pixel policy (parsed filters do not pickle)."""
    extra = None
    if cfg.pixel_filters is not None:
        extra = str(cfg.pixel_filters if cfg.pixel_filters.is_absolute() else ws.root / cfg.pixel_filters)
    return extra, cfg.ocr


@functools.lru_cache(maxsize=4)
def _policy_from_spec(spec: tuple[str | None, str]) -> PixelPolicy:
    extra, ocr = spec
    filters = load_pixel_filters()
    if extra is not None:
        filters = filters + load_pixel_filters(Path(extra))
    return PixelPolicy(filters=filters, ocr=ocr)


def _run_series_jobs(ws: Workspace, catalog: Catalog, todo: list[tuple[SeriesRow, str]], keys: DeidKeys,
                     options: DeidOptions, policy_spec: tuple, workers: int, summary: DeidSummary,
                     progress: Progress) -> None:
    """Series are de-identified in worker processes; only this process writes the catalog."""
    jobs = []
    for row, series_fp in todo:
        staging = ws.deid / row.study_key / f".staging-{row.key}"
        files = [str(ws.root / rel) for rel in catalog.series_files(row.key)]
        jobs.append((row, series_fp, staging, (files, str(staging), keys, options, policy_spec)))
    n_workers = worker_count(workers, len(jobs))
    pool = ProcessPoolExecutor(max_workers=n_workers) if n_workers > 1 else None
    try:
        futures = [(row, fp, staging, pool.submit(_deid_series_job, *args) if pool else None, args)
                   for row, fp, staging, args in jobs]
        for row, series_fp, staging, future, args in futures:
            try:
                result = future.result() if future is not None else _deid_series_job(*args)
            except BrokenProcessPool:
                result = {"error": "a worker process died (out of memory?)", "code": "worker_died"}
            _record_series(ws, catalog, row, series_fp, staging, result, summary, progress)
            progress.advance()
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def _deid_series_job(files: list[str], staging: str, keys: DeidKeys, options: DeidOptions,
                     policy_spec: tuple) -> dict:
    """One series into its staging folder (runs in a worker). Returns the audit records and counters,
    or the reason it cannot be made safe."""
    policy = _policy_from_spec(policy_spec)
    out_dir = Path(staging)
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    counters = {"bytes_in": 0, "pixels_cleaned": 0, "audit_hits": 0}
    records: dict[int, dict] = {}
    try:
        # Pass 1: files that are clean or cleanable on their own. Slices flagged for review (e.g. the
        # whole series says BurnedInAnnotation YES but only a few slices carry text) wait for pass 2.
        review: list[int] = []
        series_regions: list = []
        for index, path in enumerate(files):
            counters["bytes_in"] += os.path.getsize(path)
            record = _deid_file(pydicom.dcmread(path), out_dir / f"{index:05d}.dcm", keys, options, policy, (),
                                counters)
            if record is None:
                review.append(index)
                continue
            records[index] = record
            series_regions += [r for r in record.pop("_regions") if r.source in ("detector", "ocr")]
        # Pass 2: what the other slices of this series showed is where this series puts its text.
        # OCR already read these slices in pass 1 and found nothing, so it is not run again.
        known_layout = replace(policy, ocr="off")
        for index in review:
            record = _deid_file(pydicom.dcmread(files[index]), out_dir / f"{index:05d}.dcm", keys, options,
                                known_layout, series_regions, counters, final=True)
            record.pop("_regions")
            records[index] = record
    except BadInputError as err:
        shutil.rmtree(out_dir, ignore_errors=True)
        return {"error": err.reason, "code": err.code, **counters}
    return {"records": [records[i] for i in sorted(records)], **counters}


def _record_series(ws: Workspace, catalog: Catalog, row: SeriesRow, series_fp: str, staging: Path, result: dict,
                   summary: DeidSummary, progress: Progress) -> None:
    summary.bytes_in += result.get("bytes_in", 0)
    summary.files_pixels_cleaned += result.get("pixels_cleaned", 0)
    summary.audit_hits += result.get("audit_hits", 0)
    if "error" in result:
        shutil.rmtree(staging, ignore_errors=True)
        err = BadInputError(result["error"], result["code"])
        qid = quarantine_item(ws, catalog, stage=STAGE, kind="series", error=err, item_key=row.key,
                              sources=[row.raw_dir])
        with catalog.transaction():
            catalog.set_status("series", row.key, STAGE, "quarantined", fingerprint=series_fp, detail=err.code)
        summary.series_quarantined += 1
        summary.quarantine_ids.append(qid)
        progress.note(f"quarantined q{qid:06d} (series {row.key}): {err.reason}")
        return
    final = staging.parent / row.key
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    _write_audit(ws, f"{row.key}.json", {"series": row.key, "study": row.study_key, "fingerprint": series_fp,
                                         "files": result["records"]})
    with catalog.transaction():
        catalog.set_status("series", row.key, STAGE, "done", fingerprint=series_fp,
                           output=str(final.relative_to(ws.root)))
    summary.series_done += 1
    summary.files_written += len(result["records"])
    checkpoint("deid_series")


def _deid_file(ds: pydicom.Dataset, out_path: Path, keys: DeidKeys, options: DeidOptions, policy: PixelPolicy,
               series_regions, counters: dict, final: bool = False) -> dict | None:
    """One file: pixels, headers, write, audit. None when its pixels need the series' regions (pass 2);
    BadInputError when it cannot be made safe."""
    deny = deny_list_from_dataset(ds)
    regions = []
    if options.clean_pixel_data:
        pixels = scrub_pixels(ds, policy, known_phi=deny, series_regions=series_regions)
        if pixels.undecodable:
            raise BadInputError(f"cannot check for burned-in text: {pixels.reason}", "undecodable_pixels")
        if pixels.status == "needs_review":
            if not final:
                return None
            raise BadInputError(f"burned-in text cannot be removed with confidence: {pixels.reason}",
                                "burned_in_needs_review")
        if pixels.status == "cleaned":
            ds = pixels.dataset
            counters["pixels_cleaned"] += 1
            regions = pixels.regions
    result = deidentify_dataset(ds, keys, options)
    write_deidentified(result, out_path)
    hits = scan_file(out_path, result.removed_values | deny)
    if hits:
        counters["audit_hits"] += len(hits)
        kinds = sorted({h.kind for h in hits})
        raise BadInputError(f"leakage audit found {len(hits)} surviving value(s) ({', '.join(kinds)})",
                            "deid_audit_failed")
    return {"file": out_path.name, "actions": result.actions, "pixel_regions": [asdict(r) for r in regions],
            "removed_values": len(result.removed_values), "date_offset_applied": result.date_offset_days != 0,
            "_regions": regions}


def _deid_reports(ws: Workspace, catalog: Catalog, fp: str, keys: DeidKeys, cfg: DeidSection, force: bool,
                  summary: DeidSummary, progress: Progress) -> None:
    rows = catalog.db.execute("SELECT study_key, raw_path, sha256 FROM reports ORDER BY study_key").fetchall()
    progress.start("de-identify reports", len(rows))
    for r in rows:
        study_key, report_fp = r["study_key"], f"{fp}:{r['sha256'][:16]}"
        progress.advance()
        if not force and catalog.is_done("study", study_key, REPORT_STAGE, report_fp):
            summary.reports_skipped += 1
            continue
        ds = _first_header(ws, catalog, study_key)
        if ds is None:
            continue  # a report without images: nothing to train on, nothing to do
        deny = deny_list_from_dataset(ds)
        offset = keys.date_offset_days(str(ds.get("PatientID", "") or ""))
        text = (ws.root / r["raw_path"]).read_text()
        scrubbed = scrub_report(text, deny=deny, date_offset_days=offset, backend=cfg.report_backend)
        hits = scan_bytes(scrubbed.text.encode("utf-8"), deny, name="report.txt")
        if hits:
            err = BadInputError(f"leakage audit found {len(hits)} surviving value(s) in the report",
                                "deid_audit_failed")
            qid = quarantine_item(ws, catalog, stage=STAGE, kind="report", error=err, item_key=study_key,
                                  sources=[r["raw_path"]])
            with catalog.transaction():
                catalog.set_status("study", study_key, REPORT_STAGE, "quarantined", fingerprint=report_fp,
                                   detail=err.code)
            summary.reports_quarantined += 1
            summary.audit_hits += len(hits)
            summary.quarantine_ids.append(qid)
            progress.note(f"quarantined q{qid:06d} (report of study {study_key}): {err.reason}")
            continue
        out = ws.deid / study_key / "report.txt"
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, scrubbed.text)
        _write_audit(ws, f"{study_key}.report.json", {"study": study_key, "fingerprint": report_fp,
                                                      "replacements": scrubbed.replacements})
        with catalog.transaction():
            catalog.set_status("study", study_key, REPORT_STAGE, "done", fingerprint=report_fp,
                               output=str(out.relative_to(ws.root)))
        summary.reports_done += 1


def _first_header(ws: Workspace, catalog: Catalog, study_key: str) -> pydicom.Dataset | None:
    """Header of one raw image of the study: the source of its report's deny list and date offset."""
    row = catalog.db.execute(
        "SELECT i.raw_path FROM instances i JOIN series s ON s.key = i.series_key WHERE s.study_key = ? "
        "AND s.key NOT IN (SELECT key FROM raw_removed WHERE kind = 'series') "
        "ORDER BY i.key LIMIT 1", (study_key,)).fetchone()
    return pydicom.dcmread(ws.root / row["raw_path"], stop_before_pixels=True) if row else None


def _write_audit(ws: Workspace, name: str, record: dict) -> None:
    atomic_write(ws.audit / "deid" / name, json.dumps(record, indent=1, sort_keys=True, default=str))


@dataclass
class AuditReport:
    files_scanned: int = 0
    files_with_hits: int = 0
    hits: list[dict] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.hits

    def to_dict(self) -> dict:
        return {**asdict(self), "clean": self.clean}


def audit_output(ws: Workspace, directory: Path | None = None, progress: Progress | None = None) -> AuditReport:
    """Re-scan de-identified output for every value its raw source had removed, and PHI patterns.

    Files of a catalogued series are checked against that series' own removed values (recomputed
    from raw/ in memory); any other file under `directory` is checked for PHI patterns only.
    """
    directory = (directory or ws.deid).resolve()
    progress = progress or SilentProgress()
    cfg = ws.config().deid
    keys, options = load_keys(ws), options_from_config(cfg)
    report = AuditReport()
    covered: set[Path] = set()
    with Catalog(ws.catalog_path) as catalog:
        series_rows = {r.key: r for r in catalog.all_series()}
        # series whose raw copy was removed have no removed values to recompute: patterns only (below)
        raw_removed = catalog.raw_removed_keys("series")
        outputs = [(k, catalog.status("series", k, STAGE)) for k in series_rows if k not in raw_removed]
        outputs = [(k, ws.root / row["output"]) for k, row in outputs if row and row["status"] == "done"]
        outputs = [(k, d) for k, d in outputs if d.is_dir() and (d == directory or directory in d.parents)]
        progress.start("audit series", len(outputs))
        for key, out_dir in outputs:
            values: set[str] = set()
            for rel in catalog.series_files(key):
                ds = pydicom.dcmread(ws.root / rel)
                values |= deidentify_dataset(ds, keys, options).removed_values | deny_list_from_dataset(ds)
            for f in sorted(out_dir.glob("*.dcm")):
                _record_hits(report, scan_file(f, values, name=str(f.relative_to(ws.root))))
                covered.add(f)
            progress.advance()
        for r in catalog.db.execute("SELECT study_key, raw_path FROM reports").fetchall():
            out = ws.deid / r["study_key"] / "report.txt"
            if not out.is_file() or not (directory == out.parent or directory in out.parents):
                continue
            ds = _first_header(ws, catalog, r["study_key"])
            deny = deny_list_from_dataset(ds) if ds is not None else set()
            _record_hits(report, scan_file(out, deny, name=str(out.relative_to(ws.root))))
            covered.add(out)
    for f in sorted(p for p in directory.rglob("*") if p.is_file() and p not in covered and not p.name.startswith(".")):
        _record_hits(report, scan_file(f, (), name=str(f.relative_to(directory))))
    return report


def _record_hits(report: AuditReport, hits: list) -> None:
    report.files_scanned += 1
    if hits:
        report.files_with_hits += 1
        report.hits.extend(h.to_dict() for h in hits)
