"""The Bethe stopping power of water, and one place for the proton mass and p*v."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import dota
from dota.physics import PROTON_MASS_MEV, bethe_water_stopping_power, pv_mev

#: NIST PSTAR electronic mass stopping power of liquid water, MeV cm^2/g.
PSTAR_ELECTRONIC = {70.0: 9.559, 100.0: 7.289, 150.0: 5.445, 200.0: 4.492}


@pytest.mark.parametrize("energy_mev", sorted(PSTAR_ELECTRONIC))
def test_bethe_is_close_to_pstar(energy_mev: float) -> None:
    assert bethe_water_stopping_power(energy_mev) == pytest.approx(PSTAR_ELECTRONIC[energy_mev], rel=0.005)


def test_bethe_ratios_between_70_and_100_mev_match_pstar() -> None:
    """The beam-model extension uses only ratios there."""
    ratio = bethe_water_stopping_power(70.0) / bethe_water_stopping_power(100.0)
    assert ratio == pytest.approx(PSTAR_ELECTRONIC[70.0] / PSTAR_ELECTRONIC[100.0], rel=0.003)


def test_pv_is_relativistic_momentum_times_speed() -> None:
    t = np.array([70.0, 150.0, 225.0])
    total = t + PROTON_MASS_MEV
    p = np.sqrt(total**2 - PROTON_MASS_MEV**2)
    np.testing.assert_allclose(pv_mev(t), p * p / total, rtol=1e-12)


def test_one_proton_mass_and_one_pv_in_the_package() -> None:
    src = Path(dota.__file__).parent
    texts = {str(p.relative_to(src)): p.read_text() for p in src.rglob("*.py")}
    assert [name for name, text in texts.items() if "938.2" in text] == ["physics/ranges.py"]
    assert [name for name, text in texts.items() if "def pv_mev" in text or "def _pv_mev" in text] == ["physics/ranges.py"]
