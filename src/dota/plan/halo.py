"""The dose a spot puts outside its 24 x 24 block (its lateral halo), added back when a plan sums its spots.

DoTA's blocks are 48 mm wide: a Monte Carlo spot deposits 3.3-5.2 % of its energy outside them (MCsquare,
water, this project's beam model: the wide second Gaussian of the beam model at low energies, large-angle
scattering and nuclear secondaries at high energies). A model trained on in-block Monte Carlo predicts
only the in-block part, so a plan summed from its beamlets lacks that dose: measured 1.5-2.4 % of the
maximum in the entrance plateau of two patient plans (session notes in the README). This module adds it.

The halo model (fitted to MCsquare in water by ``scripts/fit_halo.py``, stored in
``dota/resources/halo/mcsquare_halo.json``): at water-equivalent depth ``w`` of a spot-energy of energy
``E`` whose in-block dose integrates to ``I(w)`` over its slice, the dose outside the block is

    I(w) * sum_j a_j(E, t) * ring_j(x, y),    t = w / R_CSDA(E),

with ``ring_j`` the out-of-block part of an isotropic Gaussian of fixed width ``HALO_SIGMAS_MM[j]``
(6-90 mm; voxel-averaged, normalised to sum to one over the window) and ``a_j`` the fraction of the
in-block dose it carries (non-negative least squares). The weights are tabulated on 9 energies x 22
depth fractions and interpolated linearly (clamped at the ends); because the widths are fixed,
interpolating the weights interpolates the kernels. Heterogeneity enters through ``I`` (the engine's
own in-block dose) and ``w`` (the block's central-axis water-equivalent depth). Dose carried further
than the window (``HALO_HALF_WIDTH_MM`` from the spot axis) is not added; the dose-influence matrix
holds the in-block dose only.

Which engines need it: those whose beamlets are in-block Monte Carlo (``DoseEngine.mcsquare_blocks``: the
DoTA engine, trained on MCsquare blocks, and the MCsquare beamlet engine); the analytic engine counts the
energy of secondaries locally and does not.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
from scipy.special import ndtr

from dota.errors import DataFileError

#: Lateral half-width of the window the halo is added in, measured from the spot axis (mm).
HALO_HALF_WIDTH_MM: float = 80.0
#: Widths of the Gaussians the halo is made of (mm): a fixed basis, so that interpolating the weights
#: between energies and depths interpolates the kernels.
HALO_SIGMAS_MM: tuple[float, ...] = (6.0, 9.0, 13.0, 19.0, 28.0, 40.0, 60.0, 90.0)
_RESOURCE = "mcsquare_halo.json"


@dataclass(frozen=True)
class HaloTable:
    """Fitted halo: ``weights`` (E, T, J), the fraction of a slice's in-block dose that lies outside the block
    in basis Gaussian ``j`` (width ``sigmas_mm[j]``, its out-of-block part within the ``grid_hw`` window),
    on ``energies_mev`` (E,) x ``depth_fractions`` (T,)."""

    energies_mev: np.ndarray
    depth_fractions: np.ndarray
    weights: np.ndarray
    sigmas_mm: np.ndarray
    block_hw: tuple[int, int]
    grid_hw: tuple[int, int]
    meta: dict

    def at(self, energy_mev: float, depth_fraction: np.ndarray) -> np.ndarray:
        """Weights (D, J) at one energy and depth fractions (D,), interpolated linearly (clamped at the ends)."""
        e = np.clip(float(energy_mev), self.energies_mev[0], self.energies_mev[-1])
        k = int(np.clip(np.searchsorted(self.energies_mev, e) - 1, 0, len(self.energies_mev) - 2))
        f = (e - self.energies_mev[k]) / (self.energies_mev[k + 1] - self.energies_mev[k])
        t = np.clip(np.asarray(depth_fraction, dtype=np.float64), self.depth_fractions[0], self.depth_fractions[-1])
        rows = (1 - f) * self.weights[k] + f * self.weights[k + 1]  # (T, J)
        return np.stack([np.interp(t, self.depth_fractions, rows[:, j]) for j in range(rows.shape[1])], axis=1)

    def to_json(self) -> str:
        return json.dumps({"energies_mev": self.energies_mev.tolist(), "depth_fractions": self.depth_fractions.tolist(),
                           "sigmas_mm": self.sigmas_mm.tolist(), "block_hw": list(self.block_hw),
                           "grid_hw": list(self.grid_hw), "weights": np.round(self.weights, 7).tolist(),
                           "meta": self.meta}, indent=1) + "\n"


def read_halo_table(path: str | Path | None = None) -> HaloTable:
    """The halo table at ``path`` (default: the shipped MCsquare fit)."""
    try:
        if path is None:
            text = resources.files("dota").joinpath("resources", "halo", _RESOURCE).read_text()
            where = f"dota/resources/halo/{_RESOURCE}"
        else:
            text, where = Path(path).read_text(), str(path)
        data = json.loads(text)
        table = HaloTable(np.asarray(data["energies_mev"], float), np.asarray(data["depth_fractions"], float),
                          np.asarray(data["weights"], float), np.asarray(data["sigmas_mm"], float),
                          tuple(int(v) for v in data["block_hw"]), tuple(int(v) for v in data["grid_hw"]),
                          dict(data.get("meta", {})))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataFileError(f"cannot read the halo table {path or _RESOURCE}: {exc}") from None
    e, t = len(table.energies_mev), len(table.depth_fractions)
    if table.weights.shape != (e, t, len(table.sigmas_mm)) or e < 2 or t < 2 or not np.isfinite(table.weights).all():
        raise DataFileError(f"{where}: halo table arrays do not match its {e} energies x {t} depth fractions")
    (bh, bw), (gh, gw) = table.block_hw, table.grid_hw
    problems = [msg for bad, msg in (
        (np.any(np.diff(table.energies_mev) <= 0), "energies not ascending"),
        (np.any(np.diff(table.depth_fractions) <= 0), "depth fractions not ascending"),
        (np.any(table.sigmas_mm <= 0), "a Gaussian width <= 0"),
        (np.any(table.weights < 0), "a negative weight"),
        (gh != gw or bh != bw, "a window or block that is not square"),
        (gh <= bh or (gh - bh) % 2, "a window not wider than the block by an even number of voxels"),
    ) if bad]
    if problems:
        raise DataFileError(f"{where}: invalid halo table ({', '.join(problems)})")
    return table


@lru_cache(maxsize=1)
def default_halo_table() -> HaloTable:
    return read_halo_table()


def gaussian_rows(offsets_mm: np.ndarray, width_mm: float, sigma_mm: np.ndarray) -> np.ndarray:
    """Mean density (1/mm) of unit Gaussians of widths ``sigma_mm`` (...,) over voxels centred at
    ``offsets_mm`` (n,) from the axis, ``width_mm`` wide -> (..., n)."""
    s = np.asarray(sigma_mm, dtype=np.float64)[..., None]
    lo = (offsets_mm - 0.5 * width_mm) / s
    hi = (offsets_mm + 0.5 * width_mm) / s
    return (ndtr(hi) - ndtr(lo)) / width_mm


def ring_norms(table: HaloTable, voxel_mm: tuple[float, float, float]) -> np.ndarray:
    """Sum over the table's out-of-block window of each basis Gaussian (J,), for a spot on the block centre."""
    height, width = table.block_hw
    big_h, big_w = table.grid_hw
    ry = (np.arange(big_h) - (big_h - 1) / 2.0) * voxel_mm[1]
    cx = (np.arange(big_w) - (big_w - 1) / 2.0) * voxel_mm[2]
    r0, c0 = (big_h - height) // 2, (big_w - width) // 2
    out = []
    for s in table.sigmas_mm:
        g = gaussian_rows(ry, voxel_mm[1], s)[:, None] * gaussian_rows(cx, voxel_mm[2], s)[None, :]
        out.append(g.sum() - g[r0:r0 + height, c0:c0 + width].sum())
    return np.asarray(out) * voxel_mm[1] * voxel_mm[2]


def halo_patch(in_block: np.ndarray, wed_mm: np.ndarray, energies_mev: np.ndarray, table: HaloTable,
               voxel_mm: tuple[float, float, float], residual: tuple[float, float] = (0.0, 0.0),
               norms: np.ndarray | None = None, ranges_mm: np.ndarray | None = None) -> np.ndarray:
    """Halo dose (D, H', W') of one spot's energy layers on the table's window (``grid_hw``, centred on the
    spot's block; the block itself is zero), for the block's first ``D`` slices: down to the last one with
    in-block dose (the halo is zero below it, and is not written out).

    ``in_block`` (n, L): each spot-energy's in-block dose summed over each slice (already scaled to the
    plan's protons); ``wed_mm`` (L,): the block's central-axis water-equivalent depth at each slice (at
    the slice's centre); ``energies_mev`` (n,). The spot axis lies ``residual`` voxels off the block
    centre (rows, cols). ``norms``: :func:`ring_norms`; ``ranges_mm`` (n,): the energies' CSDA ranges (both
    computed when None)."""
    from dota.physics import csda_range_mm

    n, length = in_block.shape
    height, width = table.block_hw
    big_h, big_w = table.grid_hw
    dz, dy, dx = voxel_mm
    norms = ring_norms(table, voxel_mm) if norms is None else norms
    ry = (np.arange(big_h) - (big_h - 1) / 2.0 - residual[0]) * dy
    cx = (np.arange(big_w) - (big_w - 1) / 2.0 - residual[1]) * dx
    live = np.nonzero(in_block.any(axis=0))[0]
    if live.size == 0:
        return np.zeros((0, big_h, big_w), dtype=np.float64)
    depth = int(live.max()) + 1
    gy = gaussian_rows(ry, dy, table.sigmas_mm) * dy  # (J, R): voxel fractions
    gx = gaussian_rows(cx, dx, table.sigmas_mm) * dx
    amp = np.zeros((depth, len(table.sigmas_mm)))  # (D, J): the energies of one spot share the basis
    for i in range(n):
        e = float(energies_mev[i])
        r = float(csda_range_mm(e)) if ranges_mm is None else float(ranges_mm[i])
        amp += in_block[i, :depth, None] * table.at(e, wed_mm[:depth] / r)  # out-of-block fractions
    amp /= norms
    out = np.matmul(amp[:, None, :] * gy.T[None], gx)  # (D, R, J) @ (J, C): sum_j amp[d, j] gy[j, r] gx[j, c]
    r0, c0 = (big_h - height) // 2, (big_w - width) // 2
    out[:, r0:r0 + height, c0:c0 + width] = 0.0
    return out


def fit_halo(dose: np.ndarray, energy_mev: float, voxel_mm: tuple[float, float, float], block_hw: tuple[int, int],
             depth_fractions: np.ndarray, sigmas_mm: tuple[float, ...] = HALO_SIGMAS_MM) -> tuple[np.ndarray, dict]:
    """Fit the halo of one wide water beamlet ``dose`` (L, H', W'), centred laterally: weights (T, J) of the
    Gaussians of widths ``sigmas_mm`` at each depth fraction of ``depth_fractions``.

    Per depth fraction ``t`` the slices within half a bin (with at least 2 % of the largest in-block
    integral) are normalised by their in-block integral and averaged; the weights are the non-negative
    least-squares fit over every out-of-block voxel, with the out-of-block sum as one heavily weighted
    extra equation (so the fit keeps the halo's integral). A bin without slices gets the weights of the
    nearest bin that has them. Returns the weights and diagnostics (relative rms residual per bin, the
    measured out-of-block fraction of the whole beamlet)."""
    from scipy.optimize import nnls

    from dota.physics import csda_range_mm

    length, big_h, big_w = dose.shape
    height, width = block_hw
    dz, dy, dx = voxel_mm
    r0, c0 = (big_h - height) // 2, (big_w - width) // 2
    inside = np.zeros((big_h, big_w), dtype=bool)
    inside[r0:r0 + height, c0:c0 + width] = True
    ry = (np.arange(big_h) - (big_h - 1) / 2.0) * dy
    cx = (np.arange(big_w) - (big_w - 1) / 2.0) * dx
    def ring(s: float) -> np.ndarray:
        g = gaussian_rows(ry, dy, s)[:, None] * gaussian_rows(cx, dx, s)[None, :]
        g[inside] = 0.0
        return g / g.sum()

    basis = np.stack([ring(s)[~inside] for s in sigmas_mm], axis=1)  # (voxels, J), each column sums to 1

    i_in = dose[:, inside].sum(axis=1).astype(np.float64)
    t_of = (np.arange(length) + 0.5) * dz / float(csda_range_mm(energy_mev))
    half_bin = 0.5 * float(np.min(np.diff(depth_fractions)))
    weights = np.full((len(depth_fractions), len(sigmas_mm)), np.nan)
    errors = np.full(len(depth_fractions), np.nan)
    scale = 30.0 * math.sqrt(basis.shape[0])
    for k, t in enumerate(depth_fractions):
        sel = np.nonzero((np.abs(t_of - t) <= half_bin) & (i_in > 0.02 * i_in.max()))[0]
        if sel.size == 0:
            continue
        data = (dose[sel][:, ~inside] / i_in[sel, None]).mean(axis=0)
        coef, _ = nnls(np.vstack([basis, scale * basis.sum(axis=0)]), np.concatenate([data, [scale * data.sum()]]))
        weights[k] = coef
        errors[k] = math.sqrt(float(np.mean((basis @ coef - data) ** 2))) / max(float(data.max()), 1e-30)
    have = np.nonzero(~np.isnan(weights[:, 0]))[0]
    if have.size == 0:
        raise ValueError(f"no slice of the {energy_mev:g} MeV beamlet has dose to fit")
    for k in np.nonzero(np.isnan(weights[:, 0]))[0]:
        weights[k] = weights[have[np.argmin(np.abs(have - k))]]
    return weights, {"rms_error_of_max": errors.tolist(),
                     "out_fraction": float(dose[:, ~inside].sum() / dose.sum())}
