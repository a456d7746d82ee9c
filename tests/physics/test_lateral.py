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


def test_mcs_same_numbers_as_before_from_any_layout():
    """The width (moments in one prefix sum, residual energies with the table's logs kept, the end
    segments of the range table only where used) is the old computation's, bit for bit, for pencils along
    any axis layout, and from its energy-independent parts (as the analytic engine calls it)."""
    from dota.physics.lateral import mcs_log_factor, mcs_sigma_from_wed_mm
    from tests.engines.analytic_reference import mcs_sigma_mm as old_mcs_sigma_mm

    rng = np.random.default_rng(4)
    rsp = rng.choice([0.00107, 0.255, 0.975, 1.0, 1.04, 1.8, 2.58], size=(150, 40))
    rsp[:, :5] = 0.00107  # air columns: lever arm only
    for energy in (70.0, 101.3, 150.0, 225.0, 260.0):  # beyond 225 MeV: the high end of the range table
        for dz in (2.0, 0.5, 1.7):
            want = old_mcs_sigma_mm(rsp, energy, dz)
            np.testing.assert_array_equal(mcs_sigma_mm(rsp, energy, dz), want)
            np.testing.assert_array_equal(mcs_sigma_mm(rsp[:, 7], energy, dz), want[:, 7])
            np.testing.assert_array_equal(mcs_sigma_mm(rsp.reshape(150, 4, 10), energy, dz), want.reshape(150, 4, 10))
            step = np.ascontiguousarray((rsp * dz).T)  # columns along axis 0 in memory, as the engine has them
            centre = np.cumsum(step, axis=1) - 0.5 * step
            got = mcs_sigma_from_wed_mm(step[:, :90].T, centre[:, :90].T, mcs_log_factor(centre)[:, :90].T, energy, dz)
            np.testing.assert_array_equal(got, want[:90])


def test_prefix_sum_is_cumsum():
    from dota.physics.lateral import prefix_sum

    rng = np.random.default_rng(1)
    x = rng.uniform(0, 3, size=(3, 150, 70))
    for axis in (0, 1, 2):
        np.testing.assert_array_equal(prefix_sum(x, axis), np.cumsum(x, axis))
    t = np.ascontiguousarray(x.transpose(0, 2, 1)).transpose(0, 2, 1)  # another memory layout
    got = prefix_sum(t, 1)
    np.testing.assert_array_equal(got, np.cumsum(x, 1))
    assert got.strides == t.strides


def test_residual_energy_is_the_range_table_inverse():
    from dota.physics import energy_from_csda_range_mev
    from dota.physics.lateral import _energy_from_residual_range_mev

    ranges = np.concatenate([np.geomspace(1.0, 600.0, 5000), csda_range_mm(np.array([70.0, 150.0, 225.0]))])
    np.testing.assert_array_equal(_energy_from_residual_range_mev(ranges), energy_from_csda_range_mev(ranges))
