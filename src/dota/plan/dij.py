"""Dose-influence matrices: the sparse (CT voxels x spot-energies) matrix of a plan.

``D[v, s]`` is the dose in Gy to CT voxel ``v`` (flat C-order index of the (z, y, x) grid) from one MU of
spot-energy ``s`` (columns in plan order: beams, then layers, then spots), for one fraction. The plan
dose is ``fractions * (D @ mu)`` reshaped to the CT grid. Built incrementally, one spot at a time, from
the same trilinear carry as the plan dose (:mod:`dota.plan.bev`), so with ``threshold = 0`` it
reproduces :func:`~dota.plan.dose.compute_plan_dose` to rounding; a ``threshold`` drops, per beamlet,
values below that fraction of its maximum (the share of the dose inside the mask that this leaves out is
reported as ``dropped_fraction``).

Saved as a compressed ``.npz`` (scipy.sparse CSC plus the CT shape, spot energies and weights).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import sparse

from dota.errors import DataFileError, InputError


@dataclass
class DoseInfluence:
    """A dose-influence matrix with what is needed to use it (see the module docstring)."""

    matrix: sparse.csc_matrix  # (n_voxels, n_spot_energies), Gy per MU per fraction
    ct_shape: tuple[int, int, int]
    energies_mev: np.ndarray
    mu: np.ndarray
    fractions: int
    dropped_fraction: float = 0.0

    @property
    def nbytes(self) -> int:
        """Memory of the sparse matrix (values, row indices, column pointers), bytes."""
        m = self.matrix
        return int(m.data.nbytes + m.indices.nbytes + m.indptr.nbytes)

    def dose(self, mu: np.ndarray | None = None) -> np.ndarray:
        """Plan dose (Gy, all fractions) on the CT grid for spot weights ``mu`` (MU per fraction; default the plan's),
        clipped at zero as the plan dose is (the entrance correction's small negative tails)."""
        w = self.mu if mu is None else np.asarray(mu, dtype=np.float64)
        if w.shape != (self.matrix.shape[1],):
            raise InputError(f"{w.shape} weights for a dose-influence matrix of {self.matrix.shape[1]} spot-energies")
        return np.maximum(self.fractions * (self.matrix @ w), 0.0).astype(np.float32).reshape(self.ct_shape)

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        m = self.matrix.tocsc()
        np.savez_compressed(path, data=m.data, indices=m.indices, indptr=m.indptr, shape=np.asarray(m.shape),
                            ct_shape=np.asarray(self.ct_shape), energies_mev=self.energies_mev, mu=self.mu,
                            fractions=np.asarray(self.fractions), dropped_fraction=np.asarray(self.dropped_fraction),
                            unit=np.asarray("Gy per MU per fraction"))
        return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")


def load_dij(path: str | os.PathLike) -> DoseInfluence:
    """Read a dose-influence matrix written by :meth:`DoseInfluence.save`."""
    try:
        with np.load(path, allow_pickle=False) as f:
            m = sparse.csc_matrix((f["data"], f["indices"], f["indptr"]), shape=tuple(int(v) for v in f["shape"]))
            return DoseInfluence(m, tuple(int(v) for v in f["ct_shape"]), f["energies_mev"], f["mu"],
                                 int(f["fractions"]), float(f["dropped_fraction"]))
    except (OSError, KeyError, ValueError) as exc:
        raise DataFileError(f"cannot read dose-influence matrix {path}: {exc}") from None


class DijBuilder:
    """Collects one sparse column per spot-energy as the plan dose runs (bounded by the non-zeros kept)."""

    def __init__(self, ct_shape: tuple[int, int, int], n_columns: int, mask: np.ndarray | None = None,
                 threshold: float = 0.0) -> None:
        if not 0.0 <= float(threshold) < 1.0:
            raise InputError(f"dij threshold must lie in [0, 1), got {threshold}")
        self.ct_shape = tuple(int(v) for v in ct_shape)
        self.n_rows = int(np.prod(self.ct_shape))
        self.n_columns = int(n_columns)
        self.keep = None if mask is None else np.asarray(mask, dtype=bool).reshape(-1)
        self.threshold = float(threshold)
        self._cols: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._kept = 0.0
        self._all = 0.0

    def add(self, column: int, sampler: Any, block_dose_per_1e9: np.ndarray, gy_per_mu_per_unit: float) -> None:
        """Add spot-energy ``column``: its (L, H, W) engine dose (Gy per 1e9 primaries) times
        ``gy_per_mu_per_unit`` (protons per MU / 1e9), carried into the CT by ``sampler``."""
        vals = sampler.sample(block_dose_per_1e9) * gy_per_mu_per_unit
        rows = sampler.flat_index
        good = vals != 0  # the entrance correction's small negative tails stay, so the matrix sums as the plan
        if self.keep is not None:
            good &= self.keep[rows]
        self._all += float(vals[good].sum())
        if self.threshold > 0 and vals.size:
            good &= np.abs(vals) >= self.threshold * float(vals.max())
        rows, vals = rows[good], vals[good]
        self._kept += float(vals.sum())
        self._cols[int(column)] = (rows.astype(np.int32 if self.n_rows < 2**31 else np.int64), vals.astype(np.float32))

    def finish(self, plan: Any) -> DoseInfluence:
        indptr = np.zeros(self.n_columns + 1, dtype=np.int64)
        for c, (rows, _) in self._cols.items():
            indptr[c + 1] = len(rows)
        indptr = np.cumsum(indptr)
        nnz = int(indptr[-1])
        index_type = np.int32 if max(nnz, self.n_rows) < 2**31 else np.int64
        indices = np.empty(nnz, dtype=index_type)
        data = np.empty(nnz, dtype=np.float32)
        for c, (rows, vals) in self._cols.items():
            order = np.argsort(rows, kind="stable")
            indices[indptr[c]:indptr[c + 1]] = rows[order]
            data[indptr[c]:indptr[c + 1]] = vals[order]
        self._cols.clear()
        m = sparse.csc_matrix((data, indices, indptr.astype(index_type)), shape=(self.n_rows, self.n_columns))
        energies = np.concatenate([b.spot_table()[1] for b in plan.beams])
        dropped = 0.0 if self._all <= 0 else max(0.0, 1.0 - self._kept / self._all)
        return DoseInfluence(m, self.ct_shape, energies, plan.spot_weights(), plan.fractions, dropped)
