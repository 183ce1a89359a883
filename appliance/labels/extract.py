"""Run an extractor (rules, an OpenAI-compatible server, or an in-process transformers model) over
reports, with a persistent cache so a re-run skips done reports and a killed run resumes.

The cache key is a hash of (report text, vocabulary, backend, model, prompt version): change any of
them and the report is labelled again; nothing else invalidates a result.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from appliance.errors import ConfigError
from appliance.faults import checkpoint
from appliance.labels.llm import LabelOutcome
from appliance.labels.prompt import PROMPT_VERSION
from appliance.labels.vocabularies import Vocabulary

RULES_VERSION = "rules-1"


@dataclass(frozen=True)
class ExtractorSpec:
    """Which extractor, configured how. `model` names what produced a label (for the cache and reports)."""

    backend: str                      # "rules" | "openai" | "transformers"
    model: str = ""
    base_url: str = ""
    model_dir: str = ""
    max_in_flight: int = 16
    timeout_s: float = 60.0
    structured: str = "auto"
    api_key: str | None = field(default=None, repr=False)
    attempts: int = 3
    backoff_s: float = 1.0
    ask_evidence: bool = False
    batch_size: int = 8
    max_new_tokens: int = 256

    @property
    def identity(self) -> str:
        if self.backend == "rules":
            return RULES_VERSION
        return f"{self.backend}:{self.model or self.model_dir}:prompt-{PROMPT_VERSION}:evidence-{int(self.ask_evidence)}"


def cache_key(text: str, vocabulary: Vocabulary, spec: ExtractorSpec) -> str:
    parts = (text, vocabulary.fingerprint(), spec.identity)
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()


class LabelCache:
    """SQLite file of outcomes by cache key; written as each report finishes."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, timeout=30, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS outcomes (key TEXT PRIMARY KEY, extractor TEXT NOT NULL, status TEXT NOT NULL, "
            "labels TEXT, evidence TEXT, attempts INTEGER NOT NULL, error TEXT, updated_at REAL NOT NULL)")

    def close(self) -> None:
        self.db.close()

    def get(self, key: str) -> dict | None:
        row = self.db.execute("SELECT status, labels, evidence, attempts, error FROM outcomes WHERE key = ?",
                              (key,)).fetchone()
        if row is None:
            return None
        return {"status": row[0], "labels": json.loads(row[1]) if row[1] else None,
                "evidence": json.loads(row[2]) if row[2] else {}, "attempts": row[3], "error": row[4]}

    def put(self, key: str, extractor: str, outcome: LabelOutcome) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO outcomes(key, extractor, status, labels, evidence, attempts, error, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (key, extractor, outcome.status, json.dumps(outcome.labels) if outcome.labels is not None else None,
             json.dumps(outcome.evidence or {}), outcome.attempts, outcome.error, time.time()))


@dataclass
class ExtractionRun:
    outcomes: dict[str, dict]          # report id -> {"status", "labels", "evidence", "attempts", "error"}
    from_cache: int = 0
    labelled: int = 0
    retried: int = 0
    queued: int = 0


def make_backend(spec: ExtractorSpec):
    if spec.backend == "openai":
        from appliance.labels.llm import OpenAIBackend

        if not spec.base_url or not spec.model:
            raise ConfigError("labels backend openai needs openai.base_url and openai.model in site.yaml")
        return OpenAIBackend(spec.base_url, spec.model, max_in_flight=spec.max_in_flight, timeout_s=spec.timeout_s,
                             attempts=spec.attempts, backoff_s=spec.backoff_s, structured=spec.structured,
                             ask_evidence=spec.ask_evidence, api_key=spec.api_key)
    if spec.backend == "transformers":
        from appliance.labels.llm import TransformersBackend

        if not spec.model_dir:
            raise ConfigError("labels backend transformers needs transformers.model_dir in site.yaml")
        return TransformersBackend(Path(spec.model_dir), batch_size=spec.batch_size,
                                   max_new_tokens=spec.max_new_tokens, attempts=spec.attempts,
                                   ask_evidence=spec.ask_evidence)
    if spec.backend == "rules":
        return None
    raise ConfigError(f"unknown labels backend '{spec.backend}' (allowed: rules, openai, transformers)")


def extract(items: Iterable[tuple[str, str]], vocabulary: Vocabulary, spec: ExtractorSpec, cache: LabelCache, *,
            force: bool = False, on_done: Callable[[int], None] | None = None) -> ExtractionRun:
    """Label every (id, text); cached outcomes are reused unless `force`. Every item gets an outcome."""
    items = list(items)
    run = ExtractionRun(outcomes={})
    keys = {rid: cache_key(text, vocabulary, spec) for rid, text in items}
    todo: list[tuple[str, str]] = []
    for rid, text in items:
        cached = None if force else cache.get(keys[rid])
        if cached is not None and cached["status"] == "labelled":
            run.outcomes[rid] = cached
            run.from_cache += 1
            if on_done:
                on_done(1)
        else:
            todo.append((rid, text))

    def record(outcome: LabelOutcome) -> None:
        cache.put(keys[outcome.report_id], spec.identity, outcome)
        run.outcomes[outcome.report_id] = {"status": outcome.status, "labels": outcome.labels,
                                          "evidence": outcome.evidence or {}, "attempts": outcome.attempts,
                                          "error": outcome.error}
        if outcome.status == "labelled":
            run.labelled += 1
        else:
            run.queued += 1
        if outcome.attempts > 1:
            run.retried += 1
        if on_done:
            on_done(1)
        checkpoint("label_report")

    if todo:
        backend = make_backend(spec)
        if backend is None:
            from appliance.labels.rules import label_report

            for rid, text in todo:
                result = label_report(text, vocabulary)
                record(LabelOutcome(report_id=rid, status="labelled", labels=result.labels, evidence=result.evidence,
                                    attempts=1, error=None, model=RULES_VERSION))
        else:
            backend.label(todo, vocabulary, on_result=record)
    missing = [rid for rid, _ in items if rid not in run.outcomes]
    if missing:  # a backend that lost an item is a bug: say so rather than drop the report
        raise RuntimeError(f"extractor returned no outcome for {len(missing)} report(s)")
    return run
