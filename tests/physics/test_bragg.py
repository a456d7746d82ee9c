import numpy as np
import pytest

from dota.errors import InputError
from dota.physics import (
    beam_extent_wed_mm,
    bragg_sigma_mm,
    csda_range_mm,
    depth_dose_mev_cm2_g,
    load_pstar,
    r80_mm,
    water_depth_dose,
)
from dota.physics.bragg import _ZETA_SWITCH

PSTAR = load_pstar()


@pytest.mark.parametrize("energy", PSTAR.energy_mev.tolist())
def test_model_r80_matches_pstar(energy):
    csda = csda_range_mm(energy)
    assert abs(r80_mm(energy) - csda) <= 0.1  # far inside max(1 mm, 1 %)


def test_r80_vectorised():
    e = np.array([[70.0, 150.0]])
    assert r80_mm(e).shape == (1, 2)


def test_range_spread_realistic():
    # straggling ~1.1-1.2 % of range, energy spread on top: a few mm at high energy
    assert 0.5 < bragg_sigma_mm(70.0) < 1.2
    assert 2.5 < bragg_sigma_mm(225.0) < 4.5
    sig = bragg_sigma_mm(np.linspace(70, 225, 20))
    assert np.all(sig / csda_range_mm(np.linspace(70, 225, 20)) > 0.0105)


def test_curve_shape_150():
    w = water_depth_dose(150.0)
    entrance, peak = w.idd_mev_cm2_g[0], w.idd_mev_cm2_g.max()
    assert 5.4 < entrance < 7.0  # stopping power 5.4 MeV cm2/g plus locally absorbed nuclear energy
    assert 3.0 < peak / entrance < 6.0
    assert csda_range_mm(150.0) - 5 < w.peak_depth_mm < csda_range_mm(150.0)
    total_mev = w.cumulative_mev_cm2_g_mm[-1] / 10.0  # MeV per proton, density 1
    assert 0.9 * 150 < total_mev < 0.99 * 150  # part of the nuclear energy leaves


def test_continuous_at_switch_and_zero_beyond_extent():
    e = 120.0
    r0, s = csda_range_mm(e), bragg_sigma_mm(e)
    z = r0 - s * np.array([_ZETA_SWITCH * (1 + 1e-9), _ZETA_SWITCH * (1 - 1e-9)])
    a, b = depth_dose_mev_cm2_g(z, e)
    assert a == pytest.approx(b, rel=1e-4)
    ext = beam_extent_wed_mm(e)
    assert ext == pytest.approx(r0 + 6 * s)
    assert np.all(depth_dose_mev_cm2_g(np.array([ext + 0.01, ext + 50]), e) == 0)
    peak = water_depth_dose(e).idd_mev_cm2_g.max()
    assert depth_dose_mev_cm2_g(np.array([ext - 0.01]), e)[0] < 1e-7 * peak


def test_voxel_average_exact():
    w = water_depth_dose(100.0)
    lo, hi = np.array([10.0, 70.0, 76.0]), np.array([12.0, 72.0, 76.0])
    fine = [w.at(np.linspace(a, b, 20001)).mean() if b > a else w.at(np.array([a]))[0] for a, b in zip(lo, hi)]
    np.testing.assert_allclose(w.mean_between(lo, hi), fine, rtol=1e-3)


def test_bad_energy():
    with pytest.raises(InputError):
        water_depth_dose(np.nan)
    with pytest.raises(InputError):
        r80_mm(-1.0)


def test_voxel_average_same_numbers_as_before():
    """The depth-dose interpolation (slopes kept per table, the curve at ``lo`` only for thin intervals) gives
    the old numbers bit for bit, at and beyond the table's end and for thin intervals too."""
    from tests.engines.analytic_reference import interp, mean_between

    rng = np.random.default_rng(8)
    for energy in (70.0, 123.4, 225.0):
        w = water_depth_dose(energy)
        lo = rng.uniform(-5.0, w.extent_mm + 20.0, size=(60, 50))
        hi = lo + rng.choice([0.0, 1e-7, 0.3, 2.0, 5.0], size=lo.shape)
        lo[0, :5] = hi[0, :5] = w.extent_mm
        lo[1, :5], hi[1, :5] = w.extent_mm - 1.0, w.extent_mm
        np.testing.assert_array_equal(w.mean_between(lo, hi), mean_between(w, lo, hi))
        np.testing.assert_array_equal(w.mean_between(lo, lo + 2.0), mean_between(w, lo, lo + 2.0))
        np.testing.assert_array_equal(w.at(lo), interp(w, lo, w.idd_mev_cm2_g, 0.0))
