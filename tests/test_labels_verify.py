"""The answer verifier and the prompt it checks against."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from appliance.labels.prompt import PROMPT_VERSION, build_messages, json_schema, report_from_messages
from appliance.labels.verify import AnswerError, parse_and_verify


@dataclass(frozen=True)
class StandInFinding:
    name: str
    definition: str
    synonyms: tuple[str, ...] = ()


@dataclass(frozen=True)
class StandInVocabulary:
    """The shape of appliance.labels.vocabularies.Vocabulary that the labels code relies on."""

    name: str
    findings: tuple[StandInFinding, ...]

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.findings]


VOCAB = StandInVocabulary(
    "tiny",
    (
        StandInFinding("cardiomegaly", "enlarged heart", ("enlarged cardiac silhouette",)),
        StandInFinding("pleural effusion", "fluid in the pleural space"),
        StandInFinding("lung nodule", "a focal rounded opacity up to 3 cm"),
        StandInFinding("emphysema", "destruction of alveolar walls"),
    ),
)
REPORT = (
    "FINDINGS: The heart is enlarged.\nSmall left pleural   effusion. "
    "A 4 mm nodule in the right upper lobe cannot be excluded. No emphysema."
)
LABELS = {"cardiomegaly": 1, "pleural effusion": 1, "lung nodule": -1, "emphysema": 0}
EVIDENCE = {
    "cardiomegaly": "The heart is enlarged.",
    "pleural effusion": "small left pleural effusion",
    "lung nodule": "A 4 mm nodule in the right upper lobe cannot be excluded.",
}


def verify(answer, mode="csv", *, require_evidence=False, report=REPORT):
    return parse_and_verify(answer, VOCAB, mode, report, require_evidence=require_evidence)


def json_answer(labels=LABELS, evidence=None, **extra):
    obj = {"labels": labels, **extra}
    if evidence is not None:
        obj["evidence"] = evidence
    return json.dumps(obj)


# --- csv ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    ["1,1,-1,0", " 1, 1, -1, 0 \n", "1,1,-1,0.", "```\n1,1,-1,0\n```", "```csv\n1, 1, -1, 0\n```"],
)
def test_csv_accepts_the_format_with_whitespace_fences_and_a_final_period(answer):
    labels, evidence = verify(answer)
    assert labels == LABELS and list(labels) == VOCAB.names
    assert evidence == {}


@pytest.mark.parametrize(
    "answer, fragment",
    [
        ("1,1,-1", "exactly 4 values, got 3"),
        ("1,1,-1,0,0", "exactly 4 values, got 5"),
        ("1,1,2,0", "value '2' at position 3"),
        ("1,1,1.0,0", "position 3"),
        ("1,yes,-1,0", "non-numeric value at position 2"),
        ("1 1 -1 0", "exactly 4 values, got 1"),
        ("Answer: 1,1,-1,0", "non-numeric value at position 1"),
        ("1,1,-1,0\nThe heart is enlarged.", "other text after the values"),
        ("", "empty answer"),
        ("  \n ", "empty answer"),
        ("1,,-1,0", "position 2"),
    ],
)
def test_csv_rejects_anything_else(answer, fragment):
    with pytest.raises(AnswerError) as info:
        verify(answer)
    assert fragment in info.value.reason
    assert "\n" not in info.value.reason


def test_csv_evidence_lines_are_checked_against_the_report():
    answer = "1,1,-1,0\n" + "\n".join(f"{k}: {v}" for k, v in EVIDENCE.items())
    labels, evidence = verify(answer, require_evidence=True)
    assert labels == LABELS
    assert evidence == EVIDENCE  # whitespace and case differ from the report, still found

    missing = "1,1,-1,0\ncardiomegaly: The heart is enlarged.\npleural effusion: small left pleural effusion"
    with pytest.raises(AnswerError, match="'lung nodule' labelled -1 has no evidence"):
        verify(missing, require_evidence=True)

    invented = answer.replace("The heart is enlarged.", "Marked cardiomegaly.")
    with pytest.raises(AnswerError, match="'cardiomegaly' labelled 1 has evidence that is not in the report"):
        verify(invented, require_evidence=True)

    with pytest.raises(AnswerError, match="does not start with a finding name"):
        verify("1,1,-1,0\nheart: The heart is enlarged.", require_evidence=True)
    with pytest.raises(AnswerError, match="two evidence lines"):
        verify(answer + "\ncardiomegaly: The heart is enlarged.", require_evidence=True)


# --- json -----------------------------------------------------------------------------------------------------


def test_json_accepts_the_schema_and_tolerates_fences_strings_and_integral_floats():
    assert verify(json_answer(), "json") == (LABELS, {})
    assert verify("```json\n" + json_answer() + "\n```", "json")[0] == LABELS
    loose = {"cardiomegaly": "1", "pleural effusion": 1.0, "lung nodule": -1, "emphysema": 0}
    labels, _ = verify(json_answer(loose), "json")
    assert labels == LABELS and all(type(v) is int for v in labels.values())


def test_json_evidence_required_for_non_zero_labels_only():
    evidence = {**EVIDENCE, "emphysema": "not checked for a 0 label"}
    labels, kept = verify(json_answer(evidence=evidence), "json", require_evidence=True)
    assert labels == LABELS and kept == EVIDENCE

    with pytest.raises(AnswerError, match="'pleural effusion' labelled 1 has no evidence"):
        verify(json_answer(evidence={**EVIDENCE, "pleural effusion": ""}), "json", require_evidence=True)
    with pytest.raises(AnswerError, match="not in the report"):
        verify(json_answer(evidence={**EVIDENCE, "lung nodule": "A large mass."}), "json", require_evidence=True)
    with pytest.raises(AnswerError, match="no evidence"):
        verify(json_answer(), "json", require_evidence=True)
    # not required: unverifiable evidence is dropped instead of failing the answer
    _, kept = verify(json_answer(evidence={**EVIDENCE, "lung nodule": "A large mass."}), "json")
    assert set(kept) == {"cardiomegaly", "pleural effusion"}


@pytest.mark.parametrize(
    "answer, fragment",
    [
        (json_answer()[:-7], "not valid JSON"),  # truncated
        ('{"labels": {"cardiomegaly": 1,', "not valid JSON"),
        ("The heart is enlarged.", "not valid JSON"),
        ("[1, 1, -1, 0]", "JSON list, not an object"),
        (json.dumps({"cardiomegaly": 1}), "unexpected top-level key(s)"),
        (json.dumps({"result": LABELS}), "unexpected top-level key(s)"),
        (json_answer(extra_key=1), "unexpected top-level key(s)"),
        (json_answer({k: v for k, v in LABELS.items() if k != "emphysema"}), "missing (first: 'emphysema')"),
        (json_answer({**LABELS, "pneumothorax": 0}), "1 unknown key(s)"),
        (json_answer({**LABELS, "cardiomegaly": 2}), "'cardiomegaly' has value 2"),
        (json_answer({**LABELS, "cardiomegaly": 0.5}), "'cardiomegaly' has value 0.5"),
        (json_answer({**LABELS, "cardiomegaly": True}), "boolean"),
        (json_answer({**LABELS, "cardiomegaly": "present"}), "has a str value"),
        (json_answer({**LABELS, "cardiomegaly": None}), "has a NoneType value"),
        (json_answer(evidence={"heart": "The heart is enlarged."}), "unknown finding"),
        (json_answer(evidence=["The heart is enlarged."]), "'evidence' is not an object"),
        (json.dumps({"labels": [1, 1, -1, 0]}), "no 'labels' object"),
    ],
)
def test_json_rejects_malformed_truncated_incomplete_and_out_of_range(answer, fragment):
    with pytest.raises(AnswerError) as info:
        verify(answer, "json")
    assert fragment in info.value.reason


def test_reasons_never_quote_the_report():
    secret = "Patient John Q Example has a 4 mm nodule."
    bad = [
        "1,1,-1,0\n" + secret,
        "1,1,-1," + secret,
        secret,
        json_answer({**LABELS, "cardiomegaly": secret}),
        json_answer({**LABELS, secret: 1}),
    ]
    for answer in bad:
        for mode in ("csv", "json"):
            with pytest.raises(AnswerError) as info:
                verify(answer, mode, report=secret)
            assert "John" not in info.value.reason and "nodule." not in info.value.reason


# --- prompt ---------------------------------------------------------------------------------------------------


def test_prompt_defines_every_finding_and_the_format():
    assert PROMPT_VERSION == "1"
    csv = build_messages(REPORT, VOCAB, mode="csv", ask_evidence=False)
    assert [m["role"] for m in csv] == ["system", "user"]
    system = csv[0]["content"]
    for finding in VOCAB.findings:
        assert f"{finding.name}: {finding.definition}" in system
    assert "enlarged cardiac silhouette" in system
    assert "exactly 4 comma-separated values" in system and "cannot be excluded" in system
    assert report_from_messages(csv) == REPORT.strip()

    js = build_messages(REPORT, VOCAB, mode="json", ask_evidence=True)
    assert "JSON object" in js[0]["content"] and "evidence" in js[0]["content"]
    # the instruction does not depend on the report, so servers can cache it as a shared prefix
    assert build_messages("other", VOCAB, mode="json", ask_evidence=True)[0] == js[0]


def test_json_schema_requires_every_finding_with_enum_values():
    schema = json_schema(VOCAB, ask_evidence=False)
    labels = schema["properties"]["labels"]
    assert labels["required"] == VOCAB.names and labels["additionalProperties"] is False
    assert all(p == {"type": "integer", "enum": [-1, 0, 1]} for p in labels["properties"].values())
    assert "evidence" not in schema["properties"] and schema["additionalProperties"] is False
    with_evidence = json_schema(VOCAB, ask_evidence=True)
    assert with_evidence["required"] == ["labels", "evidence"]
    assert with_evidence["properties"]["evidence"]["required"] == VOCAB.names


def test_real_vocabulary_round_trips_through_prompt_schema_and_verifier():
    vocabularies = pytest.importorskip("appliance.labels.vocabularies")
    if not hasattr(vocabularies, "load_vocabulary"):
        pytest.skip("load_vocabulary not written yet")
    vocab = vocabularies.load_vocabulary("ct_rate_18")
    n = len(vocab.findings)
    system = build_messages("x", vocab, mode="csv", ask_evidence=False)[0]["content"]
    assert f"exactly {n} comma-separated values" in system
    assert len(json_schema(vocab, False)["properties"]["labels"]["required"]) == n
    labels, _ = parse_and_verify(",".join(["0"] * n), vocab, "csv", "x", require_evidence=False)
    assert list(labels) == list(vocab.names)
