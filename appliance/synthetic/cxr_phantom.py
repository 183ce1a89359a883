"""Projection phantom for synthetic chest radiographs: anatomy, findings and devices as an attenuation map.

The renderer works in patient millimetres: x points to the patient's left (image right on a frontal
view displayed the usual way), y points to the feet, and the origin is the carina. Each structure adds
its line integral of attenuation (``mu * path length``, no unit) to one map; larger values are denser
(displayed brighter). Lungs subtract the tissue their air replaces. Thin structures (ribs, vessels, lines
and tubes) are drawn with PIL on a 2x supersampled canvas and box-filtered down, so they are anti-aliased.

`render_projection` returns the map plus landmarks in pixel coordinates (lungs, mediastinum, device tips)
so tests and ground truth can point at anatomy without re-deriving it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

MU_SOFT = 0.02  # per mm, water-like tissue at chest kVp
MU_BONE = 0.05
MU_METAL = 0.30
LUNG_AIR_FRACTION = 0.78  # aerated lung replaces this much tissue density

VIEWS = ("PA", "AP", "LL")

# Where a finding described "in the <zone>" sits: (x as a fraction of the chest half-width, y in mm at scale 1)
ZONES: dict[str, tuple[float, float]] = {
    "right upper lobe": (-0.55, -60.0), "right middle lobe": (-0.45, 55.0), "right lower lobe": (-0.55, 105.0),
    "left upper lobe": (0.55, -55.0), "lingula": (0.55, 50.0), "left lower lobe": (0.62, 110.0),
}


@dataclass(frozen=True)
class CxrAnatomy:
    """One patient's habitus; constant over the patient's visits."""

    scale: float  # body size, 1 = average adult
    chest_half_width_mm: float  # midline to the inner lateral chest wall at its widest
    body_depth_mm: float  # half the antero-posterior depth of the chest
    apex_mm: float  # lung apex (negative: above the carina)
    dome_right_mm: float  # top of the right hemidiaphragm at expiration-neutral inspiration
    dome_left_mm: float
    heart_center_x_mm: float
    heart_half_width_mm: float
    heart_half_height_mm: float
    rib_spacing_mm: float
    breasts: bool
    vessel_seed: int


def make_cxr_anatomy(rng: np.random.Generator, sex: str, age: int) -> CxrAnatomy:
    """A plausible adult chest; women slightly smaller with breast shadows, older hearts a little larger."""
    s = float(np.clip(rng.normal(1.0 if sex == "M" else 0.92, 0.06), 0.78, 1.2))
    return CxrAnatomy(
        scale=s,
        chest_half_width_mm=float(138.0 * s * rng.uniform(0.95, 1.05)),
        body_depth_mm=float(100.0 * s * rng.uniform(0.9, 1.12)),
        apex_mm=float(-112.0 * s * rng.uniform(0.95, 1.05)),
        dome_right_mm=float(148.0 * s * rng.uniform(0.94, 1.06)),
        dome_left_mm=float(160.0 * s * rng.uniform(0.94, 1.06)),
        heart_center_x_mm=float(18.0 * s + rng.normal(0, 4)),
        heart_half_width_mm=float(58.0 * s * rng.uniform(0.93, 1.05) * (1.0 + 0.002 * max(age - 50, 0))),
        heart_half_height_mm=float(60.0 * s * rng.uniform(0.93, 1.07)),
        rib_spacing_mm=float(24.0 * s * rng.uniform(0.95, 1.05)),
        breasts=sex == "F",
        vessel_seed=int(rng.integers(2**31)),
    )


@dataclass(frozen=True)
class ViewPose:
    """How the patient stood in front of the detector for one image."""

    view: str  # "PA" | "AP" | "LL"
    fov_mm: float  # detector edge length (square detector)
    shift_mm: tuple[float, float]  # where the carina lands, relative to the detector centre
    rotation_deg: float
    magnification: float  # AP portables magnify the heart and mediastinum
    inspiration_mm: float  # + lowers the diaphragm (a deeper breath)


def make_pose(rng: np.random.Generator, view: str, anatomy: CxrAnatomy) -> ViewPose:
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}")
    portable = view == "AP"
    return ViewPose(
        view=view,
        fov_mm=float(rng.uniform(400, 440)),
        shift_mm=(float(rng.normal(0, 9 if portable else 5)), float(-35 * anatomy.scale + rng.normal(0, 10 if portable else 6))),
        rotation_deg=float(rng.normal(0, 2.5 if portable else 1.2)),
        magnification=1.1 if portable else 1.0,
        inspiration_mm=float(rng.normal(-18 if portable else 0, 8)),
    )


@dataclass
class ProjectionRender:
    """The attenuation map of one view and where things are in it (pixel row, col)."""

    attenuation: np.ndarray  # float32 (size, size)
    pixel_mm: float  # detector pixel size (ImagerPixelSpacing)
    landmarks_px: dict[str, list[float]] = field(default_factory=dict)
    device_tips_px: dict[str, list[float]] = field(default_factory=dict)


# --- geometry helpers --------------------------------------------------------------------------------

class _Frame:
    """Patient mm <-> detector pixels for one pose."""

    def __init__(self, pose: ViewPose, size: int, supersample: int = 2):
        self.size, self.ss = size, supersample
        self.px = pose.fov_mm / size
        t = math.radians(pose.rotation_deg)
        self.cos, self.sin = math.cos(t), math.sin(t)
        self.mag, self.shift = pose.magnification, pose.shift_mm

    def grid(self) -> tuple[np.ndarray, np.ndarray]:
        """Patient (x, y) in mm at every pixel centre."""
        c = (np.arange(self.size, dtype=np.float32) + 0.5 - self.size / 2) * self.px
        u, v = np.meshgrid(c, c)  # detector mm (u right, v down)
        u, v = u - self.shift[0], v - self.shift[1]
        x = (self.cos * u + self.sin * v) / self.mag
        y = (-self.sin * u + self.cos * v) / self.mag
        return x.astype(np.float32), y.astype(np.float32)

    def to_px(self, x: float, y: float) -> tuple[float, float]:
        """(row, col) of a patient point (continuous, pixel centres at .5)."""
        x, y = x * self.mag, y * self.mag
        u = self.cos * x - self.sin * y + self.shift[0]
        v = self.sin * x + self.cos * y + self.shift[1]
        return v / self.px + self.size / 2, u / self.px + self.size / 2


class _Canvas:
    """A supersampled float canvas for drawing thin structures in patient mm."""

    def __init__(self, frame: _Frame):
        self.frame = frame
        n = frame.size * frame.ss
        self.img = Image.new("F", (n, n), 0.0)
        self.draw = ImageDraw.Draw(self.img)

    def _xy(self, pts) -> list[tuple[float, float]]:
        out = []
        for x, y in pts:
            r, c = self.frame.to_px(x, y)
            out.append((c * self.frame.ss, r * self.frame.ss))
        return out

    def _w(self, width_mm: float) -> int:
        return max(1, int(round(width_mm * self.frame.mag / self.frame.px * self.frame.ss)))

    def line(self, pts, width_mm: float, value: float = 1.0) -> None:
        xy = self._xy(pts)
        self.draw.line(xy, fill=value, width=self._w(width_mm), joint="curve")

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, value: float = 1.0, outline_mm: float | None = None) -> None:
        (c0, r0), (c1, r1) = self._xy([(cx - rx, cy - ry), (cx + rx, cy + ry)])
        box = [min(c0, c1), min(r0, r1), max(c0, c1), max(r0, r1)]
        if outline_mm is None:
            self.draw.ellipse(box, fill=value)
        else:
            self.draw.ellipse(box, outline=value, width=self._w(outline_mm))

    def polygon(self, pts, value: float = 1.0) -> None:
        self.draw.polygon(self._xy(pts), fill=value)

    def array(self) -> np.ndarray:
        a = np.asarray(self.img, dtype=np.float32)
        ss = self.frame.ss
        n = self.frame.size
        return a.reshape(n, ss, n, ss).mean(axis=(1, 3))


def _smooth_step(d: np.ndarray, width: float) -> np.ndarray:
    return np.clip(0.5 + d / max(width, 1e-6), 0.0, 1.0)


def _blur(a: np.ndarray, sigma_mm: float, px: float) -> np.ndarray:
    return ndimage.gaussian_filter(a, sigma_mm / px, truncate=3.0)


def _spline(points: list[tuple[float, float]], n: int = 40) -> list[tuple[float, float]]:
    """A smooth curve through control points (Catmull-Rom)."""
    p = np.asarray(points, dtype=np.float64)
    if len(p) < 3:
        return [tuple(v) for v in p]
    p = np.vstack([p[0], p, p[-1]])
    out = []
    for i in range(1, len(p) - 2):
        p0, p1, p2, p3 = p[i - 1], p[i], p[i + 1], p[i + 2]
        for t in np.linspace(0, 1, max(2, n // (len(p) - 3)), endpoint=False):
            t2, t3 = t * t, t * t * t
            out.append(tuple(0.5 * ((2 * p1) + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t2
                                    + (-p0 + 3 * p1 - 3 * p2 + p3) * t3)))
    out.append(tuple(p[-2]))
    return out


# --- frontal view ------------------------------------------------------------------------------------

@dataclass
class _Thorax:
    """Derived frontal geometry of one image (findings change some of it)."""

    W: float
    apex: float
    dome: dict[int, float]  # side (-1 right, +1 left) -> dome y
    curvature: dict[int, float]
    heart: tuple[float, float, float, float]  # cx, cy, half-width, half-height
    lung_depth: float
    spine_amp: float


def _thorax(an: CxrAnatomy, pose: ViewPose, f: dict) -> _Thorax:
    s, W = an.scale, an.chest_half_width_mm
    dome = {-1: an.dome_right_mm + pose.inspiration_mm, 1: an.dome_left_mm + pose.inspiration_mm}
    cp_drop = 32.0 * s
    lung_depth = 150.0 * s
    ha, hb = an.heart_half_width_mm, an.heart_half_height_mm
    if "hyperinflation" in f:
        for k in dome:
            dome[k] += 32.0 * s
        cp_drop *= 0.35
        W *= 1.04
        lung_depth *= 1.15
        ha *= 0.88
    if "diaphragm elevation" in f:
        side = f["diaphragm elevation"].get("side", "right")
        dome[-1 if side == "right" else 1] -= 45.0 * s
    if "cardiomegaly" in f:
        grow = {"mild": 1.28, "moderate": 1.42, "severe": 1.58}.get(f["cardiomegaly"].get("severity", "moderate"), 1.42)
        ha *= grow
        hb *= 1.0 + (grow - 1) * 0.45
    ha *= pose.magnification ** 1.5  # AP: the heart sits far from the detector
    cx = an.heart_center_x_mm + (ha - an.heart_half_width_mm) * 0.45
    cy = dome[1] - 0.82 * hb
    curvature = {k: cp_drop / (0.5 * W) ** 2 for k in dome}
    amp = float(f.get("osseous abnormalities", {}).get("scoliosis_mm", 0.0))
    return _Thorax(W=W, apex=an.apex_mm, dome=dome, curvature=curvature, heart=(cx, cy, ha, hb),
                   lung_depth=lung_depth, spine_amp=amp)


def _diaphragm(t: _Thorax, x: np.ndarray) -> np.ndarray:
    side = np.where(x < 0, -1, 1)
    dome = np.where(side < 0, t.dome[-1], t.dome[1])
    curv = np.where(side < 0, t.curvature[-1], t.curvature[1])
    return dome + curv * np.maximum(np.abs(x) - 0.42 * t.W, 0) ** 2 + 0.0008 * np.maximum(0.3 * t.W - np.abs(x), 0) ** 2


def _spine_x(t: _Thorax, y):
    return t.spine_amp * np.sin(np.pi * (np.asarray(y) - t.apex + 40) / 330.0)


def _lung_masks(t: _Thorax, an: CxrAnatomy, x: np.ndarray, y: np.ndarray, px: float):
    """Soft masks (0..1) of each hemithorax's lung field, before the heart is cut out."""
    s = an.scale
    y0 = 20.0 * s
    masks = {}
    for side in (-1, 1):
        xc = side * 0.36 * t.W
        a = 0.64 * t.W
        h = y0 - t.apex
        frac = np.clip(1.0 - ((y - y0) / h) ** 2, 0.0, 1.0)
        half = np.where(y < y0, a * np.sqrt(frac), a + 0.06 * (y - y0))
        lateral = half - np.abs(x - xc)  # > 0 inside the lateral / apical border
        medial_border = 22.0 * s + (13.0 * s * np.exp(-((y + 45.0 * s) / (18.0 * s)) ** 2) if side > 0 else 6.0 * s)
        medial = side * (x - _spine_x(t, y)) - medial_border
        below = _diaphragm(t, x) - y
        d = np.minimum(np.minimum(lateral, medial), below)
        inside = (side * x > 0) & (y > t.apex - 5)
        masks[side] = _smooth_step(d, 3.0 * px) * inside
    return masks


def _heart_mask(t: _Thorax, x, y, px):
    """The cardiac silhouette: an ellipse tilted with its apex down and to the patient's left, plus the
    right atrial border bulging to the right."""
    cx, cy, ha, hb = t.heart
    tilt = math.radians(28)
    u = (x - cx) * math.cos(tilt) - (y - cy) * math.sin(tilt)
    v = (x - cx) * math.sin(tilt) + (y - cy) * math.cos(tilt)
    body = 1.0 - np.sqrt((u / ha) ** 2 + (v / (0.82 * hb)) ** 2)
    atrium = 1.0 - np.sqrt(((x - (cx - 0.62 * ha)) / (0.5 * ha)) ** 2 + ((y - (cy - 0.05 * hb)) / (0.75 * hb)) ** 2)
    return _smooth_step(np.maximum(body, atrium) * min(ha, hb), 2.0 * px)


def _vessel_tree(canvas: _Canvas, an: CxrAnatomy, t: _Thorax, f: dict, rng: np.random.Generator) -> None:
    """Pulmonary vessels fanning out from each hilum, tapering towards the periphery."""
    s = an.scale
    congested = "vascular congestion" in f
    big_pa = "enlarged pulmonary artery" in f
    for side in (-1, 1):
        hx, hy = side * 46.0 * s, 22.0 * s
        for k in range(11):
            ang = math.radians(-120 + k * 21 + rng.normal(0, 8))
            ang = ang if side > 0 else math.pi - ang
            upper = math.sin(ang) < -0.2
            width = 5.0 * s * (1.6 if congested and upper else 1.0) * (1.35 if big_pa else 1.0) * rng.uniform(0.7, 1.2)
            _branch(canvas, hx + rng.normal(0, 5), hy + rng.normal(0, 8), ang, 30.0 * s * rng.uniform(0.8, 1.3),
                    width, 4, rng)


def _branch(canvas: _Canvas, x, y, ang, length, width, depth, rng) -> None:
    mid = ang + rng.normal(0, 0.15)
    x1, y1 = x + 0.5 * length * math.cos(mid), y + 0.5 * length * math.sin(mid)
    x2, y2 = x1 + 0.5 * length * math.cos(ang), y1 + 0.5 * length * math.sin(ang)
    canvas.line([(x, y), (x1, y1), (x2, y2)], width, 1.0)
    if depth > 0 and width > 0.8:
        for turn in (-1, 1):
            if rng.random() < 0.85:
                _branch(canvas, x2, y2, ang + turn * math.radians(rng.uniform(12, 35)),
                        length * rng.uniform(0.6, 0.85), width * 0.7, depth - 1, rng)


def _ribs(canvas: _Canvas, inner: _Canvas, an: CxrAnatomy, t: _Thorax, f: dict) -> None:
    s = an.scale
    frac = f.get("rib fracture")
    for side in (-1, 1):
        for k in range(1, 11):
            y_k = t.apex - 6.0 * s + (k - 1) * an.rib_spacing_mm
            sx = float(_spine_x(t, y_k))
            pts = [(sx + side * (16.0 * s + (t.W + 6.0 * s) * i / 16),
                    y_k - 9.0 * s * math.sin(math.pi * i / 16 * 0.9) + 14.0 * s * (i / 16) ** 3) for i in range(17)]
            ant = _spline([pts[-1], (side * (t.W * 0.9), y_k + 34.0 * s), (side * 0.55 * t.W, y_k + 62.0 * s),
                           (side * 0.3 * t.W, y_k + 78.0 * s)], 16)
            broken = frac is not None and frac.get("rib") == k and (frac.get("side") == "right") == (side < 0)
            if broken:
                cut = 11
                gap, step = 2.0 * s, 4.0 * s
                near, far = pts[:cut], [(xx, yy + step) for xx, yy in pts[cut:]]
                far[0] = (far[0][0] + side * gap, far[0][1])
                for seg in (near, far):
                    canvas.line(seg, 9.0 * s, 1.0)
                    inner.line(seg, 5.0 * s, 1.0)
                if frac.get("healing"):
                    canvas.ellipse(pts[cut][0], pts[cut][1] + step / 2, 7.0 * s, 6.0 * s, 0.6)
            else:
                canvas.line(pts, 9.0 * s, 1.0)
                inner.line(pts, 5.0 * s, 1.0)
            canvas.line(ant, 6.5 * s, 0.45)


def _frontal(an: CxrAnatomy, pose: ViewPose, size: int, f: dict, devices: dict, rng: np.random.Generator
             ) -> ProjectionRender:
    frame = _Frame(pose, size)
    px = frame.px
    x, y = frame.grid()
    s = an.scale
    t = _thorax(an, pose, f)
    W = t.W

    # body soft tissue: chest, shoulders and arms at the top, neck, abdomen below the diaphragm
    chest_half = W + 20.0 * s
    neck_half = 58.0 * s
    shoulder = np.clip((y - (t.apex - 70.0 * s)) / (60.0 * s), 0, 1)
    half_width = neck_half + (chest_half + 35.0 * s - neck_half) * shoulder - 35.0 * s * np.clip((y - t.apex) / (120 * s), 0, 1)
    half_width = np.maximum(half_width, neck_half)
    depth = an.body_depth_mm * np.where(y < t.apex - 40 * s, 0.62, 1.0)
    body = 2 * depth * np.sqrt(np.clip(1 - (x / half_width) ** 2, 0, 1))
    body = _blur(body.astype(np.float32), 4.0, px)
    if an.breasts:
        for side in (-1, 1):
            r = np.sqrt(((x - side * 0.62 * W) / (58 * s)) ** 2 + ((y - (t.dome[side] - 25 * s)) / (48 * s)) ** 2)
            body += 38.0 * s * np.clip(1 - r, 0, 1) ** 0.5 * (y > t.dome[side] - 65 * s)
    att = MU_SOFT * body

    # lungs and the heart between them
    lungs = _lung_masks(t, an, x, y, px)
    heart = _heart_mask(t, x, y, px)
    lung_field = np.clip(lungs[-1] + lungs[1], 0, 1)
    aerated = lung_field * (1 - 0.7 * heart)
    fluid = np.zeros_like(att)
    if "pleural effusion" in f or "costophrenic angle blunting" in f:
        fluid = _pleural_fluid(t, an, x, y, px, f, lungs)
        aerated *= 1 - 0.85 * fluid
    ptx = np.zeros_like(att)
    if "pneumothorax" in f:
        ptx, pleural_line = _pneumothorax(t, an, x, y, px, f["pneumothorax"], lungs)
        att += MU_SOFT * 6.0 * pleural_line
    depth_map = _blur(aerated, 14.0, px) ** 0.7 * lung_field
    att -= MU_SOFT * LUNG_AIR_FRACTION * t.lung_depth * depth_map * (1 + 0.25 * ptx)
    att += MU_SOFT * 30.0 * heart  # the heart is thicker than the mediastinum around it

    # mediastinum, aortic knob, trachea and main bronchi
    knob = (28.0 * s, -45.0 * s, 16.0 * s)
    med = np.clip(1 - np.abs(x - 2 * s) / (26.0 * s), 0, 1) ** 0.3 * (y < t.heart[1]) * (y > t.apex - 80 * s)
    att += MU_SOFT * 25.0 * _blur(med.astype(np.float32), 3.0, px)
    knob_r = np.sqrt((x - knob[0]) ** 2 + (y - knob[1]) ** 2) / knob[2]
    att += MU_SOFT * 30.0 * np.clip(1 - knob_r, 0, 1) ** 0.5
    airway = _Canvas(frame)
    airway.line([(0.0, t.apex - 140 * s), (0.0, 0.0)], 16.0 * s)
    airway.line([(0.0, 0.0), (-38.0 * s, 24.0 * s)], 11.0 * s)
    airway.line([(0.0, 0.0), (42.0 * s, 34.0 * s)], 10.0 * s)
    att -= MU_SOFT * 14.0 * _blur(airway.array(), 1.5, px)

    # pulmonary vessels (only seen inside aerated lung; none in a pneumothorax)
    vessels = _Canvas(frame)
    _vessel_tree(vessels, an, t, f, np.random.default_rng(an.vessel_seed))
    vmap = _blur(vessels.array(), 1.0, px) * lung_field * (1 - ptx)
    if "pulmonary edema" in f:
        vmap = _blur(vmap, 2.5, px)
    att += MU_SOFT * 9.0 * vmap

    # bones: spine, ribs, clavicles, scapulae (AP), humeral heads
    spine = _Canvas(frame)
    ys = np.linspace(t.apex - 150 * s, t.dome[1] + 120 * s, 24)
    spine.line([(float(_spine_x(t, yy)), float(yy)) for yy in ys], 34.0 * s)
    vert = np.clip(np.cos((y - t.apex) * 2 * np.pi / (26.0 * s)) * 0.2 + 0.8, 0, 1)
    att += MU_BONE * 9.0 * _blur(spine.array(), 1.5, px) * vert
    ribs, rib_inner = _Canvas(frame), _Canvas(frame)
    _ribs(ribs, rib_inner, an, t, f)
    att += MU_BONE * 9.0 * _blur(ribs.array() - 0.55 * rib_inner.array(), 0.6, px)
    bones = _Canvas(frame)
    clav_y = t.apex - (2 if pose.view == "AP" else 10) * s
    for side in (-1, 1):
        bones.line(_spline([(side * 20 * s, clav_y + 8 * s), (side * 60 * s, clav_y - 2 * s),
                            (side * 110 * s, clav_y - 6 * s), (side * (W + 40 * s), clav_y - 24 * s)], 20), 12.0 * s)
        bones.ellipse(side * (W + 48 * s), t.apex - 30 * s, 27 * s, 27 * s)
        if pose.view == "AP":
            bones.polygon([(side * (W - 10 * s), t.apex - 20 * s), (side * (W + 30 * s), t.apex - 5 * s),
                           (side * (W - 25 * s), t.apex + 120 * s)], 0.5)
    att += MU_BONE * 14.0 * _blur(bones.array(), 1.0, px)

    # abdomen: gastric air bubble under the left hemidiaphragm
    bubble = np.sqrt(((x - 0.45 * W) / (26 * s)) ** 2 + ((y - (t.dome[1] + 30 * s)) / (17 * s)) ** 2)
    att -= MU_SOFT * 30.0 * np.clip(1 - bubble, 0, 1) ** 0.5 * (y > t.dome[1] + 14 * s)

    att += _findings(frame, an, t, x, y, px, f, lungs, lung_field, rng)
    att += MU_SOFT * 25.0 * fluid * lung_field
    render = ProjectionRender(attenuation=att.astype(np.float32), pixel_mm=px)
    render.landmarks_px = {
        "right_lung": list(frame.to_px(-0.55 * W, -25.0 * s)), "left_lung": list(frame.to_px(0.58 * W, -25.0 * s)),
        "mediastinum": list(frame.to_px(float(_spine_x(t, -25.0 * s)), -25.0 * s)),
        "carina": list(frame.to_px(0.0, 0.0)),
    }
    if devices:
        dev = _Canvas(frame)
        stripes = _Canvas(frame)
        render.device_tips_px = _draw_devices(dev, stripes, frame, an, t, devices)
        att += MU_SOFT * 6.0 * _blur(dev.array(), 0.5, px) + MU_METAL * 3.0 * stripes.array()
        render.attenuation = att.astype(np.float32)
    return render


def _pleural_fluid(t, an, x, y, px, f, lungs) -> np.ndarray:
    """Fluid layering at the lung base with a meniscus (higher laterally); blunts the costophrenic angle."""
    s = an.scale
    out = np.zeros_like(x)
    sides = {}
    if "pleural effusion" in f:
        eff = f["pleural effusion"]
        height = {"small": 30.0, "moderate": 70.0, "large": 120.0}.get(eff.get("severity", "small"), 30.0) * s
        for name in (("right", "left") if eff.get("side") == "bilateral" else (eff.get("side", "right"),)):
            sides[-1 if name == "right" else 1] = height
    if "costophrenic angle blunting" in f:
        name = f["costophrenic angle blunting"].get("side", "right")
        for key in ((-1, 1) if name == "bilateral" else ((-1 if name == "right" else 1),)):
            sides.setdefault(key, 14.0 * s)
    for side, height in sides.items():
        cp = t.dome[side] + t.curvature[side] * (0.58 * t.W) ** 2
        lateral = np.clip((side * x - 0.2 * t.W) / (0.8 * t.W), 0, 1)
        top = cp - height - 22.0 * s * lateral ** 2 + (1 - lateral) * 0.3 * height
        fl = _smooth_step(y - top, 6.0 * s) * (side * x > 0) * (lungs[side] > 0.02)
        out = np.maximum(out, fl)
    return _blur(out.astype(np.float32), 2.0, px)


def _pneumothorax(t, an, x, y, px, d, lungs):
    """Apical and lateral air without lung markings, bounded by a thin visceral pleural line."""
    side = -1 if d.get("side", "right") == "right" else 1
    width = {"small": 14.0, "moderate": 30.0, "large": 55.0}.get(d.get("size", "small"), 14.0) * an.scale
    inside = lungs[side] > 0.5
    dist = ndimage.distance_transform_edt(inside) * px
    upper = np.clip((t.dome[side] - 40 * an.scale - y) / (60 * an.scale), 0, 1)
    region = (inside & (dist < width)).astype(np.float32) * upper
    line = (np.abs(dist - width) < 0.9 * px) * (upper > 0.5) * inside
    return _blur(region, 1.0, px), line.astype(np.float32)


def _findings(frame, an, t, x, y, px, f, lungs, lung_field, rng) -> np.ndarray:
    """Everything else that the findings add (or remove) inside the chest."""
    s, W = an.scale, t.W
    add = np.zeros_like(x)
    if "opacity" in f:
        d = f["opacity"]
        zx, zy = ZONES[d.get("lobe", "right lower lobe")]
        cx, cy = zx * W, zy * s
        size = float(d.get("size_mm", 45.0))
        blob = np.zeros_like(x)
        n = 1 if d.get("kind") == "nodule" else 4
        for _ in range(n):
            ox, oy = (rng.normal(0, size * 0.25, 2) if n > 1 else (0.0, 0.0))
            r = np.sqrt(((x - cx - ox) / (size * 0.5)) ** 2 + ((y - cy - oy) / (size * 0.42)) ** 2)
            blob = np.maximum(blob, np.clip(1 - r, 0, 1) ** (0.3 if d.get("kind") == "nodule" else 0.7))
        add += MU_SOFT * (70.0 if d.get("kind") != "nodule" else 45.0) * blob * np.clip(lung_field * 1.5, 0, 1)
    if "atelectasis" in f:
        d = f["atelectasis"]
        canvas = _Canvas(frame)
        for side in ((-1, 1) if d.get("side") == "bilateral" else ((-1 if d.get("side") == "right" else 1),)):
            yb = t.dome[side] - 28 * s
            canvas.line([(side * 0.25 * W, yb + 6 * s), (side * 0.75 * W, yb - 8 * s)], 5.0 * s)
        add += MU_SOFT * 40.0 * _blur(canvas.array(), 1.5, px) * lung_field
    if "pulmonary edema" in f:
        sev = {"mild": 0.6, "moderate": 1.0, "severe": 1.5}.get(f["pulmonary edema"].get("severity", "moderate"), 1.0)
        haze = sum(np.exp(-(((x - side * 45 * s) / (55 * s)) ** 2 + ((y - 25 * s) / (70 * s)) ** 2)) for side in (-1, 1))
        canvas = _Canvas(frame)
        for side in (-1, 1):
            for k in range(5):
                yk = t.dome[side] - 15 * s - k * 9 * s
                canvas.line([(side * (W - 2 * s), yk), (side * (W - 18 * s), yk)], 1.4 * s)
        add += MU_SOFT * (42.0 * sev * haze + 20.0 * canvas.array()) * lung_field
    if "interstitial lung disease pattern" in f:
        noise = rng.standard_normal(x.shape).astype(np.float32)
        band = _blur(noise, 2.2, px) - _blur(noise, 5.0, px)
        net = np.clip(band / (band.std() + 1e-6), 0, None)
        lower = np.clip((y - 0.0) / (90 * s), 0, 1) * np.clip((np.abs(x) - 35 * s) / (40 * s), 0, 1)
        add += MU_SOFT * 14.0 * net * lower * lung_field
    if "bronchial wall thickening" in f:
        canvas = _Canvas(frame)
        for _ in range(14):
            side = rng.choice([-1, 1])
            cx, cy = side * rng.uniform(45, 85) * s, rng.uniform(-25, 60) * s
            canvas.ellipse(float(cx), float(cy), 3.5 * s, 3.5 * s, 1.0, outline_mm=1.6 * s)
        add += MU_SOFT * 30.0 * canvas.array() * lung_field
    if "adenopathy" in f:
        for cx, cy, r in ((-52 * s, 15 * s, 17 * s), (52 * s, 20 * s, 15 * s), (-24 * s, -42 * s, 13 * s)):
            rr = np.sqrt((x - cx) ** 2 + (y - cy) ** 2) / r
            add += MU_SOFT * 45.0 * np.clip(1 - rr, 0, 1) ** 0.4
    if "enlarged pulmonary artery" in f:
        rr = np.sqrt(((x - 44 * s) / (22 * s)) ** 2 + ((y - 8 * s) / (18 * s)) ** 2)
        add += MU_SOFT * 50.0 * np.clip(1 - rr, 0, 1) ** 0.4
    if "arterial calcification" in f:
        canvas = _Canvas(frame)
        cx, cy, r = 28.0 * s, -45.0 * s, 15.0 * s
        arc = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in np.linspace(math.radians(-160), math.radians(20), 16)]
        canvas.line(arc, 1.6 * s)
        add += MU_BONE * 18.0 * canvas.array()
    if "hernia" in f:
        cx, cy, r = 8.0 * s, t.dome[1] - 45.0 * s, 30.0 * s
        rr = np.sqrt((x - cx) ** 2 + (y - cy) ** 2) / r
        disc = np.clip(1 - rr, 0, 1) ** 0.4
        add += MU_SOFT * 25.0 * disc * (y >= cy) - MU_SOFT * 35.0 * disc * (y < cy)
    if "subcutaneous air/emphysema" in f:
        side = -1 if f["subcutaneous air/emphysema"].get("side", "right") == "right" else 1
        noise = _blur(rng.standard_normal(x.shape).astype(np.float32), 1.2, px)
        streaks = np.clip(noise / (noise.std() + 1e-6) - 0.6, 0, None)
        wall = (side * x > W + 2 * s) & (side * x < W + 28 * s) & (y > t.apex - 60 * s) & (y < t.dome[side])
        add -= MU_SOFT * 22.0 * streaks * wall
    return add.astype(np.float32)


# --- lines and tubes ---------------------------------------------------------------------------------

def _caj(t: _Thorax, s: float) -> tuple[float, float]:
    """Cavoatrial junction: where the superior vena cava meets the right atrium."""
    cx, cy, ha, hb = t.heart
    return cx - ha + 14 * s, cy - 0.55 * hb


def _device_path(name: str, d: dict, an: CxrAnatomy, t: _Thorax) -> tuple[list, float, bool]:
    """(points in patient mm ending at the tip, tube width in mm, whether it has a radio-opaque stripe only)."""
    s, W = an.scale, t.W
    bad = d.get("placement") == "malpositioned"
    how = d.get("malposition", "")
    top = t.apex - 160 * s
    caj = _caj(t, s)
    svc_x = caj[0] + 4 * s
    if name == "endotracheal tube":
        if bad and how == "right mainstem":
            return [(0, top), (0, 0), (-22 * s, 16 * s)], 8.0, True
        tip = -d.get("tip_above_carina_cm", 4.0) * 10 * s
        return [(0, top), (0, tip)], 8.0, True
    if name == "tracheostomy tube":
        tip = -8.0 * s if bad else t.apex - 10 * s
        return [(0, t.apex - 75 * s), (0, tip)], 9.0, True
    if name == "nasogastric tube":
        eso = [(3 * s, top), (6 * s, -60 * s), (10 * s, 60 * s), (18 * s, t.dome[1] - 15 * s)]
        if bad and how == "distal esophagus":
            return _spline(eso), 4.0, True
        if bad and how == "coiled in the esophagus":
            loop = [(6 * s + 10 * s * math.cos(a), -70 * s + 12 * s * math.sin(a)) for a in np.linspace(0, 4 * math.pi, 30)]
            return [(3 * s, top), (6 * s, -70 * s)] + loop, 4.0, True
        if bad and how == "right lower lobe":
            return _spline([(0, top), (0, 0), (-38 * s, 30 * s), (-0.5 * W, t.dome[-1] - 30 * s)]), 4.0, True
        return _spline(eso + [(30 * s, t.dome[1] + 12 * s), (0.42 * W, t.dome[1] + 32 * s), (0.55 * W, t.dome[1] + 40 * s)]), 4.0, True
    if name == "internal jugular central venous catheter":
        side = -1 if d.get("side", "right") == "right" else 1
        neck = [(side * 45 * s, top), (side * 38 * s, t.apex - 25 * s)]
        if bad and how == "into the subclavian":
            return _spline(neck + [(side * 60 * s, t.apex - 12 * s), (side * 110 * s, t.apex - 18 * s)]), 2.2, False
        path = neck + [(svc_x, -60 * s), (svc_x, caj[1])]
        if bad and how == "right ventricle":
            path.append((t.heart[0] - 0.1 * t.heart[2], t.heart[1] + 0.4 * t.heart[3]))
        return _spline(path), 2.2, False
    if name == "peripherally inserted central catheter":
        side = -1 if d.get("side", "right") == "right" else 1
        arm = [(side * (W + 90 * s), t.apex + 15 * s), (side * (W + 10 * s), t.apex - 5 * s),
               (side * 70 * s, t.apex - 12 * s), (side * 38 * s, t.apex - 25 * s)]
        if bad and how == "into the internal jugular":
            return _spline(arm + [(side * 44 * s, top + 20 * s)]), 1.8, False
        end = (t.heart[0] - 0.2 * t.heart[2], t.heart[1]) if bad else caj
        return _spline(arm + [(svc_x, -60 * s), end]), 1.8, False
    if name == "subclavian central venous catheter or port":
        side = -1 if d.get("side", "right") == "right" else 1
        start = [(side * 0.6 * W, t.apex + 20 * s), (side * 55 * s, t.apex - 15 * s), (side * 36 * s, t.apex - 24 * s)]
        if bad:
            return _spline(start + [(side * 44 * s, top + 20 * s)]), 2.2, False
        return _spline(start + [(svc_x, -60 * s), caj]), 2.2, False
    if name == "swan-ganz catheter":
        cx, cy, ha, hb = t.heart
        path = [(-45 * s, top), (-38 * s, t.apex - 25 * s), (svc_x, -60 * s), (svc_x - 4 * s, cy - 0.1 * hb),
                (cx - 0.2 * ha, cy + 0.45 * hb), (cx + 0.35 * ha, cy + 0.1 * hb), (28 * s, 12 * s), (-8 * s, 6 * s)]
        tip = (-0.55 * W, 70 * s) if bad else (-30 * s, 12 * s)
        return _spline(path + [tip]), 2.6, False
    if name == "chest tube":
        side = -1 if d.get("side", "right") == "right" else 1
        entry = (side * (W + 40 * s), t.dome[side] - 40 * s)
        if bad:
            return [entry, (side * (W + 14 * s), t.dome[side] - 70 * s), (side * (W + 10 * s), -10 * s)], 9.0, True
        return _spline([entry, (side * (W - 2 * s), t.dome[side] - 50 * s), (side * 0.72 * W, -40 * s),
                        (side * 0.5 * W, t.apex + 25 * s)]), 9.0, True
    if name == "mediastinal drain":
        base = (6 * s, t.dome[1] + 80 * s)
        if bad:
            return [base, (8 * s, t.heart[1]), (26 * s, t.heart[1] - 10 * s), (10 * s, t.heart[1] - 30 * s)], 8.0, True
        return [base, (6 * s, t.heart[1]), (2 * s, 10 * s)], 8.0, True
    if name == "intra-aortic balloon pump":
        tip_y = {"too low": 70 * s, "in the aortic arch": -62 * s}.get(how, -32 * s) if bad else -32 * s
        x_ao = 20 * s
        return [(x_ao, t.dome[1] + 160 * s), (x_ao, tip_y)], 2.5, False
    raise KeyError(name)


def _draw_devices(body: _Canvas, stripes: _Canvas, frame: _Frame, an: CxrAnatomy, t: _Thorax,
                  devices: dict) -> dict[str, list[float]]:
    tips = {}
    s = an.scale
    for name, d in sorted(devices.items()):
        pts, width, striped = _device_path(name, d, an, t)
        if striped:
            body.line(pts, width * s, 1.0)
            stripes.line(pts, 1.2 * s, 1.0)
        else:
            stripes.line(pts, width * s * 0.6, 1.0)
        if name == "subclavian central venous catheter or port" and d.get("port"):
            stripes.ellipse(pts[0][0], pts[0][1], 13 * s, 11 * s, 1.0, outline_mm=3.0 * s)
        if name == "tracheostomy tube":
            stripes.line([(-30 * s, pts[0][1]), (30 * s, pts[0][1])], 3.0 * s, 1.0)
        if name == "intra-aortic balloon pump":
            stripes.ellipse(pts[-1][0], pts[-1][1], 2.5 * s, 4.0 * s, 1.5)
            body.line([(pts[-1][0], pts[-1][1] + 10 * s), (pts[-1][0], pts[-1][1] + 200 * s)], 12 * s, -1.5)
        tips[name] = [round(v, 2) for v in frame.to_px(*pts[-1])]
    return tips


# --- lateral view ------------------------------------------------------------------------------------

def _lateral(an: CxrAnatomy, pose: ViewPose, size: int, f: dict, devices: dict, rng: np.random.Generator
             ) -> ProjectionRender:
    """Left lateral: anterior to the image left, x here runs antero-posterior (0 at mid-depth)."""
    frame = _Frame(pose, size)
    px = frame.px
    x, y = frame.grid()
    s = an.scale
    t = _thorax(an, pose, f)
    D = an.body_depth_mm * (1.12 if "hyperinflation" in f else 1.0)
    width_lr = 2 * (t.W + 20 * s) * np.clip(0.55 + 0.45 * (y - t.apex + 100 * s) / (150 * s), 0.55, 1.0)
    neck = y < t.apex - 30 * s
    depth = np.where(neck, 0.6 * D, D + 8 * s)
    body = width_lr * np.sqrt(np.clip(1 - ((x - np.where(neck, 0.2 * D, 0)) / depth) ** 2, 0, 1))
    att = MU_SOFT * _blur(body.astype(np.float32), 4.0, px)

    dome = min(t.dome.values())
    flat = 0.35 if "hyperinflation" in f else 1.0
    # lung field: a rounded box between sternum and spine, apex on top, domed diaphragm below with the
    # posterior costophrenic sulcus as its lowest point
    cx0, cy0 = 0.02 * D, 0.5 * (t.apex + dome + 40 * s)
    ax, ay = 0.86 * D, 0.5 * (dome + 40 * s - t.apex) + 10 * s
    box = 1.0 - (np.abs((x - cx0) / ax) ** 2.6 + np.abs((y - cy0) / ay) ** 2.6) ** (1 / 2.6)
    diaph = dome + flat * 0.0022 * (x + 0.15 * D) ** 2 + flat * 28 * s * np.clip(x / D, 0, 1) ** 2
    lung = _smooth_step(np.minimum(box * min(ax, ay), diaph - y), 3 * px)
    hr = t.heart[2] / an.heart_half_width_mm
    cx, cy, ha, hb = -0.42 * D + 0.1 * D * (hr - 1), dome - 0.75 * t.heart[3], 0.5 * D * hr, t.heart[3] * 1.05
    heart = _smooth_step((1 - np.sqrt(((x - cx) / ha) ** 2 + ((y - cy) / hb) ** 2)) * min(ha, hb), 2 * px)
    fluid = np.zeros_like(x)
    if "pleural effusion" in f or "costophrenic angle blunting" in f:
        eff = f.get("pleural effusion", {"severity": "small"})
        height = {"small": 30.0, "moderate": 70.0, "large": 120.0}.get(eff.get("severity", "small"), 30.0) * s
        if "pleural effusion" not in f:
            height = 14.0 * s
        cp = dome + flat * 0.0022 * (0.95 * D) ** 2 + flat * 28 * s
        meniscus = cp - height - 20 * s * np.clip((x - 0.3 * D) / (0.7 * D), 0, 1) ** 2
        fluid = (_smooth_step(y - meniscus, 2 * px) * (x > 0.1 * D) * (lung > 0.02)).astype(np.float32)
    aerated = lung * (1 - 0.6 * heart) * (1 - 0.85 * fluid)
    att -= MU_SOFT * LUNG_AIR_FRACTION * 2 * t.lung_depth * 0.9 * _blur(aerated.astype(np.float32), 14, px) ** 0.7 * lung
    att += MU_SOFT * 30 * heart + MU_SOFT * 25 * fluid * lung

    bones = _Canvas(frame)
    spine_x = D - 52 * s
    bones.line([(spine_x, t.apex - 140 * s), (spine_x + 6 * s, dome + 150 * s)], 36 * s)
    bones.line([(-D + 6 * s, t.apex - 20 * s), (-D + 10 * s, t.heart[1] + 30 * s)], 9 * s, 0.8)
    att += MU_BONE * 20 * _blur(bones.array(), 1.2, px)
    airway = _Canvas(frame)
    airway.line([(-12 * s, t.apex - 140 * s), (0.0, 0.0), (8 * s, 25 * s)], 15 * s)
    att -= MU_SOFT * 12 * _blur(airway.array(), 1.5, px)
    vessels = _Canvas(frame)
    _vessel_tree(vessels, an, t, f, np.random.default_rng(an.vessel_seed + 1))
    att += MU_SOFT * 7 * _blur(vessels.array(), 1.0, px) * lung

    if "opacity" in f:
        d = f["opacity"]
        _, zy = ZONES[d.get("lobe", "right lower lobe")]
        size = float(d.get("size_mm", 45.0))
        zx = 0.25 * D if "lower" in d.get("lobe", "") else (-0.35 * D if d.get("lobe") in ("right middle lobe", "lingula") else 0.1 * D)
        rr = np.sqrt(((x - zx) / (0.5 * size)) ** 2 + ((y - zy * s) / (0.42 * size)) ** 2)
        att += MU_SOFT * 60 * np.clip(1 - rr, 0, 1) ** 0.6 * lung
    if "subclavian central venous catheter or port" in devices and devices["subclavian central venous catheter or port"].get("port"):
        dev = _Canvas(frame)
        dev.ellipse(-D + 4 * s, t.apex + 20 * s, 5 * s, 12 * s, 1.0, outline_mm=2.5 * s)
        dev.line([(-D + 4 * s, t.apex + 20 * s), (-20 * s, t.apex - 10 * s), (-25 * s, 40 * s)], 1.4 * s)
        att += MU_METAL * 3 * dev.array()
    render = ProjectionRender(attenuation=att.astype(np.float32), pixel_mm=px)
    render.landmarks_px = {"retrosternal": list(frame.to_px(-0.6 * D, -20 * s)), "spine": list(frame.to_px(spine_x, 40 * s)),
                           "carina": list(frame.to_px(0.0, 0.0))}
    return render


def render_projection(anatomy: CxrAnatomy, pose: ViewPose, size: int, findings: dict[str, dict],
                      devices: dict[str, dict], rng: np.random.Generator) -> ProjectionRender:
    """Attenuation map (size x size) of one view of `anatomy` with `findings` and `devices` planted.

    Frontal views (PA, AP) show every finding and device; the lateral view shows the anatomy, heart size,
    effusions, opacities, hyperinflation and a chest port (other devices are drawn on frontal views only).
    """
    if pose.view == "LL":
        return _lateral(anatomy, pose, size, findings, devices, rng)
    return _frontal(anatomy, pose, size, findings, devices, rng)
