"""One interface for every dose engine (analytic, Monte Carlo, learned) and a registry of them.

Ground truth, baseline and model are interchangeable in every command::

    engine = get_engine("analytic")
    dose = engine.dose(geometry_hu, energies_mev)   # (N, L, H, W) Gy per 1e9 primaries
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import numpy as np

from dota.constants import VOXEL_MM
from dota.errors import InputError

_REGISTRY: dict[str, Callable[..., DoseEngine]] = {}


class DoseEngine(abc.ABC):
    """A beamlet dose engine.

    Subclasses set ``name``, ``version``, ``primaries`` (protons per beamlet, 0 for analytic) and
    ``hu_calibration`` and implement :meth:`dose`.
    """

    name: str = "base"
    version: str = "0"
    primaries: int = 0
    hu_calibration: str = ""
    energy_range_mev: tuple[float, float] = (70.0, 225.0)

    @abc.abstractmethod
    def dose(
        self,
        geometry_hu: np.ndarray,
        energies_mev: np.ndarray,
        voxel_mm: tuple[float, float, float] = VOXEL_MM,
    ) -> np.ndarray:
        """Dose to water in Gy per 1e9 primaries, float32 (N, L, H, W), for beamlets entering at depth 0,
        centred laterally. ``geometry_hu`` is (N, L, H, W) HU, ``energies_mev`` is (N,)."""

    def file_attrs(self) -> dict[str, Any]:
        """Attributes this engine contributes to a dataset file (``dataset-format.md``)."""
        return {
            "engine": self.name,
            "engine_version": self.version,
            "primaries": int(self.primaries),
            "hu_calibration": self.hu_calibration,
        }


def register_engine(name: str) -> Callable[[Callable[..., DoseEngine]], Callable[..., DoseEngine]]:
    """Class or factory decorator adding an engine to the registry under ``name``."""

    def deco(factory: Callable[..., DoseEngine]) -> Callable[..., DoseEngine]:
        _REGISTRY[name] = factory
        return factory

    return deco


def _load_builtin_engines() -> None:
    # Imported lazily so that ``import dota`` stays light; each module registers itself.
    import importlib

    for module in ("analytic", "mcsquare", "learned"):
        try:
            importlib.import_module(f"dota.engines.{module}")
        except ModuleNotFoundError as exc:  # a module not written yet, never a missing dependency
            if exc.name != f"dota.engines.{module}":
                raise


def available_engines() -> list[str]:
    """Names accepted by :func:`get_engine`."""
    _load_builtin_engines()
    return sorted(_REGISTRY)


def get_engine(name: str, **kwargs: Any) -> DoseEngine:
    """Build the engine registered as ``name`` (``"analytic"``, ``"mcsquare"``, ``"dota"``)."""
    _load_builtin_engines()
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise InputError(f"unknown dose engine {name!r}; available: {', '.join(sorted(_REGISTRY))}") from None
    return factory(**kwargs)
