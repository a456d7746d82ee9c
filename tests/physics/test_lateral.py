import numpy as np
import pytest

from dota.physics import csda_range_mm, mcs_sigma_mm, mcs_sigma_water_mm, spot_sigma_mm


@pytest.mark.parametrize("energy", [70.0, 100.0, 150.0, 200.0, 225.0])
def test_mcs_at_end_of_range_about_two_percent(energy):
    r = csda_range_mm(energy)
    sigma_end = mcs_sigma_water_mm(np.array([r]), energy)[0]
    assert 0.018 * r < sigma_end < 0.028 * r


def test_mcs_grows_with_depth():
    s = mcs_sigma_water_mm(np.linspace(0, 150, 40), 160.0)
    assert s[0] == 0 and np.all(np.diff(s) > 0)


def test_air_gap_adds_lever_arm_not_scattering():
    n, dz = 100, 2.0
    water = np.ones(n)
    gap = water.copy()
    gap[20:40] = 0.00107  # 40 mm of air after 40 mm of water
    s_water = mcs_sigma_mm(water, 150.0, dz)
    s_gap = mcs_sigma_mm(gap, 150.0, dz)
    # just after the gap: wider than the same water-equivalent depth in water (lever arm)...
    assert s_gap[40] > s_water[20] * 1.5
    # ...but much narrower than 40 mm more of water
    assert s_gap[40] < s_water[40]


def test_columns_independent():
    rsp = np.ones((50, 3))
    rsp[10:20, 1] = 1.6
    s = mcs_sigma_mm(rsp, 120.0, 2.0)
    np.testing.assert_allclose(s[:, 0], s[:, 2])
    np.testing.assert_allclose(s[:, 0], mcs_sigma_mm(np.ones(50), 120.0, 2.0))
    assert s[-1, 1] > s[-1, 0]


def test_spot_shrinks_with_energy():
    e = np.linspace(70, 225, 30)
    s = spot_sigma_mm(e)
    assert s[0] == pytest.approx(6.0) and s[-1] == pytest.approx(2.8)
    assert np.all(np.diff(s) <= 0)
