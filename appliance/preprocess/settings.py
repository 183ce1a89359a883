"""Preprocessing settings; their fingerprint keys the volume cache."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np

# Bump when the resampling algorithm changes so that cached volumes are rebuilt.
PREPROCESS_ALGORITHM_VERSION = 1


@dataclass(frozen=True)
class PreprocessSettings:
    """How a CT series becomes a training volume (GreenRFM chest CT defaults)."""

    spacing_mm: tuple[float, float, float] = (1.5, 1.5, 3.0)  # (x, y, z) in patient LPS
    canvas: tuple[int, int, int] = (240, 240, 120)  # (x, y, z) voxels
    hu_clip: tuple[float, float] = (-1000.0, 200.0)
    hu_offset: float = 400.0
    hu_scale: float = 600.0  # value = (clip(HU) + hu_offset) / hu_scale
    antialias: bool = True

    def __post_init__(self) -> None:
        if len(self.spacing_mm) != 3 or min(self.spacing_mm) <= 0:
            raise ValueError("spacing_mm must be three positive numbers")
        if len(self.canvas) != 3 or min(self.canvas) < 1:
            raise ValueError("canvas must be three positive voxel counts")
        if self.hu_clip[0] >= self.hu_clip[1]:
            raise ValueError("hu_clip must be (low, high) with low < high")
        if self.hu_scale <= 0:
            raise ValueError("hu_scale must be positive")

    def map_hu(self, hu: np.ndarray) -> np.ndarray:
        """Clip HU and map to the training range ([-1, 1] with the defaults)."""
        return (np.clip(hu, self.hu_clip[0], self.hu_clip[1]) + self.hu_offset) / self.hu_scale

    @property
    def pad_value(self) -> float:
        """The mapped value of air, used outside the acquired region."""
        return (self.hu_clip[0] + self.hu_offset) / self.hu_scale

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessSettings":
        return cls(
            spacing_mm=tuple(float(v) for v in d["spacing_mm"]),  # type: ignore[arg-type]
            canvas=tuple(int(v) for v in d["canvas"]),  # type: ignore[arg-type]
            hu_clip=tuple(float(v) for v in d["hu_clip"]),  # type: ignore[arg-type]
            hu_offset=float(d["hu_offset"]),
            hu_scale=float(d["hu_scale"]),
            antialias=bool(d["antialias"]),
        )

    def fingerprint(self) -> str:
        """Short stable hash of the settings and the algorithm version."""
        def canonical_value(v):  # 400 and 400.0 must hash alike
            if isinstance(v, bool):
                return v
            return [float(x) for x in v] if isinstance(v, list) else float(v)

        canonical = {k: canonical_value(v) for k, v in self.to_dict().items()}
        canonical["algorithm_version"] = PREPROCESS_ALGORITHM_VERSION
        payload = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode()).hexdigest()[:16]
