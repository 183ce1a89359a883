"""Preprocess stage over the catalog: every de-identified series -> cache/<series>.npy (+ .json).

It reads the de-identified copies in deid/, never raw/. Projection radiographs (CR, DX, or a series whose
catalog geometry is a projection) go to `radiograph.py` and become cache/<series>.npy of shape (S, S);
everything else is a CT/MR volume. Work is spread over worker processes;
only this process writes the catalog. An item is `done` for a fingerprint made of the settings
and the de-identified series' own fingerprint, so changing site.yaml's preprocess section, or
re-ingesting or re-de-identifying a series, redoes exactly what is affected.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path

from appliance.catalog import Catalog, SeriesRow
from appliance.config import PreprocessSection
from appliance.errors import BadInputError
from appliance.faults import checkpoint
from appliance.hardware import visible_cpu_count
from appliance.ingest.projection import is_projection
from appliance.preprocess import PreprocessSettings, preprocess_series
from appliance.preprocess.radiograph import RadiographSettings, preprocess_radiograph
from appliance.progress import Progress, SilentProgress
from appliance.quarantine import quarantine_item
from appliance.workspace import Workspace

STAGE = "preprocess"


@dataclass
class PreprocessSummary:
    series_done: int = 0
    series_skipped: int = 0
    series_quarantined: int = 0
    series_failed: int = 0
    series_waiting_for_deid: int = 0
    slices_in: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    quarantine_ids: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def settings_from_config(section: PreprocessSection) -> PreprocessSettings:
    return PreprocessSettings(
        spacing_mm=tuple(section.spacing_mm), canvas=tuple(section.canvas), hu_clip=tuple(section.hu_clip),
        antialias=section.antialias,
    )


def radiograph_settings_from_config(section: PreprocessSection) -> RadiographSettings:
    return RadiographSettings(size=section.radiograph_size)


def is_radiograph(row: SeriesRow) -> bool:
    """A projection image series (cached as one 2D image) rather than a slice stack."""
    return is_projection(row.modality) or row.geometry.get("kind") == "projection"


def worker_count(requested: int, n_items: int) -> int:
    """`requested` workers, or one per usable core (at most 8) when 0; never more than items."""
    n = requested if requested > 0 else min(visible_cpu_count(), 8)
    return max(1, min(n, n_items))


def preprocess_workspace(
    ws: Workspace,
    *,
    force: bool = False,
    series_keys: list[str] | None = None,
    workers: int | None = None,
    progress: Progress | None = None,
) -> PreprocessSummary:
    """Build the training cache for every ingested series that needs it."""
    cfg = ws.config().preprocess
    settings = settings_from_config(cfg)
    radiograph_settings = radiograph_settings_from_config(cfg)
    progress = progress or SilentProgress()
    summary = PreprocessSummary()
    t0 = time.perf_counter()
    ws.cache.mkdir(exist_ok=True)
    with Catalog(ws.catalog_path) as catalog:
        run_id = catalog.start_run(STAGE)
        wanted = set(series_keys) if series_keys is not None else None
        todo: list[tuple[SeriesRow, str, list[str]]] = []
        for row in catalog.all_series():
            if wanted is not None and row.key not in wanted:
                continue
            deid = catalog.status("series", row.key, "deid")
            if deid is None or deid["status"] != "done":
                # training data comes only from de-identified copies; raw/ is never read here
                summary.series_waiting_for_deid += int(catalog.is_done("series", row.key, "ingest"))
                continue
            kind_fp = radiograph_settings.fingerprint() if is_radiograph(row) else settings.fingerprint()
            fingerprint = f"{kind_fp}:{deid['fingerprint']}"
            if not force and catalog.is_done("series", row.key, STAGE, fingerprint):
                summary.series_skipped += 1
                continue
            files = sorted(str(f) for f in (ws.root / deid["output"]).glob("*.dcm"))
            todo.append((row, fingerprint, files))

        progress.start("preprocess series", len(todo))
        n_workers = worker_count(workers if workers is not None else cfg.workers, len(todo))
        if todo:
            _run_jobs(ws, catalog, todo, settings, n_workers, summary, progress, radiograph_settings)
        summary.seconds = time.perf_counter() - t0
        catalog.finish_run(run_id, "done", summary.to_dict())
    return summary


def _job(files: list[str], out_stem: str, settings: PreprocessSettings, min_slices: int) -> dict:
    """Runs in a worker process; returns what the catalog records, or the bad-input reason."""
    try:
        cached = preprocess_series([Path(f) for f in files], Path(out_stem), settings, min_slices=min_slices)
    except BadInputError as err:
        return {"error": err.reason, "code": err.code}
    return {"shape": list(cached.shape), "nbytes": Path(cached.npy_path).stat().st_size}


def _radiograph_job(files: list[str], out_stem: str, settings: RadiographSettings) -> dict:
    """Runs in a worker process; one projection image -> cache, or the bad-input reason."""
    try:
        cached = preprocess_radiograph([Path(f) for f in files], Path(out_stem), settings)
    except BadInputError as err:
        return {"error": err.reason, "code": err.code}
    return {"shape": list(cached.shape), "nbytes": Path(cached.npy_path).stat().st_size}


def _run_jobs(ws: Workspace, catalog: Catalog, todo: list[tuple[SeriesRow, str, list[str]]],
              settings: PreprocessSettings, n_workers: int, summary: PreprocessSummary, progress: Progress,
              radiograph_settings: RadiographSettings | None = None) -> None:
    min_slices = min(3, ws.config().ingest.min_slices)
    radiograph_settings = radiograph_settings or RadiographSettings()

    def submit(pool: ProcessPoolExecutor | None, row: SeriesRow, files: list[str]) -> Future | dict:
        stem = str(ws.cache / row.key)
        if is_radiograph(row):
            job, args = _radiograph_job, (files, stem, radiograph_settings)
        else:
            job, args = _job, (files, stem, settings, min_slices)
        if pool is None:
            return job(*args)
        return pool.submit(job, *args)

    pool = ProcessPoolExecutor(max_workers=n_workers) if n_workers > 1 else None
    try:
        pending = [(row, fp, submit(pool, row, files)) for row, fp, files in todo]
        for row, fingerprint, job in pending:
            with catalog.transaction():
                catalog.set_status("series", row.key, STAGE, "running", fingerprint=fingerprint)
            try:
                result = job.result() if isinstance(job, Future) else job
            except BrokenProcessPool:
                result = {"crash": "a worker process died (out of memory?)"}
            except Exception as exc:  # an unexpected bug in one series must not stop the others
                result = {"crash": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
            _record(ws, catalog, row, fingerprint, result, summary, progress)
            progress.advance()
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def _record(ws: Workspace, catalog: Catalog, row: SeriesRow, fingerprint: str, result: dict,
            summary: PreprocessSummary, progress: Progress) -> None:
    if "crash" in result:
        with catalog.transaction():
            catalog.set_status("series", row.key, STAGE, "failed", fingerprint=fingerprint, detail=result["crash"])
        summary.series_failed += 1
        progress.note(f"preprocess failed for series {row.key}: {result['crash']} (re-run to retry)")
        return
    if "error" in result:
        err = BadInputError(result["error"], result["code"])
        qid = quarantine_item(ws, catalog, stage=STAGE, kind="series", error=err, item_key=row.key,
                              sources=[row.raw_dir])
        with catalog.transaction():
            catalog.set_status("series", row.key, STAGE, "quarantined", fingerprint=fingerprint, detail=err.code)
        summary.series_quarantined += 1
        summary.quarantine_ids.append(qid)
        progress.note(f"quarantined q{qid:06d} (series {row.key}): {err.reason}")
        return
    with catalog.transaction():
        catalog.set_status("series", row.key, STAGE, "done", fingerprint=fingerprint,
                           output=f"cache/{row.key}.npy")
    summary.series_done += 1
    summary.slices_in += row.n_instances
    summary.bytes_in += row.nbytes
    summary.bytes_out += result["nbytes"]
    checkpoint("preprocess_series")
