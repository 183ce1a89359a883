"""Burned-in pixel PHI: find text burned into images and blank it, or say the image needs review.

Three sources of regions (`PixelRegion.source`):

- ``"filter"``: rectangles from a CTP DicomPixelAnonymizer-style filter file whose condition
  matches the header (known vendor layouts: ultrasound banners, dose screens).
- ``"detector"``: a cheap text detector for grayscale images (no OCR needed). Burned-in text is
  written at one constant value (usually the top of the range), so the detector looks for a value
  spike in the bright end of the histogram, takes the connected components at that exact value and
  keeps glyph-sized components that line up horizontally into lines of text.
- ``"ocr"``: tesseract word boxes (only when the binary is installed and the policy allows it),
  run on every frame in two renderings (inverted grey, and a high-threshold binarisation for
  light text on coloured banners), upscaled 3x for small fonts. Boxes with >= 2 alphanumeric
  characters at confidence >= 50, or matching a `known_phi` token, are blanked. Only a word of
  >= 3 characters at confidence >= 70 (or a known-PHI match) counts as "text found": tesseract
  also "reads" low-confidence words in anatomy and speckle.

Risk from the header: BurnedInAnnotation == YES, or a risky modality / SOP class (US, SC, OT,
secondary captures incl. multi-frame, ultrasound, documents, "SCREEN SAVE" image types) whose
BurnedInAnnotation is not NO (RSNA CTP's stance: such images carry text unless the header says NO).

Decision table (first matching row wins; filter, detector and OCR regions are always merged):

====================  ==============  =============  ===================  ===============
header risk           filter matched  text found by  OCR ran              status
====================  ==============  =============  ===================  ===============
any                   yes (or series  any            any                  cleaned
                      regions given)
none (e.g. CT/MR)     no              detector/OCR   any                  cleaned
none                  no              nothing        (OCR not run)        untouched
BIA == YES            no              detector/OCR   any                  cleaned
BIA == YES            no              nothing        any                  needs_review
risky class, BIA ""   no              any OCR words  yes                  cleaned (words blanked)
risky class, BIA ""   no              no OCR words   yes                  cleaned (OCR-checked, no regions)
risky class, BIA ""   no              detector only  no                   needs_review
risky class, BIA ""   no              nothing        no                   needs_review
====================  ==============  =============  ===================  ===============

OCR is not run on images without header risk unless the detector fired (it costs ~1 s a frame).
For risky classes the detector alone is not evidence enough: their text comes in any colour and
place. `series_regions` (regions found on sibling images of the same series) count like a
matched filter, so a caller can re-run the slices of a BurnedInAnnotation=YES series on which
nothing was detectable with the regions found on the others.

Cleaned images keep dtype, shape, photometric interpretation (JPEG YCbCr is decoded to RGB, as
any decompression does) and bit depth; they are written uncompressed (Explicit VR Little Endian)
with BurnedInAnnotation NO. Untouched images are returned as given (the same object).
"""

from __future__ import annotations

import copy
import csv
import io
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian

from appliance.errors import ConfigError

DEFAULT_FILTERS_PATH = Path(__file__).parent / "data" / "pixel_filters.txt"

RISKY_MODALITIES = frozenset({"US", "SC", "OT", "XC", "DOC"})
RISKY_SOP_CLASS_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.7",  # secondary capture, incl. multi-frame SC (.7.1 - .7.4)
    "1.2.840.10008.5.1.4.1.1.6.",  # ultrasound
    "1.2.840.10008.5.1.4.1.1.3.1",  # ultrasound multi-frame
    "1.2.840.10008.5.1.4.1.1.104.",  # encapsulated documents
    "1.2.840.10008.5.1.4.1.1.77.1.",  # visible light (photos, scanned documents)
)
RISKY_IMAGE_TYPES = frozenset({"SCREEN SAVE", "SCREEN CAPTURE"})


@dataclass(frozen=True)
class PixelRegion:
    """A rectangle to blank, in pixels (x = column, y = row), half-open; frame None means every frame."""

    frame: int | None
    x0: int
    y0: int
    x1: int
    y1: int
    source: str  # "filter" | "detector" | "ocr" | "series"


@dataclass
class PixelScrubResult:
    """Outcome of `scrub_pixels`; `reason` is one PHI-free line."""

    status: str  # "untouched" | "cleaned" | "needs_review"
    regions: list[PixelRegion]
    reason: str
    dataset: Dataset | None  # untouched: the input; cleaned: a modified copy; needs_review: None
    undecodable: bool = False  # needs_review because the pixels could not even be decoded


# ---------------------------------------------------------------------------------------------
# Filter file: a subset of RSNA CTP's DicomPixelAnonymizer script language.


@dataclass(frozen=True)
class PixelFilter:
    """One filter-file entry: a header condition and the rectangles (x, y, w, h) it blanks."""

    name: str
    condition: str
    rectangles: tuple[tuple[int, int, int, int], ...]
    predicate: Callable[[Dataset], bool] = field(compare=False, repr=False, default=lambda ds: False)

    def matches(self, ds: Dataset) -> bool:
        return bool(self.predicate(ds))


_STRING_METHODS: dict[str, Callable[[str, str], bool]] = {
    "equals": lambda v, a: v == a,
    "equalsignorecase": lambda v, a: v.lower() == a.lower(),
    "contains": lambda v, a: a in v,
    "containsignorecase": lambda v, a: a.lower() in v.lower(),
    "startswith": lambda v, a: v.startswith(a),
    "startswithignorecase": lambda v, a: v.lower().startswith(a.lower()),
    "endswith": lambda v, a: v.endswith(a),
    "endswithignorecase": lambda v, a: v.lower().endswith(a.lower()),
    "matches": lambda v, a: re.fullmatch(a, v) is not None,
}
_TOKEN = re.compile(r"""\s*(?:(?P<str>"(?:[^"\\]|\\.)*")|(?P<tag>\[[0-9A-Fa-f]{4},[0-9A-Fa-f]{4}\])|(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<op>[*+!().]))""")


def _attribute_text(ds: Dataset, tag: int) -> str:
    """An element's value as CTP compares it: multi-values joined with a backslash, '' when absent."""
    elem = ds.get(tag)
    if elem is None or elem.value is None or elem.VR == "SQ":
        return ""
    value = elem.value
    if isinstance(value, (bytes, bytearray)):
        return ""
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


class _ConditionParser:
    """Recursive descent over `expr := term ('+' term)*; term := factor ('*' factor)*`."""

    def __init__(self, text: str):
        self.text = text
        self.tokens: list[tuple[str, str]] = []
        pos = 0
        while pos < len(text):
            if text[pos:].strip() == "":
                break
            m = _TOKEN.match(text, pos)
            if m is None:
                raise ValueError(f"unexpected character at offset {pos}")
            kind = m.lastgroup or ""
            self.tokens.append((kind, m.group(kind)))
            pos = m.end()
        self.i = 0

    def _peek(self) -> tuple[str, str] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def _take(self, value: str | None = None) -> tuple[str, str]:
        tok = self._peek()
        if tok is None or (value is not None and tok[1] != value):
            raise ValueError(f"expected {value or 'a token'} at token {self.i}")
        self.i += 1
        return tok

    def parse(self) -> Callable[[Dataset], bool]:
        pred = self._expr()
        if self._peek() is not None:
            raise ValueError(f"trailing input at token {self.i}")
        return pred

    def _expr(self):
        parts = [self._term()]
        while (tok := self._peek()) is not None and tok[1] == "+":
            self._take("+")
            parts.append(self._term())
        return parts[0] if len(parts) == 1 else (lambda ds, ps=tuple(parts): any(p(ds) for p in ps))

    def _term(self):
        parts = [self._factor()]
        while (tok := self._peek()) is not None and tok[1] == "*":
            self._take("*")
            parts.append(self._factor())
        return parts[0] if len(parts) == 1 else (lambda ds, ps=tuple(parts): all(p(ds) for p in ps))

    def _factor(self):
        kind, value = self._take()
        if value == "!":
            inner = self._factor()
            return lambda ds: not inner(ds)
        if value == "(":
            inner = self._expr()
            self._take(")")
            return inner
        if kind == "name" and value.lower() == "true":
            return lambda ds: True
        if kind == "name" and value.lower() == "false":
            return lambda ds: False
        if kind == "tag":
            group, elem = value[1:-1].split(",")
            tag = int(group + elem, 16)
        elif kind == "name":
            try:
                tag = int(Tag(value))
            except Exception as exc:
                raise ValueError(f"unknown attribute keyword {value!r}") from exc
        else:
            raise ValueError(f"unexpected {value!r}")
        self._take(".")
        _, method = self._take()
        self._take("(")
        arg = None
        if (tok := self._peek()) is not None and tok[0] == "str":
            arg = self._take()[1][1:-1].replace('\\"', '"')
        self._take(")")
        name = method.lower()
        if name in ("isblank", "isempty"):
            return lambda ds: _attribute_text(ds, tag) == ""
        if name == "exists":
            return lambda ds: tag in ds
        if name not in _STRING_METHODS or arg is None:
            raise ValueError(f"unsupported method {method!r}")
        fn = _STRING_METHODS[name]
        return lambda ds: fn(_attribute_text(ds, tag), arg)


def parse_condition(text: str) -> Callable[[Dataset], bool]:
    """Compile a CTP-style condition such as ``Modality.equals("US") * [0028,0010].equals("600")``."""
    return _ConditionParser(text).parse()


_RECT = re.compile(r"\(\s*(-?\d+)\s*,\s*(-?\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*\)")


def parse_pixel_filters(text: str) -> tuple[PixelFilter, ...]:
    """Parse filter-file text: ``name`` line, ``{ condition }`` (may span lines), then ``(x,y,w,h)`` rectangles."""
    filters: list[PixelFilter] = []
    name, condition, rects = "", None, []
    lines = text.splitlines()
    i = 0

    def flush():
        nonlocal condition, rects, name
        if condition is not None:
            if not rects:
                raise ValueError(f"filter {name or len(filters) + 1} has no rectangles")
            filters.append(PixelFilter(name or f"filter {len(filters) + 1}", condition, tuple(rects),
                                       parse_condition(condition)))
        name, condition, rects = "", None, []

    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        if line.startswith("{"):
            if condition is not None:
                flush()
            body = line[1:]
            while "}" not in body:
                if i >= len(lines):
                    raise ValueError("unterminated condition")
                body += " " + lines[i].strip()
                i += 1
            cond, rest = body.split("}", 1)
            condition = cond.strip()
            if rest.strip():
                lines.insert(i, rest)
            continue
        if line.startswith("("):
            if condition is None:
                raise ValueError(f"rectangle without a condition: {line[:40]}")
            found = _RECT.findall(line)
            if not found or _RECT.sub("", line).strip(" ,;"):
                raise ValueError(f"bad rectangle line: {line[:40]}")
            rects += [tuple(int(v) for v in f) for f in found]
            continue
        flush()
        name = line
    flush()
    return tuple(filters)


def load_pixel_filters(path: Path | str | None = None) -> tuple[PixelFilter, ...]:
    """Filters from a CTP-style filter file; default: the packaged ``data/pixel_filters.txt``."""
    p = Path(path) if path is not None else DEFAULT_FILTERS_PATH
    try:
        return parse_pixel_filters(p.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ConfigError(f"pixel filter file {p.name}: {exc}") from exc


@dataclass(frozen=True)
class PixelPolicy:
    """How `scrub_pixels` decides: filters, OCR use ("auto" | "on" | "off") and what counts as risky."""

    filters: tuple[PixelFilter, ...] = ()
    ocr: str = "auto"
    risky_modalities: frozenset[str] = RISKY_MODALITIES
    risky_sop_class_prefixes: tuple[str, ...] = RISKY_SOP_CLASS_PREFIXES
    risky_image_types: frozenset[str] = RISKY_IMAGE_TYPES
    detector: bool = True
    ocr_min_confidence: float = 50.0  # blank OCR words at least this confident (or matching known PHI)
    ocr_evidence_confidence: float = 70.0  # a word this confident, >= 3 characters, counts as text found
    pad_px: int = 2

    @classmethod
    def default(cls, **kw) -> PixelPolicy:
        return cls(filters=load_pixel_filters(), **kw)


# ---------------------------------------------------------------------------------------------
# Risk from the header


def header_risk(ds: Dataset, policy: PixelPolicy) -> str:
    """"yes" (BurnedInAnnotation YES), "class" (risky modality/SOP class, not marked NO) or ""."""
    bia = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
    if bia == "YES":
        return "yes"
    if bia == "NO":
        return ""
    modality = str(ds.get("Modality", "") or "").upper()
    sop = str(ds.get("SOPClassUID", "") or "")
    image_type = {str(v).upper() for v in (ds.get("ImageType") or [])}
    if (modality in policy.risky_modalities or sop.startswith(policy.risky_sop_class_prefixes)
            or image_type & policy.risky_image_types):
        return "class"
    return ""


# ---------------------------------------------------------------------------------------------
# Pixels


def _frames(ds: Dataset) -> np.ndarray:
    """Pixel array as (frames, rows, cols[, samples])."""
    arr = ds.pixel_array
    n = int(ds.get("NumberOfFrames", 1) or 1)
    spp = int(ds.get("SamplesPerPixel", 1))
    if n == 1 and arr.ndim == (2 if spp == 1 else 3):
        arr = arr[None]
    return arr


def _luminance(ds: Dataset, frames: np.ndarray) -> np.ndarray:
    """(frames, rows, cols) float32 brightness as displayed (palette applied, MONOCHROME1 inverted)."""
    pi = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if pi == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        rgb = apply_color_lut(frames, ds).astype(np.float32)
        return rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    if frames.ndim == 4:
        return frames.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    lum = frames.astype(np.float32)
    return -lum if pi == "MONOCHROME1" else lum


def _blank_value(ds: Dataset, frames: np.ndarray):
    """What blanked pixels become: padding, air for CT, the darkest colour otherwise."""
    pi = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if pi == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        lut = apply_color_lut(np.arange(int(frames.max()) + 1, dtype=frames.dtype), ds).astype(np.float64).sum(-1)
        return int(np.argmin(lut))
    if frames.ndim == 4:
        return 0
    padding = ds.get("PixelPaddingValue")
    if padding is not None:
        return padding
    if str(ds.get("Modality", "")).upper() == "CT" and "RescaleIntercept" in ds:
        info = np.iinfo(frames.dtype) if frames.dtype.kind in "iu" else None
        air = (-1000.0 - float(ds.RescaleIntercept)) / float(ds.get("RescaleSlope", 1) or 1)
        lo = max(float(frames.min()), info.min if info else -np.inf)
        return type(frames.flat[0].item())(round(max(air, lo)))
    return frames.max() if pi == "MONOCHROME1" else frames.min()


# ---------------------------------------------------------------------------------------------
# Text detector (no OCR)


def _spike_values(values: np.ndarray, *, min_count: int = 12, ratio: float = 6.0) -> list[int]:
    """Exact values far more frequent than their neighbours in the bright end (burned-in text is one value)."""
    uniq, counts = np.unique(values, return_counts=True)
    spikes = []
    for v, c in zip(uniq, counts):
        if c < min_count:
            continue
        window = (uniq >= v - 12) & (uniq <= v + 12) & (uniq != v)
        neighbour = counts[window].mean() if window.any() else 0.0
        if c >= ratio * max(neighbour, 1.0):
            spikes.append(int(v))
    return spikes


def _text_lines(mask: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Bounding boxes (x0, y0, x1, y1) of horizontal runs of glyph-sized components in `mask`."""
    from scipy import ndimage

    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n == 0 or n > 5000:
        return []
    glyphs = []
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        h, w = sl[0].stop - sl[0].start, sl[1].stop - sl[1].start
        fill = float((labels[sl] == i).sum()) / (h * w)
        # glyphs are strokes: not solid blobs (metal, bone), not hair-thin lines (leads, edges)
        if 3 <= h <= 48 and w <= 12 * h and 0.12 <= fill <= 0.85:
            glyphs.append((sl[1].start, sl[0].start, sl[1].stop, sl[0].stop))
    if len(glyphs) < 2:
        return []
    glyphs.sort()
    parent = list(range(len(glyphs)))

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, ga in enumerate(glyphs):
        ha = ga[3] - ga[1]
        for b in range(a + 1, len(glyphs)):
            gb = glyphs[b]
            if gb[0] - ga[2] > 2.5 * max(ha, gb[3] - gb[1]):
                if gb[0] > ga[2] + 60:
                    break
                continue
            overlap = min(ga[3], gb[3]) - max(ga[1], gb[1])
            hb = gb[3] - gb[1]
            if overlap >= 0.5 * min(ha, hb) and max(ha, hb) <= 3 * min(ha, hb):
                parent[find(b)] = find(a)
    groups: dict[int, list[tuple[int, int, int, int]]] = {}
    for i, g in enumerate(glyphs):
        groups.setdefault(find(i), []).append(g)
    lines = []
    for members in groups.values():
        if len(members) < 2:
            continue
        x0, y0 = min(g[0] for g in members), min(g[1] for g in members)
        x1, y1 = max(g[2] for g in members), max(g[3] for g in members)
        heights = sorted(g[3] - g[1] for g in members)
        wide_enough = (x1 - x0) >= (2 if len(members) >= 3 else 3) * heights[len(heights) // 2]
        if wide_enough and (y1 - y0) <= 2.5 * heights[-1]:
            lines.append((x0, y0, x1, y1))
    return lines


def _text_blocks(mask: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Text lines grown by the same-valued fragments near them (glyphs cut by a FOV circle, dots, commas)."""
    from scipy import ndimage

    lines = _text_lines(mask)
    if not lines:
        return []
    reach = 2 * int(np.median([y1 - y0 for _, y0, _, y1 in lines]))
    boxes = [list(b) for b in lines]
    fragments = [(sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)
                 for sl in ndimage.find_objects(ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))[0])]
    changed = True
    while changed:
        changed = False
        for fx0, fy0, fx1, fy1 in fragments:
            for b in boxes:
                inside = fx0 >= b[0] and fy0 >= b[1] and fx1 <= b[2] and fy1 <= b[3]
                near = fx0 <= b[2] + reach and fx1 >= b[0] - reach and fy0 <= b[3] + reach and fy1 >= b[1] - reach
                # only fragments no taller than a few lines: a bone edge at the same value stays out
                if near and not inside and (fy1 - fy0) <= 2 * reach and (fx1 - fx0) <= 40 * reach:
                    b[:] = [min(b[0], fx0), min(b[1], fy0), max(b[2], fx1), max(b[3], fy1)]
                    changed = True
                    break
    return [tuple(b) for b in boxes]


def detect_text_regions(ds: Dataset, frames: np.ndarray | None = None, *, pad: int = 2) -> list[PixelRegion]:
    """Burned-in text lines in a grayscale image, by value spikes at the bright end; [] for colour images."""
    if int(ds.get("SamplesPerPixel", 1)) != 1 or str(ds.get("PhotometricInterpretation", "")) == "PALETTE COLOR":
        return []
    frames = _frames(ds) if frames is None else frames
    lum = _luminance(ds, frames)
    regions: list[PixelRegion] = []
    rows, cols = frames.shape[1:3]
    for f in range(frames.shape[0]):
        img = lum[f]
        lo, hi = float(img.min()), float(img.max())
        if hi <= lo:
            continue
        bright = img >= lo + 0.6 * (hi - lo)
        if str(ds.get("Modality", "")).upper() == "CT" and "RescaleIntercept" in ds and str(
                ds.get("PhotometricInterpretation", "")) != "MONOCHROME1":
            hu_cut = (700.0 - float(ds.RescaleIntercept)) / float(ds.get("RescaleSlope", 1) or 1)
            bright |= img >= hu_cut
        values = img[bright]
        if values.size < 12:
            continue
        for v in _spike_values(values):
            for x0, y0, x1, y1 in _text_blocks(img == v):
                regions.append(PixelRegion(f, max(x0 - pad, 0), max(y0 - pad, 0), min(x1 + pad, cols),
                                           min(y1 + pad, rows), "detector"))
    return regions


# ---------------------------------------------------------------------------------------------
# OCR (tesseract binary, TSV output)


def tesseract_available() -> bool:
    return shutil.which("tesseract") is not None


def _ocr_renderings(lum: np.ndarray) -> list[np.ndarray]:
    """8-bit dark-text-on-light renderings of one frame: inverted min-max grey and a bright-end binarisation."""
    lo, hi = float(lum.min()), float(lum.max())
    if hi <= lo:
        return []
    grey = (lum - lo) / (hi - lo)
    out = [np.clip(255 - grey * 255, 0, 255).astype(np.uint8)]
    out.append(np.where(grey >= 0.75, 0, 255).astype(np.uint8))
    return out


def _run_tesseract(tiles: list[tuple[int, np.ndarray]], scale: int) -> list[tuple[int, int, int, int, int, str, float]]:
    """OCR many tiles stacked into one image per call: (tile index, x0, y0, x1, y1, text, confidence)."""
    from PIL import Image

    results = []
    gap = 16
    batch: list[tuple[int, np.ndarray]] = []

    def run(batch):
        width = max(t.shape[1] for _, t in batch)
        height = sum(t.shape[0] + gap for _, t in batch)
        canvas = np.full((height, width), 255, dtype=np.uint8)
        offsets = []
        y = 0
        for idx, t in batch:
            canvas[y:y + t.shape[0], : t.shape[1]] = t
            offsets.append((y, y + t.shape[0], idx))
            y += t.shape[0] + gap
        img = Image.fromarray(canvas)
        if scale != 1:
            img = img.resize((width * scale, height * scale), Image.Resampling.LANCZOS)
        with tempfile.TemporaryDirectory(prefix="rfm-ocr-") as tmp:
            path = Path(tmp) / "page.png"
            img.save(path)
            proc = subprocess.run(["tesseract", str(path), "-", "--psm", "11", "-l", "eng", "tsv"],
                                  capture_output=True, text=True, timeout=600, check=False)
        if proc.returncode != 0:
            raise RuntimeError("tesseract failed")
        for row in csv.DictReader(io.StringIO(proc.stdout), delimiter="\t", quoting=csv.QUOTE_NONE):
            text = (row.get("text") or "").strip()
            if not text:
                continue
            x, yy, w, h = (int(row[k]) // 1 for k in ("left", "top", "width", "height"))
            x0, y0, x1, y1 = x / scale, yy / scale, (x + w) / scale, (yy + h) / scale
            cy = (y0 + y1) / 2
            for top, bottom, idx in offsets:
                if top <= cy < bottom:
                    results.append((idx, int(x0), int(y0 - top), int(np.ceil(x1)), int(np.ceil(y1 - top)), text,
                                    float(row.get("conf") or -1)))
                    break

    budget = 0
    for idx, tile in tiles:
        if batch and budget + tile.shape[0] > 6000 // scale:
            run(batch)
            batch, budget = [], 0
        batch.append((idx, tile))
        budget += tile.shape[0] + gap
    if batch:
        run(batch)
    return results


def _normalise(s: str) -> str:
    return re.sub(r"[^0-9a-z]", "", s.lower())


@dataclass(frozen=True)
class OcrWord:
    """A word tesseract read, with its box in image pixels."""

    frame: int
    x0: int
    y0: int
    x1: int
    y1: int
    text: str
    confidence: float


def ocr_words(ds: Dataset, frames: np.ndarray | None = None) -> list[OcrWord]:
    """Every word tesseract reads on every frame (two renderings per frame, upscaled for small fonts)."""
    frames = _frames(ds) if frames is None else frames
    lum = _luminance(ds, frames)
    rows, cols = frames.shape[1:3]
    tiles: list[tuple[int, np.ndarray]] = []
    for f in range(frames.shape[0]):
        for rendering in _ocr_renderings(lum[f]):
            tiles.append((f, rendering))
    if not tiles:
        return []
    scale = 3 if max(rows, cols) <= 1024 else 1
    return [OcrWord(f, x0, y0, x1, y1, text, conf) for f, x0, y0, x1, y1, text, conf in _run_tesseract(tiles, scale)]


def _words_to_regions(words: Iterable[OcrWord], shape: tuple[int, int], known_phi: Iterable[str],
                      min_confidence: float, evidence_confidence: float, pad: int) -> tuple[list[PixelRegion], bool]:
    """Regions to blank and whether any of them is convincing text (OCR also 'reads' anatomy and speckle)."""
    rows, cols = shape
    phi_tokens = {t for p in known_phi for t in (_normalise(w) for w in re.split(r"[\s^,/]+", str(p))) if len(t) >= 2}
    regions, evidence = [], False
    for w in words:
        norm = _normalise(w.text)
        is_phi = norm in phi_tokens or (len(norm) >= 3 and any(norm in t or t in norm for t in phi_tokens if len(t) >= 3))
        if (len(norm) >= 2 and w.confidence >= min_confidence) or is_phi:
            regions.append(PixelRegion(w.frame, max(w.x0 - pad, 0), max(w.y0 - pad, 0), min(w.x1 + pad, cols),
                                       min(w.y1 + pad, rows), "ocr"))
            evidence = evidence or is_phi or (len(norm) >= 3 and w.confidence >= evidence_confidence)
    return regions, evidence


def ocr_text_regions(ds: Dataset, frames: np.ndarray | None = None, known_phi: Iterable[str] = (), *,
                     min_confidence: float = 50.0, pad: int = 2) -> list[PixelRegion]:
    """Boxes of OCR words with >= 2 alphanumerics (at `min_confidence`) or matching a known PHI token."""
    frames = _frames(ds) if frames is None else frames
    regions, _ = _words_to_regions(ocr_words(ds, frames), frames.shape[1:3], known_phi, min_confidence, 100.0, pad)
    return regions


# ---------------------------------------------------------------------------------------------


def _filter_regions(ds: Dataset, filters: Sequence[PixelFilter]) -> list[PixelRegion]:
    regions = []
    rows, cols = int(ds.Rows), int(ds.Columns)
    for flt in filters:
        try:
            hit = flt.matches(ds)
        except re.error:
            hit = False
        if not hit:
            continue
        for x, y, w, h in flt.rectangles:
            x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, cols), min(y + h, rows)
            if x1 > x0 and y1 > y0:
                regions.append(PixelRegion(None, x0, y0, x1, y1, "filter"))
    return regions


def _write_cleaned(ds: Dataset, frames: np.ndarray, regions: Sequence[PixelRegion]) -> Dataset:
    """A copy of `ds` with the regions blanked on every frame they name, stored uncompressed."""
    out = copy.deepcopy(ds)
    if not hasattr(out, "file_meta"):
        out.file_meta = pydicom.dataset.FileMetaDataset()
    if out.file_meta.get("TransferSyntaxUID") is not None and out.file_meta.TransferSyntaxUID.is_compressed:
        out.decompress()  # YBR JPEG becomes RGB, as the decoded array already is
        frames = _frames(out)
    frames = frames.copy()
    fill = _blank_value(out, frames)
    for r in regions:
        target = slice(None) if r.frame is None else slice(r.frame, r.frame + 1)
        frames[target, r.y0:r.y1, r.x0:r.x1] = fill
    n = int(out.get("NumberOfFrames", 1) or 1)
    data = frames if n > 1 else frames[0]
    out.PixelData = np.ascontiguousarray(data.astype(data.dtype.newbyteorder("<"), copy=False)).tobytes()
    out["PixelData"].VR = "OB" if int(out.BitsAllocated) <= 8 else "OW"
    if int(out.get("SamplesPerPixel", 1)) > 1:
        out.PlanarConfiguration = 0
    out.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out.BurnedInAnnotation = "NO"
    return out


def scrub_pixels(ds: Dataset, policy: PixelPolicy, *, known_phi: Iterable[str] = (),
                 series_regions: Iterable[PixelRegion] = ()) -> PixelScrubResult:
    """Blank burned-in text in `ds` (never modified in place) or flag it for review; see the module docstring."""
    if "PixelData" not in ds:
        return PixelScrubResult("untouched", [], "no pixel data", ds)
    ocr_usable = policy.ocr != "off" and tesseract_available()
    if policy.ocr == "on" and not ocr_usable:
        raise ConfigError("pixel OCR is on but the tesseract binary is not installed (apt: tesseract-ocr tesseract-ocr-eng)")
    risk = header_risk(ds, policy)
    filter_regions = _filter_regions(ds, policy.filters)
    known_regions = filter_regions + [PixelRegion(r.frame, r.x0, r.y0, r.x1, r.y1, "series") for r in series_regions]
    try:
        frames = _frames(ds)
    except Exception as exc:  # noqa: BLE001 - any decoder failure means the pixels cannot be checked
        return PixelScrubResult("needs_review", [], f"pixel data cannot be decoded ({type(exc).__name__})", None,
                                undecodable=True)
    if int(ds.get("BitsAllocated", 16)) == 1 or frames.dtype.kind == "f":
        return PixelScrubResult("needs_review" if risk or known_regions else "untouched", [],
                                "bit-packed or float pixels are not scrubbed", None if risk or known_regions else ds)

    detected = detect_text_regions(ds, frames, pad=policy.pad_px) if policy.detector else []
    if not risk and not known_regions and not detected:
        return PixelScrubResult("untouched", [], "no burned-in text risk in header or pixels", ds)

    ocr_regions: list[PixelRegion] = []
    ocr_evidence = False
    if ocr_usable:
        ocr_regions, ocr_evidence = _words_to_regions(
            ocr_words(ds, frames), frames.shape[1:3], known_phi, policy.ocr_min_confidence,
            policy.ocr_evidence_confidence, policy.pad_px)
    regions = known_regions + detected + ocr_regions
    found = bool(detected) or ocr_evidence

    if known_regions:
        why = "matched pixel filter" if filter_regions else "regions from the series"
    elif risk == "class" and not ocr_usable:
        return PixelScrubResult("needs_review", regions, "risky modality or SOP class without a matching filter and "
                                "OCR unavailable", None)
    elif risk == "yes" and not found:
        return PixelScrubResult("needs_review", [], "BurnedInAnnotation YES but no text region found", None)
    elif risk == "class" and not regions:
        out = copy.deepcopy(ds)
        out.BurnedInAnnotation = "NO"
        return PixelScrubResult("cleaned", [], "risky modality or SOP class; OCR found no text", out)
    elif not found:
        why = "risky modality or SOP class; only low-confidence OCR words, blanked"
    else:
        why = "text found by " + " and ".join(s for s, hit in (("detector", detected), ("OCR", ocr_evidence)) if hit)
    return PixelScrubResult("cleaned", regions, why, _write_cleaned(ds, frames, regions))
