"""Series -> cached training volume: a float16 .npy (memory-mappable) beside a PHI-free .json."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from appliance.errors import BadInputError
from appliance.geometry import StackGeometry
from appliance.preprocess.resample import resample_to_canvas
from appliance.preprocess.series import SeriesStack, load_series
from appliance.preprocess.settings import PREPROCESS_ALGORITHM_VERSION, PreprocessSettings

CACHE_FORMAT_VERSION = 1


@dataclass
class CachedVolume:
    """Where a preprocessed volume lies and what it is."""

    npy_path: Path
    meta_path: Path
    shape: tuple[int, int, int]  # (Z, Y, X)
    meta: dict


def cache_paths(stem_or_path: Path) -> tuple[Path, Path]:
    """(npy, json) paths for a cache stem; a path ending in .npy or .json names the same pair.

    The suffix is appended rather than swapped so that stems containing dots stay intact.
    """
    path = Path(stem_or_path)
    if path.suffix in (".npy", ".json"):
        path = path.with_suffix("")
    return path.with_name(path.name + ".npy"), path.with_name(path.name + ".json")


def _source_summary(stack: SeriesStack) -> dict:
    g: StackGeometry = stack.geometry
    gaps = np.asarray(g.gaps_mm)
    thicknesses = [t for t in stack.thickness_mm if t is not None]
    # A strided subset is plenty for percentiles and keeps this cheap on 600-slice series.
    sample = stack.hu[:, ::4, ::4]
    p1, p50, p99 = (float(v) for v in np.percentile(sample, [1, 50, 99]))
    return {
        "rows": g.rows,
        "cols": g.cols,
        "n_slices": g.n_slices,
        "pixel_spacing_mm": list(g.pixel_spacing),
        "slice_thickness_mm": {"min": min(thicknesses), "max": max(thicknesses)} if thicknesses else None,
        "slice_offsets_mm": [round(v, 4) for v in g.slice_offsets_mm],
        "gap_min_mm": float(gaps.min()) if gaps.size else None,
        "gap_max_mm": float(gaps.max()) if gaps.size else None,
        "tilt_deg": g.tilt_deg,
        "uneven_spacing": g.uneven_spacing,
        "row_dir": list(g.row_dir),
        "col_dir": list(g.col_dir),
        "normal": list(g.normal),
        "hu_percentiles": {"p1": p1, "p50": p50, "p99": p99},
    }


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def preprocess_series(
    files: Sequence[Path], out_stem: Path, settings: PreprocessSettings | None = None, *, min_slices: int = 3
) -> CachedVolume:
    """Load, resample, clip and map a series; write ``<stem>.npy`` (float16, Z,Y,X) and ``<stem>.json``.

    Both files are written atomically, the .json last, so a present .json means a complete volume.
    Raises BadInputError for unusable input.
    """
    settings = settings or PreprocessSettings()
    started = time.perf_counter()
    stack = load_series(files, min_slices=min_slices)
    volume, grid_meta = resample_to_canvas(stack, settings)
    volume16 = volume.astype(np.float16)
    del volume
    meta = {
        "format_version": CACHE_FORMAT_VERSION,
        "algorithm_version": PREPROCESS_ALGORITHM_VERSION,
        "dtype": "float16",
        "settings": settings.to_dict(),
        "settings_fingerprint": settings.fingerprint(),
        **grid_meta,
        "source": _source_summary(stack),
        "seconds": round(time.perf_counter() - started, 3),
    }
    npy_path, meta_path = cache_paths(out_stem)
    npy_path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(npy_path, lambda handle: np.save(handle, volume16, allow_pickle=False))
    _atomic_write(meta_path, lambda handle: handle.write(json.dumps(meta, indent=1).encode()))
    return CachedVolume(npy_path=npy_path, meta_path=meta_path, shape=tuple(volume16.shape), meta=meta)


def load_cached_volume(stem_or_npy: Path, mmap: bool = True) -> tuple[np.ndarray, dict]:
    """The cached (Z, Y, X) float16 array (memory-mapped read-only by default) and its metadata."""
    npy_path, meta_path = cache_paths(stem_or_npy)
    meta = json.loads(meta_path.read_text())
    volume = np.load(npy_path, mmap_mode="r" if mmap else None, allow_pickle=False)
    if list(volume.shape) != meta["shape_zyx"] or volume.dtype != np.float16:
        raise BadInputError("cached volume does not match its metadata; rebuild it", code="cache_corrupt")
    return volume, meta
