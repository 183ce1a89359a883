"""Per-study outcomes (an EHR extract: accession number or study UID, one column per target) ->
`labels/outcomes.csv` keyed by opaque study key.

The extract is identifiable (accession numbers, UIDs): it is read where the operator keeps it and
only the opaque keys and target values are written into the workspace. Rows that match no
ingested study, rows repeating a study already read (the first is kept), and values that are
empty or not integers, are counted, never listed.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

from appliance.catalog import Catalog
from appliance.errors import ApplianceError
from appliance.fsutil import atomic_write
from appliance.workspace import Workspace

ID_COLUMNS = ("accession_number", "study_instance_uid")
OUTCOMES_FILE = "outcomes.csv"


@dataclass
class OutcomeImport:
    targets: list[str]
    rows: int
    matched: int
    unmatched: int
    duplicate_rows: int = 0
    invalid_values: dict[str, int] = field(default_factory=dict)
    classes: dict[str, dict[str, int]] = field(default_factory=dict)  # target -> {class value: studies}


def import_outcomes(ws: Workspace, path: Path, targets: list[str] | None = None) -> OutcomeImport:
    """Map the extract's identifiers to opaque study keys and write labels/outcomes.csv."""
    path = Path(path)
    if not path.is_file():
        raise ApplianceError(f"outcomes file {path.name} not found")
    try:
        rows = list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8-sig"))))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ApplianceError(f"outcomes file {path.name} is not a readable CSV ({type(exc).__name__})") from None
    if not rows:
        raise ApplianceError(f"outcomes file {path.name} has no rows")
    columns = list(rows[0].keys())
    id_columns = [c for c in ID_COLUMNS if c in columns]
    if not id_columns:
        raise ApplianceError(f"outcomes file {path.name} needs an accession_number or study_instance_uid column")
    available = [c for c in columns if c not in ID_COLUMNS and c != "study_key"]
    targets = list(targets or available)
    missing = [t for t in targets if t not in available]
    if missing or not targets:
        raise ApplianceError(f"outcome column {missing[0] if missing else '(none)'} is not in {path.name}; "
                             f"columns: {', '.join(available) or 'none'}")
    with Catalog(ws.catalog_path) as catalog:
        studies = {r["key"] for r in catalog.db.execute("SELECT key FROM studies")}
        by_accession = {r["accession_key"]: r["key"] for r in catalog.db.execute(
            "SELECT key, accession_key FROM studies WHERE accession_key IS NOT NULL")}
    out: dict[str, dict[str, str]] = {}
    unmatched = duplicates = 0
    invalid = {t: 0 for t in targets}
    for row in rows:
        key = None
        uid = (row.get("study_instance_uid") or "").strip()
        accession = (row.get("accession_number") or "").strip()
        if uid and ws.opaque_key("study", uid) in studies:
            key = ws.opaque_key("study", uid)
        elif accession:
            key = by_accession.get(ws.opaque_key("accession", accession))
        if key is None:
            unmatched += 1
            continue
        if key in out:
            duplicates += 1
            continue
        values = {}
        for t in targets:
            value = (row.get(t) or "").strip()
            try:
                values[t] = str(int(float(value)))  # "1", "1.0" -> class 1
            except ValueError:
                invalid[t] += 1
                values[t] = ""
        out[key] = values
    if not out:
        raise ApplianceError(f"no row of {path.name} matches an ingested study ({unmatched} rows unmatched)")
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["study_key", *targets])
    for key in sorted(out):
        writer.writerow([key, *(out[key][t] for t in targets)])
    ws.labels.mkdir(parents=True, exist_ok=True)
    atomic_write(ws.labels / OUTCOMES_FILE, buffer.getvalue())
    classes = {t: {} for t in targets}
    for values in out.values():
        for t, v in values.items():
            if v != "":
                classes[t][v] = classes[t].get(v, 0) + 1
    return OutcomeImport(targets, len(rows), len(out), unmatched, duplicates, {k: v for k, v in invalid.items() if v},
                         classes)


def read_outcomes(ws: Workspace) -> tuple[list[str], dict[str, dict[str, int]]]:
    """(targets, {study_key: {target: class}}) from labels/outcomes.csv; empty values left out."""
    path = ws.labels / OUTCOMES_FILE
    if not path.is_file():
        return [], {}
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    targets = [c for c in (rows[0].keys() if rows else []) if c != "study_key"]
    return targets, {r["study_key"]: {t: int(r[t]) for t in targets if r[t] != ""} for r in rows}
