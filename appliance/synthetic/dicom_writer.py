"""Write a phantom as a CT Image Storage series, sampling each slice plane in patient space."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian

from appliance.synthetic.phantom import Phantom
from appliance.synthetic.uids import derived_rng, synthetic_uid

IMPLEMENTATION_CLASS_UID = synthetic_uid("implementation-class")


@dataclass
class SliceGeometry:
    """Where each slice of a series lies, in DICOM terms (LPS, mm)."""

    rows: int
    cols: int
    pixel_spacing_mm: tuple[float, float]  # DICOM order: (row spacing, column spacing)
    row_dir: tuple[float, float, float]  # IOP first triplet: direction along a row (increasing column)
    col_dir: tuple[float, float, float]  # IOP second triplet: direction down a column (increasing row)
    positions_mm: list[tuple[float, float, float]]  # IPP of each slice (centre of the top-left pixel)
    slice_thickness_mm: float

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_dir, self.col_dir)


def axial_geometry(
    phantom: Phantom,
    rows: int,
    cols: int,
    pixel_spacing_mm: float | tuple[float, float],
    n_slices: int,
    slice_spacing_mm: float,
    *,
    tilt_deg: float = 0.0,
    gaps_mm: Sequence[float] | None = None,
    center_mm: tuple[float, float, float] | None = None,
    head_first: bool = True,
) -> SliceGeometry:
    """An axial stack centred on the phantom (or `center_mm`), first slice most superior.

    With `tilt_deg` the slices are tilted like a GE gantry tilt: IOP column direction is
    (0, cos t, -sin t) and IPP advances along z only, so the stack direction is not the slice normal;
    `slice_spacing_mm` is then the table increment along z. `gaps_mm` (n_slices - 1 steps) gives
    uneven spacing instead. `head_first=False` orders slices from feet to head.
    """
    if np.isscalar(pixel_spacing_mm):
        pixel_spacing_mm = (float(pixel_spacing_mm), float(pixel_spacing_mm))  # type: ignore[arg-type]
    dr, dc = (float(v) for v in pixel_spacing_mm)  # type: ignore[union-attr]
    if gaps_mm is not None:
        if len(gaps_mm) != n_slices - 1:
            raise ValueError("gaps_mm needs n_slices - 1 steps")
        steps = np.concatenate([[0.0], np.cumsum(np.asarray(gaps_mm, dtype=np.float64))])
    else:
        steps = np.arange(n_slices, dtype=np.float64) * float(slice_spacing_mm)
    t = np.deg2rad(tilt_deg)
    row_dir = np.array([1.0, 0.0, 0.0])
    col_dir = np.array([0.0, np.cos(t), -np.sin(t)])
    c = np.asarray(phantom.center_mm if center_mm is None else center_mm, dtype=np.float64)
    z_offsets = steps - (steps[-1] / 2)
    z_offsets = z_offsets[::-1] if head_first else z_offsets
    to_corner = -row_dir * dc * (cols - 1) / 2 - col_dir * dr * (rows - 1) / 2
    positions = [tuple(float(round(v, 4)) for v in c + to_corner + np.array([0.0, 0.0, dz])) for dz in z_offsets]
    thickness = float(np.median(np.diff(steps))) if n_slices > 1 else float(slice_spacing_mm)
    return SliceGeometry(
        rows=int(rows), cols=int(cols), pixel_spacing_mm=(dr, dc),
        row_dir=tuple(float(round(v, 8)) for v in row_dir),  # type: ignore[arg-type]
        col_dir=tuple(float(round(v, 8)) for v in col_dir),  # type: ignore[arg-type]
        positions_mm=positions, slice_thickness_mm=round(thickness, 4),
    )


def _linear_weights(f: np.ndarray, n: int) -> np.ndarray:
    """Dense (len(f), n) matrix of 1-D linear interpolation weights; positions outside give zero rows."""
    f = np.round(f, 6)
    i0 = np.floor(f).astype(np.int64)
    t = f - i0
    w = np.zeros((len(f), n), dtype=np.float64)
    for idx, wt in ((i0, 1.0 - t), (i0 + 1, t)):
        ok = (idx >= 0) & (idx < n)
        w[np.nonzero(ok)[0], idx[ok]] += wt[ok]
    return w


def sample_slices(phantom: Phantom, geometry: SliceGeometry, indices: Sequence[int] | None = None) -> np.ndarray:
    """HU of the requested slice planes, (n, rows, cols), by linear interpolation (air outside).

    Grid-aligned axial planes are sampled exactly (the phantom voxels themselves).
    """
    from scipy import ndimage

    idx = list(range(len(geometry.positions_mm))) if indices is None else list(indices)
    ipp = np.asarray([geometry.positions_mm[i] for i in idx], dtype=np.float64)
    dr, dc = geometry.pixel_spacing_mm
    origin, spacing = np.asarray(phantom.origin_mm), np.asarray(phantom.spacing_mm)
    nz, ny, nx = phantom.hu.shape
    axis_aligned = np.allclose(geometry.row_dir, (1, 0, 0)) and np.allclose(geometry.col_dir, (0, 1, 0))
    if axis_aligned and np.allclose(ipp[:, :2], ipp[0, :2]):
        # separable linear interpolation: the same x/y sample positions on every slice
        fx = (ipp[0, 0] + dc * np.arange(geometry.cols) - origin[0]) / spacing[0]
        fy = (ipp[0, 1] + dr * np.arange(geometry.rows) - origin[1]) / spacing[1]
        fz = (ipp[:, 2] - origin[2]) / spacing[2]
        shifted = phantom.hu.astype(np.float64) + 1000.0  # air (-1000) becomes 0, so zero weights give air
        out = np.tensordot(_linear_weights(fz, nz), shifted, axes=(1, 0))
        out = np.tensordot(_linear_weights(fy, ny), out, axes=(1, 1)).transpose(1, 0, 2)
        out = np.tensordot(out, _linear_weights(fx, nx), axes=(2, 1))
        return (out - 1000.0).astype(np.float32)
    r = np.arange(geometry.rows, dtype=np.float64)[:, None, None] * dr * np.asarray(geometry.col_dir)
    c = np.arange(geometry.cols, dtype=np.float64)[None, :, None] * dc * np.asarray(geometry.row_dir)
    pts = ipp[:, None, None, :] + (r + c)[None]  # (n, rows, cols, 3) LPS
    vox = (pts - origin) / spacing
    coords = np.round(np.moveaxis(vox[..., ::-1], -1, 0), 6)  # (3: k, j, i, n, rows, cols)
    return ndimage.map_coordinates(phantom.hu, coords, order=1, mode="constant", cval=-1000.0).astype(np.float32)


# Kernel name -> (in-plane PSF sigma in pixels, edge enhancement, noise SD in HU). Unknown names: soft.
KERNELS: dict[str, tuple[float, float, float]] = {
    "STANDARD": (0.6, 0.0, 12.0), "SOFT": (0.8, 0.0, 9.0), "LUNG": (0.0, 0.6, 38.0), "BONE": (0.0, 0.8, 45.0),
    "B31f": (0.6, 0.0, 12.0), "B70f": (0.0, 0.7, 40.0), "Br40d": (0.5, 0.0, 14.0), "Bl57d": (0.0, 0.5, 32.0),
    "B": (0.6, 0.0, 12.0), "YC": (0.0, 0.5, 30.0), "L": (0.0, 0.6, 36.0),
    "FC13": (0.6, 0.0, 11.0), "FC52": (0.0, 0.6, 35.0), "NONE": (0.0, 0.0, 0.0),
}


def apply_kernel(hu: np.ndarray, kernel: str, rng: np.random.Generator, *, noise_hu: float | None = None,
                 psf_sigma_px: float | None = None) -> np.ndarray:
    """Blur or edge-enhance each slice and add in-plane correlated noise as a reconstruction kernel would."""
    from scipy import ndimage

    sigma, sharpen, noise = KERNELS.get(kernel, KERNELS["STANDARD"])
    sigma = sigma if psf_sigma_px is None else psf_sigma_px
    noise = noise if noise_hu is None else noise_hu
    out = hu
    if sigma > 0:
        out = ndimage.gaussian_filter(out, (0, sigma, sigma), truncate=3.0)
    if sharpen > 0:
        out = out + sharpen * (out - ndimage.gaussian_filter(out, (0, 1.0, 1.0), truncate=3.0))
    if noise > 0:
        white = rng.standard_normal(out.shape, dtype=np.float32)
        grain = ndimage.gaussian_filter(white, (0, 0.7, 0.7), truncate=3.0) if sharpen == 0 else white
        out = out + grain * (noise / max(float(grain.std()), 1e-6))
    return out.astype(np.float32)


def render_text_mask(lines: Sequence[str], rows: int, cols: int, origin_px: tuple[int, int] = (2, 2)) -> np.ndarray:
    """Boolean (rows, cols) mask of `lines` drawn with PIL's built-in bitmap font (6x11 px per glyph)."""
    font = ImageFont.load_default_imagefont() if hasattr(ImageFont, "load_default_imagefont") else ImageFont.load_default()
    img = Image.new("L", (cols, rows), 0)
    draw = ImageDraw.Draw(img)
    x, y = origin_px
    for line in lines:
        draw.text((x, y), line, fill=255, font=font)
        y += 11
    return np.asarray(img) > 127


def _fmt_ds(values: Iterable[float]) -> list[str]:
    """DS strings of at most 16 characters."""
    out = []
    for v in values:
        s = f"{float(v):.6g}"
        out.append(s if s != "-0" else "0")
    return out


def _base_dataset(geometry: SliceGeometry, seed: int, kernel: str) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = "20240101"
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = "120000"
    ds.AccessionNumber = f"SYN{seed % 10**8:08d}"
    ds.Modality = "CT"
    ds.Manufacturer = "RFM Synthetic"
    ds.ReferringPhysicianName = ""
    ds.StationName = "SYNCT01"
    ds.StudyDescription = "CT CHEST"
    ds.SeriesDescription = f"Chest {kernel}"
    ds.ManufacturerModelName = "Phantom CT"
    ds.PatientName = f"SYNTHETIC^{seed}"
    ds.PatientID = f"SYN{seed:06d}"[-12:]
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = _fmt_ds([geometry.slice_thickness_mm])[0]
    ds.KVP = "120"
    ds.ConvolutionKernel = kernel
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = synthetic_uid("study", seed)
    ds.SeriesInstanceUID = synthetic_uid("series", seed, kernel)
    ds.StudyID = "1"
    ds.SeriesNumber = 2
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = _fmt_ds([*geometry.row_dir, *geometry.col_dir])
    ds.FrameOfReferenceUID = synthetic_uid("frame-of-reference", seed)
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = geometry.rows
    ds.Columns = geometry.cols
    ds.PixelSpacing = _fmt_ds(geometry.pixel_spacing_mm)
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    return ds


def _uniform_spacing(geometry: SliceGeometry) -> float | None:
    """Distance between neighbouring planes along the normal, when it is the same everywhere."""
    if len(geometry.positions_mm) < 2:
        return None
    d = np.diff(np.asarray(geometry.positions_mm) @ geometry.normal)
    return float(abs(d[0])) if np.allclose(d, d[0], atol=1e-3) else None


# Elements that differ between the slices of a series; everything else is encoded once per series.
_PER_SLICE_TAGS = (0x00080018, 0x00200013, 0x00200032, 0x00201041, 0x7FE00010)


class _SeriesEncoder:
    """Encodes slices with pydicom, reusing the bytes of the elements every slice shares.

    The result is byte-identical to `pydicom.dcmwrite(..., enforce_file_format=True)` (a test checks),
    about ten times faster for a header with sequences and private blocks.
    """

    def __init__(self, ds: Dataset):
        self.implicit = ds.file_meta.TransferSyntaxUID == pydicom.uid.ImplicitVRLittleEndian
        self.charset = ds.get("SpecificCharacterSet", "ISO_IR 6")
        chunks: list[list] = [[] for _ in range(len(_PER_SLICE_TAGS) + 1)]
        for elem in ds:
            if elem.tag not in _PER_SLICE_TAGS:
                chunks[bisect.bisect(_PER_SLICE_TAGS, elem.tag)].append(elem)
        self.static = [self._encode(c) for c in chunks]

    def _encode(self, elements) -> bytes:
        part = Dataset()
        for elem in elements:
            part.add(elem)
        fp = DicomBytesIO()
        fp.is_implicit_VR, fp.is_little_endian = self.implicit, True
        write_dataset(fp, part, self.charset)
        return fp.getvalue()

    def encode(self, ds: Dataset) -> bytes:
        meta = DicomBytesIO()
        meta.is_implicit_VR, meta.is_little_endian = False, True
        write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
        parts = [b"\x00" * 128, b"DICM", meta.getvalue()]
        for static, tag in zip(self.static, _PER_SLICE_TAGS):
            parts += [static, self._encode([ds[tag]])]
        parts.append(self.static[-1])
        return b"".join(parts)


def write_ct_series(
    phantom: Phantom,
    geometry: SliceGeometry,
    out_dir: Path | str,
    *,
    seed: int = 0,
    study: Mapping[str, object] | None = None,
    series: Mapping[str, object] | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    file_name: str | Callable[[int], str] = "IM{:05d}.dcm",
    slice_subset: Iterable[int] | None = None,
    kernel: str = "STANDARD",
    noise_hu: float | None = None,
    psf_sigma_px: float | None = None,
    burned_in_lines: Sequence[str] | None = None,
    burned_in_slices: Iterable[int] = (),
    fov_padding: bool = False,
    decorate: Callable[[Dataset], None] | None = None,
    _use_dcmwrite: bool = False,
) -> list[Path]:
    """Write one CT series of `phantom` on `geometry` to `out_dir`; returns the files in slice order.

    `study` and `series` map DICOM keywords to values set on every slice (study first, then
    series; they override the defaults, e.g. PixelRepresentation, RescaleIntercept, SeriesNumber).
    `file_name` is a format string taking the instance number, or a function of the slice index.
    `slice_subset` writes only those slice indices (instance numbers keep their gaps, as a PACS
    export with lost images would). `burned_in_lines` are drawn bright into the pixels of
    `burned_in_slices`. `fov_padding` stores pixels outside the reconstruction circle as
    PixelPaddingValue, as GE does. `decorate(ds)` may add anything else (private blocks).
    Kernel noise is seeded by `seed` and the SeriesInstanceUID, so re-running is byte-identical.
    """
    out_dir = Path(out_dir)
    ds = _base_dataset(geometry, seed, kernel)
    for mapping in (study or {}, series or {}):
        for keyword, value in mapping.items():
            setattr(ds, keyword, value)
    spacing = _uniform_spacing(geometry)
    if spacing is not None and "SpacingBetweenSlices" not in (series or {}):
        ds.SpacingBetweenSlices = _fmt_ds([spacing])[0]
    if decorate is not None:
        decorate(ds)

    indices = list(range(len(geometry.positions_mm))) if slice_subset is None else sorted(set(slice_subset))
    hu = sample_slices(phantom, geometry, indices)
    hu = apply_kernel(hu, kernel, derived_rng(seed, "kernel-noise", ds.SeriesInstanceUID),
                      noise_hu=noise_hu, psf_sigma_px=psf_sigma_px)
    burned = set(burned_in_slices)
    if burned_in_lines and burned:
        text = render_text_mask(burned_in_lines, geometry.rows, geometry.cols)
        for n, i in enumerate(indices):
            if i in burned:
                hu[n][text] = 2000.0

    signed = int(ds.PixelRepresentation) == 1
    intercept, slope = float(ds.RescaleIntercept), float(ds.RescaleSlope)
    bits = int(ds.BitsStored)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    hu = np.clip(hu.astype(np.float64), -1024.0, 3071.0)  # float64: float32 + intercept would re-round
    stored = np.clip(np.rint((hu - intercept) / slope), lo, hi)
    if fov_padding:
        padding = -2000 if signed else 0
        ds.add_new(0x00280120, "SS" if signed else "US", padding)  # PixelPaddingValue
        rr, cc = np.mgrid[: geometry.rows, : geometry.cols]
        radius = min(geometry.rows, geometry.cols) / 2
        outside = (rr - (geometry.rows - 1) / 2) ** 2 + (cc - (geometry.cols - 1) / 2) ** 2 > radius**2
        stored[:, outside] = padding
    stored = stored.astype("<i2" if signed else "<u2")

    normal = geometry.normal
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
    ds.file_meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    ds.file_meta.ImplementationVersionName = "RFM_SYNTH_1"
    compressed = UID(transfer_syntax).is_compressed
    encoder = None if compressed or _use_dcmwrite else _SeriesEncoder(ds)
    paths = []
    for n, i in enumerate(indices):
        ipp = geometry.positions_mm[i]
        ds.InstanceNumber = i + 1
        ds.SOPInstanceUID = synthetic_uid("instance", ds.SeriesInstanceUID, i)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ImagePositionPatient = _fmt_ds(ipp)
        ds.SliceLocation = _fmt_ds([float(np.dot(ipp, normal))])[0]
        if compressed:
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.PixelData = stored[n].tobytes()
            ds.compress(transfer_syntax, stored[n])
        else:
            ds.PixelData = stored[n].tobytes()
            ds["PixelData"].VR = "OW"
        name = file_name(i) if callable(file_name) else file_name.format(i + 1)
        path = out_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if encoder is None:
            pydicom.dcmwrite(path, ds, enforce_file_format=True)
        else:
            path.write_bytes(encoder.encode(ds))
        paths.append(path)
    return paths
