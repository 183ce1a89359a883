"""Slice-stack geometry: sorting along the normal, tilt, uneven gaps and the rejection rules."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pydicom
import pytest

from appliance.errors import BadInputError
from appliance.geometry import GeometryError, SliceHeader, analyze_stack

from conftest import GE_DIR
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def ge_headers() -> list[SliceHeader]:
    if not GE_DIR.is_dir():
        pytest.skip(f"real GE test series not found at {GE_DIR} (the repo's sibling ../shared)")
    return [
        SliceHeader.from_dataset(pydicom.dcmread(path, stop_before_pixels=True))
        for path in sorted(GE_DIR.glob("*.dcm"))
    ]


def axial_headers(z_positions, *, orientation=AXIAL, instance_numbers=None) -> list[SliceHeader]:
    numbers = instance_numbers or list(range(1, len(z_positions) + 1))
    return [
        SliceHeader(
            sop_instance_uid=f"1.2.3.{i}",
            instance_number=numbers[i],
            position=(-100.0, -100.0, float(z)),
            orientation=orientation,
            pixel_spacing=(0.8, 0.8),
            rows=256,
            cols=256,
            slice_thickness=2.0,
        )
        for i, z in enumerate(z_positions)
    ]


def test_ge_series_tilt_and_uneven_gaps():
    headers = ge_headers()
    geometry = analyze_stack(headers)
    assert geometry.tilt_deg == pytest.approx(18.5, abs=0.05)
    assert min(geometry.gaps_mm) == pytest.approx(1.08, abs=0.01)
    assert max(geometry.gaps_mm) == pytest.approx(6.99, abs=0.01)
    assert geometry.uneven_spacing is True
    assert geometry.n_slices == 28
    assert geometry.normal == pytest.approx((0.0, 0.3173, 0.9483), abs=1e-3)
    offsets = [headers[i].position[2] for i in geometry.order]
    assert offsets == sorted(offsets)
    assert list(geometry.slice_offsets_mm) == sorted(geometry.slice_offsets_mm)


def test_shuffled_input_gives_same_sorted_result():
    headers = ge_headers()
    shuffled_index = list(range(len(headers)))
    random.Random(7).shuffle(shuffled_index)
    shuffled = [headers[i] for i in shuffled_index]
    reference, result = analyze_stack(headers), analyze_stack(shuffled)
    assert [shuffled[i].sop_instance_uid for i in result.order] == [
        headers[i].sop_instance_uid for i in reference.order
    ]
    assert result.slice_offsets_mm == pytest.approx(reference.slice_offsets_mm)
    assert result.tilt_deg == pytest.approx(reference.tilt_deg)


def test_ge_series_with_a_slice_removed_is_missing_slice():
    headers = ge_headers()
    with pytest.raises(GeometryError) as info:
        analyze_stack(headers[:6] + headers[7:])
    assert info.value.code == "missing_slice"


def test_regular_series_with_one_slice_removed_is_missing_slice():
    headers = axial_headers([i * 2.5 for i in range(40)])
    analyze_stack(headers)
    with pytest.raises(GeometryError) as info:
        analyze_stack(headers[:22] + headers[23:])
    assert info.value.code == "missing_slice"
    assert "\n" not in info.value.reason


def test_missing_slice_found_by_gaps_alone_without_instance_numbers():
    headers = [replace(h, instance_number=None) for h in axial_headers([i * 6.0 for i in range(30)])]
    with pytest.raises(GeometryError) as info:
        analyze_stack(headers[:23] + headers[24:])
    assert info.value.code == "missing_slice"
    assert info.value.reason == "gap of 12.0 mm between slices 23 and 24 of 29 where 6.0 mm is usual"


def test_deliberately_variable_spacing_is_accepted():
    z = [0.0]
    for gap in [5.0] * 10 + [7.0] * 5 + [5.0] * 10:  # 7 mm is not a whole multiple of 5 mm
        z.append(z[-1] + gap)
    geometry = analyze_stack(axial_headers(z))
    assert geometry.uneven_spacing is True
    assert geometry.tilt_deg == pytest.approx(0.0, abs=1e-9)


def test_descending_instance_numbers_are_fine():
    z = [i * 3.0 for i in range(10)]
    geometry = analyze_stack(axial_headers(z, instance_numbers=list(range(10, 0, -1))))
    assert geometry.uneven_spacing is False


def test_mixed_orientation():
    headers = axial_headers([i * 3.0 for i in range(10)])
    c, s = math.cos(math.radians(5)), math.sin(math.radians(5))
    headers[4] = replace(headers[4], orientation=(1.0, 0.0, 0.0, 0.0, c, -s))
    with pytest.raises(GeometryError) as info:
        analyze_stack(headers)
    assert info.value.code == "mixed_orientation"
    assert "slice 5 of 10" in info.value.reason


def test_mixed_pixel_spacing_and_matrix():
    headers = axial_headers([i * 3.0 for i in range(10)])
    with pytest.raises(GeometryError) as info:
        analyze_stack(headers[:3] + [replace(headers[3], pixel_spacing=(0.7, 0.7))] + headers[4:])
    assert info.value.code == "mixed_pixel_spacing"
    with pytest.raises(GeometryError) as info:
        analyze_stack(headers[:3] + [replace(headers[3], rows=512)] + headers[4:])
    assert info.value.code == "mixed_matrix"


def test_duplicate_position():
    headers = axial_headers([i * 3.0 for i in range(10)])
    duplicate = replace(headers[5], sop_instance_uid="9.9.9", instance_number=11)
    with pytest.raises(GeometryError) as info:
        analyze_stack(headers + [duplicate])
    assert info.value.code == "duplicate_slice"
    assert "15.00 mm" in info.value.reason


def test_too_few_slices():
    with pytest.raises(GeometryError) as info:
        analyze_stack(axial_headers([0.0, 3.0]))
    assert info.value.code == "too_few_slices"


def test_missing_ipp_is_missing_geometry():
    if not GE_DIR.is_dir():
        pytest.skip(f"real GE test series not found at {GE_DIR}")
    ds = pydicom.dcmread(sorted(GE_DIR.glob("*.dcm"))[0], stop_before_pixels=True)
    del ds.ImagePositionPatient
    with pytest.raises(GeometryError) as info:
        SliceHeader.from_dataset(ds)
    assert info.value.code == "missing_geometry"
    assert isinstance(info.value, BadInputError)


def test_malformed_geometry_is_missing_geometry():
    ds = pydicom.Dataset()
    ds.ImagePositionPatient = [0, 0]
    ds.ImageOrientationPatient = list(AXIAL)
    ds.PixelSpacing = [1, 1]
    ds.Rows, ds.Columns = 4, 4
    with pytest.raises(GeometryError) as info:
        SliceHeader.from_dataset(ds)
    assert info.value.code == "missing_geometry"
    ds.ImagePositionPatient = [0, 0, 0]
    ds.PixelSpacing = [0, 1]
    with pytest.raises(GeometryError):
        SliceHeader.from_dataset(ds)


def test_header_round_trips_through_dict():
    header = ge_headers()[3]
    assert SliceHeader.from_dict(header.to_dict()) == header


def test_numbering_hole_in_a_regular_stack_is_a_quirk_not_a_loss():
    """Positions 2 mm apart without a hole: an InstanceNumber jump (scanner numbering) is accepted."""
    numbers = [1, 2, 3, 4, 6, 7, 8, 9]
    geometry = analyze_stack(axial_headers([2.0 * i for i in range(8)], instance_numbers=numbers))
    assert geometry.n_slices == 8 and not geometry.uneven_spacing


def test_numbering_hole_in_an_uneven_stack_is_missing_slice():
    z = [0, 4, 8, 12, 13, 20, 27, 34]  # GE-like: thickness changes mid-series
    numbers = [1, 2, 3, 4, 5, 6, 8, 9]
    with pytest.raises(GeometryError) as e:
        analyze_stack(axial_headers(z, instance_numbers=numbers))
    assert e.value.code == "missing_slice"
