"""One interface for every dose engine (analytic, Monte Carlo, learned) and a registry of them.

Ground truth, baseline and model are interchangeable in every command::

    engine = get_engine("analytic")
    dose = engine.dose(geometry_hu, energies_mev)   # (N, L, H, W) Gy per 1e9 primaries

The built-in engines are listed in :data:`BUILTIN_ENGINES` and imported when first asked for (so that
``import dota`` stays light); :func:`register_engine` adds others.
"""

from __future__ import annotations

import abc
import importlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from dota.constants import VOXEL_MM
from dota.errors import InputError

#: Built-in engines: name -> (``"module:Class"``, the keyword arguments this name fixes).
BUILTIN_ENGINES: dict[str, tuple[str, dict[str, Any]]] = {
    "analytic": ("dota.engines.analytic:AnalyticEngine", {}),
    "analytic-bdl": ("dota.engines.analytic:AnalyticEngine", {"spot_model": "beam-model"}),
    "dota": ("dota.engines.learned:LearnedEngine", {}),
    "stored": ("dota.engines.stored:StoredBeamletEngine", {}),
    "mcsquare": ("dota.engines.mcsquare:MCsquareEngine", {}),
}
#: Engines added with :func:`register_engine`.
_REGISTRY: dict[str, Callable[..., DoseEngine]] = {}


def beamlet_seed(master_seed: int, index: int) -> int:
    """The engine seed (e.g. MCsquare's ``RNG_Seed``, in 1 .. 2**31 - 1) of beamlet ``index`` under
    ``master_seed``: stream 1 of the beamlet's ``SeedSequence(master_seed, spawn_key=(index, stream))``.

    The one derivation for ``dota generate`` (:attr:`dota.generate.BeamletSpec.seed`, whose other
    streams draw the beamlet's geometry and energy) and for engines called without seeds, so a beamlet
    gets the same seed either way and generated datasets stay reproducible.
    """
    state = np.random.SeedSequence(int(master_seed), spawn_key=(int(index), 1)).generate_state(1)[0]
    return int(state % (2**31 - 2)) + 1


class DoseEngine(abc.ABC):
    """A beamlet dose engine.

    Subclasses set ``name``, ``version``, ``primaries`` (protons per beamlet, 0 for analytic) and
    ``hu_calibration`` and implement :meth:`dose`.
    """

    name: str = "base"
    version: str = "0"
    primaries: int = 0
    seed: int = 0  # master seed of an engine that samples: beamlet i gets beamlet_seed(seed, i) unless seeded
    hu_calibration: str = ""
    energy_range_mev: tuple[float, float] = (70.0, 225.0)
    #: Whether the engine's beamlets are MCsquare single-spot blocks (or a model trained on them): the
    #: dose inside the block only, with the beam model's isocentre spot at the block's entrance. Plan dose
    #: then adds what a spot puts outside its block (:mod:`dota.plan.halo`) and corrects each block for the
    #: spot's size where it really enters (upstream of the isocentre: :mod:`dota.plan.dose`).
    mcsquare_blocks: bool = False
    #: Whether copies of this engine may run at once in forked worker processes, each on its share of the
    #: cores (a CPU engine with no state shared beyond what it reads): plan dose then runs its engine calls
    #: in several (:func:`dota.plan.dose.plan_workers`).
    concurrent: bool = False

    def lateral_excess_mm2(self, energies_mev: np.ndarray) -> np.ndarray:
        """(n, 2) how much wider (variance, mm^2; rows, cols) the engine's beamlets are than the Monte Carlo
        blocks they stand for, per energy: plans sharpen them by it with the entrance-spot correction
        (:mod:`dota.plan.dose`). Zero unless measured (a learned model's record: ``scripts/fit_lateral.py``)."""
        return np.zeros((len(np.atleast_1d(energies_mev)), 2))

    @abc.abstractmethod
    def dose(
        self,
        geometry_hu: np.ndarray,
        energies_mev: np.ndarray,
        voxel_mm: tuple[float, float, float] = VOXEL_MM,
        *,
        seeds: Sequence[int] | None = None,
    ) -> np.ndarray:
        """Dose to water in Gy per 1e9 primaries, float32 (N, L, H, W), for beamlets entering at depth 0,
        centred laterally. ``geometry_hu`` is (N, L, H, W) HU, ``energies_mev`` is (N,).

        ``seeds`` (N,) are the beamlets' own seeds (:func:`beamlet_seed`) for engines that sample
        (Monte Carlo); deterministic engines ignore them."""

    def plan_dose(
        self,
        geometry_hu: np.ndarray,
        energies_mev: np.ndarray,
        voxel_mm: tuple[float, float, float] = VOXEL_MM,
        *,
        seeds: Sequence[int] | None = None,
    ) -> np.ndarray:
        """The beamlet dose a plan sums (:mod:`dota.plan.dose`): :meth:`dose`, except where an engine's
        beamlets are estimates that clipping at zero would bias (the learned model: its small negative
        values around zero cancel across the spots of a plan, whose total is clipped instead)."""
        return self.dose(geometry_hu, energies_mev, voxel_mm, seeds=seeds)

    def file_attrs(self) -> dict[str, Any]:
        """Attributes this engine contributes to a dataset file (``dataset-format.md``)."""
        return {
            "engine": self.name,
            "engine_version": self.version,
            "primaries": int(self.primaries),
            "hu_calibration": self.hu_calibration,
        }


def register_engine(name: str) -> Callable[[Callable[..., DoseEngine]], Callable[..., DoseEngine]]:
    """Class or factory decorator adding an engine to the registry under ``name`` (a name of
    :data:`BUILTIN_ENGINES` keeps its built-in engine)."""

    def deco(factory: Callable[..., DoseEngine]) -> Callable[..., DoseEngine]:
        _REGISTRY[name] = factory
        return factory

    return deco


def available_engines() -> list[str]:
    """Names accepted by :func:`get_engine`."""
    return sorted(set(BUILTIN_ENGINES) | set(_REGISTRY))


def get_engine(name: str, **kwargs: Any) -> DoseEngine:
    """Build the engine registered as ``name`` (``"analytic"``, ``"mcsquare"``, ``"dota"``, ...)."""
    if name in BUILTIN_ENGINES:
        target, fixed = BUILTIN_ENGINES[name]
        module, cls = target.split(":")
        return getattr(importlib.import_module(module), cls)(**fixed, **kwargs)
    if name not in _REGISTRY:
        raise InputError(f"unknown dose engine {name!r}; available: {', '.join(available_engines())}")
    return _REGISTRY[name](**kwargs)
