"""Analytic chest phantom in Hounsfield units on a regular DICOM LPS grid, with plantable findings.

Anatomy is described in millimetres relative to the patient's chest centre and rasterised with soft
(one-voxel) edges, so structures keep their partial-volume look at any voxel size. Anatomy and each
finding draw from their own random streams: the same seed with and without a finding gives the same
patient, and the voxel difference is the finding alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np
from scipy import ndimage

from appliance.labels.vocabularies import CT_RATE_18
from appliance.synthetic.uids import derived_rng, seed_of


class Tissue(IntEnum):
    """Label of what a phantom voxel mostly holds (the one painted last with occupancy > 0.5)."""

    AIR = 0
    TABLE = 1
    SOFT = 2  # skin, muscle, fat, mediastinum
    LUNG = 3
    HEART = 4
    VESSEL = 5  # great vessels, lymph nodes, oesophagus
    BONE = 6
    AIRWAY = 7
    ABDOMEN = 8
    FLUID = 9
    LESION = 10
    DEVICE = 11


@dataclass
class Phantom:
    """HU on a regular LPS grid: voxel [k, j, i] lies at origin + (i*sx, j*sy, k*sz)."""

    hu: np.ndarray  # float32 (Z, Y, X)
    spacing_mm: tuple[float, float, float]  # (x, y, z)
    origin_mm: tuple[float, float, float]  # patient coordinates of voxel [0, 0, 0]
    findings: dict[str, dict] = field(default_factory=dict)  # planted finding -> details in mm
    tissue: np.ndarray | None = None  # uint8 Tissue label per voxel

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)  # type: ignore[return-value]

    @property
    def center_mm(self) -> tuple[float, float, float]:
        """Patient coordinates of the grid's centre."""
        nz, ny, nx = self.hu.shape
        return tuple(o + s * (n - 1) / 2 for o, s, n in zip(self.origin_mm, self.spacing_mm, (nx, ny, nz)))

    def index_of(self, point_mm) -> np.ndarray:
        """Fractional (k, j, i) voxel index of LPS point(s) (..., 3)."""
        p = (np.asarray(point_mm, dtype=np.float64) - self.origin_mm) / self.spacing_mm
        return p[..., ::-1]

    def hu_at(self, point_mm) -> float:
        """HU at an LPS point by linear interpolation (air outside the grid)."""
        idx = self.index_of(point_mm).reshape(3, 1)
        return float(ndimage.map_coordinates(self.hu, idx, order=1, mode="constant", cval=-1000.0)[0])


# Findings this phantom can plant: all 18 of CT-RATE.
PLANTABLE_FINDINGS: tuple[str, ...] = CT_RATE_18


class _Occupancy:
    """Fractional coverage of one material, accumulated by max, with the bounding box it touched."""

    def __init__(self, shape):
        self.a = np.zeros(shape, dtype=np.float32)
        self.lo = list(shape)
        self.hi = [0, 0, 0]

    def add(self, sl: tuple[slice, slice, slice], occ: np.ndarray) -> None:
        view = self.a[sl]
        if view.size == 0:
            return
        np.maximum(view, occ, out=view)
        for d in range(3):
            start, stop, _ = sl[d].indices(self.a.shape[d])
            self.lo[d] = min(self.lo[d], start)
            self.hi[d] = max(self.hi[d], stop)

    def region(self) -> tuple[slice, slice, slice] | None:
        if any(h <= l for l, h in zip(self.lo, self.hi)):
            return None
        return tuple(slice(l, h) for l, h in zip(self.lo, self.hi))  # type: ignore[return-value]


def _ellipse_distance_2d(u, v, a, b, p=2.0):
    """Approximate signed distance (mm) to a (super)ellipse with semi-axes a, b."""
    au, av = np.abs(u) / a + 1e-9, np.abs(v) / b + 1e-9
    rho = (au**p + av**p) ** (1.0 / p)
    # rho's gradient magnitude turns the level-set value into millimetres
    g = rho ** (1 - p) * np.sqrt((au ** (p - 1) / a) ** 2 + (av ** (p - 1) / b) ** 2)
    return (rho - 1.0) / np.maximum(g, 1e-6)


class _ChestBuilder:
    """Rasterises anatomy and findings into hu/tissue; coordinates u, v, w are mm from the chest centre."""

    def __init__(self, shape_zyx, spacing_mm, origin_mm, center_mm, seed: int, conspicuity: float = 1.0):
        self.conspicuity = float(conspicuity)  # size (and texture scale) multiplier of the findings
        self.shape = tuple(int(n) for n in shape_zyx)
        self.spacing = tuple(float(s) for s in spacing_mm)
        self.origin = tuple(float(o) for o in origin_mm)
        nz, ny, nx = self.shape
        self.ux = (self.origin[0] + self.spacing[0] * np.arange(nx) - center_mm[0]).astype(np.float32)
        self.vy = (self.origin[1] + self.spacing[1] * np.arange(ny) - center_mm[1]).astype(np.float32)
        self.wz = (self.origin[2] + self.spacing[2] * np.arange(nz) - center_mm[2]).astype(np.float32)
        self.center = np.asarray(center_mm, dtype=np.float64)
        self.soft = float(np.cbrt(np.prod(self.spacing)))
        self.hu = np.full(self.shape, -1000.0, dtype=np.float32)
        self.tissue = np.zeros(self.shape, dtype=np.uint8)
        self.seed = seed
        self._edt: np.ndarray | None = None

    # ---- rasterising primitives ---------------------------------------------------------------
    def occupancy(self) -> _Occupancy:
        return _Occupancy(self.shape)

    def bbox(self, lo, hi) -> tuple[slice, slice, slice]:
        out = []
        for axis, l, h in ((self.wz, lo[2], hi[2]), (self.vy, lo[1], hi[1]), (self.ux, lo[0], hi[0])):
            out.append(slice(int(np.searchsorted(axis, l, "left")), int(np.searchsorted(axis, h, "right"))))
        return out[0], out[1], out[2]

    def _local(self, sl):
        return (self.ux[sl[2]][None, None, :], self.vy[sl[1]][None, :, None], self.wz[sl[0]][:, None, None])

    def _soft_occ(self, dist_mm):
        return np.clip(0.5 - dist_mm / self.soft, 0.0, 1.0).astype(np.float32)

    def add_ellipsoid(self, occ: _Occupancy, center, semi) -> None:
        c, s = np.asarray(center, float), np.asarray(semi, float)
        sl = self.bbox(c - s - self.soft, c + s + self.soft)
        u, v, w = self._local(sl)
        rho = np.sqrt(((u - c[0]) / s[0]) ** 2 + ((v - c[1]) / s[1]) ** 2 + ((w - c[2]) / s[2]) ** 2)
        occ.add(sl, self._soft_occ((rho - 1.0) * s.min()))

    def add_sphere(self, occ: _Occupancy, center, radius: float) -> None:
        self.add_ellipsoid(occ, center, (radius, radius, radius))

    def add_capsule(self, occ: _Occupancy, p0, p1, r0: float, r1: float | None = None) -> None:
        """A tube from p0 to p1 whose radius goes linearly from r0 to r1."""
        r1 = r0 if r1 is None else r1
        p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
        pad = max(r0, r1) + self.soft
        sl = self.bbox(np.minimum(p0, p1) - pad, np.maximum(p0, p1) + pad)
        u, v, w = self._local(sl)
        d = p1 - p0
        du, dv, dw = u - p0[0], v - p0[1], w - p0[2]
        t = np.clip((du * d[0] + dv * d[1] + dw * d[2]) / max(float(d @ d), 1e-9), 0.0, 1.0)
        dist = np.sqrt((du - t * d[0]) ** 2 + (dv - t * d[1]) ** 2 + (dw - t * d[2]) ** 2)
        occ.add(sl, self._soft_occ(dist - (r0 + t * (r1 - r0))))

    def add_polyline(self, occ: _Occupancy, points, r0: float, r1: float | None = None) -> None:
        r1 = r0 if r1 is None else r1
        radii = np.linspace(r0, r1, len(points))
        for k in range(len(points) - 1):
            self.add_capsule(occ, points[k], points[k + 1], radii[k], radii[k + 1])

    def paint(self, occ: _Occupancy, value, label: Tissue, where=None) -> None:
        """Blend `value` (scalar or full-volume array) into hu by occupancy, optionally only `where`."""
        sl = occ.region()
        if sl is None:
            return
        o = occ.a[sl]
        if where is not None:
            o = o * where[sl]
        h = self.hu[sl]
        val = value[sl] if isinstance(value, np.ndarray) and value.ndim == 3 else value
        h += o * (val - h)
        self.tissue[sl][o > 0.5] = label

    def paint_2d(self, dist_2d: np.ndarray, value, label: Tissue, z_where: np.ndarray | None = None) -> None:
        """Paint a z-invariant cross-section given as a signed distance map (Y, X), optionally on some slices."""
        o = self._soft_occ(dist_2d)[None]
        if z_where is not None:
            o = o * z_where.astype(np.float32)[:, None, None]
        self.hu += o * (value - self.hu)
        self.tissue[np.broadcast_to(o > 0.5, self.shape)] = label

    # ---- helpers for findings -----------------------------------------------------------------
    def mask(self, *labels: Tissue) -> np.ndarray:
        return np.isin(self.tissue, [int(t) for t in labels])

    def lung_depth_mm(self) -> np.ndarray:
        """Distance (mm) from each voxel of the lungs (as first computed) to the nearest non-lung voxel."""
        if self._edt is None:
            lung = self.tissue == Tissue.LUNG
            self._edt = ndimage.distance_transform_edt(lung, sampling=self.spacing[::-1]).astype(np.float32)
        return self._edt

    def smooth_noise(self, rng: np.random.Generator, sigma_mm: float) -> np.ndarray:
        """Gaussian random field with unit standard deviation and correlation length sigma_mm."""
        white = rng.standard_normal(self.shape, dtype=np.float32)
        sigma = [sigma_mm / s for s in self.spacing[::-1]]
        field_ = ndimage.gaussian_filter(white, sigma, truncate=2.5)
        return field_ / max(float(field_.std()), 1e-6)

    def world(self, rel) -> list[float]:
        return [round(float(x), 1) for x in np.asarray(rel) + self.center]

    def pick_lung_point(self, rng, min_depth_mm: float, where: np.ndarray | None = None):
        """A random lung voxel (relative mm) whose surrounding sphere of min_depth_mm is all lung.

        Rejection sampling against 26 points on the sphere: much cheaper than a distance transform.
        """
        lung = self.tissue == Tissue.LUNG
        cand = lung if where is None else lung & where
        idx = np.flatnonzero(cand)
        if idx.size == 0:
            idx = np.flatnonzero(lung)
        if idx.size == 0:
            return None
        dirs = np.array([(a, b, c) for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1) if (a, b, c) != (0, 0, 0)], float)
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        lo = np.array([self.ux[0], self.vy[0], self.wz[0]])
        sp = np.asarray(self.spacing)
        shape_xyz = np.array(self.shape[::-1])
        best = None
        for pick in rng.choice(idx, size=min(200, idx.size), replace=False):
            k, j, i = np.unravel_index(int(pick), self.shape)
            p = np.array([self.ux[i], self.vy[j], self.wz[k]], dtype=np.float64)
            best = p if best is None else best
            q = np.rint((p + dirs * min_depth_mm - lo) / sp).astype(int)
            if np.any(q < 0) or np.any(q >= shape_xyz):
                continue
            if lung[q[:, 2], q[:, 1], q[:, 0]].all():
                return p
        return best


def _anatomy(rng: np.random.Generator, findings: frozenset[str]) -> dict:
    """Patient body measurements in mm (relative to the chest centre)."""
    a = rng.uniform(138, 172)
    k = a / 155.0
    b = a * rng.uniform(0.64, 0.76)
    fat = rng.uniform(5, 26)
    muscle = rng.uniform(8, 14)
    a_in, b_in = a - 2 - fat - muscle, b - 2 - fat - muscle
    lung_h = rng.uniform(215, 255) * (0.9 + 0.1 * k)
    dome_h = rng.uniform(28, 42)
    base = -lung_h / 2
    apex = lung_h / 2
    heart_semi = np.array([56, 46, 50]) * k * rng.uniform(0.92, 1.06)
    heart_c = np.array([0.16 * a_in, -0.34 * b_in, base + dome_h + 32])
    if "cardiomegaly" in findings:
        heart_semi = heart_semi * np.array([1.38, 1.22, 1.18])
        heart_c = heart_c + np.array([12, 4, 4])
    spine_r = 17 * k
    spine_v = b_in - spine_r - 6 * k
    return dict(
        a=a, b=b, k=k, fat=fat, muscle=muscle, a_in=a_in, b_in=b_in, lung_h=lung_h, dome_h=dome_h,
        base=base, apex=apex, heart_c=heart_c, heart_semi=heart_semi, spine_r=spine_r, spine_v=spine_v,
        carina_w=apex - 95 * k, arch_w=apex - 62 * k, hilum_w=apex - 120 * k,
        trachea_v=spine_v - spine_r - 22 * k, table_gap=rng.uniform(2, 25),
        lung_semi=(0.42 * a_in, 0.86 * b_in), lung_cx=0.5 * a_in, lung_cv=0.02 * b_in,
    )


def _lung_frame(B: _ChestBuilder, A: dict, side: int):
    """Normalised in-lung coordinates for side (-1 right, +1 left): (radial rho 2D, AP position 2D)."""
    la, lb = A["lung_semi"]
    uu = (B.ux[None, :] - side * A["lung_cx"]) / la
    vv = (B.vy[:, None] - A["lung_cv"]) / lb
    return np.sqrt(uu**2 + vv**2), vv


def _diaphragm_w(B: _ChestBuilder, A: dict) -> np.ndarray:
    """Height (w, mm) of the diaphragm under each (Y, X) column; the right dome sits higher (liver)."""
    out = np.empty((len(B.vy), len(B.ux)), dtype=np.float32)
    for side in (-1, 1):
        rho, _ = _lung_frame(B, A, side)
        dome = A["base"] + A["dome_h"] * np.clip(1 - rho**2, 0, 1) + (14 if side < 0 else 0)
        cols = B.ux < 0 if side < 0 else B.ux >= 0
        out[:, cols] = dome[:, cols]
    return out


def _build_anatomy(B: _ChestBuilder, A: dict, rng: np.random.Generator, contrast: bool) -> None:
    a, b, k = A["a"], A["b"], A["k"]
    U2, V2 = B.ux[None, :], B.vy[:, None]
    W1 = B.wz

    # table under the patient (posterior = +v), concave, carbon shell around foam
    v_top = b + A["table_gap"] - U2**2 / 1400.0
    for lo, hi, val in ((0, 34, 280.0), (2.5, 31.5, -920.0)):
        d = np.maximum(np.maximum(lo - (V2 - v_top), (V2 - v_top) - hi), np.abs(U2) - 215 + lo)
        B.paint_2d(d, val, Tissue.TABLE)

    # body wall: skin/muscle, subcutaneous fat, chest-wall muscle, then the thoracic cavity (fat)
    B.paint_2d(_ellipse_distance_2d(U2, V2, a, b, 2.4), 35.0, Tissue.SOFT)
    B.paint_2d(_ellipse_distance_2d(U2, V2, a - 2, b - 2, 2.4), -105.0, Tissue.SOFT)
    t = 2 + A["fat"]
    B.paint_2d(_ellipse_distance_2d(U2, V2, a - t, b - t, 2.4), 45.0, Tissue.SOFT)
    cavity = _ellipse_distance_2d(U2, V2, A["a_in"], A["b_in"], 2.2)
    B.paint_2d(cavity, -85.0, Tissue.SOFT)
    # above the lung apices the thoracic inlet is mostly muscle and vessels
    B.paint_2d(cavity, 35.0, Tissue.SOFT, z_where=W1 > A["apex"] - 10)

    # abdomen below the diaphragm: liver on the right, stomach with an air bubble on the left
    dia = _diaphragm_w(B, A)
    below = np.clip(0.5 - (W1[:, None, None] - dia[None]) / B.soft, 0, 1) * (cavity < 0)[None]
    occ = B.occupancy()
    occ.add((slice(None),) * 3, below.astype(np.float32))
    liver = np.where((U2 < 25 * k)[None] & (W1 < A["base"] + 60)[:, None, None], 58.0, 38.0).astype(np.float32)
    B.paint(occ, np.broadcast_to(liver, B.shape).copy(), Tissue.ABDOMEN)
    bubble = B.occupancy()
    B.add_ellipsoid(bubble, (0.45 * A["a_in"], -0.15 * A["b_in"], A["base"] + A["dome_h"] - 32),
                    (26 * k, 20 * k, 12 * k))
    B.paint(bubble, -1000.0, Tissue.ABDOMEN, where=B.tissue == Tissue.ABDOMEN)

    # lungs with a gravity gradient and fine parenchymal texture
    texture = B.smooth_noise(rng, 5.0)
    lung_occ = B.occupancy()
    la, lb = A["lung_semi"]
    dome = np.clip((W1 - (A["apex"] - 60.0)) / 60.0, 0.0, 0.999)
    taper = np.sqrt(1.0 - dome**2)[:, None, None]  # rounded apices
    for side in (-1, 1):
        rho, _ = _lung_frame(B, A, side)
        lateral = (rho[None] / taper - 1.0) * min(la, lb) * taper
        basal = dia[None] - W1[:, None, None]
        occ_side = B._soft_occ(np.maximum(lateral, basal))
        lung_occ.add((slice(None),) * 3, occ_side)
    gravity = 45.0 * np.clip((B.vy + b) / (2 * b), 0, 1)[None, :, None]
    lung_hu = (-870.0 + gravity + 16.0 * texture).astype(np.float32)
    B.paint(lung_occ, lung_hu, Tissue.LUNG)

    lung = B.tissue == Tissue.LUNG
    blood = 190.0 if contrast else 38.0
    # pulmonary vessels: branching tubes from each hilum to the periphery
    vessels = B.occupancy()
    for side in (-1, 1):
        hilum = np.array([side * 0.24 * A["a_in"], 0.05 * A["b_in"], A["hilum_w"]])
        for _ in range(14):
            trunk_dir = rng.uniform(-0.75, 0.75, 3) * [la, lb, 0]
            trunk_w = rng.uniform(A["base"] + 20, A["apex"] - 30)
            mid = hilum + (np.array([side * A["lung_cx"] + trunk_dir[0], A["lung_cv"] + trunk_dir[1], trunk_w]) - hilum) * rng.uniform(0.35, 0.55)
            B.add_capsule(vessels, hilum, mid, 4.5 * k, 3.0 * k)
            for _ in range(3):
                tgt = np.array([side * A["lung_cx"], A["lung_cv"], 0.0]) + (trunk_dir + rng.normal(0, 25, 3) * [1, 1, 0]) * 1.0
                tgt[2] = np.clip(trunk_w + rng.normal(0, 35), A["base"] + 10, A["apex"] - 15)
                B.add_capsule(vessels, mid, tgt, 2.6 * k, 0.9)
    B.paint(vessels, blood, Tissue.LUNG, where=lung)

    # airways: trachea, main and lobar bronchi (walls then lumen)
    tv = A["trachea_v"]
    trachea = [np.array([0, tv, A["apex"] + 80]), np.array([0, tv, A["carina_w"]])]
    bronchi = []
    for side in (-1, 1):
        hil = np.array([side * 0.22 * A["a_in"], tv + 8 * k, A["hilum_w"] + 8])
        bronchi.append([trachea[1], hil])
        for _ in range(3):
            tgt = hil + np.array([side * rng.uniform(15, 45), rng.uniform(-40, 40), rng.uniform(-70, 60)]) * k
            bronchi.append([hil, tgt])
    A["bronchi"] = bronchi
    wall, lumen = B.occupancy(), B.occupancy()
    B.add_polyline(wall, trachea, 10.5 * k)
    B.add_polyline(lumen, trachea, 8.5 * k)
    for i, seg in enumerate(bronchi):
        r = 6.5 * k if i % 4 == 0 else 3.2 * k
        B.add_polyline(wall, seg, r + 1.5, (r + 1.5) * (0.9 if i % 4 == 0 else 0.6))
        B.add_polyline(lumen, seg, r, r * (0.9 if i % 4 == 0 else 0.6))
    B.paint(wall, 30.0, Tissue.SOFT)
    B.paint(lumen, -990.0, Tissue.AIRWAY)

    # heart (pericardial fat rim or effusion first), great vessels, oesophagus, small normal nodes
    hc, hs = A["heart_c"], A["heart_semi"]
    rim = B.occupancy()
    B.add_ellipsoid(rim, hc, hs + 3)
    B.paint(rim, -90.0, Tissue.SOFT)
    if "pericardial_thickness" in A:
        peri = B.occupancy()
        B.add_ellipsoid(peri, hc, hs + A["pericardial_thickness"])
        B.paint(peri, 12.0, Tissue.FLUID)
    heart = B.occupancy()
    B.add_ellipsoid(heart, hc, hs)
    B.paint(heart, 105.0 if contrast else 42.0, Tissue.HEART)
    if contrast:
        pool = B.occupancy()
        B.add_ellipsoid(pool, hc + [-4, 2, 2], hs * 0.72)
        B.paint(pool, 240.0, Tissue.HEART)

    sv, sr = A["spine_v"], A["spine_r"]
    aorta_pts = [
        hc + np.array([-0.35 * hs[0], 0.35 * hs[1], 0.55 * hs[2]]),
        np.array([-6 * k, hc[1] + 10 * k, A["arch_w"] - 12 * k]),
        np.array([8 * k, (hc[1] + sv) / 2 - 5 * k, A["arch_w"]]),
        np.array([24 * k, sv - sr - 22 * k, A["arch_w"] - 14 * k]),
        np.array([24 * k, sv - sr - 14 * k, A["base"] - 60]),
    ]
    A["aorta_pts"], A["aorta_r"] = aorta_pts, 14.0 * k
    aorta = B.occupancy()
    B.add_polyline(aorta, aorta_pts[:3], 15.5 * k, 13.5 * k)
    B.add_polyline(aorta, aorta_pts[2:], 13.0 * k, 11.5 * k)
    svc = [np.array([-30 * k, hc[1] + 5 * k, A["apex"] + 40]), np.array([-32 * k, hc[1] + 8 * k, hc[2] + 0.6 * hs[2]])]
    A["svc_pts"] = svc
    B.add_polyline(aorta, svc, 9.0 * k)
    pa = [hc + np.array([0.1 * hs[0], -0.2 * hs[1], 0.7 * hs[2]]), np.array([12 * k, hc[1] + 20 * k, A["hilum_w"] + 5])]
    B.add_polyline(aorta, pa, 12.0 * k)
    for side in (-1, 1):
        B.add_polyline(aorta, [pa[1], np.array([side * 0.24 * A["a_in"], 0.05 * A["b_in"], A["hilum_w"]])], 8.5 * k)
    B.paint(aorta, blood + (60.0 if contrast else 0.0), Tissue.VESSEL)

    eso_v = tv + 14 * k
    A["esophagus"] = [np.array([6 * k, eso_v, A["apex"] + 80]), np.array([14 * k, eso_v + 2, A["base"] + A["dome_h"] - 5])]
    eso, eso_air = B.occupancy(), B.occupancy()
    B.add_polyline(eso, A["esophagus"], 7.5 * k)
    B.add_polyline(eso_air, A["esophagus"], 1.8)
    B.paint(eso, 40.0, Tissue.VESSEL)
    B.paint(eso_air, -950.0, Tissue.VESSEL)
    nodes = B.occupancy()
    for c in _node_stations(A)[:3]:
        B.add_ellipsoid(nodes, c + rng.normal(0, 2, 3), np.array([3.5, 3.0, 4.5]) * k)
    B.paint(nodes, 35.0, Tissue.VESSEL)

    # spine: vertebral bodies (cortex, marrow, discs), canal, laminae and spinous processes
    pitch = 27.0 * k
    phase = np.mod(W1 - rng.uniform(0, pitch), pitch)
    disc = (np.abs(phase - pitch / 2) < 3.2 * k).astype(np.float32)[:, None, None]
    d_body = np.sqrt(U2**2 + (V2 - sv) ** 2) - sr
    cortex = (disc * 90.0 + (1 - disc) * 650.0)
    B.hu += B._soft_occ(d_body)[None] * (cortex - B.hu)
    B.hu += B._soft_occ(d_body + 2.5)[None] * (disc * 90.0 + (1 - disc) * 230.0 - B.hu)
    B.tissue[np.broadcast_to((d_body < 0)[None], B.shape)] = Tissue.BONE
    # paraspinal muscles behind the cavity, inside the subcutaneous fat
    d_para = _ellipse_distance_2d(U2, V2 - A["b_in"], 55 * k, 28 * k)
    B.paint_2d(np.maximum(d_para, _ellipse_distance_2d(U2, V2, a - t, b - t, 2.4)), 48.0, Tissue.SOFT)
    canal_v = sv + sr + 9 * k
    d_canal = np.sqrt(U2**2 + (V2 - canal_v) ** 2)
    posterior = B.occupancy()
    B.add_capsule(posterior, (0, canal_v, A["apex"] + 80), (0, canal_v, A["base"] - 80), 12.5 * k)
    for side in (-1, 1):
        B.add_capsule(posterior, (side * 30 * k, canal_v - 2, A["apex"] + 80), (side * 30 * k, canal_v - 2, A["base"] - 80), 5.5 * k)
    spinous_end = min(canal_v + 40 * k, b - 2 - A["fat"] - 4)
    spinous_d = np.maximum(np.abs(U2) - 4 * k, np.maximum(canal_v + 8 * k - V2, V2 - spinous_end))
    B.paint(posterior, 480.0, Tissue.BONE)
    B.paint_2d(spinous_d, 480.0, Tissue.BONE)
    B.paint_2d(d_canal - 7.5 * k, 15.0, Tissue.SOFT)

    # ribs: elliptical bands sloping down anteriorly, costal cartilage near the sternum
    ra, rb = A["a_in"] + 5, A["b_in"] + 5
    radial = _ellipse_distance_2d(U2, V2, ra, rb, 2.2)
    band = np.abs(radial) < 4.5 + B.soft
    sin_t = np.sin(np.arctan2(V2 / rb, U2 / ra))
    jj, ii = np.nonzero(band)
    if jj.size:
        s = sin_t[jj, ii][None, :]
        rib_pitch = 25.0 * k
        ph = np.mod(W1[:, None] - 75.0 * (s + 1) / 2 - rng.uniform(0, rib_pitch), rib_pitch) - rib_pitch / 2
        dist = np.maximum(np.abs(ph) - 4.5 * k, np.abs(radial[jj, ii])[None, :] - 4.0)
        in_chest = ((W1 > A["base"] - 25) & (W1 < A["apex"] + 25))[:, None]
        o = B._soft_occ(dist) * in_chest
        val = np.where(s < -0.8, 130.0, 430.0).astype(np.float32)
        cur = B.hu[:, jj, ii]
        B.hu[:, jj, ii] = cur + o * (val - cur)
        lab = B.tissue[:, jj, ii]
        lab[o > 0.5] = Tissue.BONE
        B.tissue[:, jj, ii] = lab

    sternum = B.occupancy()
    st_v = -(A["b_in"] + 0.5 * A["muscle"])
    B.add_capsule(sternum, (0, st_v, A["apex"] - 5), (0, st_v + 4, hc[2] - 0.8 * hs[2]), 0.45 * A["muscle"] + 4)
    B.paint(sternum, 330.0, Tissue.BONE)


def _node_stations(A: dict) -> list[np.ndarray]:
    """Mediastinal/hilar lymph node stations: paratracheal, subcarinal, prevascular, hilar right/left."""
    k, tv = A["k"], A["trachea_v"]
    return [
        np.array([-16 * k, tv - 4 * k, A["carina_w"] + 22 * k]),
        np.array([0, tv + 14 * k, A["carina_w"] - 20 * k]),
        np.array([2 * k, A["heart_c"][1] - 6 * k, A["arch_w"] - 18 * k]),
        np.array([-0.3 * A["a_in"], 0.12 * A["b_in"], A["hilum_w"] - 8 * k]),
        np.array([0.3 * A["a_in"], 0.12 * A["b_in"], A["hilum_w"] - 8 * k]),
    ]


_NODE_STATION_NAMES = ("right paratracheal", "subcarinal", "prevascular", "right hilar", "left hilar")


def _lobe(A: dict, p) -> str:
    u, v, w = p
    t = (w - A["base"]) / A["lung_h"]
    vn = (v - A["lung_cv"]) / A["lung_semi"][1]
    if u < 0:
        if t > 0.62:
            return "right upper lobe"
        if t > 0.3 and vn < -0.1:
            return "right middle lobe"
        return "right lower lobe"
    if t > 0.55 or (t > 0.3 and vn < -0.2):
        return "left upper lobe"
    return "left lower lobe"


def _side_name(u: float) -> str:
    return "right" if u < 0 else "left"


# ---- findings --------------------------------------------------------------------------------
def _lung_where(B, side: int | None = None):
    lung = B.tissue == Tissue.LUNG
    if side is not None:
        lung = lung & ((B.ux < 0) if side < 0 else (B.ux >= 0))[None, None, :]
    return lung


def _blob(B, rng, center, radius: float, irregular_mm: float) -> _Occupancy:
    """An irregular blob: a sphere whose surface is pushed in and out by a smooth random field."""
    occ = B.occupancy()
    pad = radius + irregular_mm + B.soft
    sl = B.bbox(center - pad, center + pad)
    u, v, w = B._local(sl)
    dist = np.sqrt((u - center[0]) ** 2 + (v - center[1]) ** 2 + (w - center[2]) ** 2) - radius
    shape = dist.shape
    if min(shape) > 0:
        white = rng.standard_normal(shape, dtype=np.float32)
        sig = [max(6.0 / s, 0.5) for s in B.spacing[::-1]]
        n = ndimage.gaussian_filter(white, sig, truncate=2.5)
        n /= max(float(n.std()), 1e-6)
        occ.add(sl, B._soft_occ(dist + irregular_mm * n))
    return occ


def _paint_lung_nodule(B, A, rng):
    nodules = []
    for _ in range(int(rng.choice([1, 1, 1, 2, 3]))):
        diameter = float(np.round(min(rng.uniform(6, 20) * B.conspicuity, 30.0)))
        c = B.pick_lung_point(rng, diameter / 2 + 3)
        if c is None:
            break
        occ = B.occupancy()
        B.add_sphere(occ, c, diameter / 2)
        hu = float(rng.uniform(15, 60))
        B.paint(occ, hu, Tissue.LESION, where=B.tissue == Tissue.LUNG)
        nodules.append(dict(center_mm=B.world(c), diameter_mm=diameter, lobe=_lobe(A, c), hu=round(hu, 1)))
    return {"nodules": nodules}


def _paint_pleural_effusion(B, A, rng):
    side_name = str(rng.choice(["right", "left", "bilateral"], p=[0.35, 0.25, 0.4]))
    severity = str(rng.choice(["small", "moderate", "large"], p=[0.5, 0.35, 0.15]))
    depth = {"small": 0.3, "moderate": 0.5, "large": 0.7}[severity]
    sides = {"right": [-1], "left": [1], "bilateral": [-1, 1]}[side_name]
    lb = A["lung_semi"][1]
    volume = 0.0
    for side in sides:
        _, vn = _lung_frame(B, A, side)
        rise = np.clip(1 - (B.wz - A["base"]) / (A["lung_h"] * depth * 0.9), 0, 1)[:, None, None]
        level = 1 - 2 * depth * rise  # fluid lies posterior (dependent) to this AP level
        dist = (level - vn[None]) * lb
        occ = B.occupancy()
        occ.add((slice(None),) * 3, B._soft_occ(dist))
        where = _lung_where(B, side) | (B.tissue == Tissue.LESION)
        B.paint(occ, 14.0, Tissue.FLUID, where=where)
        volume += float((occ.a * where).sum())
    vox_ml = float(np.prod(B.spacing)) / 1000.0
    return {"side": side_name, "severity": severity, "volume_ml": round(volume * vox_ml)}


def _paint_emphysema(B, A, rng):
    g = B.smooth_noise(rng, 4.0 * B.conspicuity)
    upper = np.clip((B.wz - A["base"]) / A["lung_h"], 0, 1)[:, None, None]  # centrilobular: upper-lobe predominant
    severity = str(rng.choice(["mild", "moderate", "severe"], p=[0.45, 0.4, 0.15]))
    thr = {"mild": 1.1, "moderate": 0.7, "severe": 0.35}[severity] + 0.9 * (1 - upper)
    weight = np.clip((g - thr) / 0.35, 0, 1) * ((B.tissue == Tissue.LUNG) & (B.hu < -700))
    B.hu += weight * (-975.0 - B.hu)
    bullae = []
    if rng.random() < 0.5:
        for _ in range(int(rng.integers(1, 4))):
            c = B.pick_lung_point(rng, 10, where=(B.wz > A["apex"] - 0.4 * A["lung_h"])[:, None, None])
            if c is None:
                break
            r = float(rng.uniform(8, 16))
            occ = B.occupancy()
            B.add_sphere(occ, c, r)
            B.paint(occ, -995.0, Tissue.LUNG, where=B.tissue == Tissue.LUNG)
            bullae.append(dict(center_mm=B.world(c), diameter_mm=round(2 * r)))
    return {"severity": severity, "distribution": "centrilobular, upper lobe predominant", "bullae": bullae}


def _paint_consolidation(B, A, rng):
    low = (B.wz < A["base"] + 0.55 * A["lung_h"])[:, None, None] if rng.random() < 0.7 else None
    c = B.pick_lung_point(rng, 12, where=low)
    if c is None:
        return {}
    r = float(rng.uniform(22, 40))
    occ = _blob(B, rng, c, r, 6.0)
    side = -1 if c[0] < 0 else 1
    where = _lung_where(B, side)
    B.paint(occ, float(rng.uniform(25, 45)), Tissue.LESION, where=where)
    # air bronchograms: air-filled bronchi running through the dense lung
    hilum = np.array([side * 0.24 * A["a_in"], 0.05 * A["b_in"], A["hilum_w"]])
    air = B.occupancy()
    for _ in range(2):
        direction = (c - hilum) / max(np.linalg.norm(c - hilum), 1e-6)
        p0 = c - direction * r * 0.6 + rng.normal(0, 4, 3)
        p1 = c + direction * r * 0.5 + rng.normal(0, 6, 3)
        B.add_capsule(air, p0, p1, 2.4, 1.6)
    inside = occ.a > 0.5
    B.paint(air, -920.0, Tissue.LESION, where=inside)
    return {"center_mm": B.world(c), "diameter_mm": round(2 * r), "lobe": _lobe(A, c), "air_bronchograms": True}


def _paint_atelectasis(B, A, rng):
    kind = str(rng.choice(["linear", "dependent"], p=[0.6, 0.4]))
    if kind == "dependent":
        side_name = str(rng.choice(["right", "left", "bilateral"], p=[0.3, 0.3, 0.4]))
        sides = {"right": [-1], "left": [1], "bilateral": [-1, 1]}[side_name]
        for side in sides:
            _, vn = _lung_frame(B, A, side)
            rise = np.clip(1 - (B.wz - A["base"]) / (0.28 * A["lung_h"]), 0, 1)[:, None, None]
            dist = (1 - 0.5 * rise - vn[None]) * A["lung_semi"][1]
            occ = B.occupancy()
            occ.add((slice(None),) * 3, B._soft_occ(dist) * (rise > 0))
            B.paint(occ, -60.0, Tissue.LESION, where=_lung_where(B, side))
        return {"type": "dependent", "side": side_name, "location": "lung bases"}
    low = (B.wz < A["base"] + 0.35 * A["lung_h"])[:, None, None]
    c = B.pick_lung_point(rng, 10, where=low)
    if c is None:
        return {}
    normal = np.array([rng.normal(0, 0.25), rng.normal(0, 0.35), 1.0])
    normal /= np.linalg.norm(normal)
    extent = float(rng.uniform(30, 50))
    thick = float(rng.uniform(5, 8)) * B.conspicuity
    occ = B.occupancy()
    pad = extent + B.soft
    sl = B.bbox(c - pad, c + pad)
    u, v, w = B._local(sl)
    du, dv, dw = u - c[0], v - c[1], w - c[2]
    along = du * normal[0] + dv * normal[1] + dw * normal[2]
    radial = np.sqrt(np.maximum(du**2 + dv**2 + dw**2 - along**2, 0))
    occ.add(sl, B._soft_occ(np.maximum(np.abs(along) - thick / 2, radial - extent)))
    side = -1 if c[0] < 0 else 1
    B.paint(occ, 5.0, Tissue.LESION, where=_lung_where(B, side))
    return {"type": "linear", "center_mm": B.world(c), "lobe": _lobe(A, c), "thickness_mm": round(thick, 1)}


def _paint_lung_opacity(B, A, rng):
    patches = []
    for _ in range(int(rng.integers(1, 4))):
        c = B.pick_lung_point(rng, 10)
        if c is None:
            break
        r = float(rng.uniform(15, 35))
        occ = _blob(B, rng, c, r, 7.0)
        target = float(rng.uniform(-650, -520))
        where = (B.tissue == Tissue.LUNG) & (B.hu < target)  # vessels stay visible through ground glass
        B.paint(occ, target, Tissue.LUNG, where=where)
        patches.append(dict(center_mm=B.world(c), diameter_mm=round(2 * r), lobe=_lobe(A, c), hu=round(target)))
    return {"pattern": "ground-glass", "patches": patches}


def _paint_arterial_calcification(B, A, rng):
    pts, r_ao = A["aorta_pts"], A["aorta_r"]
    n = int(rng.integers(3, 11))
    occ = B.occupancy()
    for _ in range(n):
        seg = int(rng.integers(1, len(pts) - 1))
        p = pts[seg] + (pts[seg + 1] - pts[seg]) * rng.uniform(0, 1)
        d = pts[seg + 1] - pts[seg]
        d = d / np.linalg.norm(d)
        perp = np.cross(d, rng.normal(size=3))
        perp /= max(np.linalg.norm(perp), 1e-6)
        B.add_sphere(occ, p + perp * (r_ao - 1.0), float(rng.uniform(2.2, 3.5)) * B.conspicuity)
    B.paint(occ, float(rng.uniform(900, 1300)), Tissue.LESION)
    return {"count": n, "location": "aortic arch and descending thoracic aorta"}


def _paint_coronary_calcification(B, A, rng):
    hc, hs = A["heart_c"], A["heart_semi"]
    vessels = []
    occ = B.occupancy()
    for _ in range(int(rng.integers(2, 8))):
        name = str(rng.choice(["LAD", "LCx", "RCA"], p=[0.5, 0.25, 0.25]))
        lat = {"LAD": (0.0, 0.5), "LCx": (0.6, 0.95), "RCA": (-0.9, -0.4)}[name]
        d = np.array([rng.uniform(*lat), -rng.uniform(0.3, 1.0), rng.uniform(0.1, 0.7)])
        d /= np.linalg.norm(d)
        B.add_sphere(occ, hc + hs * d * 1.0, float(rng.uniform(2.0, 3.2)) * B.conspicuity)
        vessels.append(name)
    B.paint(occ, float(rng.uniform(900, 1300)), Tissue.LESION)
    return {"vessels": sorted(set(vessels)), "count": len(vessels)}


def _paint_medical_material(B, A, rng):
    kind = str(rng.choice(["pacemaker", "central venous catheter", "sternotomy wires"], p=[0.45, 0.35, 0.2]))
    k, hc, hs = A["k"], A["heart_c"], A["heart_semi"]
    svc = A["svc_pts"]
    occ = B.occupancy()
    if kind == "pacemaker":
        side = 1 if rng.random() < 0.8 else -1
        gen = np.array([side * 0.55 * A["a"], -(A["b"] - 2 - 0.5 * A["fat"] - 3), A["apex"] - 20])
        B.add_ellipsoid(occ, gen, (22 * k, 5.0, 25 * k))
        ra = hc + np.array([-0.55 * hs[0], 0.1 * hs[1], 0.3 * hs[2]])
        rv = hc + np.array([0.15 * hs[0], -0.55 * hs[1], -0.45 * hs[2]])
        lead = [gen, np.array([side * 0.3 * A["a_in"], -A["b_in"] + 12, A["apex"] - 5]), svc[0] * [1, 1, 0] + [0, 0, A["apex"] - 25], svc[1], ra, rv]
        B.add_polyline(occ, lead, 1.4 * B.conspicuity)
        tip = "right ventricle"
        detail = {"side": _side_name(side), "leads_to": ["right atrium", "right ventricle"]}
    elif kind == "central venous catheter":
        side = -1 if rng.random() < 0.75 else 1
        line = [np.array([side * 40 * k, -20 * k, A["apex"] + 70]), np.array([side * 34 * k, -15 * k, A["apex"] - 10]),
                svc[0] * [1, 1, 0] + [0, 0, A["apex"] - 30], svc[1]]
        B.add_polyline(occ, line, 1.6 * B.conspicuity)
        tip = "cavoatrial junction"
        detail = {"side": _side_name(side), "access": "internal jugular vein"}
    else:
        top, bottom = A["apex"] - 10, hc[2] - 0.6 * hs[2]
        st_v = -(A["b_in"] + 0.5 * A["muscle"])
        for w in np.linspace(top, bottom, 5):
            B.add_capsule(occ, (-9 * k, st_v, w), (9 * k, st_v, w), 1.4 * B.conspicuity)
        tip = None
        detail = {"location": "sternum"}
    B.paint(occ, 3000.0, Tissue.DEVICE)
    return {"type": kind, "tip": tip, **detail}


def _paint_hiatal_hernia(B, A, rng):
    top = A["esophagus"][1]
    size = float(rng.uniform(30, 55))
    c = top + np.array([4, 2, size * 0.35])
    occ = B.occupancy()
    B.add_ellipsoid(occ, c, (size / 2, size * 0.42, size * 0.45))
    B.paint(occ, 32.0, Tissue.LESION)
    air = B.occupancy()
    B.add_ellipsoid(air, c + [0, -size * 0.15, size * 0.12], (size * 0.28, size * 0.18, size * 0.2))
    B.paint(air, -1000.0, Tissue.LESION, where=occ.a > 0.5)
    size_name = "small" if size < 40 else "moderate"
    return {"size_mm": round(size), "size": size_name, "center_mm": B.world(c)}


def _paint_lymphadenopathy(B, A, rng):
    stations = _node_stations(A)
    chosen = rng.choice(len(stations), size=int(rng.integers(2, 5)), replace=False)
    occ = B.occupancy()
    nodes = []
    for i in sorted(chosen):
        short = float(rng.uniform(12, 24)) * min(B.conspicuity, 1.5)
        B.add_ellipsoid(occ, stations[i] + rng.normal(0, 2, 3), (short / 2, short / 2 * 1.1, short / 2 * 1.4))
        nodes.append(dict(station=_NODE_STATION_NAMES[i], short_axis_mm=round(short)))
    B.paint(occ, 38.0, Tissue.LESION)
    return {"nodes": nodes, "largest_short_axis_mm": max(n["short_axis_mm"] for n in nodes)}


def _paint_fibrotic_sequela(B, A, rng):
    g = B.smooth_noise(rng, 3.0 * B.conspicuity)
    depth = B.lung_depth_mm()
    basal = np.clip(1 - (B.wz - A["base"]) / (0.6 * A["lung_h"]), 0, 1)[:, None, None]
    weight = np.clip(1 - np.abs(g) / 0.35, 0, 1) * (depth < 18 * B.conspicuity) * (depth > 0) * basal
    B.hu += weight * (-150.0 - B.hu) * (B.hu < -150)
    return {"distribution": "subpleural, basal predominant", "pattern": "reticulation and scarring"}


def _paint_mosaic(B, A, rng):
    g = B.smooth_noise(rng, 10.0)
    paren = (B.tissue == Tissue.LUNG) & (B.hu < -700)
    B.hu += paren * np.clip(g / 0.5, -1, 1) * 75.0 * B.conspicuity
    return {"pattern": "geographic areas of differing lung attenuation"}


def _paint_septal_thickening(B, A, rng):
    g = B.smooth_noise(rng, 4.0 * B.conspicuity)
    depth = B.lung_depth_mm()
    weight = np.clip(1 - np.abs(g) / 0.2, 0, 1) * (depth < 25 * B.conspicuity) * (depth > 0)
    B.hu += weight * (-420.0 - B.hu) * (B.hu < -420)
    return {"distribution": "peripheral"}


def _paint_bronchiectasis(B, A, rng):
    wall, lumen = B.occupancy(), B.occupancy()
    lobes = []
    for _ in range(int(rng.integers(3, 6))):
        side = -1 if rng.random() < 0.5 else 1
        hil = np.array([side * 0.24 * A["a_in"], 0.1 * A["b_in"], A["hilum_w"] - 5])
        tgt = B.pick_lung_point(rng, 8, where=_lung_where(B, side) & (B.wz < A["hilum_w"])[:, None, None])
        if tgt is None:
            continue
        r = float(rng.uniform(3.5, 5.5)) * B.conspicuity
        B.add_capsule(wall, hil, tgt, r + 2.2, r + 1.8)
        B.add_capsule(lumen, hil, tgt, r, r * 0.9)
        lobes.append(_lobe(A, tgt))
    lung = B.tissue == Tissue.LUNG
    B.paint(wall, 25.0, Tissue.LESION, where=lung)
    B.paint(lumen, -990.0, Tissue.AIRWAY, where=lung | (B.tissue == Tissue.LESION))
    return {"lobes": sorted(set(lobes)), "type": "cylindrical"}


def _paint_peribronchial_thickening(B, A, rng):
    wall, lumen = B.occupancy(), B.occupancy()
    for i, seg in enumerate(A["bronchi"]):
        if i % 4 == 0:
            continue
        r = 3.2 * A["k"]
        B.add_polyline(wall, seg, r + 3.5 * B.conspicuity, r * 0.6 + 3.0 * B.conspicuity)
        B.add_polyline(lumen, seg, r, r * 0.6)
    B.paint(wall, 20.0, Tissue.LESION, where=B.tissue == Tissue.LUNG)
    B.paint(lumen, -990.0, Tissue.AIRWAY, where=B.tissue == Tissue.LESION)
    return {"distribution": "central airways"}


# Painting order matters: diffuse parenchymal changes first, focal lesions last so they stay visible.
_FINDING_PAINTERS = {
    "emphysema": _paint_emphysema,
    "mosaic attenuation pattern": _paint_mosaic,
    "interlobular septal thickening": _paint_septal_thickening,
    "pulmonary fibrotic sequela": _paint_fibrotic_sequela,
    "bronchiectasis": _paint_bronchiectasis,
    "peribronchial thickening": _paint_peribronchial_thickening,
    "lung opacity": _paint_lung_opacity,
    "consolidation": _paint_consolidation,
    "atelectasis": _paint_atelectasis,
    "pleural effusion": _paint_pleural_effusion,
    "lymphadenopathy": _paint_lymphadenopathy,
    "hiatal hernia": _paint_hiatal_hernia,
    "arterial wall calcification": _paint_arterial_calcification,
    "coronary artery wall calcification": _paint_coronary_calcification,
    "medical material": _paint_medical_material,
    "lung nodule": _paint_lung_nodule,
}


def make_chest_phantom(
    rng_or_seed: int | np.random.Generator,
    findings: set[str] | frozenset[str] = frozenset(),
    shape_zyx: tuple[int, int, int] = (64, 128, 128),
    spacing_mm: tuple[float, float, float] = (3.0, 3.0, 5.0),
    *,
    origin_mm: tuple[float, float, float] | None = None,
    center_mm: tuple[float, float, float] | None = None,
    contrast: bool = False,
    findings_seed: int | None = None,
    conspicuity: float = 1.0,
) -> Phantom:
    """Rasterise one patient's chest with the given CT-RATE findings planted.

    The patient (body size, organs, texture) depends only on `rng_or_seed`; each finding draws from
    its own stream of `findings_seed` (default: the same seed), so adding a finding changes nothing
    else. The grid is centred on the origin of patient space unless `origin_mm` is given; the chest
    centre (mid-lung) sits at the grid centre unless `center_mm` is given.
    `conspicuity` > 1 draws the findings larger (small focal findings, wires, airway walls) and their
    textures coarser, so that they survive coarse voxels: 1 is the realistic size; the CPU demo's
    6 mm voxels use more (see appliance/demo.py).
    """
    unknown = set(findings) - set(PLANTABLE_FINDINGS)
    if unknown:
        raise ValueError(f"unknown findings: {sorted(unknown)}")
    seed = seed_of(rng_or_seed)
    fseed = seed if findings_seed is None else int(findings_seed)
    findings = frozenset(findings)
    nz, ny, nx = shape_zyx
    spacing = tuple(float(s) for s in spacing_mm)
    if origin_mm is None:
        origin_mm = tuple(-s * (n - 1) / 2 for s, n in zip(spacing, (nx, ny, nz)))
    origin = tuple(float(o) for o in origin_mm)
    if center_mm is None:
        center_mm = tuple(o + s * (n - 1) / 2 for o, s, n in zip(origin, spacing, (nx, ny, nz)))

    A = _anatomy(derived_rng(seed, "anatomy"), findings)
    if "pericardial effusion" in findings:
        A["pericardial_thickness"] = float(derived_rng(fseed, "pericardial effusion").uniform(7, 16))
    if not 1.0 <= conspicuity <= 4.0:
        raise ValueError("conspicuity must be in [1, 4]")
    B = _ChestBuilder(shape_zyx, spacing, origin, center_mm, seed, conspicuity)
    _build_anatomy(B, A, derived_rng(seed, "anatomy-texture"), contrast)

    details: dict[str, dict] = {}
    if "cardiomegaly" in findings:
        details["cardiomegaly"] = {"cardiothoracic_ratio": round(float(A["heart_semi"][0] / A["a_in"] * 1.05), 2)}
    if "pericardial effusion" in findings:
        t = A["pericardial_thickness"]
        details["pericardial effusion"] = {"thickness_mm": round(t, 1), "size": "small" if t < 10 else "moderate"}
    for name, painter in _FINDING_PAINTERS.items():
        if name in findings:
            details[name] = painter(B, A, derived_rng(fseed, "finding", name))
    np.clip(B.hu, -1024.0, 3071.0, out=B.hu)
    return Phantom(hu=B.hu, spacing_mm=spacing, origin_mm=origin, findings=details, tissue=B.tissue)
