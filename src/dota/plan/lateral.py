"""How much wider an engine's beamlets are than their Monte Carlo twins: the lateral calibration plans apply.

A learned model's beamlets can be systematically wider than the Monte Carlo blocks it learned from (a smooth
network under noisy targets). In a single beamlet that costs little, but a plan sums hundreds of overlapping
spots, and a width excess of 0.2-0.4 mm in sigma flattens the dose in and around a target by a few percent.
:func:`fit_lateral_excess` measures it on Monte Carlo blocks (best: plan blocks of validation patients,
``scripts/plan_blocks.py --split val``): per energy bin, ``delta`` (rows, cols; mm^2) is the least-squares fit
of ``D - delta_r/2 d2D/drow2 - delta_c/2 d2D/dcol2`` (the model's beamlet ``D``, central second differences)
to the Monte Carlo beamlet ``M`` over all voxels of the bin's blocks: a 2 x 2 linear system, unbiased by Monte
Carlo noise (independent of ``D``). The table goes into the checkpoint's record (``extra["plan_lateral_mm2"]``,
``scripts/fit_lateral.py``); :meth:`dota.engines.learned.LearnedEngine.lateral_excess_mm2` reads it and
:mod:`dota.plan.dose` sharpens each spot by it with the entrance-spot correction (there exactly, by Fourier
deconvolution; the fit's first-order model agrees with it to first order in ``delta``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from dota.errors import InputError

#: Energy bin edges (MeV) of the fit by default: the plans' range in steps of 15-30 MeV.
DEFAULT_EDGES_MEV = (70.0, 85.0, 100.0, 115.0, 130.0, 150.0, 180.0, 220.0)


def fit_lateral_excess(engine: Any, data: Any, edges_mev: Sequence[float] = DEFAULT_EDGES_MEV, *,
                       batch: int = 16, min_blocks: int = 10,
                       progress: Callable[[int, int], None] | None = None) -> list[dict[str, Any]]:
    """Per energy bin (bins with fewer than ``min_blocks`` blocks merged into a neighbour), the fitted excess of
    ``engine``'s beamlets (:meth:`~dota.engines.base.DoseEngine.plan_dose`) over ``data``'s Monte Carlo doses
    (:class:`dota.data.hdf5.BeamletData`): dicts with ``energy_mev`` (the bin's mean energy), ``edges_mev``,
    ``blocks``, ``rows_mm2``, ``cols_mm2``, ``isotropic_mm2`` (one ``delta`` for both axes) and
    ``squared_error_removed_percent`` (of the model's squared error against Monte Carlo in the bin)."""
    from dota.plan.dose import _second_difference

    edges = np.asarray(edges_mev, dtype=np.float64)
    if edges.ndim != 1 or len(edges) < 2 or np.any(np.diff(edges) <= 0):
        raise InputError(f"energy bin edges must be two or more increasing energies, got {list(edges_mev)}")
    if len(data) == 0:
        raise InputError("no blocks to fit the lateral calibration on")
    vy, vx = data.voxel_mm[1], data.voxel_mm[2]
    nb = len(edges) - 1
    a, b = np.zeros((nb, 2, 2)), np.zeros((nb, 2))
    rr, esum = np.zeros(nb), np.zeros(nb)
    count = np.zeros(nb, dtype=np.int64)
    energy = np.asarray(data.energy, dtype=np.float64)
    which = np.clip(np.searchsorted(edges, energy, side="right") - 1, 0, nb - 1)
    for i0 in range(0, len(data), batch):
        i1 = min(i0 + batch, len(data))
        model = np.asarray(engine.plan_dose(np.asarray(data.geometry[i0:i1], dtype=np.float32), energy[i0:i1].astype(np.float32),
                                            data.voxel_mm), dtype=np.float64)
        mc = np.asarray(data.dose[i0:i1], dtype=np.float64)
        for k in range(i1 - i0):
            d, r = model[k], model[k] - mc[k]
            lr = 0.5 * _second_difference(d, 1) / vy**2
            lc = 0.5 * _second_difference(d, 2) / vx**2
            j = which[i0 + k]
            a[j] += [[np.vdot(lr, lr), np.vdot(lr, lc)], [np.vdot(lc, lr), np.vdot(lc, lc)]]
            b[j] += [np.vdot(lr, r), np.vdot(lc, r)]
            rr[j] += np.vdot(r, r)
            count[j] += 1
            esum[j] += energy[i0 + k]
        if progress is not None:
            progress(i1, len(data))
    groups = [[j] for j in range(nb) if count[j]]
    j = 0
    while len(groups) > 1 and j < len(groups):
        if sum(int(count[g]) for g in groups[j]) < min_blocks:
            other = j + 1 if j + 1 < len(groups) else j - 1
            groups[other] = sorted(groups[other] + groups[j])
            del groups[j]
            j = 0
            continue
        j += 1
    rows = []
    for g in groups:
        n = int(count[g].sum())
        aa, bb, r2 = a[g].sum(axis=0), b[g].sum(axis=0), float(rr[g].sum())
        if np.linalg.det(aa) <= 1e-12 * max(float(np.trace(aa)) ** 2, 1e-300):
            raise InputError(f"the blocks of {edges[g[0]]:g}-{edges[g[-1] + 1]:g} MeV have no lateral dose gradients "
                             "to fit a width on")
        delta = np.linalg.solve(aa, bb)  # r ~ delta_r lr + delta_c lc, lr = d2D/drow2 / 2
        after = r2 - 2 * float(delta @ bb) + float(delta @ aa @ delta)
        rows.append({"energy_mev": round(float(esum[g].sum() / n), 3),
                     "edges_mev": [float(edges[g[0]]), float(edges[g[-1] + 1])], "blocks": n,
                     "rows_mm2": round(float(delta[0]), 4), "cols_mm2": round(float(delta[1]), 4),
                     "isotropic_mm2": round(float(bb.sum() / aa.sum()), 4),
                     "squared_error_removed_percent": round(100.0 * (1.0 - after / r2), 3) if r2 > 0 else 0.0})
    return rows


def lateral_table(rows: list[dict[str, Any]], **record: Any) -> dict[str, Any]:
    """The record :meth:`~dota.engines.learned.LearnedEngine.lateral_excess_mm2` reads, from
    :func:`fit_lateral_excess`'s rows (plus ``record``: where it was measured)."""
    return {"energy_mev": [r["energy_mev"] for r in rows], "rows_mm2": [r["rows_mm2"] for r in rows],
            "cols_mm2": [r["cols_mm2"] for r in rows], **record}


def check_lateral_table(table: Any, where: str) -> dict[str, np.ndarray]:
    """``table`` (a checkpoint record's ``plan_lateral_mm2``) as arrays, or a one-line :class:`InputError`."""
    try:
        out = {k: np.asarray(table[k], dtype=np.float64) for k in ("energy_mev", "rows_mm2", "cols_mm2")}
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{where}: its lateral calibration (plan_lateral_mm2) is unreadable: {exc!r}") from None
    n = len(out["energy_mev"]) if out["energy_mev"].ndim == 1 else 0
    if (n == 0 or any(v.shape != (n,) for v in out.values()) or not all(np.isfinite(v).all() for v in out.values())
            or np.any(np.diff(out["energy_mev"]) <= 0)):
        raise InputError(f"{where}: its lateral calibration (plan_lateral_mm2) needs increasing energies and finite "
                         "rows/cols values of the same length")
    return out
