"""Checks of user input shared by every engine and command: one clear line per problem."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dota.errors import InputError


def check_beamlets(
    geometry_hu: np.ndarray,
    energies_mev: np.ndarray | Sequence[float] | float,
    *,
    block_shape: tuple[int, int, int] | None = None,
    energy_range_mev: tuple[float, float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Validate a batch of beamlets and return ``(geometry float32 (N, L, H, W), energies float32 (N,))``.

    A single block (L, H, W) with a scalar energy is accepted and given a batch axis.

    Raises
    ------
    InputError
        On a wrong number of dimensions, a block shape other than ``block_shape``, a batch size that
        does not match the energies, a non-numeric dtype, NaN/inf, or an energy outside
        ``energy_range_mev`` (inclusive, with 1e-3 MeV tolerance).
    """
    geometry = np.asarray(geometry_hu)
    if geometry.dtype == object or not (
        np.issubdtype(geometry.dtype, np.floating) or np.issubdtype(geometry.dtype, np.integer)
    ):
        raise InputError(f"geometry must be a numeric array of HU, got dtype {geometry.dtype}")
    energies = np.asarray(energies_mev)
    if energies.dtype == object or not (
        np.issubdtype(energies.dtype, np.floating) or np.issubdtype(energies.dtype, np.integer)
    ):
        raise InputError(f"energies must be numeric (MeV), got dtype {energies.dtype}")
    if geometry.ndim == 3:
        geometry = geometry[None]
        energies = energies.reshape(-1)
    if geometry.ndim != 4:
        raise InputError(
            f"geometry must have shape (N, L, H, W) or (L, H, W), got {geometry.ndim} dimensions {geometry.shape}"
        )
    energies = energies.reshape(-1) if energies.ndim == 0 else energies
    if energies.ndim != 1:
        raise InputError(f"energies must have shape (N,), got {energies.shape}")
    if energies.shape[0] != geometry.shape[0]:
        raise InputError(
            f"{geometry.shape[0]} geometries but {energies.shape[0]} energies: give one energy per beamlet"
        )
    if block_shape is not None and tuple(geometry.shape[1:]) != tuple(block_shape):
        raise InputError(
            f"geometry blocks have shape {tuple(geometry.shape[1:])}, this model expects {tuple(block_shape)}"
        )
    geometry = geometry.astype(np.float32, copy=False)
    energies = energies.astype(np.float32, copy=False)
    if not np.isfinite(geometry).all():
        bad = np.argwhere(~np.isfinite(geometry).reshape(geometry.shape[0], -1).all(axis=1)).ravel()
        raise InputError(f"geometry contains NaN or inf (beamlets {bad[:5].tolist()})")
    if not np.isfinite(energies).all():
        raise InputError("energies contain NaN or inf")
    if energy_range_mev is not None and energies.size:
        lo, hi = energy_range_mev
        outside = (energies < lo - 1e-3) | (energies > hi + 1e-3)
        if outside.any():
            e = float(energies[outside][0])
            raise InputError(f"energy {e:g} MeV is outside the range {lo:g}-{hi:g} MeV this model/engine supports")
    return geometry, energies
