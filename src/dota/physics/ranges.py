"""Proton ranges in water from the NIST PSTAR table (CSDA range against kinetic energy).

The table (``dota/resources/pstar_water_csda.csv``, NIST public data) lists 70-225 MeV. Between its
rows the range is interpolated linearly in log(range) against log(energy); outside them it follows
the power law (Bragg-Kleeman rule) of the nearest end segment, which is within a few per cent of
PSTAR down to a few MeV (used only for the residual energy of protons near the end of their range).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources

import numpy as np

from dota.errors import DataFileError, InputError

#: Proton rest energy, MeV.
PROTON_MASS_MEV: float = 938.272

_PSTAR_FILE = "pstar_water_csda.csv"


@dataclass(frozen=True)
class PstarTable:
    """NIST PSTAR rows for liquid water (density 1 g/cm^3): energies in MeV, CSDA ranges in mm."""

    energy_mev: np.ndarray
    csda_range_mm: np.ndarray


@functools.lru_cache(maxsize=1)
def load_pstar() -> PstarTable:
    """The PSTAR water table shipped with the package (read-only arrays, sorted by energy)."""
    try:
        text = resources.files("dota").joinpath("resources", _PSTAR_FILE).read_text(encoding="utf-8")
    except (FileNotFoundError, OSError) as exc:
        raise DataFileError(f"PSTAR table dota/resources/{_PSTAR_FILE} is missing: reinstall the package ({exc})") from None
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or line.startswith("energy"):
            continue
        try:
            energy, range_g_cm2 = (float(x) for x in line.split(","))
        except ValueError:
            raise DataFileError(f"PSTAR table dota/resources/{_PSTAR_FILE}: cannot read the row {line!r}") from None
        rows.append((energy, 10.0 * range_g_cm2))
    table = np.array(sorted(rows), dtype=np.float64)
    if len(table) < 2 or np.any(np.diff(table[:, 0]) <= 0) or np.any(np.diff(table[:, 1]) <= 0):
        raise DataFileError(f"PSTAR table dota/resources/{_PSTAR_FILE} is not a strictly increasing range-energy table")
    energy_mev, range_mm = table[:, 0].copy(), table[:, 1].copy()
    energy_mev.flags.writeable = False
    range_mm.flags.writeable = False
    return PstarTable(energy_mev=energy_mev, csda_range_mm=range_mm)


@functools.lru_cache(maxsize=2)
def _log_table(to_energy: bool) -> tuple[np.ndarray, np.ndarray, float, float]:
    """The PSTAR table's logs (range to energy, or energy to range) and its end segments' slopes, taken once."""
    table = load_pstar()
    xp, fp = (table.csda_range_mm, table.energy_mev) if to_energy else (table.energy_mev, table.csda_range_mm)
    lxp, lfp = np.log(xp), np.log(fp)
    return lxp, lfp, (lfp[1] - lfp[0]) / (lxp[1] - lxp[0]), (lfp[-1] - lfp[-2]) / (lxp[-1] - lxp[-2])


def _loglog(x: np.ndarray, to_energy: bool) -> np.ndarray:
    """The PSTAR table interpolated piecewise-linearly in log-log space at ``x`` (finite, positive; ranges in mm
    to energies with ``to_energy``, else energies to ranges), power-law extrapolation from the end segments
    (applied only where some point needs it)."""
    x = np.asarray(x, dtype=np.float64)
    lxp, lfp, lo_slope, hi_slope = _log_table(bool(to_energy))
    lx = np.log(x.reshape(-1))
    out = np.interp(lx, lxp, lfp)
    for beyond, node, value, slope in ((lx < lxp[0], lxp[0], lfp[0], lo_slope),
                                       (lx > lxp[-1], lxp[-1], lfp[-1], hi_slope)):
        if beyond.any():
            np.copyto(out, value + slope * (lx - node), where=beyond)
    return np.exp(out, out=out).reshape(x.shape)


def _positive(values, what: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise InputError(f"{what} must be finite and positive")
    return arr


def csda_range_mm(energy_mev: np.ndarray | float) -> np.ndarray | float:
    """CSDA range of protons in water, mm, for kinetic energies in MeV (vectorised; scalar in, scalar out)."""
    energy = _positive(energy_mev, "energy (MeV)")
    out = _loglog(energy, to_energy=False)
    return float(out) if out.ndim == 0 else out


def energy_from_csda_range_mev(range_mm: np.ndarray | float) -> np.ndarray | float:
    """Inverse of :func:`csda_range_mm`: the kinetic energy (MeV) whose CSDA range in water is ``range_mm``."""
    ranges_mm = _positive(range_mm, "range (mm)")
    out = _loglog(ranges_mm, to_energy=True)
    return float(out) if out.ndim == 0 else out


def pv_mev(energy_mev: np.ndarray | float) -> np.ndarray:
    """Momentum times speed, ``p v = T (T + 2M) / (T + M)`` (MeV), of a proton of kinetic energy ``T`` =
    ``energy_mev``: the ``1/(pv)`` of multiple Coulomb scattering (Highland)."""
    e = np.asarray(energy_mev, dtype=np.float64)
    return e * (e + 2.0 * PROTON_MASS_MEV) / (e + PROTON_MASS_MEV)
