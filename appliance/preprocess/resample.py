"""Resample a sorted slice stack onto an axis-aligned patient-space canvas.

The output grid follows the patient LPS axes, so gantry tilt is removed and every series comes out in the
same orientation: ``array[z, y, x]`` is the point ``origin + (x*sx, y*sy, z*sz)`` (x to the patient's left,
y to posterior, z to the head). Each output point is sampled bilinearly in the two source slices that
bracket it along the slice normal, each at its own in-plane coordinates, and the two are blended by
distance along the normal; this honours uneven gaps and per-slice positions.

When the slice plane is aligned with the patient axes (row and column directions each along an LPS axis, as
in ordinary axial, coronal and sagittal series), a voxel's in-plane position within a slice does not depend
on its coordinate along the normal, so each needed source slice is resampled once onto the output's in-plane
grid (separable linear interpolation) and output planes blend two of those. This gives the same values as the
general path up to float rounding, much faster; the path taken is recorded as ``meta["resample_path"]``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage, sparse

from appliance.preprocess.series import SeriesStack
from appliance.preprocess.settings import PreprocessSettings

AXES_CONVENTION = (
    "array[z, y, x] is the DICOM patient (LPS) point origin_mm + (x*sx, y*sy, z*sz): "
    "x to patient left, y to posterior, z to head"
)
# Prefilter in-plane only when the output is this much coarser than the source.
ANTIALIAS_MIN_FACTOR = 1.5
# Half slab of a lone slice without SliceThickness (only reachable with min_slices=1).
DEFAULT_HALF_SLAB_MM = 0.5
# Output points sampled per vectorised step (bounds memory to a few hundred MB).
POINTS_PER_CHUNK = 1 << 21
# Direction cosines within this of 0 / +-1 count as along a patient axis (axis-aligned fast path).
AXIS_ALIGNED_TOL = 1e-6


def half_slab_mm(stack: SeriesStack) -> np.ndarray:
    """Half of each slice's extent along the normal: half its thickness, else half the adjacent gap."""
    gaps = np.diff(np.asarray(stack.geometry.slice_offsets_mm))
    half = np.empty(stack.n_slices)
    for k, thickness in enumerate(stack.thickness_mm):
        if thickness is not None:
            half[k] = thickness / 2
        else:
            neighbours = [gaps[i] for i in (k - 1, k) if 0 <= i < len(gaps)]
            half[k] = min(neighbours) / 2 if neighbours else DEFAULT_HALF_SLAB_MM
    return half


def acquired_corners_mm(stack: SeriesStack) -> np.ndarray:
    """Corners (M, 3) of the acquired region: every slice's pixel-edge corners, end slabs included."""
    g = stack.geometry
    row_dir, col_dir, normal = (np.asarray(v) for v in (g.row_dir, g.col_dir, g.normal))
    row_sp, col_sp = g.pixel_spacing
    in_plane = np.array(
        [a * col_sp * row_dir + b * row_sp * col_dir for a in (-0.5, g.cols - 0.5) for b in (-0.5, g.rows - 0.5)]
    )
    corners = stack.positions_mm[:, None, :] + in_plane[None, :, :]
    half = half_slab_mm(stack)
    first = corners[0] - half[0] * normal
    last = corners[-1] + half[-1] * normal
    return np.concatenate([corners.reshape(-1, 3), first, last])


def antialias_sigmas_px(stack: SeriesStack, settings: PreprocessSettings) -> tuple[float, float]:
    """In-plane Gaussian sigmas (rows, cols) in source pixels, 0 where no prefilter is needed."""
    if not settings.antialias:
        return (0.0, 0.0)
    g = stack.geometry
    spacing = np.asarray(settings.spacing_mm, dtype=float)
    sigmas = []
    for direction, source_spacing in ((g.col_dir, g.pixel_spacing[0]), (g.row_dir, g.pixel_spacing[1])):
        # Output sample distance along this source axis (mixes axes when the slices are tilted).
        output_spacing = float(np.linalg.norm(np.asarray(direction) * spacing))
        factor = output_spacing / source_spacing
        sigmas.append((factor - 1) / 2 if factor > ANTIALIAS_MIN_FACTOR else 0.0)
    return (sigmas[0], sigmas[1])


def _patient_axis(direction: np.ndarray) -> int | None:
    """The LPS axis (0, 1, 2) a unit direction lies along, or None when it is oblique."""
    axis = int(np.argmax(np.abs(direction)))
    others = np.delete(np.abs(direction), axis)
    if others.max() > AXIS_ALIGNED_TOL or abs(abs(direction[axis]) - 1.0) > AXIS_ALIGNED_TOL:
        return None
    return axis


def _prefilter_matrix(n: int, sigma: float) -> np.ndarray | None:
    """The (n, n) matrix of the in-plane Gaussian prefilter along one axis (None: no prefilter).

    Built by filtering the identity exactly as ``gaussian_filter`` filters a slice, boundary mode included.
    """
    if sigma <= 0:
        return None
    return ndimage.gaussian_filter1d(np.eye(n), sigma, axis=0, mode="nearest")


def _sampling_matrix(index: np.ndarray, n: int, prefilter: np.ndarray | None) -> tuple[sparse.csr_array, slice]:
    """Sparse (len(index), used) matrix taking a source axis of length n to linear samples at ``index``.

    ``index`` is already clipped to [0, n - 1]; the prefilter, if any, is folded in. Only the source
    range ``used`` (a slice) is referenced, so callers can restrict work to it.
    """
    if n == 1:
        dense = np.ones((len(index), 1))
    else:
        i0 = np.minimum(np.floor(index).astype(np.intp), n - 2)
        weight = index - i0
        if prefilter is None:
            dense = np.zeros((len(index), n))
            dense[np.arange(len(index)), i0] = 1.0 - weight
            dense[np.arange(len(index)), i0 + 1] = weight
        else:
            dense = (1.0 - weight)[:, None] * prefilter[i0] + weight[:, None] * prefilter[i0 + 1]
    columns = np.flatnonzero(dense.any(axis=0))
    used = slice(int(columns[0]), int(columns[-1]) + 1)
    return sparse.csr_array(dense[:, used].astype(np.float32)), used


def resample_to_canvas(
    stack: SeriesStack, settings: PreprocessSettings, *, _force_general: bool = False
) -> tuple[np.ndarray, dict]:
    """Resample to the settings' canvas; returns float32 (Z, Y, X) mapped values and geometry metadata.

    ``_force_general`` (tests and benchmarks only) skips the axis-aligned fast path.
    """
    g = stack.geometry
    n_slices, rows, cols = stack.hu.shape
    row_dir, col_dir, normal = (np.asarray(v, dtype=float) for v in (g.row_dir, g.col_dir, g.normal))
    row_sp, col_sp = g.pixel_spacing
    offsets = np.asarray(g.slice_offsets_mm, dtype=float)
    gaps = np.diff(offsets)
    half = half_slab_mm(stack)
    sigma_r, sigma_c = antialias_sigmas_px(stack, settings)

    def prepared_slice(k: int) -> np.ndarray:
        """Slice k as it is sampled: air floor clipped, then prefiltered in-plane when needed."""
        # Clip the air floor first: scanners pad outside the reconstruction circle with values like -3024 HU
        # that would otherwise bleed into the prefilter and the interpolation.
        plane = np.maximum(stack.hu[k], np.float32(settings.hu_clip[0]))
        if sigma_r > 0 or sigma_c > 0:
            # Slice by slice, never across slices: that direction has uneven gaps and its own thickness.
            plane = ndimage.gaussian_filter(plane, sigma=(sigma_r, sigma_c), mode="nearest")
        return plane

    corners = acquired_corners_mm(stack)
    box_min, box_max = corners.min(axis=0), corners.max(axis=0)
    centre = (box_min + box_max) / 2
    spacing = np.asarray(settings.spacing_mm, dtype=float)
    nx, ny, nz = settings.canvas
    counts = np.array([nx, ny, nz])
    origin = centre - (counts - 1) / 2 * spacing
    axis_coords = [origin[a] + np.arange(counts[a]) * spacing[a] for a in range(3)]

    ipp_along_row = stack.positions_mm @ row_dir
    ipp_along_col = stack.positions_mm @ col_dir
    low_limit, high_limit = offsets[0] - half[0], offsets[-1] + half[-1]

    def bracket(along_normal: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(lower slice, upper slice, weight of the upper) for positions along the normal."""
        if n_slices > 1:
            lower = np.clip(np.searchsorted(offsets, along_normal, side="right") - 1, 0, n_slices - 2)
            weight_upper = np.clip((along_normal - offsets[lower]) / gaps[lower], 0.0, 1.0)
        else:
            lower = np.zeros(along_normal.shape, dtype=np.intp)
            weight_upper = np.zeros(along_normal.shape)
        return lower, np.minimum(lower + 1, n_slices - 1), weight_upper

    volume = np.empty((nz, ny, nx), dtype=np.float32)
    axes = (_patient_axis(row_dir), _patient_axis(col_dir))
    if not _force_general and None not in axes:
        path = "axis_aligned"
        a_row, a_col = axes
        a_normal = 3 - a_row - a_col
        # Each slice's samples along one output axis depend only on that axis' coordinate.
        along_row_1d = row_dir[a_row] * axis_coords[a_row]
        along_col_1d = col_dir[a_col] * axis_coords[a_col]
        along_normal_1d = normal[a_normal] * axis_coords[a_normal]
        lower, upper, weight_upper = bracket(along_normal_1d)
        normal_inside = (along_normal_1d >= low_limit) & (along_normal_1d <= high_limit)
        # volume viewed as [normal, col-axis, row-axis] (array axis 2 - a holds patient axis a).
        planes = volume.transpose(2 - a_normal, 2 - a_col, 2 - a_row)

        # The prefilter is linear and separable, so it folds into the interpolation matrices.
        prefilters = (_prefilter_matrix(rows, sigma_r), _prefilter_matrix(cols, sigma_c))
        weights_cache: dict[tuple[float, float], tuple] = {}

        def in_plane_weights(k: int) -> tuple:
            """Sampling matrices and inside masks of slice k along both output in-plane axes (cached by offset)."""
            key = (float(ipp_along_row[k]), float(ipp_along_col[k]))
            if key not in weights_cache:
                col_index = (along_row_1d - key[0]) / col_sp
                row_index = (along_col_1d - key[1]) / row_sp
                row_matrix, row_range = _sampling_matrix(np.clip(row_index, 0, rows - 1), rows, prefilters[0])
                col_matrix, col_range = _sampling_matrix(np.clip(col_index, 0, cols - 1), cols, prefilters[1])
                row_inside = (row_index >= -0.5) & (row_index <= rows - 0.5)
                col_inside = (col_index >= -0.5) & (col_index <= cols - 0.5)
                weights_cache[key] = (row_matrix, row_range, col_matrix.T.tocsr(), col_range, row_inside, col_inside)
            return weights_cache[key]

        resampled: dict[int, tuple[np.ndarray, np.ndarray]] = {}

        def resampled_slice(k: int) -> tuple[np.ndarray, np.ndarray]:
            """Slice k (prefiltered) bilinearly resampled onto the output in-plane grid, and its inside mask."""
            if k not in resampled:
                row_matrix, row_range, col_matrix_t, col_range, row_inside, col_inside = in_plane_weights(k)
                # Clip the air floor first: scanners pad outside the reconstruction circle with values like
                # -3024 HU that would otherwise bleed into the prefilter and the interpolation.
                plane = np.maximum(stack.hu[k, row_range, col_range], np.float32(settings.hu_clip[0]))
                values = np.asarray((row_matrix @ plane) @ col_matrix_t, dtype=np.float32)
                resampled[k] = (values, row_inside[:, None] & col_inside[None, :])
            return resampled[k]

        covered = 0
        pad = np.float32(settings.pad_value)
        # Visit planes in ascending position along the normal so that finished slices can be dropped.
        order = range(len(along_normal_1d)) if normal[a_normal] > 0 else range(len(along_normal_1d) - 1, -1, -1)
        for w in order:
            if not normal_inside[w]:
                planes[w] = pad
                continue
            lo, hi, wu = int(lower[w]), int(upper[w]), float(weight_upper[w])
            for k in [k for k in resampled if k < lo]:
                del resampled[k]
            if wu == 0.0:
                lower_values, inside = resampled_slice(lo)
                hu = lower_values
            elif wu == 1.0:
                upper_values, inside = resampled_slice(hi)
                hu = upper_values
            else:
                lower_values, lower_inside = resampled_slice(lo)
                upper_values, upper_inside = resampled_slice(hi)
                hu = np.float32(1.0 - wu) * lower_values + np.float32(wu) * upper_values
                # The nearer slice decides whether a point lies in the acquired region.
                inside = lower_inside if wu < 0.5 else upper_inside
            mapped = settings.map_hu(hu).astype(np.float32, copy=False)
            planes[w] = np.where(inside, mapped, pad)
            covered += int(inside.sum())
    else:
        path = "general"
        source = np.empty_like(stack.hu)
        for k in range(n_slices):
            source[k] = prepared_slice(k)
        flat_source = source.reshape(n_slices * rows, cols)

        def project(direction: np.ndarray, z_coords: np.ndarray) -> np.ndarray:
            """direction . p for every point of the chunk, shape (cz, ny, nx), built separably."""
            return (
                (direction[2] * z_coords)[:, None, None]
                + (direction[1] * axis_coords[1])[None, :, None]
                + (direction[0] * axis_coords[0])[None, None, :]
            )

        covered = 0
        z_per_chunk = max(1, POINTS_PER_CHUNK // (nx * ny))
        for z0 in range(0, nz, z_per_chunk):
            z_coords = axis_coords[2][z0 : z0 + z_per_chunk]
            along_normal = project(normal, z_coords)
            along_row = project(row_dir, z_coords)
            along_col = project(col_dir, z_coords)
            lower, upper, weight_upper = bracket(along_normal)

            def sample(
                k: np.ndarray, along_row: np.ndarray = along_row, along_col: np.ndarray = along_col
            ) -> tuple[np.ndarray, np.ndarray]:
                """Bilinear sample of slice k at its own in-plane coordinates, and whether that is inside it."""
                col_index = (along_row - ipp_along_row[k]) / col_sp
                row_index = (along_col - ipp_along_col[k]) / row_sp
                inside = (
                    (col_index >= -0.5) & (col_index <= cols - 0.5) & (row_index >= -0.5) & (row_index <= rows - 0.5)
                )
                # Clamping within the slice keeps the bilinear stencil from reaching the next slice's rows.
                flat_row = k * rows + np.clip(row_index, 0, rows - 1)
                values = ndimage.map_coordinates(
                    flat_source,
                    [flat_row.ravel(), np.clip(col_index, 0, cols - 1).ravel()],
                    order=1,
                    mode="nearest",
                    prefilter=False,
                    output=np.float32,
                ).reshape(k.shape)
                return values, inside

            lower_values, lower_inside = sample(lower)
            upper_values, upper_inside = sample(upper)
            hu = (1.0 - weight_upper) * lower_values + weight_upper * upper_values
            # The nearer slice decides whether a point lies in the acquired region (matters with tilt).
            inside = np.where(weight_upper < 0.5, lower_inside, upper_inside)
            inside &= (along_normal >= low_limit) & (along_normal <= high_limit)
            mapped = settings.map_hu(hu).astype(np.float32)
            mapped[~inside] = settings.pad_value
            volume[z0 : z0 + len(z_coords)] = mapped
            covered += int(inside.sum())

    canvas_size = counts * spacing
    box_size = box_max - box_min
    meta = {
        "shape_zyx": [int(nz), int(ny), int(nx)],
        "spacing_xyz_mm": [float(v) for v in spacing],
        "origin_lps_mm": [float(v) for v in origin],
        "axes": AXES_CONVENTION,
        "pad_value": float(settings.pad_value),
        "acquired_bbox_lps_mm": {"min": [float(v) for v in box_min], "max": [float(v) for v in box_max]},
        "acquired_extent_mm": {axis: float(box_size[a]) for a, axis in enumerate("xyz")},
        "canvas_extent_mm": {axis: float(canvas_size[a]) for a, axis in enumerate("xyz")},
        "cropped": {axis: bool(box_size[a] > canvas_size[a] + 1e-6) for a, axis in enumerate("xyz")},
        "canvas_fraction_covered": covered / float(nx * ny * nz),
        "antialias_sigma_px": {"rows": float(sigma_r), "cols": float(sigma_c)},
        "resample_path": path,
    }
    return volume, meta
