"""PS3.15 Annex E Table E.1-1 (Basic Application Level Confidentiality Profile and its options) as data.

The table lives in `data/annex_e.csv`, rebuilt from published sources by `data/build_annex_e.py`; see
`data/ANNEX_E_SOURCE.md` for the edition and what was derived rather than shipped.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

OPTION_COLUMNS = (
    "retain_safe_private", "retain_uids", "retain_device_identity", "retain_institution_identity",
    "retain_patient_characteristics", "retain_long_full_dates", "retain_long_modified_dates",
    "clean_descriptors", "clean_structured_content", "clean_graphics",
)
BASIC_ACTIONS = frozenset({"D", "Z", "X", "K", "C", "U", "Z/D", "X/Z", "X/D", "X/Z/D", "X/Z/U*"})


@dataclass(frozen=True)
class AnnexERule:
    """One row of Table E.1-1: the basic profile action and the action each option substitutes ('' = none)."""

    tag: str  # "(gggg,eeee)", with 'xx' for repeating groups and "(gggg,eeee)" itself for private attributes
    keyword: str
    name: str
    vr: str
    basic: str
    options: dict[str, str]
    options_source: str  # "dicom-standard-0.1.0" (shipped), "derived-from-vr" or "none"

    def option(self, column: str) -> str:
        return self.options.get(column, "")


@dataclass(frozen=True)
class AnnexETable:
    """Rules by exact tag, plus the repeating-group masks (curves, overlays)."""

    by_tag: dict[int, AnnexERule]
    masked: tuple[tuple[int, int, AnnexERule], ...]  # (mask, value, rule): tag & mask == value
    private: AnnexERule

    def __len__(self) -> int:
        return len(self.by_tag) + len(self.masked) + 1

    def rule_for(self, tag: int) -> AnnexERule | None:
        """The row that applies to a standard (even-group) tag, or None when the table does not list it."""
        rule = self.by_tag.get(tag)
        if rule is not None:
            return rule
        for mask, value, masked_rule in self.masked:
            if tag & mask == value:
                return masked_rule
        return None

    def rules(self) -> list[AnnexERule]:
        return [*self.by_tag.values(), *(r for _, _, r in self.masked), self.private]


def _mask(tag: str) -> tuple[int, int]:
    digits = tag[1:5] + tag[6:10]
    mask = int("".join("0" if c in "xX" else "F" for c in digits), 16)
    value = int("".join("0" if c in "xX" else c for c in digits), 16)
    return mask, value


@lru_cache(maxsize=1)
def load_table() -> AnnexETable:
    """Parse the packaged CSV once."""
    text = resources.files("appliance.deid").joinpath("data/annex_e.csv").read_text(encoding="utf-8")
    by_tag: dict[int, AnnexERule] = {}
    masked: list[tuple[int, int, AnnexERule]] = []
    private = None
    for row in csv.DictReader(text.splitlines()):
        if row["basic"] not in BASIC_ACTIONS:
            raise ValueError(f"annex_e.csv: unknown action {row['basic']!r} for {row['tag']}")
        rule = AnnexERule(tag=row["tag"], keyword=row["keyword"], name=row["name"], vr=row["vr"],
                          basic=row["basic"], options={c: row[c] for c in OPTION_COLUMNS if row[c]},
                          options_source=row["options_source"])
        if row["tag"] == "(gggg,eeee)":
            private = rule
        elif "x" in row["tag"].lower():
            mask, value = _mask(row["tag"])
            masked.append((mask, value, rule))
        else:
            by_tag[int(row["tag"][1:5] + row["tag"][6:10], 16)] = rule
    if private is None:
        raise ValueError("annex_e.csv has no private-attributes row")
    return AnnexETable(by_tag=by_tag, masked=tuple(masked), private=private)
