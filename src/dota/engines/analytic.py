"""Analytic pencil-beam dose engine: the fast baseline (the paper's 'pencil-beam algorithm') and the
data source for tests and the demo.

This is an analytic approximation, not ground truth: Monte Carlo (``get_engine("mcsquare")``) is.
It is physically reasonable and fast (a few milliseconds per beamlet on one core):

- HU -> relative stopping power with :func:`dota.physics.hu_to_rsp` (table ``HU_CALIBRATION_NAME``);
- the spot (Gaussian, :func:`dota.physics.spot_sigma_mm`) is split into sub-pencils, one per lateral
  column of the block, weighted by a Gaussian so that, with each sub-pencil's own initial width of
  about one voxel, they add up to the spot; columns with a weight below 1e-5 of the largest are skipped;
- each sub-pencil follows its own column: its water-equivalent depth (WED) gives its depth dose, the
  Bortfeld Bragg curve in water with range straggling and energy spread
  (:func:`dota.physics.water_depth_dose`), averaged exactly over each voxel's WED interval; a bone slab
  beside the axis therefore pulls back the range of only that part of the spot;
- each sub-pencil spreads laterally with its own multiple-Coulomb-scattering width, Fermi-Eyges with
  Highland's scattering power on its column's WED and geometric lever arms
  (:func:`dota.physics.mcs_sigma_mm`), integrated exactly over each voxel's lateral extent.

Dose to water in Gy per 1e9 primaries: ``fluence x integral depth dose (MeV cm^2/g)``, with
1 MeV/g = 1.602e-10 Gy. What it leaves out: the nuclear halo (dose carried far from the axis by
secondaries; its energy is counted locally), the beam's low-intensity halo, scattering that differs
between materials of the same WED, lateral transport of range differences beyond one sub-pencil
(edge-scatter effects behind sharp interfaces are smoothed), and anything below ~1e-8 of the peak.

Computation. The physics above is evaluated with the same floating-point operations as engine
version 1.0, only less of it and in fewer passes, with one change of numbers (version 1.1): erfc below
:data:`ERFC_TAIL` (1e-15) is taken as 0. Otherwise the doses are the old float32 numbers bit for bit
(``bit_identical=False``: within 1e-6 of each beamlet's maximum; tests against the old engine, kept in
``tests/engines/analytic_reference.py``, which cuts erfc at the same argument for the comparison and
without the cut is within 1e-12 of the maximum):

- per geometry (a plan sends each spot's block once per energy layer, consecutively; a repeat is
  recognised with ``np.array_equal`` against the previous block): RSP (a lookup table of
  :func:`dota.physics.hu_to_rsp` for whole CT numbers), WED steps and their prefix sums, WED at voxel
  entries, exits and centres, Highland's log factor (:class:`_Columns`); per energy: the sub-pencils
  and their weights (:class:`_SubPencils`, shared by engines);
- the depth dose is averaged only over the voxels that start within the curve (the others are exactly
  0); the MCS width is computed down to each column's reach (columns of air beside the body that carry
  the beam to the end of the block apart, :func:`_mcs_at`), with its three moments in one prefix sum;
- the lateral profiles (:func:`_lattice_profile_rows`, square voxels; :func:`_general_profile_rows`
  otherwise) are computed only for (depth, sub-pencil) rows with weight, erfc only where it is at least
  :data:`ERFC_TAIL` (below it, the tails had been float32 subnormals, which made the sums 20-40x slower)
  and only up to the farthest voxel, and read from a table of mirrored differences by
  ``torch.index_select`` on sliding windows instead of gathers;
- with ``bit_identical=False``, ``torch.bmm`` sums the deeper groups of depth slices over the
  sub-pencils that still reach them only (:func:`_depth_groups`).

Speed (2-core AMD EPYC VM, another job on the other core, 1 torch thread; the 1,908 spot-energy blocks of
the head-and-neck plan, 150 x 24 x 24 voxels of 2 mm, the ``dota`` spot, in plan order and calls of 64
blocks; old and new interleaved call by call, medians of 7 repeats, ranges in brackets): engine 1.0
13.0 [12.4-13.7] ms per beamlet, now 7.5 [7.1-8.4] ms, 1.71x [1.60-1.76], bit-identical; with
``bit_identical=False`` 7.0 [6.4-7.6] ms, 1.86x [1.80-1.95], at most 8.9e-7 of the beamlet's maximum
(1.3e-6 Gy per 1e9 protons) from the old doses. On a later, slower day (AVX-512 VM, session 13) the
plan's blocks took 21.8 ms per beamlet in a one-process plan under cProfile, 12.3 ms of it ``torch.bmm``
at 6 GFLOP/s: the subnormal erfc tails. Cut at :data:`ERFC_TAIL` (version 1.1): 7.5 ms, ``torch.bmm``
0.7 ms (the same call on the same inputs 12.4 ms as it was, 0.31 ms with subnormals flushed).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import numpy as np
import torch

from dota.constants import ENGINE_ENERGY_RANGE_MEV, PRIMARIES_UNIT, VOXEL_MM
from dota.engines.base import DoseEngine
from dota.errors import InputError
from dota.physics.bragg import GY_PER_MEV_PER_G, WaterDepthDose, water_depth_dose
from dota.physics.depth import check_voxel_mm
from dota.physics.hu import HU_CALIBRATION_NAME, hu_to_rsp
from dota.physics.lateral import (
    mcs_log_factor,
    mcs_sigma_from_wed_mm,
    prefix_sum,
    spot_sigma_mm,
)
from dota.validation import check_beamlets

#: Sub-pencils whose spot weight is below this fraction of the largest are skipped.
SUBPENCIL_WEIGHT_CUTOFF: float = 1e-5

# MeV cm^2/g per proton times 1/mm^2 -> Gy per 1e9 protons
_GY_PER_1E9 = 100.0 * GY_PER_MEV_PER_G * PRIMARIES_UNIT


def _lattice_weights(count: int, spacing_mm: float, sigma_mm: float) -> np.ndarray:
    """Gaussian weights of ``count`` lattice points centred on the axis, normalised over the infinite lattice
    (so that weight falling outside the block is lost, not redistributed)."""
    pad = int(math.ceil(12.0 * sigma_mm / spacing_mm)) + 1
    positions = (np.arange(-pad, count + pad) - (count - 1) / 2.0) * spacing_mm
    weights = np.exp(-0.5 * (positions / sigma_mm) ** 2)
    return weights[pad : pad + count] / weights.sum()


_ERFC_ZERO_FROM: list[float] = []


def _erfc_zero_from() -> float:
    """The smallest float32 ``z`` with ``torch.erfc(x) == 0`` for every float32 ``x >= z``, as this torch
    computes it (erfc(10.05) is half the smallest float32 denormal): every float32 in [10, 10.25] is
    evaluated (torch 2.13 on AVX-512 gives 10.054195), and a dense grid from 10.25 to 1e6 and infinity must
    give 0 too, else infinity (then nothing is skipped). Measured once per process (10-20 ms). The engine
    does not evaluate erfc from there on: the values are exactly 0, and erfc is 5-8x slower there (its
    underflow path) than anywhere else, infinity included."""
    if not _ERFC_ZERO_FROM:
        lo, hi = np.float32(10.0).view(np.int32), np.float32(10.25).view(np.int32)
        scan = torch.from_numpy(np.arange(lo, hi + 1, dtype=np.int32).view(np.float32))
        beyond = torch.cat([torch.linspace(10.25, 12.5, 1 << 14, dtype=torch.float64),
                            torch.logspace(math.log10(12.5), 6.0, 1 << 12, dtype=torch.float64),
                            torch.tensor([math.inf], dtype=torch.float64)]).float()
        nonzero = scan[torch.erfc(scan) != 0]
        zero_from = math.inf
        if bool((torch.erfc(beyond) == 0).all()) and nonzero.numel() and float(nonzero.max()) < 10.25:
            zero_from = float(np.nextafter(np.float32(nonzero.max()), np.float32(np.inf)))
        _ERFC_ZERO_FROM.append(zero_from)
    return _ERFC_ZERO_FROM[0]


#: The engine takes erfc as 0 below this value (version 1.1): a sub-pencil's lateral profile then ends about
#: 8 of its sigmas from its centre instead of 14 (where float32 erfc underflows), losing at most 1e-15 of
#: itself (float32 resolves 6e-8 of a value). What it buys: the tails below 1e-15 were float32 subnormals
#: (under 1.2e-38) or multiplied into them, and x86 processors handle subnormal operands and results in
#: microcode, 20-40x slower: ``torch.bmm`` over a plan's profiles took 12-18 ms per beamlet with them,
#: 0.3-0.9 ms without (2 % of the entries had been subnormal). A head-and-neck beam's dose (maximum 2.46 Gy)
#: changed by 1.8e-15 Gy, 7e-16 of its maximum; tests bound the change at 1e-12 of each beamlet's maximum.
ERFC_TAIL: float = 1e-15

_ERFC_TAIL_FROM: list[float] = []


def _erfc_tail_from() -> float:
    """The float32 argument from which the engine takes erfc as 0: the smallest float32 ``z`` with
    ``erfc(z) < ERFC_TAIL`` in float64 (``math.erfc``; 5.6758), or :func:`_erfc_zero_from` if that is
    smaller. Arguments are float32, so this is where every float32 erfc the engine evaluates is at least
    ``ERFC_TAIL`` (to float32 rounding of erfc near there)."""
    if not _ERFC_TAIL_FROM:
        lo, hi = 0.0, 30.0
        for _ in range(200):  # bisection for erfc(x) = ERFC_TAIL in float64
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if math.erfc(mid) >= ERFC_TAIL else (lo, mid)
        z = np.float32(hi)
        while math.erfc(float(np.nextafter(z, np.float32(0)))) < ERFC_TAIL:
            z = np.nextafter(z, np.float32(0))
        while math.erfc(float(z)) >= ERFC_TAIL:
            z = np.nextafter(z, np.float32(np.inf))
        _ERFC_TAIL_FROM.append(min(float(z), _erfc_zero_from()))
    return _ERFC_TAIL_FROM[0]


def _lateral_profiles(centre_mm: np.ndarray, sigma_mm: np.ndarray, count: int, spacing_mm: float) -> torch.Tensor:
    """Gaussian density (1/mm) averaged over each of ``count`` voxels: (K,) centres, (D, K) widths ->
    (D, K, count) float32.

    The voxel integral is a difference of complementary error functions taken on the side of the
    Gaussian where both are small, so float32 keeps its relative precision in both tails: with
    ``u = erfc(|t|)`` at each voxel edge ``t``, a voxel right of the centre is ``u_lo - u_hi``, one left
    of it ``u_hi - u_lo``, and the voxel holding the centre ``2 - u_lo - u_hi``. Which case a voxel is
    does not depend on the width, so it is decided once per (sub-pencil, voxel); erfc is evaluated once
    per edge (not twice per voxel). float32 erfc in torch is about 20x faster than scipy's float64
    ``ndtr``; this function was 70 % of the engine's time, and evaluating each edge once made it 2.2x
    faster with the same results (bit-identical for centres on the voxel lattice at 2 mm, as the engine
    calls it; within 1 ulp otherwise; tests). The engine calls :func:`_lateral_profile_rows`, the same
    numbers for the (depth, sub-pencil) rows it needs."""
    depth, k = sigma_mm.shape
    scale = torch.from_numpy(1.0 / (math.sqrt(2.0) * sigma_mm)).float().reshape(-1)
    rows_k = torch.arange(k).repeat(depth)
    return _lateral_profile_rows(centre_mm, scale, rows_k, count, spacing_mm).view(depth, k, count)


def _lateral_profile_rows(centre_mm: np.ndarray, scale: torch.Tensor, sub_pencil: torch.Tensor, count: int,
                          spacing_mm: float) -> torch.Tensor:
    """:func:`_lateral_profiles` for chosen rows: row ``j`` is sub-pencil ``sub_pencil[j]`` (centre
    ``centre_mm[sub_pencil[j]]``) with ``scale[j] = float32(1 / (sqrt 2 sigma))``; (rows, count) float32.
    The same operations element by element, so the same numbers; erfc arguments from
    :func:`_erfc_tail_from` on are taken as infinity (erfc is 0 there: :data:`ERFC_TAIL`)."""
    edges = torch.from_numpy((np.arange(count + 1) - count / 2.0) * spacing_mm).float()
    offset = edges[None, :] - torch.from_numpy(np.array(centre_mm, dtype=np.float64)).float()[:, None]  # (K, count+1)
    x = offset.index_select(0, sub_pencil).mul_(scale[:, None]).abs_()
    u = torch.erfc_(x.masked_fill_(x >= _erfc_tail_from(), math.inf))  # 0 there (ERFC_TAIL)
    lo, hi = u[:, :-1], u[:, 1:]
    right = (offset[:, :-1] >= 0).float()  # both edges right of the centre
    left = (offset[:, 1:] <= 0).float()  # both edges left of it
    across = 1.0 - right - left  # the voxel holding the centre
    out = (lo - hi).mul_((right - left).index_select(0, sub_pencil))
    out.add_(across.index_select(0, sub_pencil) * (2.0 - lo - hi))
    return out.mul_(0.5 / spacing_mm)


def _lattice_profiles(idx_r: np.ndarray, idx_c: np.ndarray, sigma_mm: np.ndarray, rows: int, cols: int,
                      spacing_mm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_lateral_profiles` along rows and along columns at once, for sub-pencils centred on voxel
    centres (rows ``idx_r``, columns ``idx_c``) with one width for both axes (square voxels, round
    sub-pencils): the same numbers with half the erfc evaluations.

    Voxel ``j`` of a sub-pencil at voxel ``i`` has its edges at ``(q -+ 0.5) * spacing`` from the centre,
    ``q = j - i``, so both profiles are drawn from ``U[m] = erfc((m + 0.5) * spacing / (sqrt 2 sigma))``,
    ``m = 0 .. max(rows, cols) - 1``: ``V[0] = 2 - U[0] - U[0]`` (the centre's voxel), ``V[n] = U[n-1] - U[n]``,
    and the profile is ``V[|q|]`` (the operations of :func:`_lateral_profiles`, so the results are
    bit-identical; tests). This is :func:`_lattice_profile_rows` with every row kept and unit weights."""
    depth = sigma_mm.shape[0]
    ones = np.ones(sigma_mm.shape, dtype=np.float32)
    work = _Workspace()
    profiles = _lattice_profile_rows(idx_r, idx_c, ones, np.arange(ones.size), sigma_mm.reshape(-1), rows, cols,
                                     spacing_mm, work)
    return profiles.read(0, depth, None, work)


#: Rows of one erfc batch whose lengths differ by at most this many entries x rows share one length
#: (the longest): the cost of a padded entry against that of one more batch.
_BATCH_PAD_ENTRIES = 8000


def _lattice_profile_rows(idx_r: np.ndarray, idx_c: np.ndarray, weight: np.ndarray, kept: np.ndarray,
                          sigma_kept_mm: np.ndarray, rows: int, cols: int, spacing_mm: float,
                          work: _Workspace | None = None) -> _Profiles:
    """The engine's lateral profiles on the voxel lattice (square voxels, round sub-pencils), as a
    :class:`_Profiles` that reads ``(weight x profile along rows, profile along columns)`` for any depth
    slices and sub-pencils; ``weight`` (D, K) float32, ``kept`` its rows ``d*K + k`` that are not 0 and
    ``sigma_kept_mm`` their widths.

    The numbers of the old engine (erfc table ``U`` for every row, differences ``V``, two ``torch.gather``,
    then ``profile_y * weight``; :func:`_lattice_profiles`), bit for bit (tests), with less work:

    - a row whose weight is 0 (beyond its sub-pencil's range: a third to half of the rows of a plan) is not
      computed: it reads a zero row, so its weighted profile is 0 and it adds exactly zeros to the dose, as
      before (the profile along columns of such a row only ever multiplies that 0);
    - of the others, ``U[m]`` is evaluated only up to the farthest voxel the sub-pencil reaches in the block
      and only below the argument from which the engine takes erfc as 0 (:func:`_erfc_tail_from`): the
      entries left out are 0 or not used; arguments from there on inside the evaluated entries are set to
      infinity, so every erfc below :data:`ERFC_TAIL` is 0, as in a full table cut at that argument. Rows
      are sorted by that length and evaluated in a few batches, each as long as its longest row, the
      padding set to infinity (erfc 0, and fast): a third of the old erfc evaluations are left, and none in
      erfc's slow underflow path (the old table had a sixth of its entries there, at 5-8x the cost);
    - the profiles are read from one table of the mirrored differences ``V[|q|]``, ``q = -(n-1) .. n-1``,
      a row per computed row and a zero row, with ``torch.index_select`` on its sliding windows (window
      start ``n - 1 - i`` for a sub-pencil at voxel ``i``): a row copy per profile row instead of gathers.
    """
    depth, k = weight.shape
    count = max(rows, cols)
    width = 2 * count - 1
    work = work if work is not None else _Workspace()
    weight = np.ascontiguousarray(weight, dtype=np.float32).reshape(-1)
    n_kept = kept.size
    s = (1.0 / (math.sqrt(2.0) * sigma_kept_mm)).astype(np.float32)
    # U[0 .. length-1] is needed: up to the farthest voxel, and below erfc's cut (at least U[0]: the
    # centre's voxel is 2 - 2 U[0] even where U[0] is 0)
    reach = np.maximum(np.maximum(idx_r, rows - 1 - idx_r), np.maximum(idx_c, cols - 1 - idx_c)) + 1
    half = _half_voxels(count, spacing_mm)
    # m from here on have float32(half[m] * s) >= tail_from: in exact arithmetic m >= q with (q + 0.5) *
    # spacing * s = tail_from; the 1e-6 margin covers the float32 roundings of half[m] and the product
    tail_from = _erfc_tail_from()
    q = tail_from / (spacing_mm * s.astype(np.float64)) - 0.5
    below_tail = np.ceil(np.clip(q * (1.0 + 1e-6) + 1e-6, 1.0, count))
    small = np.uint8 if count < 256 else np.int32  # (a stable sort of uint8 is a radix sort)
    length = np.minimum(below_tail.astype(small), np.tile(reach.astype(small), depth).take(kept))
    order = np.argsort(length, kind="stable")
    kept, s, length = kept[order], s[order], length[order]

    table = work.get("mirrored", (n_kept + 1) * width).view(n_kept + 1, width)
    s_t = torch.from_numpy(s)
    ends = np.flatnonzero(length[1:] != length[:-1]) + 1  # where the length changes
    bounds = [0, *ends.tolist(), n_kept]
    values = length[bounds[:-1]].tolist() if n_kept else []
    a = first_group = 0
    for j, c in enumerate(values):
        b = bounds[j + 1]
        if j + 1 < len(values) and (values[j + 1] - c) * (b - a) <= _BATCH_PAD_ENTRIES:
            continue  # pad these rows to the next length
        nb = b - a
        u = work.get("erfc", nb * c).view(nb, c)
        torch.mul(half[:c], s_t[a:b, None], out=u)
        u.masked_fill_(u >= tail_from, math.inf)  # the last entries of some rows (the float32 margin above)
        for g in range(first_group, j):  # rows padded to c: there erfc is exactly 0 (or not used), as at
            # infinity, where it is 5x faster than where it underflows
            u[bounds[g] - a : bounds[g + 1] - a, values[g] :] = math.inf
        torch.erfc_(u)
        first_group = j + 1
        n = min(c + 1, count)  # V[0 .. n-1]; V[c] = U[c-1] - U[c] with U[c] = 0
        v = work.get("differences", nb * n).view(nb, n)
        v[:, 0] = (2.0 - u[:, 0]) - u[:, 0]
        torch.sub(u[:, :-1], u[:, 1:], out=v[:, 1:c])
        if c < count:
            v[:, c] = u[:, c - 1]
        v.mul_(0.5 / spacing_mm)
        rows_ab = table[a:b]
        rows_ab[:, count - 1 : count - 1 + n] = v  # V[|q|] at column count - 1 + q
        rows_ab[:, count - n : count - 1] = v[:, 1:].flip(1)
        rows_ab[:, count - 1 + n :] = 0.0
        rows_ab[:, : count - n] = 0.0
        a = b
    table[n_kept] = 0.0

    slot = np.full(depth * k, n_kept, dtype=np.int64)
    slot[kept] = np.arange(n_kept)
    flat = table.view(-1)
    return _Profiles(flat.as_strided((flat.numel() - rows + 1, rows), (1, 1)),
                     flat.as_strided((flat.numel() - cols + 1, cols), (1, 1)),
                     slot.reshape(depth, k), width, count - 1 - idx_r, count - 1 - idx_c, weight.reshape(depth, k))


class _Profiles:
    """The lateral profiles of a beamlet's (depth, sub-pencil) rows, read on demand: row ``(d, k)`` of the
    profile along rows is row ``slot[d, k] * step + shift_y[k]`` of ``source_y`` times ``weight[d, k]``,
    along columns row ``slot[d, k] * step + shift_x[k]`` of ``source_x`` (rows whose weight is 0 read a
    zero row). The weighting is the old ``profile_y * weight``, element by element."""

    def __init__(self, source_y: torch.Tensor, source_x: torch.Tensor, slot: np.ndarray, step: int,
                 shift_y: np.ndarray, shift_x: np.ndarray, weight: np.ndarray) -> None:
        self.source_y, self.source_x, self.slot, self.step = source_y, source_x, slot, step
        self.shift_y, self.shift_x, self.weight = shift_y, shift_x, weight

    def read(self, d0: int, d1: int, sub_pencils: np.ndarray | None, work: _Workspace
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weight x profile along rows, profile along columns)`` of depths ``d0 .. d1-1`` and sub-pencils
        ``sub_pencils`` (ascending; None: all), (n, K', rows) and (n, K', cols) float32 in fresh-aligned
        scratch buffers (as torch allocates them: the layout ``torch.bmm`` got before)."""
        slot, weight = self.slot[d0:d1], self.weight[d0:d1]
        shift_y, shift_x = self.shift_y, self.shift_x
        if sub_pencils is not None:
            slot, weight = slot[:, sub_pencils], weight[:, sub_pencils]
            shift_y, shift_x = shift_y[sub_pencils], shift_x[sub_pencils]
        n, k = slot.shape
        first = slot * self.step
        out = []
        for name, source, shift in (("profile_y", self.source_y, shift_y), ("profile_x", self.source_x, shift_x)):
            width = source.shape[1]
            # slice d0 at the address (mod 64 bytes) it has in a fresh (D, K, width) tensor
            skip = d0 * k * width % 16
            buf = work.get(name, skip + n * k * width)[skip:].view(n * k, width)
            out.append(torch.index_select(source, 0, torch.from_numpy((first + shift).reshape(-1)), out=buf))
        out[0].mul_(torch.from_numpy(np.ascontiguousarray(weight).reshape(-1))[:, None])
        return out[0].view(n, k, -1), out[1].view(n, k, -1)


_HALF_VOXELS: dict[tuple[int, float], torch.Tensor] = {}


def _half_voxels(count: int, spacing_mm: float) -> torch.Tensor:
    """``float32((m + 0.5) * spacing)``, m = 0 .. count - 1: the voxel edges' distances from a voxel centre."""
    key = (count, spacing_mm)
    if key not in _HALF_VOXELS:
        _HALF_VOXELS[key] = torch.from_numpy((np.arange(count) + 0.5) * spacing_mm).float()
    return _HALF_VOXELS[key]


_LOCAL = threading.local()


def _thread_workspace() -> _Workspace:
    """This thread's :class:`_Workspace`, kept between calls: fresh buffers cost page faults on every call
    (4 % of the time with 32 beamlets a call). It holds the largest buffers a call needed, up to about
    35 MB for 150 x 24 x 24 blocks."""
    work = getattr(_LOCAL, "work", None)
    if work is None:
        work = _LOCAL.work = _Workspace()
    return work


class _Workspace:
    """Named scratch float32 buffers, reused from beamlet to beamlet (torch allocations: 64-byte aligned,
    as the fresh tensors the old engine handed to ``torch.bmm``; the profiles start at their beginning)."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, numel: int) -> torch.Tensor:
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel:
            grown = 0 if buf is None else buf.numel() + buf.numel() // 2
            buf = torch.empty(max(numel, grown, 1), dtype=torch.float32)
            self._buffers[name] = buf
        return buf[:numel]


#: Spot models: "dota" (one round Gaussian, :func:`dota.physics.spot_sigma_mm`) or "beam-model" (the
#: double-Gaussian, elliptical spot of the MCsquare beam model the Monte Carlo data use).
SPOT_MODELS: tuple[str, ...] = ("dota", "beam-model")


def beam_model_spot(energy_mev: float, upstream_mm: float = 0.0) -> list[tuple[float, float, float]]:
    """The MCsquare beam model's spot at the isocentre (the block entrance), or ``upstream_mm`` before it
    (negative: beyond it): ``[(weight, sigma_rows_mm, sigma_cols_mm)]`` for its core and halo Gaussians.

    Each Gaussian's parameters are interpolated linearly in nominal energy (as MCsquare does) and
    propagated through air from the nozzle exit: ``sigma^2 = s^2 + 2 rho s theta d + theta^2 d^2``
    (spot size s, divergence theta, correlation rho, distance d). The beam model's y axis (along the
    gantry axis) runs along block rows and its x axis along block columns, as in
    :class:`dota.engines.mcsquare.MCsquareEngine` (checked on Monte Carlo beamlets: rows are wider).
    """
    table, columns, distance = _beam_model_table()
    e = float(energy_mev)
    nominal = table[:, columns.index("NominalEnergy")]

    def col(name: str) -> float:
        return float(np.interp(e, nominal, table[:, columns.index(name)]))

    def sigma(axis: str, n: int) -> float:
        s, t, rho = col(f"SpotSize{n}{axis}"), col(f"Divergence{n}{axis}"), col(f"Correlation{n}{axis}")
        d = distance - float(upstream_mm)
        return math.sqrt(max(s * s + 2.0 * rho * s * t * d + (t * d) ** 2, 0.0))

    w1 = col("Weight1")
    return [(w1, sigma("y", 1), sigma("x", 1)), (1.0 - w1, sigma("y", 2), sigma("x", 2))]


_BEAM_MODEL_CACHE: list = []


def _beam_model_table() -> tuple[np.ndarray, tuple[str, ...], float]:
    if not _BEAM_MODEL_CACHE:
        import re

        from dota.engines.mcsquare import beam_model_path, read_beam_model

        bm = read_beam_model(beam_model_path())
        found = re.search(r"Nozzle exit to Isocenter distance\s+([0-9.]+)", bm.header)
        if not found:
            raise InputError(f"{beam_model_path()} does not give the nozzle-to-isocentre distance")
        _BEAM_MODEL_CACHE.append((bm.table, bm.columns, float(found.group(1))))
    return _BEAM_MODEL_CACHE[0]


def beam_model_source_axis_mm() -> tuple[float, float]:
    """The beam model's virtual source to isocentre distances (rows: its y, "SMY"; columns: its x, "SMX"), mm:
    where the scanning magnets deflect the beam, so spots fan out from there."""
    import re

    from dota.engines.mcsquare import beam_model_path, read_beam_model

    header = read_beam_model(beam_model_path()).header
    out = []
    for axis in ("SMY", "SMX"):
        found = re.search(axis + r" to Isocenter distance\s+([0-9.]+)", header)
        if not found:
            raise InputError(f"{beam_model_path()} does not give the {axis}-to-isocentre distance")
        out.append(float(found.group(1)))
    return out[0], out[1]


class AnalyticEngine(DoseEngine):
    """Analytic pencil-beam engine (see the module docstring): fast baseline and test fixture, not ground truth.

    Parameters
    ----------
    spot_sigma_mm : float, optional
        One-sigma spot size in air at the block entrance, mm, for every energy; by default the
        energy-dependent :func:`dota.physics.spot_sigma_mm` (6.0 mm at 70 MeV to 2.8 mm at 225 MeV).
    spot_model : {"dota", "beam-model"}
        ``"beam-model"`` takes the spot of the MCsquare beam model instead (:func:`beam_model_spot`:
        elliptical core, 3-6 % of the protons in a wide halo); the engine ``analytic-bdl`` in
        :data:`dota.engines.base.BUILTIN_ENGINES`.
    bit_identical : bool
        True (default): every depth slice is summed over every sub-pencil, as before: the doses of engine
        version 1.0 with erfc cut at :data:`ERFC_TAIL`, float32 bit for bit. False: sub-pencils that no
        longer reach a group of deeper slices are left out of those slices' sums (:func:`_depth_groups`):
        the same terms summed by ``torch.bmm`` in another order, within 1e-6 of each beamlet's maximum
        (8.9e-7 at most over the 1,908 beamlets of the head-and-neck plan; tests) and about 8 % faster.
    """

    name = "analytic"
    version = "1.1"
    primaries = 0
    hu_calibration = HU_CALIBRATION_NAME
    energy_range_mev = ENGINE_ENERGY_RANGE_MEV
    concurrent = True  # CPU only, nothing shared but its tables (thread-local workspaces)

    def __init__(self, spot_sigma_mm: float | None = None, spot_model: str = "dota", *,
                 bit_identical: bool = True) -> None:
        if spot_sigma_mm is not None and not (np.isfinite(spot_sigma_mm) and spot_sigma_mm > 0):
            raise InputError(f"spot_sigma_mm must be a positive number of mm, got {spot_sigma_mm!r}")
        if spot_model not in SPOT_MODELS:
            raise InputError(f"spot_model must be one of {SPOT_MODELS}, got {spot_model!r}")
        if spot_sigma_mm is not None and spot_model != "dota":
            raise InputError("spot_sigma_mm sets the spot of the 'dota' spot model only")
        self.spot_sigma_mm = None if spot_sigma_mm is None else float(spot_sigma_mm)
        self.spot_model = spot_model
        self.bit_identical = bool(bit_identical)
        self._sub_pencil_cache: dict[tuple, _SubPencils] = {}
        if spot_model == "beam-model":
            self.name = "analytic-bdl"
            self.version = "1.1 (spot of the MCsquare beam model)"

    def spot_components(self, energy_mev: float) -> list[tuple[float, float, float]]:
        """The spot at the block entrance as Gaussians ``(weight, sigma_rows_mm, sigma_cols_mm)``."""
        if self.spot_model == "beam-model":
            return beam_model_spot(energy_mev)
        spot = self.spot_sigma_mm if self.spot_sigma_mm is not None else float(spot_sigma_mm(energy_mev))
        return [(1.0, spot, spot)]

    def dose(
        self,
        geometry_hu: np.ndarray,
        energies_mev: np.ndarray | Sequence[float] | float,
        voxel_mm: Sequence[float] = VOXEL_MM,
        *,
        seeds: Sequence[int] | None = None,
    ) -> np.ndarray:
        """Dose to water, Gy per 1e9 primaries, float32 (N, L, H, W).

        Parameters
        ----------
        geometry_hu : array (N, L, H, W) or (L, H, W)
            CT numbers in the beam's-eye view; the beam enters at depth index 0, centred laterally.
        energies_mev : array (N,) or float
            Nominal energies, within ``ENGINE_ENERGY_RANGE_MEV`` (70-225 MeV).
        voxel_mm : (depth, row, col)
            Voxel size in mm.
        seeds
            Ignored: the engine is deterministic.
        """
        geometry, energies = check_beamlets(geometry_hu, energies_mev, energy_range_mev=ENGINE_ENERGY_RANGE_MEV)
        voxel = check_voxel_mm(voxel_mm)
        out = np.zeros(geometry.shape, dtype=np.float32)
        work = _thread_workspace()
        columns = None
        # always in inference mode: the thread's workspace tensors are reused in place across calls, which
        # torch allows for tensors made in inference mode only inside it (callers may or may not be in it)
        with torch.inference_mode():
            for i in range(geometry.shape[0]):
                # plans send each spot's geometry once per energy layer, one after the other
                if columns is None or not np.array_equal(geometry[i], geometry[i - 1]):
                    columns = _Columns(geometry[i], voxel[0])
                self._beamlet(columns, float(energies[i]), voxel, out[i], work)
        return out

    def _sub_pencils(self, energy_mev: float, rows: int, cols: int, dy: float, dx: float) -> _SubPencils:
        key = (energy_mev, rows, cols, dy, dx, self.spot_model, self.spot_sigma_mm)
        found = self._sub_pencil_cache.get(key)
        if found is None:
            spots = tuple(tuple(float(v) for v in spot) for spot in self.spot_components(energy_mev))
            shared = (spots, energy_mev, rows, cols, dy, dx)  # engines are made per call: share across them
            found = _SUB_PENCILS.get(shared)
            if found is None:
                found = _SubPencils(list(spots), rows, cols, dy, dx)
                found.depth_dose = water_depth_dose(energy_mev)
                if len(_SUB_PENCILS) >= 1024:
                    _SUB_PENCILS.clear()
                _SUB_PENCILS[shared] = found
            if len(self._sub_pencil_cache) >= 1024:
                self._sub_pencil_cache.clear()
            self._sub_pencil_cache[key] = found
        return found

    def _beamlet(self, columns: _Columns, energy_mev: float, voxel: tuple[float, float, float], out: np.ndarray,
                 work: _Workspace) -> None:
        dz, dy, dx = voxel
        _, rows, cols = columns.shape
        sub = self._sub_pencils(energy_mev, rows, cols, dy, dx)
        table = sub.depth_dose

        depth_count = columns.depth_count(table.extent_mm, sub.flat)
        if depth_count == 0:
            return
        pick = sub.flat
        k = pick.size

        def take(values: np.ndarray) -> np.ndarray:
            return values.take(pick, axis=0)[:, :depth_count]  # (K, D): sub-pencil by sub-pencil

        # depth dose: exactly 0 where a voxel starts beyond the curve's end (both ends of the interval
        # there), so it is averaged only over the voxels that start within it
        entry = take(columns.wed_entry)
        is_within = entry <= table.depth_mm[-1]  # (K, D)
        within = np.flatnonzero(is_within)
        idd = sub.weight.take(within // depth_count)
        idd *= table.mean_between(entry[is_within], take(columns.wed_exit)[is_within])
        weight_within = (idd * _GY_PER_1E9).astype(np.float32)  # Gy per 1e9 protons per mm^2
        nonzero = np.flatnonzero(weight_within)
        weight = np.zeros(k * depth_count, dtype=np.float32)
        weight[within[nonzero]] = weight_within[nonzero]
        weight = np.ascontiguousarray(weight.reshape(k, depth_count).T)  # (D, K)
        kept = np.flatnonzero(weight)  # rows d*K + k that add to the dose: the others add exactly zeros
        mcs_kept = _mcs_at(columns, pick, depth_count, is_within, kept, energy_mev, dz)
        if dy == dx and sub.sub_y == sub.sub_x:  # square voxels, round sub-pencils: one set of erfc for both axes
            profiles = _lattice_profile_rows(sub.idx_r, sub.idx_c, weight, kept, np.sqrt(sub.sub_y**2 + mcs_kept**2),
                                             rows, cols, dy, work)
        else:
            profiles = _general_profile_rows(sub, weight, kept, mcs_kept, rows, cols, dy, dx)
        groups = [(0, depth_count, None)] if self.bit_identical else _depth_groups(weight)
        for d0, d1, sub_pencils in groups:
            profile_y, profile_x = profiles.read(d0, d1, sub_pencils, work)
            out[d0:d1] = torch.bmm(profile_y.transpose(1, 2), profile_x).numpy()


#: :func:`_depth_groups`: a new group of depth slices starts where fewer than this fraction of the
#: sub-pencils at the start of the last one are still in range, after at least _GROUP_MIN_SLICES slices.
_GROUP_ALIVE_FRACTION = 0.6
_GROUP_MIN_SLICES = 4


def _depth_groups(weight: np.ndarray) -> list[tuple[int, int, np.ndarray | None]]:
    """Groups ``(d0, d1, sub_pencils)`` of depth slices ``d0 .. d1-1`` with the sub-pencils that still have
    weight at ``d0`` or deeper (ascending; None: all of them). A sub-pencil left out of a group's sums would
    only have added exact zeros there; the others are summed by ``torch.bmm`` over fewer terms, so in
    another order than over all sub-pencils: the same dose to float32 rounding (within 5e-7 of the
    beamlet's maximum on the head-and-neck plan; tests allow 1e-6). A group starts where fewer than
    :data:`_GROUP_ALIVE_FRACTION` of the previous start's sub-pencils are left, and has at least
    :data:`_GROUP_MIN_SLICES` slices. The first group has every sub-pencil when all of them reach the
    entrance (as on plans), and its slices then keep the old numbers bit for bit. A plan's beamlets are
    often 150 slices deep because a few columns of air beside the head carry the beam that far, while
    the others stop after 40-60: there the sums shrink to a third."""
    depth, k = weight.shape
    alive = weight != 0
    last = np.where(alive.any(axis=0), depth - np.argmax(alive[::-1], axis=0), 0)  # 1 + last depth with weight
    counts = np.bincount(last, minlength=depth + 1)
    reaching = k - np.cumsum(counts)[:depth]  # per depth d: the sub-pencils with weight at d or deeper
    falling = -reaching  # non-decreasing
    groups = []
    d0 = 0
    while d0 < depth:
        width = int(reaching[d0])
        # the first slice (at least _GROUP_MIN_SLICES on) where fewer than the fraction still reach
        d1 = int(np.searchsorted(falling, -_GROUP_ALIVE_FRACTION * width, side="right"))
        d1 = min(max(d1, d0 + _GROUP_MIN_SLICES), depth)
        if width == k:
            groups.append((d0, d1, None))
        elif width > 0:
            groups.append((d0, d1, np.flatnonzero(last > d0)))
        d0 = d1
    return groups


def _mcs_at(columns: _Columns, pick: np.ndarray, depth_count: int, is_within: np.ndarray, kept: np.ndarray,
            energy_mev: float, dz: float) -> np.ndarray:
    """:func:`dota.physics.lateral.mcs_sigma_from_wed_mm` of columns ``pick`` (the first ``depth_count``
    slices) at rows ``kept`` (``d * K + k``). The width is a prefix computation along each column, so a
    column is computed only down to its last voxel within the beam's reach (``is_within``, (K, D) bool; a
    prefix of each column where WED grows along it): where a few columns (air beside the body) reach much
    deeper than the others, those are computed apart (the same numbers)."""
    k = pick.size

    def widths(rows: int, sel: np.ndarray | slice) -> np.ndarray:  # (columns, rows)
        cols = pick[sel]
        return mcs_sigma_from_wed_mm(columns.step_wed.take(cols, axis=0)[:, :rows].T,
                                     columns.wed_centre.take(cols, axis=0)[:, :rows].T,
                                     columns.log_factor.take(cols, axis=0)[:, :rows].T, energy_mev, dz).T

    at = (kept % k) * depth_count + kept // k  # the rows in (K, D) order
    if columns.monotone:
        reach = np.count_nonzero(is_within, axis=1)  # per column: a prefix
        order = np.argsort(reach, kind="stable")
        ranked = reach[order]
        work = ranked * (np.arange(k) + 1) + depth_count * (k - 1 - np.arange(k))  # split after rank i
        split = int(np.argmin(work))
        if work[split] < 0.7 * depth_count * k and ranked[split] > 0:
            short, deep = np.sort(order[: split + 1]), np.sort(order[split + 1 :])
            mcs = np.zeros((k, depth_count))
            rows = int(ranked[split])
            mcs[short, :rows] = widths(rows, short)
            mcs[deep] = widths(depth_count, deep)
            return mcs.reshape(-1)[at]
    return np.ascontiguousarray(widths(depth_count, slice(None))).reshape(-1)[at]


_SUB_PENCILS: dict[tuple, _SubPencils] = {}


class _SubPencils:
    """The sub-pencils of one energy's spot in a block of ``rows x cols`` voxels of ``dy x dx`` mm (see the
    module docstring): lattice indices, weights, own widths; the same for every geometry."""

    def __init__(self, spots: list[tuple[float, float, float]], rows: int, cols: int, dy: float, dx: float) -> None:
        # sub-pencils: own width ~ one voxel (at most the core's sigma/sqrt 2), Gaussian weights carry the
        # rest of the spot (every Gaussian component of it)
        _, core_y, core_x = spots[0]
        self.sub_y, self.sub_x = min(dy, core_y / math.sqrt(2.0)), min(dx, core_x / math.sqrt(2.0))
        weights = sum(
            w * np.outer(_lattice_weights(rows, dy, math.sqrt(sy**2 - self.sub_y**2)),
                         _lattice_weights(cols, dx, math.sqrt(sx**2 - self.sub_x**2)))
            for w, sy, sx in spots
        )
        self.idx_r, self.idx_c = np.nonzero(weights >= SUBPENCIL_WEIGHT_CUTOFF * weights.max())
        self.weight = weights[self.idx_r, self.idx_c]
        self.flat = self.idx_r * cols + self.idx_c  # column of the (L, rows*cols) arrays of _Columns
        self.centre_y = (self.idx_r - (rows - 1) / 2.0) * dy
        self.centre_x = (self.idx_c - (cols - 1) / 2.0) * dx
        for values in (self.idx_r, self.idx_c, self.weight, self.flat, self.centre_y, self.centre_x):
            values.flags.writeable = False  # shared by the engines
        self.depth_dose: WaterDepthDose | None = None  # of the energy


#: :func:`dota.physics.hu_to_rsp` of every whole CT number from ``_RSP_LOOKUP_FROM_HU`` on.
_RSP_LOOKUP: list[np.ndarray] = []
_RSP_LOOKUP_FROM_HU = -4096


def _rsp_of_hu(hu: np.ndarray) -> np.ndarray:
    """``hu_to_rsp(hu)``, the same numbers: CT numbers are whole numbers (int16 CT), whose RSP is looked
    up in a table of :func:`dota.physics.hu_to_rsp` of each (``np.interp`` on a whole block costs 1.5 ms);
    anything else goes to :func:`dota.physics.hu_to_rsp`."""
    if not _RSP_LOOKUP:
        _RSP_LOOKUP.append(hu_to_rsp(np.arange(_RSP_LOOKUP_FROM_HU, 8192, dtype=np.float64)))
    table = _RSP_LOOKUP[0]
    if hu.size and np.issubdtype(hu.dtype, np.floating) and hu.dtype.itemsize <= 4:
        whole = hu.astype(np.int32)
        index = whole - _RSP_LOOKUP_FROM_HU
        if np.array_equal(whole, hu) and index.min() >= 0 and index.max() < table.size:
            return table.take(index)
    return hu_to_rsp(hu)


class _Columns:
    """What the engine needs of one geometry (L, rows, cols) for any energy, per voxel column (arrays
    (rows*cols, L), a column per row): relative stopping power ``x dz`` (the WED step), the WED at each voxel's entry, exit
    and centre, and Highland's log factor there. Computed once for the energies of a spot (the same
    operations as per beamlet before, prefix sums along depth, so the same numbers)."""

    def __init__(self, hu: np.ndarray, dz: float) -> None:
        self.shape = hu.shape
        rsp = _rsp_of_hu(np.ascontiguousarray(hu.reshape(hu.shape[0], -1).T))
        self.step_wed = rsp * dz
        self.wed_exit = prefix_sum(self.step_wed, axis=1)
        self.wed_entry = self.wed_exit - self.step_wed
        self._centre: np.ndarray | None = None
        self._log: np.ndarray | None = None
        self._monotone: bool | None = None

    def depth_count(self, extent_mm: float, pick: np.ndarray) -> int:
        """The depth slices a beam of depth-dose extent ``extent_mm`` reaches in columns ``pick``: the
        largest number of voxels of one of them that start at a WED below the extent (as
        ``np.count_nonzero(wed_entry[:, pick] < extent, axis=0).max()``; found by bisection where WED
        grows along every column, as it does unless rounding says otherwise)."""
        entry = self.wed_entry
        if not self.monotone:
            return int(np.count_nonzero(entry[pick] < extent_mm, axis=1).max())
        lo, hi = 0, entry.shape[1]  # the first slice where every column has reached the extent
        while lo < hi:
            mid = (lo + hi) // 2
            if entry[pick, mid].min() >= extent_mm:
                hi = mid
            else:
                lo = mid + 1
        return lo

    @property
    def monotone(self) -> bool:
        """Whether the WED at voxel entries grows (or stays) along every column."""
        if self._monotone is None:
            self._monotone = bool(np.all(self.wed_entry[:, 1:] >= self.wed_entry[:, :-1]))
        return self._monotone

    @property
    def wed_centre(self) -> np.ndarray:
        if self._centre is None:
            self._centre = self.wed_exit - 0.5 * self.step_wed
        return self._centre

    @property
    def log_factor(self) -> np.ndarray:
        if self._log is None:
            self._log = mcs_log_factor(self.wed_centre)
        return self._log


def _general_profile_rows(sub: _SubPencils, weight: np.ndarray, kept: np.ndarray, mcs_kept: np.ndarray, rows: int,
                          cols: int, dy: float, dx: float) -> _Profiles:
    """Non-square voxels or elliptical sub-pencils: :func:`_lateral_profiles` along each axis, for the
    rows ``kept`` whose weight is not 0 only (the others add exactly zeros: weighted profile 0, profile
    along columns 0)."""
    depth, k = weight.shape
    n_kept = kept.size
    slot = np.full(depth * k, n_kept, dtype=np.int64)
    slot[kept] = np.arange(n_kept)
    sub_pencil = torch.from_numpy(kept % k)
    tables = []
    for centre, sub_sigma, n, spacing in ((sub.centre_y, sub.sub_y, rows, dy), (sub.centre_x, sub.sub_x, cols, dx)):
        sigma = np.sqrt(sub_sigma**2 + mcs_kept**2)
        scale = torch.from_numpy(1.0 / (math.sqrt(2.0) * sigma)).float()
        table = torch.zeros(n_kept + 1, n)
        table[:n_kept] = _lateral_profile_rows(centre, scale, sub_pencil, n, spacing)
        tables.append(table)
    no_shift = np.zeros(k, dtype=np.int64)
    return _Profiles(tables[0], tables[1], slot.reshape(depth, k), 1, no_shift, no_shift,
                     np.ascontiguousarray(weight, dtype=np.float32))
