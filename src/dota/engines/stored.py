"""Beamlets replayed from a file: the blocks a plan's engine got and the doses it gave (``dota dose --blocks-out``),
served back in the same order, so that the plan pipeline (deposition, corrections, halo, carry) can be rerun on
Monte Carlo beamlets in seconds instead of the Monte Carlo's minutes (``dota dose --engine stored --blocks-in``).

Each call checks that the blocks and energies it is asked for are the stored ones (HU clipped to the stored
range and rounded as stored, to 1 HU; energies to 1e-3 MeV): a file written for another plan, CT or cutting of
the blocks is refused with a one-line error instead of giving a dose that belongs to something else. The engine
stands for the engine that wrote the file (its name, version, protons and whether its beamlets are MCsquare
blocks, which decides the plan's corrections for them). It serves beamlets in order, so a plan runs it in one
process (not ``concurrent``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from dota.constants import HU_CLIP, VOXEL_MM
from dota.engines.base import DoseEngine
from dota.errors import InputError

#: Engines whose stored beamlets are MCsquare single-spot blocks (:attr:`DoseEngine.mcsquare_blocks`).
_MCSQUARE_BLOCK_ENGINES = ("mcsquare",)


class StoredBeamletEngine(DoseEngine):
    """The beamlets of ``path`` (HDF5 beamlet format, as ``dota dose --blocks-out`` writes it), in order."""

    name = "stored"
    concurrent = False

    def __init__(self, path: str | os.PathLike, seed: int = 0) -> None:
        from dota.data.hdf5 import BeamletFile

        self.path = str(path)
        self.seed = int(seed)
        self._file = BeamletFile(path)
        attrs: dict[str, Any] = dict(self._file.attrs)
        self.source_engine = str(attrs.get("engine", "?"))
        self.version = f"{attrs.get('engine_version', '?')} (stored by {self.source_engine}: {self.path})"
        self.primaries = int(attrs.get("primaries", 0) or 0)
        self.hu_calibration = str(attrs.get("hu_calibration", ""))
        self.mcsquare_blocks = self.source_engine in _MCSQUARE_BLOCK_ENGINES
        self.count = int(self._file.energy.shape[0])
        self.served = 0

    def dose(self, geometry_hu: np.ndarray, energies_mev: np.ndarray | Sequence[float],
             voxel_mm: tuple[float, float, float] = VOXEL_MM, *, seeds: Sequence[int] | None = None) -> np.ndarray:
        geometry = np.asarray(geometry_hu, dtype=np.float32)
        geometry = geometry[None] if geometry.ndim == 3 else geometry
        energies = np.atleast_1d(np.asarray(energies_mev, dtype=np.float64))
        a, b = self.served, self.served + len(energies)
        if b > self.count:
            raise InputError(f"{self.path} holds {self.count} beamlets; this plan asks for more: it was written "
                             "for another plan (dota dose --blocks-out)")
        if geometry.shape[1:] != tuple(self._file.geometry.shape[1:]) or len(geometry) != len(energies):
            raise InputError(f"{self.path}: blocks of shape {tuple(self._file.geometry.shape[1:])}, asked for "
                             f"{geometry.shape[1:]}")
        stored_e = np.asarray(self._file.energy[a:b], dtype=np.float64)
        stored_g = np.asarray(self._file.geometry[a:b], dtype=np.float32)
        asked = np.rint(np.clip(geometry, *HU_CLIP))
        block_off = np.abs(asked - stored_g).reshape(len(asked), -1).max(axis=1) > 1.0
        wrong = (np.abs(stored_e - energies) > 1e-3) | block_off
        if wrong.any():
            raise InputError(f"{self.path}: beamlet {a + int(np.argmax(wrong))} is not the one this plan asks for "
                             "(other energy or block): the file was written for another plan, CT or version of the "
                             "pipeline")
        self.served = b
        return np.asarray(self._file.dose[a:b], dtype=np.float32)

    def file_attrs(self) -> dict[str, Any]:
        return {**super().file_attrs(), "engine": self.source_engine, "stored_from": self.path}
