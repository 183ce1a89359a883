"""site.yaml validation: unknown keys and bad values are one-line errors naming the key."""

import pytest
import yaml

from appliance.config import SiteConfig, load_site_config, parse_site_config, template_text
from appliance.errors import ConfigError


def test_template_is_valid_and_commented(tmp_path):
    text = template_text("st-mary")
    assert text.count("\n#") + text.count("  #") >= 15, "the template explains its keys"
    for section, model in SiteConfig.model_fields.items():
        assert f"\n{section}:" in text
        for key in model.annotation.model_fields:
            assert f"  {key}:" in text, f"{section}.{key} missing from the template"
    path = tmp_path / "site.yaml"
    path.write_text(text)
    cfg = load_site_config(path)
    assert cfg.site.name == "st-mary"
    assert cfg == SiteConfig(site={"name": "st-mary"})  # template shows exactly the defaults


def test_unknown_key_names_key_and_allowed_keys():
    with pytest.raises(ConfigError) as e:
        parse_site_config({"ingest": {"modalitys": ["CT"]}})
    msg = str(e.value)
    assert "\n" not in msg
    assert "ingest.modalitys" in msg and "modalities" in msg


def test_unknown_section():
    with pytest.raises(ConfigError, match=r"unknown key 'trainning'.*compute.*ingest"):
        parse_site_config({"trainning": {}})


def test_bad_literal_lists_allowed_values():
    with pytest.raises(ConfigError) as e:
        parse_site_config({"compute": {"device": "tpu"}})
    msg = str(e.value)
    assert "compute.device" in msg and "'tpu'" in msg
    assert "auto" in msg and "cpu" in msg and "cuda" in msg


def test_bad_modality_in_list():
    with pytest.raises(ConfigError) as e:
        parse_site_config({"ingest": {"modalities": ["CT", "PET"]}})
    assert "ingest.modalities" in str(e.value) and "CR" in str(e.value)


@pytest.mark.parametrize("section,values,needle", [
    ("preprocess", {"spacing_mm": [1.5, 0, 3]}, "preprocess.spacing_mm"),
    ("preprocess", {"canvas": [240, 240]}, "preprocess.canvas"),
    ("preprocess", {"hu_clip": [200, -1000]}, "low < high"),
    ("workflow", {"task_retries": -1}, "workflow.task_retries"),
    ("site", {"name": "bad name!"}, "site.name"),
])
def test_bad_values(section, values, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        parse_site_config({section: values})


def test_invalid_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_site_config(tmp_path / "site.yaml")
    (tmp_path / "site.yaml").write_text("ingest: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_site_config(tmp_path / "site.yaml")
    (tmp_path / "site.yaml").write_text(yaml.safe_dump(["a", "b"]))
    with pytest.raises(ConfigError, match="mapping"):
        load_site_config(tmp_path / "site.yaml")
