"""Leakage audit: search de-identified output, byte by byte, for every value that was removed.

The values searched for are PHI and exist only in memory while the audit runs; what the audit
records and prints is where a hit was (file, encoding, kind) and a short hash of the value, so two
hits of the same value can be told apart without revealing it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

ENCODINGS = ("latin-1", "utf-8", "utf-16-le", "utf-16-be")
MIN_VALUE_LENGTH = 4      # shorter strings occur by chance in any binary file
MIN_DIGITS_ONLY_LENGTH = 6
# Pixel bytes are image data, not text: short strings occur there by chance, so only long values
# (UIDs, dates, IDs) are searched for in them; burned-in text is the pixel scrubber's job.
MIN_PIXEL_VALUE_LENGTH = 8
PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"

# PHI-shaped strings that must never appear, whatever the study's own values were.
PHI_PATTERNS: dict[str, re.Pattern[bytes]] = {
    "email": re.compile(rb"[A-Za-z0-9._%+-]{2,}@[A-Za-z0-9-]{2,}\.[A-Za-z0-9.-]*[A-Za-z]{2,}"),
    "phone": re.compile(rb"(?<![\d.])\(?\d{3}\)?[-. ]\d{3}[-. ]\d{4}(?![\d.])"),
    "ssn": re.compile(rb"(?<!\d)\d{3}-\d{2}-\d{4}(?!\d)"),
    "url": re.compile(rb"(?i)\b(?:https?://|www\.)[a-z0-9.-]+\.[a-z]{2,}"),
    "mrn_label": re.compile(rb"(?i)\b(?:MRN|medical record (?:number|no\.?))\s*[:#]?\s*[A-Z0-9]{4,}"),
}


@dataclass(frozen=True)
class AuditHit:
    file: str
    kind: str          # "removed_value" or "pattern:<name>"
    encoding: str
    value_hash: str    # sha256 of the value, first 12 hex digits; never the value

    def to_dict(self) -> dict:
        return asdict(self)


def value_hash(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8", "replace")).hexdigest()[:12]


def searchable(values: Iterable[str], min_length: int = MIN_VALUE_LENGTH) -> list[str]:
    """The values worth searching for: long enough not to occur by chance."""
    out = set()
    for v in values:
        v = str(v).strip()
        if len(v) < min_length or (v.isdigit() and len(v) < MIN_DIGITS_ONLY_LENGTH):
            continue
        out.add(v)
    return sorted(out)


def split_pixel_data(data: bytes) -> tuple[bytes, bytes]:
    """(everything before the top-level PixelData value, the PixelData value) of a DICOM file."""
    start = 0
    while (pos := data.find(PIXEL_DATA_TAG, start)) >= 0:
        explicit = data[pos + 4:pos + 6] in (b"OB", b"OW")
        length_at = pos + 8 if explicit else pos + 4
        length = int.from_bytes(data[length_at:length_at + 4], "little")
        value_at = length_at + 4
        if length == 0xFFFFFFFF or value_at + length <= len(data) and len(data) - (value_at + length) < 1024:
            return data[:pos], data[pos:]
        start = pos + 1
    return data, b""


def scan_dicom_bytes(data: bytes, values: Iterable[str], *, name: str = "") -> list[AuditHit]:
    """Header bytes: every removed value and PHI pattern; pixel bytes: long removed values only."""
    values = list(values)
    header, pixels = split_pixel_data(data)
    hits = scan_bytes(header, values, name=name)
    seen = {h.value_hash for h in hits}
    for hit in scan_bytes(pixels, searchable(values, MIN_PIXEL_VALUE_LENGTH), name=name, patterns=False):
        if hit.value_hash not in seen:
            hits.append(hit)
    return hits


def scan_bytes(data: bytes, values: Iterable[str], *, name: str = "", patterns: bool = True) -> list[AuditHit]:
    """Each removed value (case-insensitive, as a whole word) or PHI pattern found in `data`, once."""
    hits: list[AuditHit] = []
    lowered = data.lower()  # ASCII letters only, which is what case-insensitivity needs here
    for value in searchable(values):
        for enc in ENCODINGS:
            try:
                needle = value.lower().encode(enc)
            except UnicodeEncodeError:
                continue
            if _find_word(lowered, needle, single_byte=enc in ("latin-1", "utf-8")):
                hits.append(AuditHit(name, "removed_value", enc, value_hash(value)))
                break
    if patterns:
        for kind, rx in PHI_PATTERNS.items():
            for variant, enc in ((data, "latin-1"), (_utf16_as_ascii(data), "utf-16")):
                m = rx.search(variant)
                if m:
                    hits.append(AuditHit(name, f"pattern:{kind}", enc, value_hash(m.group().decode("latin-1"))))
                    break
    return hits


def _find_word(haystack: bytes, needle: bytes, single_byte: bool) -> bool:
    """`needle` in `haystack` not inside a longer word (MARY in SUMMARY is not a hit)."""
    pos = haystack.find(needle)
    while pos >= 0:
        if not single_byte:
            return True  # UTF-16 neighbours are two bytes wide; any occurrence counts
        before = haystack[pos - 1:pos]
        after = haystack[pos + len(needle):pos + len(needle) + 1]
        if not (before.isalnum() and needle[:1].isalnum()) and not (after.isalnum() and needle[-1:].isalnum()):
            return True
        pos = haystack.find(needle, pos + 1)
    return False


def _utf16_as_ascii(data: bytes) -> bytes:
    """ASCII text stored as UTF-16 (either byte order) made searchable by the byte patterns."""
    return data.replace(b"\x00", b"")


def scan_file(path: Path, values: Iterable[str], *, name: str | None = None) -> list[AuditHit]:
    """A .dcm file is scanned as DICOM, anything else (reports) as text."""
    data = path.read_bytes()
    label = name or path.name
    if path.suffix.lower() == ".dcm" or data[128:132] == b"DICM":
        return scan_dicom_bytes(data, values, name=label)
    return scan_bytes(data, values, name=label)
