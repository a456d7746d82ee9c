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
    """Each voxel's Gaussian integral (one erfc per edge, three cases by side) against float64 scipy: to
    float32 precision down to 1e-10 per mm, and 0 where erfc falls below the engine's cut."""
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
    from dota.engines.analytic import ERFC_TAIL

    tails = want > 1e-10
    assert np.max(np.abs(got - want)[tails] / want[tails]) < 1e-4  # relative precision down to 1e-10
    # below, the cut (erfc < ERFC_TAIL is 0) adds at most ERFC_TAIL / (2 spacing) to each voxel's error
    assert np.all(np.abs(got - want) <= 1e-4 * want + ERFC_TAIL / (2 * spacing))
    assert np.all(got[want < 0.1 * ERFC_TAIL / (2 * spacing)] == 0)
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


# -- the fast engine against the engine as it was (tests/engines/analytic_reference.py) -------------------


def _reference_cases():
    """Heterogeneous blocks (phantoms with bone, lung and air; slabs of bone and air, one beside the axis; air
    columns beside the body that carry the beam to the end of the block), several energies."""
    from dota.physics import make_phantom

    rng = np.random.default_rng(11)
    blocks = [make_phantom(kind, rng) for kind in ("heterogeneous", "lung", "bone", "slab")]
    g = np.zeros((150, 24, 24), np.float32)
    g[10:20] = 1500.0  # a bone slab
    g[30:45, :, 14:] = -1000.0  # air beside the axis
    blocks.append(g)
    g = np.full((150, 24, 24), -1000.0, np.float32)  # a head in air: air columns reach the end of the block
    g[5:, 4:20, 3:21] = rng.integers(-100, 1300, size=(145, 16, 18))
    blocks.append(g)
    g = np.zeros((150, 24, 24), np.float32)
    g[:25] = -1000.0  # air gap before water
    blocks.append(g)
    geometry = np.stack(blocks)
    energies = np.array([70.0, 95.5, 130.0, 160.0, 190.0, 225.0, 110.0], np.float32)
    return geometry, energies


@pytest.mark.parametrize("spot_model", ["dota", "beam-model"])
def test_the_old_numbers_bit_for_bit(spot_model):
    """The default (``bit_identical=True``): the old engine's float32 doses bit for bit (erfc cut where the
    engine cuts it), plan-like batches included (each geometry repeated for several energies, one after the
    other)."""
    from tests.engines.analytic_reference import reference_dose

    geometry, energies = _reference_cases()
    geometry = np.concatenate([np.repeat(geometry[:3], 2, axis=0), geometry[3:]])
    energies = np.concatenate([np.repeat(energies[:3], 2) + np.tile(np.array([0.0, 7.5], np.float32), 3),
                               energies[3:]])
    engine = AnalyticEngine(spot_model=spot_model)
    want = reference_dose(engine, geometry, energies)
    got = engine.dose(geometry, energies)
    assert want.max() > 0
    np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32))


@pytest.mark.parametrize("spot_model", ["dota", "beam-model"])
def test_compacted_sums_within_1e6_of_the_old_numbers(spot_model):
    """``bit_identical=False`` (deeper slices summed over the sub-pencils that reach them): within 1e-6 of
    each beamlet's maximum of the old engine, and bit for bit where every sub-pencil reaches (the first
    slices)."""
    from tests.engines.analytic_reference import reference_dose

    geometry, energies = _reference_cases()
    engine = AnalyticEngine(spot_model=spot_model, bit_identical=False)
    want = reference_dose(engine, geometry, energies)
    got = engine.dose(geometry, energies)
    for i in range(len(energies)):
        assert np.abs(got[i] - want[i]).max() <= 1e-6 * want[i].max(), i
        np.testing.assert_array_equal(got[i, :5], want[i, :5])


@pytest.mark.parametrize("voxel_mm, shape", [((2.0, 2.0, 2.5), (120, 24, 20)), ((2.5, 1.5, 1.5), (100, 24, 24)),
                                             ((1.5, 1.5, 1.5), (120, 20, 26)), ((2.0, 2.0, 2.0), (90, 9, 31))])
def test_other_voxels_and_block_shapes_give_the_old_numbers(voxel_mm, shape):
    """Non-square voxels (the general profiles), square voxels off 2 mm (roundings of the lattice path) and
    non-square blocks; non-integer CT numbers (the RSP table lookup does not apply)."""
    from dota.physics import make_phantom
    from tests.engines.analytic_reference import reference_dose

    rng = np.random.default_rng(5)
    geometry = np.stack([make_phantom("heterogeneous", rng, shape, voxel_mm) for _ in range(2)])
    geometry[1] += rng.uniform(-0.5, 0.5, size=geometry[1].shape).astype(np.float32)
    energies = np.array([85.0, 170.0], np.float32)
    for exact in (True, False):
        engine = AnalyticEngine(bit_identical=exact)
        want = reference_dose(engine, geometry, energies, voxel_mm)
        got = engine.dose(geometry, energies, voxel_mm)
        if exact:
            np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32))
        else:
            for i in range(len(energies)):
                assert np.abs(got[i] - want[i]).max() <= 1e-6 * want[i].max()


@pytest.mark.parametrize("spot_model", ["dota", "beam-model"])
def test_the_erfc_cut_is_within_1e12_of_the_uncut_doses(spot_model):
    """Engine 1.1 takes erfc below ERFC_TAIL as 0: against engine 1.0's numbers (no cut) the doses differ by
    at most 1e-12 of each beamlet's maximum, and they do differ (the cut is applied)."""
    from tests.engines.analytic_reference import reference_dose

    geometry, energies = _reference_cases()
    engine = AnalyticEngine(spot_model=spot_model)
    got = engine.dose(geometry, energies)
    uncut = reference_dose(engine, geometry, energies, cut=False)
    for i in range(len(energies)):
        assert np.abs(got[i] - uncut[i]).max() <= 1e-12 * uncut[i].max(), i
    assert (got != uncut).any()


def test_erfc_tail_from_is_where_erfc_falls_below_the_cut():
    import math

    from dota.engines.analytic import ERFC_TAIL, _erfc_tail_from

    z = np.float32(_erfc_tail_from())
    assert 5.0 < z < 6.0
    assert math.erfc(float(z)) < ERFC_TAIL <= math.erfc(float(np.nextafter(z, np.float32(0))))


@pytest.mark.parametrize("voxel_mm", [(2.0, 2.0, 2.0), (2.0, 2.0, 2.5)])
def test_no_subnormal_floats_reach_the_sums(monkeypatch, voxel_mm):
    """The profiles summed by ``torch.bmm`` hold no float32 subnormals (below 1.2e-38, but not 0): x86
    processors compute with them 20-40x slower, which had made the sums 13x slower on plans (lattice and
    general profiles; deep, heterogeneous blocks where the profiles' tails reach far)."""
    import torch

    import dota.engines.analytic as analytic

    seen = []
    bmm = torch.bmm

    def recording(a, b):
        for x in (a, b):
            seen.append(int(((x != 0) & (x.abs() < np.finfo(np.float32).tiny)).sum()))
        return bmm(a, b)

    monkeypatch.setattr(analytic.torch, "bmm", recording)
    geometry, energies = _reference_cases()
    AnalyticEngine().dose(geometry, energies, voxel_mm)
    assert seen and sum(seen) == 0


def test_erfc_is_zero_where_it_is_not_evaluated():
    """The argument from which the engine takes float32 erfc as 0: every float32 from there to 10.25 gives 0,
    the one below it does not (on the torch that runs the tests)."""
    import math

    import torch

    from dota.engines.analytic import _erfc_zero_from

    start = _erfc_zero_from()
    assert 10.0 < start < 10.25
    lo, hi = np.float32(start).view(np.int32), np.float32(10.25).view(np.int32)
    x = torch.from_numpy(np.arange(lo, hi + 1, dtype=np.int32).view(np.float32))
    assert bool((torch.erfc(x) == 0).all()) and float(torch.erfc(torch.tensor([math.inf]))[0]) == 0.0
    assert float(torch.erfc(torch.tensor([np.nextafter(np.float32(start), np.float32(0))]))[0]) > 0


def test_depth_groups_cover_every_weighted_row():
    """Every (depth, sub-pencil) with weight lies in exactly one group that sums over it."""
    from dota.engines.analytic import _depth_groups

    rng = np.random.default_rng(2)
    for _ in range(50):
        depth, k = int(rng.integers(1, 150)), int(rng.integers(1, 400))
        last = rng.integers(0, depth + 1, k)
        weight = (np.arange(depth)[:, None] < last[None, :]) * rng.uniform(0.5, 1.0, (depth, k))
        covered = np.zeros((depth, k), int)
        starts = []
        for d0, d1, sub in _depth_groups(weight.astype(np.float32)):
            starts.append(d0)
            covered[d0:d1, slice(None) if sub is None else sub] += 1
        assert np.all(covered[weight != 0] == 1) and np.all(covered <= 1)
        assert starts == sorted(starts)


def test_rsp_lookup_is_hu_to_rsp():
    from dota.engines.analytic import _rsp_of_hu

    rng = np.random.default_rng(3)
    whole = rng.integers(-5000, 9000, size=(150, 576)).astype(np.float32)
    np.testing.assert_array_equal(_rsp_of_hu(whole), hu_to_rsp(whole))
    fractional = whole + np.float32(0.25)
    np.testing.assert_array_equal(_rsp_of_hu(fractional), hu_to_rsp(fractional))
    np.testing.assert_array_equal(_rsp_of_hu(whole.astype(np.float64)), hu_to_rsp(whole))
