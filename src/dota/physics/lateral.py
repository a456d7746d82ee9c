"""Lateral spread of a proton pencil beam: the initial spot and multiple Coulomb scattering (MCS).

Spot size: the one-sigma width in air at the entrance of the block, interpolated linearly in energy
from rounded values of the MCsquare default IBA beam model (its nozzle-exit sigma and divergence
carried 410 mm to the isocentre, averaged over x and y): 5.2 mm at 100 MeV, 3.7 mm at 150 MeV,
2.9 mm at 200 MeV, 2.8 mm at 225 MeV; extended to 6.0 mm at 70 MeV. The beam's low-intensity halo
(the second Gaussian of that model) is not modelled.

MCS: Fermi-Eyges transport of the spatial variance with the Highland scattering power of water,
``T = (E_s / pv)^2 / X0`` with ``E_s`` = 14.1 MeV and ``X0`` = 360.8 mm, per mm of *water-equivalent*
thickness, and Highland's logarithmic correction ``1 + log10(WED / X0) / 9`` applied to the width.
The lever arm from each scattering layer to the depth of interest is the geometric distance, so air
gaps (no scattering, full lever arm) widen the beam as they should. Materials other than water
scatter as much as water of the same water-equivalent thickness (a simplification: bone scatters
somewhat more). In water the width at the end of range comes out near 2 % of the range, the
figure measurements and Monte Carlo give.
"""

from __future__ import annotations

import numpy as np

from dota.physics.ranges import _positive, csda_range_mm, energy_from_csda_range_mev, pv_mev

#: Spot sigma (mm) in air at the block entrance against nominal energy (MeV), interpolated linearly.
SPOT_SIGMA_MM_NODES: tuple[tuple[float, float], ...] = (
    (70.0, 6.0),
    (100.0, 5.2),
    (150.0, 3.7),
    (200.0, 2.9),
    (225.0, 2.8),
)
#: Highland's scattering constant, MeV.
HIGHLAND_ES_MEV: float = 14.1
#: Radiation length of water, mm.
WATER_RADIATION_LENGTH_MM: float = 360.8
#: Residual ranges below this (mm) are treated as this when computing the scattering power.
_MIN_RESIDUAL_RANGE_MM = 1.0


def spot_sigma_mm(energy_mev: np.ndarray | float) -> np.ndarray | float:
    """One-sigma spot size (mm) in air at the block entrance for nominal energy ``energy_mev``."""
    e = _positive(energy_mev, "energy (MeV)")
    nodes = np.array(SPOT_SIGMA_MM_NODES)
    out = np.interp(e, nodes[:, 0], nodes[:, 1])
    return float(out) if out.ndim == 0 else out


def mcs_sigma_mm(rsp: np.ndarray, energy_mev: float, depth_step_mm: float) -> np.ndarray:
    """MCS width (one sigma, mm, projected on one lateral axis) at voxel centres along pencils.

    Parameters
    ----------
    rsp : array (L, ...)
        Relative stopping power along each pencil, voxel by voxel; axis 0 is depth, any further axes
        are independent pencils.
    energy_mev : float
        Initial kinetic energy.
    depth_step_mm : float
        Voxel size along depth (geometric), mm.

    Returns
    -------
    array (L, ...)
        The width at each voxel centre, from scattering in all material upstream of that centre.
    """
    rsp = np.asarray(rsp, dtype=np.float64)
    dz = float(depth_step_mm)
    n = rsp.shape[0]
    step_wed = rsp * dz
    wed_centre = np.cumsum(step_wed, axis=0) - 0.5 * step_wed
    residual = np.maximum(csda_range_mm(float(energy_mev)) - wed_centre, _MIN_RESIDUAL_RANGE_MM)
    pv = pv_mev(energy_from_csda_range_mev(residual))
    dtheta2 = (HIGHLAND_ES_MEV / pv) ** 2 / WATER_RADIATION_LENGTH_MM * step_wed  # rad^2 per voxel

    z = ((np.arange(n) + 0.5) * dz).reshape((n,) + (1,) * (rsp.ndim - 1))

    def upstream(values: np.ndarray) -> np.ndarray:
        # sum over voxels strictly upstream of each voxel
        c = np.cumsum(values, axis=0)
        return c - values

    s0 = upstream(dtheta2)
    s1 = upstream(z * dtheta2)
    s2 = upstream(z * z * dtheta2)
    # exact second moment for scattering spread uniformly within each voxel: upstream voxels at their
    # centre distance plus dz^2/12, and the first half of the voxel itself
    var = z * z * s0 - 2.0 * z * s1 + s2 + dz * dz / 12.0 * s0 + dz * dz / 24.0 * dtheta2
    var = np.maximum(var, 0.0)
    log_term = 1.0 + np.log10(np.maximum(wed_centre, 1e-3) / WATER_RADIATION_LENGTH_MM) / 9.0
    return np.sqrt(var) * np.clip(log_term, 0.5, None)


def mcs_sigma_water_mm(depth_mm: np.ndarray, energy_mev: float, step_mm: float = 0.5) -> np.ndarray:
    """MCS width (mm) in homogeneous water at depths ``depth_mm``, from :func:`mcs_sigma_mm` on a fine grid."""
    depth = np.asarray(depth_mm, dtype=np.float64)
    n = int(np.ceil(max(float(depth.max(initial=0.0)), step_mm) / step_mm)) + 2
    grid = (np.arange(n) + 0.5) * step_mm
    sigma = mcs_sigma_mm(np.ones(n), energy_mev, step_mm)
    return np.interp(depth, np.concatenate(([0.0], grid)), np.concatenate(([0.0], sigma)))
