"""A pencil-beam-scanning proton plan: beams, energy layers, spots with their monitor units.

Units and frames: isocentres in DICOM patient coordinates (mm), gantry and couch angles in degrees
(IEC 61217, see :mod:`dota.plan.geometry`), spot positions ``(X, Y)`` in mm in the IEC
beam-limiting-device frame at the isocentre plane, nominal energies in MeV, spot weights in monitor
units (MU) per fraction. Dose computed from a plan is for all ``fractions``.

MU become protons through the beam model's ``ProtonsMU`` column (MCsquare's beam model,
:func:`protons_per_mu`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from dota.constants import ENGINE_ENERGY_RANGE_MEV
from dota.errors import InputError
from dota.plan.geometry import PATIENT_POSITIONS


@dataclass
class EnergyLayer:
    """One energy layer: nominal energy (MeV), spot positions (n, 2) ``(X, Y)`` mm, weights (n,) MU."""

    energy_mev: float
    positions_mm: np.ndarray
    mu: np.ndarray

    def __post_init__(self) -> None:
        self.energy_mev = float(self.energy_mev)
        self.positions_mm = np.asarray(self.positions_mm, dtype=np.float64).reshape(-1, 2)
        self.mu = np.asarray(self.mu, dtype=np.float64).reshape(-1)
        if len(self.mu) != len(self.positions_mm):
            raise InputError(f"energy layer {self.energy_mev:g} MeV: {len(self.positions_mm)} spot positions but "
                             f"{len(self.mu)} weights")

    @property
    def n_spots(self) -> int:
        return int(len(self.mu))


@dataclass
class Beam:
    """One treatment field (see the module docstring for units and frames)."""

    name: str
    gantry_deg: float
    couch_deg: float
    isocenter_mm: tuple[float, float, float]
    layers: list[EnergyLayer] = field(default_factory=list)
    patient_position: str = "HFS"

    def __post_init__(self) -> None:
        self.gantry_deg = float(self.gantry_deg)
        self.couch_deg = float(self.couch_deg)
        iso = np.asarray(self.isocenter_mm, dtype=np.float64).reshape(-1)
        if iso.shape != (3,) or not np.all(np.isfinite(iso)):
            raise InputError(f"beam {self.name!r}: the isocentre must be three finite numbers (mm), got "
                             f"{self.isocenter_mm}")
        self.isocenter_mm = tuple(float(v) for v in iso)
        self.patient_position = str(self.patient_position).upper()
        if self.patient_position not in PATIENT_POSITIONS:
            raise InputError(f"beam {self.name!r}: patient position {self.patient_position!r} is not supported "
                             f"(use {', '.join(PATIENT_POSITIONS)})")

    @property
    def n_spots(self) -> int:
        return sum(layer.n_spots for layer in self.layers)

    @property
    def total_mu(self) -> float:
        return float(sum(layer.mu.sum() for layer in self.layers))

    def spot_table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All spot-energies of the beam: ``(positions (n, 2) mm, energies (n,) MeV, mu (n,))`` in layer order."""
        if not self.layers:
            return np.zeros((0, 2)), np.zeros(0), np.zeros(0)
        pos = np.concatenate([layer.positions_mm for layer in self.layers])
        energy = np.concatenate([np.full(layer.n_spots, layer.energy_mev) for layer in self.layers])
        mu = np.concatenate([layer.mu for layer in self.layers])
        return pos, energy, mu


@dataclass
class Plan:
    """A plan: its beams, the number of fractions, and where it came from."""

    beams: list[Beam]
    fractions: int = 1
    name: str = "plan"
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if int(self.fractions) < 1:
            raise InputError(f"a plan needs at least one fraction, got {self.fractions}")
        self.fractions = int(self.fractions)

    @property
    def n_spots(self) -> int:
        """Spot-energies (one spot of one layer) over all beams."""
        return sum(b.n_spots for b in self.beams)

    @property
    def total_mu(self) -> float:
        return float(sum(b.total_mu for b in self.beams))

    def spot_weights(self) -> np.ndarray:
        """MU per fraction of every spot-energy, beams then layers then spots: the column order of a dij."""
        parts = [b.spot_table()[2] for b in self.beams]
        return np.concatenate(parts) if parts else np.zeros(0)

    def with_weights(self, mu: np.ndarray) -> Plan:
        """A copy with the spot weights replaced (same order as :meth:`spot_weights`)."""
        mu = np.asarray(mu, dtype=np.float64).reshape(-1)
        if mu.size != self.n_spots:
            raise InputError(f"{mu.size} weights for a plan of {self.n_spots} spot-energies")
        beams, start = [], 0
        for b in self.beams:
            layers = []
            for layer in b.layers:
                layers.append(EnergyLayer(layer.energy_mev, layer.positions_mm.copy(), mu[start:start + layer.n_spots]))
                start += layer.n_spots
            beams.append(Beam(b.name, b.gantry_deg, b.couch_deg, b.isocenter_mm, layers, b.patient_position))
        return Plan(beams, self.fractions, self.name, dict(self.info))

    def subset(self, keep: np.ndarray) -> Plan:
        """A copy with only the spot-energies where ``keep`` (a mask in :meth:`spot_weights` order) is true;
        layers and beams left without spots are dropped."""
        keep = np.asarray(keep, dtype=bool).reshape(-1)
        if keep.size != self.n_spots:
            raise InputError(f"a mask of {keep.size} for a plan of {self.n_spots} spot-energies")
        beams, start = [], 0
        for b in self.beams:
            layers = []
            for layer in b.layers:
                sel = keep[start:start + layer.n_spots]
                start += layer.n_spots
                if sel.any():
                    layers.append(EnergyLayer(layer.energy_mev, layer.positions_mm[sel], layer.mu[sel]))
            if layers:
                beams.append(Beam(b.name, b.gantry_deg, b.couch_deg, b.isocenter_mm, layers, b.patient_position))
        return Plan(beams, self.fractions, self.name, dict(self.info))

    def validate(self, energy_range_mev: tuple[float, float] = ENGINE_ENERGY_RANGE_MEV, where: str = "") -> None:
        """Raise :class:`InputError` on an empty plan, negative or non-finite weights or positions, or a
        nominal energy outside ``energy_range_mev`` (the beam model's range, 70-225 MeV)."""
        prefix = f"{where}: " if where else ""
        lo, hi = energy_range_mev
        if not self.beams:
            raise InputError(f"{prefix}the plan has no beams")
        for b in self.beams:
            if not b.layers:
                raise InputError(f"{prefix}beam {b.name!r} has no energy layers")
            for i, layer in enumerate(b.layers):
                if not np.isfinite(layer.energy_mev) or not lo - 1e-3 <= layer.energy_mev <= hi + 1e-3:
                    raise InputError(f"{prefix}beam {b.name!r}, layer {i + 1}: energy {layer.energy_mev:g} MeV is "
                                     f"outside the beam model's range {lo:g}-{hi:g} MeV")
                if not np.all(np.isfinite(layer.positions_mm)):
                    raise InputError(f"{prefix}beam {b.name!r}, layer {i + 1}: spot positions are not finite")
                if not np.all(np.isfinite(layer.mu)) or np.any(layer.mu < 0):
                    raise InputError(f"{prefix}beam {b.name!r}, layer {i + 1}: spot weights must be finite and >= 0")
        if self.total_mu <= 0:
            raise InputError(f"{prefix}every spot weight of the plan is zero")


@functools.lru_cache(maxsize=1)
def _beam_model_protons_mu() -> tuple[np.ndarray, np.ndarray]:
    from dota.engines.mcsquare import beam_model_path, read_beam_model

    model = read_beam_model(beam_model_path())
    energy, protons = model.column("NominalEnergy"), model.column("ProtonsMU")
    order = np.argsort(energy)
    return energy[order], protons[order]


def beam_model_energy_range_mev() -> tuple[float, float]:
    """Nominal energies (MeV) the shipped MCsquare beam model covers."""
    energy, _ = _beam_model_protons_mu()
    return float(energy[0]), float(energy[-1])


def protons_per_mu(energy_mev: np.ndarray | float) -> np.ndarray:
    """Protons per MU at nominal energies (MeV): the beam model's ``ProtonsMU``, linear in energy between rows.

    Raises :class:`InputError` outside the beam model's energies.
    """
    energy, protons = _beam_model_protons_mu()
    e = np.asarray(energy_mev, dtype=np.float64)
    if np.any(e < energy[0] - 1e-3) or np.any(e > energy[-1] + 1e-3):
        raise InputError(f"energies {e.min():g}-{e.max():g} MeV lie outside the beam model's "
                         f"{energy[0]:g}-{energy[-1]:g} MeV")
    return np.interp(e, energy, protons)
