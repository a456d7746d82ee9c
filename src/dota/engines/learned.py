"""The learned engine: a DoTA model behind the common :class:`~dota.engines.base.DoseEngine` interface."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dota.constants import VOXEL_MM
from dota.engines.base import DoseEngine
from dota.errors import InputError


class LearnedEngine(DoseEngine):
    """Dose from a trained DoTA model: the shipped default model unless ``model`` names a checkpoint path
    (or a preset name, for random weights seeded with ``seed``), or is a loaded model.

    Runs through an inference engine (``runner``: exact caching and truncation), on ``device``: ``"cpu"``,
    ``"cuda"`` or ``"auto"`` (CUDA when available; :func:`dota.runtime.resolve_device`). A loaded model
    stays where it is.

    ``mcsquare_blocks`` (:attr:`DoseEngine.mcsquare_blocks`: plans add the dose outside each block and
    correct the entrance spot size) is true for a model trained on MCsquare blocks only: checkpoints whose record
    says so (``dota train`` writes the training files' engines into each checkpoint, and the shipped model's
    file keeps them); false for others unless ``mcsquare_blocks=True``.
    """

    name = "dota"
    primaries = 0

    def __init__(self, model: str | None = None, device: str = "cpu", batch_size: int = 16, seed: int = 0,
                 mcsquare_blocks: bool | None = None) -> None:
        from dota import __version__
        from dota.checkpoint import DEFAULT_MODEL, load_model
        from dota.inference import InferenceEngine
        from dota.model import DoTA
        from dota.runtime import resolve_device

        if model is None:
            model = DEFAULT_MODEL
        if isinstance(model, DoTA):
            self.model: DoTA = model
        else:
            self.model = load_model(model, device=resolve_device(device), seed=seed)
        self.model.eval()
        self.runner = InferenceEngine(self.model)
        self.batch_size = batch_size
        self.version = f"dota-dose {__version__}"
        self.hu_calibration = "learned (trained on the reference engine's calibration)"
        self.energy_range_mev = tuple(self.model.normalization.energy_range_mev)
        self.source = str(model)
        self.mcsquare_blocks = _trained_on_mcsquare(model) if mcsquare_blocks is None else bool(mcsquare_blocks)
        self.concurrent = self.model.device.type == "cpu"  # on a GPU one stream of calls keeps it busy
        self.lateral_table = _lateral_table(self.model, self.source)

    def dose(self, geometry_hu: np.ndarray, energies_mev: np.ndarray, voxel_mm=VOXEL_MM, *,
             seeds: Sequence[int] | None = None) -> np.ndarray:
        """The model's dose (see :meth:`DoseEngine.dose`); deterministic, so ``seeds`` are ignored."""
        self._check_voxel(voxel_mm)
        return self.runner.predict(geometry_hu, energies_mev, batch_size=self.batch_size)

    def plan_dose(self, geometry_hu: np.ndarray, energies_mev: np.ndarray, voxel_mm=VOXEL_MM, *,
                  seeds: Sequence[int] | None = None) -> np.ndarray:
        """The model's dose before clipping at zero (:meth:`DoseEngine.plan_dose`): clipping each beamlet
        added 0.2 % to the integral dose of the 100 test beamlets and 0.15 % to a head-and-neck plan's PTV
        mean (its gamma against MCsquare 94.31 % with, 94.61 % without)."""
        self._check_voxel(voxel_mm)
        return self.runner.predict(geometry_hu, energies_mev, batch_size=self.batch_size, clip=False)

    def lateral_excess_mm2(self, energies_mev: np.ndarray) -> np.ndarray:
        """The model's beamlets' lateral variance above their Monte Carlo twins' (:meth:`DoseEngine.lateral_excess_mm2`),
        from the table in its record (``extra["plan_lateral_mm2"]``, measured by ``scripts/fit_lateral.py`` on
        validation plan blocks), linear in energy between the table's bins and constant beyond them; zero
        without a table."""
        e = np.atleast_1d(np.asarray(energies_mev, dtype=np.float64))
        if self.lateral_table is None:
            return np.zeros((len(e), 2))
        t = self.lateral_table
        return np.stack([np.interp(e, t["energy_mev"], t["rows_mm2"]), np.interp(e, t["energy_mev"], t["cols_mm2"])], axis=1)

    def _check_voxel(self, voxel_mm: Sequence[float]) -> None:
        expected = tuple(float(v) for v in self.model.config.voxel_mm)
        if tuple(float(v) for v in voxel_mm) != expected:
            raise InputError(f"voxel size {tuple(voxel_mm)} mm differs from the model's {expected} mm")


def _lateral_table(model: object, source: str) -> dict[str, np.ndarray] | None:
    """The lateral calibration in the record a loaded checkpoint carries (``checkpoint_info``, read by
    :func:`dota.checkpoint.load_model`), checked; None for a preset's fresh weights or a record without one."""
    extra = (getattr(model, "checkpoint_info", None) or {}).get("extra") or {}
    table = extra.get("plan_lateral_mm2")
    if table is None:
        return None
    from dota.plan.lateral import check_lateral_table

    return check_lateral_table(table, source)


def _trained_on_mcsquare(model: object) -> bool:
    """Whether ``model`` was trained on MCsquare blocks only: a checkpoint (the shipped default model, by name,
    path or a copy, included) whose record (``extra``) lists ``data_engines`` ``["mcsquare"]``. Checkpoints
    without that record (written before it was kept) and loaded models give False: pass
    ``mcsquare_blocks=True`` for one trained on MCsquare."""
    from pathlib import Path

    from dota.checkpoint import DEFAULT_MODEL, default_model_path, read_checkpoint_metadata

    if isinstance(model, str) and model == DEFAULT_MODEL:
        model = default_model_path()
    if not isinstance(model, (str, Path)) or not Path(model).is_file():
        return False
    engines = read_checkpoint_metadata(model)["extra"].get("data_engines")
    return engines is not None and list(engines) == ["mcsquare"]
