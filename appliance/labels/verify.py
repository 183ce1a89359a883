"""Strict checks on an LLM's answer before its labels are accepted.

What is tolerated (formatting noise, never content):
- whitespace around values and lines, one ``` / ```json / ```csv code fence around the whole answer;
- csv: a single trailing period after the last value ("1,0,-1.");
- json: a value written as "1" (string) or 1.0 (integral float).
What is rejected: any other value (0.5, 2, "yes", true), a missing or extra finding, a wrong count, other text
around the csv line or the JSON object, truncated or malformed JSON, duplicate or unknown evidence entries and,
when evidence is required, a non-zero label whose evidence sentence does not occur in the report (compared after
Unicode NFKC, lower-casing and collapsing whitespace). Evidence for 0 labels is ignored.

AnswerError.reason never quotes the report or the answer text (the answer may quote the report): it names
findings, positions and counts only.
"""

from __future__ import annotations

import json
import re
import unicodedata

_FENCE = re.compile(r"^```[A-Za-z]*[ \t]*\n?(.*?)\n?```$", re.DOTALL)
_CSV_TOKEN = re.compile(r"^[+-]?\d+(\.\d+)?$")
_ALLOWED = {-1, 0, 1}


class AnswerError(Exception):
    """The answer broke the format; `reason` is one line without report text."""

    def __init__(self, reason: str):
        reason = " ".join(reason.split())
        super().__init__(reason)
        self.reason = reason


def normalise_text(text: str) -> str:
    """What evidence matching compares: NFKC, lower case, single spaces."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def _strip_fence(answer: str) -> str:
    text = answer.strip()
    match = _FENCE.match(text)
    return match.group(1).strip() if match else text


def _names(vocabulary) -> list[str]:
    return [f.name for f in vocabulary.findings]


def _check_evidence(
    labels: dict[str, int], evidence: dict[str, str], report_text: str, *, require_evidence: bool
) -> dict[str, str]:
    report = normalise_text(report_text)
    kept: dict[str, str] = {}
    for name, value in labels.items():
        if value == 0:
            continue
        sentence = evidence.get(name, "")
        cleaned = normalise_text(sentence).strip(" \"'`")
        if cleaned.endswith("."):
            cleaned = cleaned[:-1].rstrip()
        if cleaned and cleaned in report:
            kept[name] = sentence.strip()
        elif require_evidence:
            problem = "has no evidence sentence" if not cleaned else "has evidence that is not in the report"
            raise AnswerError(f"finding '{name}' labelled {value} {problem}")
    return kept


def _json_value(name: str, value) -> int:
    if isinstance(value, bool):  # bool is an int subclass: true would pass as 1
        raise AnswerError(f"finding '{name}' has a boolean value, not -1, 0 or 1")
    if isinstance(value, str) and value.strip() in ("-1", "0", "1"):
        return int(value.strip())
    if isinstance(value, (int, float)) and float(value).is_integer() and int(value) in _ALLOWED:
        return int(value)
    if isinstance(value, (int, float)):
        raise AnswerError(f"finding '{name}' has value {value!r}, not -1, 0 or 1")
    raise AnswerError(f"finding '{name}' has a {type(value).__name__} value, not -1, 0 or 1")


def _parse_json(text: str, vocabulary) -> tuple[dict[str, int], dict[str, str]]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AnswerError(f"not valid JSON ({exc.msg} at character {exc.pos} of {len(text)})") from None
    if not isinstance(obj, dict):
        raise AnswerError(f"the answer is a JSON {type(obj).__name__}, not an object")
    extra = sorted(set(obj) - {"labels", "evidence"})
    if extra:
        raise AnswerError(f"{len(extra)} unexpected top-level key(s)")
    raw = obj.get("labels")
    if not isinstance(raw, dict):
        raise AnswerError("no 'labels' object")
    names = _names(vocabulary)
    missing = [n for n in names if n not in raw]
    unknown = sorted(set(raw) - set(names))
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"{len(missing)} finding(s) missing (first: '{missing[0]}')")
        if unknown:
            parts.append(f"{len(unknown)} unknown key(s)")  # not quoted: a stray key may be report text
        raise AnswerError(f"expected exactly {len(names)} findings: " + "; ".join(parts))
    labels = {n: _json_value(n, raw[n]) for n in names}
    evidence_raw = obj.get("evidence") or {}
    if not isinstance(evidence_raw, dict):
        raise AnswerError("'evidence' is not an object")
    unknown = sorted(set(evidence_raw) - set(names))
    if unknown:
        raise AnswerError(f"evidence for {len(unknown)} unknown finding(s)")
    evidence = {}
    for name, sentence in evidence_raw.items():
        if not isinstance(sentence, str):
            raise AnswerError(f"evidence for '{name}' is not a string")
        evidence[name] = sentence
    return labels, evidence


def _parse_csv(text: str, vocabulary, *, expect_evidence_lines: bool) -> tuple[dict[str, int], dict[str, str]]:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise AnswerError("empty answer")
    values_line, rest = lines[0], lines[1:]
    values_line = values_line.removesuffix(".")
    tokens = [t.strip() for t in values_line.split(",")]
    names = _names(vocabulary)
    if len(tokens) != len(names):
        raise AnswerError(f"expected exactly {len(names)} values, got {len(tokens)}")
    labels = {}
    for i, (name, token) in enumerate(zip(names, tokens), 1):
        if token not in ("-1", "0", "1"):
            shown = f"value {token!r}" if _CSV_TOKEN.match(token) else "a non-numeric value"
            raise AnswerError(f"{shown} at position {i} ('{name}') is not -1, 0 or 1")
        labels[name] = int(token)
    evidence: dict[str, str] = {}
    if rest and not expect_evidence_lines:
        raise AnswerError(f"{len(rest)} line(s) of other text after the values")
    by_length = sorted(names, key=len, reverse=True)  # longest first: a name that prefixes another can't steal its line
    for j, line in enumerate(rest, 2):
        lowered = line.lower().lstrip("-* ")
        name = next(
            (n for n in by_length if lowered.startswith(n.lower()) and lowered[len(n) :].lstrip().startswith(":")),
            None,
        )
        if name is None:
            raise AnswerError(f"line {j} does not start with a finding name and a colon")
        if name in evidence:
            raise AnswerError(f"two evidence lines for '{name}'")
        evidence[name] = line.split(":", 1)[1].strip()
    return labels, evidence


def parse_and_verify(
    answer: str, vocabulary, mode: str, report_text: str, *, require_evidence: bool
) -> tuple[dict[str, int], dict[str, str]]:
    """Labels (finding -> 1/0/-1, vocabulary order) and verified evidence (non-zero findings only).

    Raises AnswerError when the answer does not follow the format of `mode` ("json" or "csv").
    """
    if not isinstance(answer, str) or not answer.strip():
        raise AnswerError("empty answer")
    text = _strip_fence(answer)
    if mode == "json":
        labels, evidence = _parse_json(text, vocabulary)
    elif mode == "csv":
        labels, evidence = _parse_csv(text, vocabulary, expect_evidence_lines=require_evidence)
    else:
        raise ValueError(f"unknown answer mode {mode!r}")
    return labels, _check_evidence(labels, evidence, report_text, require_evidence=require_evidence)
