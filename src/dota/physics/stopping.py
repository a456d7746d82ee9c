"""Electronic stopping power of water from the Bethe formula.

The plain Bethe formula (mean excitation energy I = 75 eV, no shell or density correction) is within
about 1 % of NIST PSTAR between 70 and 225 MeV and its *ratios* between energies there are better still
(the omitted corrections nearly cancel). It is used where only such ratios matter: the protons per
monitor unit of the MCsquare beam model's extension below 100 MeV
(:func:`dota.engines.mcsquare.extend_beam_model`). Ranges come from the PSTAR table
(:mod:`dota.physics.ranges`), not from this formula.
"""

from __future__ import annotations

import numpy as np

from dota.physics.ranges import PROTON_MASS_MEV

#: Electron rest energy, MeV.
ELECTRON_MASS_MEV: float = 0.51099895
#: Bethe's constant K = 4 pi N_A r_e^2 m_e c^2, MeV cm^2/mol.
BETHE_K_MEV_CM2_MOL: float = 0.307075
#: Z/A of water (10 electrons per 18.0153 g/mol), mol/g.
WATER_Z_OVER_A: float = 10 / 18.0153
#: Mean excitation energy of water, eV.
WATER_MEAN_EXCITATION_EV: float = 75.0


def bethe_water_stopping_power(energy_mev: np.ndarray | float) -> np.ndarray:
    """Electronic mass stopping power of water (Bethe, I = 75 eV, no shell or density correction), MeV cm^2/g,
    of protons of kinetic energy ``energy_mev``."""
    t = np.asarray(energy_mev, dtype=np.float64)
    gamma = 1 + t / PROTON_MASS_MEV
    beta2 = 1 - 1 / gamma**2
    me = ELECTRON_MASS_MEV
    tmax = 2 * me * beta2 * gamma**2 / (1 + 2 * gamma * me / PROTON_MASS_MEV + (me / PROTON_MASS_MEV) ** 2)
    k_z_over_a = BETHE_K_MEV_CM2_MOL * WATER_Z_OVER_A
    log_arg = 2 * me * 1e6 * beta2 * gamma**2 * tmax * 1e6 / WATER_MEAN_EXCITATION_EV**2
    return k_z_over_a / beta2 * (0.5 * np.log(log_arg) - beta2)
