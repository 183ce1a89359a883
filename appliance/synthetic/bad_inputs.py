"""Damaged input planted next to a synthetic cohort, so ingest's quarantine can be seen and tested.

Each kind is a copy of a good series under new UIDs (same study, so no study is lost), damaged
in one way: a truncated slice, a missing slice, mixed orientations; plus a non-DICOM file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pydicom

BAD_INPUT_KINDS = ("non_dicom", "truncated_file", "missing_slice", "mixed_orientation")


def _uid(*parts: object) -> str:
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def _first_series(dicom_dir: Path) -> list[Path]:
    """Files of the first series with 10 or more slices, sorted by position along the slice normal."""
    for folder in sorted(p for p in dicom_dir.rglob("*") if p.is_dir() and "damaged" not in p.parts):
        files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix not in (".jsonl", ".csv"))
        if len(files) >= 10:
            return sorted(files, key=_position_along_normal)
    raise FileNotFoundError(f"no series with 10 or more files under {dicom_dir}")


def _position_along_normal(path: Path) -> float:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    row, col = np.array(ds.ImageOrientationPatient[:3], float), np.array(ds.ImageOrientationPatient[3:], float)
    return float(np.dot(np.cross(row, col), np.array(ds.ImagePositionPatient, float)))


def _copy_series(files: list[Path], out_dir: Path, tag: str) -> list[pydicom.Dataset]:
    """Copies of a series' datasets under fresh, deterministic Series and SOP Instance UIDs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    series_uid = None
    copies = []
    for f in files:
        ds = pydicom.dcmread(f)
        series_uid = series_uid or _uid(tag, ds.SeriesInstanceUID)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = _uid(tag, ds.SOPInstanceUID)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesNumber = 900 + BAD_INPUT_KINDS.index(tag)
        copies.append(ds)
    return copies


def plant_bad_inputs(source: Path, kinds: tuple[str, ...] = BAD_INPUT_KINDS) -> dict[str, str]:
    """Write damaged copies under source/damaged/ (source: the cohort's dicom/ folder, the one that is
    ingested); return {kind: file or folder, relative to source}."""
    source = Path(source)
    files = _first_series(source)
    out = source / "damaged"
    planted: dict[str, str] = {}
    if "non_dicom" in kinds:
        out.mkdir(parents=True, exist_ok=True)
        (out / "scanner_notes.txt").write_text("Technologist notes: contrast given at 10:42.\n")
        planted["non_dicom"] = "damaged/scanner_notes.txt"
    if "truncated_file" in kinds:
        folder = out / "truncated"
        copies = _copy_series(files, folder, "truncated_file")
        for i, ds in enumerate(copies):
            ds.save_as(folder / f"IM{i:05d}", enforce_file_format=True)
        victim = folder / f"IM{len(copies) // 2:05d}"
        data = victim.read_bytes()
        victim.write_bytes(data[: len(data) - len(data) // 3])
        planted["truncated_file"] = str(victim.relative_to(source))
    if "missing_slice" in kinds:
        folder = out / "missing_slice"
        copies = _copy_series(files, folder, "missing_slice")
        for i, ds in enumerate(copies):
            if i != len(copies) // 2:
                ds.save_as(folder / f"IM{i:05d}", enforce_file_format=True)
        planted["missing_slice"] = str(folder.relative_to(source))
    if "mixed_orientation" in kinds:
        folder = out / "mixed_orientation"
        copies = _copy_series(files, folder, "mixed_orientation")
        for i, ds in enumerate(copies):
            if i >= len(copies) // 2:  # second half written as if coronal
                ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
            ds.save_as(folder / f"IM{i:05d}", enforce_file_format=True)
        planted["mixed_orientation"] = str(folder.relative_to(source))
    return planted
