"""Backup and restore on a workspace that went through ingest, de-identification, preprocessing and
labels: round trips with and without raw/, keys, damaged archives, and the rfm commands afterwards."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import tarfile

import pydicom
import pytest

from appliance.backup import BackupError, backup_workspace, generate_backup_key, read_backup_info, restore_workspace
from appliance.catalog import SCHEMA_VERSION, Catalog, catalog_schema_version
from appliance.cli import main
from appliance.errors import BadInputError
from appliance.quarantine import quarantine_item
from appliance.workspace import open_workspace

PHI_FILE_NAME = "00000_SMITH_JOHN_19570312.dcm"
COPIED = ("deid", "cache", "labels", "audit", "exports")


@pytest.fixture
def site(trainable):
    """The labelled workspace plus one quarantined file whose name is identifiable."""
    with Catalog(trainable.catalog_path) as cat:
        quarantine_item(trainable, cat, stage="ingest", kind="file",
                        error=BadInputError("not a DICOM file", "not_dicom"),
                        files={PHI_FILE_NAME: b"SMITH^JOHN junk"}, sources=["/pacs/SMITH_JOHN/x.dcm"])
    return trainable


@pytest.fixture
def raw_key(tmp_path):
    key = tmp_path / "keys" / "backup.key"
    generate_backup_key(key)
    return key


def _hashes(root, folders=COPIED) -> dict[str, str]:
    """SHA-256 per file; an SQLite file by its content (the online copy is the same data, other pages)."""
    return {str(p.relative_to(root)): _content_hash(p)
            for name in folders for p in sorted((root / name).rglob("*")) if p.is_file()}


def _content_hash(path) -> str:
    if path.read_bytes()[:16] != b"SQLite format 3\x00":
        return hashlib.sha256(path.read_bytes()).hexdigest()
    db = sqlite3.connect(path)
    try:
        return hashlib.sha256("\n".join(db.iterdump()).encode()).hexdigest()
    finally:
        db.close()


def _members(archive) -> list[str]:
    with tarfile.open(archive) as tar:
        return tar.getnames()


def test_round_trip_without_raw(site, tmp_path, capsys):
    archive = tmp_path / "site.tar"
    # a running appliance: a committed row still only in the WAL, and another writer mid-transaction
    live = Catalog(site.catalog_path)
    live.set_status("series", "live-row", "ingest", "done")
    writer = sqlite3.connect(site.catalog_path, isolation_level=None, timeout=1)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO meta(key, value) VALUES ('uncommitted', 'x')")
    try:
        summary = backup_workspace(site, archive)
    finally:
        writer.execute("ROLLBACK")
        writer.close()
        live.close()
    assert summary.catalog_schema_version == SCHEMA_VERSION and not summary.include_raw
    assert {"catalog.sqlite", "labels/cache.sqlite"} <= set(summary.sqlite_snapshots)

    names = _members(archive)
    assert names[0] == "backup.json" and names[-1] == "manifest.json"
    assert "workspace/raw/.key_salt" in names
    assert not [n for n in names if n.startswith(("workspace/raw/", "workspace/quarantine/", "workspace/secrets/",
                                                  "encrypted/")) and n != "workspace/raw/.key_salt"]
    blob = archive.read_bytes()
    assert b"SMITH" not in blob, "nothing of quarantine/ is in a backup without raw"
    assert (site.root / "secrets" / "deid.key").read_bytes().strip() not in blob
    info = read_backup_info(archive)
    assert info["include_raw"] is False and info["catalog_schema_version"] == SCHEMA_VERSION

    target = tmp_path / "restored"
    result = restore_workspace(archive, target)
    ws = open_workspace(target)
    assert _hashes(target) == _hashes(site.root)
    assert (target / "raw" / ".key_salt").read_bytes() == (site.raw / ".key_salt").read_bytes()
    assert ws.opaque_key("study", "1.2.3") == site.opaque_key("study", "1.2.3"), "keys still match new data"
    assert not (target / "secrets").exists() and not result.deid_key_present
    assert (target / "raw").stat().st_mode & 0o077 == 0
    with Catalog(ws.catalog_path) as cat, Catalog(site.catalog_path) as orig:
        assert cat.counts() == orig.counts()
        assert cat.is_done("series", "live-row", "ingest"), "the WAL content is in the online copy"
        assert cat.db.execute("SELECT 1 FROM meta WHERE key = 'uncommitted'").fetchone() is None
        assert len(cat.raw_removed_keys("series")) == 6, "raw copies not in the backup are recorded as gone"
    assert result.raw_recorded_missing == {"series": 6, "study": 6}

    # the restored workspace works: without the de-identification key, a clear one-line error
    capsys.readouterr()
    assert main(["status", "-w", str(target)]) == 0
    assert main(["deid", "-w", str(target)]) == 2
    assert "de-identification key file not found" in capsys.readouterr().err
    shutil.copytree(site.root / "secrets", target / "secrets")  # the key, restored from its own copy
    assert main(["deid", "-w", str(target)]) == 0
    assert main(["preprocess", "-w", str(target)]) == 0
    assert main(["deid", "audit", "-w", str(target)]) == 0
    assert main(["labels", "-w", str(target)]) == 0
    assert main(["retention", "-w", str(target)]) == 0
    assert _hashes(target, ("deid", "cache")) == _hashes(site.root, ("deid", "cache")), "nothing was redone"


def test_round_trip_with_encrypted_raw(site, tmp_path, raw_key):
    archive = tmp_path / "site-raw.tar"
    summary = backup_workspace(site, archive, include_raw=True, raw_key_file=raw_key)
    n_raw = sum(1 for d in ("raw", "quarantine") for p in (site.root / d).rglob("*") if p.is_file()) - 1  # not the salt
    assert summary.raw_files == n_raw > 6

    names = _members(archive)
    assert not [n for n in names if n.startswith(("workspace/raw/", "workspace/quarantine/"))
                and n != "workspace/raw/.key_salt"]
    blob = archive.read_bytes()
    report = next(site.raw.glob("*/report.txt")).read_bytes()
    header = pydicom.dcmread(next(site.raw.glob("*/*/*.dcm")), stop_before_pixels=True)
    assert report[:40] not in blob, "raw content is only stored encrypted"
    for identifier in (header.PatientName, header.PatientID, header.StudyInstanceUID):
        assert str(identifier).encode() not in blob
    assert b"SMITH" not in blob, "file names under quarantine/ are encrypted too"
    assert raw_key.read_bytes().strip() not in blob

    target = tmp_path / "restored"
    result = restore_workspace(archive, target, raw_key_file=raw_key)
    assert result.raw_files == n_raw and result.include_raw
    assert _hashes(target, ("raw", "quarantine", *COPIED)) == _hashes(site.root, ("raw", "quarantine", *COPIED))
    assert (target / "quarantine" / "q000001" / PHI_FILE_NAME).read_bytes() == b"SMITH^JOHN junk"
    with Catalog(target / "catalog.sqlite") as cat:
        assert cat.raw_removed_keys("series") == set()
        for row in cat.db.execute("SELECT raw_path, sha256 FROM instances"):
            assert hashlib.sha256((target / row["raw_path"]).read_bytes()).hexdigest() == row["sha256"]
    assert all(p.stat().st_mode & 0o077 == 0 for p in (target / "raw").rglob("*"))


def test_raw_needs_a_separate_key(site, tmp_path, raw_key):
    with pytest.raises(BackupError, match="needs --raw-key"):
        backup_workspace(site, tmp_path / "a.tar", include_raw=True)
    with pytest.raises(BackupError, match="must not be the de-identification key"):
        backup_workspace(site, tmp_path / "b.tar", include_raw=True, raw_key_file=site.root / "secrets" / "deid.key")
    copy = tmp_path / "copy-of-deid.key"
    shutil.copy(site.root / "secrets" / "deid.key", copy)
    with pytest.raises(BackupError, match="must not be the de-identification key"):
        backup_workspace(site, tmp_path / "c.tar", include_raw=True, raw_key_file=copy)
    with pytest.raises(BackupError, match="already exists"):
        generate_backup_key(raw_key)
    assert not list(tmp_path.glob("*.tar"))


def test_wrong_or_missing_raw_key_writes_nothing(site, tmp_path, raw_key):
    archive = tmp_path / "site-raw.tar"
    backup_workspace(site, archive, include_raw=True, raw_key_file=raw_key)
    other = tmp_path / "other.key"
    generate_backup_key(other)
    with pytest.raises(BackupError, match="not the key this backup was made with") as err:
        restore_workspace(archive, tmp_path / "t1", raw_key_file=other)
    assert other.read_text().strip() not in str(err.value)
    with pytest.raises(BackupError, match="give --raw-key"):
        restore_workspace(archive, tmp_path / "t2")
    assert not (tmp_path / "t1").exists() and not (tmp_path / "t2").exists()
    assert not list(tmp_path.glob(".restoring-*"))


@pytest.mark.parametrize("damage", ["truncated", "plain-byte", "encrypted-byte", "manifest-entry"])
def test_damaged_archive_is_refused_before_writing(site, tmp_path, raw_key, damage):
    archive = tmp_path / "site-raw.tar"
    backup_workspace(site, archive, include_raw=True, raw_key_file=raw_key)
    data = bytearray(archive.read_bytes())
    with tarfile.open(archive) as tar:
        members = {m.name: m for m in tar.getmembers()}
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "plain-byte":
        data[members["workspace/labels/labels.csv"].offset_data + 5] ^= 0x01
    elif damage == "encrypted-byte":
        data[members["encrypted/00000003"].offset_data + 100] ^= 0x01
    else:  # the manifest itself edited to hide a change
        m = members["manifest.json"]
        text = bytes(data[m.offset_data:m.offset_data + m.size])
        manifest = json.loads(text)
        manifest["members"][2]["sha256"] = "0" * 64
        edited = json.dumps(manifest, indent=1).encode()
        edited = edited + b" " * (len(text) - len(edited)) if len(edited) <= len(text) else edited[: len(text)]
        data[m.offset_data:m.offset_data + m.size] = edited
    archive.write_bytes(bytes(data))
    target = tmp_path / "restored"
    with pytest.raises(BackupError) as err:
        restore_workspace(archive, target, raw_key_file=raw_key)
    message = str(err.value)
    assert "\n" not in message and ("damaged" in message or "truncated" in message or "manifest" in message)
    assert not target.exists() and not list(tmp_path.glob(".restoring-*")), "nothing was written"


def test_non_empty_target_is_refused_unless_forced(site, tmp_path):
    archive = tmp_path / "site.tar"
    backup_workspace(site, archive)
    target = tmp_path / "existing"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(BackupError, match="not empty"):
        restore_workspace(archive, target)
    result = restore_workspace(archive, target, force=True)
    assert (result.moved_aside / "notes.txt").read_text() == "keep me", "moved aside, not deleted"
    assert not (target / "notes.txt").exists() and (target / "site.yaml").is_file()
    with pytest.raises(BackupError, match="already exists"):
        backup_workspace(site, archive)
    with pytest.raises(BackupError, match="outside the workspace"):
        backup_workspace(site, site.root / "exports" / "b.tar")


def test_restore_migrates_an_old_catalog_and_refuses_a_newer_one(site, tmp_path):
    db = sqlite3.connect(site.catalog_path)  # the catalog as appliance v1 (schema 1) left it
    db.execute("DROP TABLE raw_removed")
    db.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    backup_workspace(site, tmp_path / "v1.tar")
    result = restore_workspace(tmp_path / "v1.tar", tmp_path / "restored")
    assert (result.catalog_schema_from, result.catalog_schema_to) == (1, SCHEMA_VERSION)
    assert catalog_schema_version(tmp_path / "restored" / "catalog.sqlite") == SCHEMA_VERSION
    assert catalog_schema_version(tmp_path / "restored" / "catalog.sqlite.v1.bak") == 1

    db = sqlite3.connect(site.catalog_path)
    db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    db.commit()
    db.close()
    backup_workspace(site, tmp_path / "newer.tar")
    with pytest.raises(BackupError, match="newer than this appliance"):
        restore_workspace(tmp_path / "newer.tar", tmp_path / "r2")
    assert not (tmp_path / "r2").exists()


def test_cli_backup_key_backup_restore(site, tmp_path, capsys):
    key = tmp_path / "raw.key"
    assert main(["backup-key", str(key)]) == 0
    assert key.stat().st_mode & 0o077 == 0
    archive = tmp_path / "b.tar"
    assert main(["backup", str(archive), "-w", str(site.root), "--include-raw", "--raw-key", str(key)]) == 0
    out = capsys.readouterr().out
    assert "encrypted" in out and "secrets/" in out
    assert main(["restore", str(archive), str(tmp_path / "r")]) == 2
    assert "give --raw-key" in capsys.readouterr().err
    assert main(["restore", str(archive), str(tmp_path / "r"), "--raw-key", str(key)]) == 0
    assert "de-identification key is not in backups" in capsys.readouterr().out
    assert main(["status", "-w", str(tmp_path / "r")]) == 0
