"""Backup and restore of a site workspace: one streamed tar with a checksum manifest.

In a backup: site.yaml, the catalog (copied with SQLite's online backup API, as is any other
SQLite file such as MLflow's or Prefect's, so a running appliance is safe), deid/, cache/,
labels/, runs/, exports/, audit/, models/ and any other workspace file, plus raw/.key_salt (the
per-site salt behind the catalog's opaque keys; without it the restored catalog no longer
matches new data). raw/ and quarantine/ hold identifiable data: they are included only on
request, and then encrypted (AES-256-GCM in 1 MiB chunks, a key derived per file with HKDF from
a key file the operator names; file names and sizes are inside the encryption too). Never in a
backup: secrets/ (the de-identification key), any file site.yaml names as a key or token, and
any *.key file; they are backed up separately (docs/operations-backup.md).

Archive members, in order:
  backup.json         format, appliance and catalog schema versions, whether raw/ is inside
  workspace/<path>    plain files
  encrypted/<n>       raw/ and quarantine/ files, encrypted
  encrypted/index     encrypted: n -> path, size and SHA-256 of the plaintext, plus the
                      SHA-256 of every plain member (so a key holder can tell a forged archive)
  manifest.json       size and SHA-256 of every member above

The checksums detect a damaged or truncated archive; a restore checks all of them (and
decrypts everything) before it writes a single file.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import sqlite3
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from appliance import __version__
from appliance.catalog import SCHEMA_VERSION, Catalog, read_schema_version
from appliance.config import SITE_YAML, load_site_config
from appliance.errors import ApplianceError
from appliance.progress import Progress, SilentProgress
from appliance.workspace import KEY_SALT_FILE, STAGE_DIRS, Workspace

FORMAT = "rfm-backup"
FORMAT_VERSION = 1
INFO, MANIFEST, INDEX = "backup.json", "manifest.json", "encrypted/index"
PLAIN, ENCRYPTED = "workspace/", "encrypted/"
PRIVATE_DIRS = ("raw", "quarantine")  # identifiable data: encrypted, and only on request
SECRET_DIRS = ("secrets",)
SQLITE_MAGIC = b"SQLite format 3\x00"
SKIP_SUFFIXES = ("-wal", "-shm", "-journal")  # SQLite side files: the online copy already holds their content
STAGING_PREFIXES = (".staging-", ".incoming-", ".importing-", ".restoring-")

MAGIC = b"RFMENC1\x00"
FILE_SALT = 16
HEADER = len(MAGIC) + FILE_SALT
CHUNK = 1 << 20
TAG = 16
KEY_BYTES = 32
BLOCK = 1 << 20


class BackupError(ApplianceError):
    """A backup cannot be made, or an archive cannot be restored (damaged, wrong key, ...)."""


@dataclass
class BackupSummary:
    archive: Path
    files: int = 0
    bytes: int = 0  # bytes of workspace files read (before encryption)
    raw_files: int = 0  # of which encrypted (raw/ and quarantine/)
    raw_bytes: int = 0
    sqlite_snapshots: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "path (why)", never a file's content
    include_raw: bool = False
    catalog_schema_version: int | None = None
    appliance_version: str = __version__
    archive_bytes: int = 0
    archive_sha256: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["archive"] = str(self.archive)
        return d


@dataclass
class RestoreSummary:
    target: Path
    files: int = 0
    bytes: int = 0
    raw_files: int = 0
    include_raw: bool = False
    catalog_schema_from: int | None = None
    catalog_schema_to: int | None = None
    catalog_copy_before_migration: str | None = None
    raw_recorded_missing: dict[str, int] = field(default_factory=dict)
    moved_aside: Path | None = None
    deid_key_present: bool = False
    deid_key_file: str = ""
    appliance_version_of_backup: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["target"], d["moved_aside"] = str(self.target), str(self.moved_aside) if self.moved_aside else None
        return d


# --- keys ------------------------------------------------------------------------------------------
def generate_backup_key(path: Path) -> str:
    """Write a new random 256-bit key (hex), readable by the owner only; never overwrite. Returns its
    fingerprint (what the archive records to tell the right key, not the key)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = os.urandom(KEY_BYTES)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise BackupError(f"key file {path.name} already exists; refusing to overwrite it") from None
    with os.fdopen(fd, "w") as fh:
        fh.write(key.hex() + "\n")
    return key_fingerprint(key)


def load_backup_key(path: Path) -> bytes:
    """A 256-bit key from a file: 64 hex characters, or 32 raw bytes. Errors name the file, never the key."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BackupError(f"raw key file {path.name} not found (create one with `rfm backup-key FILE`)") from None
    except OSError as exc:
        raise BackupError(f"raw key file {path.name} cannot be read ({exc.strerror})") from None
    key = _parse_key(data)
    if key is None or len(key) != KEY_BYTES:
        raise BackupError(f"raw key file {path.name} does not hold a 256-bit key (64 hex characters or 32 bytes)")
    return key


def key_fingerprint(key: bytes) -> str:
    return hashlib.sha256(b"rfm-backup-key\x00" + key).hexdigest()[:16]


def _parse_key(data: bytes) -> bytes | None:
    stripped = data.strip()
    try:
        if stripped and len(stripped) % 2 == 0:
            return bytes.fromhex(stripped.decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        pass
    return data


def _refuse_deid_key(ws: Workspace, key_path: Path, key: bytes) -> None:
    deid_key = ws.config().deid.key_file
    deid_key = deid_key if deid_key.is_absolute() else ws.root / deid_key
    same_file = deid_key.exists() and deid_key.resolve() == Path(key_path).resolve()
    if same_file or (deid_key.is_file() and _parse_key(deid_key.read_bytes()) == key):
        raise BackupError("the raw key must not be the de-identification key: make a separate one with "
                          "`rfm backup-key FILE`")


# --- encryption ----------------------------------------------------------------------------------
def _file_aead(key: bytes, salt: bytes) -> AESGCM:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt, info=b"rfm-backup-v1 file key")
    return AESGCM(hkdf.derive(key))


def _nonce(index: int, last: bool) -> bytes:
    return index.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


def encrypted_size(size: int) -> int:
    return HEADER + size + TAG * max(1, math.ceil(size / CHUNK))


class _EncryptingReader:
    """Reads `size` bytes of `src` and returns the encrypted stream (header, then sealed chunks; the
    last chunk's nonce is marked, so a cut at a chunk boundary does not decrypt)."""

    def __init__(self, src: BinaryIO, size: int, key: bytes, aad: bytes):
        salt = os.urandom(FILE_SALT)
        self.src, self.remaining, self.aad = src, size, aad
        self.aead = _file_aead(key, salt)
        self.buffer = bytearray(MAGIC + salt)
        self.index, self.finished = 0, False
        self.plain = hashlib.sha256()

    def _seal_next(self) -> None:
        data = self.src.read(min(CHUNK, self.remaining))
        if len(data) != min(CHUNK, self.remaining):
            raise BackupError("a file changed size while it was being backed up; run the backup again")
        self.remaining -= len(data)
        self.plain.update(data)
        last = self.remaining == 0
        self.buffer += self.aead.encrypt(_nonce(self.index, last), data, self.aad)
        self.index += 1
        self.finished = last

    def read(self, n: int = -1) -> bytes:
        while not self.finished and (n < 0 or len(self.buffer) < n):
            self._seal_next()
        n = len(self.buffer) if n < 0 else n
        out = bytes(self.buffer[:n])
        del self.buffer[:n]
        return out


def _decrypt(src: BinaryIO, size: int, key: bytes, aad: bytes, sink) -> str:
    """Decrypt one member of `size` stored bytes into sink(bytes); return the plaintext SHA-256."""
    header = _read_exact(src, HEADER)
    if header[:len(MAGIC)] != MAGIC:
        raise BackupError("an encrypted member has no valid header: the archive is damaged")
    aead = _file_aead(key, header[len(MAGIC):])
    body = size - HEADER
    n_chunks = math.ceil(body / (CHUNK + TAG)) if body > 0 else 0
    if n_chunks == 0:
        raise BackupError("an encrypted member is cut short: the archive is damaged")
    digest = hashlib.sha256()
    for index in range(n_chunks):
        sealed = _read_exact(src, min(CHUNK + TAG, body - index * (CHUNK + TAG)))
        try:
            data = aead.decrypt(_nonce(index, index == n_chunks - 1), sealed, aad)
        except InvalidTag:
            raise BackupError("an encrypted member does not decrypt with this raw key: wrong key, or the "
                              "archive is damaged") from None
        digest.update(data)
        sink(data)
    return digest.hexdigest()


def _read_exact(src: BinaryIO, n: int) -> bytes:
    data = src.read(n)
    if len(data) != n:
        raise BackupError("the archive ends in the middle of a member: it is truncated")
    return data


class _Hashing:
    """Wraps a reader or a writer and hashes every byte that passes."""

    def __init__(self, fileobj):
        self.fileobj, self.sha, self.count = fileobj, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.fileobj.read(n)
        self.sha.update(data)
        self.count += len(data)
        return data

    def write(self, data) -> int:
        self.sha.update(data)
        self.count += len(data)
        return self.fileobj.write(data)

    def flush(self) -> None:
        self.fileobj.flush()


# --- backup ----------------------------------------------------------------------------------------
def backup_workspace(ws: Workspace, out: Path, *, include_raw: bool = False, raw_key_file: Path | None = None,
                     include_models: bool = True, progress: Progress | None = None) -> BackupSummary:
    """Write the workspace into one tar archive at `out` (see the module docstring for what is in it)."""
    t0 = time.perf_counter()
    progress = progress or SilentProgress()
    out = Path(out).expanduser().resolve()
    if out.exists():
        raise BackupError(f"{out.name} already exists; choose another archive name")
    if out == ws.root or ws.root in out.parents:
        raise BackupError("write the backup outside the workspace (it would otherwise contain itself)")
    key = None
    if include_raw:
        if raw_key_file is None:
            raise BackupError("--include-raw needs --raw-key FILE: raw/ and quarantine/ are only ever backed up "
                              "encrypted (make a key with `rfm backup-key FILE`)")
        key = load_backup_key(raw_key_file)
        _refuse_deid_key(ws, raw_key_file, key)
    elif raw_key_file is not None:
        raise BackupError("--raw-key is only used with --include-raw")
    summary = BackupSummary(archive=out, include_raw=include_raw)
    plain, private = _plan_members(ws, include_raw, include_models, raw_key_file, summary)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    partial.unlink(missing_ok=True)
    progress.start("back up", len(plain) + len(private))
    try:
        with tempfile.TemporaryDirectory(prefix="rfm-backup-") as tmp, \
                os.fdopen(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as raw_out:
            hashed_out = _Hashing(raw_out)
            with tarfile.open(fileobj=hashed_out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                snapshots = _snapshot_databases(ws, plain, Path(tmp), summary)
                info = _info(ws, summary, key)
                members: list[dict] = []
                _add_bytes(tar, INFO, json.dumps(info, indent=1).encode(), members)
                for rel in plain:
                    _add_plain(tar, ws.root / rel, snapshots.get(rel), PLAIN + rel, members, summary)
                    progress.advance()
                index: dict = {"files": {}, "plain": {m["name"]: m["sha256"] for m in members}}
                for n, rel in enumerate(private):
                    name = f"{ENCRYPTED}{n:08d}"
                    size, plain_sha = _add_encrypted(tar, ws.root / rel, name, key, members)
                    index["files"][name] = {"path": rel, "size": size, "sha256": plain_sha}
                    summary.raw_files += 1
                    summary.raw_bytes += size
                    progress.advance()
                if include_raw:
                    data = json.dumps(index).encode()
                    _add_encrypted_bytes(tar, INDEX, data, key, members)
                manifest = {**info, "members": members}
                _add_bytes(tar, MANIFEST, json.dumps(manifest, indent=1).encode(), [])
            raw_out.flush()
            os.fsync(raw_out.fileno())
        os.replace(partial, out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    summary.files = len(plain) + len(private)
    summary.archive_bytes, summary.archive_sha256 = hashed_out.count, hashed_out.sha.hexdigest()
    summary.seconds = time.perf_counter() - t0
    return summary


def _secret_files(ws: Workspace) -> set[Path]:
    """Files site.yaml names as keys or tokens: never in a backup, wherever they are."""
    cfg = ws.config()
    candidates = [cfg.deid.key_file, cfg.labels.openai.api_key_file]
    receiver = getattr(cfg, "receiver", None)
    if receiver is not None:
        candidates += [receiver.tls.key_file if receiver.tls else None, receiver.report_http.token_file]
    out = set()
    for p in candidates:
        if p is not None:
            out.add((p if p.is_absolute() else ws.root / p).resolve())
    return out


def _plan_members(ws: Workspace, include_raw: bool, include_models: bool, raw_key_file: Path | None,
                  summary: BackupSummary) -> tuple[list[str], list[str]]:
    """Relative paths to store in the clear and encrypted, in a stable order."""
    secrets = _secret_files(ws) | ({Path(raw_key_file).resolve()} if raw_key_file else set())
    plain, private = [], []
    for dirpath, dirnames, filenames in os.walk(ws.root):
        here = Path(dirpath)
        rel_dir = here.relative_to(ws.root)
        top = rel_dir.parts[0] if rel_dir.parts else ""
        kept = []
        for d in sorted(dirnames):
            if d.startswith(STAGING_PREFIXES) or (here / d).is_symlink():
                continue
            if not rel_dir.parts:
                if d in PRIVATE_DIRS and not include_raw:
                    continue  # identifiable data: only with include_raw (raw/.key_salt is added below)
                if d in SECRET_DIRS or (d == "models" and not include_models):
                    why = "keys: back them up separately" if d in SECRET_DIRS else "models left out"
                    summary.skipped.append(f"{d}/ ({why})")
                    continue
            kept.append(d)
        dirnames[:] = kept
        for name in sorted(filenames):
            path = here / name
            rel = (rel_dir / name).as_posix()
            if path.is_symlink() or not path.is_file():
                summary.skipped.append(f"{rel} (not a regular file)")
                continue
            if name.startswith(".") and name.endswith(".partial"):
                continue
            if name.endswith(SKIP_SUFFIXES) and (here / name.rsplit("-", 1)[0]).is_file():
                continue
            if path.resolve() in secrets or name.endswith(".key"):
                summary.skipped.append(f"{rel} (a key: back it up separately)")
                continue
            if top in PRIVATE_DIRS and rel != f"raw/{KEY_SALT_FILE}":
                private.append(rel)
                continue
            plain.append(rel)
    if not include_raw and (ws.raw / KEY_SALT_FILE).is_file():
        plain.append(f"raw/{KEY_SALT_FILE}")
    # site.yaml and the catalog first: a damaged tail still leaves the most useful part readable
    first = [r for r in (SITE_YAML, ws.catalog_path.name) if r in plain]
    return first + [r for r in plain if r not in first], private


def _snapshot_databases(ws: Workspace, plain: list[str], tmp: Path, summary: BackupSummary) -> dict[str, Path]:
    """A consistent copy of every SQLite file, made with the online backup API (safe while in use)."""
    out = {}
    for n, rel in enumerate(plain):
        path = ws.root / rel
        with open(path, "rb") as fh:
            if fh.read(len(SQLITE_MAGIC)) != SQLITE_MAGIC:
                continue
        copy = tmp / f"{n}.sqlite"
        src, dst = sqlite3.connect(path, timeout=30), sqlite3.connect(copy)
        try:
            src.backup(dst)
        except sqlite3.DatabaseError as exc:
            raise BackupError(f"{rel} cannot be copied ({exc}); is it a damaged database?") from None
        finally:
            dst.close()
            src.close()
        out[rel] = copy
        summary.sqlite_snapshots.append(rel)
        if rel == ws.catalog_path.name:
            db = sqlite3.connect(copy)
            try:
                summary.catalog_schema_version = read_schema_version(db)
            finally:
                db.close()
    return out


def _info(ws: Workspace, summary: BackupSummary, key: bytes | None) -> dict:
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "appliance_version": __version__,
        "catalog_schema_version": summary.catalog_schema_version,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "site": ws.config().site.name, "include_raw": summary.include_raw,
        "raw_key_fingerprint": key_fingerprint(key) if key else None,
        "not_included": ["secrets/ and every key file (back them up separately)"]
        + ([] if summary.include_raw else ["raw/ (except raw/.key_salt)", "quarantine/"]),
    }


def _tarinfo(name: str, size: int, mtime: float = 0, mode: int = 0o600) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, int(mtime), mode
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, members: list[dict]) -> None:
    tar.addfile(_tarinfo(name, len(data), time.time(), 0o644), io.BytesIO(data))
    members.append({"name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})


def _add_plain(tar: tarfile.TarFile, path: Path, snapshot: Path | None, name: str, members: list[dict],
               summary: BackupSummary) -> None:
    source = snapshot or path
    with open(source, "rb") as fh:
        st = os.fstat(fh.fileno())
        reader = _Hashing(fh)
        try:
            tar.addfile(_tarinfo(name, st.st_size, path.stat().st_mtime, 0o644), reader)
        except OSError:
            raise BackupError(f"{name.removeprefix(PLAIN)} changed while it was being backed up; run the backup "
                              "again") from None
    members.append({"name": name, "size": st.st_size, "sha256": reader.sha.hexdigest()})
    summary.bytes += st.st_size


def _add_encrypted(tar: tarfile.TarFile, path: Path, name: str, key: bytes, members: list[dict]) -> tuple[int, str]:
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        sealed = _Hashing(_EncryptingReader(fh, size, key, name.encode()))
        tar.addfile(_tarinfo(name, encrypted_size(size)), sealed)
    members.append({"name": name, "size": encrypted_size(size), "sha256": sealed.sha.hexdigest()})
    return size, sealed.fileobj.plain.hexdigest()


def _add_encrypted_bytes(tar: tarfile.TarFile, name: str, data: bytes, key: bytes, members: list[dict]) -> None:
    sealed = _Hashing(_EncryptingReader(io.BytesIO(data), len(data), key, name.encode()))
    tar.addfile(_tarinfo(name, encrypted_size(len(data))), sealed)
    members.append({"name": name, "size": encrypted_size(len(data)), "sha256": sealed.sha.hexdigest()})


# --- restore ---------------------------------------------------------------------------------------
def read_backup_info(archive: Path) -> dict:
    """backup.json of an archive (the first member), without reading the rest."""
    try:
        with tarfile.open(archive, mode="r|") as tar:
            member = tar.next()
            if member is None or member.name != INFO or not member.isfile():
                raise BackupError(f"{Path(archive).name} is not an appliance backup (no {INFO} first)")
            info = json.loads(tar.extractfile(member).read())
    except (tarfile.TarError, OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BackupError(f"{Path(archive).name} cannot be read as a backup ({_why(exc)})") from None
    if info.get("format") != FORMAT:
        raise BackupError(f"{Path(archive).name} is not an appliance backup")
    if int(info.get("format_version", 0)) > FORMAT_VERSION:
        raise BackupError(f"backup format v{info['format_version']} is newer than this appliance understands "
                          f"(v{FORMAT_VERSION}): upgrade the appliance")
    return info


def restore_workspace(archive: Path, target: Path, *, raw_key_file: Path | None = None, force: bool = False,
                      progress: Progress | None = None) -> RestoreSummary:
    """Restore a backup into `target`: every checksum (and every encrypted member) is verified before
    anything is written; a non-empty target is refused unless `force`, and then moved aside, never
    deleted. An older catalog is migrated; raw copies not in the backup are recorded as removed."""
    t0 = time.perf_counter()
    progress = progress or SilentProgress()
    archive, target = Path(archive).expanduser().resolve(), Path(target).expanduser().resolve()
    if not archive.is_file():
        raise BackupError(f"backup archive {archive.name} not found")
    info = read_backup_info(archive)
    schema = info.get("catalog_schema_version")
    if schema is not None and int(schema) > SCHEMA_VERSION:
        raise BackupError(f"this backup's catalog is schema v{schema}, newer than this appliance (v{SCHEMA_VERSION}): "
                          "restore it with the appliance version that made it")
    key = None
    if info.get("include_raw"):
        if raw_key_file is None:
            raise BackupError("this backup holds raw/ and quarantine/ encrypted: give --raw-key FILE (the key used "
                              "with `rfm backup --include-raw`)")
        key = load_backup_key(raw_key_file)
        if key_fingerprint(key) != info.get("raw_key_fingerprint"):
            raise BackupError(f"raw key file {Path(raw_key_file).name} is not the key this backup was made with")
    if target.exists() and not target.is_dir():
        raise BackupError(f"restore target {target} exists and is not a folder")
    occupied = target.is_dir() and any(target.iterdir())
    if occupied and not force:
        raise BackupError(f"restore target {target} is not empty: choose a new folder, or --force to move the "
                          "current content aside (nothing is deleted)")

    verified = _read_archive(archive, key, None, progress)  # pass 1: verify everything, write nothing
    summary = RestoreSummary(target=target, include_raw=bool(info.get("include_raw")),
                             appliance_version_of_backup=str(info.get("appliance_version", "")))
    staging = target.parent / f".restoring-{target.name}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        _read_archive(archive, key, (staging, verified), progress)  # pass 2: write, checking again
        _finish_layout(staging)
        _prepare_catalog(staging, summary)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if occupied:
        summary.moved_aside = target.with_name(f"{target.name}.before-restore-{datetime.now():%Y%m%d-%H%M%S}")
        os.rename(target, summary.moved_aside)
    elif target.is_dir():
        target.rmdir()
    os.rename(staging, target)

    summary.files = len(verified["paths"])
    summary.bytes = sum(size for _, size in verified["paths"].values())
    summary.raw_files = sum(1 for name in verified["paths"] if name.startswith(ENCRYPTED))
    _check_deid_key(target, summary)
    summary.seconds = time.perf_counter() - t0
    return summary


def _read_archive(archive: Path, key: bytes | None, write: tuple[Path, dict] | None, progress: Progress) -> dict:
    """Read every member, checking sizes and SHA-256 against the manifest and decrypting what is
    encrypted. Without `write` (pass 1) nothing is written and the verified layout is returned; with
    it (pass 2) files go under the staging folder, and the checks are made again."""
    staging, verified = write if write else (None, None)
    seen: dict[str, tuple[int, str]] = {}
    plain_sha: dict[str, str] = {}
    manifest = index = None
    progress.start("verify backup" if write is None else "restore", len(verified["paths"]) if verified else None)
    try:
        with tarfile.open(archive, mode="r|") as tar:
            for member in tar:
                name = member.name
                if manifest is not None:
                    raise BackupError(f"member after {MANIFEST}: the archive was altered")
                if not member.isfile():
                    raise BackupError("the archive holds something other than plain files: refusing it")
                if name in seen:
                    raise BackupError("the archive holds a member twice: refusing it")
                src = _Hashing(tar.extractfile(member))
                if name in (INFO, MANIFEST):
                    data = src.read()
                    if name == MANIFEST:
                        manifest = json.loads(data)
                elif name == INDEX:
                    chunks: list[bytes] = []
                    _need_key(key)
                    _decrypt(src, member.size, key, name.encode(), chunks.append)
                    index = json.loads(b"".join(chunks))
                elif name.startswith(ENCRYPTED):
                    _need_key(key)
                    out = None
                    if staging is not None:
                        if name not in verified["paths"]:
                            raise BackupError(f"{archive.name} changed while it was being restored")
                        out = _open_new(staging, verified["paths"][name][0])
                    try:
                        plain_sha[name] = _decrypt(src, member.size, key, name.encode(),
                                                   out.write if out else (lambda _data: None))
                    finally:
                        if out:
                            out.close()
                elif name.startswith(PLAIN):
                    rel = _safe_rel(name[len(PLAIN):])
                    out = _open_new(staging, rel) if staging is not None else None
                    try:
                        while data := src.read(BLOCK):
                            if out:
                                out.write(data)
                    finally:
                        if out:
                            out.close()
                else:
                    raise BackupError("the archive holds a member this appliance does not know: refusing it")
                if src.count != member.size:
                    raise BackupError("the archive ends in the middle of a member: it is truncated")
                seen[name] = (src.count, src.sha.hexdigest())
                if staging is not None and name not in (INFO, MANIFEST, INDEX):
                    progress.advance()
    except (tarfile.TarError, EOFError) as exc:
        raise BackupError(f"{archive.name} is damaged or truncated ({_why(exc)}); nothing was restored") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BackupError(f"{archive.name} has a damaged manifest or index; nothing was restored") from None
    return _check_manifest(archive, manifest, index, seen, plain_sha, key)


def _check_manifest(archive: Path, manifest: dict | None, index: dict | None, seen: dict, plain_sha: dict,
                    key: bytes | None) -> dict:
    if manifest is None:
        raise BackupError(f"{archive.name} has no manifest at its end: it is truncated; nothing was restored")
    listed = {m["name"]: (int(m["size"]), m["sha256"]) for m in manifest.get("members", [])}
    stored = {k: v for k, v in seen.items() if k != MANIFEST}
    missing, extra = sorted(set(listed) - set(stored)), sorted(set(stored) - set(listed))
    if missing or extra:
        raise BackupError(f"{archive.name} does not match its manifest ({len(missing)} member(s) missing, "
                          f"{len(extra)} unlisted); nothing was restored")
    bad = [n for n in listed if listed[n] != stored[n]]
    if bad:
        raise BackupError(f"{len(bad)} member(s) of {archive.name} fail their SHA-256 check (first: "
                          f"{_public_name(bad[0])}); the archive is damaged; nothing was restored")
    paths: dict[str, tuple[str, int]] = {}
    for name, (size, _) in listed.items():
        if name.startswith(PLAIN):
            paths[name] = (_safe_rel(name[len(PLAIN):]), size)
    encrypted = [n for n in listed if n.startswith(ENCRYPTED) and n != INDEX]
    if encrypted or manifest.get("include_raw"):
        if index is None or key is None:
            raise BackupError(f"{archive.name} lacks the index of its encrypted members; nothing was restored")
        files = index.get("files", {})
        if set(files) != set(encrypted):
            raise BackupError(f"{archive.name}: its encrypted index does not match the members; nothing was restored")
        for name in encrypted:
            entry = files[name]
            if plain_sha.get(name) != entry["sha256"]:
                raise BackupError(f"an encrypted member of {archive.name} fails its SHA-256 check; nothing was "
                                  "restored")
            rel = _safe_rel(entry["path"])
            if rel.split("/")[0] not in PRIVATE_DIRS:
                raise BackupError(f"{archive.name}: an encrypted member points outside raw/ and quarantine/")
            paths[name] = (rel, int(entry["size"]))
        forged = [n for n, sha in index.get("plain", {}).items() if listed.get(n, (0, None))[1] != sha]
        if forged:
            raise BackupError(f"{archive.name}: {len(forged)} plain member(s) differ from what the key holder "
                              "recorded; the archive was altered; nothing was restored")
    if len({rel for rel, _ in paths.values()}) != len(paths):
        raise BackupError(f"{archive.name} names one file twice; nothing was restored")
    return {"paths": paths}


def _need_key(key: bytes | None) -> None:
    if key is None:
        raise BackupError("the archive holds encrypted members but its backup.json says it has no raw/: "
                          "the archive was altered")


def _safe_rel(rel: str) -> str:
    p = PurePosixPath(rel)
    if (not rel or p.is_absolute() or any(part in ("", ".", "..") for part in rel.split("/"))
            or "\\" in rel or "\x00" in rel):
        raise BackupError("the archive names a path outside the workspace: refusing it")
    return rel


def _public_name(name: str) -> str:
    return name if not name.startswith(ENCRYPTED) else "an encrypted member"


def _open_new(staging: Path, rel: str):
    path = staging / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = 0o600 if rel.split("/")[0] in PRIVATE_DIRS else 0o644
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "wb")


def _why(exc: BaseException) -> str:
    return (str(exc).splitlines()[0] if str(exc) else type(exc).__name__)[:120]


def _finish_layout(root: Path) -> None:
    for name in STAGE_DIRS:
        (root / name).mkdir(exist_ok=True)
    for private in PRIVATE_DIRS:
        os.chmod(root / private, 0o700)
        for dirpath, dirnames, _ in os.walk(root / private):
            for d in dirnames:
                os.chmod(Path(dirpath) / d, 0o700)
    salt = root / "raw" / KEY_SALT_FILE
    if not salt.is_file() or not (root / SITE_YAML).is_file():
        raise BackupError("the backup lacks site.yaml or raw/.key_salt: it is not a workspace backup")
    os.chmod(salt, 0o600)


def _prepare_catalog(root: Path, summary: RestoreSummary) -> None:
    """Still in the staging folder: migrate the catalog, and record the raw copies the backup does not
    hold, so a failure here leaves the target untouched."""
    from appliance.retention import record_missing_raw

    ws = Workspace(root)
    with Catalog(ws.catalog_path) as catalog:
        m = catalog.migration
    summary.catalog_schema_from, summary.catalog_schema_to = m.from_version, m.to_version
    summary.catalog_copy_before_migration = m.backup.name if m.backup else None
    if not summary.include_raw:
        summary.raw_recorded_missing = record_missing_raw(
            ws, f"not in the backup restored {datetime.now(timezone.utc):%Y-%m-%d}")


def _check_deid_key(target: Path, summary: RestoreSummary) -> None:
    """Say whether the de-identification key is in place (it never comes from a backup)."""
    try:
        key_file = load_site_config(target / SITE_YAML).deid.key_file
    except ApplianceError:
        key_file = Path("secrets/deid.key")  # site.yaml from another version: the default place
    summary.deid_key_present = (key_file if key_file.is_absolute() else target / key_file).is_file()
    summary.deid_key_file = str(key_file)
