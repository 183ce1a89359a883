"""Series -> training volume: patient-space geometry on real and synthetic series, decoding, the cache."""

from __future__ import annotations

import copy
import json
import math
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGExtended12Bit,
    RLELossless,
    generate_uid,
)
from scipy import ndimage

from appliance.errors import BadInputError
from appliance.preprocess import (
    PreprocessSettings,
    load_cached_volume,
    load_series,
    preprocess_series,
    resample_to_canvas,
)

from conftest import GE_DIR
# Isotropic and large enough to hold the whole tilted head, so nothing is cropped.
GE_SETTINGS = PreprocessSettings(spacing_mm=(1.5, 1.5, 1.5), canvas=(176, 176, 176))


def ge_files() -> list[Path]:
    if not GE_DIR.is_dir():
        pytest.skip(f"real GE test series not found at {GE_DIR} (the repo's sibling ../shared)")
    return sorted(GE_DIR.glob("*.dcm"))


# ----------------------------------------------------------------------------------------- helpers


def write_ct_slice(
    path: Path,
    hu: np.ndarray,
    *,
    position,
    orientation,
    pixel_spacing: float,
    thickness: float | None,
    instance_number: int,
    slope: float = 1.0,
    intercept: float = -1024.0,
    series_uid: str = "1.2.826.0.1.3680043.8.498.1",
) -> Path:
    """One CT Image Storage slice, Explicit VR Little Endian, int16 stored values."""
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop_uid
    ds.Modality = "CT"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.2", series_uid
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.3"
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
    ds.ImageOrientationPatient = [f"{v:.7f}" for v in orientation]
    ds.PixelSpacing = [pixel_spacing, pixel_spacing]
    if thickness is not None:
        ds.SliceThickness = thickness
    ds.Rows, ds.Columns = hu.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    stored = np.round((hu - intercept) / slope).astype(np.int16)
    ds.PixelData = stored.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


SPHERE_CENTRE = np.array([6.0, -9.0, 14.0])  # patient LPS, mm
SPHERE_RADIUS = 20.0
SPHERE_HU, BACKGROUND_HU = 60.0, -1000.0


def write_sphere_series(
    out_dir: Path, *, tilt_deg: float = 0.0, gaps_mm=None, n_slices: int = 22, size: int = 96, spacing: float = 1.0
) -> list[Path]:
    """A 20 mm sphere of 60 HU in air, cut by slices that advance along patient z like a tilted gantry.

    The slice normal is tilted by ``tilt_deg`` about the x axis; ``gaps_mm`` are distances between
    consecutive slices along the normal (default 3 mm). Rescale slopes alternate between slices.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    gaps = list(gaps_mm) if gaps_mm is not None else [3.0] * (n_slices - 1)
    tilt = math.radians(tilt_deg)
    row_dir = np.array([1.0, 0.0, 0.0])
    col_dir = np.array([0.0, math.cos(tilt), -math.sin(tilt)])
    offsets = np.concatenate([[0.0], np.cumsum(gaps)])
    offsets -= offsets[-1] / 2  # the sphere centre sits in the middle of the stack
    half_fov = (size - 1) / 2 * spacing
    first_pixel = SPHERE_CENTRE - half_fov * row_dir - half_fov * col_dir
    rows, cols = np.mgrid[0:size, 0:size]
    files = []
    for k, offset in enumerate(offsets):
        ipp = first_pixel + np.array([0.0, 0.0, offset / math.cos(tilt)])  # IPP moves along z only
        points = ipp + (cols * spacing)[..., None] * row_dir + (rows * spacing)[..., None] * col_dir
        distance = np.linalg.norm(points - SPHERE_CENTRE, axis=-1)
        inside = np.clip((SPHERE_RADIUS - distance) / spacing + 0.5, 0.0, 1.0)
        hu = BACKGROUND_HU + inside * (SPHERE_HU - BACKGROUND_HU)
        files.append(
            write_ct_slice(
                out_dir / f"{k:03d}.dcm",
                hu,
                position=ipp,
                orientation=(*row_dir, *col_dir),
                pixel_spacing=spacing,
                thickness=3.0,
                instance_number=k + 1,
                slope=1.0 if k % 2 == 0 else 0.5,
                intercept=-1024.0 if k % 2 == 0 else -2048.0,
            )
        )
    return files


def sphere_measurements(volume: np.ndarray, meta: dict, settings: PreprocessSettings):
    """(centroid in patient mm, volume in mm3) from partial-volume fractions of the output grid."""
    background, foreground = settings.map_hu(BACKGROUND_HU), settings.map_hu(SPHERE_HU)
    fraction = np.clip((np.asarray(volume, dtype=np.float64) - background) / (foreground - background), 0, 1)
    z, y, x = np.indices(fraction.shape)
    total = fraction.sum()
    index_centroid = np.array([(fraction * a).sum() / total for a in (x, y, z)])
    spacing = np.array(meta["spacing_xyz_mm"])
    return np.array(meta["origin_lps_mm"]) + index_centroid * spacing, total * spacing.prod()


def read_nifti1(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(data as float32 (Z, Y, X) after scl, 3x4 sform to RAS) of a little-endian single-file NIfTI-1."""
    raw = path.read_bytes()
    assert int(np.frombuffer(raw[0:4], "<i4")[0]) == 348, "not a little-endian NIfTI-1 file"
    dims = np.frombuffer(raw[40:56], "<i2").astype(int)
    datatype = int(np.frombuffer(raw[70:72], "<i2")[0])
    vox_offset = int(np.frombuffer(raw[108:112], "<f4")[0])
    slope, intercept = (float(v) for v in np.frombuffer(raw[112:120], "<f4"))
    srow = np.frombuffer(raw[280:328], "<f4").reshape(3, 4).astype(np.float64)
    dtype = {2: "<u1", 4: "<i2", 8: "<i4", 16: "<f4", 256: "<i1", 512: "<u2"}[datatype]
    nx, ny, nz = dims[1:4]
    data = np.frombuffer(raw, dtype=dtype, count=nx * ny * nz, offset=vox_offset).reshape(nz, ny, nx)
    data = data.astype(np.float32)
    if slope not in (0.0, 1.0) or intercept != 0.0:
        data = data * (slope or 1.0) + intercept
    return data, srow


def sample_patient_points(volume: np.ndarray, meta: dict, points_lps: np.ndarray) -> np.ndarray:
    """Trilinear samples of the output volume at patient points (..., 3); outside the canvas -> pad."""
    index = (points_lps - np.array(meta["origin_lps_mm"])) / np.array(meta["spacing_xyz_mm"])
    flat = index.reshape(-1, 3)
    values = ndimage.map_coordinates(
        np.asarray(volume, dtype=np.float32), [flat[:, 2], flat[:, 1], flat[:, 0]], order=1, cval=meta["pad_value"]
    )
    return values.reshape(points_lps.shape[:-1])


# ----------------------------------------------------------------------------------------- real GE series


@pytest.fixture(scope="module")
def ge_stack():
    return load_series(ge_files())


@pytest.fixture(scope="module")
def ge_volume(ge_stack, tmp_path_factory):
    cached = preprocess_series(ge_files(), tmp_path_factory.mktemp("ge") / "ge", GE_SETTINGS)
    volume, meta = load_cached_volume(cached.npy_path)
    return np.asarray(volume, dtype=np.float32), meta


def expected_z_range_mm(stack) -> tuple[float, float]:
    """Physical z range of the acquired slabs, straight from the headers: pixel-edge corners of the first
    and last slices, pushed out by half their thickness along the (tilted) normal."""
    g = stack.geometry
    row_dir, col_dir, normal = (np.array(v) for v in (g.row_dir, g.col_dir, g.normal))
    row_sp, col_sp = g.pixel_spacing
    z_values = []
    for k, outward in ((0, -1.0), (g.n_slices - 1, 1.0)):
        for a in (-0.5, g.cols - 0.5):
            for b in (-0.5, g.rows - 0.5):
                corner = stack.positions_mm[k] + a * col_sp * row_dir + b * row_sp * col_dir
                z_values.append((corner + outward * stack.thickness_mm[k] / 2 * normal)[2])
    return min(z_values), max(z_values)


def test_ge_acquired_extent_along_z_matches_headers(ge_stack):
    """Fill the real stack with water: every acquired voxel is then non-air, so the non-air z extent is
    exactly the acquired region, which must match the header geometry (tilt included)."""
    water = replace(ge_stack, hu=np.zeros_like(ge_stack.hu))
    volume, meta = resample_to_canvas(water, GE_SETTINGS)
    covered_z = np.flatnonzero((volume > -0.99).any(axis=(1, 2)))
    sz = GE_SETTINGS.spacing_mm[2]
    z_origin = meta["origin_lps_mm"][2]
    measured = (z_origin + covered_z[0] * sz, z_origin + covered_z[-1] * sz)
    expected = expected_z_range_mm(ge_stack)
    print(f"GE z range expected {expected[0]:.2f}..{expected[1]:.2f} mm ({expected[1] - expected[0]:.2f} mm), "
          f"measured voxel centres {measured[0]:.2f}..{measured[1]:.2f} mm, tilt {ge_stack.geometry.tilt_deg:.2f} deg")
    assert measured[0] == pytest.approx(expected[0], abs=sz)
    assert measured[1] == pytest.approx(expected[1], abs=sz)
    assert meta["acquired_extent_mm"]["z"] == pytest.approx(expected[1] - expected[0], abs=1e-6)
    assert not any(meta["cropped"].values())
    # No holes along z inside the acquired region: uneven gaps are interpolated, never skipped.
    assert np.all(np.diff(covered_z) == 1)


def test_ge_real_data_inside_acquired_extent(ge_volume, ge_stack):
    volume, meta = ge_volume
    non_air_z = np.flatnonzero((volume > -0.9).any(axis=(1, 2)))
    z_origin, sz = meta["origin_lps_mm"][2], meta["spacing_xyz_mm"][2]
    low, high = expected_z_range_mm(ge_stack)
    assert z_origin + non_air_z[0] * sz >= low - sz
    assert z_origin + non_air_z[-1] * sz <= high + sz
    # The head fills most of the acquired z range (slabs were not dropped at either end).
    assert (non_air_z[-1] - non_air_z[0] + 1) * sz > 0.8 * (high - low)
    assert meta["source"]["tilt_deg"] == pytest.approx(18.5, abs=0.05)
    assert meta["source"]["uneven_spacing"] is True


def test_ge_no_slab_dropped_or_duplicated(ge_volume, ge_stack):
    """Sample the output on each source slice's own tilted plane, and on planes shifted along the normal:
    the best match must be the slice's own position, and it must beat the neighbouring slices."""
    volume, meta = ge_volume
    g = ge_stack.geometry
    row_dir, col_dir, normal = (np.array(v) for v in (g.row_dir, g.col_dir, g.normal))
    step = 3  # about the output spacing
    rows, cols = np.mgrid[0 : g.rows : step, 0 : g.cols : step]
    in_plane = (cols * g.pixel_spacing[1])[..., None] * row_dir + (rows * g.pixel_spacing[0])[..., None] * col_dir
    source = GE_SETTINGS.map_hu(ge_stack.hu[:, ::step, ::step])
    shifts = np.arange(-6.0, 6.01, 0.5)
    sz = meta["spacing_xyz_mm"][2]
    best_shifts = []
    for k in range(g.n_slices):
        plane = ge_stack.positions_mm[k] + in_plane
        errors = [
            np.abs(sample_patient_points(volume, meta, plane + shift * normal) - source[k]).mean() for shift in shifts
        ]
        best = float(shifts[int(np.argmin(errors))])
        best_shifts.append(best)
        if 0 < k < g.n_slices - 1:  # beyond the end slices the half-slab repeats the edge slice
            assert abs(best) <= sz, f"slice {k + 1} best matches {best} mm away from its own plane"
        own_error = errors[len(shifts) // 2]
        for j in (k - 1, k + 1):
            if 0 <= j < g.n_slices and abs(g.slice_offsets_mm[j] - g.slice_offsets_mm[k]) >= 3.0:
                neighbour_error = np.abs(sample_patient_points(volume, meta, plane) - source[j]).mean()
                assert own_error < 0.7 * neighbour_error, f"slice {k + 1} looks like slice {j + 1}"
    print("GE best-matching shift along the normal per slice (mm):", best_shifts)

    # Along z the data changes continuously: no two consecutive output slices repeat a block.
    covered = np.flatnonzero((volume > -0.9).any(axis=(1, 2)))
    consecutive_change = np.abs(np.diff(volume[covered[0] : covered[-1] + 1], axis=0)).mean(axis=(1, 2))
    assert consecutive_change.min() > 0


def dcm2niix_binary() -> str | None:
    try:
        import dcm2niix

        candidate = getattr(dcm2niix, "bin", None)
        if candidate and Path(candidate).is_file():
            return str(candidate)
    except ImportError:
        pass
    return shutil.which("dcm2niix", path=str(Path(__file__).resolve().parents[1] / ".venv/bin")) or shutil.which(
        "dcm2niix"
    )


def test_ge_agrees_with_dcm2niix_tilt_correction(ge_volume, ge_stack, tmp_path):
    binary = dcm2niix_binary()
    if binary is None:
        pytest.skip("dcm2niix binary not installed (pip install dcm2niix)")
    volume, meta = ge_volume
    subprocess.run([binary, "-z", "n", "-f", "ge", "-o", str(tmp_path), str(GE_DIR)], check=True,
                   capture_output=True, timeout=120)
    tilted = sorted(tmp_path.glob("ge_Tilt*.nii"))
    if not tilted:
        pytest.skip(f"this dcm2niix wrote no tilt-corrected volume: {sorted(p.name for p in tmp_path.iterdir())}")
    data, srow = read_nifti1(tilted[0])
    k, j, i = np.mgrid[0 : data.shape[0], 0 : data.shape[1] : 4, 0 : data.shape[2] : 4]
    ras = np.stack([i, j, k], axis=-1) @ srow[:, :3].T + srow[:, 3]
    lps = ras * np.array([-1.0, -1.0, 1.0])

    # The same physical z range of slice centres (dcm2niix's grid spans the first to the last pixel centre).
    g = ge_stack.geometry
    low, high = expected_z_range_mm(ge_stack)
    margin = (ge_stack.thickness_mm[0] / 2 * g.normal[2], ge_stack.thickness_mm[-1] / 2 * g.normal[2])
    edge = 0.5 * g.pixel_spacing[0] * abs(g.col_dir[2])
    print(f"dcm2niix z centres {lps[..., 2].min():.2f}..{lps[..., 2].max():.2f} mm; "
          f"headers {low + margin[0] + edge:.2f}..{high - margin[1] - edge:.2f} mm")
    assert lps[..., 2].min() == pytest.approx(low + margin[0] + edge, abs=meta["spacing_xyz_mm"][2])
    assert lps[..., 2].max() == pytest.approx(high - margin[1] - edge, abs=meta["spacing_xyz_mm"][2])

    # And the same image content at the same patient positions.
    ours = sample_patient_points(volume, meta, lps)
    reference = GE_SETTINGS.map_hu(data[k, j, i])
    tissue = (ours > -0.99) | (reference > -0.99)
    correlation = np.corrcoef(ours[tissue], reference[tissue])[0, 1]
    mean_abs = np.abs(ours - reference)[tissue].mean()
    print(f"vs dcm2niix: correlation {correlation:.4f}, mean |difference| {mean_abs:.4f} (mapped units)")
    assert correlation > 0.98
    assert mean_abs < 0.05


# ----------------------------------------------------------------------------------------- synthetic geometry

PHANTOM_SETTINGS = PreprocessSettings(spacing_mm=(1.5, 1.5, 1.5), canvas=(72, 72, 72))
UNEVEN_GAPS = [1.5, 3.0, 2.0, 4.5, 2.5, 1.0, 3.5, 2.0] * 3


@pytest.mark.parametrize(
    "name, tilt_deg, gaps",
    [("axial", 0.0, None), ("tilted", 18.5, None), ("uneven", 0.0, UNEVEN_GAPS), ("tilted_uneven", -18.5, UNEVEN_GAPS)],
)
def test_sphere_position_and_volume(tmp_path, name, tilt_deg, gaps):
    files = write_sphere_series(tmp_path / name, tilt_deg=tilt_deg, gaps_mm=gaps)
    cached = preprocess_series(files[::-1], tmp_path / f"{name}_out", PHANTOM_SETTINGS)
    volume, meta = load_cached_volume(cached.npy_path)
    centroid, sphere_volume = sphere_measurements(volume, meta, PHANTOM_SETTINGS)
    truth_volume = 4 / 3 * math.pi * SPHERE_RADIUS**3
    print(f"{name}: centroid error {np.round(centroid - SPHERE_CENTRE, 3)} mm, "
          f"volume {sphere_volume:.0f} vs {truth_volume:.0f} mm3")
    assert np.all(np.abs(centroid - SPHERE_CENTRE) < np.array(PHANTOM_SETTINGS.spacing_mm))
    assert sphere_volume == pytest.approx(truth_volume, rel=0.10)
    assert meta["source"]["tilt_deg"] == pytest.approx(abs(tilt_deg), abs=0.01)
    assert meta["source"]["uneven_spacing"] is (gaps is not None)


def test_per_slice_rescale_is_applied(tmp_path):
    files = write_sphere_series(tmp_path, n_slices=6)
    stack = load_series(files)
    centre_values = stack.hu[:, 48, 48]
    # Slices alternate slope 1 / intercept -1024 and slope 0.5 / intercept -2048; both must read as HU.
    assert np.all((np.abs(centre_values - SPHERE_HU) < 1) | (np.abs(centre_values - BACKGROUND_HU) < 1))
    assert stack.hu.min() >= BACKGROUND_HU - 1 and stack.hu.max() <= SPHERE_HU + 1


def test_canvas_crop_and_padding_flags(tmp_path):
    files = write_sphere_series(tmp_path, n_slices=12)
    small = PreprocessSettings(spacing_mm=(2.0, 2.0, 2.0), canvas=(20, 40, 60))
    volume, meta = resample_to_canvas(load_series(files), small)
    assert volume.shape == (60, 40, 20)
    assert meta["cropped"] == {"x": True, "y": True, "z": False}
    assert 0 < meta["canvas_fraction_covered"] < 1
    assert volume.min() == pytest.approx(-1.0)


# ----------------------------------------------------------------------------------------- cache


def test_cached_volume_format(tmp_path):
    files = write_sphere_series(tmp_path / "dcm", n_slices=10)
    settings = PreprocessSettings(spacing_mm=(1.5, 1.5, 3.0), canvas=(80, 80, 30))
    cached = preprocess_series(files, tmp_path / "cache" / "series.v1", settings)
    assert cached.npy_path.name == "series.v1.npy" and cached.meta_path.name == "series.v1.json"
    assert not [p for p in cached.npy_path.parent.iterdir() if p.name.endswith(".tmp")]
    volume, meta = load_cached_volume(tmp_path / "cache" / "series.v1")
    assert isinstance(volume, np.memmap) and volume.dtype == np.float16
    assert volume.shape == (30, 80, 80) == cached.shape
    assert volume.min() >= -1.0 and volume.max() <= 1.0
    assert volume[0, 0, 0] == -1.0  # outside the acquired region: air
    assert meta["settings_fingerprint"] == settings.fingerprint()
    assert PreprocessSettings.from_dict(meta["settings"]) == settings
    for key in ("shape_zyx", "spacing_xyz_mm", "origin_lps_mm", "axes", "acquired_extent_mm", "cropped",
                "canvas_fraction_covered", "source", "seconds"):
        assert key in meta
    for key in ("rows", "cols", "n_slices", "pixel_spacing_mm", "slice_offsets_mm", "gap_min_mm", "gap_max_mm",
                "tilt_deg", "uneven_spacing", "hu_percentiles"):
        assert key in meta["source"]
    text = cached.meta_path.read_text()
    assert "1.2.826" not in text  # no UIDs
    assert str(tmp_path) not in text  # no paths
    in_memory, _ = load_cached_volume(cached.npy_path, mmap=False)
    assert not isinstance(in_memory, np.memmap)
    json.loads(text)


def test_fingerprint_is_stable_and_changes_with_settings():
    base = PreprocessSettings()
    assert base.fingerprint() == PreprocessSettings().fingerprint()
    assert base.fingerprint() == PreprocessSettings(hu_offset=400, hu_scale=600).fingerprint()
    assert base.fingerprint() != PreprocessSettings(canvas=(240, 240, 121)).fingerprint()
    assert base.fingerprint() != PreprocessSettings(antialias=False).fingerprint()


# ----------------------------------------------------------------------------------------- decoding


def recompress(files: list[Path], out_dir: Path, syntax) -> list[Path]:
    out_dir.mkdir()
    result = []
    for path in files:
        ds = pydicom.dcmread(path)
        ds.compress(syntax)
        result.append(out_dir / path.name)
        ds.save_as(result[-1], enforce_file_format=True)
    return result


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless], ids=["rle", "jpeg2000"])
def test_compressed_series_decode_to_same_hu(tmp_path, syntax):
    files = write_sphere_series(tmp_path / "plain", n_slices=5)
    compressed = recompress(files, tmp_path / "compressed", syntax)
    assert pydicom.dcmread(compressed[0]).file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(load_series(compressed).hu, load_series(files).hu)


def series_from_testdata(name: str, out_dir: Path, **overrides) -> list[Path]:
    """Three slices 2 mm apart that reuse one pydicom test file's (possibly compressed) pixel data."""
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} not bundled with this pydicom")
    template = pydicom.dcmread(path)
    for keyword, value in overrides.items():
        setattr(template, keyword, value)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for k in range(3):
        ds = copy.deepcopy(template)
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = k + 1
        x, y, z = (float(v) for v in template.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z + 2.0 * k]
        files.append(out_dir / f"{k}.dcm")
        ds.save_as(files[-1], enforce_file_format=True)
    return files


@pytest.mark.parametrize(
    "name", ["MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm", "MR_small_RLE.dcm"]
)
def test_bundled_compressed_files_match_uncompressed(tmp_path, name):
    compressed = load_series(series_from_testdata(name, tmp_path / "compressed"))
    plain = load_series(series_from_testdata("MR_small.dcm", tmp_path / "plain"))
    np.testing.assert_array_equal(compressed.hu, plain.hu)


def test_jpeg_extended_decodes_with_rescale(tmp_path):
    """A lossy 12-bit JPEG (process 2/4) slice, given CT geometry and a rescale."""
    geometry = dict(
        ImagePositionPatient=[0.0, 0.0, 0.0],
        ImageOrientationPatient=[1, 0, 0, 0, 1, 0],
        RescaleSlope=2,
        RescaleIntercept=-1024,
    )
    files = series_from_testdata("JPGExtended.dcm", tmp_path, **geometry)
    reference = pydicom.dcmread(files[0])
    assert reference.file_meta.TransferSyntaxUID == JPEGExtended12Bit
    stack = load_series(files)
    expected = reference.pixel_array.astype(np.float32) * 2 - 1024
    np.testing.assert_array_equal(stack.hu[1], expected)
    assert stack.hu.shape == (3, 1024, 256)


def test_truncated_file_is_bad_input(tmp_path):
    files = write_sphere_series(tmp_path, n_slices=5)
    raw = files[2].read_bytes()
    files[2].write_bytes(raw[: len(raw) - 3000])
    with pytest.raises(BadInputError) as info:
        load_series(files)
    assert info.value.code == "undecodable_pixels"
    assert info.value.reason == "slice 3 of 5: pixel data is shorter than the header says (truncated file?)"
    files[2].write_bytes(raw[:200])  # cut inside the header
    with pytest.raises(BadInputError) as info:
        load_series(files)
    assert "\n" not in info.value.reason and str(tmp_path) not in info.value.reason
    assert "3 of 5" in info.value.reason


def test_bundled_truncated_pixel_data_is_bad_input(tmp_path):
    with pytest.raises(BadInputError) as info:
        load_series(series_from_testdata("MR_truncated.dcm", tmp_path))
    assert info.value.code == "undecodable_pixels"
    assert "\n" not in info.value.reason


def test_corrupt_compressed_pixels_are_bad_input(tmp_path):
    files = recompress(write_sphere_series(tmp_path / "plain", n_slices=4), tmp_path / "j2k", JPEG2000Lossless)
    ds = pydicom.dcmread(files[1])
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(range(256)) * 8])  # J2K marker, then garbage
    ds.save_as(files[1], enforce_file_format=True)
    with pytest.raises(BadInputError) as info:
        load_series(files)
    assert info.value.code == "undecodable_pixels"
    assert "\n" not in info.value.reason
    print("undecodable reason:", info.value.reason)


# ----------------------------------------------------------------------------------------- axis-aligned fast path


def synthetic_stack(
    orientation,
    *,
    n_slices: int = 14,
    rows: int = 40,
    cols: int = 48,
    pixel_spacing=(1.1, 0.8),
    gaps_mm=None,
    jitter_mm: float = 0.0,
    shear_mm: float = 0.0,
    thickness: float | None = 2.5,
    seed: int = 0,
):
    """A SeriesStack built straight from headers (no files): random tissue with sharp edges, HU >= -950.

    ``gaps_mm`` are distances along the normal (default 2.5 mm); ``jitter_mm`` moves each slice's IPP randomly
    within its plane; ``shear_mm`` moves it by that much along the row direction per slice (a sheared stack).
    Slices are handed to analyze_stack in reverse order so that the sort is exercised.
    """
    from appliance.geometry import SliceHeader, analyze_stack
    from appliance.preprocess.series import SeriesStack

    rng = np.random.default_rng(seed)
    row_dir, col_dir = np.array(orientation[:3], float), np.array(orientation[3:], float)
    normal = np.cross(row_dir, col_dir)
    gaps = list(gaps_mm) if gaps_mm is not None else [2.5] * (n_slices - 1)
    offsets = np.concatenate([[0.0], np.cumsum(gaps)])
    start = np.array([-20.0, 13.0, -7.0]) - (cols - 1) / 2 * pixel_spacing[1] * row_dir
    start -= (rows - 1) / 2 * pixel_spacing[0] * col_dir + offsets[-1] / 2 * normal
    headers, planes = [], []
    for k, offset in enumerate(offsets):
        in_plane = rng.uniform(-jitter_mm, jitter_mm, 2) if jitter_mm else np.zeros(2)
        position = start + offset * normal + (in_plane[0] + k * shear_mm) * row_dir + in_plane[1] * col_dir
        headers.append(
            SliceHeader(
                sop_instance_uid=f"1.2.3.{k}",
                instance_number=k + 1,
                position=tuple(float(v) for v in position),
                orientation=tuple(float(v) for v in orientation),
                pixel_spacing=tuple(pixel_spacing),
                rows=rows,
                cols=cols,
                slice_thickness=thickness,
            )
        )
        smooth = ndimage.gaussian_filter(rng.normal(0.0, 400.0, (rows, cols)), 2.0)
        edges = np.where(rng.random((rows, cols)) < 0.1, 600.0, 0.0)
        planes.append(np.clip(smooth * 4 + edges, -950.0, 900.0).astype(np.float32))
    headers, planes = headers[::-1], planes[::-1]
    geometry = analyze_stack(headers)
    return SeriesStack(
        hu=np.stack([planes[i] for i in geometry.order]),
        geometry=geometry,
        positions_mm=np.array([headers[i].position for i in geometry.order], dtype=np.float64),
        thickness_mm=tuple(headers[i].slice_thickness for i in geometry.order),
    )


AXIAL = (1, 0, 0, 0, 1, 0)
FAST_PATH_CASES = {
    "axial": {"orientation": AXIAL},
    "axial_feet_first": {"orientation": (-1, 0, 0, 0, 1, 0)},
    "axial_uneven_no_thickness": {
        "orientation": AXIAL, "gaps_mm": [1.0, 3.0, 2.0, 4.5, 1.5, 2.5] * 2, "thickness": None
    },
    "axial_jitter": {"orientation": AXIAL, "jitter_mm": 1.7},
    "axial_sheared": {"orientation": AXIAL, "shear_mm": 0.9},
    "axial_rows_along_y": {"orientation": (0, -1, 0, 1, 0, 0)},
    "axial_flipped_rows": {"orientation": (-1, 0, 0, 0, -1, 0), "jitter_mm": 0.6},
    "coronal": {"orientation": (1, 0, 0, 0, 0, -1), "gaps_mm": [2.0, 3.5, 2.0, 1.0] * 3},
    "sagittal": {"orientation": (0, 1, 0, 0, 0, -1)},
    "sagittal_flipped": {"orientation": (0, -1, 0, 0, 0, 1), "jitter_mm": 1.0},
    "one_row": {"orientation": AXIAL, "n_slices": 3, "rows": 1, "cols": 30, "pixel_spacing": (4.0, 0.8)},
}
FAST_PATH_SETTINGS = {
    # Coarser than the source in-plane: antialiasing applies.
    "antialias_pads": PreprocessSettings(spacing_mm=(2.0, 1.9, 1.7), canvas=(40, 36, 30)),
    "no_antialias_pads": PreprocessSettings(spacing_mm=(2.0, 1.9, 1.7), canvas=(40, 36, 30), antialias=False),
    "antialias_crops": PreprocessSettings(spacing_mm=(1.7, 2.5, 3.0), canvas=(17, 13, 9)),
    "fine_crops": PreprocessSettings(spacing_mm=(0.7, 0.6, 0.9), canvas=(31, 37, 23), antialias=False),
}


@pytest.mark.parametrize("settings_name", sorted(FAST_PATH_SETTINGS))
@pytest.mark.parametrize("case", sorted(FAST_PATH_CASES))
def test_axis_aligned_fast_path_matches_general_path(case, settings_name):
    stack = synthetic_stack(**FAST_PATH_CASES[case], seed=len(case))
    settings = FAST_PATH_SETTINGS[settings_name]
    fast, fast_meta = resample_to_canvas(stack, settings)
    general, general_meta = resample_to_canvas(stack, settings, _force_general=True)
    assert fast_meta.pop("resample_path") == "axis_aligned"
    assert general_meta.pop("resample_path") == "general"
    assert fast.shape == general.shape == tuple(settings.canvas[::-1]) and fast.dtype == np.float32
    # Acquired values map above -0.95 > pad (-1), so pad marks exactly the voxels outside the acquired region.
    pad = settings.pad_value
    np.testing.assert_array_equal(fast == pad, general == pad)
    assert 0 < (general != pad).mean() <= 1
    np.testing.assert_allclose(fast, general, rtol=0, atol=1e-4)
    assert fast_meta == general_meta  # coverage, extents, crop flags, antialias sigmas


def test_axis_aligned_path_is_used_within_tolerance_only():
    """Direction cosines a hair off the axes still take the fast path (and agree); a real obliquity does not."""
    settings = FAST_PATH_SETTINGS["antialias_pads"]
    near = synthetic_stack((1, 2e-7, 0, -2e-7, 1, 0))
    fast, meta = resample_to_canvas(near, settings)
    general, _ = resample_to_canvas(near, settings, _force_general=True)
    assert meta["resample_path"] == "axis_aligned"
    np.testing.assert_array_equal(fast == settings.pad_value, general == settings.pad_value)
    np.testing.assert_allclose(fast, general, rtol=0, atol=1e-4)
    tilt = math.radians(5.0)
    oblique = synthetic_stack((1, 0, 0, 0, math.cos(tilt), -math.sin(tilt)))
    assert resample_to_canvas(oblique, settings)[1]["resample_path"] == "general"


def test_ge_tilted_series_takes_general_path(ge_volume):
    _, meta = ge_volume
    assert meta["resample_path"] == "general"


def test_tilted_sphere_takes_general_path_and_axial_sphere_fast_path(tmp_path):
    settings = PreprocessSettings(spacing_mm=(2.0, 2.0, 2.0), canvas=(40, 40, 40))
    tilted = load_series(write_sphere_series(tmp_path / "tilted", tilt_deg=12.0, n_slices=8, size=48))
    assert resample_to_canvas(tilted, settings)[1]["resample_path"] == "general"
    axial = load_series(write_sphere_series(tmp_path / "axial", n_slices=8, size=48))
    fast, meta = resample_to_canvas(axial, settings)
    general, _ = resample_to_canvas(axial, settings, _force_general=True)
    assert meta["resample_path"] == "axis_aligned"
    np.testing.assert_allclose(fast, general, rtol=0, atol=1e-4)
