"""SQLite catalog of studies, series, instances and reports, with a status per stage.

Rows refer to items by opaque keys (see Workspace.opaque_key): the catalog holds no names,
identifiers, UIDs or source paths, so it can be inspected or backed up outside the PHI zone.
A stage marks an item `done` (with the fingerprint of the settings it used) in the same
transaction that records its output; a re-run skips done items with a matching fingerprint,
and an item left `running` by a killed process is simply redone.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from appliance.errors import ApplianceError

SCHEMA_VERSION = 2  # bump with a new entry in MIGRATIONS

# The version-1 tables. Executed (idempotently) on every open as well, so a table added here with
# CREATE ... IF NOT EXISTS needs no migration; changing an existing table does (see MIGRATIONS).
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS studies (
    key TEXT PRIMARY KEY,
    accession_key TEXT,
    patient_key TEXT,
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS studies_accession ON studies(accession_key);
CREATE TABLE IF NOT EXISTS series (
    key TEXT PRIMARY KEY,
    study_key TEXT NOT NULL REFERENCES studies(key),
    modality TEXT NOT NULL,
    n_instances INTEGER NOT NULL,
    nbytes INTEGER NOT NULL,
    raw_dir TEXT NOT NULL,
    geometry TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS series_study ON series(study_key);
CREATE TABLE IF NOT EXISTS instances (
    key TEXT PRIMARY KEY,
    series_key TEXT NOT NULL REFERENCES series(key),
    raw_path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    nbytes INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_key);
CREATE TABLE IF NOT EXISTS reports (
    study_key TEXT PRIMARY KEY,
    raw_path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    n_chars INTEGER NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS stage_status (
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    stage TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('running', 'done', 'failed', 'quarantined', 'queued')),
    fingerprint TEXT NOT NULL DEFAULT '',
    detail TEXT NOT NULL DEFAULT '',
    output TEXT NOT NULL DEFAULT '',
    updated_at TEXT NOT NULL,
    PRIMARY KEY (kind, key, stage)
);
CREATE TABLE IF NOT EXISTS quarantine (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    stage TEXT NOT NULL,
    kind TEXT NOT NULL,
    item_key TEXT,
    code TEXT NOT NULL,
    reason TEXT NOT NULL,
    folder TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS label_review (
    study_key TEXT NOT NULL,
    source TEXT NOT NULL,
    reason TEXT NOT NULL,
    proposed TEXT,
    resolved TEXT,
    created_at TEXT NOT NULL,
    resolved_at TEXT,
    PRIMARY KEY (study_key, source)
);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    stage TEXT NOT NULL,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    status TEXT NOT NULL,
    summary TEXT NOT NULL DEFAULT '{}'
);
"""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class SeriesRow:
    key: str
    study_key: str
    modality: str
    n_instances: int
    nbytes: int
    raw_dir: str
    geometry: dict


@dataclass(frozen=True)
class QuarantineRow:
    id: int
    stage: str
    kind: str
    item_key: str | None
    code: str
    reason: str
    folder: str
    created_at: str


class CatalogError(ApplianceError):
    """The catalog cannot be opened with this version of the appliance."""


# --- schema versions and migrations ----------------------------------------------------------------
# Version 0: a catalog without a schema_version row (or without the meta table).
# Version 1: SCHEMA above.
# Version 2: raw_removed, what the retention policy (or a restore without raw/) took out of raw/ and
# quarantine/, so that later stages know those copies are gone on purpose.
def _migrate_to_1(db: sqlite3.Connection) -> None:
    for statement in _statements(SCHEMA):
        db.execute(statement)


def _migrate_to_2(db: sqlite3.Connection) -> None:
    db.execute("""
        CREATE TABLE IF NOT EXISTS raw_removed (
            kind TEXT NOT NULL CHECK (kind IN ('series', 'study', 'quarantine')),
            key TEXT NOT NULL,
            n_files INTEGER NOT NULL,
            nbytes INTEGER NOT NULL,
            reason TEXT NOT NULL,
            removed_at TEXT NOT NULL,
            PRIMARY KEY (kind, key)
        )""")


# (version reached, function): applied in order, each at most once, all in one transaction.
MIGRATIONS: list[tuple[int, Callable[[sqlite3.Connection], None]]] = [(1, _migrate_to_1), (2, _migrate_to_2)]


@dataclass(frozen=True)
class Migration:
    from_version: int
    to_version: int
    backup: Path | None  # copy of the catalog taken before migrating (None: nothing was migrated)


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


def read_schema_version(db: sqlite3.Connection) -> int:
    """The catalog's schema version; 0 for a catalog from before versions were recorded."""
    if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone() is None:
        return 0
    row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    if row is None:
        return 0
    try:
        return int(row[0])
    except ValueError:
        raise CatalogError(f"catalog schema_version {row[0]!r} is not a number: the file is damaged") from None


def catalog_schema_version(path: Path) -> int | None:
    """Read the version without opening for writing (nothing is migrated); None when there is no catalog."""
    path = Path(path)
    if not path.is_file():
        return None
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        return read_schema_version(db)
    finally:
        db.close()


def migrate(db: sqlite3.Connection, path: Path) -> Migration:
    """Bring the catalog to SCHEMA_VERSION: a copy of the file first, then every step in one transaction.

    A catalog newer than this code is refused (an older appliance must not write to it). Two
    processes opening an old catalog at once are serialised by the write lock; the second finds
    it migrated.
    """
    version = read_schema_version(db)
    _refuse_newer(version)
    if version == SCHEMA_VERSION:
        return Migration(version, version, None)
    db.execute("BEGIN IMMEDIATE")
    try:
        version = read_schema_version(db)
        _refuse_newer(version)
        fresh = db.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0] == 0
        backup = None if fresh or version == SCHEMA_VERSION else _copy_before_migrating(path, version)
        for target, step in MIGRATIONS:
            if version < target:
                step(db)
        db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        db.execute("INSERT INTO meta(key, value) VALUES ('schema_version', ?) "
                   "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (str(SCHEMA_VERSION),))
    except BaseException as exc:
        db.execute("ROLLBACK")
        if isinstance(exc, CatalogError) or not isinstance(exc, Exception):
            raise
        raise CatalogError(f"catalog migration from schema v{version} to v{SCHEMA_VERSION} failed "
                           f"({type(exc).__name__}); the catalog is unchanged") from exc
    db.execute("COMMIT")
    return Migration(version, SCHEMA_VERSION, backup)


def _refuse_newer(version: int) -> None:
    if version > SCHEMA_VERSION:
        raise CatalogError(f"catalog schema v{version} is newer than this appliance (v{SCHEMA_VERSION}): "
                           "upgrade the appliance, or restore a backup made with this version")


def _copy_before_migrating(path: Path, version: int) -> Path:
    """catalog.sqlite.v<N>.bak, a consistent copy made with SQLite's online backup API."""
    target = path.with_name(f"{path.name}.v{version}.bak")
    if target.exists():
        target = path.with_name(f"{path.name}.v{version}.{datetime.now(timezone.utc):%Y%m%dT%H%M%S%f}.bak")
    source = sqlite3.connect(path, timeout=30)  # a second connection: the caller holds the write lock
    copy = sqlite3.connect(target)
    try:
        source.backup(copy)
    finally:
        copy.close()
        source.close()
    return target


class Catalog:
    """A thin, explicit wrapper over the SQLite file; one writer process at a time.

    Opening it migrates an older schema (see `migrate`); `self.migration` says what was done.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        try:
            self.migration = migrate(self.db, self.path)
        except BaseException:
            self.db.close()
            raise
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "Catalog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        else:
            self.db.execute("COMMIT")

    # --- studies, series, instances, reports -------------------------------------------------
    def upsert_study(self, key: str, accession_key: str | None, patient_key: str | None) -> None:
        self.db.execute(
            "INSERT INTO studies(key, accession_key, patient_key, created_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(key) DO UPDATE SET accession_key=coalesce(excluded.accession_key, accession_key), "
            "patient_key=coalesce(excluded.patient_key, patient_key)",
            (key, accession_key, patient_key, now()),
        )

    def study_for_accession(self, accession_key: str) -> str | None:
        row = self.db.execute("SELECT key FROM studies WHERE accession_key = ?", (accession_key,)).fetchone()
        return row["key"] if row else None

    def has_study(self, key: str) -> bool:
        return self.db.execute("SELECT 1 FROM studies WHERE key = ?", (key,)).fetchone() is not None

    def replace_series(
        self,
        key: str,
        study_key: str,
        modality: str,
        raw_dir: str,
        geometry: dict,
        instances: list[tuple[str, str, str, int]],
    ) -> None:
        """Record a series and its instances (key, raw_path, sha256, nbytes), replacing any earlier copy."""
        self.db.execute("DELETE FROM instances WHERE series_key = ?", (key,))
        self.db.execute("DELETE FROM series WHERE key = ?", (key,))
        self.db.execute(
            "INSERT INTO series(key, study_key, modality, n_instances, nbytes, raw_dir, geometry, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (key, study_key, modality, len(instances), sum(i[3] for i in instances), raw_dir,
             json.dumps(geometry, sort_keys=True), now()),
        )
        self.db.executemany(
            "INSERT INTO instances(key, series_key, raw_path, sha256, nbytes) VALUES (?, ?, ?, ?, ?)",
            [(k, key, p, h, n) for k, p, h, n in instances],
        )
        # raw/ holds the series (and its study's study.json) again
        self.db.execute("DELETE FROM raw_removed WHERE (kind = 'series' AND key = ?) OR (kind = 'study' AND key = ?)",
                        (key, study_key))

    def instance_sha(self, key: str) -> str | None:
        row = self.db.execute("SELECT sha256 FROM instances WHERE key = ?", (key,)).fetchone()
        return row["sha256"] if row else None

    def series(self, key: str) -> SeriesRow | None:
        row = self.db.execute("SELECT * FROM series WHERE key = ?", (key,)).fetchone()
        return _series_row(row) if row else None

    def all_series(self) -> list[SeriesRow]:
        return [_series_row(r) for r in self.db.execute("SELECT * FROM series ORDER BY study_key, key")]

    def series_files(self, key: str) -> list[str]:
        rows = self.db.execute("SELECT raw_path FROM instances WHERE series_key = ? ORDER BY key", (key,))
        return [r["raw_path"] for r in rows]

    def upsert_report(self, study_key: str, raw_path: str, sha256: str, n_chars: int) -> None:
        self.db.execute(
            "INSERT INTO reports(study_key, raw_path, sha256, n_chars, created_at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(study_key) DO UPDATE SET raw_path=excluded.raw_path, sha256=excluded.sha256, "
            "n_chars=excluded.n_chars",
            (study_key, raw_path, sha256, n_chars, now()),
        )
        self.db.execute("DELETE FROM raw_removed WHERE kind = 'study' AND key = ?", (study_key,))

    def report_sha(self, study_key: str) -> str | None:
        row = self.db.execute("SELECT sha256 FROM reports WHERE study_key = ?", (study_key,)).fetchone()
        return row["sha256"] if row else None

    # --- raw/ copies removed by the retention policy (or not restored from a backup) -------------
    def record_raw_removed(self, kind: str, key: str, n_files: int, nbytes: int, reason: str) -> None:
        self.db.execute(
            "INSERT INTO raw_removed(kind, key, n_files, nbytes, reason, removed_at) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(kind, key) DO UPDATE SET n_files=excluded.n_files, nbytes=excluded.nbytes, "
            "reason=excluded.reason, removed_at=excluded.removed_at",
            (kind, key, n_files, nbytes, reason, now()),
        )

    def raw_removed_keys(self, kind: str) -> set[str]:
        """Keys whose identifiable copies are gone on purpose: series (raw/<study>/<series>/), study
        (raw/<study>/ report.txt and study.json) or quarantine (quarantine/<folder>/)."""
        return {r["key"] for r in self.db.execute("SELECT key FROM raw_removed WHERE kind = ?", (kind,))}

    # --- stage status ----------------------------------------------------------------------
    def set_status(
        self, kind: str, key: str, stage: str, status: str, *, fingerprint: str = "", detail: str = "",
        output: str = "",
    ) -> None:
        self.db.execute(
            "INSERT INTO stage_status(kind, key, stage, status, fingerprint, detail, output, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(kind, key, stage) DO UPDATE SET "
            "status=excluded.status, fingerprint=excluded.fingerprint, detail=excluded.detail, "
            "output=excluded.output, updated_at=excluded.updated_at",
            (kind, key, stage, status, fingerprint, detail, output, now()),
        )

    def status(self, kind: str, key: str, stage: str) -> sqlite3.Row | None:
        return self.db.execute(
            "SELECT * FROM stage_status WHERE kind = ? AND key = ? AND stage = ?", (kind, key, stage)
        ).fetchone()

    def is_done(self, kind: str, key: str, stage: str, fingerprint: str = "") -> bool:
        row = self.status(kind, key, stage)
        return row is not None and row["status"] == "done" and row["fingerprint"] == fingerprint

    def keys_with_status(self, kind: str, stage: str, status: str = "done") -> list[str]:
        rows = self.db.execute(
            "SELECT key FROM stage_status WHERE kind = ? AND stage = ? AND status = ? ORDER BY key",
            (kind, stage, status),
        )
        return [r["key"] for r in rows]

    def stage_counts(self) -> dict[str, dict[str, int]]:
        """{stage: {status: count}} over all items."""
        out: dict[str, dict[str, int]] = {}
        for r in self.db.execute(
            "SELECT stage, status, count(*) AS n FROM stage_status GROUP BY stage, status ORDER BY stage"
        ):
            out.setdefault(r["stage"], {})[r["status"]] = r["n"]
        return out

    # --- quarantine and runs ---------------------------------------------------------------
    def add_quarantine(self, stage: str, kind: str, item_key: str | None, code: str, reason: str, folder: str) -> int:
        cur = self.db.execute(
            "INSERT INTO quarantine(stage, kind, item_key, code, reason, folder, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (stage, kind, item_key, code, reason, folder, now()),
        )
        return int(cur.lastrowid)

    def quarantined(self) -> list[QuarantineRow]:
        return [QuarantineRow(**dict(r)) for r in self.db.execute("SELECT * FROM quarantine ORDER BY id")]

    def start_run(self, stage: str) -> int:
        cur = self.db.execute(
            "INSERT INTO runs(stage, started_at, status) VALUES (?, ?, 'running')", (stage, now())
        )
        return int(cur.lastrowid)

    def finish_run(self, run_id: int, status: str, summary: dict) -> None:
        self.db.execute(
            "UPDATE runs SET finished_at = ?, status = ?, summary = ? WHERE id = ?",
            (now(), status, json.dumps(summary, sort_keys=True, default=str), run_id),
        )

    def counts(self) -> dict[str, int]:
        tables = ("studies", "series", "instances", "reports", "quarantine")
        return {t: self.db.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in tables}


def _series_row(row: sqlite3.Row) -> SeriesRow:
    d = dict(row)
    d.pop("created_at")
    d["geometry"] = json.loads(d["geometry"])
    return SeriesRow(**d)
