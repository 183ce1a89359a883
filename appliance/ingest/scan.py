"""Walk a source folder: every file under it, any name, plus members of .zip archives."""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

REPORT_SIDECARS = ("reports.jsonl", "reports.csv")
_IGNORED_NAMES = {"Thumbs.db", ".DS_Store", "desktop.ini"}


@dataclass(frozen=True)
class SourceFile:
    """A file to ingest: a plain file or a member of a zip archive.

    `where` is the path relative to the source folder (with `!member` for zip members). It can
    hold PHI (exports are often named after patients), so it is only ever written inside
    raw/ or quarantine/, never logged.
    """

    root: Path
    where: str
    zip_member: str | None = None

    @property
    def path(self) -> Path:
        return self.root / self.where.split("!", 1)[0]

    def read_bytes(self) -> bytes:
        if self.zip_member is None:
            return self.path.read_bytes()
        with zipfile.ZipFile(self.path) as zf:
            return zf.read(self.zip_member)

    def open(self) -> BinaryIO:
        """A binary file object; a plain file is read lazily (header-only reads stay cheap)."""
        if self.zip_member is None:
            return self.path.open("rb")
        return io.BytesIO(self.read_bytes())

    def size(self) -> int:
        if self.zip_member is None:
            return self.path.stat().st_size
        with zipfile.ZipFile(self.path) as zf:
            return zf.getinfo(self.zip_member).file_size


def walk_source(root: Path, read_zip: bool = True, skip: tuple[Path, ...] = ()) -> Iterator[SourceFile]:
    """Yield candidate files in a stable order; hidden files, OS clutter and sidecars are skipped."""
    root = root.resolve()
    skip_set = {p.resolve() for p in skip}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or name in _IGNORED_NAMES:
                continue
            path = Path(dirpath) / name
            if path.resolve() in skip_set or (Path(dirpath) == root and name in REPORT_SIDECARS):
                continue
            rel = str(path.relative_to(root))
            if read_zip and name.lower().endswith(".zip") and zipfile.is_zipfile(path):
                yield from _zip_members(root, rel, path)
            else:
                yield SourceFile(root, rel)


def _zip_members(root: Path, rel: str, path: Path) -> Iterator[SourceFile]:
    with zipfile.ZipFile(path) as zf:
        names = sorted(i.filename for i in zf.infolist() if not i.is_dir())
    for member in names:
        base = member.rsplit("/", 1)[-1]
        if base.startswith(".") or base in _IGNORED_NAMES or member.startswith("__MACOSX/"):
            continue
        yield SourceFile(root, f"{rel}!{member}", zip_member=member)


def find_report_sidecars(root: Path) -> list[Path]:
    return [root / n for n in REPORT_SIDECARS if (root / n).is_file()]
