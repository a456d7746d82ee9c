"""Error metrics of predicted beamlet doses besides gamma: relative error, range error, failures by depth.

Doses are (L, H, W) blocks or (N, L, H, W) batches with the beam entering at depth index 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from dota.errors import InputError

__all__ = [
    "distal_range_mm",
    "failures_by_depth",
    "range_error_mm",
    "relative_error_percent",
    "summarize",
]

_PERCENTILES = (1, 5, 25, 50, 75, 95, 99)


def _numeric(a: np.ndarray, label: str) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype == object or not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise InputError(f"{label} must be a numeric array, got dtype {a.dtype}")
    return a.astype(np.float64, copy=False)


def _dose_pair(reference: np.ndarray, predicted: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """Validated float64 batches (N, L, H, W) and whether the input was a single block."""
    ref = _numeric(reference, "reference dose")
    pred = _numeric(predicted, "predicted dose")
    if ref.shape != pred.shape:
        raise InputError(f"reference dose {ref.shape} and predicted dose {pred.shape} differ in shape")
    if ref.ndim not in (3, 4):
        raise InputError(f"doses must have shape (L, H, W) or (N, L, H, W), got {ref.shape}")
    if not (np.isfinite(ref).all() and np.isfinite(pred).all()):
        raise InputError("doses contain NaN or inf")
    single = ref.ndim == 3
    return (ref[None], pred[None], True) if single else (ref, pred, False)


def relative_error_percent(reference: np.ndarray, predicted: np.ndarray) -> float | np.ndarray:
    """Mean absolute error over the whole block in percent of the reference maximum, per beamlet.

    ``100 * mean(|predicted - reference|) / max(reference)``, the mean taken over every voxel of the
    block as in the paper's evaluation (0.126 % for DoTA): most voxels are zero in both, so the value
    depends on the block size. Returns a float for one block, an (N,) array for a batch.

    Raises
    ------
    InputError
        On shape mismatch, NaN/inf, or a reference that is nowhere positive.
    """
    ref, pred, single = _dose_pair(reference, predicted)
    peak = ref.reshape(ref.shape[0], -1).max(axis=1)
    if np.any(peak <= 0):
        bad = np.flatnonzero(peak <= 0)[:5].tolist()
        raise InputError(f"reference dose has no positive value (beamlets {bad}): relative error undefined")
    mae = np.abs(pred - ref).reshape(ref.shape[0], -1).mean(axis=1)
    out = 100.0 * mae / peak
    return float(out[0]) if single else out


def distal_range_mm(dose: np.ndarray, voxel_depth_mm: float = 2.0, level: float = 0.8) -> float | np.ndarray:
    """Depth (mm from the block entrance) where the integrated depth dose falls to ``level`` of its peak.

    The integrated depth dose sums each depth slice; voxel ``k`` is centred at ``(k + 0.5) *
    voxel_depth_mm``. The crossing distal to the maximum is interpolated linearly between voxel
    centres (R80 for ``level=0.8``). NaN when the dose is zero or does not fall below ``level`` within
    the block. Returns a float for one block (L, H, W), an (N,) array for (N, L, H, W).
    """
    d = _numeric(dose, "dose")
    if d.ndim not in (3, 4):
        raise InputError(f"dose must have shape (L, H, W) or (N, L, H, W), got {d.shape}")
    if not np.isfinite(d).all():
        raise InputError("dose contains NaN or inf")
    if not (voxel_depth_mm > 0 and math.isfinite(voxel_depth_mm)):
        raise InputError(f"voxel_depth_mm must be positive, got {voxel_depth_mm}")
    if not 0 < level < 1:
        raise InputError(f"level must be a fraction in (0, 1), got {level}")
    single = d.ndim == 3
    idd = (d[None] if single else d).sum(axis=(2, 3))
    out = np.full(idd.shape[0], np.nan)
    for n, curve in enumerate(idd):
        peak_idx = int(np.argmax(curve))
        peak = curve[peak_idx]
        if peak <= 0:
            continue
        target = level * peak
        below = np.flatnonzero(curve[peak_idx:] < target)
        if below.size == 0:
            continue
        k = peak_idx + int(below[0])
        hi_val, lo_val = curve[k - 1], curve[k]
        frac = (hi_val - target) / (hi_val - lo_val)
        out[n] = (k - 1 + frac + 0.5) * voxel_depth_mm
    return float(out[0]) if single else out


def range_error_mm(
    reference: np.ndarray, predicted: np.ndarray, voxel_depth_mm: float = 2.0, level: float = 0.8
) -> float | np.ndarray:
    """Predicted minus reference distal range (R80 by default) of the integrated depth dose, in mm.

    See :func:`distal_range_mm`; NaN where either range is undefined.
    """
    ref, pred, single = _dose_pair(reference, predicted)
    out = distal_range_mm(pred, voxel_depth_mm, level) - distal_range_mm(ref, voxel_depth_mm, level)
    return float(out[0]) if single else out


def failures_by_depth(gamma: np.ndarray, *, share: bool = False) -> np.ndarray:
    """Gamma failures along the depth axis, shape (L,), from gamma (L, H, W) or (N, L, H, W).

    By default the failure rate at each depth index, ``N(gamma > 1) / N(gamma > 0)`` over all voxels
    of that depth (the paper's pass-rate definition, slice by slice), NaN where no voxel has gamma > 0.
    With ``share=True``, the fraction of all failing voxels that lie at each depth (sums to 1; zeros
    when nothing fails). NaN gammas (not evaluated) count as neither.
    """
    g = _numeric(gamma, "gamma")
    if g.ndim not in (3, 4):
        raise InputError(f"gamma must have shape (L, H, W) or (N, L, H, W), got {g.shape}")
    if g.ndim == 3:
        g = g[None]
    with np.errstate(invalid="ignore"):
        failed = (g > 1).sum(axis=(0, 2, 3)).astype(np.float64)
        evaluated = (g > 0).sum(axis=(0, 2, 3)).astype(np.float64)
    if share:
        total = failed.sum()
        return failed / total if total > 0 else np.zeros_like(failed)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(evaluated > 0, failed / evaluated, np.nan)


def summarize(values: Iterable[float] | np.ndarray) -> dict[str, float | int | None]:
    """JSON-ready summary of per-beamlet values (pass rates, errors): count, mean, std, min, max, percentiles.

    NaN values are left out and counted in ``n_nan``; statistics of an empty set are ``None``.
    ``std`` is the sample standard deviation (ddof 1; 0 for a single value), as in "mean +- std".
    """
    v = _numeric(np.asarray(list(values) if not isinstance(values, np.ndarray) else values), "values").ravel()
    finite = v[~np.isnan(v)]
    if np.isinf(finite).any():
        raise InputError("values contain inf")
    out: dict[str, float | int | None] = {"n": int(finite.size), "n_nan": int(v.size - finite.size)}
    keys = ["mean", "std", "min", "max"] + [f"p{p}" for p in _PERCENTILES]
    if finite.size == 0:
        out.update({k: None for k in keys})
        return out
    out["mean"] = float(finite.mean())
    out["std"] = float(finite.std(ddof=1)) if finite.size > 1 else 0.0
    out["min"] = float(finite.min())
    out["max"] = float(finite.max())
    for p, q in zip(_PERCENTILES, np.percentile(finite, _PERCENTILES), strict=True):
        out[f"p{p}"] = float(q)
    return out
