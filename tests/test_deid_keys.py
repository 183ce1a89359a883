"""Site key handling: loading, generation, keyed UIDs, pseudonyms and date offsets never expose the key."""

import os
import stat

import pytest
from pydicom.uid import UID

from appliance.deid.keys import DATE_OFFSET_RANGE_DAYS, DeidKeys
from appliance.errors import ConfigError

KEY_HEX = "a1" * 32


@pytest.fixture
def keys(tmp_path):
    path = tmp_path / "deid.key"
    path.write_text(KEY_HEX + "\n")
    return DeidKeys.from_file(path)


def test_generate_writes_private_hex_key_and_refuses_overwrite(tmp_path):
    path = tmp_path / "keys" / "deid.key"
    DeidKeys.generate(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    text = path.read_text().strip()
    assert len(bytes.fromhex(text)) == 32
    before = path.read_bytes()
    with pytest.raises(ConfigError):
        DeidKeys.generate(path)
    assert path.read_bytes() == before
    DeidKeys.from_file(path)  # loads


def test_raw_and_hex_keys_load(tmp_path):
    raw = tmp_path / "raw.key"
    raw.write_bytes(bytes(range(40)))
    assert DeidKeys.from_file(raw).uid("1.2.3") == DeidKeys(bytes(range(40))).uid("1.2.3")
    hexed = tmp_path / "hex.key"
    hexed.write_text(KEY_HEX)
    same_as_raw = tmp_path / "raw2.key"
    same_as_raw.write_bytes(bytes.fromhex(KEY_HEX))
    assert DeidKeys.from_file(hexed).uid("1.2.3") == DeidKeys.from_file(same_as_raw).uid("1.2.3")


@pytest.mark.parametrize("content", [b"", b"short", bytes.fromhex("ab" * 31), b"ab" * 31])
def test_bad_key_file_is_a_one_line_config_error_without_key_bytes(tmp_path, content):
    path = tmp_path / "deid.key"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        DeidKeys.from_file(path)
    message = str(info.value)
    assert "\n" not in message
    if content:
        assert content.decode("latin-1") not in message
        assert content.hex() not in message


def test_missing_or_unreadable_key_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        DeidKeys.from_file(tmp_path / "absent.key")
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError):
        DeidKeys.from_file(tmp_path)  # a folder is unreadable as a key


def test_repr_and_fingerprint_hide_the_key(keys):
    for text in (repr(keys), str(keys), keys.fingerprint):
        assert KEY_HEX not in text and "a1a1" not in text
    assert keys.fingerprint in repr(keys)
    assert len(keys.fingerprint) == 12


def test_uid_is_valid_consistent_and_keyed(keys):
    original = "1.2.840.113619.2.55.3.604688119.969.1268071029.320"
    new = keys.uid(original)
    assert new.startswith("2.25.")
    assert len(new) <= 64
    assert UID(new).is_valid
    assert keys.uid(original) == new
    assert keys.uid(original + "1") != new
    assert DeidKeys(b"\x02" * 32).uid(original) != new


def test_pseudonyms_fit_vr_limits(keys):
    for kind in ("PAT", "ACC", "STU", "ID"):
        p = keys.pseudonym(kind, "Doe^John 12345")
        assert p.startswith(kind + "-")
        assert len(p) <= 16  # SH
        assert p[len(kind) + 1:].isalnum() and p.upper() == p
        assert keys.pseudonym(kind, "Doe^John 12345") == p
    assert keys.pseudonym("PAT", "A") != keys.pseudonym("PAT", "B")
    assert keys.pseudonym("PAT", "A") != DeidKeys(b"\x03" * 32).pseudonym("PAT", "A")
    with pytest.raises(ValueError):
        keys.pseudonym("bad kind", "x")


def test_date_offsets_are_per_patient_nonzero_and_in_range(keys):
    lo, hi = DATE_OFFSET_RANGE_DAYS
    offsets = {pid: keys.date_offset_days(pid) for pid in (f"MRN{i:05d}" for i in range(300))}
    assert all(lo <= d <= hi and d != 0 for d in offsets.values())
    assert len(set(offsets.values())) > 200  # spread, not one shift for everyone
    assert all(keys.date_offset_days(pid) == d for pid, d in offsets.items())
