"""Training data: a torch ``Dataset`` streaming beamlets from HDF5 files, with the paper's augmentation.

Each item is ``(geometry_scaled (L, H, W), energy_scaled (), dose_scaled (L, H, W))`` float32 tensors,
scaled by a :class:`~dota.model.Normalization`. Files are opened lazily in each worker process, so
datasets larger than memory work and ``DataLoader(num_workers>0)`` is safe.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from dota.constants import HU_CLIP
from dota.data.hdf5 import BeamletFile
from dota.errors import DataFileError
from dota.model import Normalization


class BeamletDataset(Dataset):
    """Beamlets ``indices`` of one or more dataset files.

    Parameters
    ----------
    paths
        One file or several (concatenated in order).
    normalization
        Scaling of geometry, energy and dose (computed with :func:`compute_normalization`).
    indices
        Global indices into the concatenation to use (e.g. a train or validation split); all by default.
    augment
        Random 90-degree lateral rotations (the paper's augmentation) and, if ``flips``, lateral flips.
        Without ``augment``, ``flips`` flips rows and columns (each with probability 1/2) but never swaps
        them: the shipped beam model's spot is wider along rows (IEC Y) than along columns (e.g. 7.9 vs
        4.9 mm at the nozzle at 70 MeV), and rotations swap the two, so a model trained with them learns
        spots between the two (fitted on plan blocks: too narrow along rows, too wide along columns by
        0.5-2.7 mm^2; :mod:`dota.plan.lateral`). The same transform is applied to geometry and dose. The transform of item ``i`` is drawn from
        a generator seeded by ``(seed, epoch, i)`` (see :meth:`set_epoch`), so it is reproducible in
        any worker and after a resume.
    base_engine
        ``"analytic"`` for a model that learns a correction to the analytic pencil beam
        (:attr:`dota.model.DoTAConfig.base_engine`): the base dose of every beamlet is computed once
        (about 30 ms each, kept in memory) and the item's dose target is the scaled Monte Carlo dose
        minus the scaled base dose.
    base_input
        Also stack the scaled base dose as a second input channel: items' geometry is (L, 2, H, W)
        (:attr:`dota.model.DoTAConfig.base_input`).
    """

    def __init__(
        self,
        paths: str | Path | Sequence[str | Path],
        normalization: Normalization,
        indices: Sequence[int] | None = None,
        augment: bool = False,
        flips: bool = False,
        seed: int = 0,
        base_engine: str = "",
        base_input: bool = False,
        progress: bool = False,
    ) -> None:
        self.paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
        self.normalization = normalization
        self.augment, self.flips = augment, flips
        self.seed, self.epoch = seed, 0
        self._files: list[BeamletFile] | None = None
        sizes, shapes = [], set()
        for p in self.paths:
            with BeamletFile(p) as f:
                if f.dose is None:
                    raise DataFileError(f"{p} has no dose: cannot train or evaluate on it")
                sizes.append(len(f))
                shapes.add(f.block_shape)
        if len(shapes) > 1:
            raise DataFileError(f"dataset files have different block shapes: {sorted(shapes)}")
        self.block_shape = shapes.pop() if shapes else None
        self._offsets = np.cumsum([0, *sizes])
        total = int(self._offsets[-1])
        self.indices = np.arange(total) if indices is None else np.asarray(indices, dtype=np.int64)
        if self.indices.size and (self.indices.min() < 0 or self.indices.max() >= total):
            raise DataFileError(f"indices out of range for {total} beamlets")
        self.base_engine = base_engine
        self.base_input = bool(base_input)
        if self.base_input and not base_engine:
            raise DataFileError("base_input needs a base_engine")
        self._base: np.ndarray | None = None
        if base_engine:
            self._base = self._compute_base(progress)

    def _compute_base(self, progress: bool) -> np.ndarray:
        from tqdm.auto import tqdm

        from dota.engines import get_engine

        engine = get_engine(self.base_engine)
        base = np.empty((len(self), *self.block_shape), dtype=np.float32)
        for i in tqdm(range(len(self)), desc=f"{self.base_engine} base dose", unit="beamlet", disable=not progress):
            f, j = self._locate(i)
            base[i] = engine.dose(np.asarray(f.geometry[j], dtype=np.float32)[None], np.array([f.energy[j]]),
                                  f.voxel_mm)[0]
        return base  # Gy per 1e9 primaries: scaled per item, so the normalisation may still be set after this

    @property
    def base_max(self) -> float:
        """Largest base dose (Gy per 1e9 primaries) over the items; 0 without a base engine."""
        return 0.0 if self._base is None else float(self._base.max())

    def __len__(self) -> int:
        return int(self.indices.size)

    def _locate(self, i: int) -> tuple[BeamletFile, int]:
        if self._files is None:
            self._files = [BeamletFile(p) for p in self.paths]
        g = int(self.indices[i])
        k = int(np.searchsorted(self._offsets, g, side="right") - 1)
        return self._files[k], g - int(self._offsets[k])

    def raw(self, i: int) -> tuple[np.ndarray, float, np.ndarray]:
        """Beamlet ``i`` in physical units: (geometry HU, energy MeV, dose Gy per 1e9)."""
        f, j = self._locate(i)
        return (
            np.asarray(f.geometry[j], dtype=np.float32),
            float(f.energy[j]),
            np.asarray(f.dose[j], dtype=np.float32),
        )

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        geometry, energy, dose = self.raw(i)
        norm = self.normalization
        g = norm.scale_geometry(torch.from_numpy(geometry))
        e = norm.scale_energy(torch.tensor(energy, dtype=torch.float32))
        d = norm.scale_dose(torch.from_numpy(dose))
        base = None
        if self._base is not None:
            base = torch.from_numpy(self._base[i]) / float(norm.dose_max)
            d = d - base
        if self.augment or self.flips:
            rng = np.random.default_rng([self.seed, self.epoch, int(self.indices[i])])
        if self.augment:
            k = int(rng.integers(4))
            g, d = torch.rot90(g, k, dims=(1, 2)), torch.rot90(d, k, dims=(1, 2))
            base = None if base is None else torch.rot90(base, k, dims=(1, 2))
            if self.flips and rng.integers(2):
                g, d = torch.flip(g, dims=(2,)), torch.flip(d, dims=(2,))
                base = None if base is None else torch.flip(base, dims=(2,))
        elif self.flips:  # flips of rows and of columns only: they keep each axis's spot width
            flip_rows, flip_cols = rng.integers(2, size=2)
            dims = tuple(dim for dim, f in ((1, flip_rows), (2, flip_cols)) if f)
            if dims:
                g, d = torch.flip(g, dims=dims), torch.flip(d, dims=dims)
                base = None if base is None else torch.flip(base, dims=dims)
        if self.base_input:
            g = torch.stack([g, base], dim=1)  # (L, 2, H, W): the model's network input
        return g.contiguous(), e, d.contiguous()

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of ``epoch``."""
        self.epoch = int(epoch)

    def close(self) -> None:
        for f in self._files or []:
            f.close()
        self._files = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_files"] = None  # h5py handles do not cross process boundaries
        return state

    def base_scaled(self, i: int) -> np.ndarray | None:
        """The scaled base dose of item ``i`` (None without a base engine)."""
        return None if self._base is None else self._base[i] / np.float32(self.normalization.dose_max)


def compute_normalization(
    paths: str | Path | Sequence[str | Path],
    indices: Sequence[int] | None = None,
    hu_range: tuple[float, float] = HU_CLIP,
    energy_range_mev: tuple[float, float] | None = None,
) -> Normalization:
    """Normalisation from training data: dose scale = the largest dose in the training beamlets;
    energy range = ``energy_range_mev`` if given, else the range ``dota generate`` drew the energies
    from (recorded in the files), else the training energies' min and max rounded outwards to whole
    MeV; HU clip range fixed."""
    ds = BeamletDataset(paths, Normalization(), indices)
    dose_max, e_lo, e_hi = 0.0, np.inf, -np.inf
    try:
        for i in range(len(ds)):
            f, j = ds._locate(i)
            dose_max = max(dose_max, float(np.max(f.dose[j])))
            e_lo, e_hi = min(e_lo, float(f.energy[j])), max(e_hi, float(f.energy[j]))
    finally:
        ds.close()
    if len(ds) == 0 or dose_max <= 0:
        raise DataFileError("training data is empty or has no dose: cannot compute normalisation")
    if energy_range_mev is None:
        energy_range_mev = _generated_energy_range(ds.paths)
    if energy_range_mev is None:
        e_lo, e_hi = float(np.floor(e_lo)), float(np.ceil(e_hi))
        if e_hi - e_lo < 1.0:
            e_lo, e_hi = e_lo - 0.5, e_hi + 0.5
        energy_range_mev = (e_lo, e_hi)
    return Normalization(hu_range=hu_range, energy_range_mev=tuple(energy_range_mev), dose_max=dose_max)


def _generated_energy_range(paths: Sequence[Path]) -> tuple[float, float] | None:
    """The union of the energy ranges the files' beamlets were drawn from, if every file records one."""
    ranges = []
    for p in paths:
        with BeamletFile(p) as f:
            gen = f.attrs.get("generation")
        rng = gen.get("energy_range_mev") if isinstance(gen, dict) else None
        if not rng:
            return None
        ranges.append((float(rng[0]), float(rng[1])))
    return (min(r[0] for r in ranges), max(r[1] for r in ranges)) if ranges else None


def split_indices(n: int, val_fraction: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random train/validation split (the paper uses 90/10)."""
    if n < 2:
        raise DataFileError(f"need at least 2 beamlets to split into training and validation, got {n}")
    perm = np.random.default_rng(seed).permutation(n)
    n_val = min(max(1, int(round(n * val_fraction))), n - 1)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])
