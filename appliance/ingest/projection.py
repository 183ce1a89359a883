"""Projection radiographs (CR, DX): the header facts ingest checks and records instead of a slice stack.

A projection image has no ImagePositionPatient/ImageOrientationPatient and nothing to stack, so it is
validated one image at a time: greyscale, usable Rows/Columns, a known photometric interpretation. The
catalog's `geometry` for such a series is `projection_geometry(...)` with `"kind": "projection"`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from appliance.errors import BadInputError

PROJECTION_MODALITIES = ("CR", "DX")
MIN_PROJECTION_PIXELS = 32  # smaller is a thumbnail or an icon, not a radiograph
GREYSCALE = ("MONOCHROME1", "MONOCHROME2")


def is_projection(modality: str) -> bool:
    return str(modality or "").upper() in PROJECTION_MODALITIES


def _spacing(value: Any) -> tuple[float, float] | None:
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if len(numbers) != 2 or not all(math.isfinite(v) and v > 0 for v in numbers):
        return None
    return numbers  # type: ignore[return-value]


def _int(value: Any) -> int | None:
    try:
        return int(value) if value is not None and str(value).strip() != "" else None
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class ProjectionHeader:
    """What ingest needs of one projection image (no pixel data read)."""

    sop_instance_uid: str
    rows: int
    cols: int
    pixel_spacing: tuple[float, float] | None  # (row, column) mm: PixelSpacing, else ImagerPixelSpacing
    spacing_source: str | None  # "PixelSpacing" | "ImagerPixelSpacing" | None
    photometric: str
    view_position: str | None
    presentation_intent: str | None  # DX only: "FOR PRESENTATION" | "FOR PROCESSING"
    bits_stored: int | None

    @classmethod
    def from_dataset(cls, ds: Any) -> "ProjectionHeader":
        """Read and check the header; BadInputError (one PHI-free line) when the image cannot be used."""
        rows, cols = _int(ds.get("Rows")), _int(ds.get("Columns"))
        if not rows or not cols or rows <= 0 or cols <= 0:
            raise BadInputError("radiograph has no usable Rows/Columns", "bad_dimensions")
        if min(rows, cols) < MIN_PROJECTION_PIXELS:
            raise BadInputError(f"radiograph is {rows}x{cols} pixels; at least {MIN_PROJECTION_PIXELS} are needed "
                                "on each side", "bad_dimensions")
        samples = _int(ds.get("SamplesPerPixel")) or 1
        photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
        if samples != 1 or photometric not in GREYSCALE:
            raise BadInputError(f"radiograph is not greyscale (PhotometricInterpretation {photometric or 'missing'}, "
                                f"{samples} sample(s) per pixel)", "not_greyscale")
        spacing, source = _spacing(ds.get("PixelSpacing")), "PixelSpacing"
        if spacing is None:
            spacing, source = _spacing(ds.get("ImagerPixelSpacing")), "ImagerPixelSpacing"
        view = str(ds.get("ViewPosition", "") or "").strip().upper() or None
        intent = str(ds.get("PresentationIntentType", "") or "").strip().upper() or None
        return cls(sop_instance_uid=str(ds.get("SOPInstanceUID", "")), rows=rows, cols=cols, pixel_spacing=spacing,
                   spacing_source=source if spacing else None, photometric=photometric, view_position=view,
                   presentation_intent=intent, bits_stored=_int(ds.get("BitsStored")))


def projection_geometry(headers: Sequence[ProjectionHeader]) -> dict:
    """The catalog's geometry record of a projection series (its first image; `n_images` says how many)."""
    first = headers[0]
    return {
        "kind": "projection",
        "n_images": len(headers),
        "rows": first.rows,
        "cols": first.cols,
        "pixel_spacing_mm": list(first.pixel_spacing) if first.pixel_spacing else None,
        "spacing_source": first.spacing_source,
        "photometric": first.photometric,
        "view_position": first.view_position,
        "presentation_intent": first.presentation_intent,
        "bits_stored": first.bits_stored,
    }
