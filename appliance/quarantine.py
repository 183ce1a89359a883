"""quarantine/: bad input set aside with its reason, never deleted, never silently dropped."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from appliance.catalog import Catalog
from appliance.errors import BadInputError
from appliance.workspace import Workspace


def quarantine_item(
    ws: Workspace,
    catalog: Catalog,
    *,
    stage: str,
    kind: str,
    error: BadInputError,
    files: dict[str, bytes] | None = None,
    sources: list[str] | None = None,
    item_key: str | None = None,
) -> int:
    """Write quarantine/q<id>/ (the files, and reason.json naming where they came from); return id.

    `sources` may name original paths, which can carry PHI: they go into reason.json inside
    quarantine/ only. The catalog row holds the code and the PHI-free reason.
    """
    staging = ws.quarantine / f".incoming-{os.getpid()}-{time.monotonic_ns()}"
    staging.mkdir(parents=True)
    for name, data in (files or {}).items():
        (staging / name).write_bytes(data)
    with catalog.transaction():
        qid = catalog.add_quarantine(stage, kind, item_key, error.code, error.reason, "")
        folder = f"q{qid:06d}"
        catalog.db.execute("UPDATE quarantine SET folder = ? WHERE id = ?", (folder, qid))
    (staging / "reason.json").write_text(json.dumps({
        "id": qid, "stage": stage, "kind": kind, "item_key": item_key, "code": error.code,
        "reason": error.reason, "sources": sources or [], "files": sorted(files or {}),
    }, indent=2))
    os.replace(staging, ws.quarantine / folder)
    return qid


def clean_stale_staging(ws: Workspace) -> None:
    """Remove staging folders a killed run left behind (their catalog rows were never written)."""
    for staging in ws.quarantine.glob(".incoming-*"):
        shutil.rmtree(staging, ignore_errors=True)


def read_reason(ws: Workspace, folder: str) -> dict:
    path: Path = ws.quarantine / folder / "reason.json"
    return json.loads(path.read_text()) if path.exists() else {}
