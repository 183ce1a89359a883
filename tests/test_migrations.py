"""Catalog schema versions: old catalogs are migrated on open (with a copy first), newer ones refused."""

from __future__ import annotations

import sqlite3

import pytest

from appliance import catalog as catalog_module
from appliance.catalog import SCHEMA, SCHEMA_VERSION, Catalog, CatalogError, catalog_schema_version
from appliance.cli import main
from appliance.doctor import catalog_check
from appliance.workspace import init_workspace


def _old_catalog(path, version: int | None) -> None:
    """A catalog as an earlier appliance left it: the version-1 tables, some rows, and the given
    schema_version row (None: version 0, no row at all)."""
    db = sqlite3.connect(path)
    db.executescript(SCHEMA)
    db.execute("INSERT INTO studies(key, accession_key, patient_key, created_at) VALUES ('s1', 'a1', 'p1', 'x')")
    db.execute("INSERT INTO series(key, study_key, modality, n_instances, nbytes, raw_dir, geometry, created_at) "
               "VALUES ('se1', 's1', 'CT', 1, 10, 'raw/s1/se1', '{}', 'x')")
    db.execute("INSERT INTO stage_status(kind, key, stage, status, updated_at) VALUES ('series', 'se1', 'ingest', "
               "'done', 'x')")
    if version is not None:
        db.execute("INSERT INTO meta(key, value) VALUES ('schema_version', ?)", (str(version),))
    db.commit()
    db.close()


def _dump(path) -> list[str]:
    db = sqlite3.connect(path)
    try:
        return list(db.iterdump())
    finally:
        db.close()


def _tables(path) -> set[str]:
    db = sqlite3.connect(path)
    try:
        return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        db.close()


@pytest.mark.parametrize("version", [None, 1], ids=["v0-no-version-row", "v1"])
def test_old_catalog_is_migrated_with_a_copy_kept(tmp_path, version):
    path = tmp_path / "catalog.sqlite"
    _old_catalog(path, version)
    assert "raw_removed" not in _tables(path)
    assert catalog_schema_version(path) == (version or 0)
    assert "migrated to v2 on next use" in catalog_check(path)[2]

    with Catalog(path) as cat:
        assert (cat.migration.from_version, cat.migration.to_version) == (version or 0, SCHEMA_VERSION)
        assert cat.is_done("series", "se1", "ingest"), "rows survive the migration"
        assert cat.series("se1").raw_dir == "raw/s1/se1"
        with cat.transaction():  # the new table works
            cat.record_raw_removed("series", "se1", 1, 10, "test")
        assert cat.raw_removed_keys("series") == {"se1"}
    backup = cat.migration.backup
    assert backup == tmp_path / f"catalog.sqlite.v{version or 0}.bak"
    assert "raw_removed" not in _tables(backup), "the copy is the catalog as it was before"
    assert catalog_schema_version(backup) == (version or 0)
    assert catalog_schema_version(path) == SCHEMA_VERSION
    assert catalog_check(path) == ("catalog", True, f"schema v{SCHEMA_VERSION} (current)")

    with Catalog(path) as cat:  # reopening: nothing more to do, no second copy
        assert cat.migration.backup is None and cat.migration.from_version == SCHEMA_VERSION
    assert len(list(tmp_path.glob("*.bak"))) == 1


def test_new_catalog_starts_at_the_current_version_without_a_copy(tmp_path):
    with Catalog(tmp_path / "c.sqlite") as cat:
        assert cat.migration.from_version == 0 and cat.migration.backup is None
    assert catalog_schema_version(tmp_path / "c.sqlite") == SCHEMA_VERSION
    assert "raw_removed" in _tables(tmp_path / "c.sqlite")
    assert not list(tmp_path.glob("*.bak"))


def test_newer_catalog_is_refused_and_left_untouched(tmp_path):
    path = tmp_path / "catalog.sqlite"
    _old_catalog(path, SCHEMA_VERSION + 1)
    before = _dump(path)
    with pytest.raises(CatalogError, match=rf"schema v{SCHEMA_VERSION + 1} is newer than this appliance"):
        Catalog(path)
    assert _dump(path) == before
    assert catalog_check(path)[1] is False


def test_failed_migration_rolls_back_and_says_so(tmp_path, monkeypatch):
    path = tmp_path / "catalog.sqlite"
    _old_catalog(path, 1)

    def broken(db):
        db.execute("CREATE TABLE half_done (x)")
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(catalog_module, "MIGRATIONS", [(1, catalog_module._migrate_to_1), (2, broken)])
    with pytest.raises(CatalogError, match="migration from schema v1 to v2 failed .*unchanged"):
        Catalog(path)
    assert catalog_schema_version(path) == 1
    assert "half_done" not in _tables(path), "the failed step was rolled back"
    monkeypatch.undo()
    with Catalog(path) as cat:  # the real migration still works afterwards
        assert cat.migration.to_version == SCHEMA_VERSION


def test_doctor_shows_the_schema_version(tmp_path, capsys):
    ws = init_workspace(tmp_path / "site")
    assert main(["doctor", "-w", str(ws.root)]) == 0
    assert f"schema v{SCHEMA_VERSION} (current)" in capsys.readouterr().out
