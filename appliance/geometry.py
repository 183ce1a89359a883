"""Slice-stack geometry from DICOM headers alone (no pixel data).

Ingest uses :func:`analyze_stack` to validate a series cheaply; preprocessing uses the same result to
resample in patient space. Positions are DICOM patient coordinates (LPS, millimetres).

Slices are ordered by their position along the slice normal (row direction x column direction), never by
InstanceNumber, and gaps are measured along that normal, so gantry tilt and uneven spacing are handled.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from appliance.errors import BadInputError

# Two slices closer than this along the normal are the same slice written twice.
DUPLICATE_TOL_MM = 0.01
# Gaps that differ by less than this (absolute or relative to the median gap) count as even.
EVEN_SPACING_TOL_MM = 0.02
EVEN_SPACING_TOL_REL = 0.02
# Missing-slice rule on gaps: regular gaps agree within this fraction of the median ...
REGULAR_GAP_TOL_REL = 0.10
# ... and a gap of at least this many median gaps, close to a whole multiple, is a hole.
MISSING_GAP_MIN_FACTOR = 1.5


class GeometryError(BadInputError):
    """A series whose slice geometry cannot make a volume; ``code`` says which rule failed."""


def _floats(value: Any, count: int) -> tuple[float, ...] | None:
    """``count`` finite floats from a DICOM multi-value, or None when absent or malformed."""
    if value is None:
        return None
    try:
        items = list(value) if not isinstance(value, (str, bytes, int, float)) else [value]
        numbers = tuple(float(v) for v in items)
    except (TypeError, ValueError):
        return None
    if len(numbers) != count or not all(math.isfinite(v) for v in numbers):
        return None
    return numbers


def _optional_float(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def _optional_int(value: Any) -> int | None:
    try:
        return int(value) if value is not None and str(value).strip() != "" else None
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class SliceHeader:
    """The geometry-relevant header fields of one single-frame slice."""

    sop_instance_uid: str
    instance_number: int | None
    position: tuple[float, float, float]  # ImagePositionPatient: centre of the first pixel
    orientation: tuple[float, ...]  # ImageOrientationPatient: row direction, then column direction
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing) in mm, as in PixelSpacing
    rows: int
    cols: int
    slice_thickness: float | None

    @classmethod
    def from_dataset(cls, ds: Any) -> "SliceHeader":
        """Read the header fields; raise GeometryError(code="missing_geometry") when unusable."""
        position = _floats(ds.get("ImagePositionPatient"), 3)
        if position is None:
            raise GeometryError("slice has no usable ImagePositionPatient", code="missing_geometry")
        orientation = _floats(ds.get("ImageOrientationPatient"), 6)
        if orientation is None:
            raise GeometryError("slice has no usable ImageOrientationPatient", code="missing_geometry")
        row_dir, col_dir = np.asarray(orientation[:3]), np.asarray(orientation[3:])
        row_norm, col_norm = np.linalg.norm(row_dir), np.linalg.norm(col_dir)
        if (
            row_norm < 0.5
            or col_norm < 0.5
            or abs(float(row_dir @ col_dir)) / (row_norm * col_norm) > 1e-2
        ):
            raise GeometryError(
                "slice ImageOrientationPatient is not two perpendicular directions",
                code="missing_geometry",
            )
        spacing = _floats(ds.get("PixelSpacing"), 2)
        if spacing is None or min(spacing) <= 0:
            raise GeometryError("slice has no usable PixelSpacing", code="missing_geometry")
        rows, cols = _optional_int(ds.get("Rows")), _optional_int(ds.get("Columns"))
        if not rows or not cols or rows <= 0 or cols <= 0:
            raise GeometryError("slice has no usable Rows/Columns", code="missing_geometry")
        return cls(
            sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
            instance_number=_optional_int(ds.get("InstanceNumber")),
            position=position,  # type: ignore[arg-type]
            orientation=orientation,
            pixel_spacing=spacing,  # type: ignore[arg-type]
            rows=rows,
            cols=cols,
            slice_thickness=_optional_float(ds.get("SliceThickness")),
        )

    def to_dict(self) -> dict:
        return {
            "sop_instance_uid": self.sop_instance_uid,
            "instance_number": self.instance_number,
            "position": list(self.position),
            "orientation": list(self.orientation),
            "pixel_spacing": list(self.pixel_spacing),
            "rows": self.rows,
            "cols": self.cols,
            "slice_thickness": self.slice_thickness,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "SliceHeader":
        return cls(
            sop_instance_uid=str(d["sop_instance_uid"]),
            instance_number=None if d.get("instance_number") is None else int(d["instance_number"]),
            position=tuple(float(v) for v in d["position"]),  # type: ignore[arg-type]
            orientation=tuple(float(v) for v in d["orientation"]),
            pixel_spacing=tuple(float(v) for v in d["pixel_spacing"]),  # type: ignore[arg-type]
            rows=int(d["rows"]),
            cols=int(d["cols"]),
            slice_thickness=None if d.get("slice_thickness") is None else float(d["slice_thickness"]),
        )


@dataclass(frozen=True)
class StackGeometry:
    """Where the slices of a series lie; all per-slice tuples are in sorted (ascending normal) order."""

    order: tuple[int, ...]  # indices into the analysed headers, sorted along the normal
    normal: tuple[float, float, float]  # unit row_dir x col_dir
    row_dir: tuple[float, float, float]  # unit direction along a row (increasing column index)
    col_dir: tuple[float, float, float]  # unit direction along a column (increasing row index)
    slice_offsets_mm: tuple[float, ...]  # normal . ImagePositionPatient of each sorted slice
    gaps_mm: tuple[float, ...]  # consecutive differences of slice_offsets_mm
    tilt_deg: float  # angle between the normal and the direction the stack advances
    uneven_spacing: bool
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing)
    rows: int
    cols: int

    @property
    def n_slices(self) -> int:
        return len(self.order)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def analyze_stack(
    headers: Sequence[SliceHeader],
    *,
    min_slices: int = 3,
    orientation_tol: float = 1e-3,
    spacing_tol: float = 1e-3,
) -> StackGeometry:
    """Sort slices along their normal and check they form one gap-free stack.

    Raises GeometryError with code too_few_slices, mixed_orientation, mixed_pixel_spacing, mixed_matrix,
    duplicate_slice or missing_slice. Uneven spacing and gantry tilt are accepted and reported.
    """
    n = len(headers)
    if n < min_slices:
        raise GeometryError(
            f"series has {n} slice(s); at least {min_slices} are needed for a volume", code="too_few_slices"
        )

    orientations = np.array([h.orientation for h in headers], dtype=float)
    orientations = np.hstack(
        [
            orientations[:, :3] / np.linalg.norm(orientations[:, :3], axis=1, keepdims=True),
            orientations[:, 3:] / np.linalg.norm(orientations[:, 3:], axis=1, keepdims=True),
        ]
    )
    deviation = np.abs(orientations - orientations[0]).max(axis=1)
    if deviation.max() > orientation_tol:
        worst = int(deviation.argmax())
        raise GeometryError(
            f"slice {worst + 1} of {n} has a different orientation from slice 1 "
            f"(direction cosines differ by {deviation[worst]:.3g})",
            code="mixed_orientation",
        )

    spacings = np.array([h.pixel_spacing for h in headers], dtype=float)
    spacing_dev = np.abs(spacings - spacings[0]).max(axis=1)
    if spacing_dev.max() > spacing_tol:
        worst = int(spacing_dev.argmax())
        raise GeometryError(
            f"slice {worst + 1} of {n} has pixel spacing {tuple(round(v, 4) for v in spacings[worst])} mm "
            f"but slice 1 has {tuple(round(v, 4) for v in spacings[0])} mm",
            code="mixed_pixel_spacing",
        )

    matrices = [(h.rows, h.cols) for h in headers]
    for i, matrix in enumerate(matrices):
        if matrix != matrices[0]:
            raise GeometryError(
                f"slice {i + 1} of {n} is {matrix[0]}x{matrix[1]} but slice 1 is "
                f"{matrices[0][0]}x{matrices[0][1]}",
                code="mixed_matrix",
            )

    row_dir = _unit(orientations[0, :3])
    # Re-orthogonalise: IOPs are written with a few decimals.
    col_dir = _unit(orientations[0, 3:] - (orientations[0, 3:] @ row_dir) * row_dir)
    normal = _unit(np.cross(row_dir, col_dir))

    positions = np.array([h.position for h in headers], dtype=float)
    offsets = positions @ normal
    order = np.argsort(offsets, kind="stable")
    sorted_offsets = offsets[order]
    gaps = np.diff(sorted_offsets)

    for i, gap in enumerate(gaps):
        if gap < DUPLICATE_TOL_MM:
            raise GeometryError(
                f"slices {i + 1} and {i + 2} of {n} are at the same position "
                f"({sorted_offsets[i]:.2f} mm along the slice normal)",
                code="duplicate_slice",
            )

    _check_gap_holes(gaps, n)
    if not _regular(gaps):
        # Positions alone cannot show a hole in an unevenly spaced stack; the numbering can. In a
        # regular stack the gap rule has spoken and a numbering hole is a scanner quirk, not a loss.
        _check_instance_number_run([headers[i].instance_number for i in order], n)

    tilt_deg, uneven = 0.0, False
    if n > 1:
        advance = positions[order[-1]] - positions[order[0]]
        cos_tilt = float(np.clip(abs(advance @ normal) / np.linalg.norm(advance), -1.0, 1.0))
        tilt_deg = math.degrees(math.acos(cos_tilt))
        median_gap = float(np.median(gaps))
        even_tol = max(EVEN_SPACING_TOL_MM, EVEN_SPACING_TOL_REL * median_gap)
        uneven = bool(gaps.max() - gaps.min() > even_tol)

    return StackGeometry(
        order=tuple(int(i) for i in order),
        normal=tuple(float(v) + 0.0 for v in normal),  # type: ignore[arg-type]
        row_dir=tuple(float(v) for v in row_dir),  # type: ignore[arg-type]
        col_dir=tuple(float(v) for v in col_dir),  # type: ignore[arg-type]
        slice_offsets_mm=tuple(float(v) for v in sorted_offsets),
        gaps_mm=tuple(float(v) for v in gaps),
        tilt_deg=tilt_deg,
        uneven_spacing=uneven,
        pixel_spacing=tuple(float(v) for v in spacings[0]),  # type: ignore[arg-type]
        rows=headers[0].rows,
        cols=headers[0].cols,
    )


def _check_instance_number_run(numbers: list[int | None], n: int) -> None:
    """Sorted by position, distinct InstanceNumbers must advance by one constant step; a jump is a hole.

    Only applies when every slice has a distinct InstanceNumber and the numbers are monotonic along the
    normal; otherwise the numbering says nothing about completeness and the gap rule decides alone.
    """
    if n < 2 or any(v is None for v in numbers) or len(set(numbers)) != n:
        return
    steps = np.diff(np.array(numbers, dtype=np.int64))
    if not (np.all(steps > 0) or np.all(steps < 0)):
        return
    usual = Counter(np.abs(steps).tolist()).most_common(1)[0][0]
    for i, step in enumerate(steps):
        if abs(step) > usual:
            raise GeometryError(
                f"instance numbers jump from {numbers[i]} to {numbers[i + 1]} between slices {i + 1} and "
                f"{i + 2} of {n} (sorted along the slice normal) where steps of {usual} are usual",
                code="missing_slice",
            )


def _regular(gaps: np.ndarray) -> bool:
    if len(gaps) == 0:
        return True
    median_gap = float(np.median(gaps))
    return bool(np.all(np.abs(gaps - median_gap) <= REGULAR_GAP_TOL_REL * median_gap))


def _check_gap_holes(gaps: np.ndarray, n: int) -> None:
    """In an otherwise regular stack, a gap of about k >= 2 usual gaps is a missing slice.

    Deliberately variable spacing (gaps that are not whole multiples of the usual one, or irregular gaps
    elsewhere) is accepted: only a regular stack gives a usual gap to compare against.
    """
    if len(gaps) < 2:
        return
    median_gap = float(np.median(gaps))
    large = gaps >= MISSING_GAP_MIN_FACTOR * median_gap
    if not large.any() or large.all():
        return
    regular = np.abs(gaps[~large] - median_gap) <= REGULAR_GAP_TOL_REL * median_gap
    if not regular.all():
        return
    for i in np.flatnonzero(large):
        multiple = gaps[i] / median_gap
        if abs(multiple - round(multiple)) <= REGULAR_GAP_TOL_REL * round(multiple):
            raise GeometryError(
                f"gap of {gaps[i]:.1f} mm between slices {i + 1} and {i + 2} of {n} "
                f"where {median_gap:.1f} mm is usual",
                code="missing_slice",
            )


def stack_geometry_to_dict(geometry: StackGeometry) -> dict:
    """A JSON-ready dict of a StackGeometry (no identifiers in it)."""
    return {
        "order": list(geometry.order),
        "normal": list(geometry.normal),
        "row_dir": list(geometry.row_dir),
        "col_dir": list(geometry.col_dir),
        "slice_offsets_mm": list(geometry.slice_offsets_mm),
        "gaps_mm": list(geometry.gaps_mm),
        "tilt_deg": geometry.tilt_deg,
        "uneven_spacing": geometry.uneven_spacing,
        "pixel_spacing": list(geometry.pixel_spacing),
        "rows": geometry.rows,
        "cols": geometry.cols,
    }
