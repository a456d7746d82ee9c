"""The analytic engine as it was before the row-compacted profiles (commit 7aa5fd9), kept as a reference:
the engine must give these numbers bit for bit (tests/engines/test_analytic.py) once erfc is cut where the
engine cuts it (``tail_from``: erfc arguments from there on taken as infinity, engine version 1.1), and
without the cut (``tail_from=None``, engine 1.0) within 1e-12 of the maximum.

Self-contained on purpose: the old voxel averaging of the depth dose (``WaterDepthDose.mean_between``
and its ``_interp``), the old multiple-scattering width (``mcs_sigma_mm``) and the old erfc tables and
gathers of the lateral profiles, so that optimisations of the physics modules are checked too. Only the
inputs that did not change are imported: the HU table, the tabulated Bragg curve, the PSTAR ranges, the
spot of the engine.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from dota.engines.analytic import (
    _GY_PER_1E9,
    SUBPENCIL_WEIGHT_CUTOFF,
    AnalyticEngine,
    _lattice_weights,
)
from dota.physics.bragg import WaterDepthDose, water_depth_dose
from dota.physics.hu import hu_to_rsp
from dota.physics.lateral import (
    _MIN_RESIDUAL_RANGE_MM,
    HIGHLAND_ES_MEV,
    WATER_RADIATION_LENGTH_MM,
)
from dota.physics.ranges import csda_range_mm, energy_from_csda_range_mev, pv_mev
from dota.validation import check_beamlets


def interp(table: WaterDepthDose, x: np.ndarray, values: np.ndarray, right: float) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    step = table.depth_mm[1] - table.depth_mm[0]
    n = len(table.depth_mm)
    t = np.clip(x, 0.0, table.depth_mm[-1]) / step
    i = np.minimum(t.astype(np.int64), n - 2)
    frac = t - i
    out = values[i] + frac * (values[i + 1] - values[i])
    return np.where(x > table.depth_mm[-1], right, out)


def mean_between(table: WaterDepthDose, lo_mm: np.ndarray, hi_mm: np.ndarray) -> np.ndarray:
    lo = np.asarray(lo_mm, dtype=np.float64)
    hi = np.asarray(hi_mm, dtype=np.float64)
    end = float(table.cumulative_mev_cm2_g_mm[-1])
    f_lo = interp(table, lo, table.cumulative_mev_cm2_g_mm, end)
    f_hi = interp(table, hi, table.cumulative_mev_cm2_g_mm, end)
    width = hi - lo
    thin = width < 1e-6
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (f_hi - f_lo) / np.where(thin, 1.0, width)
    return np.where(thin, interp(table, lo, table.idd_mev_cm2_g, 0.0), mean)


def mcs_sigma_mm(rsp: np.ndarray, energy_mev: float, depth_step_mm: float) -> np.ndarray:
    rsp = np.asarray(rsp, dtype=np.float64)
    dz = float(depth_step_mm)
    n = rsp.shape[0]
    step_wed = rsp * dz
    wed_centre = np.cumsum(step_wed, axis=0) - 0.5 * step_wed
    residual = np.maximum(csda_range_mm(float(energy_mev)) - wed_centre, _MIN_RESIDUAL_RANGE_MM)
    pv = pv_mev(energy_from_csda_range_mev(residual))
    dtheta2 = (HIGHLAND_ES_MEV / pv) ** 2 / WATER_RADIATION_LENGTH_MM * step_wed

    z = ((np.arange(n) + 0.5) * dz).reshape((n,) + (1,) * (rsp.ndim - 1))

    def upstream(values: np.ndarray) -> np.ndarray:
        c = np.cumsum(values, axis=0)
        return c - values

    s0 = upstream(dtheta2)
    s1 = upstream(z * dtheta2)
    s2 = upstream(z * z * dtheta2)
    var = z * z * s0 - 2.0 * z * s1 + s2 + dz * dz / 12.0 * s0 + dz * dz / 24.0 * dtheta2
    var = np.maximum(var, 0.0)
    log_term = 1.0 + np.log10(np.maximum(wed_centre, 1e-3) / WATER_RADIATION_LENGTH_MM) / 9.0
    return np.sqrt(var) * np.clip(log_term, 0.5, None)


def _cut(x: torch.Tensor, tail_from: float | None) -> torch.Tensor:
    return x if tail_from is None else x.masked_fill_(x >= tail_from, math.inf)


def lateral_profiles(centre_mm: np.ndarray, sigma_mm: np.ndarray, count: int, spacing_mm: float,
                     tail_from: float | None = None) -> torch.Tensor:
    edges = torch.from_numpy((np.arange(count + 1) - count / 2.0) * spacing_mm).float()
    scale = torch.from_numpy(1.0 / (math.sqrt(2.0) * sigma_mm)).float()[:, :, None]
    offset = edges[None, :] - torch.from_numpy(centre_mm).float()[:, None]
    u = torch.erfc(_cut((offset[None] * scale).abs_(), tail_from))
    lo, hi = u[..., :-1], u[..., 1:]
    right = (offset[:, :-1] >= 0).float()
    left = (offset[:, 1:] <= 0).float()
    across = 1.0 - right - left
    out = (lo - hi).mul_(right - left).add_(across * (2.0 - lo - hi))
    return out.mul_(0.5 / spacing_mm)


def lattice_profiles(idx_r, idx_c, sigma_mm, rows, cols, spacing_mm, tail_from=None):
    count = max(rows, cols)
    scale = torch.from_numpy(1.0 / (math.sqrt(2.0) * sigma_mm)).float()[:, :, None]
    half = torch.from_numpy((np.arange(count) + 0.5) * spacing_mm).float()
    u = torch.erfc(_cut(half[None, None, :] * scale, tail_from))
    v = torch.empty(u.shape[:2] + (count + 1,), dtype=u.dtype)
    v[..., 0] = (2.0 - u[..., 0]) - u[..., 0]
    v[..., 1:count] = u[..., :-1] - u[..., 1:]
    v[..., count] = 0.0
    v.mul_(0.5 / spacing_mm)
    depth = v.shape[0]

    def profile(idx, n):
        q = torch.from_numpy(np.abs(np.arange(n)[None, :] - idx[:, None]))
        return torch.gather(v, 2, q[None].expand(depth, -1, -1))

    return profile(idx_r, rows), profile(idx_c, cols)


def beamlet(engine: AnalyticEngine, hu, energy_mev, voxel, out, tail_from=None) -> None:
    dz, dy, dx = voxel
    _, rows, cols = hu.shape
    table = water_depth_dose(energy_mev)
    spots = engine.spot_components(energy_mev)
    _, core_y, core_x = spots[0]
    sub_y, sub_x = min(dy, core_y / math.sqrt(2.0)), min(dx, core_x / math.sqrt(2.0))
    weights = sum(
        w * np.outer(_lattice_weights(rows, dy, math.sqrt(sy**2 - sub_y**2)),
                     _lattice_weights(cols, dx, math.sqrt(sx**2 - sub_x**2)))
        for w, sy, sx in spots
    )
    idx_r, idx_c = np.nonzero(weights >= SUBPENCIL_WEIGHT_CUTOFF * weights.max())
    weight = weights[idx_r, idx_c]
    centre_y = (idx_r - (rows - 1) / 2.0) * dy
    centre_x = (idx_c - (cols - 1) / 2.0) * dx
    rsp = hu_to_rsp(hu[:, idx_r, idx_c])
    wed_exit = np.cumsum(rsp * dz, axis=0)
    wed_entry = wed_exit - rsp * dz
    depth_count = int(np.count_nonzero(wed_entry < table.extent_mm, axis=0).max())
    if depth_count == 0:
        return
    wed_entry, wed_exit = wed_entry[:depth_count], wed_exit[:depth_count]
    idd = weight * mean_between(table, wed_entry, wed_exit)
    mcs = mcs_sigma_mm(rsp[:depth_count], energy_mev, dz)
    if dy == dx and sub_y == sub_x:
        profile_y, profile_x = lattice_profiles(idx_r, idx_c, np.sqrt(sub_y**2 + mcs**2), rows, cols, dy,
                                                tail_from)
    else:
        profile_y = lateral_profiles(centre_y, np.sqrt(sub_y**2 + mcs**2), rows, dy, tail_from)
        profile_x = lateral_profiles(centre_x, np.sqrt(sub_x**2 + mcs**2), cols, dx, tail_from)
    weighted = profile_y * torch.from_numpy(idd * _GY_PER_1E9).float()[:, :, None]
    out[:depth_count] = torch.bmm(weighted.transpose(1, 2), profile_x).numpy()


def reference_dose(engine: AnalyticEngine, geometry_hu, energies_mev, voxel_mm=(2.0, 2.0, 2.0), *,
                   cut: bool = True) -> np.ndarray:
    """The old ``engine.dose``: Gy per 1e9 primaries, float32 (N, L, H, W); with ``cut`` (default) erfc is cut
    where engine 1.1 cuts it (``dota.engines.analytic._erfc_tail_from``), else as engine 1.0 computed it."""
    from dota.engines.analytic import _erfc_tail_from

    tail_from = _erfc_tail_from() if cut else None
    geometry, energies = check_beamlets(geometry_hu, energies_mev)
    voxel = tuple(float(v) for v in voxel_mm)
    out = np.zeros(geometry.shape, dtype=np.float32)
    for i in range(geometry.shape[0]):
        beamlet(engine, geometry[i], float(energies[i]), voxel, out[i], tail_from)
    return out
