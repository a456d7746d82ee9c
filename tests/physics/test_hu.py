import numpy as np
import pytest

from dota.physics import HU_CALIBRATION_NAME, HU_CALIBRATION_TABLE, hu_to_density, hu_to_rsp


def test_reference_tissues():
    rsp = hu_to_rsp(np.array([-1000.0, -750.0, -100.0, 0.0, 40.0, 1500.0]))
    np.testing.assert_allclose(rsp, [0.00107, 0.255, 0.975, 1.0, 1.04, 1.8], rtol=1e-12)
    np.testing.assert_allclose(hu_to_density([0.0, -1000.0]), [1.0, 0.00121])


def test_monotone_and_clamped():
    hu = np.linspace(-1500, 4000, 2000)
    rsp, rho = hu_to_rsp(hu), hu_to_density(hu)
    assert np.all(np.diff(rsp) >= 0) and np.all(np.diff(rho) >= 0)
    assert rsp[0] == pytest.approx(HU_CALIBRATION_TABLE[0][2]) and rsp[-1] == pytest.approx(HU_CALIBRATION_TABLE[-1][2])
    assert np.all(rsp > 0)


def test_bone_range_is_denser_than_water():
    rsp = hu_to_rsp(np.array([700.0, 1500.0]))
    assert 1.3 < rsp[0] < rsp[1] < 1.9


def test_shape_preserved_and_named():
    hu = np.zeros((2, 3, 4, 5), np.int16)
    assert hu_to_rsp(hu).shape == hu.shape
    assert isinstance(HU_CALIBRATION_NAME, str) and HU_CALIBRATION_NAME
