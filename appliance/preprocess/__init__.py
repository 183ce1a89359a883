"""DICOM CT series -> training-ready volumes (pure functions; the catalog-driven stage lives in stage.py)."""

from appliance.preprocess.cache import CachedVolume, cache_paths, load_cached_volume, preprocess_series
from appliance.preprocess.resample import AXES_CONVENTION, resample_to_canvas
from appliance.preprocess.series import SeriesStack, load_series
from appliance.preprocess.settings import PreprocessSettings

__all__ = [
    "AXES_CONVENTION",
    "CachedVolume",
    "PreprocessSettings",
    "SeriesStack",
    "cache_paths",
    "load_cached_volume",
    "load_series",
    "preprocess_series",
    "resample_to_canvas",
]
