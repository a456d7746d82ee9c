"""Plan optimisation: spots and energy layers placed from the target's water-equivalent depth, then
non-negative spot weights for a uniform target dose with an organ-at-risk penalty.

Spot placement (:func:`place_spots`), per beam, in the beam's grid (:mod:`dota.plan.bev`):

- water-equivalent depth (WED, mm) along each grid column from :func:`dota.physics.hu_to_rsp`, at voxel
  centres, from the upstream end of the grid;
- the target's WED interval ``[w_min, w_max]`` in each column, widened laterally by ``lateral_margin_mm``
  (minimum/maximum filters over a disc);
- spots on a square lattice of ``spot_spacing_mm`` in the IEC (X, Y) plane through the isocentre, a
  multiple of 2 mm so that spots sit exactly on block centres (default: 1.2 x the spot sigma in air,
  :func:`dota.physics.spot_sigma_mm`, at the beam's median energy, rounded to 2 mm, at least 4 mm);
- energy layers every ``layer_spacing_mm`` of CSDA range in water (PSTAR,
  :func:`dota.physics.energy_from_csda_range_mev`) from the deepest ``w_max`` plus half a spacing down
  to the shallowest ``w_min``; each spot keeps the layers whose range falls inside its column's interval
  (plus half a spacing either side).

Weights (:func:`optimize_weights`): minimise

    f(w) = mean_target (D w - p)^2 + oar_weight * mean_oar max(D w - oar_limit, 0)^2

over ``w >= 0`` (MU per fraction) with L-BFGS-B (scipy), ``D`` the dose-influence matrix restricted to
the target and organ-at-risk voxels, ``p`` the prescription per fraction; started from uniform weights
that give the prescription on average.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage, optimize, sparse

from dota.constants import BLOCK_SHAPE, ENGINE_ENERGY_RANGE_MEV, VOXEL_MM
from dota.errors import InputError
from dota.plan import bev
from dota.plan.geometry import PatientCT, iec_beam_axes
from dota.plan.model import Beam, EnergyLayer, Plan

log = logging.getLogger("dota.plan")


def _grid_target(ct: PatientCT, grid: bev.BeamGrid, target: np.ndarray) -> np.ndarray:
    """The target mask on the beam grid (nearest CT voxel of each grid voxel centre)."""
    m, b = bev._ct_index_map(ct, grid)
    out = np.zeros(grid.shape, dtype=bool)
    kji_t = np.argwhere(target)
    prc = (kji_t - b) @ np.linalg.inv(m).T  # grid index of target voxel centres
    lo = np.maximum(np.floor(prc.min(axis=0)).astype(int) - 1, 0)
    hi = np.minimum(np.ceil(prc.max(axis=0)).astype(int) + 2, np.asarray(grid.shape))
    pp, rr, cc = np.meshgrid(*(np.arange(a, z) for a, z in zip(lo, hi)), indexing="ij")
    pts = np.stack([pp.ravel(), rr.ravel(), cc.ravel()]).astype(np.float64)
    kji = np.rint(m @ pts + b[:, None]).astype(np.int64)
    ok = np.all((kji >= 0) & (kji < np.asarray(ct.shape)[:, None]), axis=0)
    vals = np.zeros(pts.shape[1], dtype=bool)
    vals[ok] = target[kji[0, ok], kji[1, ok], kji[2, ok]]
    out[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = vals.reshape(pp.shape)
    return out


def place_spots(
    ct: PatientCT,
    target: np.ndarray,
    gantry_deg: float,
    couch_deg: float = 0.0,
    isocenter_mm: tuple[float, float, float] | None = None,
    *,
    spot_spacing_mm: float | None = None,
    layer_spacing_mm: float = 5.0,
    lateral_margin_mm: float | None = None,
    energy_range_mev: tuple[float, float] = ENGINE_ENERGY_RANGE_MEV,
    name: str | None = None,
    block_shape: tuple[int, int, int] = BLOCK_SHAPE,
    voxel_mm: tuple[float, float, float] = VOXEL_MM,
) -> Beam:
    """A beam with spots (1 MU each) covering ``target`` (a mask on ``ct``'s grid); see the module docstring.

    ``isocenter_mm`` defaults to the target's centroid (patient mm); ``lateral_margin_mm`` to the spot spacing.
    """
    from dota.physics import csda_range_mm, energy_from_csda_range_mev, hu_to_rsp, spot_sigma_mm

    target = np.asarray(target, dtype=bool)
    if target.shape != ct.shape:
        raise InputError(f"target mask shape {target.shape} differs from the CT's {ct.shape}")
    if not target.any():
        raise InputError("the target mask is empty")
    if isocenter_mm is None:
        isocenter_mm = tuple(float(v) for v in np.round(ct.voxel_centres(target).mean(axis=0), 1))
    iso = np.asarray(isocenter_mm, dtype=np.float64)
    axes = iec_beam_axes(gantry_deg, couch_deg, ct.patient_position)
    rel = ct.voxel_centres(target) - iso
    x, y = rel @ axes.x_axis, rel @ axes.y_axis
    margin_guess = 12.0 if lateral_margin_mm is None else float(lateral_margin_mm)
    field_corners = np.array([[x.min() - margin_guess - 4, y.min() - margin_guess - 4],
                              [x.max() + margin_guess + 4, y.max() + margin_guess + 4]])
    grid = bev.make_beam_grid(ct, axes, tuple(iso), field_corners, block_shape, voxel_mm)
    hu_grid = bev.resample_ct_to_grid(ct, grid)
    rsp = hu_to_rsp(hu_grid)
    dd = grid.voxel_mm[0]
    wed = np.cumsum(rsp, axis=0) * dd - 0.5 * rsp * dd  # at voxel centres, mm
    t_grid = _grid_target(ct, grid, target)
    if not t_grid.any():
        raise InputError("the target does not reach the beam grid (is it inside the CT?)")
    w_min = np.where(t_grid, wed, np.inf).min(axis=0)
    w_max = np.where(t_grid, wed, -np.inf).max(axis=0)
    r_lo, r_hi = csda_range_mm(energy_range_mev[0]), csda_range_mm(energy_range_mev[1])
    deepest = float(w_max[np.isfinite(w_max)].max())
    if deepest > r_hi:
        raise InputError(f"the target lies {deepest:.0f} mm water-equivalent deep, beyond the {r_hi:.0f} mm range "
                         f"of {energy_range_mev[1]:g} MeV (gantry {gantry_deg:g})")
    if float(w_min[np.isfinite(w_min)].min()) > block_shape[0] * dd:
        raise InputError(f"the target lies deeper than the {block_shape[0] * dd:g} mm block (gantry {gantry_deg:g})")
    if spot_spacing_mm is None:
        mid_energy = float(energy_from_csda_range_mev(max(r_lo, 0.5 * (deepest + float(w_min[np.isfinite(w_min)].min())))))
        spot_spacing_mm = max(4.0, 2.0 * round(1.2 * float(spot_sigma_mm(mid_energy)) / 2.0))
    spacing = float(spot_spacing_mm)
    lattice = voxel_mm[1]
    if spacing <= 0 or abs(spacing / lattice - round(spacing / lattice)) > 1e-6:
        raise InputError(f"spot spacing must be a positive multiple of {lattice:g} mm, got {spacing:g}")
    margin = spacing if lateral_margin_mm is None else float(lateral_margin_mm)
    # lateral widening of the WED interval by the margin (disc footprint in grid columns)
    rad = int(np.ceil(margin / lattice))
    yy, xx = np.mgrid[-rad:rad + 1, -rad:rad + 1]
    disc = (yy**2 + xx**2) * lattice**2 <= margin**2 + 1e-9
    w_min_f = ndimage.minimum_filter(w_min, footprint=disc, mode="constant", cval=np.inf)
    w_max_f = ndimage.maximum_filter(w_max, footprint=disc, mode="constant", cval=-np.inf)
    # spot lattice through the isocentre
    nx_lo, nx_hi = int(np.floor((x.min() - margin) / spacing)), int(np.ceil((x.max() + margin) / spacing))
    ny_lo, ny_hi = int(np.floor((y.min() - margin) / spacing)), int(np.ceil((y.max() + margin) / spacing))
    gx, gy = np.meshgrid(np.arange(nx_lo, nx_hi + 1) * spacing, np.arange(ny_lo, ny_hi + 1) * spacing, indexing="ij")
    cand = np.stack([gx.ravel(), gy.ravel()], axis=1)
    rc = grid.spot_rc(cand)  # the spot axis lies between four columns
    r0 = np.floor(rc[:, 0]).astype(int)
    c0 = np.floor(rc[:, 1]).astype(int)
    lo = np.full(len(cand), np.inf)
    hi = np.full(len(cand), -np.inf)
    for dr in (0, 1):
        for dc in (0, 1):
            r = np.clip(r0 + dr, 0, grid.shape[1] - 1)
            c = np.clip(c0 + dc, 0, grid.shape[2] - 1)
            lo = np.minimum(lo, w_min_f[r, c])
            hi = np.maximum(hi, w_max_f[r, c])
    keep = np.isfinite(lo) & np.isfinite(hi)
    cand, lo, hi = cand[keep], lo[keep], hi[keep]
    if len(cand) == 0:
        raise InputError(f"no spot position covers the target (gantry {gantry_deg:g})")
    step = float(layer_spacing_mm)
    if not step > 0:
        raise InputError(f"layer spacing must be positive (mm), got {layer_spacing_mm}")
    ranges = np.arange(float(hi.max()) + 0.5 * step, float(lo.min()) - 0.5 * step, -step)
    ranges = ranges[(ranges >= r_lo - 1e-6) & (ranges <= r_hi + 1e-6)]
    if ranges.size == 0:
        raise InputError(f"the target lies shallower than the {r_lo:.0f} mm range of {energy_range_mev[0]:g} MeV "
                         f"(gantry {gantry_deg:g}); a range shifter would be needed")
    layers = []
    for r in ranges:
        sel = (r >= lo - 0.5 * step) & (r <= hi + 0.5 * step)
        if not sel.any():
            continue
        energy = float(np.round(energy_from_csda_range_mev(float(r)), 2))
        energy = float(np.clip(energy, *energy_range_mev))
        layers.append(EnergyLayer(energy, cand[sel], np.ones(int(sel.sum()))))
    return Beam(name or f"G{gantry_deg:g}", float(gantry_deg), float(couch_deg), tuple(iso), layers,
                ct.patient_position)


@dataclass
class OptimizationResult:
    """Optimised weights (MU per fraction) with the objective's history and how long it took."""

    mu: np.ndarray
    objective: list[float] = field(default_factory=list)
    iterations: int = 0
    seconds: float = 0.0
    message: str = ""


def optimize_weights(dij: sparse.spmatrix, target_rows: np.ndarray, prescription_gy: float,
                     oar_rows: np.ndarray | None = None, *, oar_weight: float = 0.3, oar_limit_gy: float = 0.0,
                     max_iterations: int = 300) -> OptimizationResult:
    """Non-negative spot weights minimising the objective of the module docstring (L-BFGS-B).

    ``dij`` is (voxels, spots) in Gy per MU per fraction; ``target_rows``/``oar_rows`` are row indices;
    ``prescription_gy`` and ``oar_limit_gy`` are per fraction.
    """
    if not prescription_gy > 0:
        raise InputError(f"the prescription must be positive (Gy), got {prescription_gy}")
    d_t = sparse.csr_matrix(dij)[np.asarray(target_rows)]
    if d_t.shape[0] == 0:
        raise InputError("no target voxel in the dose-influence matrix")
    d_o = sparse.csr_matrix(dij)[np.asarray(oar_rows)] if oar_rows is not None and len(oar_rows) else None
    n_t = d_t.shape[0]
    n_o = d_o.shape[0] if d_o is not None else 1
    p = float(prescription_gy)
    history: list[float] = []

    def fun(w: np.ndarray) -> tuple[float, np.ndarray]:
        rt = d_t @ w - p
        f = float(rt @ rt) / n_t
        g = (2.0 / n_t) * (d_t.T @ rt)
        if d_o is not None and oar_weight > 0:
            ro = np.maximum(d_o @ w - oar_limit_gy, 0.0)
            f += oar_weight * float(ro @ ro) / n_o
            g += (2.0 * oar_weight / n_o) * (d_o.T @ ro)
        return f, np.asarray(g, dtype=np.float64)

    mean_per_mu = float(np.asarray(d_t.sum(axis=0)).mean()) / n_t
    useful = np.asarray(d_t.sum(axis=0)).reshape(-1) > 0
    if not useful.any():
        raise InputError("no spot puts dose in the target")
    w0 = np.where(useful, p / max(mean_per_mu * useful.sum() / useful.size, 1e-30) / d_t.shape[1], 0.0)
    t0 = time.perf_counter()
    res = optimize.minimize(fun, w0, jac=True, method="L-BFGS-B", bounds=[(0.0, None)] * d_t.shape[1],
                            callback=lambda xk: history.append(fun(xk)[0]),
                            options={"maxiter": int(max_iterations), "ftol": 1e-10, "gtol": 1e-10})
    return OptimizationResult(mu=np.maximum(res.x, 0.0), objective=history, iterations=int(res.nit),
                              seconds=time.perf_counter() - t0, message=str(res.message))


def make_plan(
    ct: PatientCT,
    target: np.ndarray,
    angles: list[tuple[float, float]],
    engine: Any,
    *,
    prescription_gy: float = 2.0,
    fractions: int = 1,
    oars: list[np.ndarray] | None = None,
    oar_weight: float = 0.3,
    oar_limit_gy: float = 0.0,
    spot_spacing_mm: float | None = None,
    layer_spacing_mm: float = 5.0,
    lateral_margin_mm: float | None = None,
    isocenter_mm: tuple[float, float, float] | None = None,
    max_iterations: int = 300,
    name: str = "dota_plan",
    progress: bool = False,
    timer: Any = None,
) -> tuple[Plan, dict[str, Any]]:
    """A complete plan: spots for each ``(gantry, couch)`` of ``angles``, the dose-influence matrix on the
    target and organs at risk with ``engine``, and optimised weights. ``prescription_gy`` is the total
    over ``fractions``. Returns the plan and a summary (spot counts, dij memory, optimiser, timings)."""
    from dota.plan.dose import StageTimer, compute_plan_dose

    timer = timer or StageTimer()
    if not angles:
        raise InputError("give at least one beam angle")
    lo, hi = getattr(engine, "energy_range_mev", ENGINE_ENERGY_RANGE_MEV)
    erange = (max(lo, ENGINE_ENERGY_RANGE_MEV[0]), min(hi, ENGINE_ENERGY_RANGE_MEV[1]))
    with timer("place"):
        if isocenter_mm is None:
            isocenter_mm = tuple(float(v) for v in np.round(ct.voxel_centres(target).mean(axis=0), 1))
        beams = [place_spots(ct, target, g, c, isocenter_mm, spot_spacing_mm=spot_spacing_mm,
                             layer_spacing_mm=layer_spacing_mm, lateral_margin_mm=lateral_margin_mm,
                             energy_range_mev=erange, name=f"G{g:g}" + (f"_C{c:g}" if c else ""))
                 for g, c in angles]
    plan = Plan(beams, fractions, name)
    oar_union = np.zeros(ct.shape, dtype=bool)
    for m in oars or []:
        oar_union |= m
    oar_only = oar_union & ~target
    rows_mask = target | oar_only
    result = compute_plan_dose(ct, plan, engine, dij=True, dij_mask=rows_mask, progress=progress, timer=timer)
    dij = result.dij
    with timer("optimize"):
        opt = optimize_weights(dij.matrix, np.flatnonzero(target), prescription_gy / fractions,
                               np.flatnonzero(oar_only), oar_weight=oar_weight, oar_limit_gy=oar_limit_gy / fractions,
                               max_iterations=max_iterations)
    # drop spot-energies the optimiser switched off (below 1e-4 of the largest weight)
    mu = np.where(opt.mu >= 1e-4 * opt.mu.max(), opt.mu, 0.0)
    plan = plan.with_weights(mu)
    plan = plan.subset(plan.spot_weights() > 0)
    dose_t = dij.dose(mu).reshape(-1)[np.flatnonzero(target)]
    summary = {
        "beams": [{"name": b.name, "gantry_deg": b.gantry_deg, "couch_deg": b.couch_deg,
                   "layers": len(b.layers), "spot_energies": b.n_spots,
                   "energy_range_mev": [min(la.energy_mev for la in b.layers), max(la.energy_mev for la in b.layers)]}
                  for b in plan.beams],
        "isocenter_mm": list(isocenter_mm),
        "spot_energies_placed": int(len(mu)),
        "spot_energies": plan.n_spots,
        "dij_shape": list(dij.matrix.shape),
        "dij_nnz": int(dij.matrix.nnz),
        "dij_megabytes": dij.nbytes / 1e6,
        "optimizer": {"iterations": opt.iterations, "seconds": round(opt.seconds, 3), "message": opt.message,
                      "objective_first": opt.objective[0] if opt.objective else None,
                      "objective_last": opt.objective[-1] if opt.objective else None},
        "target_dose_gy": {"mean": float(dose_t.mean()), "min": float(dose_t.min()), "max": float(dose_t.max()),
                           "D95": float(np.percentile(dose_t, 5)), "D5": float(np.percentile(dose_t, 95))},
        "prescription_gy": prescription_gy,
        "fractions": fractions,
        "timings_s": timer.as_dict(),
        "dij": dij,
    }
    return plan, summary
