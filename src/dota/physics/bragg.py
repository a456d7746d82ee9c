"""Analytic Bragg curve in water: Bortfeld's model with range straggling and beam energy spread.

Bortfeld (Med. Phys. 24, 2024-2033, 1997) approximates the integral depth dose of a proton beam by
the range-energy power law ``R0 = alpha E0^p`` (p = 1.77), a primary fluence that falls linearly with
depth through nonelastic nuclear interactions (``beta`` = 0.012 per cm, a fraction ``gamma`` = 0.6 of
their energy absorbed locally), and a Gaussian spread of ranges of width ``sigma`` convolved in closed
form with parabolic cylinder functions. Here:

- ``R0`` is the PSTAR CSDA range (:func:`dota.physics.ranges.csda_range_mm`), and ``alpha`` is set per
  energy so that ``alpha E0^p = R0``; the model's distal 80 % point then lies within a fraction of a
  millimetre of the CSDA range, as measured Bragg curves do;
- range straggling ``sigma_mono = 0.012 R0^0.935`` (cm) in quadrature with the energy spread of the beam,
  ``sigma_E dR/dE = sigma_E p R0 / E0``;
- the beam's relative energy spread follows a table rounded from the MCsquare default beam model of an
  IBA nozzle (0.27-0.67 % over 100-225 MeV), extended to 0.70 % at 70 MeV;
- the beam's low-energy contamination term (Bortfeld's epsilon) is zero: a scanned pencil beam.

The curve is exactly zero beyond ``R0 + 6 sigma`` (:func:`beam_extent_wed_mm`), where the model
falls below about 1e-8 of its peak. This is an analytic approximation for the fast baseline engine
and for tests, not a substitute for Monte Carlo.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from scipy import special

from dota.errors import InputError
from dota.physics.ranges import _positive, csda_range_mm

#: Exponent of the range-energy power law (Bortfeld 1997).
BORTFELD_P: float = 1.77
#: Relative fluence loss by nonelastic nuclear interactions, per mm of water (0.012 per cm).
NUCLEAR_BETA_PER_MM: float = 0.0012
#: Fraction of the energy released in nonelastic interactions that is absorbed locally.
NUCLEAR_GAMMA_LOCAL: float = 0.6
#: Range straggling of a monoenergetic beam: ``sigma_cm = 0.012 * R0_cm ** 0.935`` (Bortfeld 1997).
STRAGGLING_COEFF_CM: float = 0.012
STRAGGLING_EXPONENT: float = 0.935
#: Relative energy spread of the beam (per cent) at nominal energies (MeV), interpolated linearly.
ENERGY_SPREAD_PERCENT_NODES: tuple[tuple[float, float], ...] = (
    (70.0, 0.70),
    (100.0, 0.67),
    (150.0, 0.63),
    (200.0, 0.44),
    (225.0, 0.27),
)
#: The depth dose is set to zero beyond ``R0 + EXTENT_SIGMAS * sigma``.
EXTENT_SIGMAS: float = 6.0

#: MeV/g to Gy.
GY_PER_MEV_PER_G: float = 1.602176634e-10

# Between the distal tail and |zeta| <= _ZETA_SWITCH the parabolic cylinder functions are used; deeper
# in the plateau, the unstraggled curve with its first asymptotic correction (error below 1e-5).
_ZETA_SWITCH = 20.0


def _scalar_energy(energy_mev: float) -> float:
    e = _positive(energy_mev, "energy (MeV)")
    if e.ndim != 0:
        raise InputError(f"a single energy is expected here, got shape {e.shape}")
    return float(e)


def energy_spread_mev(energy_mev: np.ndarray | float) -> np.ndarray | float:
    """One-sigma energy spread of the beam, MeV, at nominal energy ``energy_mev``."""
    e = _positive(energy_mev, "energy (MeV)")
    nodes = np.array(ENERGY_SPREAD_PERCENT_NODES)
    out = np.interp(e, nodes[:, 0], nodes[:, 1]) / 100.0 * e
    return float(out) if out.ndim == 0 else out


def bragg_sigma_mm(energy_mev: np.ndarray | float) -> np.ndarray | float:
    """Width (one sigma, mm) of the Gaussian range spread: straggling and energy spread in quadrature."""
    e = _positive(energy_mev, "energy (MeV)")
    r0_mm = np.asarray(csda_range_mm(e))
    sigma_mono_mm = 10.0 * STRAGGLING_COEFF_CM * (r0_mm / 10.0) ** STRAGGLING_EXPONENT
    sigma_energy_mm = np.asarray(energy_spread_mev(e)) * BORTFELD_P * r0_mm / e
    out = np.hypot(sigma_mono_mm, sigma_energy_mm)
    return float(out) if out.ndim == 0 else out


def beam_extent_wed_mm(energy_mev: np.ndarray | float) -> np.ndarray | float:
    """Water-equivalent depth (mm) beyond which the analytic depth dose is exactly zero: ``R0 + 6 sigma``."""
    e = _positive(energy_mev, "energy (MeV)")
    out = np.asarray(csda_range_mm(e)) + EXTENT_SIGMAS * np.asarray(bragg_sigma_mm(e))
    return float(out) if out.ndim == 0 else out


def depth_dose_mev_cm2_g(depth_mm: np.ndarray, energy_mev: float) -> np.ndarray:
    """Bortfeld integral depth dose in water, MeV cm^2/g per proton (dose for a unit fluence of 1 per cm^2).

    Parameters
    ----------
    depth_mm : array
        Depths in water, mm (any shape; values below 0 are evaluated as if the water extended upstream).
    energy_mev : float
        Nominal beam energy, MeV.
    """
    e0 = _scalar_energy(energy_mev)
    z_cm = np.asarray(depth_mm, dtype=np.float64) / 10.0
    r0_cm = csda_range_mm(e0) / 10.0
    sigma_cm = bragg_sigma_mm(e0) / 10.0
    p, beta, gamma = BORTFELD_P, NUCLEAR_BETA_PER_MM * 10.0, NUCLEAR_GAMMA_LOCAL
    alpha_root = r0_cm ** (1.0 / p) / e0  # alpha^(1/p) with alpha = R0 / E0^p
    norm = 1.0 / (p * alpha_root * (1.0 + beta * r0_cm))

    residual_cm = r0_cm - z_cm
    zeta = residual_cm / sigma_cm
    dose = np.zeros_like(zeta)

    plateau = zeta > _ZETA_SWITCH
    if plateau.any():
        r = residual_cm[plateau]
        zz = zeta[plateau]
        a1, a2 = 1.0 / p - 1.0, 1.0 / p
        term1 = r**a1 * (1.0 + a1 * (a1 - 1.0) / (2.0 * zz**2))
        term2 = (beta + gamma * beta * p) * r**a2 * (1.0 + a2 * (a2 - 1.0) / (2.0 * zz**2))
        dose[plateau] = norm * (term1 + term2)

    peak = (zeta <= _ZETA_SWITCH) & (zeta >= -EXTENT_SIGMAS)
    if peak.any():
        zz = zeta[peak]
        d1, _ = special.pbdv(-1.0 / p, -zz)
        d2, _ = special.pbdv(-1.0 / p - 1.0, -zz)
        pref = np.exp(-(zz**2) / 4.0) * sigma_cm ** (1.0 / p) * math.gamma(1.0 / p) / math.sqrt(2.0 * math.pi)
        dose[peak] = norm * pref * (d1 / sigma_cm + (beta / p + gamma * beta) * d2)
    return np.maximum(dose, 0.0)


@dataclass(frozen=True)
class WaterDepthDose:
    """The Bortfeld curve of one energy tabulated on a fine depth grid, with its running integral.

    ``depth_mm`` runs from 0 to :func:`beam_extent_wed_mm` in steps of at most 0.05 mm and at most
    sigma/16; ``idd_mev_cm2_g`` is the curve and ``cumulative_mev_cm2_g_mm`` its trapezoid integral,
    so that :meth:`mean_between` gives exact averages of the piecewise-linear curve over any interval.
    """

    energy_mev: float
    depth_mm: np.ndarray
    idd_mev_cm2_g: np.ndarray
    cumulative_mev_cm2_g_mm: np.ndarray
    extent_mm: float

    def _interp(self, x: np.ndarray, values: np.ndarray, right: float) -> np.ndarray:
        """``np.interp(x, depth_mm, values, left=values[0], right=right)`` on the table's uniform depth grid:
        the interval of each point is computed, not searched (5-10x faster; equal to float64 rounding).
        The differences ``values[i + 1] - values[i]`` are taken once per table (:meth:`_slopes`), and
        ``right`` is written only where a point lies beyond the table: the same numbers as
        ``values[i] + frac * (values[i + 1] - values[i])`` everywhere (bit-identical; tests)."""
        x = np.asarray(x, dtype=np.float64)
        depth = self.depth_mm
        step = depth[1] - depth[0]
        n = len(depth)
        t = np.clip(x, 0.0, depth[-1])
        t /= step
        i = t.astype(np.int64)
        np.minimum(i, n - 2, out=i)
        frac = t
        frac -= i
        out = frac
        out *= self._slopes(values).take(i)
        out += values.take(i)
        beyond = x > depth[-1]
        if beyond.any():
            out[beyond] = right
        return out

    def _slopes(self, values: np.ndarray) -> np.ndarray:
        """``values[1:] - values[:-1]``, kept for the table's own two arrays."""
        if values is self.cumulative_mev_cm2_g_mm:
            return self._cumulative_slopes
        if values is self.idd_mev_cm2_g:
            return self._idd_slopes
        return values[1:] - values[:-1]

    @functools.cached_property
    def _cumulative_slopes(self) -> np.ndarray:
        return self.cumulative_mev_cm2_g_mm[1:] - self.cumulative_mev_cm2_g_mm[:-1]

    @functools.cached_property
    def _idd_slopes(self) -> np.ndarray:
        return self.idd_mev_cm2_g[1:] - self.idd_mev_cm2_g[:-1]

    def at(self, wed_mm: np.ndarray) -> np.ndarray:
        """The curve at water-equivalent depths ``wed_mm`` (zero beyond the extent)."""
        return self._interp(wed_mm, self.idd_mev_cm2_g, 0.0)

    def mean_between(self, lo_mm: np.ndarray, hi_mm: np.ndarray) -> np.ndarray:
        """Average of the curve over water-equivalent depths ``[lo_mm, hi_mm]`` (element-wise, ``hi >= lo``).

        Intervals thinner than 1e-6 mm take the curve at ``lo``; it is evaluated only where there are
        such intervals (the same numbers as evaluating it everywhere and choosing, bit for bit; with the
        kept slopes of :meth:`_interp` 2.5x faster than before on 30,000 intervals)."""
        lo = np.asarray(lo_mm, dtype=np.float64)
        hi = np.asarray(hi_mm, dtype=np.float64)
        end = float(self.cumulative_mev_cm2_g_mm[-1])
        f_lo = self._interp(lo, self.cumulative_mev_cm2_g_mm, end)
        mean = self._interp(hi, self.cumulative_mev_cm2_g_mm, end)
        mean -= f_lo
        width = hi - lo
        thin = width < 1e-6
        if not thin.any():
            mean /= width
            return mean
        with np.errstate(invalid="ignore", divide="ignore"):
            mean /= np.where(thin, 1.0, width)
        return np.where(thin, self.at(lo), mean)

    @property
    def peak_depth_mm(self) -> float:
        return float(self.depth_mm[int(np.argmax(self.idd_mev_cm2_g))])

    def distal_depth_mm(self, fraction: float) -> float:
        """Depth (mm) distal to the peak where the curve falls to ``fraction`` of its maximum."""
        i_peak = int(np.argmax(self.idd_mev_cm2_g))
        level = fraction * self.idd_mev_cm2_g[i_peak]
        tail = self.idd_mev_cm2_g[i_peak:]
        j = int(np.argmax(tail < level))  # first sample below the level (the table ends at ~1e-8 of the peak)
        d0, d1 = self.depth_mm[i_peak + j - 1], self.depth_mm[i_peak + j]
        v0, v1 = tail[j - 1], tail[j]
        return float(d0 + (v0 - level) / (v0 - v1) * (d1 - d0))


@functools.lru_cache(maxsize=1024)
def _water_depth_dose_cached(energy_mev: float) -> WaterDepthDose:
    extent = beam_extent_wed_mm(energy_mev)
    step = min(0.05, bragg_sigma_mm(energy_mev) / 16.0)
    n = int(math.ceil(extent / step)) + 1
    depth = np.linspace(0.0, extent, n)
    idd = depth_dose_mev_cm2_g(depth, energy_mev)
    idd[-1] = 0.0
    cumulative = np.concatenate(([0.0], np.cumsum(0.5 * (idd[1:] + idd[:-1]) * np.diff(depth))))
    for arr in (depth, idd, cumulative):
        arr.flags.writeable = False
    return WaterDepthDose(energy_mev, depth, idd, cumulative, float(extent))


def water_depth_dose(energy_mev: float) -> WaterDepthDose:
    """The tabulated Bortfeld curve for ``energy_mev`` (cached per energy)."""
    return _water_depth_dose_cached(_scalar_energy(energy_mev))


def r80_mm(energy_mev: np.ndarray | float) -> np.ndarray | float:
    """Distal 80 % depth (mm) of the analytic integral depth dose in water, as the analytic engine models it."""
    e = _positive(energy_mev, "energy (MeV)")
    out = np.array([water_depth_dose(float(x)).distal_depth_mm(0.8) for x in e.reshape(-1)]).reshape(e.shape)
    return float(out) if out.ndim == 0 else out
