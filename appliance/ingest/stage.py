"""Ingest: a folder of DICOM files and report sidecars -> raw/ copies + catalog, bad input quarantined.

Two passes. The first reads headers only, classifies every file and groups images by series.
The second validates each series as a whole (every file fully readable, consistent geometry,
no missing or duplicate slices), copies its files into raw/ and records it in the catalog in
one transaction. Projection radiographs (CR, DX; see projection.py) have no stack to check: each
image is validated on its own and a series keeps its good images. A series is the unit of work: a
killed run leaves at most one series half-copied, which the next run redoes.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import MediaStorageDirectoryStorage

from appliance.catalog import Catalog
from appliance.errors import BadInputError
from appliance.faults import checkpoint
from appliance.fsutil import atomic_write
from appliance.geometry import SliceHeader, analyze_stack
from appliance.ingest.projection import ProjectionHeader, is_projection, projection_geometry
from appliance.ingest.reports import BadReportLine, read_report_sidecar
from appliance.ingest.scan import SourceFile, find_report_sidecars, walk_source
from appliance.progress import Progress, SilentProgress
from appliance.quarantine import clean_stale_staging, quarantine_item
from appliance.workspace import Workspace

STAGE = "ingest"


@dataclass
class IngestSummary:
    files_seen: int = 0
    files_accepted: int = 0
    series_accepted: int = 0
    studies_touched: int = 0
    bytes_accepted: int = 0
    quarantined: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    reports_linked: int = 0
    reports_pending: int = 0
    studies_without_report: int = 0
    quarantine_ids: list[int] = field(default_factory=list)
    new_series: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def n_quarantined(self) -> int:
        return sum(self.quarantined.values())

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["n_quarantined"], d["n_skipped"] = self.n_quarantined, self.n_skipped
        return d


@dataclass
class _Image:
    """Header facts of one image file, from pass 1."""

    source: SourceFile
    sop_uid: str
    study_uid: str
    series_uid: str
    modality: str
    accession: str | None
    patient_id: str | None
    header: SliceHeader | ProjectionHeader  # ProjectionHeader for CR/DX
    already_stored: bool = False  # read back from raw/ to merge with new slices of the same series


class _Run:
    """State of one ingest run: workspace, catalog, summary and the quarantine writer."""

    def __init__(self, ws: Workspace, catalog: Catalog, progress: Progress):
        self.ws, self.catalog, self.progress = ws, catalog, progress
        self.summary = IngestSummary()

    def skip(self, reason: str, n: int = 1) -> None:
        self.summary.skipped[reason] = self.summary.skipped.get(reason, 0) + n

    def quarantine(
        self, kind: str, error: BadInputError, sources: list[SourceFile] | None = None,
        item_key: str | None = None, payload: dict[str, bytes] | None = None,
    ) -> int:
        """Copy the offending input into quarantine/ with its reason; report it in one line."""
        files = dict(payload or {})
        for i, src in enumerate(sources or []):
            try:
                files[f"{i:05d}_{Path(src.where.replace('!', '_')).name}"] = src.read_bytes()
            except OSError:
                pass  # unreadable source: reason.json still says what and where
        qid = quarantine_item(self.ws, self.catalog, stage=STAGE, kind=kind, error=error, files=files,
                              sources=[s.where for s in sources or []], item_key=item_key)
        self.summary.quarantined[error.code] = self.summary.quarantined.get(error.code, 0) + 1
        self.summary.quarantine_ids.append(qid)
        self.progress.note(f"quarantined q{qid:06d} ({kind}): {error.reason}")
        return qid


def ingest_folder(
    ws: Workspace,
    source: Path,
    *,
    reports: Path | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> IngestSummary:
    """Ingest every DICOM file under `source` and the report sidecar(s) into the workspace."""
    source = Path(source)
    if not source.is_dir():
        raise BadInputError(f"source folder {source} does not exist", "missing_source")
    cfg = ws.config().ingest
    progress = progress or SilentProgress()
    t0 = time.perf_counter()
    _clean_stale_partials(ws)
    with Catalog(ws.catalog_path) as catalog:
        run_id = catalog.start_run(STAGE)
        run = _Run(ws, catalog, progress)
        sidecars = [reports] if reports else ([cfg.reports] if cfg.reports else find_report_sidecars(source))
        images = _read_headers(run, source, cfg, skip=tuple(p for p in sidecars if p))
        by_series: dict[tuple[str, str], list[_Image]] = defaultdict(list)
        for img in images:
            by_series[(img.study_uid, img.series_uid)].append(img)

        progress.start("ingest series", len(by_series))
        studies: set[str] = set()
        for (study_uid, series_uid), members in sorted(by_series.items()):
            accepted = _ingest_series(run, study_uid, series_uid, members, cfg.min_slices, force)
            if accepted:
                studies.add(ws.opaque_key("study", study_uid))
            progress.advance()
        run.summary.studies_touched = len(studies)

        for sidecar in sidecars:
            if sidecar is not None:
                _ingest_reports(run, Path(sidecar), force)
        _link_pending_reports(run)
        run.summary.studies_without_report = catalog.db.execute(
            "SELECT count(*) FROM studies WHERE key NOT IN (SELECT study_key FROM reports)"
        ).fetchone()[0]
        run.summary.seconds = time.perf_counter() - t0
        catalog.finish_run(run_id, "done", run.summary.to_dict())
    return run.summary


# --- pass 1: headers ---------------------------------------------------------------------------
def _read_headers(run: _Run, source: Path, cfg, skip: tuple[Path, ...]) -> list[_Image]:
    files = list(walk_source(source, read_zip=cfg.read_zip, skip=skip))
    run.progress.start("read headers", len(files))
    images: list[_Image] = []
    for src in files:
        run.summary.files_seen += 1
        try:
            img = _classify(src, cfg.modalities)
        except BadInputError as err:
            run.quarantine("file", err, [src])
        except _Skip as why:
            run.skip(str(why))
        else:
            images.append(img)
        run.progress.advance()
    return images


class _Skip(Exception):
    """A readable file the appliance does not use (counted, not quarantined)."""


def _classify(src: SourceFile, modalities: tuple[str, ...]) -> _Image:
    try:
        with src.open() as fh:
            ds = pydicom.dcmread(fh, stop_before_pixels=True)
    except OSError as exc:
        raise BadInputError(f"file cannot be read ({exc.strerror or type(exc).__name__})", "unreadable") from None
    except InvalidDicomError:
        raise BadInputError("not a DICOM file (no DICM marker or file meta)", "not_dicom") from None
    except Exception as exc:  # pydicom raises many types on damaged headers
        raise BadInputError(f"DICOM header cannot be parsed ({type(exc).__name__})", "unreadable") from None
    sop_class = ds.get("SOPClassUID") or getattr(ds.get("file_meta"), "MediaStorageSOPClassUID", None)
    if sop_class == MediaStorageDirectoryStorage:
        raise _Skip("dicomdir_index")
    sop_name = getattr(sop_class, "name", "") or ""
    if "Image Storage" not in sop_name:
        raise _Skip("non_image_object")
    for tag in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        if not ds.get(tag):
            raise BadInputError(f"image without {tag}", "missing_uid")
    modality = str(ds.get("Modality", "")).upper()
    if modality not in modalities:
        raise _Skip(f"modality_{modality or 'missing'}_not_accepted")
    if "LOCALIZER" in [str(v).upper() for v in (ds.get("ImageType") or [])]:
        raise _Skip("localizer")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise BadInputError("multi-frame (enhanced) image: not supported yet", "multiframe_unsupported")
    header = _header(ds, modality)
    return _Image(
        source=src, sop_uid=str(ds.SOPInstanceUID), study_uid=str(ds.StudyInstanceUID),
        series_uid=str(ds.SeriesInstanceUID), modality=modality,
        accession=str(ds.get("AccessionNumber", "") or "").strip() or None,
        patient_id=str(ds.get("PatientID", "") or "").strip() or None, header=header,
    )


def _header(ds, modality: str) -> SliceHeader | ProjectionHeader:
    """Projection images (CR, DX) are checked one by one; slices need their place in a stack."""
    if is_projection(modality):
        return ProjectionHeader.from_dataset(ds)
    return SliceHeader.from_dataset(ds)  # GeometryError (a BadInputError) when geometry is missing


# --- pass 2: one series at a time ---------------------------------------------------------------
def _ingest_series(run: _Run, study_uid: str, series_uid: str, members: list[_Image], min_slices: int,
                   force: bool) -> bool:
    ws, catalog = run.ws, run.catalog
    study_key, series_key = ws.opaque_key("study", study_uid), ws.opaque_key("series", series_uid)
    existing = catalog.series(series_key)
    sop_keys = {ws.opaque_key("sop", m.sop_uid): m for m in members}
    if existing and not force and catalog.is_done("series", series_key, STAGE):
        known = {r["key"] for r in catalog.db.execute(
            "SELECT key FROM instances WHERE series_key = ?", (series_key,))}
        new = {k: m for k, m in sop_keys.items() if k not in known}
        run.skip("already_ingested", len(members) - len(new))
        if not new:
            return False
        if series_key in catalog.raw_removed_keys("series"):  # the earlier slices are gone from raw/
            run.quarantine("series", BadInputError(
                f"{len(new)} new slice(s) of a series whose raw copy was removed (retention or restore); send the "
                "whole series again and ingest it with --force", "raw_removed"), [m.source for m in new.values()],
                item_key=series_key)
            return False
        # more slices of a series ingested earlier (a PACS push in parts): validate the union
        members = list(new.values()) + _images_from_raw(ws, catalog, series_key, study_uid, series_uid)
        sop_keys = {ws.opaque_key("sop", m.sop_uid): m for m in members}

    if len(sop_keys) < len(members):
        run.skip("duplicate_file", len(members) - len(sop_keys))  # same SOP instance sent twice
        members = list(sop_keys.values())
    projection = is_projection(members[0].modality)
    if len(members) < min_slices and not projection:
        run.skip("too_few_slices", len(members))
        return False

    # every file fully readable, pixel data complete
    good: list[tuple[str, _Image, bytes]] = []
    bad = 0
    first_error: BadInputError | None = None
    for key, img in sorted(sop_keys.items()):
        try:
            data = img.source.read_bytes()
            _check_pixel_data(data, exact_length=projection)
        except BadInputError as err:
            run.quarantine("file", err, [img.source])
            bad += 1
            first_error = first_error or err
        except OSError as exc:
            run.quarantine("file", BadInputError(f"file cannot be read ({type(exc).__name__})", "unreadable"),
                           [img.source])
            bad += 1
        else:
            good.append((key, img, data))

    if projection:
        # radiographs stand alone: the good images of a series are kept, the bad ones are in quarantine
        if not good:
            with catalog.transaction():
                catalog.set_status("series", series_key, STAGE, "quarantined",
                                   detail=first_error.code if first_error else "no_usable_image")
            return False
        geo = projection_geometry([img.header for _, img, _ in good])
        _store_series(run, study_key, series_key, study_uid, series_uid, good, geo)
        checkpoint("ingest_series")
        return True
    try:
        if bad:
            raise BadInputError(f"{bad} of {len(members)} slices unusable (quarantined separately)",
                                "incomplete_series")
        geometry = analyze_stack([img.header for _, img, _ in good], min_slices=min_slices)
    except BadInputError as err:
        run.quarantine("series", err, [img.source for _, img, _ in good], item_key=series_key)
        with catalog.transaction():
            catalog.set_status("series", series_key, STAGE, "quarantined", detail=err.code)
        return False

    _store_series(run, study_key, series_key, study_uid, series_uid, good, _stack_geometry(good, geometry))
    checkpoint("ingest_series")
    return True


def _check_pixel_data(data: bytes, exact_length: bool = False) -> None:
    """Raise BadInputError when the file is cut short or its pixel data is incomplete; with `exact_length`
    also when the native pixel data is longer than Rows x Columns says (the header's dimensions are wrong)."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        pixel = ds.get("PixelData")
    except Exception as exc:
        raise BadInputError(f"file is damaged or truncated ({type(exc).__name__})", "truncated") from None
    if pixel is None:
        raise BadInputError("image without pixel data", "no_pixel_data")
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        try:
            frames = list(pydicom.encaps.generate_frames(pixel, number_of_frames=int(ds.get("NumberOfFrames", 1) or 1)))
        except Exception:
            frames = []
        if not frames or not all(frames):
            raise BadInputError("compressed pixel data is incomplete", "truncated")
        return
    expected = (int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1))
                * int(ds.get("NumberOfFrames", 1) or 1) * int(ds.BitsAllocated) + 7) // 8
    if len(pixel) < expected:
        raise BadInputError(f"pixel data truncated ({len(pixel)} of {expected} bytes)", "truncated")
    if exact_length and len(pixel) > expected + 1:  # one byte of padding to an even length is allowed
        raise BadInputError(f"pixel data has {len(pixel)} bytes but Rows x Columns need {expected} "
                            "(wrong image dimensions in the header)", "bad_dimensions")


def _stack_geometry(good: list[tuple[str, _Image, bytes]], geometry) -> dict:
    """The catalog's geometry record of a slice series."""
    return {
        "n_slices": len(good), "rows": geometry.rows, "cols": geometry.cols,
        "pixel_spacing_mm": list(geometry.pixel_spacing), "tilt_deg": round(geometry.tilt_deg, 3),
        "gap_min_mm": round(min(geometry.gaps_mm), 3), "gap_max_mm": round(max(geometry.gaps_mm), 3),
        "uneven_spacing": geometry.uneven_spacing,
    }


def _store_series(run: _Run, study_key: str, series_key: str, study_uid: str, series_uid: str,
                  good: list[tuple[str, _Image, bytes]], geometry: dict) -> None:
    ws, catalog = run.ws, run.catalog
    series_dir = ws.raw / study_key / series_key
    series_dir.mkdir(parents=True, exist_ok=True)
    instances = []
    for key, _, data in good:
        rel = f"raw/{study_key}/{series_key}/{key}.dcm"
        atomic_write(ws.root / rel, data)
        instances.append((key, rel, hashlib.sha256(data).hexdigest(), len(data)))
    first = good[0][1]
    _update_study_identity(ws, study_key, study_uid, first.accession, first.patient_id, series_key, series_uid)
    geo = {**geometry,
           "content_sha": hashlib.sha256("".join(sorted(i[2] for i in instances)).encode()).hexdigest()[:16]}
    with catalog.transaction():
        catalog.upsert_study(
            study_key,
            ws.opaque_key("accession", first.accession) if first.accession else None,
            ws.opaque_key("patient", first.patient_id) if first.patient_id else None,
        )
        catalog.replace_series(series_key, study_key, first.modality, f"raw/{study_key}/{series_key}", geo, instances)
        catalog.set_status("series", series_key, STAGE, "done")
    s = run.summary
    s.series_accepted += 1
    new = [(img, len(data)) for _, img, data in good if not img.already_stored]
    s.files_accepted += len(new)
    s.bytes_accepted += sum(n for _, n in new)
    s.new_series.append(series_key)


def _images_from_raw(ws: Workspace, catalog: Catalog, series_key: str, study_uid: str, series_uid: str) -> list[_Image]:
    images = []
    for rel in catalog.series_files(series_key):
        path = ws.root / rel
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        images.append(_Image(
            source=SourceFile(ws.root, rel), sop_uid=str(ds.SOPInstanceUID), study_uid=study_uid,
            series_uid=series_uid, modality=str(ds.Modality).upper(),
            accession=str(ds.get("AccessionNumber", "") or "").strip() or None,
            patient_id=str(ds.get("PatientID", "") or "").strip() or None, header=_header(ds, str(ds.Modality)),
            already_stored=True,
        ))
    return images


def _update_study_identity(ws: Workspace, study_key: str, study_uid: str, accession: str | None,
                           patient_id: str | None, series_key: str, series_uid: str) -> None:
    """raw/<study>/study.json: the identifiers behind the opaque keys (PHI zone only)."""
    path = ws.raw / study_key / "study.json"
    info = json.loads(path.read_text()) if path.exists() else {"series": {}}
    info.update(study_instance_uid=study_uid, accession_number=accession, patient_id=patient_id)
    info["series"][series_key] = series_uid
    atomic_write(path, json.dumps(info, indent=2, sort_keys=True).encode())


def _clean_stale_partials(ws: Workspace) -> None:
    """Remove what a killed run left half-written (never a completed file)."""
    for tmp in ws.raw.rglob(".*.partial"):
        tmp.unlink(missing_ok=True)
    clean_stale_staging(ws)


# --- reports -----------------------------------------------------------------------------------
def _ingest_reports(run: _Run, sidecar: Path, force: bool) -> None:
    if not sidecar.is_file():
        raise BadInputError(f"report sidecar {sidecar.name} not found", "missing_sidecar")
    seen: dict[str, str] = {}
    for rec in read_report_sidecar(sidecar):
        if isinstance(rec, BadReportLine):
            run.quarantine("report", rec.error, payload={"line.txt": rec.raw.encode()})
            continue
        study_key = _study_key_for_report(run, rec.study_instance_uid, rec.accession_number)
        sha = hashlib.sha256(rec.text.encode()).hexdigest()
        ident = study_key or f"pending-{hashlib.sha256((rec.study_instance_uid or rec.accession_number or '').encode()).hexdigest()[:16]}"
        if ident in seen and seen[ident] != sha:
            run.quarantine("report", BadInputError(
                f"report line {rec.line} conflicts with an earlier report of the same study", "conflicting_report"),
                payload={"line.txt": rec.text.encode()})
            continue
        seen[ident] = sha
        if study_key is None:
            _queue_pending_report(run.ws, rec)
            continue
        _store_report(run, study_key, rec.text, sha, force)


def _study_key_for_report(run: _Run, study_uid: str | None, accession: str | None) -> str | None:
    ws, catalog = run.ws, run.catalog
    if study_uid:
        key = ws.opaque_key("study", study_uid)
        if catalog.has_study(key):
            return key
    if accession:
        return catalog.study_for_accession(ws.opaque_key("accession", accession))
    return None


def _store_report(run: _Run, study_key: str, text: str, sha: str, force: bool) -> None:
    if run.catalog.report_sha(study_key) == sha and not force:
        run.skip("report_already_ingested")
        return
    rel = f"raw/{study_key}/report.txt"
    atomic_write(run.ws.root / rel, text.encode())
    with run.catalog.transaction():
        run.catalog.upsert_report(study_key, rel, sha, len(text))
    run.summary.reports_linked += 1


def _queue_pending_report(ws: Workspace, rec) -> None:
    """Reports that arrive before their images wait in raw/pending_reports/ and are linked later."""
    pending = ws.raw / "pending_reports"
    pending.mkdir(exist_ok=True)
    ident = f"{rec.study_instance_uid or ''}|{rec.accession_number or ''}"
    name = hashlib.sha256(ident.encode()).hexdigest()[:16]
    atomic_write(pending / f"{name}.json", json.dumps({
        "study_instance_uid": rec.study_instance_uid, "accession_number": rec.accession_number, "text": rec.text,
    }).encode())


def _link_pending_reports(run: _Run) -> None:
    pending = run.ws.raw / "pending_reports"
    if not pending.is_dir():
        return
    for path in sorted(pending.glob("*.json")):
        rec = json.loads(path.read_text())
        key = _study_key_for_report(run, rec["study_instance_uid"], rec["accession_number"])
        if key is None:
            continue
        _store_report(run, key, rec["text"], hashlib.sha256(rec["text"].encode()).hexdigest(), force=False)
        path.unlink()
    run.summary.reports_pending = len(list(pending.glob("*.json")))
