"""IEC beam axes, beam grids, CT -> beam's-eye view -> CT round trips and conservation of integral dose."""

from __future__ import annotations

import numpy as np
import pytest

from dota.data.ct import beam_frame
from dota.errors import InputError
from dota.plan import bev
from dota.plan.geometry import PatientCT, ct_from_array, iec_beam_axes


@pytest.mark.parametrize("gantry, couch, position, expected", [
    (0, 0, "HFS", (0, 1, 0)),      # from anterior (above) towards posterior (+y)
    (90, 0, "HFS", (-1, 0, 0)),    # source at the patient's left (+x), beam travels -x
    (180, 0, "HFS", (0, -1, 0)),
    (270, 0, "HFS", (1, 0, 0)),    # from the patient's right
    (90, 90, "HFS", (0, 0, 1)),    # couch 90: head points to IEC -X, beam travels towards the head
    (0, 0, "HFP", (0, -1, 0)),     # prone: the beam from above enters the back
    (90, 0, "FFS", (1, 0, 0)),     # feet first: IEC +X is the patient's right
])
def test_iec_beam_direction(gantry, couch, position, expected):
    axes = iec_beam_axes(gantry, couch, position)
    np.testing.assert_allclose(axes.direction, expected, atol=1e-12)
    # right-handed: direction x y_axis = x_axis, all orthonormal
    np.testing.assert_allclose(np.cross(axes.direction, axes.y_axis), axes.x_axis, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm([axes.direction, axes.x_axis, axes.y_axis], axis=1), 1.0)


def test_spot_axes_at_gantry_zero_hfs():
    axes = iec_beam_axes(0, 0, "HFS")
    np.testing.assert_allclose(axes.x_axis, (1, 0, 0), atol=1e-12)  # IEC X: patient left
    np.testing.assert_allclose(axes.y_axis, (0, 0, 1), atol=1e-12)  # IEC Y: towards the gantry, superior


@pytest.mark.parametrize("gantry", [0.0, 37.0, 90.0, 200.0, 300.0])
def test_agrees_with_dota_data_beam_frame_for_hfs(gantry):
    d, u, v = beam_frame(gantry, 0.0)  # (z, y, x) components
    axes = iec_beam_axes(gantry, 0.0, "HFS")
    np.testing.assert_allclose(axes.direction, d[::-1], atol=1e-12)
    np.testing.assert_allclose(axes.y_axis, u[::-1], atol=1e-12)
    # dota.data.ct takes v = d x u in (z, y, x) component order, a left-handed ordering: its block columns
    # run along -X (mirror image; the engines' blocks are laterally symmetric, so beamlets do not change)
    np.testing.assert_allclose(axes.x_axis, -v[::-1], atol=1e-12)
    d_c, _, _ = beam_frame(gantry, 25.0)
    np.testing.assert_allclose(iec_beam_axes(gantry, 25.0).direction, d_c[::-1], atol=1e-12)


def test_bad_patient_position():
    with pytest.raises(InputError, match="patient position"):
        iec_beam_axes(0, 0, "SITTING")


def _ramp_ct(direction=None) -> tuple[PatientCT, np.ndarray]:
    shape = (40, 44, 48)
    ct = PatientCT(hu=np.zeros(shape, np.float32), spacing_mm=(2.5, 3.0, 3.0), origin_mm=(-70.0, -60.0, -45.0),
                   direction=np.eye(3) if direction is None else direction)
    coeff = np.array([2.0, -1.5, 3.0])  # HU per mm along x, y, z
    xyz = ct.index_to_patient(np.argwhere(np.ones(shape, bool))).reshape(*shape, 3)
    hu = (xyz @ coeff).astype(np.float32)
    return PatientCT(hu=hu, spacing_mm=ct.spacing_mm, origin_mm=ct.origin_mm, direction=ct.direction), coeff


@pytest.mark.parametrize("direction", [None, np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])])
def test_round_trip_ct_bev_ct_is_exact_for_a_linear_field(direction):
    """Trilinear resampling reproduces a linear field exactly: any wrong axis, sign or offset shows."""
    ct, coeff = _ramp_ct(direction)
    axes = iec_beam_axes(33.0, 20.0)
    iso = ct.index_to_patient(np.array([20.0, 22.0, 24.0]))
    grid = bev.make_beam_grid(ct, axes, iso, np.array([[0.0, 0.0], [8.0, -6.0]]))
    hu_grid = bev.resample_ct_to_grid(ct, grid)
    prc = np.argwhere(np.ones(grid.shape, bool))
    xyz = grid.index_to_patient(prc)
    kji = ct.patient_to_index(xyz)
    interior = np.all((kji > 1) & (kji < np.asarray(ct.shape) - 2), axis=1)
    assert interior.sum() > 1000
    np.testing.assert_allclose(hu_grid.reshape(-1)[interior], (xyz @ coeff)[interior], atol=2e-3)
    # ... and back: the carry of a linear field onto CT voxels (sub-point average) is the field itself
    field = (xyz @ coeff).reshape(grid.shape)
    out = np.zeros(ct.shape, np.float64)
    bev.GridToCT(ct, grid).carry(field, out)
    ct_xyz = ct.index_to_patient(np.argwhere(np.ones(ct.shape, bool)))
    g = grid.patient_to_index(ct_xyz)
    deep = np.all((g > 2) & (g < np.asarray(grid.shape) - 3), axis=1)
    assert deep.sum() > 500
    np.testing.assert_allclose(out.reshape(-1)[deep], (ct_xyz @ coeff)[deep], atol=2e-3)


def _water_ct(spacing=(2.5, 3.0, 3.0), shape=(70, 80, 80)) -> PatientCT:
    hu = np.full(shape, -1000.0, np.float32)
    hu[5:-5, 5:-5, 5:-5] = 0.0
    origin = tuple(-(n - 1) * s / 2 for n, s in zip(shape[::-1], spacing[::-1]))
    return ct_from_array(hu, spacing, origin)


@pytest.mark.parametrize("gantry, couch, spot", [(45.0, 0.0, (0.0, 0.0)), (120.0, 15.0, (3.3, -4.7)),
                                                (200.0, -30.0, (5.0, 5.0))])
def test_deposition_conserves_integral_dose(gantry, couch, spot):
    from dota.engines import get_engine

    ct = _water_ct()
    axes = iec_beam_axes(gantry, couch)
    grid = bev.make_beam_grid(ct, axes, (0.0, 0.0, 0.0), np.array([spot]))
    hu_grid = bev.resample_ct_to_grid(ct, grid)
    (window,) = bev.spot_windows(grid, bev.first_body_slice(hu_grid), np.array([spot]))
    block = bev.cut_block(hu_grid, window)
    dose = get_engine("analytic").dose(block, np.array([130.0]))[0]
    dose_grid = np.zeros(grid.shape)
    bev.deposit_window(dose_grid, window, dose)
    assert dose_grid.sum() == pytest.approx(dose.sum(dtype=np.float64), rel=1e-9)  # splatting keeps the sum
    out = np.zeros(ct.shape)
    bev.GridToCT(ct, grid).carry(dose_grid, out)
    # dose the engine puts in the air in front of an oblique surface may lie outside the CT box: count
    # the beam-grid voxels whose centres lie inside the CT
    kji = ct.patient_to_index(grid.index_to_patient(np.argwhere(np.ones(grid.shape, bool)))).reshape(*grid.shape, 3)
    inside = np.all((kji > -0.5) & (kji < np.asarray(ct.shape) - 0.5), axis=-1)
    bev_integral = dose_grid[inside].sum() * np.prod(grid.voxel_mm)
    ct_integral = out.sum() * ct.voxel_volume_mm3
    assert ct_integral == pytest.approx(bev_integral, rel=0.01)
    # and the dose lies where the spot is: its lateral centroid on the spot's axis (within 0.5 mm)
    xyz = ct.index_to_patient(np.argwhere(out > 0))
    centroid = (xyz * out[out > 0][:, None]).sum(0) / out.sum()
    rel = centroid - np.asarray(grid.isocenter_mm)
    assert rel @ axes.x_axis == pytest.approx(spot[0], abs=0.5)
    assert rel @ axes.y_axis == pytest.approx(spot[1], abs=0.5)


def test_spot_window_starts_before_the_body_and_skips_air_only_spots():
    ct = _water_ct()
    grid = bev.make_beam_grid(ct, iec_beam_axes(0.0), (0.0, 0.0, 0.0), np.array([[0.0, 0.0], [400.0, 0.0]]))
    hu_grid = bev.resample_ct_to_grid(ct, grid)
    first = bev.first_body_slice(hu_grid)
    w_in, w_out = bev.spot_windows(grid, first, np.array([[0.0, 0.0], [400.0, 0.0]]))
    assert w_out is None
    block = bev.cut_block(hu_grid, w_in)
    assert block.shape == (150, 24, 24)
    assert block[0].max() <= -400 < block[1:3].max()  # one slice of air, then the body
    assert w_in.residual == (0.0, 0.0)
