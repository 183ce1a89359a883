"""Projection radiograph (CR, DX) -> cached square image: a float16 .npy (S, S) in [0, 1] beside a PHI-free .json.

Steps (docs/radiographs.md):
1. Read the de-identified file; decode the pixels (greyscale, Rows x Columns as the header says).
2. Modality LUT (`apply_modality_lut`: Rescale Slope/Intercept or a Modality LUT Sequence).
3. VOI as the header says (`apply_voi_lut`: the first VOI LUT Sequence item, else the first window, LINEAR or
   SIGMOID), scaled by the VOI's own output range. Images FOR PROCESSING (raw detector values, no VOI for
   display), images without any VOI and images whose window is unusable get a percentile window instead:
   the 0.5th and 99.5th percentiles of the image map to 0 and 1.
4. MONOCHROME1 is inverted, so every cached image shows air and lungs dark and bone bright.
5. Uniform borders (collimator shutters) are cropped: rows and columns at the edges with one value.
6. The long side is resized to `size` (PIL Lanczos, which antialiases when shrinking) and the short side is
   padded with 0 (black) to a square, centred.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pydicom
from PIL import Image
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import DigitalXRayImageStorageForProcessing

from appliance.errors import BadInputError
from appliance.preprocess.cache import _atomic_write, cache_paths

RADIOGRAPH_ALGORITHM_VERSION = 1
RADIOGRAPH_FORMAT_VERSION = 1
MAX_BORDER_FRACTION = 0.4  # never crop more than this of a side's length as "border"


@dataclass(frozen=True)
class RadiographSettings:
    """How a projection radiograph becomes a training image."""

    size: int = 518  # output edge in pixels (RAD-DINO's input)
    percentile_window: tuple[float, float] = (0.5, 99.5)  # for images without a usable VOI
    crop_borders: bool = True

    def __post_init__(self) -> None:
        if self.size < 16:
            raise ValueError("radiograph size must be at least 16 pixels")
        lo, hi = self.percentile_window
        if not 0 <= lo < hi <= 100:
            raise ValueError("percentile_window must be (low, high) with 0 <= low < high <= 100")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def fingerprint(self) -> str:
        payload = json.dumps({**self.to_dict(), "algorithm_version": RADIOGRAPH_ALGORITHM_VERSION}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass
class CachedRadiograph:
    npy_path: Path
    meta_path: Path
    shape: tuple[int, int]
    meta: dict


def _voi_output_range(ds: pydicom.Dataset) -> tuple[float, float]:
    """The range a window maps to, by the rules `apply_windowing` follows (PS3.3 C.11.2.1.2)."""
    if ds.get("ModalityLUTSequence"):
        return 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    bits = int(ds.get("BitsStored", 16) or 16)
    if int(ds.get("PixelRepresentation", 0) or 0) == 0:
        lo, hi = 0.0, float(2**bits - 1)
    else:
        lo, hi = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        lo, hi = lo * float(slope) + float(intercept), hi * float(slope) + float(intercept)
    return min(lo, hi), max(lo, hi)


def _percentile_window(values: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    lo, hi = (float(v) for v in np.percentile(values[::2, ::2], window))
    if hi <= lo:
        raise BadInputError("radiograph is blank (one value everywhere)", "blank_image")
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0)


def presentation_intent(ds: pydicom.Dataset) -> str:
    intent = str(ds.get("PresentationIntentType", "") or "").strip().upper()
    if not intent and str(ds.get("SOPClassUID", "")) == DigitalXRayImageStorageForProcessing:
        intent = "FOR PROCESSING"
    return intent or "FOR PRESENTATION"


def display_values(ds: pydicom.Dataset, settings: RadiographSettings) -> tuple[np.ndarray, str]:
    """Pixels as a viewer would show them, in [0, 1] with bright = dense, and how the VOI was chosen."""
    if "PixelData" not in ds:
        raise BadInputError("radiograph has no pixel data", "undecodable_pixels")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise BadInputError(f"radiograph is not greyscale (PhotometricInterpretation {photometric or 'missing'})",
                            "not_greyscale")
    try:
        stored = ds.pixel_array
    except Exception as exc:  # decoders raise many types; the file is unusable whatever the cause
        raise BadInputError(f"radiograph pixels cannot be decoded ({type(exc).__name__})", "undecodable_pixels") from None
    if stored.shape != (int(ds.Rows), int(ds.Columns)):
        raise BadInputError(f"decoded pixels are {'x'.join(map(str, stored.shape))}, header says "
                            f"{int(ds.Rows)}x{int(ds.Columns)}", "bad_dimensions")
    values = np.asarray(apply_modality_lut(stored, ds))
    if values.dtype.kind == "f" and np.array_equal(values, np.round(values)):
        values = values.astype(np.int64)  # an identity rescale: a VOI LUT indexes integer values
    intent = presentation_intent(ds)
    if intent == "FOR PROCESSING":
        if str(ds.get("PixelIntensityRelationship", "")).upper() == "LIN":
            values = np.log1p(np.maximum(values - values.min(), 0))  # linear exposure -> log, like film
        out, voi = _percentile_window(values, settings.percentile_window), "percentile (for processing)"
    elif ds.get("VOILUTSequence") and values.dtype.kind in "iu":
        item = ds.VOILUTSequence[0]
        top = float(2 ** int(item.LUTDescriptor[2]) - 1)
        out, voi = np.clip(np.asarray(apply_voi_lut(values, ds, index=0), dtype=np.float64) / top, 0, 1), "lut"
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        try:
            windowed = np.asarray(apply_voi_lut(values.astype(np.float64), ds, index=0, prefer_lut=False),
                                  dtype=np.float64)
            lo, hi = _voi_output_range(ds)
            out = np.clip((windowed - lo) / (hi - lo), 0, 1)
            voi = "window " + str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
        except (ValueError, TypeError, IndexError, ZeroDivisionError):
            out, voi = _percentile_window(values, settings.percentile_window), "percentile (unusable window)"
    else:
        out, voi = _percentile_window(values, settings.percentile_window), "percentile (no VOI in header)"
    if photometric == "MONOCHROME1":
        out = 1.0 - out
    return out.astype(np.float32), voi


def uniform_border(img: np.ndarray, tol: float = 1e-3) -> tuple[int, int, int, int]:
    """(row0, col0, row1, col1) of the image without edge rows/columns that hold one value (shutters)."""
    rows, cols = img.shape
    row_flat = (img.max(axis=1) - img.min(axis=1)) <= tol
    col_flat = (img.max(axis=0) - img.min(axis=0)) <= tol

    def trim(flat: np.ndarray, n: int) -> tuple[int, int]:
        lo, hi = 0, n
        while lo < n and flat[lo]:
            lo += 1
        while hi > lo and flat[hi - 1]:
            hi -= 1
        if n - (hi - lo) > MAX_BORDER_FRACTION * n:
            return 0, n  # not a border: the image is mostly flat, keep it whole
        return lo, hi

    r0, r1 = trim(row_flat, rows)
    c0, c1 = trim(col_flat, cols)
    return r0, c0, r1, c1


def resize_square(img: np.ndarray, size: int) -> tuple[np.ndarray, float, tuple[int, int]]:
    """Long side to `size`, short side padded with 0 and centred; returns (image, scale, (pad_top, pad_left))."""
    h, w = img.shape
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    resized = np.asarray(Image.fromarray(img.astype(np.float32), mode="F").resize((nw, nh), Image.Resampling.LANCZOS))
    out = np.zeros((size, size), dtype=np.float32)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top:top + nh, left:left + nw] = np.clip(resized, 0.0, 1.0)
    return out, scale, (top, left)


def _age_years(text: str) -> int | None:
    m = re.fullmatch(r"(\d{3})([DWMY])", str(text or "").strip().upper())
    if not m:
        return None
    n, unit = int(m.group(1)), m.group(2)
    return n if unit == "Y" else n // 12 if unit == "M" else 0


def _spacing(ds: pydicom.Dataset) -> list[float] | None:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            values = [float(v) for v in ds.get(keyword) or []]
        except (TypeError, ValueError):
            continue
        if len(values) == 2 and all(v > 0 for v in values):
            return values
    return None


def header_facts(ds: pydicom.Dataset) -> dict:
    """The header values the cache keeps (no identifiers): view, sex, age, manufacturer, modality."""
    sex = str(ds.get("PatientSex", "") or "").strip().upper()
    return {
        "view_position": str(ds.get("ViewPosition", "") or "").strip().upper() or None,
        "sex": sex if sex in ("F", "M") else None,
        "age_years": _age_years(ds.get("PatientAge", "")),
        "manufacturer": str(ds.get("Manufacturer", "") or "").strip() or None,
        "modality": str(ds.get("Modality", "") or "").strip().upper() or None,
    }


def preprocess_radiograph(files: Sequence[Path], out_stem: Path, settings: RadiographSettings | None = None
                          ) -> CachedRadiograph:
    """One de-identified projection image -> `<stem>.npy` (float16, S x S, [0, 1]) and `<stem>.json`.

    Both files are written atomically, the .json last. Raises BadInputError for unusable input (a series
    with more than one image is refused: one cached image per series)."""
    settings = settings or RadiographSettings()
    started = time.perf_counter()
    if len(files) != 1:
        raise BadInputError(f"projection series with {len(files)} images; one image per series is supported",
                            "multiple_projections")
    try:
        ds = pydicom.dcmread(files[0])
    except Exception as exc:  # a broken file raises many types; whatever the cause it is unusable
        raise BadInputError(f"radiograph is not a readable DICOM file ({type(exc).__name__})", "unreadable_file") from None
    img, voi = display_values(ds, settings)
    r0, c0, r1, c1 = uniform_border(img) if settings.crop_borders else (0, 0, *img.shape)
    out, scale, pad = resize_square(img[r0:r1, c0:c1], settings.size)
    spacing = _spacing(ds)
    meta = {
        "format_version": RADIOGRAPH_FORMAT_VERSION,
        "algorithm_version": RADIOGRAPH_ALGORITHM_VERSION,
        "kind": "projection",
        **header_facts(ds),
        "source_shape": [int(ds.Rows), int(ds.Columns)],
        "photometric": str(ds.PhotometricInterpretation),
        "presentation_intent": presentation_intent(ds),
        "voi": voi,
        "crop_box": [int(r0), int(c0), int(r1), int(c1)],
        "scale": round(scale, 6),
        "pad": list(pad),
        "pixel_spacing_mm": [round(v / scale, 5) for v in spacing] if spacing else None,
        "shape": [settings.size, settings.size],
        "dtype": "float16",
        "settings": settings.to_dict(),
        "settings_fingerprint": settings.fingerprint(),
        "seconds": round(time.perf_counter() - started, 3),
    }
    npy_path, meta_path = cache_paths(out_stem)
    npy_path.parent.mkdir(parents=True, exist_ok=True)
    image16 = out.astype(np.float16)
    _atomic_write(npy_path, lambda handle: np.save(handle, image16, allow_pickle=False))
    _atomic_write(meta_path, lambda handle: handle.write(json.dumps(meta, indent=1).encode()))
    return CachedRadiograph(npy_path=npy_path, meta_path=meta_path, shape=tuple(image16.shape), meta=meta)


def load_cached_radiograph(stem_or_npy: Path, mmap: bool = True) -> tuple[np.ndarray, dict]:
    """The cached (S, S) float16 image (memory-mapped read-only by default) and its metadata."""
    npy_path, meta_path = cache_paths(stem_or_npy)
    meta = json.loads(meta_path.read_text())
    image = np.load(npy_path, mmap_mode="r" if mmap else None, allow_pickle=False)
    if meta.get("kind") != "projection" or list(image.shape) != meta["shape"] or image.dtype != np.float16:
        raise BadInputError("cached radiograph does not match its metadata; rebuild it", code="cache_corrupt")
    return image, meta
