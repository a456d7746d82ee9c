import numpy as np
import pytest

from dota.constants import ENGINE_ENERGY_RANGE_MEV
from dota.engines import get_engine
from dota.engines.analytic import AnalyticEngine
from dota.errors import InputError
from dota.physics import (
    HU_CALIBRATION_NAME,
    beam_extent_wed_mm,
    bragg_sigma_mm,
    csda_range_mm,
    hu_to_rsp,
    load_pstar,
    mcs_sigma_water_mm,
    spot_sigma_mm,
)

PSTAR = load_pstar()
ENGINE = AnalyticEngine()


def _distal_80_mm(profile: np.ndarray, step_mm: float) -> float:
    """Distal 80 % point of a depth profile sampled at voxel centres, by linear interpolation."""
    z = (np.arange(len(profile)) + 0.5) * step_mm
    i = int(np.argmax(profile))
    level = 0.8 * profile[i]
    j = i + int(np.argmax(profile[i:] < level))
    assert j > i, "no distal fall-off inside the block"
    return float(z[j - 1] + (profile[j - 1] - level) / (profile[j - 1] - profile[j]) * step_mm)


def test_registered_with_attrs():
    engine = get_engine("analytic")
    assert isinstance(engine, AnalyticEngine)
    attrs = engine.file_attrs()
    assert attrs["engine"] == "analytic" and attrs["primaries"] == 0
    assert attrs["hu_calibration"] == HU_CALIBRATION_NAME and attrs["engine_version"]


@pytest.mark.parametrize("depth_step_mm", [2.0, 0.5])
def test_r80_in_water_matches_pstar(depth_step_mm):
    """R80 of the laterally integrated depth dose within max(1 mm, 1 %) of the PSTAR CSDA range, 70-225 MeV."""
    energies = PSTAR.energy_mev[(PSTAR.energy_mev >= 70) & (PSTAR.energy_mev <= 225)]
    for energy, csda in zip(energies, PSTAR.csda_range_mm[: len(energies)]):
        length = int(np.ceil((csda + 30.0) / depth_step_mm))
        dose = ENGINE.dose(np.zeros((1, length, 24, 24), np.float32), [energy], (depth_step_mm, 2.0, 2.0))[0]
        r80 = _distal_80_mm(dose.sum(axis=(1, 2)), depth_step_mm)
        assert abs(r80 - csda) <= max(1.0, 0.01 * csda), f"{energy} MeV: R80 {r80:.2f} mm, CSDA {csda:.2f} mm"


def test_output_shape_dtype_symmetry_and_units():
    dose = ENGINE.dose(np.zeros((150, 24, 24), np.int16), 150.0)
    assert dose.shape == (1, 150, 24, 24) and dose.dtype == np.float32
    d = dose[0]
    np.testing.assert_allclose(d, d[:, ::-1, :], rtol=1e-5, atol=1e-7 * d.max())
    np.testing.assert_allclose(d, d[:, :, ::-1], rtol=1e-5, atol=1e-7 * d.max())
    np.testing.assert_allclose(d, d.transpose(0, 2, 1), rtol=1e-5, atol=1e-7 * d.max())
    # a few Gy per 1e9 protons at the peak of a ~4 mm spot
    assert 1.0 < d.max() < 5.0
    # energy balance: deposited energy (Gy x kg) per proton ~ 93-99 % of 150 MeV (some nuclear energy leaves)
    mass_kg = 8e-6  # 2 mm cube of water
    deposited_mev = d.sum() * mass_kg / 1e9 / 1.602176634e-13
    assert 0.90 * 150 < deposited_mev < 0.99 * 150


def test_dose_zero_beyond_range():
    for energy in (70.0, 130.0, 200.0):
        dose = ENGINE.dose(np.zeros((1, 150, 24, 24)), [energy])[0]
        extent = beam_extent_wed_mm(energy)
        assert extent < csda_range_mm(energy) + 25.0
        first_empty = int(np.ceil(extent / 2.0))
        assert first_empty < 150
        assert np.all(dose[first_empty:] == 0)
        three_sigma = int(np.ceil((csda_range_mm(energy) + 3 * bragg_sigma_mm(energy)) / 2.0))
        assert dose[three_sigma:].max() < 1e-3 * dose.max()


def _lateral_sigma_mm(slice_dose: np.ndarray, voxel_mm: float = 2.0) -> float:
    profile = slice_dose.sum(axis=1)
    x = (np.arange(len(profile)) - (len(profile) - 1) / 2) * voxel_mm
    return float(np.sqrt((profile * x**2).sum() / profile.sum()))


def test_lateral_sigma_grows_with_depth_as_modelled():
    energy = 180.0
    dose = ENGINE.dose(np.zeros((1, 150, 32, 32)), [energy])[0]
    depths = np.array([5, 40, 80, 110])
    sigmas = np.array([_lateral_sigma_mm(dose[i]) for i in depths])
    assert np.all(np.diff(sigmas) > 0)
    expected = np.sqrt(spot_sigma_mm(energy) ** 2 + mcs_sigma_water_mm((depths + 0.5) * 2.0, energy) ** 2 + 4.0 / 12)
    np.testing.assert_allclose(sigmas, expected, rtol=0.03)


@pytest.mark.parametrize("hu", [1200.0, 800.0])
def test_bone_slab_pulls_range_back(hu):
    g = np.zeros((2, 150, 24, 24), np.float32)
    g[1, 20:30] = hu  # 20 mm of bone
    dose = ENGINE.dose(g, [150.0, 150.0])
    shift = _distal_80_mm(dose[0].sum((1, 2)), 2.0) - _distal_80_mm(dose[1].sum((1, 2)), 2.0)
    assert shift == pytest.approx((hu_to_rsp(hu) - 1.0) * 20.0, abs=0.5)
    assert shift > 5


def test_lung_slab_pushes_range_out():
    g = np.zeros((2, 150, 24, 24), np.float32)
    g[1, 20:40] = -750.0  # 40 mm of lung
    dose = ENGINE.dose(g, [120.0, 120.0])
    shift = _distal_80_mm(dose[1].sum((1, 2)), 2.0) - _distal_80_mm(dose[0].sum((1, 2)), 2.0)
    assert shift == pytest.approx((1.0 - hu_to_rsp(-750.0)) * 40.0, abs=0.5)


def test_bone_beside_the_axis_shifts_only_that_side():
    g = np.zeros((1, 150, 24, 24), np.float32)
    g[0, 20:35, :, 12:] = 1200.0  # bone covers the half of the spot with col >= 12
    dose = ENGINE.dose(g, [140.0])[0]
    bone_side = _distal_80_mm(dose[:, :, 15:].sum((1, 2)), 2.0)
    water_side = _distal_80_mm(dose[:, :, :9].sum((1, 2)), 2.0)
    assert water_side - bone_side == pytest.approx((hu_to_rsp(1200.0) - 1.0) * 30.0, abs=3.0)
    # the peak of each half is where its own water-equivalent depth puts it
    peak_shift_voxels = dose[:, 11, 4].argmax() - dose[:, 11, 19].argmax()
    assert abs(peak_shift_voxels - (hu_to_rsp(1200.0) - 1.0) * 30.0 / 2.0) <= 1.5


def test_air_gap_before_water():
    g = np.zeros((2, 150, 24, 24), np.float32)
    g[1, :25] = -1000.0  # 50 mm of air at the entrance
    dose = ENGINE.dose(g, [100.0, 100.0])
    shift = _distal_80_mm(dose[1].sum((1, 2)), 2.0) - _distal_80_mm(dose[0].sum((1, 2)), 2.0)
    assert shift == pytest.approx(50.0 * (1 - hu_to_rsp(-1000.0)), abs=0.5)
    # beam spreads in the air gap less than in water, but the drift after scattering widens it
    assert dose[1, :25].max() > 0


def test_custom_spot_size():
    wide = AnalyticEngine(spot_sigma_mm=6.0).dose(np.zeros((150, 24, 24)), 200.0)[0]
    narrow = AnalyticEngine(spot_sigma_mm=3.0).dose(np.zeros((150, 24, 24)), 200.0)[0]
    assert _lateral_sigma_mm(wide[10]) > _lateral_sigma_mm(narrow[10]) + 2.0
    with pytest.raises(InputError):
        AnalyticEngine(spot_sigma_mm=0.0)


@pytest.mark.parametrize(
    "energy", [ENGINE_ENERGY_RANGE_MEV[0] - 1.0, ENGINE_ENERGY_RANGE_MEV[1] + 1.0, np.nan, np.inf]
)
def test_bad_energy_raises(energy):
    with pytest.raises(InputError):
        ENGINE.dose(np.zeros((1, 20, 4, 4)), [energy])


def test_bad_geometry_raises():
    g = np.zeros((1, 20, 4, 4), np.float32)
    g[0, 3, 1, 1] = np.nan
    with pytest.raises(InputError):
        ENGINE.dose(g, [100.0])
    with pytest.raises(InputError):
        ENGINE.dose(np.zeros((20, 4)), [100.0])
    with pytest.raises(InputError):
        ENGINE.dose(np.zeros((2, 20, 4, 4)), [100.0])
    with pytest.raises(InputError):
        ENGINE.dose(np.zeros((1, 20, 4, 4)), [100.0], voxel_mm=(2.0, -1.0, 2.0))


def test_batch_equals_single():
    rng = np.random.default_rng(0)
    from dota.physics import make_phantom

    g = np.stack([make_phantom("heterogeneous", rng) for _ in range(3)])
    e = np.array([80.0, 150.0, 210.0])
    batch = ENGINE.dose(g, e)
    for i in range(3):
        np.testing.assert_array_equal(batch[i], ENGINE.dose(g[i], e[i])[0])


def test_lateral_profiles_match_float64_voxel_integrals_in_both_tails():
    """Each voxel's Gaussian integral (one erfc per edge, three cases by side) against float64 scipy."""
    from scipy.special import ndtr

    from dota.engines.analytic import _lateral_profiles

    rng = np.random.default_rng(3)
    count, spacing = 24, 2.0
    centre = (np.arange(-3, 27) - 11.5) * spacing + rng.uniform(-1.0, 1.0, 30)  # some off-lattice, some outside
    centre[:5] = (np.arange(5) - 2.0) * spacing  # centres exactly on voxel edges
    sigma = rng.uniform(0.5, 9.0, size=(7, centre.size))
    got = _lateral_profiles(centre, sigma, count, spacing).double().numpy()
    edges = (np.arange(count + 1) - count / 2.0) * spacing
    z = (edges[None, None, :] - centre[None, :, None]) / sigma[:, :, None]
    lo, hi = z[..., :-1], z[..., 1:]
    # float64, on the small side: ndtr(hi) - ndtr(lo) = ndtr(-lo) - ndtr(-hi)
    want = np.where(lo + hi > 0, ndtr(-lo) - ndtr(-hi), ndtr(hi) - ndtr(lo)) / spacing
    assert got.shape == want.shape
    peak = want.max()
    assert np.abs(got - want).max() <= 1e-6 * peak
    tails = want > 1e-30
    assert np.max(np.abs(got - want)[tails] / want[tails]) < 1e-4  # relative precision down to 1e-30
    np.testing.assert_allclose(got.sum(axis=2) * spacing, ndtr(-lo[..., 0]) - ndtr(-hi[..., -1]), atol=1e-6)


@pytest.mark.parametrize("rows, cols", [(24, 24), (24, 30), (7, 5)])
def test_lattice_profiles_equal_the_general_ones_bit_for_bit(rows, cols):
    """The square-voxel path (one erfc table for both axes) gives the general function's numbers exactly."""
    import torch

    from dota.engines.analytic import _lateral_profiles, _lattice_profiles

    rng = np.random.default_rng(rows * cols)
    idx_r, idx_c = rng.integers(0, rows, 150), rng.integers(0, cols, 150)
    sigma = rng.uniform(0.5, 9.0, size=(20, 150))
    want_y = _lateral_profiles((idx_r - (rows - 1) / 2.0) * 2.0, sigma, rows, 2.0)
    want_x = _lateral_profiles((idx_c - (cols - 1) / 2.0) * 2.0, sigma, cols, 2.0)
    got_y, got_x = _lattice_profiles(idx_r, idx_c, sigma, rows, cols, 2.0)
    assert torch.equal(got_y, want_y) and torch.equal(got_x, want_x)
