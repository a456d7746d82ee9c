"""Cumulative dose-volume histograms and their statistics, as CSV tables and a PNG plot.

Every CT voxel counts with its whole volume (no partial-volume weighting); ``V(d)`` is the percentage
of a structure's voxels receiving at least ``d`` Gy; ``Dx`` is the highest dose received by at least
``x`` % of the volume. Tables and plot are written atomically (:func:`dota.fileio.atomic_write`).
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dota.errors import InputError
from dota.fileio import atomic_write
from dota.plan.structures import Structure


@dataclass(frozen=True)
class DVH:
    """A cumulative DVH: dose levels (Gy) and the volume percentage at or above each."""

    name: str
    dose_gy: np.ndarray
    volume_percent: np.ndarray
    stats: dict[str, float]


def d_at_volume(doses: np.ndarray, percent: float) -> float:
    """``D_percent``: the highest dose received by at least ``percent`` % of the voxels."""
    s = np.sort(np.asarray(doses, dtype=np.float64).reshape(-1))[::-1]
    if s.size == 0:
        return float("nan")
    n = max(1, int(np.ceil(percent / 100.0 * s.size)))
    return float(s[min(n, s.size) - 1])


def compute_dvh(dose_gy: np.ndarray, structure: Structure, voxel_volume_mm3: float, bin_gy: float | None = None,
                prescription_gy: float | None = None) -> DVH:
    """The DVH of one structure; ``bin_gy`` defaults to 1/500 of the dose maximum."""
    if tuple(structure.mask.shape) != tuple(dose_gy.shape):
        raise InputError(f"structure {structure.name!r} grid {structure.mask.shape} differs from the dose's "
                         f"{dose_gy.shape}")
    d = np.asarray(dose_gy, dtype=np.float64)[structure.mask]
    if d.size == 0:
        raise InputError(f"structure {structure.name!r} holds no voxel")
    top = float(np.max(dose_gy))
    step = float(bin_gy) if bin_gy else max(top, 1e-12) / 500.0
    levels = np.arange(0.0, top + 2 * step, step)
    counts = np.searchsorted(np.sort(d), levels, side="left")
    volume = 100.0 * (d.size - counts) / d.size
    stats = {
        "voxels": float(d.size),
        "volume_cc": d.size * voxel_volume_mm3 / 1000.0,
        "mean_gy": float(d.mean()),
        "min_gy": float(d.min()),
        "max_gy": float(d.max()),
        "D98_gy": d_at_volume(d, 98),
        "D95_gy": d_at_volume(d, 95),
        "D50_gy": d_at_volume(d, 50),
        "D2_gy": d_at_volume(d, 2),
    }
    if prescription_gy:
        stats["V95_percent"] = float(100.0 * np.mean(d >= 0.95 * prescription_gy))
        stats["V107_percent"] = float(100.0 * np.mean(d >= 1.07 * prescription_gy))
    return DVH(structure.name, levels, volume, stats)


def dvh_files(path: str | os.PathLike) -> tuple[Path, Path, Path]:
    """What ``--dvh path`` writes: the table, ``<stem>_stats.csv`` (:func:`write_dvh_csv`) and
    ``<stem>.png`` (:func:`plot_dvh`)."""
    path = Path(path)
    return path, path.with_name(path.stem + "_stats.csv"), path.with_suffix(".png")


def _write_csv(path: Path, rows: list[list[str]]) -> None:
    buf = io.StringIO(newline="")
    csv.writer(buf).writerows(rows)
    text = buf.getvalue()
    atomic_write(path, lambda t: Path(t).write_text(text, newline=""))


def write_dvh_csv(path: str | os.PathLike, dvhs: list[DVH]) -> tuple[Path, Path]:
    """Two tables: ``path`` (dose_gy then one volume-% column per structure, on a common dose axis) and
    ``<stem>_stats.csv`` (one row of statistics per structure). Returns both paths."""
    if not dvhs:
        raise InputError("no structures for a DVH table")
    path, stats_path, _ = dvh_files(path)
    levels = max((h.dose_gy for h in dvhs), key=len)
    cols = [np.interp(levels, h.dose_gy, h.volume_percent, right=0.0) for h in dvhs]
    _write_csv(path, [["dose_gy", *[f"{h.name}_volume_percent" for h in dvhs]]]
               + [[f"{level:.6g}", *[f"{c[i]:.4f}" for c in cols]] for i, level in enumerate(levels)])
    keys = list(dict.fromkeys(k for h in dvhs for k in h.stats))
    _write_csv(stats_path, [["structure", *keys]]
               + [[h.name, *[f"{h.stats[k]:.6g}" if k in h.stats else "" for k in keys]] for h in dvhs])
    return path, stats_path


def plot_dvh(path: str | os.PathLike, dvhs: list[DVH], reference: list[DVH] | None = None,
             prescription_gy: float | None = None) -> Path:
    """A PNG of the cumulative DVHs (solid), with a reference dose's (dashed) when given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, h in enumerate(dvhs):
        c = colours[i % len(colours)]
        ax.plot(h.dose_gy, h.volume_percent, color=c, label=h.name)
        if reference and i < len(reference):
            ax.plot(reference[i].dose_gy, reference[i].volume_percent, color=c, ls="--", lw=1)
    if prescription_gy:
        ax.axvline(prescription_gy, color="0.5", lw=0.8, ls=":")
    ax.set_xlabel("dose (Gy)")
    ax.set_ylabel("volume (%)")
    ax.set_ylim(0, 102)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="dashed: reference" if reference else None, title_fontsize=8)
    fig.tight_layout()
    path = Path(path)
    try:
        atomic_write(path, lambda t: fig.savefig(t, format="png"))
    finally:
        plt.close(fig)
    return path
