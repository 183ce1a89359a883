"""The label-extraction prompt: finding definitions, labelling rules and a strict answer format.

Two answer formats:
- "csv" (the GreenRFM protocol): one line of exactly N comma-separated values from {1, 0, -1} in the
  vocabulary's order. With evidence, one further line per non-zero value: `<finding>: <sentence>`.
- "json": {"labels": {finding: value}, "evidence": {finding: sentence}}, described by `json_schema()` so a
  server with structured output (vLLM, llama.cpp, Ollama) can constrain decoding to it.

The report sits between <report> tags in the user message; `report_from_messages` reads it back (the scripted
test server keys its behaviours on it).
"""

from __future__ import annotations

from typing import Literal

# Part of every label cache key: bump it whenever the wording or format below changes.
PROMPT_VERSION = "1"

AnswerMode = Literal["json", "csv"]
ALLOWED_VALUES = (1, 0, -1)

_REPORT_OPEN = "<report>"
_REPORT_CLOSE = "</report>"

_RULES = """\
Labelling rules, for each finding:
  1  = the report states that the finding is present.
  0  = the report states that it is absent, or does not mention it.
  -1 = the report is uncertain: "possible", "probable", "suspected", "cannot be excluded", "may represent",
       "versus", or a similar hedge.
Label only what the report says about the current study; do not infer findings that it does not describe."""


def _finding_lines(vocabulary) -> str:
    lines = []
    for i, finding in enumerate(vocabulary.findings, 1):
        line = f"{i}. {finding.name}: {finding.definition}".rstrip()
        synonyms = [s for s in (getattr(finding, "synonyms", None) or ()) if s]
        if synonyms:
            line += f" (also written as: {', '.join(synonyms)})"
        lines.append(line)
    return "\n".join(lines)


def _csv_format(vocabulary, ask_evidence: bool) -> str:
    n = len(vocabulary.findings)
    order = ", ".join(f.name for f in vocabulary.findings)
    text = (
        f"Answer format: the first line holds exactly {n} comma-separated values, each 1, 0 or -1, one per "
        f"finding in this order: {order}.\n"
        f"Example with {n} values: {','.join(['0'] * n)}\n"
    )
    if ask_evidence:
        text += (
            "Then, for every finding labelled 1 or -1, one more line: the finding's name, a colon, and one "
            "sentence copied word for word from the report that supports the label.\n"
            "Write nothing else: no explanation, no headings, no code fences."
        )
    else:
        text += "Write nothing else: no explanation, no finding names, no code fences."
    return text


def _json_format(vocabulary, ask_evidence: bool) -> str:
    text = (
        'Answer format: one JSON object and nothing else. Its "labels" object has one key per finding, '
        "spelled exactly as in the list above, whose value is the number 1, 0 or -1."
    )
    if ask_evidence:
        text += (
            ' Its "evidence" object has the same keys; for a finding labelled 1 or -1 the value is one sentence '
            'copied word for word from the report that supports the label, otherwise "".'
        )
    return text


def system_prompt(vocabulary, *, mode: AnswerMode, ask_evidence: bool) -> str:
    """The instruction shared by every report (kept identical across reports so servers can cache its prefix)."""
    if mode not in ("json", "csv"):
        raise ValueError(f"unknown answer mode {mode!r}")
    answer_format = _csv_format(vocabulary, ask_evidence) if mode == "csv" else _json_format(vocabulary, ask_evidence)
    return (
        "You label radiology reports. For each finding below, decide whether the report describes it.\n\n"
        f"Findings:\n{_finding_lines(vocabulary)}\n\n{_RULES}\n\n{answer_format}"
    )


def user_message(report_text: str) -> str:
    return f"{_REPORT_OPEN}\n{report_text.strip()}\n{_REPORT_CLOSE}"


def build_messages(report_text: str, vocabulary, *, mode: AnswerMode, ask_evidence: bool) -> list[dict]:
    """Chat messages (system + user) asking for one report's labels in the given answer format."""
    return [
        {"role": "system", "content": system_prompt(vocabulary, mode=mode, ask_evidence=ask_evidence)},
        {"role": "user", "content": user_message(report_text)},
    ]


def report_from_messages(messages: list[dict]) -> str | None:
    """The report text inside the last user message, or None when there is none."""
    for message in reversed(messages or []):
        content = message.get("content") if isinstance(message, dict) else None
        if message.get("role") == "user" and isinstance(content, str):
            start, end = content.find(_REPORT_OPEN), content.rfind(_REPORT_CLOSE)
            if start != -1 and end > start:
                return content[start + len(_REPORT_OPEN) : end].strip()
            return content.strip()
    return None


def json_schema(vocabulary, ask_evidence: bool) -> dict:
    """JSON schema of the "json" answer: every finding required, values -1/0/1, no other keys."""
    names = [f.name for f in vocabulary.findings]
    labels = {
        "type": "object",
        "properties": {name: {"type": "integer", "enum": [-1, 0, 1]} for name in names},
        "required": names,
        "additionalProperties": False,
    }
    schema: dict = {
        "type": "object",
        "properties": {"labels": labels},
        "required": ["labels"],
        "additionalProperties": False,
    }
    if ask_evidence:
        schema["properties"]["evidence"] = {
            "type": "object",
            "properties": {name: {"type": "string"} for name in names},
            "required": names,
            "additionalProperties": False,
        }
        schema["required"].append("evidence")
    return schema
