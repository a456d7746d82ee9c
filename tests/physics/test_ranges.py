from pathlib import Path

import numpy as np
import pytest

from dota.errors import InputError
from dota.physics import csda_range_mm, energy_from_csda_range_mev, load_pstar

SHARED_TABLE = Path(__file__).resolve().parents[3] / "shared" / "reference" / "pstar_water_csda.csv"


def test_table_rows():
    t = load_pstar()
    assert t.energy_mev[0] == 70 and t.energy_mev[-1] == 225
    assert t.csda_range_mm[list(t.energy_mev).index(150.0)] == pytest.approx(157.7)
    assert not t.energy_mev.flags.writeable


@pytest.mark.skipif(not SHARED_TABLE.exists(), reason="the shared reference table is not beside the checkout")
def test_packaged_table_matches_shared_reference():
    ref = np.loadtxt(SHARED_TABLE, delimiter=",", comments="#", skiprows=3)
    t = load_pstar()
    np.testing.assert_allclose(t.energy_mev, ref[:, 0])
    np.testing.assert_allclose(t.csda_range_mm, 10 * ref[:, 1])


def test_interpolation_hits_nodes_and_is_loglog():
    t = load_pstar()
    np.testing.assert_allclose(csda_range_mm(t.energy_mev), t.csda_range_mm, rtol=1e-12)
    e_mid = np.sqrt(100.0 * 125.0)
    r_mid = np.sqrt(csda_range_mm(100.0) * csda_range_mm(125.0))
    assert csda_range_mm(e_mid) == pytest.approx(r_mid, rel=1e-12)
    assert isinstance(csda_range_mm(150.0), float)


def test_extrapolation_is_reasonable():
    # PSTAR: 10 MeV -> 1.23 mm, 250 MeV ~ 379 mm
    assert csda_range_mm(10.0) == pytest.approx(1.23, rel=0.03)
    assert csda_range_mm(250.0) == pytest.approx(379.0, rel=0.02)


def test_inverse_round_trip():
    e = np.array([3.0, 50.0, 70.0, 133.3, 225.0])
    np.testing.assert_allclose(energy_from_csda_range_mev(csda_range_mm(e)), e, rtol=1e-10)


@pytest.mark.parametrize("bad", [0.0, -5.0, np.nan, np.inf])
def test_bad_energy(bad):
    with pytest.raises(InputError):
        csda_range_mm(np.array([100.0, bad]))
