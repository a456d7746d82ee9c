"""Gamma index of 3D dose distributions: fast, global, searched continuously between voxels.

The gamma of a reference voxel at ``x`` is the smallest value of

    sqrt(|y - x|^2 / dta^2 + (D_eval(y) - D_ref(x))^2 / dD^2)

over all positions ``y`` inside the evaluated grid, ``D_eval`` interpolated trilinearly between voxel
centres, ``dD = dose_percent / 100 * global_norm`` (global gamma). Values above ``max_gamma`` (the
search radius is ``dta * max_gamma``) are reported as ``max_gamma``, as pymedphys does.

How it is computed
------------------
Instead of sampling offsets on a fine grid (pymedphys: points about dta / 10 apart on spheres of
growing radius, which misses the minimum by up to several tenths of gamma where a 1 % criterion meets
a steep fall-off), the minimum is sought in each cell between voxel centres:

1. every voxel-centre offset within the search radius gives an upper bound (gathers over the voxels
   that can still improve, nearest offsets first);
2. each cell near a voxel gets lower bounds: its distance with the gap between the reference dose and
   the range of its 8 corners, and the exact minimum over the cell of a linear fit of its dose widened
   by the largest bilinear and trilinear terms; cells that cannot lower the gamma by more than
   ``tolerance`` (or turn a fail into a pass) are dropped;
3. in the others the gamma is minimised: exact box-constrained minimum of the linear fit, then
   Gauss-Newton steps on the trilinear dose, each again an exact box-constrained minimum;
4. a cell is split once into 8 and searched again where that search may have stopped short: its dose
   is not monotone along some axis (a noise spike can hide a second minimum) or the last step still
   gained more than ``tolerance / 4``.

Every gamma returned is attained at a real point, so it is never below the exact value. Against a
branch and bound run to 1e-6 on 12 test cases (shifts, scalings, noise; tolerance 0.01), the excess
was at most 0.02 on smooth doses and 0.036 with noise, 99.9 % of voxels within 0.015, and no voxel
changed between pass and fail. pymedphys (interp_fraction 10) agreed in pass rate on smooth, scaled,
laterally shifted and noisy doses; on a steep distal fall-off shifted by 3.7 mm it passed 0.6
percentage points fewer voxels, and gave the same pass rate as this search at interp_fraction 40.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from dota.constants import (
    PAPER_GAMMA_DOSE_PERCENT,
    PAPER_GAMMA_DTA_MM,
    PAPER_GAMMA_EVAL_ZERO_FRACTION,
    PAPER_GAMMA_REF_ZERO_FRACTION,
    VOXEL_MM,
)
from dota.errors import InputError

__all__ = [
    "GAMMA_PRESETS",
    "GammaCriteria",
    "GammaResult",
    "apply_zero_thresholds",
    "gamma_index",
    "gamma_pass_rates",
    "paper_gamma",
    "pass_rate_percent",
]

#: boxes processed together: small enough for the temporaries to stay in cache
_CHUNK_PAIRS = 4096
#: voxels whose cells are listed at once (bounds memory on large grids)
_CHUNK_VOXELS = 1 << 17
_NEWTON_STEPS = 2
#: how many times a non-monotone cell may be split into 8
_MAX_SPLITS = 1


@dataclass(frozen=True)
class GammaCriteria:
    """A global gamma criterion with the paper's evaluation protocol.

    ``ref_zero_fraction`` / ``eval_zero_fraction``: reference / evaluated dose below this fraction of
    the reference maximum is set to zero before the comparison (paper: 0.1 % and 0.5 %).
    ``lower_cutoff_percent``: reference voxels below this percentage of the normalisation dose are not
    evaluated (gamma NaN); the paper uses none.
    """

    dose_percent: float = PAPER_GAMMA_DOSE_PERCENT
    dta_mm: float = PAPER_GAMMA_DTA_MM
    lower_cutoff_percent: float = 0.0
    ref_zero_fraction: float = PAPER_GAMMA_REF_ZERO_FRACTION
    eval_zero_fraction: float = PAPER_GAMMA_EVAL_ZERO_FRACTION

    def __post_init__(self) -> None:
        if not (self.dose_percent > 0 and math.isfinite(self.dose_percent)):
            raise InputError(f"gamma dose criterion must be a positive percentage, got {self.dose_percent}")
        if not (self.dta_mm > 0 and math.isfinite(self.dta_mm)):
            raise InputError(f"gamma distance criterion must be positive (mm), got {self.dta_mm}")
        if not 0 <= self.lower_cutoff_percent < 100:
            raise InputError(f"lower dose cutoff must be in [0, 100) %, got {self.lower_cutoff_percent}")
        for name in ("ref_zero_fraction", "eval_zero_fraction"):
            if not 0 <= getattr(self, name) < 1:
                raise InputError(f"{name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def name(self) -> str:
        """The criterion as people write it, e.g. ``"1%/3mm"``."""
        return f"{self.dose_percent:g}%/{self.dta_mm:g}mm"

    @classmethod
    def from_string(cls, text: str) -> GammaCriteria:
        """Parse ``"2%/2mm"`` (spaces allowed; ``"paper"`` means ``"1%/3mm"``) with the paper protocol."""
        if not isinstance(text, str):
            raise InputError(f"gamma criterion must be a string like '2%/2mm', got {type(text).__name__}")
        if text.strip().lower() == "paper":
            return cls()
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*%\s*/\s*([0-9]*\.?[0-9]+)\s*mm\s*", text)
        if m is None:
            raise InputError(f"cannot read gamma criterion {text!r}: write it like '1%/3mm'")
        return cls(dose_percent=float(m.group(1)), dta_mm=float(m.group(2)))


#: Named criteria: the paper's beamlet criterion (also under "paper"), its full-plan criterion, and 3 %/3 mm.
GAMMA_PRESETS: dict[str, GammaCriteria] = {
    "paper": GammaCriteria(),
    "1%/3mm": GammaCriteria(),
    "2%/2mm": GammaCriteria(dose_percent=2.0, dta_mm=2.0),
    "3%/3mm": GammaCriteria(dose_percent=3.0, dta_mm=3.0),
}


@dataclass(frozen=True)
class GammaResult:
    """Gamma of one beamlet under the paper's pass-rate definition.

    ``n_evaluated`` counts voxels with gamma > 0, ``n_failed`` those with gamma > 1;
    ``pass_rate_percent = 100 * (1 - n_failed / n_evaluated)`` (100 when nothing is evaluated).
    """

    gamma: np.ndarray = field(repr=False)
    pass_rate_percent: float
    n_evaluated: int
    n_failed: int


def _as_criteria(criteria: str | GammaCriteria) -> GammaCriteria:
    if isinstance(criteria, GammaCriteria):
        return criteria
    if isinstance(criteria, str) and criteria.strip().lower() in GAMMA_PRESETS:
        return GAMMA_PRESETS[criteria.strip().lower()]
    return GammaCriteria.from_string(criteria)


def _check_voxel_mm(voxel_mm: float | Sequence[float]) -> np.ndarray:
    v = np.asarray(voxel_mm, dtype=np.float64).reshape(-1)
    if v.size == 1:
        v = np.repeat(v, 3)
    if v.size != 3 or not np.all(np.isfinite(v)) or np.any(v <= 0):
        raise InputError(f"voxel_mm must be 3 positive sizes (depth, row, col) in mm, got {voxel_mm!r}")
    return v


def _check_pair(reference: np.ndarray, evaluated: np.ndarray, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    arrays = []
    for label, a in (("reference", reference), ("evaluated", evaluated)):
        a = np.asarray(a)
        if a.dtype == object or not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
            raise InputError(f"{label} dose must be a numeric array, got dtype {a.dtype}")
        if a.ndim != ndim:
            want = "(L, H, W)" if ndim == 3 else "(N, L, H, W)"
            raise InputError(f"{label} dose must have shape {want}, got {a.shape}")
        if not np.isfinite(a).all():
            raise InputError(f"{label} dose contains NaN or inf")
        arrays.append(a.astype(np.float64, copy=False))
    if arrays[0].shape != arrays[1].shape:
        raise InputError(f"reference dose {arrays[0].shape} and evaluated dose {arrays[1].shape} differ in shape")
    if min(arrays[0].shape[-3:]) < 2:
        raise InputError(f"dose grids need at least 2 voxels along each axis, got {arrays[0].shape[-3:]}")
    return arrays[0], arrays[1]


def apply_zero_thresholds(
    reference: np.ndarray,
    evaluated: np.ndarray,
    ref_zero_fraction: float = PAPER_GAMMA_REF_ZERO_FRACTION,
    eval_zero_fraction: float = PAPER_GAMMA_EVAL_ZERO_FRACTION,
) -> tuple[np.ndarray, np.ndarray]:
    """Copies of both doses with values below a fraction of the reference maximum set to zero (paper)."""
    ref = np.array(reference, dtype=np.float64)
    ev = np.array(evaluated, dtype=np.float64)
    peak = float(ref.max()) if ref.size else 0.0
    ref[ref < ref_zero_fraction * peak] = 0.0
    ev[ev < eval_zero_fraction * peak] = 0.0
    return ref, ev


def pass_rate_percent(gamma: np.ndarray) -> float:
    """The paper's pass rate, ``100 * (1 - N(gamma > 1) / N(gamma > 0))``; NaN (not evaluated) ignored.

    Voxels where both doses are zero have gamma 0 and so leave the denominator. Returns 100 when no
    voxel has gamma > 0.
    """
    g = np.asarray(gamma)
    with np.errstate(invalid="ignore"):
        n_eval = int(np.count_nonzero(g > 0))
        n_fail = int(np.count_nonzero(g > 1))
    return 100.0 if n_eval == 0 else 100.0 * (1.0 - n_fail / n_eval)


def gamma_index(
    reference: np.ndarray,
    evaluated: np.ndarray,
    voxel_mm: float | Sequence[float] = VOXEL_MM,
    dose_percent: float = PAPER_GAMMA_DOSE_PERCENT,
    dta_mm: float = PAPER_GAMMA_DTA_MM,
    *,
    global_norm: float | None = None,
    lower_cutoff_percent: float = 0.0,
    tolerance: float = 0.01,
    max_gamma: float = 2.0,
) -> np.ndarray:
    """Global 3D gamma index of ``evaluated`` against ``reference`` (both (L, H, W), same grid).

    Parameters
    ----------
    reference, evaluated
        Doses on the same grid, any consistent unit.
    voxel_mm
        Voxel size (depth, row, col) in mm, or one number for cubic voxels.
    dose_percent, dta_mm
        The criterion, e.g. 1 % and 3 mm.
    global_norm
        Dose that ``dose_percent`` refers to; default the reference maximum.
    lower_cutoff_percent
        Reference voxels below this percentage of ``global_norm`` are not evaluated (NaN).
    tolerance
        A cell is searched further only if it could lower a gamma by more than this, or turn a failing
        voxel into a passing one. Gammas are never below the exact minimum; in tests they were within
        2 x ``tolerance`` of it on smooth doses, 4 x with noise (module notes).
    max_gamma
        Search radius ``dta_mm * max_gamma``; larger gammas are returned as ``max_gamma``.

    Returns
    -------
    numpy.ndarray
        float64 gamma, same shape, NaN where not evaluated.
    """
    ref, ev = _check_pair(reference, evaluated, 3)
    voxel = _check_voxel_mm(voxel_mm)
    GammaCriteria(dose_percent=dose_percent, dta_mm=dta_mm, lower_cutoff_percent=lower_cutoff_percent)
    if not (tolerance > 0 and math.isfinite(tolerance)):
        raise InputError(f"tolerance must be positive, got {tolerance}")
    if not (max_gamma > 0 and math.isfinite(max_gamma)):
        raise InputError(f"max_gamma must be positive and finite, got {max_gamma}")
    norm = float(ref.max()) if global_norm is None else float(global_norm)
    if not (norm > 0 and math.isfinite(norm)):
        if global_norm is not None:
            raise InputError(f"global_norm must be positive, got {global_norm}")
        raise InputError("reference dose has no positive value to normalise the dose criterion to")

    dose_unit = dose_percent / 100.0 * norm
    evaluate = ref >= lower_cutoff_percent / 100.0 * norm
    g2 = _gamma_squared(
        ref / dose_unit,
        ev / dose_unit,
        voxel / dta_mm,
        float(max_gamma),
        float(tolerance),
        evaluate,
    )
    gamma = np.sqrt(g2)
    gamma[~evaluate] = np.nan
    return gamma


def paper_gamma(
    reference: np.ndarray,
    evaluated: np.ndarray,
    voxel_mm: float | Sequence[float] = VOXEL_MM,
    criteria: str | GammaCriteria = "paper",
    *,
    tolerance: float = 0.01,
    max_gamma: float = 2.0,
) -> GammaResult:
    """Gamma of one beamlet under the paper's protocol (default 1 %/3 mm, global).

    The reference below 0.1 % of its maximum and the evaluated dose below 0.5 % of the reference
    maximum are set to zero, then :func:`gamma_index` runs with no low-dose cutoff and the pass rate is
    ``1 - N(gamma > 1) / N(gamma > 0)``.
    """
    crit = _as_criteria(criteria)
    ref, ev = _check_pair(reference, evaluated, 3)
    ref, ev = apply_zero_thresholds(ref, ev, crit.ref_zero_fraction, crit.eval_zero_fraction)
    gamma = gamma_index(
        ref,
        ev,
        voxel_mm,
        crit.dose_percent,
        crit.dta_mm,
        lower_cutoff_percent=crit.lower_cutoff_percent,
        tolerance=tolerance,
        max_gamma=max_gamma,
    )
    with np.errstate(invalid="ignore"):
        n_eval = int(np.count_nonzero(gamma > 0))
        n_fail = int(np.count_nonzero(gamma > 1))
    return GammaResult(gamma, pass_rate_percent(gamma), n_eval, n_fail)


def gamma_pass_rates(
    references: np.ndarray,
    evaluated: np.ndarray,
    voxel_mm: float | Sequence[float] = VOXEL_MM,
    criteria: str | GammaCriteria = "paper",
    *,
    tolerance: float = 0.01,
    max_gamma: float = 2.0,
) -> np.ndarray:
    """Pass rates in percent, shape (N,), of N beamlets (N, L, H, W) under :func:`paper_gamma`.

    ``criteria``: ``"paper"``/``"1%/3mm"``, ``"2%/2mm"``, ``"3%/3mm"``, any ``"X%/Ymm"``, or a
    :class:`GammaCriteria`.
    """
    refs, evs = _check_pair(references, evaluated, 4)
    crit = _as_criteria(criteria)
    return np.array(
        [
            paper_gamma(r, e, voxel_mm, crit, tolerance=tolerance, max_gamma=max_gamma).pass_rate_percent
            for r, e in zip(refs, evs, strict=True)
        ],
        dtype=np.float64,
    )


# --------------------------------------------------------------------------------------------------
# The search. Doses are in units of the dose criterion and lengths in units of the DTA, so that
# gamma^2 = |offset|^2 + (dose difference)^2. Work is done on squared gamma throughout.


def _gamma_squared(
    ref: np.ndarray, ev: np.ndarray, step: np.ndarray, max_gamma: float, tol: float, evaluate: np.ndarray
) -> np.ndarray:
    """Squared gamma (capped at ``max_gamma**2``, 0 where not ``evaluate``) for normalised doses.

    ``step`` is the voxel size in DTA units; the steps are those of the module notes.
    """
    shape = np.array(ref.shape)
    cap2 = max_gamma**2
    g2 = np.minimum((ev - ref) ** 2, cap2)
    g2[~evaluate] = 0.0
    active = np.flatnonzero(g2 > 0)
    if active.size == 0:
        return g2
    # padded copies (inf outside the grid) let one flat offset address any neighbour of any voxel
    reach = np.ceil(max_gamma / step - 1e-9).astype(int)
    pad = reach + 1
    pshape = tuple(shape + 2 * pad)
    pstrides = np.array([pshape[1] * pshape[2], pshape[2], 1])
    ev_pad = np.full(pshape, np.inf)
    ev_pad[tuple(slice(p, p + n) for p, n in zip(pad, shape, strict=True))] = ev
    ev_pad = ev_pad.ravel()
    ref_flat = ref.ravel()
    g2_flat = g2.ravel()

    # 1. voxel-centre offsets, nearest first
    grids = np.meshgrid(*[np.arange(-r, r + 1) for r in reach], indexing="ij")
    offsets = np.stack([g.ravel() for g in grids], axis=1)
    d2 = ((offsets * step) ** 2).sum(axis=1)
    order = np.argsort(d2, kind="stable")
    order = order[(d2[order] > 0) & (d2[order] < cap2)]
    act = active
    act_pidx = (np.stack(np.unravel_index(act, ref.shape), axis=1) + pad) @ pstrides
    act_ref = ref_flat[act]
    act_g2 = g2_flat[act]
    last_d2 = -1.0
    for off, dist2 in zip(offsets[order] @ pstrides, d2[order], strict=True):
        if dist2 != last_d2:
            last_d2 = dist2
            live = act_g2 > dist2
            if not live.all():
                g2_flat[act] = act_g2
                act, act_pidx, act_ref, act_g2 = act[live], act_pidx[live], act_ref[live], act_g2[live]
                if act.size == 0:
                    break
        np.minimum(act_g2, dist2 + (ev_pad[act_pidx + off] - act_ref) ** 2, out=act_g2)
    g2_flat[act] = act_g2

    # 2.-4. cells between voxel centres, indexed by their lowest corner, nearest first
    n_cells = shape - 1
    corners = [ev[tuple(slice(o, o + n) for o, n in zip(idx, n_cells, strict=True))] for idx in np.ndindex(2, 2, 2)]
    cell_inner = tuple(slice(p, p + n) for p, n in zip(pad, n_cells, strict=True))
    cmin_pad = np.full(pshape, np.inf)
    cmax_pad = np.full(pshape, np.inf)
    cmin_pad[cell_inner] = functools.reduce(np.minimum, corners)
    cmax_pad[cell_inner] = functools.reduce(np.maximum, corners)
    grids = np.meshgrid(*[np.arange(-r, r) for r in reach], indexing="ij")
    cells = np.stack([g.ravel() for g in grids], axis=1)
    c_lo = cells * step
    c_d2 = (np.maximum(np.maximum(c_lo, 0.0), -(c_lo + step)) ** 2).sum(axis=1)
    order = np.argsort(c_d2, kind="stable")
    order = order[c_d2[order] < cap2]
    padded = _Padded(ev_pad, cmin_pad.ravel(), cmax_pad.ravel(), np.array([o @ pstrides for o in np.ndindex(2, 2, 2)]))
    cell_list = (c_lo[order], c_d2[order], cells[order] @ pstrides)

    active = active[g2_flat[active] > 0]
    for start in range(0, active.size, _CHUNK_VOXELS):
        act = active[start : start + _CHUNK_VOXELS]
        act_pidx = (np.stack(np.unravel_index(act, ref.shape), axis=1) + pad) @ pstrides
        _search_cells(g2_flat, ref_flat, padded, act, act_pidx, cell_list, step, tol)
    return g2


@dataclass(frozen=True)
class _Padded:
    """Flattened padded arrays: evaluated dose, cell minimum and maximum (inf outside the grid), and the
    flat offsets of a cell's 8 corners from its lowest one."""

    ev: np.ndarray
    cell_min: np.ndarray
    cell_max: np.ndarray
    corner_offsets: np.ndarray


def _search_cells(
    g2: np.ndarray,
    ref: np.ndarray,
    padded: _Padded,
    act: np.ndarray,
    act_pidx: np.ndarray,
    cells: tuple[np.ndarray, np.ndarray, np.ndarray],
    step: np.ndarray,
    tol: float,
) -> None:
    """Steps 2-4 for voxels ``act`` (flat ids; ``act_pidx`` their flat index in the padded arrays).

    ``cells``: lowest corner relative to a voxel in DTA units (K, 3), squared distance to the voxel
    (K,), flat offset in the padded arrays (K,), nearest first.
    """
    c_lo, c_d2, c_flat = cells
    act_ref = ref[act]
    act_g2 = g2[act]
    pair_vox, pair_cell, pair_kind = [], [], []
    last_d2 = -1.0
    for k, (off, dist2) in enumerate(zip(c_flat, c_d2, strict=True)):
        if dist2 != last_d2:
            last_d2 = dist2
            live = act_g2 > dist2
            if not live.all():
                act, act_pidx, act_ref, act_g2 = act[live], act_pidx[live], act_ref[live], act_g2[live]
                if act.size == 0:
                    break
        idx = act_pidx + off
        gap_dose = np.maximum(np.maximum(padded.cell_min[idx] - act_ref, act_ref - padded.cell_max[idx]), 0.0)
        sel = np.flatnonzero(_worth(dist2 + gap_dose**2, act_g2, tol))
        if sel.size:
            pair_vox.append(act[sel])
            pair_cell.append(idx[sel])
            pair_kind.append(np.full(sel.size, k, dtype=np.int32))
    if not pair_vox:
        return
    pair_vox = np.concatenate(pair_vox)
    pair_cell = np.concatenate(pair_cell)
    pair_lo = c_lo[np.concatenate(pair_kind)]
    for start in range(0, pair_vox.size, _CHUNK_PAIRS):
        sl = slice(start, start + _CHUNK_PAIRS)
        corner_dose = padded.ev[padded.corner_offsets[:, None] + pair_cell[None, sl]].reshape(2, 2, 2, -1)
        _refine(g2, pair_vox[sl], pair_lo[sl].T, corner_dose - ref[pair_vox[sl]], step, tol, _MAX_SPLITS)


def _refine(
    g2: np.ndarray,
    vox: np.ndarray,
    lo: np.ndarray,
    corners: np.ndarray,
    size: np.ndarray,
    tol: float,
    splits_left: int,
) -> None:
    """Bound, search and maybe split P boxes of the evaluated grid (box axis last, for long inner loops).

    ``vox`` (P,) voxel ids into ``g2``; ``lo`` (3, P) lowest box corner relative to the voxel;
    ``corners`` (2, 2, 2, P) evaluated minus reference dose at the box corners; ``size`` (3,).
    """
    c = corners
    hi = lo + size[:, None]
    # trilinear dose in centred box coordinates v in [-1/2, 1/2]^3:
    # m + sum b_a v_a + sum b_ab v_a v_b + b_012 v_0 v_1 v_2; the last two terms stay within +- e
    s0, d0 = c[0] + c[1], c[1] - c[0]
    ss, sd, ds, dd = s0[0] + s0[1], s0[1] - s0[0], d0[0] + d0[1], d0[1] - d0[0]
    slope = np.stack([0.25 * (ds[0] + ds[1]), 0.25 * (sd[0] + sd[1]), 0.25 * (ss[1] - ss[0])]) / size[:, None]
    e = 0.125 * (np.abs(dd[0] + dd[1]) + np.abs(ds[1] - ds[0]) + np.abs(sd[1] - sd[0]) + np.abs(dd[1] - dd[0]))
    at_zero = 0.125 * (ss[0] + ss[1]) - (slope * (lo + 0.5 * size[:, None])).sum(axis=0)

    # lower bounds: (1) distance to the box with the gap between 0 and the corner range;
    # (2) the linear model, shifted by up to e, minimised exactly over the box
    flat = c.reshape(8, -1)
    gap = np.maximum(np.maximum(flat.min(axis=0), -flat.max(axis=0)), 0.0)
    near = np.minimum(np.maximum(0.0, lo), hi)
    bound = gap * gap + (near * near).sum(axis=0)
    live = np.flatnonzero(_worth(bound, g2[vox], tol))
    if live.size == 0:
        return
    if live.size < vox.size:
        vox, lo, hi, c, slope, at_zero, e, near, bound = (
            vox[live], lo[:, live], hi[:, live], c[..., live], slope[:, live], at_zero[live], e[live], near[:, live],
            bound[live],
        )
    shifted = np.minimum(np.maximum(-(slope * near).sum(axis=0), at_zero - e), at_zero + e)
    np.maximum(bound, _box_qp(shifted, slope, lo, hi)[0], out=bound)
    live = np.flatnonzero(_worth(bound, g2[vox], tol))
    if live.size == 0:
        return
    if live.size < vox.size:
        vox, lo, hi, c, slope, at_zero, bound = (
            vox[live], lo[:, live], hi[:, live], c[..., live], slope[:, live], at_zero[live], bound[live]
        )

    # candidates: the linear fit's minimiser, then Gauss-Newton steps on the trilinear dose
    best = previous = None
    for _ in range(_NEWTON_STEPS + 1):
        y = _box_qp(at_zero, slope, lo, hi)[1]
        value, slope = _trilinear(c, (y - lo) / size[:, None])
        slope /= size[:, None]
        at_zero = value - (slope * y).sum(axis=0)
        f = (y * y).sum(axis=0) + value * value
        previous, best = best, (f if best is None else np.minimum(best, f))
    np.minimum.at(g2, vox, best)
    if splits_left <= 0:
        return
    # split where the search may have stopped short: the last step still gained, or the dose turns
    unsettled = np.sqrt(previous) - np.sqrt(best) > 0.25 * tol
    for diff in (c[1] - c[0], c[:, 1] - c[:, 0], c[:, :, 1] - c[:, :, 0]):
        diff = diff.reshape(4, -1)
        unsettled |= (diff.min(axis=0) < 0) & (diff.max(axis=0) > 0)
    live = np.flatnonzero(unsettled & _worth(bound, g2[vox], tol))
    if live.size == 0:
        return
    vox, lo, c = vox[live], lo[:, live], c[..., live]
    n = vox.size
    pts = np.empty((3, 3, 3, n))
    pts[::2, ::2, ::2] = c
    pts[1, ::2, ::2] = 0.5 * (pts[0, ::2, ::2] + pts[2, ::2, ::2])
    pts[:, 1, ::2] = 0.5 * (pts[:, 0, ::2] + pts[:, 2, ::2])
    pts[:, :, 1] = 0.5 * (pts[:, :, 0] + pts[:, :, 2])
    half = 0.5 * size
    kids = np.empty((2, 2, 2, 8 * n))
    kid_lo = np.empty((3, 8 * n))
    for q, (i, j, k) in enumerate(np.ndindex(2, 2, 2)):
        kids[..., q * n : (q + 1) * n] = pts[i : i + 2, j : j + 2, k : k + 2]
        kid_lo[:, q * n : (q + 1) * n] = lo + (np.array([i, j, k]) * half)[:, None]
    kid_vox = np.tile(vox, 8)
    for start in range(0, kid_vox.size, _CHUNK_PAIRS):
        sl = slice(start, start + _CHUNK_PAIRS)
        _refine(g2, kid_vox[sl], kid_lo[:, sl], kids[..., sl], half, tol, splits_left - 1)


def _box_qp(at_zero: np.ndarray, slope: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact minimum and minimiser over the box [lo, hi] (3, P) of |y|^2 + (at_zero + slope . y)^2.

    At the minimum y = clip(-t slope, lo, hi) with t = at_zero + slope . y; t - at_zero - slope . y(t)
    increases with t and is linear between the 6 points where a coordinate reaches a bound, so the
    root is found exactly between the two neighbouring points of opposite sign.
    """
    reach = (np.abs(slope) * np.maximum(np.abs(lo), np.abs(hi))).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        kinks = np.concatenate([-lo / slope, -hi / slope])
    kinks[~np.isfinite(kinks)] = 0.0
    ts = np.concatenate([kinks, (at_zero - reach)[None], (at_zero + reach)[None]])
    ys = np.minimum(np.maximum(-ts[None] * slope[:, None], lo[:, None]), hi[:, None])
    ys *= slope[:, None]
    resid = ts - at_zero - ys.sum(axis=0)
    below = resid <= 0
    t_lo = np.where(below, ts, -np.inf).max(axis=0)
    t_hi = np.where(below, np.inf, ts).min(axis=0)
    r_lo = np.where(below, resid, -np.inf).max(axis=0)  # the residual grows with t
    r_hi = np.where(below, np.inf, resid).min(axis=0)
    exact = r_lo == 0
    with np.errstate(invalid="ignore"):
        t = np.where(exact, t_lo, t_lo - r_lo * (t_hi - t_lo) / np.where(exact, 1.0, r_hi - r_lo))
    y = np.minimum(np.maximum(-t * slope, lo), hi)
    resid_t = at_zero + (slope * y).sum(axis=0)
    return (y * y).sum(axis=0) + resid_t * resid_t, y


def _worth(bound: np.ndarray, g2: np.ndarray, tol: float) -> np.ndarray:
    """Whether boxes with squared-gamma lower bound ``bound`` can matter to voxels at squared gamma ``g2``.

    They do if they may lower gamma by more than ``tol``, or may turn a failing voxel (gamma > 1) into a
    passing one: pass or fail is decided exactly.
    """
    return (bound < np.maximum(np.sqrt(g2) - tol, 0.0) ** 2) | ((bound <= 1.0) & (g2 > 1.0))


def _trilinear(c: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Value and gradient (per unit of ``u``) of the trilinear interpolant of corners (2, 2, 2, P) at u (3, P)."""
    d0 = c[1] - c[0]
    a = c[0] + u[0] * d0
    a1 = a[1] - a[0]
    b = a[0] + u[1] * a1
    value = b[0] + u[2] * (b[1] - b[0])
    g0 = d0[0] + u[1] * (d0[1] - d0[0])
    grad = np.stack([g0[0] + u[2] * (g0[1] - g0[0]), a1[0] + u[2] * (a1[1] - a1[0]), b[1] - b[0]])
    return value, grad
