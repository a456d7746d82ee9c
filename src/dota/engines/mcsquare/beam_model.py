"""MCsquare beam models (BDL files, UPenn double-Gaussian format): read, extend below 100 MeV, write.

The package ships :data:`BEAM_MODEL_FILE` (``dota/resources/mcsquare``, 70-225 MeV): the wheel's IBA
dedicated-nozzle model (:data:`SHIPPED_BEAM_MODEL`) with rows below 100 MeV added by
:func:`extend_beam_model`; ``dota mcsquare beam-model --out PATH`` rebuilds it from an installed MCsquare.
Sources and reasoning in ``resources/mcsquare/README.md``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from dota.errors import DataFileError, InputError
from dota.physics.ranges import PROTON_MASS_MEV, pv_mev
from dota.physics.stopping import bethe_water_stopping_power

#: The beam model this package ships and the engine uses (see resources/mcsquare/README.md).
BEAM_MODEL_FILE = "BDL_dota_IBA_DN_70_225.txt"
#: The wheel's beam model that :data:`BEAM_MODEL_FILE` extends, relative to the MCsquare install folder.
SHIPPED_BEAM_MODEL = Path("BDL") / "BDL_default_DN_RangeShifter.txt"
#: Rows added below the shipped model's first commissioned energy (100 MeV).
EXTENSION_ENERGIES_MEV: tuple[float, ...] = (70.0, 75.0, 80.0, 85.0, 90.0, 95.0)
_SPOT_COLUMNS = ("SpotSize1x", "Divergence1x", "SpotSize1y", "Divergence1y",
                 "SpotSize2x", "Divergence2x", "SpotSize2y", "Divergence2y")


def beam_model_path() -> Path:
    """The extended beam model (70-225 MeV) this package ships."""
    return Path(str(resources.files("dota").joinpath("resources", "mcsquare", BEAM_MODEL_FILE)))


@dataclass(frozen=True)
class BeamModel:
    """A double-Gaussian (UPenn format) MCsquare beam model: one row per nominal energy.

    ``columns`` follows the file's header (``NominalEnergy``, ``MeanEnergy``, ``EnergySpread``,
    ``ProtonsMU``, ...); ``table`` is (n_energies, n_columns).
    """

    header: str
    columns: tuple[str, ...]
    table: np.ndarray

    def column(self, name: str) -> np.ndarray:
        return self.table[:, self.columns.index(name)]


def read_beam_model(path: str | os.PathLike) -> BeamModel:
    """Parse a UPenn-format BDL file."""
    text = Path(path).read_text().replace("\r\n", "\n")
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if line.strip().startswith("NominalEnergy"):
            break
    else:
        raise DataFileError(f"{path} is not an MCsquare beam model (no NominalEnergy header)")
    columns = tuple(lines[i].split())
    rows = [[float(v) for v in ln.split()] for ln in lines[i + 1 :] if ln.strip() and not ln.startswith("#")]
    table = np.asarray(rows, dtype=np.float64)
    if table.ndim != 2 or table.shape[1] != len(columns):
        raise DataFileError(f"{path}: beam model rows do not have {len(columns)} columns")
    return BeamModel(header="\n".join(lines[:i]).rstrip() + "\n", columns=columns, table=table)


def extend_beam_model(shipped: BeamModel, energies_mev: Sequence[float] = EXTENSION_ENERGIES_MEV,
                      fit_range_mev: tuple[float, float] = (100.0, 150.0)) -> BeamModel:
    """Add physically scaled rows below 100 MeV to the shipped IBA dedicated-nozzle model.

    The shipped ``BDL_default_DN`` model is commissioned from 100 MeV; below, MCsquare would interpolate
    against a 20 MeV placeholder row (a copy of the 100 MeV row). Its placeholder is dropped and rows at
    ``energies_mev`` are added (sources and reasoning in ``resources/mcsquare/README.md``):

    - mean energy: nominal + the 100 MeV row's offset (the energy calibration of the lowest commissioned
      layer);
    - energy spread (% of the mean energy): constant relative momentum spread (the energy-selection slit's
      acceptance), ``dE/E = (T + 2M)/(T + M) * dp/p``, anchored at the 100 MeV row;
    - protons per MU: inversely proportional to the stopping power (the monitor chamber's charge per
      proton; :func:`dota.physics.bethe_water_stopping_power`), anchored at 100 MeV;
    - spot sizes and divergences of both Gaussians: power law in p*v (multiple Coulomb scattering in the
      degrader and nozzle, theta0 ~ 1/(pv), Highland; :func:`dota.physics.pv_mev`), exponent fitted on the
      ``fit_range_mev`` rows and anchored at the 100 MeV row;
    - Gaussian weights: linear in energy (slope fitted on the same rows, anchored at 100 MeV);
      correlations: the 100 MeV row's.
    """
    nominal = shipped.column("NominalEnergy")
    keep = nominal >= fit_range_mev[0] - 1e-6
    table = shipped.table[keep]
    nominal = table[:, shipped.columns.index("NominalEnergy")]
    fit = (nominal >= fit_range_mev[0] - 1e-6) & (nominal <= fit_range_mev[1] + 1e-6)
    anchor = table[np.argmin(nominal)]
    col = shipped.columns.index
    e_new = np.asarray(sorted(energies_mev), dtype=np.float64)
    if e_new.size and e_new.max() >= nominal.min():
        raise InputError(f"extension energies must lie below {nominal.min():g} MeV")
    rows = np.repeat(anchor[None], e_new.size, axis=0)
    e0 = anchor[col("NominalEnergy")]
    rows[:, col("NominalEnergy")] = e_new
    rows[:, col("MeanEnergy")] = e_new + (anchor[col("MeanEnergy")] - e0)
    kin = lambda t: (t + 2 * PROTON_MASS_MEV) / (t + PROTON_MASS_MEV)  # noqa: E731
    rows[:, col("EnergySpread")] = anchor[col("EnergySpread")] * kin(e_new) / kin(e0)
    rows[:, col("ProtonsMU")] = (anchor[col("ProtonsMU")] * bethe_water_stopping_power(e0)
                                 / bethe_water_stopping_power(e_new))
    log_pv = np.log(pv_mev(nominal[fit]))
    for name in _SPOT_COLUMNS:
        exponent = np.polyfit(log_pv, np.log(table[fit, col(name)]), 1)[0]
        rows[:, col(name)] = anchor[col(name)] * (pv_mev(e_new) / pv_mev(e0)) ** exponent
    slope = np.polyfit(nominal[fit], table[fit, col("Weight1")], 1)[0]
    rows[:, col("Weight1")] = anchor[col("Weight1")] + slope * (e_new - e0)
    rows[:, col("Weight2")] = 1.0 - rows[:, col("Weight1")]
    header = re.sub(r"# Beam data library.*\n",
                    "# Beam data library (IBA dedicated nozzle), extended to 70 MeV by dota: "
                    "see dota/resources/mcsquare/README.md\n", shipped.header)
    return BeamModel(header=header, columns=shipped.columns, table=np.concatenate([rows, table]))


def format_beam_model(model: BeamModel) -> str:
    """Text of a UPenn-format BDL file (LF line endings: MCsquare misreads CRLF beam models)."""
    header = re.sub(r"\d+ energies", f"{len(model.table)} energies", model.header)
    lines = [header.rstrip("\n"), "", " \t ".join(model.columns)]
    for row in model.table:
        lines.append(" \t ".join(f"{v:.6f}" if abs(v) < 1e6 else f"{v:.1f}" for v in row))
    return "\n".join(lines) + "\n"
