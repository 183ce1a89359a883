"""Labels stage over the catalog: every de-identified report -> 1/0/-1 per finding.

Outputs in labels/: `labels.csv` (study key + one column per finding, the labels training uses),
`consensus.json` (per-finding agreement of two extractors and the findings kept for training),
`cache.sqlite` (every extractor's outcome, keyed by text + vocabulary + model + prompt version).
Reports an extractor could not label after its retries, and (optionally) reports on which two
extractors disagree, wait in the review queue (catalog table label_review) until a radiologist's
CSV is imported: nothing is dropped silently.
"""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from appliance.catalog import Catalog, now
from appliance.config import LabelsSection
from appliance.errors import ApplianceError, BadInputError
from appliance.fsutil import atomic_write
from appliance.labels.extract import ExtractorSpec, LabelCache, extract
from appliance.labels.metrics import report_agreement_consensus
from appliance.labels.vocabularies import Vocabulary, load_vocabulary
from appliance.progress import Progress, SilentProgress
from appliance.workspace import Workspace

STAGE = "labels"
VALUES = {"1": 1, "0": 0, "-1": -1}


@dataclass
class LabelsSummary:
    reports: int = 0
    labelled: int = 0
    from_cache: int = 0
    retried: int = 0
    queued: int = 0
    resolved_by_review: int = 0
    disagreements_queued: int = 0
    findings_kept: list[str] = field(default_factory=list)
    findings_dropped: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def spec_for(ws: Workspace | None, cfg: LabelsSection, backend: str) -> ExtractorSpec:
    api_key = None
    if cfg.openai.api_key_file is not None:
        path = cfg.openai.api_key_file
        if ws is not None and not path.is_absolute():
            path = ws.root / path
        try:
            api_key = path.read_text().strip()
        except OSError:
            raise ApplianceError(f"labels.openai.api_key_file {path} cannot be read") from None
    model_dir = cfg.transformers.model_dir
    if model_dir is not None and ws is not None and not model_dir.is_absolute():
        model_dir = ws.root / model_dir
    return ExtractorSpec(
        backend=backend, model=cfg.openai.model if backend == "openai" else "",
        base_url=cfg.openai.base_url, model_dir=str(model_dir or ""), max_in_flight=cfg.openai.max_in_flight,
        timeout_s=cfg.openai.timeout_s, structured=cfg.openai.structured, api_key=api_key, attempts=cfg.attempts,
        backoff_s=cfg.backoff_s, ask_evidence=cfg.ask_evidence, batch_size=cfg.transformers.batch_size,
        max_new_tokens=cfg.transformers.max_new_tokens,
    )


def vocabulary_for(ws: Workspace, cfg: LabelsSection) -> Vocabulary:
    candidate = ws.root / cfg.vocabulary
    return load_vocabulary(candidate if candidate.suffix in (".yaml", ".yml") and candidate.is_file() else cfg.vocabulary)


def deidentified_reports(ws: Workspace, catalog: Catalog) -> list[tuple[str, str]]:
    """(study key, de-identified report text) for every report the deid stage finished."""
    rows = catalog.db.execute(
        "SELECT key, output FROM stage_status WHERE kind = 'study' AND stage = 'deid_report' AND status = 'done' "
        "ORDER BY key").fetchall()
    return [(r["key"], (ws.root / r["output"]).read_text()) for r in rows if (ws.root / r["output"]).is_file()]


def label_workspace(ws: Workspace, *, force: bool = False, progress: Progress | None = None) -> LabelsSummary:
    """Label every de-identified report with the configured extractor(s); write labels.csv."""
    cfg = ws.config().labels
    vocabulary = vocabulary_for(ws, cfg)
    progress = progress or SilentProgress()
    summary = LabelsSummary()
    t0 = time.perf_counter()
    ws.labels.mkdir(exist_ok=True)
    cache = LabelCache(ws.labels / "cache.sqlite")
    try:
        with Catalog(ws.catalog_path) as catalog:
            run_id = catalog.start_run(STAGE)
            reports = deidentified_reports(ws, catalog)
            summary.reports = len(reports)
            primary_spec = spec_for(ws, cfg, cfg.backend)
            progress.start(f"labels ({cfg.backend})", len(reports))
            primary = extract(reports, vocabulary, primary_spec, cache, force=force, on_done=progress.advance)
            summary.labelled, summary.from_cache = primary.labelled, primary.from_cache
            summary.retried, summary.queued = primary.retried, primary.queued
            with catalog.transaction():
                for key, outcome in primary.outcomes.items():
                    if outcome["status"] == "labelled":
                        catalog.set_status("study", key, STAGE, "done", fingerprint=primary_spec.identity)
                    else:
                        catalog.set_status("study", key, STAGE, "queued", detail=outcome["error"] or "")
                        _queue(catalog, key, "extraction_failed", outcome["error"] or "no valid answer", None)
            consensus = None
            if cfg.consensus_with:
                second_spec = spec_for(ws, cfg, cfg.consensus_with)
                progress.start(f"labels ({cfg.consensus_with}, consensus)", len(reports))
                second = extract(reports, vocabulary, second_spec, cache, force=force, on_done=progress.advance)
                consensus = _consensus(catalog, vocabulary, primary.outcomes, second.outcomes, cfg, summary)
                consensus.update(primary=primary_spec.identity, second=second_spec.identity)
            final = _final_labels(catalog, vocabulary, primary.outcomes)
            summary.resolved_by_review = sum(1 for v in final.values() if v[1] == "review")
            _write_labels_csv(ws.labels / "labels.csv", vocabulary, {k: v[0] for k, v in final.items()})
            kept = consensus["kept"] if consensus else list(vocabulary.names)
            summary.findings_kept = kept
            summary.findings_dropped = [n for n in vocabulary.names if n not in kept]
            _write_json(ws.labels / "consensus.json", consensus or {
                "primary": primary_spec.identity, "second": None, "kept": kept,
                "note": "no consensus extractor configured: every finding is kept"})
            summary.seconds = time.perf_counter() - t0
            catalog.finish_run(run_id, "done", summary.to_dict())
    finally:
        cache.close()
    return summary


def _consensus(catalog: Catalog, vocabulary: Vocabulary, a: dict, b: dict, cfg: LabelsSection,
               summary: LabelsSummary) -> dict:
    both = [k for k in a if a[k]["status"] == "labelled" and b.get(k, {}).get("status") == "labelled"]
    pa = {k: a[k]["labels"] for k in both}
    pb = {k: b[k]["labels"] for k in both}
    result = report_agreement_consensus(pa, pb, list(vocabulary.names), threshold=cfg.consensus_threshold)
    disagreeing = [k for k in both if any(pa[k][f] != pb[k][f] for f in vocabulary.names)]
    result["reports_compared"] = len(both)
    result["reports_in_full_agreement"] = len(both) - len(disagreeing)
    if cfg.review_disagreements:
        with catalog.transaction():
            for key in disagreeing:
                fields = [f for f in vocabulary.names if pa[key][f] != pb[key][f]]
                _queue(catalog, key, "disagreement", f"extractors disagree on {len(fields)} finding(s)", pa[key])
        summary.disagreements_queued = len(disagreeing)
    return result


def _queue(catalog: Catalog, study_key: str, source: str, reason: str, proposed: dict | None) -> None:
    catalog.db.execute(
        "INSERT INTO label_review(study_key, source, reason, proposed, created_at) VALUES (?, ?, ?, ?, ?) "
        "ON CONFLICT(study_key, source) DO UPDATE SET reason = excluded.reason, proposed = excluded.proposed",
        (study_key, source, reason.splitlines()[0] if reason else "", json.dumps(proposed) if proposed else None,
         now()))


def _final_labels(catalog: Catalog, vocabulary: Vocabulary, outcomes: dict) -> dict[str, tuple[dict, str]]:
    """A radiologist's resolution wins; then the primary extractor; disagreements not yet reviewed
    keep the primary extractor's labels (consensus already drops unreliable findings)."""
    final = {k: (o["labels"], "extractor") for k, o in outcomes.items() if o["status"] == "labelled"}
    for row in catalog.db.execute("SELECT study_key, resolved FROM label_review WHERE resolved IS NOT NULL"):
        if row["study_key"] in outcomes:
            final[row["study_key"]] = (json.loads(row["resolved"]), "review")
    return {k: v for k, v in final.items() if all(n in v[0] for n in vocabulary.names)}


def _write_labels_csv(path: Path, vocabulary: Vocabulary, labels: dict[str, dict]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["study_key", *vocabulary.names])
    for key in sorted(labels):
        w.writerow([key, *(labels[key][n] for n in vocabulary.names)])
    atomic_write(path, buf.getvalue())


def _write_json(path: Path, obj: dict) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True))


# --- review queue ------------------------------------------------------------------------------
def review_items(ws: Workspace, include_resolved: bool = False) -> list[dict]:
    with Catalog(ws.catalog_path) as catalog:
        sql = "SELECT * FROM label_review" + ("" if include_resolved else " WHERE resolved IS NULL")
        return [dict(r) for r in catalog.db.execute(sql + " ORDER BY created_at, study_key")]


def export_review(ws: Workspace, out: Path) -> int:
    """CSV for a radiologist: study key, why, the de-identified report, one column per finding to fill."""
    vocabulary = vocabulary_for(ws, ws.config().labels)
    items = review_items(ws)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["study_key", "source", "reason", "report", *vocabulary.names])
    for item in items:
        text_path = ws.deid / item["study_key"] / "report.txt"
        proposed = json.loads(item["proposed"]) if item["proposed"] else {}
        w.writerow([item["study_key"], item["source"], item["reason"],
                    text_path.read_text() if text_path.is_file() else "",
                    *(proposed.get(n, "") for n in vocabulary.names)])
    out.write_text(buf.getvalue())
    return len(items)


def import_review(ws: Workspace, path: Path) -> int:
    """Load a filled-in review CSV; every finding of every row must be 1, 0 or -1. Returns rows resolved."""
    vocabulary = vocabulary_for(ws, ws.config().labels)
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    resolved: list[tuple[str, str, dict]] = []
    for n, row in enumerate(rows, start=2):
        if not row.get("study_key"):
            raise BadInputError(f"{path.name} row {n}: study_key is empty", "bad_review_row")
        labels = {}
        for finding in vocabulary.names:
            value = (row.get(finding) or "").strip()
            if value not in VALUES:
                raise BadInputError(f"{path.name} row {n}, column '{finding}': {value!r} is not 1, 0 or -1",
                                    "bad_review_row")
            labels[finding] = VALUES[value]
        resolved.append((row["study_key"], row.get("source") or "extraction_failed", labels))
    with Catalog(ws.catalog_path) as catalog, catalog.transaction():
        for key, source, labels in resolved:
            cur = catalog.db.execute(
                "UPDATE label_review SET resolved = ?, resolved_at = ? WHERE study_key = ? AND source = ?",
                (json.dumps(labels), now(), key, source))
            if cur.rowcount == 0:
                raise BadInputError(f"{path.name}: study {key} ({source}) is not in the review queue", "bad_review_row")
            catalog.set_status("study", key, STAGE, "done", fingerprint="review")
    return len(resolved)
