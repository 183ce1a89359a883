"""Rebuild annex_e.csv (PS3.15 Table E.1-1) from two PyPI wheels, offline.

    pip download --no-deps -d /tmp/x dicom-anonymizer==2.1.0 dicom-standard==0.1.0
    python appliance/deid/data/build_annex_e.py /tmp/x/dicom_anonymizer-2.1.0-py3-none-any.whl \
        /tmp/x/dicom_standard-0.1.0-py3-none-any.whl

Rows and basic-profile actions come from dicom-anonymizer's `dicomfields_2026c.py` (the 2026c edition of
Table E.1-1, one Python list per action). The option columns come from innolitics' parsed table shipped in
dicom-standard (`confidentiality_profile_attributes.json`, parsed from the web edition of April 2020) for every
row it has; rows added to the standard since then get only the date options, derived from their VR (see
ANNEX_E_SOURCE.md). Nothing is imported from either wheel: both are read as data.
"""

from __future__ import annotations

import csv
import json
import re
import sys
import zipfile
from pathlib import Path

from pydicom.datadict import dictionary_VR, keyword_for_tag

ANONYMIZER_MEMBER = "dicomanonymizer/dicom_anonymization_databases/dicomfields_2026c.py"
STANDARD_MEMBER = "dicom_standard-0.1.0.data/data/standard/confidentiality_profile_attributes.json"
LIST_TO_ACTION = {"D_TAGS": "D", "Z_TAGS": "Z", "X_TAGS": "X", "U_TAGS": "U", "Z_D_TAGS": "Z/D", "X_Z_TAGS": "X/Z",
                  "X_D_TAGS": "X/D", "X_Z_D_TAGS": "X/Z/D", "X_Z_U_STAR_TAGS": "X/Z/U*"}
# dicom-anonymizer writes repeating groups as (group, element, group mask, element mask)
MASKED_TAGS = {("5000", "0000"): "(50xx,xxxx)", ("6000", "4000"): "(60xx,4000)", ("6000", "3000"): "(60xx,3000)"}
OPTION_COLUMNS = {  # CSV column -> innolitics key
    "retain_safe_private": "rtnSafePrivOpt", "retain_uids": "rtnUIDsOpt", "retain_device_identity": "rtnDevIdOpt",
    "retain_institution_identity": "rtnInstIdOpt", "retain_patient_characteristics": "rtnPatCharsOpt",
    "retain_long_full_dates": "rtnLongFullDatesOpt", "retain_long_modified_dates": "rtnLongModifDatesOpt",
    "clean_descriptors": "cleanDescOpt", "clean_structured_content": "cleanStructContOpt",
    "clean_graphics": "cleanGraphOpt",
}
PRIVATE_ROW_TAG = "(GGGG,EEEE) WHERE GGGG IS ODD"
ENTRY = re.compile(r"^\s*\((0x[0-9A-Fa-f]{4}),\s*(0x[0-9A-Fa-f]{4})(?:,\s*0x[0-9A-Fa-f]{4},\s*0x[0-9A-Fa-f]{4})?\),"
                   r"\s*#\s*(.+?)\s*$")


def parse_anonymizer_lists(source: str) -> dict[str, tuple[str, str]]:
    """'(gggg,eeee)' -> (basic action, attribute name) from the Python source, without executing it."""
    source = re.sub(r"\(\s*\n\s*(0x[0-9A-Fa-f]+),\s*\n\s*(0x[0-9A-Fa-f]+),\s*\n\s*\),", r"(\1, \2),", source)
    rows: dict[str, tuple[str, str]] = {}
    current = None
    for line in source.splitlines():
        start = re.match(r"^([A-Z_]+) = \[", line)
        if start:
            current = start.group(1) if start.group(1) in LIST_TO_ACTION else None
            continue
        if line.startswith("]"):
            current = None
        match = ENTRY.match(line)
        if current and match:
            group, element = match.group(1)[2:].upper(), match.group(2)[2:].upper()
            tag = MASKED_TAGS.get((group, element), f"({group},{element})")
            if tag in rows:
                raise ValueError(f"{tag} listed twice")
            rows[tag] = (LIST_TO_ACTION[current], match.group(3))
    return rows


def build(anonymizer_wheel: Path, standard_wheel: Path, out_csv: Path) -> int:
    with zipfile.ZipFile(anonymizer_wheel) as zf:
        basic = parse_anonymizer_lists(zf.read(ANONYMIZER_MEMBER).decode("utf-8"))
    with zipfile.ZipFile(standard_wheel) as zf:
        innolitics = {r["tag"].upper().replace("XX", "xx"): r for r in json.loads(zf.read(STANDARD_MEMBER))}
    private_row = innolitics.pop(PRIVATE_ROW_TAG)
    out = []
    for tag, (action, name) in basic.items():
        shipped = innolitics.get(tag.upper().replace("XX", "xx")) or innolitics.get(tag)
        vr = ""
        keyword = ""
        if "x" not in tag:
            tag_int = int(tag[1:5] + tag[6:10], 16)
            keyword = keyword_for_tag(tag_int)
            try:
                vr = dictionary_VR(tag_int)
            except KeyError:
                vr = ""
        row = {"tag": tag, "keyword": keyword, "name": name, "vr": vr, "basic": action}
        if shipped is not None:
            for column, key in OPTION_COLUMNS.items():
                row[column] = shipped.get(key, "")
            row["options_source"] = "dicom-standard-0.1.0"
        else:
            for column in OPTION_COLUMNS:
                row[column] = ""
            if vr in ("DA", "DT", "TM"):  # the rule every dated row of the 2020 table follows
                row["retain_long_full_dates"], row["retain_long_modified_dates"] = "K", "C"
                row["options_source"] = "derived-from-vr"
            else:
                row["options_source"] = "none"
        out.append(row)
    out.append({"tag": "(gggg,eeee)", "keyword": "", "name": "Private attributes (odd group)", "vr": "",
                "basic": private_row["basicProfile"], "options_source": "dicom-standard-0.1.0",
                **{c: private_row.get(k, "") for c, k in OPTION_COLUMNS.items()}})
    out.sort(key=lambda r: r["tag"].lower())
    fields = ["tag", "keyword", "name", "vr", "basic", *OPTION_COLUMNS, "options_source"]
    with out_csv.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(out)
    return len(out)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    n = build(Path(sys.argv[1]), Path(sys.argv[2]), Path(__file__).with_name("annex_e.csv"))
    print(f"wrote {n} rows")
