"""Label or evaluate plain files, outside any workspace (`rfm labels extract`, `rfm labels eval`)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from appliance.errors import BadInputError
from appliance.fsutil import atomic_write
from appliance.labels.extract import ExtractorSpec, LabelCache, extract
from appliance.labels.metrics import PROTOCOLS, agreement, confusion_matrix_png
from appliance.labels.vocabularies import load_vocabulary
from appliance.progress import Progress, SilentProgress


def read_report_lines(path: Path) -> tuple[list[tuple[str, str]], list[tuple[int, str]]]:
    """(id, text) per usable line, and (line number, why) per unusable one."""
    items, bad, seen = [], [], set()
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            bad.append((n, "not JSON"))
            continue
        rid = str(obj.get("id", "")).strip() if isinstance(obj, dict) else ""
        text = str(obj.get("text") or "").strip() if isinstance(obj, dict) else ""
        if not rid or not text:
            bad.append((n, "missing id or text"))
        elif rid in seen:
            bad.append((n, "duplicate id"))
        else:
            seen.add(rid)
            items.append((rid, text))
    return items, bad


def extract_file(reports: Path, out: Path, *, vocabulary: str = "ct_rate_18", backend: str = "rules",
                 base_url: str = "", model: str = "", model_dir: Path | None = None, max_in_flight: int = 16,
                 attempts: int = 3, backoff_s: float = 1.0, progress: Progress | None = None) -> dict:
    """Write `out` (id + one column per finding); reports that could not be labelled go to
    `<out>.review.csv`, unusable lines to `<out>.rejected.jsonl`. Re-running resumes from the cache."""
    if not reports.is_file():
        raise BadInputError(f"reports file {reports} not found", "missing_reports")
    vocab = load_vocabulary(vocabulary)
    items, bad = read_report_lines(reports)
    spec = ExtractorSpec(backend=backend, base_url=base_url, model=model, model_dir=str(model_dir or ""),
                         max_in_flight=max_in_flight, attempts=attempts, backoff_s=backoff_s)
    progress = progress or SilentProgress()
    progress.start(f"labels ({backend})", len(items))
    cache = LabelCache(out.with_name(out.name + ".cache.sqlite"))
    try:
        run = extract(items, vocab, spec, cache, on_done=progress.advance)
    finally:
        cache.close()
    texts = dict(items)
    rows = io.StringIO()
    w = csv.writer(rows)
    w.writerow(["id", *vocab.names])
    review = io.StringIO()
    rw = csv.writer(review)
    rw.writerow(["id", "reason", "report", *vocab.names])
    for rid, _ in items:
        o = run.outcomes[rid]
        if o["status"] == "labelled":
            w.writerow([rid, *(o["labels"][n] for n in vocab.names)])
        else:
            rw.writerow([rid, o["error"] or "no valid answer", texts[rid], *([""] * len(vocab.names))])
    atomic_write(out, rows.getvalue())
    review_path = out.with_name(out.stem + ".review.csv")
    if run.queued:
        atomic_write(review_path, review.getvalue())
    rejected_path = out.with_name(out.stem + ".rejected.jsonl")
    if bad:
        atomic_write(rejected_path, "".join(json.dumps({"line": n, "why": why}) + "\n" for n, why in bad))
    return {"reports": len(items), "labelled": run.labelled, "from_cache": run.from_cache, "retried": run.retried,
            "queued": run.queued, "bad_lines": len(bad), "out": str(out),
            "review": str(review_path) if run.queued else None, "rejected": str(rejected_path) if bad else None}


def read_label_csv(path: Path, findings: tuple[str, ...]) -> dict[str, dict[str, int]]:
    """First column = id; one column per finding with 1, 0 or -1 (a blank cell = not labelled: row skipped)."""
    if not path.is_file():
        raise BadInputError(f"label file {path} not found", "missing_labels")
    reader = csv.reader(io.StringIO(path.read_text()))
    header = next(reader, None)
    if not header:
        raise BadInputError(f"{path.name} is empty", "bad_labels")
    missing = [f for f in findings if f not in header]
    if missing:
        raise BadInputError(f"{path.name} lacks column(s): {', '.join(missing[:3])}", "bad_labels")
    cols = {f: header.index(f) for f in findings}
    out: dict[str, dict[str, int]] = {}
    for n, row in enumerate(reader, start=2):
        if not row:
            continue
        cells = {f: row[i].strip() if i < len(row) else "" for f, i in cols.items()}
        if any(v == "" for v in cells.values()):
            continue
        try:
            out[row[0]] = {f: int(float(v)) for f, v in cells.items()}
        except ValueError:
            raise BadInputError(f"{path.name} row {n}: labels must be 1, 0 or -1", "bad_labels") from None
        if any(v not in (-1, 0, 1) for v in out[row[0]].values()):
            raise BadInputError(f"{path.name} row {n}: labels must be 1, 0 or -1", "bad_labels")
    return out


def evaluate_files(gold: Path, pred: Path, out: Path, vocabulary: str = "ct_rate_18") -> dict:
    vocab = load_vocabulary(vocabulary)
    gold_all = read_label_csv(gold, vocab.names)
    pred_all = read_label_csv(pred, vocab.names)
    common = sorted(set(gold_all) & set(pred_all))
    if not common:
        raise BadInputError("no report id is in both files", "no_overlap")
    g, p = {k: gold_all[k] for k in common}, {k: pred_all[k] for k in common}
    out.mkdir(parents=True, exist_ok=True)
    result = {"n_reports": len(common), "only_in_gold": len(gold_all) - len(common),
              "only_in_pred": len(pred_all) - len(common), "protocols": {}}
    for protocol in PROTOCOLS:
        report = agreement(p, g, vocab.names, protocol)
        result["protocols"][protocol] = report.to_dict()
        confusion_matrix_png(p, g, vocab.names, out / f"confusion-{protocol}.png", protocol=protocol)
    atomic_write(out / "agreement.json", json.dumps(result, indent=2))
    return result

