"""Retention of identifiable copies: raw/ series and studies, and quarantine/ folders, after a policy.

A series' raw copy is removed only once it is ingested, de-identified and preprocessed, so every
later stage keeps working from deid/ and cache/. A study's remaining raw files (report.txt and
study.json, which maps keys back to UIDs) go with its last series once its report is
de-identified. Each removal is recorded in the catalog (table raw_removed) before the files are
deleted, so a run killed in between is finished by the next one, and the stages know the copy
is gone on purpose. Nothing outside raw/ and quarantine/ is ever touched.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from appliance.catalog import Catalog
from appliance.errors import ApplianceError
from appliance.progress import Progress, SilentProgress
from appliance.workspace import Workspace

LATER_STAGES = ("ingest", "deid", "preprocess")  # a series' raw copy may go once all are done


@dataclass(frozen=True)
class RetentionItem:
    kind: str  # series, study or quarantine
    key: str  # series key, study key or quarantine folder
    age_days: float
    n_files: int
    nbytes: int
    remove: bool
    reason: str  # why it goes, or why it stays


@dataclass
class RetentionSummary:
    applied: bool
    raw_days: int | None
    keep_quarantine_days: int | None
    items: list[RetentionItem] = field(default_factory=list)  # everything old enough, removed or kept
    too_recent: int = 0
    files_removed: int = 0
    bytes_removed: int = 0
    seconds: float = 0.0

    def count(self, kind: str, remove: bool = True) -> int:
        return sum(1 for i in self.items if i.kind == kind and i.remove == remove)

    @property
    def to_remove(self) -> list[RetentionItem]:
        return [i for i in self.items if i.remove]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["removed" if self.applied else "would_remove"] = {k: self.count(k) for k in ("series", "study", "quarantine")}
        d["kept"] = {k: self.count(k, remove=False) for k in ("series", "study", "quarantine")}
        return d


def enforce_retention(ws: Workspace, *, apply: bool = False, now: datetime | None = None,
                      progress: Progress | None = None) -> RetentionSummary:
    """What the site.yaml retention policy removes; removes it only with `apply` (default: dry run)."""
    policy = ws.config().retention
    now = now or datetime.now(timezone.utc)
    progress = progress or SilentProgress()
    t0 = time.perf_counter()
    summary = RetentionSummary(applied=apply, raw_days=policy.raw_days,
                               keep_quarantine_days=policy.keep_quarantine_days)
    with Catalog(ws.catalog_path) as catalog:
        if policy.raw_days is not None:
            _plan_raw(ws, catalog, now - timedelta(days=policy.raw_days), now, summary)
        if policy.keep_quarantine_days is not None:
            _plan_quarantine(ws, catalog, now - timedelta(days=policy.keep_quarantine_days), now, summary)
        if apply:
            todo = summary.to_remove
            progress.start("retention", len(todo))
            for item in todo:
                _remove(ws, catalog, item, _reason(policy, item.kind))
                summary.files_removed += item.n_files
                summary.bytes_removed += item.nbytes
                progress.advance()
    summary.seconds = time.perf_counter() - t0
    return summary


def _reason(policy, kind: str) -> str:
    return (f"retention: quarantine kept {policy.keep_quarantine_days} days" if kind == "quarantine"
            else f"retention: raw kept {policy.raw_days} days")


def _age(created_at: str, now: datetime) -> tuple[datetime, float]:
    when = datetime.fromisoformat(created_at)
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when, (now - when).total_seconds() / 86400


def _plan_raw(ws: Workspace, catalog: Catalog, cutoff: datetime, now: datetime, summary: RetentionSummary) -> None:
    removed = catalog.raw_removed_keys("series")
    gone_by_study: dict[str, list[bool]] = {}
    for row in catalog.db.execute("SELECT key, study_key, raw_dir, created_at FROM series ORDER BY study_key, key"):
        folder = _inside(ws.root / row["raw_dir"], ws.raw)
        when, age = _age(row["created_at"], now)
        if row["key"] in removed:
            gone_by_study.setdefault(row["study_key"], []).append(True)
            if folder.exists():  # recorded, then the run was killed before deleting
                summary.items.append(RetentionItem("series", row["key"], age, *_size(folder), True,
                                                   "finishing an earlier removal"))
            continue
        if when > cutoff:
            summary.too_recent += 1
            gone_by_study.setdefault(row["study_key"], []).append(False)
            continue
        waiting = [stage for stage in LATER_STAGES if not _done(catalog, row["key"], stage)]
        reason = (f"kept: {waiting[0]} not done ({_status(catalog, row['key'], waiting[0])})" if waiting
                  else "older than the policy, de-identified and preprocessed")
        summary.items.append(RetentionItem("series", row["key"], age, *_size(folder), not waiting, reason))
        gone_by_study.setdefault(row["study_key"], []).append(not waiting)
    _plan_studies(ws, catalog, gone_by_study, cutoff, now, summary)


def _plan_studies(ws: Workspace, catalog: Catalog, gone_by_study: dict[str, list[bool]], cutoff: datetime,
                  now: datetime, summary: RetentionSummary) -> None:
    """A study's report.txt and study.json go once none of its series is left in raw/."""
    removed = catalog.raw_removed_keys("study")
    reports = {r["study_key"]: r["created_at"] for r in catalog.db.execute("SELECT study_key, created_at FROM reports")}
    for study_key, gone in sorted(gone_by_study.items()):
        if not all(gone):
            continue
        files = [p for p in (ws.raw / study_key / "report.txt", ws.raw / study_key / "study.json") if p.is_file()]
        n_files, nbytes = len(files), sum(p.stat().st_size for p in files)
        created = reports.get(study_key)
        age = _age(created, now)[1] if created else 0.0
        if study_key in removed:
            if files:
                summary.items.append(RetentionItem("study", study_key, age, n_files, nbytes, True,
                                                   "finishing an earlier removal"))
            continue
        if created and _age(created, now)[0] > cutoff:
            summary.too_recent += 1
            continue
        row = catalog.status("study", study_key, "deid_report")
        if created and (row is None or row["status"] != "done"):
            reason = f"kept: report not de-identified ({row['status'] if row else 'not started'})"
            summary.items.append(RetentionItem("study", study_key, age, n_files, nbytes, False, reason))
            continue
        summary.items.append(RetentionItem("study", study_key, age, n_files, nbytes, True,
                                           "every series removed" + (", report de-identified" if created else "")))


def _plan_quarantine(ws: Workspace, catalog: Catalog, cutoff: datetime, now: datetime,
                     summary: RetentionSummary) -> None:
    removed = catalog.raw_removed_keys("quarantine")
    for q in catalog.quarantined():
        folder = _inside(ws.quarantine / q.folder, ws.quarantine)
        when, age = _age(q.created_at, now)
        if q.folder in removed:
            if folder.exists():
                summary.items.append(RetentionItem("quarantine", q.folder, age, *_size(folder), True,
                                                   "finishing an earlier removal"))
            continue
        if when > cutoff:
            summary.too_recent += 1
            continue
        summary.items.append(RetentionItem("quarantine", q.folder, age, *_size(folder), True,
                                           f"older than the policy ({q.stage}: {q.code})"))


def _remove(ws: Workspace, catalog: Catalog, item: RetentionItem, reason: str) -> None:
    """Record first, then delete: a kill in between leaves a record whose files the next run deletes."""
    with catalog.transaction():
        catalog.record_raw_removed(item.kind, item.key, item.n_files, item.nbytes, reason)
    if item.kind == "series":
        folder = _inside(ws.root / catalog.series(item.key).raw_dir, ws.raw)
        if folder.exists():
            shutil.rmtree(folder)
        _drop_if_empty(folder.parent, ws.raw)
    elif item.kind == "study":
        for name in ("report.txt", "study.json"):
            _inside(ws.raw / item.key / name, ws.raw).unlink(missing_ok=True)
        _drop_if_empty(ws.raw / item.key, ws.raw)
    else:
        folder = _inside(ws.quarantine / item.key, ws.quarantine)
        if folder.exists():
            shutil.rmtree(folder)


def record_missing_raw(ws: Workspace, reason: str) -> dict[str, int]:
    """Record every series and study whose raw copy is absent (e.g. restored from a backup without
    raw/), so the stages treat them like series removed by the retention policy."""
    counts = {"series": 0, "study": 0}
    with Catalog(ws.catalog_path) as catalog, catalog.transaction():
        removed = catalog.raw_removed_keys("series")
        studies: dict[str, bool] = {}
        for row in catalog.all_series():
            present = (ws.root / row.raw_dir).is_dir()
            studies[row.study_key] = studies.get(row.study_key, False) or present
            if not present and row.key not in removed:
                catalog.record_raw_removed("series", row.key, row.n_instances, row.nbytes, reason)
                counts["series"] += 1
        removed = catalog.raw_removed_keys("study")
        for study_key, any_series_present in studies.items():
            if not any_series_present and study_key not in removed and not (ws.raw / study_key).exists():
                catalog.record_raw_removed("study", study_key, 0, 0, reason)
                counts["study"] += 1
    return counts


def _done(catalog: Catalog, key: str, stage: str) -> bool:
    row = catalog.status("series", key, stage)
    return row is not None and row["status"] == "done"


def _status(catalog: Catalog, key: str, stage: str) -> str:
    row = catalog.status("series", key, stage)
    return row["status"] if row else "not started"


def _size(folder: Path) -> tuple[int, int]:
    files = [p for p in folder.rglob("*") if p.is_file()] if folder.is_dir() else []
    return len(files), sum(p.stat().st_size for p in files)


def _inside(path: Path, zone: Path) -> Path:
    """`path`, checked to lie inside raw/ or quarantine/ (never deid/, cache/, labels/, runs/, exports/)."""
    resolved, zone = path.resolve(), zone.resolve()
    if resolved == zone or zone not in resolved.parents or path.is_symlink():
        raise ApplianceError(f"retention refuses to touch {path.name}: not inside {zone.name}/")
    return resolved


def _drop_if_empty(folder: Path, zone: Path) -> None:
    if folder.is_dir() and folder.resolve() != zone.resolve() and not any(folder.iterdir()):
        folder.rmdir()
