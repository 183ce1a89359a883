"""Report sidecars: the radiology report of each study, keyed by StudyInstanceUID or accession.

Format (docs/ingest.md): JSONL with one object per line, or CSV with a header row. Columns:
`study_instance_uid` and/or `accession_number` (at least one), and either `text` or
`findings` + `impression`.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import BadInputError


@dataclass(frozen=True)
class ReportRecord:
    line: int
    study_instance_uid: str | None
    accession_number: str | None
    text: str


@dataclass(frozen=True)
class BadReportLine:
    line: int
    raw: str
    error: BadInputError


def read_report_sidecar(path: Path) -> Iterator[ReportRecord | BadReportLine]:
    """Yield one ReportRecord per usable row and one BadReportLine per unusable one."""
    if path.suffix.lower() == ".csv":
        yield from _read_csv(path)
    else:
        yield from _read_jsonl(path)


def _read_jsonl(path: Path) -> Iterator[ReportRecord | BadReportLine]:
    with path.open(encoding="utf-8", errors="replace") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError("not a JSON object")
            except ValueError:
                yield BadReportLine(n, line, BadInputError(f"report line {n} is not a JSON object", "malformed_report"))
                continue
            yield _record(n, obj, line)


def _read_csv(path: Path) -> Iterator[ReportRecord | BadReportLine]:
    text = path.read_text(encoding="utf-8", errors="replace")
    reader = csv.DictReader(io.StringIO(text))
    for row in reader:
        n = reader.line_num
        if None in row:  # more cells than header columns
            yield BadReportLine(n, str(row), BadInputError(f"report row {n} has extra cells", "malformed_report"))
            continue
        yield _record(n, row, json.dumps(row))


def _record(n: int, obj: dict, raw: str) -> ReportRecord | BadReportLine:
    uid = _clean(obj.get("study_instance_uid"))
    acc = _clean(obj.get("accession_number"))
    if "text" in obj:
        text = obj.get("text") or ""
    else:
        parts = [(k.upper(), _clean(obj.get(k)) or "") for k in ("findings", "impression")]
        text = "\n".join(f"{k}: {v}" for k, v in parts if v)
    text = str(text).replace("\r\n", "\n").strip()
    if not uid and not acc:
        return BadReportLine(n, raw, BadInputError(
            f"report line {n} has neither study_instance_uid nor accession_number", "unkeyed_report"))
    if not text:
        return BadReportLine(n, raw, BadInputError(f"report line {n} is empty", "empty_report"))
    return ReportRecord(n, uid, acc, text)


def _clean(value: object) -> str | None:
    if value is None:
        return None
    s = str(value).strip()
    return s or None
