"""The beam's-eye view of one beam: a beam-aligned grid, the CT resampled onto it once, spot blocks cut
from it, and dose carried back into the CT grid.

Grid of a beam (:class:`BeamGrid`)
    Axes ``(depth, rows, cols)`` along (beam direction, IEC Y, IEC X) of :func:`~dota.plan.geometry.iec_beam_axes`,
    voxels of ``voxel_mm`` (2 mm, as the engines expect). Voxel ``(p, r, c)`` is centred at
    ``origin_mm + p*dd*direction + r*dr*y_axis + c*dc*x_axis`` (patient mm). The grid spans the CT's
    whole extent along the beam and the spot field laterally, plus a block half-width and one voxel.
Spot blocks
    A spot's block is the ``(L, H, W)`` window (150 x 24 x 24) whose lateral centre lies on the spot's
    axis; its first slice is one voxel before the first body voxel (HU > -400) in the window, so the
    beam enters at depth 0 as the engines expect. The lateral phase of the grid is chosen so that spot
    positions on a common 2 mm lattice (as :mod:`dota.plan.optimize` places them) fall exactly on block
    centres; other spots use the block at the nearest lattice position (the CT they see is then off by
    at most half a voxel, 1 mm) and their dose is put at their true position by bilinear splatting
    (weights sum to one: integral dose is kept).
Back to the CT (:class:`GridToCT`)
    The dose of the CT voxel is the **trilinear** interpolation of the beam-grid dose, averaged over
    ``n = ceil(spacing / 2 mm)`` sub-points per axis inside the voxel (e.g. 2 x 2 x 2 for a
    3 x 3 x 2.5 mm CT), so CT voxels larger than the beam grid's still receive their mean dose.
    Outside the beam grid the dose is zero. The map is linear: carrying spots one by one (the
    dose-influence matrix) gives the same dose as carrying their sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from dota.constants import BLOCK_SHAPE, HU_AIR, VOXEL_MM
from dota.data.ct import BODY_THRESHOLD_HU
from dota.errors import InputError
from dota.plan.geometry import BeamAxes, PatientCT

#: Points per chunk when mapping coordinates (bounds the memory of resampling).
_CHUNK_POINTS = 1 << 21


@dataclass(frozen=True)
class BeamGrid:
    """A beam-aligned grid in DICOM patient coordinates (see the module docstring)."""

    origin_mm: np.ndarray  # (3,) patient centre of voxel (0, 0, 0)
    axes: np.ndarray  # (3, 3) rows: direction, y_axis (rows), x_axis (cols)
    shape: tuple[int, int, int]
    voxel_mm: tuple[float, float, float]
    isocenter_mm: np.ndarray

    def index_to_patient(self, prc: np.ndarray) -> np.ndarray:
        """Patient mm (..., 3) of continuous grid indices (..., 3) in (p, r, c) order."""
        scaled = np.asarray(prc, dtype=np.float64) * np.asarray(self.voxel_mm)
        return self.origin_mm + scaled @ self.axes

    def patient_to_index(self, xyz: np.ndarray) -> np.ndarray:
        """Continuous grid indices (..., 3) of patient points (..., 3) mm."""
        rel = np.asarray(xyz, dtype=np.float64) - self.origin_mm
        return (rel @ self.axes.T) / np.asarray(self.voxel_mm)

    def depth_mm(self, p: np.ndarray | float) -> np.ndarray | float:
        """Depth (mm) of the centres of slices ``p`` along the beam, from the isocentre (upstream negative)."""
        return float((self.origin_mm - self.isocenter_mm) @ self.axes[0]) + np.asarray(p) * self.voxel_mm[0]

    def spot_rc(self, positions_mm: np.ndarray) -> np.ndarray:
        """Continuous (row, col) grid index (n, 2) of the axes of spots at IEC ``(X, Y)`` (n, 2) mm."""
        pos = np.asarray(positions_mm, dtype=np.float64).reshape(-1, 2)
        rel = self.isocenter_mm - self.origin_mm
        row = (pos[:, 1] + rel @ self.axes[1]) / self.voxel_mm[1]
        col = (pos[:, 0] + rel @ self.axes[2]) / self.voxel_mm[2]
        return np.stack([row, col], axis=1)


def _lattice_phase(q: np.ndarray) -> float:
    """Circular mean of ``q mod 1``: the lattice offset that puts most values on integers."""
    angle = 2 * np.pi * np.asarray(q, dtype=np.float64)
    mean = np.arctan2(np.sin(angle).mean(), np.cos(angle).mean())
    return float(mean / (2 * np.pi)) % 1.0


def make_beam_grid(
    ct: PatientCT,
    axes: BeamAxes,
    isocenter_mm: tuple[float, float, float],
    positions_mm: np.ndarray,
    block_shape: tuple[int, int, int] = BLOCK_SHAPE,
    voxel_mm: tuple[float, float, float] = VOXEL_MM,
    pad: int = 0,
) -> BeamGrid:
    """The grid of a beam whose spots sit at IEC ``positions_mm`` (n, 2) ``(X, Y)``; see the module docstring.
    ``pad`` extra voxels on each lateral side hold dose spots put beyond their blocks (:mod:`dota.plan.halo`)."""
    pos = np.asarray(positions_mm, dtype=np.float64).reshape(-1, 2)
    if pos.size == 0:
        raise InputError("a beam needs at least one spot to build its grid")
    length, height, width = block_shape
    dd, dr, dc = (float(v) for v in voxel_mm)
    iso = np.asarray(isocenter_mm, dtype=np.float64)
    rot = np.stack([axes.direction, axes.y_axis, axes.x_axis])
    # Lateral lattice: block row 0 of a spot at Y sits at grid row Y/dr - (H-1)/2 - a, a = offset of the grid.
    q_r = pos[:, 1] / dr - (height - 1) / 2.0
    q_c = pos[:, 0] / dc - (width - 1) / 2.0
    pad = int(pad)
    a_r = _lattice_phase(q_r) + np.floor(q_r.min() - _lattice_phase(q_r)) - 1.0 - pad
    a_c = _lattice_phase(q_c) + np.floor(q_c.min() - _lattice_phase(q_c)) - 1.0 - pad
    n_r = int(np.ceil(q_r.max() - a_r + 0.5)) + height + 2 + pad
    n_c = int(np.ceil(q_c.max() - a_c + 0.5)) + width + 2 + pad
    # Depth: the CT's whole extent along the beam.
    s = (ct.corners_mm() - iso) @ axes.direction
    s_lo = float(s.min()) - dd
    n_p = int(np.ceil((float(s.max()) - s_lo) / dd)) + 1
    origin = iso + (s_lo + 0.5 * dd) * axes.direction + a_r * dr * axes.y_axis + a_c * dc * axes.x_axis
    return BeamGrid(origin_mm=origin, axes=rot, shape=(n_p, n_r, n_c), voxel_mm=(dd, dr, dc), isocenter_mm=iso)


def _ct_index_map(ct: PatientCT, grid: BeamGrid) -> tuple[np.ndarray, np.ndarray]:
    """``(M, b)`` with CT continuous index (k, j, i) = M @ (p, r, c) + b for grid indices."""
    a = ct.affine()
    inv = np.linalg.inv(a[:3, :3])
    m = inv @ (grid.axes.T * np.asarray(grid.voxel_mm))
    b = inv @ (grid.origin_mm - a[:3, 3])
    return m, b


def resample_ct_to_grid(ct: PatientCT, grid: BeamGrid) -> np.ndarray:
    """HU on the beam grid (P, R, C) float32: trilinear interpolation of the CT, air (-1000 HU) outside it."""
    m, b = _ct_index_map(ct, grid)
    n_p, n_r, n_c = grid.shape
    out = np.empty(grid.shape, dtype=np.float32)
    rr, cc = np.meshgrid(np.arange(n_r, dtype=np.float64), np.arange(n_c, dtype=np.float64), indexing="ij")
    lateral = m[:, 1:2] * rr.reshape(1, -1) + m[:, 2:3] * cc.reshape(1, -1) + b[:, None]  # (3, R*C)
    hu = ct.hu.astype(np.float32, copy=False)
    step = max(1, _CHUNK_POINTS // (n_r * n_c))
    for p0 in range(0, n_p, step):
        ps = np.arange(p0, min(n_p, p0 + step), dtype=np.float64)
        coords = lateral[:, None, :] + m[:, 0][:, None, None] * ps[None, :, None]
        vals = ndimage.map_coordinates(hu, coords.reshape(3, -1), order=1, mode="grid-constant", cval=HU_AIR,
                                       prefilter=False)
        out[p0:p0 + len(ps)] = vals.reshape(len(ps), n_r, n_c)
    return out


def first_body_slice(hu_grid: np.ndarray, threshold_hu: float = BODY_THRESHOLD_HU) -> np.ndarray:
    """Per (row, col) of the grid, the first depth index with HU above ``threshold_hu`` (P where none)."""
    body = hu_grid > threshold_hu
    first = np.argmax(body, axis=0)
    first[~body.any(axis=0)] = hu_grid.shape[0]
    return first


@dataclass(frozen=True)
class SpotWindow:
    """Where a spot's block lies in the beam grid: first depth slice, first row and column (integers),
    and the sub-voxel residual (rows, cols, in voxels, each in [-0.5, 0.5]) of the spot's true axis."""

    p0: int
    r0: int
    c0: int
    residual: tuple[float, float]


def spot_windows(grid: BeamGrid, first_body: np.ndarray, positions_mm: np.ndarray,
                 block_shape: tuple[int, int, int] = BLOCK_SHAPE) -> list[SpotWindow | None]:
    """The window of each spot in the grid (None where the window holds no body: the spot misses the patient)."""
    _, height, width = block_shape
    rc = grid.spot_rc(positions_mm)
    out: list[SpotWindow | None] = []
    for row, col in rc:
        q_r, q_c = row - (height - 1) / 2.0, col - (width - 1) / 2.0
        r0, c0 = int(np.rint(q_r)), int(np.rint(q_c))
        if r0 < 1 or c0 < 1 or r0 + height + 1 > grid.shape[1] or c0 + width + 1 > grid.shape[2]:
            raise InputError(f"spot window ({r0}, {c0}) outside its beam grid {grid.shape}")
        first = int(first_body[r0:r0 + height, c0:c0 + width].min())
        if first >= grid.shape[0]:
            out.append(None)
            continue
        res = tuple(0.0 if abs(x) < 1e-6 else float(x) for x in (q_r - r0, q_c - c0))
        out.append(SpotWindow(max(0, first - 1), r0, c0, res))  # type: ignore[arg-type]
    return out


def shift_runs(shifts: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Runs ``(start, stop, rows, cols)`` of block slices sharing one integer lateral shift ((L, 2) ints)."""
    shifts = np.asarray(shifts, dtype=np.int64)
    change = np.nonzero(np.any(np.diff(shifts, axis=0) != 0, axis=1))[0] + 1
    bounds = np.concatenate([[0], change, [len(shifts)]])
    return [(int(a), int(b), int(shifts[a, 0]), int(shifts[a, 1])) for a, b in zip(bounds[:-1], bounds[1:])]


def cut_block(hu_grid: np.ndarray, window: SpotWindow, block_shape: tuple[int, int, int] = BLOCK_SHAPE,
              shifts: np.ndarray | None = None) -> np.ndarray:
    """The spot's (L, H, W) HU block from the beam grid, air beyond the grid's end. ``shifts`` (L, 2) integer
    (rows, cols) offsets per slice shear the block onto a diverging ray (:func:`dota.plan.dose.compute_plan_dose`)."""
    length, height, width = block_shape
    if shifts is None:
        shifts = np.zeros((length, 2), dtype=np.int64)
    block = np.full(block_shape, HU_AIR, dtype=np.float32)
    for a, b, dr, dc in shift_runs(shifts):
        a_g, b_g = window.p0 + a, min(window.p0 + b, hu_grid.shape[0])
        if b_g <= a_g:
            break
        r0, c0 = window.r0 + dr, window.c0 + dc
        if r0 < 0 or c0 < 0 or r0 + height > hu_grid.shape[1] or c0 + width > hu_grid.shape[2]:
            raise InputError(f"sheared block ({r0}, {c0}) outside its beam grid {hu_grid.shape}: "
                             "the grid needs a wider lateral pad")
        block[a:a + b_g - a_g] = hu_grid[a_g:b_g, r0:r0 + height, c0:c0 + width]
    return block


def splat_window(block_dose: np.ndarray, residual: tuple[float, float]) -> tuple[np.ndarray, int, int]:
    """A (L, H+1, W+1) array holding ``block_dose`` (L, H, W) shifted laterally by ``residual`` voxels with
    bilinear weights (sum kept), and the (row, col) offset of its first element from the block's origin
    (0 or -1)."""
    length, height, width = block_dose.shape
    out = np.zeros((length, height + 1, width + 1), dtype=np.float64)
    dr, dc = residual
    r_off, c_off = (-1 if dr < 0 else 0), (-1 if dc < 0 else 0)
    fr, fc = abs(dr), abs(dc)
    # element h of the block goes to h + dr: with dr >= 0 to h (1-fr) and h+1 (fr); with dr < 0 to h-1 (fr), h (1-fr)
    rs = (0, 1) if dr >= 0 else (1, 0)
    cs = (0, 1) if dc >= 0 else (1, 0)
    for (ri, wr) in ((rs[0], 1 - fr), (rs[1], fr)):
        if wr == 0:
            continue
        for (ci, wc) in ((cs[0], 1 - fc), (cs[1], fc)):
            if wc == 0:
                continue
            out[:, ri:ri + height, ci:ci + width] += (wr * wc) * block_dose
    return out, r_off, c_off


def sheared_splat(block_dose: np.ndarray, window: SpotWindow, shifts: np.ndarray
                  ) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """A sheared block's slices splatted bilinearly to their positions: the (L, H+1, W+1) patch and its runs
    ``(start, stop, row, col)``: slices ``start:stop`` of the patch go to grid rows/cols from
    ``window.r0 + row`` / ``window.c0 + col``. ``shifts`` (L, 2): each slice's axis offset (voxels) from the
    window's, the window's own residual added here."""
    total = np.asarray(shifts, dtype=np.float64)[: len(block_dose)] + np.asarray(window.residual)[None, :]
    whole = np.floor(total).astype(np.int64)
    frac = total - whole
    length, height, width = block_dose.shape
    fr, fc = frac[:, 0][:, None, None], frac[:, 1][:, None, None]
    patch = np.zeros((length, height + 1, width + 1), dtype=np.float64)
    patch[:, :height, :width] += (1 - fr) * (1 - fc) * block_dose
    patch[:, 1:, :width] += fr * (1 - fc) * block_dose
    patch[:, :height, 1:] += (1 - fr) * fc * block_dose
    patch[:, 1:, 1:] += fr * fc * block_dose
    return patch, shift_runs(whole)


def deposit_window(dose_grid: np.ndarray, window: SpotWindow, block_dose: np.ndarray,
                   shifts: np.ndarray | None = None) -> None:
    """Add a spot's (L, H, W) dose block into the beam grid at its window (splatted to its true axis).
    ``shifts`` (L, 2): lateral offsets (voxels, rows and cols) of each slice's axis from the window's, for a
    block sheared onto a diverging ray; each slice is splatted bilinearly to its own position."""
    if shifts is not None and np.any(shifts):
        patch, runs = sheared_splat(block_dose, window, shifts)
        for a, b, dr, dc in runs:
            deposit_patch(dose_grid, window.p0 + a, window.r0 + dr, window.c0 + dc, patch[a:b])
        return
    patch, r_off, c_off = splat_window(block_dose, window.residual)
    deposit_patch(dose_grid, window.p0, window.r0 + r_off, window.c0 + c_off, patch)


def deposit_patch(dose_grid: np.ndarray, p0: int, r0: int, c0: int, patch: np.ndarray) -> float:
    """Add ``patch`` (L, R, C) into the beam grid with its first element at ``(p0, r0, c0)`` (clipped to the grid);
    returns the sum added."""
    depth = min(patch.shape[0], dose_grid.shape[0] - p0)
    r_lo, c_lo = max(0, -r0), max(0, -c0)
    r_hi = min(patch.shape[1], dose_grid.shape[1] - r0)
    c_hi = min(patch.shape[2], dose_grid.shape[2] - c0)
    if depth <= 0 or r_hi <= r_lo or c_hi <= c_lo:
        return 0.0
    part = patch[:depth, r_lo:r_hi, c_lo:c_hi]
    dose_grid[p0:p0 + depth, r0 + r_lo:r0 + r_hi, c0 + c_lo:c0 + c_hi] += part
    return float(part.sum())


def supersample_offsets(ct: PatientCT, voxel_mm: tuple[float, float, float] = VOXEL_MM,
                        factor: int | None = None) -> np.ndarray:
    """Sub-point offsets (S, 3) in CT index units (k, j, i): ``ceil(spacing / min(voxel_mm))`` per axis
    (or ``factor`` per axis), evenly inside the voxel."""
    step = min(float(v) for v in voxel_mm)
    grids = []
    for s in ct.spacing_mm:
        n = int(factor) if factor is not None else max(1, int(np.ceil(float(s) / step - 1e-6)))
        grids.append((np.arange(n) + 0.5) / n - 0.5)
    mesh = np.meshgrid(*grids, indexing="ij")
    return np.stack([g.reshape(-1) for g in mesh], axis=1)


def _touches(coords: np.ndarray, shape: np.ndarray) -> np.ndarray:
    """Voxels (M,) with at least one sub-point (coords (S, 3, M)) whose trilinear support meets the grid."""
    in_range = (coords > -1) & (coords < shape[None, :, None])
    return np.any(np.all(in_range, axis=1), axis=0)


class GridToCT:
    """Carries dose from one beam grid into the CT grid (trilinear, sub-point averaged; module docstring)."""

    def __init__(self, ct: PatientCT, grid: BeamGrid, supersample: int | None = None) -> None:
        self.ct = ct
        self.grid = grid
        self.offsets = supersample_offsets(ct, grid.voxel_mm, supersample)
        m, b = _ct_index_map(ct, grid)
        self.to_grid = np.linalg.inv(m)  # grid index = to_grid @ (kji - b)
        self.b = b
        self.m = m

    def ct_box(self, lo_prc: np.ndarray, hi_prc: np.ndarray) -> tuple[slice, slice, slice] | None:
        """The CT index box (slices) covering the grid-index box ``[lo, hi]`` (inclusive corners), or None."""
        corners = np.array([[a, b, c] for a in (lo_prc[0], hi_prc[0]) for b in (lo_prc[1], hi_prc[1])
                            for c in (lo_prc[2], hi_prc[2])], dtype=np.float64)
        kji = corners @ self.m.T + self.b
        lo = np.floor(kji.min(axis=0) - 1).astype(int)
        hi = np.ceil(kji.max(axis=0) + 1).astype(int) + 1
        lo = np.maximum(lo, 0)
        hi = np.minimum(hi, np.asarray(self.ct.shape))
        if np.any(hi <= lo):
            return None
        return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))  # type: ignore[return-value]

    def _coords(self, box: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray]:
        """Grid coordinates (S, 3, M) of the sub-points of every CT voxel in ``box``, and their flat indices (M,)."""
        k, j, i = (np.arange(s.start, s.stop) for s in box)
        kk, jj, ii = np.meshgrid(k, j, i, indexing="ij")
        kji = np.stack([kk.reshape(-1), jj.reshape(-1), ii.reshape(-1)]).astype(np.float64)  # (3, M)
        flat = np.ravel_multi_index((kk.reshape(-1), jj.reshape(-1), ii.reshape(-1)), self.ct.shape)
        base = self.to_grid @ (kji - self.b[:, None])
        shifts = self.offsets @ self.to_grid.T  # (S, 3)
        return base[None] + shifts[:, :, None], flat

    def carry(self, dose_grid: np.ndarray, out: np.ndarray) -> None:
        """Add the CT-grid dose of ``dose_grid`` (the beam grid's shape) into ``out`` (the CT's shape)."""
        nz = np.nonzero(np.any(dose_grid != 0, axis=(1, 2)))[0]
        if nz.size == 0:
            return
        rows = np.nonzero(np.any(dose_grid != 0, axis=(0, 2)))[0]
        cols = np.nonzero(np.any(dose_grid != 0, axis=(0, 1)))[0]
        lo = np.array([nz[0] - 1, rows[0] - 1, cols[0] - 1], dtype=np.float64)
        hi = np.array([nz[-1] + 1, rows[-1] + 1, cols[-1] + 1], dtype=np.float64)
        box = self.ct_box(lo, hi)
        if box is None:
            return
        src = dose_grid.astype(np.float64, copy=False)
        n_sub = len(self.offsets)
        ks = box[0]
        per_slice = (box[1].stop - box[1].start) * (box[2].stop - box[2].start) * n_sub
        step = max(1, _CHUNK_POINTS // max(1, per_slice))
        flat_out = out.reshape(-1)
        for k0 in range(ks.start, ks.stop, step):
            sub = (slice(k0, min(ks.stop, k0 + step)), box[1], box[2])
            coords, flat = self._coords(sub)
            inside = _touches(coords, np.asarray(dose_grid.shape, dtype=np.float64))
            if not inside.any():
                continue
            c = coords[:, :, inside]
            vals = ndimage.map_coordinates(src, c.transpose(1, 0, 2).reshape(3, -1), order=1, mode="grid-constant",
                                           cval=0.0, prefilter=False).reshape(n_sub, -1).mean(axis=0)
            flat_out[flat[inside]] += vals.astype(out.dtype)

    def window_sampler(self, window: SpotWindow, block_shape: tuple[int, int, int] = BLOCK_SHAPE,
                       depth: int | None = None, shifts: np.ndarray | None = None) -> WindowSampler:
        """A sampler carrying dose blocks of one spot window into CT voxels (for dose-influence matrices).

        ``depth`` (slices) limits it to the first slices of the block, where the blocks it will carry have dose;
        ``shifts`` (L, 2) shear it as :func:`deposit_window` does."""
        length, height, width = block_shape
        if depth is not None:
            length = max(1, min(length, int(depth)))
        length = min(length, self.grid.shape[0] - window.p0)
        if shifts is not None and np.any(shifts):
            shifts = np.asarray(shifts, dtype=np.float64)[:length]
            whole = np.floor(shifts + np.asarray(window.residual)[None, :]).astype(np.int64)
            lo = whole.min(axis=0)
            start = np.array([window.p0, window.r0 + lo[0], window.c0 + lo[1]], dtype=np.float64)
            size = np.array([length, whole[:, 0].max() - lo[0] + height + 1, whole[:, 1].max() - lo[1] + width + 1],
                            dtype=np.float64)
        else:
            shifts, lo = None, None
            r_off = -1 if window.residual[0] < 0 else 0
            c_off = -1 if window.residual[1] < 0 else 0
            start = np.array([window.p0, window.r0 + r_off, window.c0 + c_off], dtype=np.float64)
            size = np.array([length, height + 1, width + 1], dtype=np.float64)
        box = self.ct_box(start - 1, start + size)
        if box is None:
            return WindowSampler(window, np.zeros((len(self.offsets), 3, 0)), np.zeros(0, dtype=np.int64), size)
        coords, flat = self._coords(box)
        coords -= start[None, :, None]
        inside = _touches(coords, size)
        return WindowSampler(window, coords[:, :, inside], flat[inside], size, shifts, lo)


@dataclass
class WindowSampler:
    """CT voxels (flat indices) near one spot window and their sub-point coordinates in the window."""

    window: SpotWindow
    coords: np.ndarray  # (S, 3, M) in window (splatted patch) index units
    flat_index: np.ndarray  # (M,)
    size: np.ndarray
    shifts: np.ndarray | None = None  # (L, 2) of a sheared block
    corner: np.ndarray | None = None  # the sheared patch's lowest (row, col) run offset

    def sample(self, block_dose: np.ndarray) -> np.ndarray:
        """CT-voxel dose (M,) of one (L, H, W) dose block at this window: the same numbers
        :meth:`GridToCT.carry` gives for that block alone."""
        if self.flat_index.size == 0:
            return np.zeros(0)
        # slices beyond size[0] lie past the beam grid's end (dropped, as in carry) or, when the sampler was
        # built with a depth limit, hold no dose
        block = block_dose[: int(self.size[0])]
        if self.shifts is None:
            patch, _, _ = splat_window(block, self.window.residual)
        else:
            parts, runs = sheared_splat(block, self.window, self.shifts)
            patch = np.zeros(tuple(int(v) for v in self.size), dtype=np.float64)
            for a, b, dr, dc in runs:
                r, c = dr - int(self.corner[0]), dc - int(self.corner[1])
                patch[a:b, r:r + parts.shape[1], c:c + parts.shape[2]] = parts[a:b]
        n_sub = self.coords.shape[0]
        vals = ndimage.map_coordinates(patch, self.coords.transpose(1, 0, 2).reshape(3, -1), order=1,
                                       mode="grid-constant", cval=0.0, prefilter=False)
        return vals.reshape(n_sub, -1).mean(axis=0)
