"""Read a DICOM CT series into HU slices sorted along the slice normal."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pydicom

from appliance.errors import BadInputError
from appliance.geometry import GeometryError, SliceHeader, StackGeometry, analyze_stack


@dataclass
class SeriesStack:
    """HU slices of one series, sorted ascending along the slice normal."""

    hu: np.ndarray  # float32 (N, rows, cols)
    geometry: StackGeometry
    positions_mm: np.ndarray  # float64 (N, 3): ImagePositionPatient of each sorted slice
    thickness_mm: tuple[float | None, ...]  # SliceThickness of each sorted slice

    @property
    def n_slices(self) -> int:
        return self.hu.shape[0]


def _number(ds: pydicom.Dataset, keyword: str, default: float) -> float:
    """A numeric header value, or ``default`` when absent, empty or malformed."""
    value = ds.get(keyword)
    try:
        number = float(value) if value is not None and str(value).strip() != "" else default
    except (TypeError, ValueError):
        return default
    return number if math.isfinite(number) else default


def _transfer_syntax_name(ds: pydicom.Dataset) -> str:
    uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return uid.name if uid is not None else "unknown transfer syntax"


def _read_dataset(path: Path, index: int, n: int) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(path)
    except Exception as exc:  # a broken file raises many types; whatever the cause it is unusable
        raise BadInputError(
            f"file {index + 1} of {n} is not a readable DICOM file ({type(exc).__name__})",
            code="unreadable_file",
        ) from None


def _decode_hu(ds: pydicom.Dataset, rows: int, cols: int, label: str) -> np.ndarray:
    """Stored values -> HU with this slice's own rescale; BadInputError when the pixels are unusable."""
    if "PixelData" not in ds:
        raise BadInputError(f"{label} has no pixel data", code="undecodable_pixels")
    if _number(ds, "SamplesPerPixel", 1.0) != 1:
        raise BadInputError(f"{label} is not a greyscale image", code="undecodable_pixels")
    if _number(ds, "NumberOfFrames", 1.0) != 1:
        raise BadInputError(f"{label} is a multi-frame image; only single-frame CT is supported",
                            code="unsupported_multiframe")
    try:
        stored = ds.pixel_array
    except Exception as exc:  # decoders raise many types; the file is unusable whatever the cause
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if syntax is not None and not syntax.is_compressed:
            reason = f"{label}: pixel data is shorter than the header says (truncated file?)"
        else:
            reason = f"{label}: pixel data cannot be decoded ({_transfer_syntax_name(ds)}, {type(exc).__name__})"
        raise BadInputError(reason, code="undecodable_pixels") from None
    if stored.shape != (rows, cols):
        raise BadInputError(
            f"{label}: decoded pixels are {'x'.join(map(str, stored.shape))}, header says {rows}x{cols}",
            code="undecodable_pixels",
        )
    slope = _number(ds, "RescaleSlope", 1.0) or 1.0  # a zero slope is a broken header, not a blank image
    intercept = _number(ds, "RescaleIntercept", 0.0)
    return stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def load_series(files: Sequence[Path], *, min_slices: int = 3) -> SeriesStack:
    """Read, validate and decode a series; slices come back sorted along the normal, in HU.

    Raises BadInputError (GeometryError for geometry rules) with a one-line, PHI-free reason.
    """
    paths = [Path(f) for f in files]
    n = len(paths)
    datasets = [_read_dataset(path, i, n) for i, path in enumerate(paths)]
    headers = []
    for i, ds in enumerate(datasets):
        try:
            headers.append(SliceHeader.from_dataset(ds))
        except GeometryError as exc:
            raise GeometryError(f"file {i + 1} of {n}: {exc.reason}", code=exc.code) from None
    geometry = analyze_stack(headers, min_slices=min_slices)

    hu = np.empty((n, geometry.rows, geometry.cols), dtype=np.float32)
    for k, index in enumerate(geometry.order):
        hu[k] = _decode_hu(datasets[index], geometry.rows, geometry.cols, f"slice {k + 1} of {n}")
        datasets[index] = None  # type: ignore[call-overload]  # release pixel bytes early
    return SeriesStack(
        hu=hu,
        geometry=geometry,
        positions_mm=np.array([headers[i].position for i in geometry.order], dtype=np.float64),
        thickness_mm=tuple(headers[i].slice_thickness for i in geometry.order),
    )
