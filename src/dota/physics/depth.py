"""Water-equivalent depth along the beam and the depth beyond which a beamlet deposits no dose."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dota.constants import TRUNCATION_MARGIN_MM, VOXEL_MM
from dota.errors import InputError
from dota.physics.bragg import beam_extent_wed_mm
from dota.physics.hu import hu_to_rsp
from dota.validation import check_beamlets

def check_voxel_mm(voxel_mm: Sequence[float]) -> tuple[float, float, float]:
    """``voxel_mm`` as three positive finite floats (depth, row, col), or :class:`InputError`."""
    try:
        values = tuple(float(v) for v in voxel_mm)
    except (TypeError, ValueError):
        raise InputError(f"voxel_mm must be three numbers (depth, row, col) in mm, got {voxel_mm!r}") from None
    if len(values) != 3 or not all(np.isfinite(v) and v > 0 for v in values):
        raise InputError(f"voxel_mm must be three positive sizes (depth, row, col) in mm, got {voxel_mm!r}")
    return values  # type: ignore[return-value]


def water_equivalent_depth_mm(geometry_hu: np.ndarray, voxel_mm: Sequence[float] = VOXEL_MM) -> np.ndarray:
    """Water-equivalent depth (mm) at voxel centres, accumulated along the depth axis (axis -3).

    Parameters
    ----------
    geometry_hu : array (L, H, W) or (N, L, H, W)
        CT numbers; the beam enters at depth index 0.
    voxel_mm : (depth, row, col)
        Voxel size in mm; only the depth size is used.

    Returns
    -------
    float64 array, same shape: ``sum(rsp * dz)`` over the voxels upstream plus half the voxel itself,
    with RSP from :func:`dota.physics.hu.hu_to_rsp`.
    """
    geometry = np.asarray(geometry_hu)
    if geometry.ndim not in (3, 4) or not np.issubdtype(geometry.dtype, np.number):
        raise InputError(f"geometry must be a numeric (L, H, W) or (N, L, H, W) array of HU, got shape {geometry.shape}")
    if not np.isfinite(geometry).all():
        raise InputError("geometry contains NaN or inf")
    dz = check_voxel_mm(voxel_mm)[0]
    step = hu_to_rsp(geometry) * dz
    return np.cumsum(step, axis=-3) - 0.5 * step


def stopping_depth_index(
    geometry_hu: np.ndarray,
    energies_mev: np.ndarray | Sequence[float] | float,
    voxel_mm: Sequence[float] = VOXEL_MM,
    margin_mm: float = TRUNCATION_MARGIN_MM,
) -> np.ndarray:
    """Number of depth slices that hold all of each beamlet's dose: slices ``[0, s)`` are needed.

    The rule (conservative by construction): for every lateral column of the block, accumulate the
    water-equivalent depth at the *entrance* of each voxel; at each depth take the minimum over all
    columns of the block (any column the beam can reach, however far from the axis); ``s`` is the
    first depth index where that minimum reaches ``beam_extent_wed_mm(E) + margin_mm``, i.e. where even
    the least-stopping column is deeper than the analytic dose extent (CSDA range plus six sigma of
    range spread) plus the margin; ``s = L`` if no such depth exists. The analytic engine deposits
    exactly nothing in slices ``s`` and beyond for any ``margin_mm >= 0``; the default margin
    (``dota.constants.TRUNCATION_MARGIN_MM``, 5 mm) leaves room for Monte Carlo and learned doses,
    whose protons can cross between columns.

    Parameters
    ----------
    geometry_hu : array (N, L, H, W) or (L, H, W)
    energies_mev : array (N,) or float
    voxel_mm : (depth, row, col) in mm
    margin_mm : float
        Extra water-equivalent depth, mm (>= 0).

    Returns
    -------
    int64 array (N,), each in ``[1, L]``.
    """
    geometry, energies = check_beamlets(geometry_hu, energies_mev)
    if np.any(energies <= 0):
        raise InputError("energies must be positive (MeV)")
    if not np.isfinite(margin_mm) or margin_mm < 0:
        raise InputError(f"margin_mm must be a finite number >= 0, got {margin_mm!r}")
    dz = check_voxel_mm(voxel_mm)[0]
    n, length = geometry.shape[:2]
    limit = np.asarray(beam_extent_wed_mm(energies.astype(np.float64)), dtype=np.float64).reshape(n) + margin_mm
    out = np.empty(n, dtype=np.int64)
    for i in range(n):
        step = hu_to_rsp(geometry[i]) * dz
        entry = np.cumsum(step, axis=0) - step
        least = entry.reshape(length, -1).min(axis=1)  # non-decreasing along depth
        out[i] = int(np.count_nonzero(least < limit[i]))
    return np.clip(out, 1, length)
