"""Vocabularies: built-ins load with the expected findings, custom YAML round-trips, bad files fail in one line."""

from __future__ import annotations

import pytest

from appliance.errors import ConfigError
from appliance.labels.vocabularies import (BUILTIN_VOCABULARIES, CT_RATE_18, Finding, Vocabulary, load_vocabulary)

EXPECTED_COUNTS = {"ct_rate_18": 18, "merlin_30": 30, "cxr_19": 19, "cxr_lines_tubes_10": 20, "chexpert_14": 14}


@pytest.mark.parametrize("name", BUILTIN_VOCABULARIES)
def test_builtin_loads(name):
    v = load_vocabulary(name)
    assert v.name == name
    assert len(v.findings) == EXPECTED_COUNTS[name]
    assert len(set(n.lower() for n in v.names)) == len(v.names)
    for f in v.findings:
        assert f.definition.strip()
        assert all(s == s.lower() and s.strip() for s in f.synonyms)
        if f.name != "No Finding":
            assert f.synonyms, f.name
    assert len(v.fingerprint()) == 12


def test_ct_rate_matches_module_constant():
    assert load_vocabulary("ct_rate_18").names == CT_RATE_18


def test_merlin_and_chexpert_names():
    merlin = load_vocabulary("merlin_30").names
    assert merlin[0] == "submucosal edema" and merlin[-1] == "fracture"
    assert {"surgically absent gallbladder", "abdominal aortic aneurysm", "prostatomegaly", "free air"} <= set(merlin)
    chexpert = load_vocabulary("chexpert_14").names
    assert chexpert[0] == "No Finding" and chexpert[-1] == "Support Devices"


def test_lines_tubes_convention():
    names = load_vocabulary("cxr_lines_tubes_10").names
    devices = names[0::2]
    assert len(devices) == 10
    assert names[1::2] == tuple(f"{d} malpositioned" for d in devices)


def test_custom_yaml_round_trip(tmp_path):
    v = Vocabulary(name="site_knee", findings=(
        Finding("meniscal tear", "A tear of the medial or lateral meniscus.", ("meniscal tear", "torn meniscus")),
        Finding("joint effusion", "Fluid in the knee joint.", ("joint effusion", "effusion"), negative_phrases=("joint is dry",),
                exclusions=("pleural effusion",)),
    ))
    path = tmp_path / "knee.yaml"
    path.write_text(v.to_yaml())
    back = load_vocabulary(path)
    assert back == v
    assert back.fingerprint() == v.fingerprint()
    assert load_vocabulary(str(path)) == v


def test_fingerprint_changes_with_content():
    v = load_vocabulary("ct_rate_18")
    changed = Vocabulary(v.name, v.findings[:-1] + (Finding(v.findings[-1].name, "another definition", v.findings[-1].synonyms),))
    assert changed.fingerprint() != v.fingerprint()


def test_synonyms_default_to_the_name(tmp_path):
    path = tmp_path / "v.yaml"
    path.write_text("name: v\nfindings:\n  - {name: Pneumothorax, definition: Air in the pleural space.}\n")
    assert load_vocabulary(path).findings[0].synonyms == ("pneumothorax",)


@pytest.mark.parametrize("text, words", [
    ("name: v\nfindings: [\n", "not valid YAML"),
    ("- just a list\n", "expected a mapping"),
    ("name: v\n", "'findings' must be a non-empty list"),
    ("name: v\nfindings:\n  - {name: a}\n", "'definition'"),
    ("name: v\nfindings:\n  - {name: a, definition: d, colour: red}\n", "unknown key"),
    ("name: v\nfindings:\n  - {name: a, definition: d}\n  - {name: A, definition: e}\n", "duplicate"),
    ("name: v\nfindings:\n  - {name: a, definition: d, synonyms: nope}\n", "'synonyms' must be a list"),
    ("name: v\nextra: 1\nfindings:\n  - {name: a, definition: d}\n", "unknown key"),
])
def test_bad_yaml_is_one_line_config_error(tmp_path, text, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_vocabulary(path)
    message = str(info.value)
    assert words in message and "\n" not in message and "bad.yaml" in message


def test_unknown_name_and_missing_file():
    with pytest.raises(ConfigError, match="unknown vocabulary 'ct_rate_19'"):
        load_vocabulary("ct_rate_19")
    with pytest.raises(ConfigError, match="not found"):
        load_vocabulary("/nonexistent/vocab.yaml")
