"""Plan dose through any beamlet engine: per beam one rotation of the CT, per spot one block through all
its energy layers, dose carried back into the CT grid, beams summed.

Units: the engines give Gy per 1e9 primaries; a spot-energy of ``mu`` MU at nominal energy ``E``
delivers ``mu * ProtonsMU(E)`` protons per fraction (beam model, :func:`~dota.plan.model.protons_per_mu`),
so the plan dose in Gy (all fractions) is ``fractions * sum(mu * ProtonsMU(E) / 1e9 * beamlet dose)``.

Memory stays bounded for plans of any size: spots go through the engine in chunks of at most
``max_beamlets_per_call`` beamlets (one spot's layers are never split, so the DoTA engine shares the
geometry between them), their dose is accumulated into the beam's grid at once, and the
dose-influence matrix is built from per-chunk sparse pieces; the beams stream through the engine's worker
processes one after the other, so at most a few beams' grids (the one being finished, the next ones rotated
ahead for the workers) are held at once. Stages are timed (``PlanDose.timings_s``): ``read`` (done by the
caller), ``rotate`` (CT onto the beam grids), ``infer`` (the engine calls, or with worker processes the time
spent waiting for them), ``deposit``
(accumulation in the beam grids and the trilinear carry back to the CT), ``halo`` (the dose spots put
outside their blocks, :mod:`dota.plan.halo`), ``dij`` (sparse matrix; it holds the in-block dose only).

Engines whose beamlets are MCsquare single-spot blocks (``engine.mcsquare_blocks``: the MCsquare beamlet
engine and the shipped DoTA model, trained on it) simulate each block with the beam model's isocentre
spot at the block's entrance. In a plan a block enters ``u`` mm upstream of its beam's isocentre, where
the beam model's spot is narrower (its sigma^2 smaller by ``delta = sigma_iso^2 - sigma(u)^2``, e.g. 1.3 mm^2
across and 0.5 mm^2 along the gantry axis at 150 MeV and 100 mm; MCsquare's own plan simulation has the
narrower spot), and deeper in it the beam's own angular spread has drifted on from a point ``u`` further
downstream, so ``delta`` grows with depth ``z``: ``delta(z) = delta(0) + 2 theta^2 u z`` (divergence ``theta``;
3.3 -> 4.1 mm^2 across at 100 MeV, ``u`` = 100 mm, 100 mm deep; MCsquare in water shows it: docs/plans.md). Each
beamlet's block is therefore sharpened slice by slice by ``delta(z)``, the inverse of a Gaussian blur done
exactly in Fourier space (:func:`_sharpen_sums`: per slice the gain ``exp(delta_rows k_r^2/2 + delta_cols k_c^2/2)``,
capped at :data:`SHARPEN_MAX_GAIN`; integral kept; not clipped per beamlet: only the plan's total dose is clipped
at zero, where far tails of the sharpening add up below it). The same step pre-compensates the blur the dose gains
on its way into the CT that MCsquare's own scoring on the CT grid does not have: the block's 2 mm voxel averages
(a box, ``h^2/12``) interpolated trilinearly (a tent, ``h^2/6``; :func:`resampling_blur_mm2` across,
:func:`depth_blur_mm2` along the beam), each slice's bilinear splat to its exact position on the beam grid
(``f (1 - f) h^2`` at the fraction ``f`` of a voxel, per slice: :func:`splat_blur_mm2`), and the engine's own
excess width over the Monte Carlo blocks it stands for where it has been measured
(:meth:`~dota.engines.base.DoseEngine.lateral_excess_mm2`, :mod:`dota.plan.lateral`). History: until session 10
only the tent was compensated, across, by the first-order step ``D - delta_rows/2 d2D/drow2 - delta_cols/2
d2D/dcol2`` (central second differences); session 11 added the box, the splat and the excess (0.1-0.2 points of
gamma on the head-and-neck plan, more with the excess); session 12 made the step exact and added the depth blur
(at a plan's 6 mm spot spacing a 3 mm^2 blur leaves 19 % of the amplitude, which the first-order step brought
back to 41 %, the exact one to 100 %: head and neck 97.38 -> 97.81 %). Measured on one 144 MeV layer of the liver plan (3 x 3 x 2.5 mm CT, parallel beams, session 4):
MCsquare beamlets summed by this pipeline without the correction had a 10 % lower maximum than MCsquare's
own plan at the same integral dose; the default model 10 % lower without it, 3 % lower with it. Clipping each
beamlet's correction at zero instead biases the dose upwards, most for noisy Monte Carlo beamlets (the
second difference of noise): on the head-and-neck plan with MCsquare beamlets of 1e4 protons, PTV mean +2.5 %
and gamma 90.7 % with it, +0.1 % and 97.3 % without (the default model: 94.1 and 94.3 %).

Spots fan out from the beam model's virtual source (``diverging``, every engine): a spot at ``(X, Y)`` in
the isocentre plane lies at ``(X, Y) (1 + s / SAD)`` at depth ``s`` from the isocentre (SAD 1,859.1 mm along
IEC Y, the grid's rows, and 2,234.8 mm along IEC X, its columns). Each block is sheared onto its ray:
its slices are cut from the beam grid shifted by whole voxels (starting one slice before the body in the
sheared footprint), and its dose is put back with each slice splatted bilinearly to the exact ray; the
halo follows to the nearest voxel. The dose-influence matrix samples the same sheared, corrected blocks.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from dota.constants import BLOCK_SHAPE, HU_CLIP, PRIMARIES_UNIT, VOXEL_MM
from dota.engines.base import beamlet_seed
from dota.errors import InputError
from dota.plan import bev
from dota.plan.geometry import PatientCT, iec_beam_axes
from dota.plan.model import Beam, Plan, protons_per_mu

log = logging.getLogger("dota.plan")

#: Default upper bound of beamlets per engine call (memory: 150x24x24 float32 = 345 kB per block, x2).
MAX_BEAMLETS_PER_CALL = 128


class StageTimer:
    """Wall-clock seconds per named stage (``time.perf_counter``), summed over repeated entries (thread-safe)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            with self._lock:
                self.seconds[stage] += time.perf_counter() - t0

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in self.seconds.items()}


@dataclass
class PlanDose:
    """Result of :func:`compute_plan_dose`: ``dose_gy`` on the CT grid (z, y, x), float32, for all fractions."""

    dose_gy: np.ndarray
    timings_s: dict[str, float]
    stats: dict[str, Any]
    dij: Any = None  # dota.plan.dij.DoseInfluence when requested
    beam_dose_gy: list[np.ndarray] = field(default_factory=list)


def _spot_groups(positions: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Unique spot positions (rounded to 1 um) and, for each, the indices of its spot-energies."""
    key = np.round(positions * 1000.0).astype(np.int64)
    uniq, inverse = np.unique(key, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[order], np.arange(len(uniq) + 1))
    groups = [order[bounds[i]:bounds[i + 1]] for i in range(len(uniq))]
    return uniq / 1000.0, groups


def _check_engine_range(plan: Plan, engine: Any) -> None:
    lo, hi = getattr(engine, "energy_range_mev", (70.0, 225.0))
    for b in plan.beams:
        for i, layer in enumerate(b.layers):
            if not lo - 1e-3 <= layer.energy_mev <= hi + 1e-3:
                raise InputError(f"beam {b.name!r}, layer {i + 1}: {layer.energy_mev:g} MeV is outside the "
                                 f"{getattr(engine, 'name', 'engine')} engine's range {lo:g}-{hi:g} MeV")


def compute_plan_dose(
    ct: PatientCT,
    plan: Plan,
    engine: Any,
    *,
    progress: bool = False,
    max_beamlets_per_call: int = MAX_BEAMLETS_PER_CALL,
    dij: bool = False,
    dij_mask: np.ndarray | None = None,
    dij_threshold: float = 0.0,
    supersample: int | None = None,
    keep_beam_doses: bool = False,
    block_shape: tuple[int, int, int] = BLOCK_SHAPE,
    voxel_mm: tuple[float, float, float] = VOXEL_MM,
    timer: StageTimer | None = None,
    halo: bool | None = None,
    entrance_spot: bool | None = None,
    diverging: bool = True,
    workers: int | None = None,
    blocks: Any = None,
) -> PlanDose:
    """Dose of ``plan`` on ``ct``'s grid with a beamlet ``engine`` (see the module docstring).

    Parameters
    ----------
    engine
        A :class:`~dota.engines.base.DoseEngine` (``dota.engines.get_engine("analytic")``, ``"dota"``,
        ``"mcsquare"``).
    dij, dij_mask, dij_threshold
        Also build the dose-influence matrix (:class:`~dota.plan.dij.DoseInfluence`, Gy per MU per
        fraction), keeping only CT voxels where ``dij_mask`` is true (all when None) and, per beamlet,
        values above ``dij_threshold`` times that beamlet's maximum. The matrix holds each beamlet's block
        as the plan dose does (sheared onto its ray, entrance-spot corrected) but not the halo (3-5 % of a
        spot's dose spread over 160 mm, below a typical threshold in every voxel), and neither does the dose
        computed with it; ``dota dose`` without ``--dij`` adds it.
    supersample
        Sub-points per axis when carrying dose into CT voxels (default ``ceil(spacing / 2 mm)``).
    keep_beam_doses
        Also return each beam's dose (``PlanDose.beam_dose_gy``).
    halo
        Add the dose each spot puts outside its block (:mod:`dota.plan.halo`); default: when the engine's
        blocks hold only in-block Monte Carlo dose (``engine.mcsquare_blocks``: the shipped DoTA model, MCsquare).
    entrance_spot
        Correct each block for the beam model's spot size where the block really enters (module docstring);
        default ``engine.mcsquare_blocks``.
    diverging
        Send each spot along its ray from the beam model's virtual source (its SMY and SMX distances: 1.86
        and 2.23 m from the isocentre, where the scanning magnets deflect the beam): each block is sheared
        slice by slice onto the ray, in the CT it is cut from and in the dose it leaves (module docstring);
        False: parallel beams. The dose-influence matrix follows the rays too.
    workers
        Engine calls run in this many forked worker processes (each inherits the engine and runs it on one
        torch thread), while this process cuts blocks ahead and deposits the results in plan order, so the
        dose is the same for any number of workers (to float32 rounding); more than one needs an engine that
        can run so (``engine.concurrent``: the analytic and the DoTA engine on the CPU) and a system that forks
        (Linux). Default (:func:`plan_workers`): one per core of torch's thread budget, at most 8, for such an
        engine, else 1.
    blocks
        A :class:`~dota.data.hdf5.DatasetWriter` for the plan's blocks of ``block_shape``: every spot-energy's
        block (int16 HU, cut from the beam grid and sheared onto its ray, as the engine got it), its energy
        and the engine's beamlet dose (:meth:`~dota.engines.base.DoseEngine.plan_dose`: before the entrance
        correction, the halo and the carry into the CT) are appended in plan order, with ``meta`` (see
        :func:`plan_block_meta`). ``dota dose --blocks-out`` writes them as a dataset file: with the
        ``mcsquare`` engine, Monte Carlo beamlets of the plan's own blocks (to train or evaluate on), with
        ``dota``, the model's beamlets of the same blocks.
    """
    from dota.plan.dij import DijBuilder

    timer = timer or StageTimer()
    if int(max_beamlets_per_call) < 1:
        raise InputError(f"max_beamlets_per_call must be >= 1, got {max_beamlets_per_call}")
    plan.validate()
    _check_engine_range(plan, engine)
    if dij_mask is not None and tuple(dij_mask.shape) != ct.shape:
        raise InputError(f"dij mask shape {dij_mask.shape} differs from the CT's {ct.shape}")
    total = np.zeros(ct.shape, dtype=np.float32)
    builder = DijBuilder(ct.shape, plan.n_spots, dij_mask, dij_threshold) if dij else None
    if dij:  # the matrix leaves out the halo (far below its threshold per voxel): so does the dose with it
        if halo:
            raise InputError("the dose-influence matrix leaves out the halo: halo cannot be requested with it")
        halo = False
    stats: dict[str, Any] = {"beams": len(plan.beams), "spot_energies": plan.n_spots, "spot_positions": 0,
                             "engine_calls": 0, "missed_spot_energies": 0, "truncated_spot_energies": 0,
                             "max_lateral_residual_mm": 0.0, "engine": getattr(engine, "name", "?"),
                             "halo": bool(engine.mcsquare_blocks if halo is None else halo),
                             "entrance_spot": bool(engine.mcsquare_blocks if entrance_spot is None else entrance_spot),
                             "halo_gy_mm3": 0.0, "beam_grid_gy_mm3": 0.0, "source_axis_mm": None}
    if diverging:
        from dota.engines.analytic import beam_model_source_axis_mm

        stats["source_axis_mm"] = beam_model_source_axis_mm()
    beam_doses = []
    n_workers = plan_workers(engine, workers)
    stats["workers"] = n_workers
    columns = np.cumsum([0] + [b.n_spots for b in plan.beams])
    works: list[_BeamWork] = []  # the beams begun, in plan order; each finished once the stream is past it

    def jobs() -> Iterator[tuple[_BeamWork, list[int], _Job]]:
        # one stream over all beams: the next beam is rotated while the workers finish the last one's blocks
        for b, column0 in zip(plan.beams, columns):
            work = _BeamWork(ct, b, plan.fractions, timer, stats, builder, int(column0), progress,
                             int(max_beamlets_per_call), supersample, block_shape, voxel_mm,
                             getattr(engine, "lateral_excess_mm2", None))
            works.append(work)
            for chunk in work.chunks:
                yield work, chunk, work.prepare(chunk, engine)

    done = 0

    def finish_until(stop: int) -> None:
        nonlocal done
        for work in works[done:stop]:
            beam_total = work.finish()
            total[...] += beam_total
            if keep_beam_doses:
                beam_doses.append(beam_total)
        done = max(done, stop)

    with _EnginePool(engine, n_workers, int(max_beamlets_per_call), block_shape) as pool:
        try:
            for (work, chunk, job), dose in pool.map(jobs(), timer):
                finish_until(works.index(work))  # the beams before this one are complete
                stats["engine_calls"] += 1
                work.deposit(chunk, job, dose)
                if blocks is not None:
                    with timer("blocks"):
                        geometry = np.concatenate([np.repeat(b[None], r, axis=0) for b, r in zip(job.blocks, job.repeats)])
                        blocks.append(np.rint(np.clip(geometry, *HU_CLIP)).astype(np.int16), dose, job.energies,
                                      meta=plan_block_meta(ct, work.beam, work.column0 + job.idx, job.seeds))
            finish_until(len(works))
        finally:
            for work in works:
                work.close()
    if stats["truncated_spot_energies"]:
        log.warning("%d spot-energies have a range beyond their %d-slice block: their dose past the block is lost",
                    stats["truncated_spot_energies"], block_shape[0])
    if stats["missed_spot_energies"]:
        log.warning("%d spot-energies miss the patient (no body voxel in their block) and were skipped",
                    stats["missed_spot_energies"])
    np.maximum(total, 0.0, out=total)  # the entrance sharpening's far tails may sum below zero
    stats["max_dose_gy"] = float(total.max())
    if stats["halo"]:  # share of the integral dose (in the beam grids) added outside the blocks
        stats["halo_fraction"] = round(stats["halo_gy_mm3"] / max(stats["beam_grid_gy_mm3"], 1e-30), 5)
    stats["integral_dose_gy_mm3"] = float(total.sum(dtype=np.float64) * ct.voxel_volume_mm3)
    result = PlanDose(total, timer.as_dict(), stats, None, beam_doses)
    if builder is not None:
        with timer("dij"):
            result.dij = builder.finish(plan)
        result.timings_s = timer.as_dict()
        stats["dij_nnz"] = int(result.dij.matrix.nnz)
        stats["dij_bytes"] = int(result.dij.nbytes)
    return result


def plan_block_meta(ct: PatientCT, beam: Beam, columns: np.ndarray, seeds: list[int]) -> dict[str, np.ndarray]:
    """The ``meta`` of a plan's recorded blocks (``compute_plan_dose(blocks=...)``): ``source`` (``ct:<CT name>``,
    so :mod:`dota.data.splits` knows the patient), ``seed`` (the spot-energy's engine seed), ``gantry_deg``,
    ``couch_deg`` and ``plan_column`` (the spot-energy's index in the plan: the dose-influence matrix's
    column)."""
    n = len(columns)
    return {"source": np.array([f"ct:{ct.name}"] * n), "seed": np.asarray(seeds, dtype=np.int64),
            "gantry_deg": np.full(n, beam.gantry_deg, dtype=np.float32),
            "couch_deg": np.full(n, beam.couch_deg, dtype=np.float32),
            "plan_column": np.asarray(columns, dtype=np.int64)}


class _BeamWork:
    """One beam of a plan: its rotation into the beam's eye view and its spot windows (made on creation), its
    engine calls (:meth:`prepare`), the deposition of their doses into its grid (:meth:`deposit`) and the
    carry into the CT (:meth:`finish`)."""

    def __init__(self, ct: PatientCT, beam: Beam, fractions: int, timer: StageTimer, stats: dict[str, Any],
                 builder: Any, column0: int, progress: bool, max_per_call: int, supersample: int | None,
                 block_shape: tuple[int, int, int], voxel_mm: tuple[float, float, float],
                 lateral_excess: Any = None) -> None:
        from dota.physics import csda_range_mm

        self.ct, self.timer, self.stats, self.builder, self.column0 = ct, timer, stats, builder, column0
        self.beam = beam
        self.block_shape, self.voxel_mm = block_shape, voxel_mm
        positions, self.energies, mu = beam.spot_table()
        self.ranges_mm = np.asarray(csda_range_mm(self.energies), dtype=np.float64)  # once per beam, not per spot
        # the engine's beamlets' width above Monte Carlo's, per spot-energy (sharpened with the entrance correction)
        self.excess = np.zeros((len(self.energies), 2))
        if stats["entrance_spot"] and lateral_excess is not None:
            self.excess = np.asarray(lateral_excess(self.energies), dtype=np.float64).reshape(len(self.energies), 2)
            if np.any(self.excess):  # per beam: its spot-energies' mean (rows, cols)
                stats.setdefault("lateral_excess_mm2", []).append([round(float(v), 4) for v in self.excess.mean(axis=0)])
        self.protons = mu * protons_per_mu(self.energies) * fractions  # per spot-energy, all fractions
        uniq, self.groups = _spot_groups(positions)
        stats["spot_positions"] += len(uniq)
        axes = iec_beam_axes(beam.gantry_deg, beam.couch_deg, beam.patient_position)
        self.halo = None
        if stats["halo"]:
            from dota.plan.halo import default_halo_table, ring_norms

            table = default_halo_table()
            if tuple(table.block_hw) != tuple(block_shape[1:]):
                raise InputError(f"the halo table is for {table.block_hw} blocks, not {block_shape[1:]}")
            self.halo = (table, ring_norms(table, voxel_mm), (table.grid_hw[0] - block_shape[1]) // 2)
        shear_pad = 0
        if stats["source_axis_mm"] is not None:  # the largest lateral shift of a ray from its parallel block
            depth = np.abs((ct.corners_mm() - np.asarray(beam.isocenter_mm)) @ axes.direction).max() + block_shape[0] * voxel_mm[0]
            ratio = max(np.abs(uniq[:, 1]).max() / stats["source_axis_mm"][0], np.abs(uniq[:, 0]).max() / stats["source_axis_mm"][1])
            shear_pad = int(np.ceil(ratio * depth / min(voxel_mm[1:]))) + 1
        with timer("rotate"):
            grid = bev.make_beam_grid(ct, axes, beam.isocenter_mm, uniq, block_shape, voxel_mm,
                                      pad=(0 if self.halo is None else self.halo[2]) + shear_pad)
            self.s0 = grid.depth_mm(0) if stats["entrance_spot"] else None  # slice 0's depth from the isocentre
            self.hu_grid = bev.resample_ct_to_grid(ct, grid)
            first = bev.first_body_slice(self.hu_grid)
            windows = bev.spot_windows(grid, first, uniq, block_shape)
            shifts = _ray_shifts(grid, windows, uniq, stats["source_axis_mm"], block_shape[0])
            self.windows, self.shifts = _sheared_entries(grid, first, windows, shifts, uniq, stats["source_axis_mm"],
                                                         block_shape)
            self.carrier = bev.GridToCT(ct, grid, supersample)
        self.dose_grid = np.zeros(grid.shape, dtype=np.float64)
        _, height, width = block_shape
        self.centre = (slice(height // 2 - 1, height // 2 + 1), slice(width // 2 - 1, width // 2 + 1))
        self._bar_args = dict(total=len(self.energies), disable=not progress, unit="spot-energy",
                              desc=f"beam {beam.name}", dynamic_ncols=True, leave=False)
        self._bar: Any = None  # made when the beam's first dose arrives: bars of rotated-ahead beams do not interleave
        self._missed = 0  # spot-energies that miss the patient, counted on the bar when it is made
        self.chunks: list[list[int]] = []
        count = 0
        for gi in range(len(uniq)):
            if self.windows[gi] is None:
                stats["missed_spot_energies"] += len(self.groups[gi])
                self._missed += len(self.groups[gi])
                continue
            res_mm = np.abs(np.asarray(self.windows[gi].residual)) * np.asarray(voxel_mm[1:])
            stats["max_lateral_residual_mm"] = max(stats["max_lateral_residual_mm"], float(res_mm.max()))
            if not self.chunks or count + len(self.groups[gi]) > max_per_call:
                self.chunks.append([])
                count = 0
            self.chunks[-1].append(gi)
            count += len(self.groups[gi])

    @property
    def bar(self) -> Any:
        if self._bar is None:
            from tqdm.auto import tqdm

            self._bar = tqdm(**self._bar_args)
            self._bar.update(self._missed)
        return self._bar

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def prepare(self, chunk: list[int], engine: Any) -> _Job:
        """The chunk's engine call: its blocks cut from the beam grid, its spot-energy indices, energies, seeds."""
        hu_grid, windows, groups, shifts = self.hu_grid, self.windows, self.groups, self.shifts
        with self.timer("rotate"):
            blocks = [bev.cut_block(hu_grid, windows[gi], self.block_shape,
                                    None if shifts[gi] is None else np.rint(shifts[gi]).astype(np.int64))
                      for gi in chunk]
        idx = np.concatenate([groups[gi] for gi in chunk])
        # each spot-energy its own seed, from its index in the plan (not in this call): chunks and beams never
        # reuse a Monte Carlo engine's random streams; deterministic engines ignore seeds
        seeds = [beamlet_seed(engine.seed, self.column0 + int(i)) for i in idx]
        return _Job(blocks, idx, [len(groups[gi]) for gi in chunk], self.energies[idx].astype(np.float32), seeds,
                    self.voxel_mm)

    def deposit(self, chunk: list[int], job: _Job, dose: np.ndarray) -> None:
        """Add the chunk's doses to the beam's grid: each spot's blocks weighted (entrance-corrected), its halo,
        its columns of the dose-influence matrix."""
        from dota.physics import hu_to_rsp

        blocks, idx = job.blocks, job.idx
        windows, groups, energies, shifts = self.windows, self.groups, self.energies, self.shifts
        timer, stats, builder, voxel_mm, dose_grid = self.timer, self.stats, self.builder, self.voxel_mm, self.dose_grid
        s0, centre = self.s0, self.centre
        scale = self.protons[idx] / PRIMARIES_UNIT
        halo_inputs = []
        parts: dict[int, np.ndarray] = {}  # each spot's blocks as deposited (to their last dose), for the matrix
        with timer("deposit"):
            start = 0
            for blk, gi in zip(blocks, chunk):
                n = len(groups[gi])
                part = dose[start:start + n]
                reach = np.flatnonzero(part.any(axis=(0, 2, 3)))  # slices beyond the spot's last dose add nothing
                part = part[:, :int(reach[-1]) + 1 if reach.size else 1]
                upstream = None if s0 is None else -(s0 + (windows[gi].p0 - 0.5) * voxel_mm[0])  # entrance face
                # the bilinear splat's blur onto the beam grid, known per slice (the matrix samples the splat too)
                splat = None if upstream is None else splat_blur_mm2(windows[gi].residual, shifts[gi], part.shape[1],
                                                                     voxel_mm)
                if upstream is not None and builder is None:  # one correction of the weighted sums
                    spot = _corrected_spot(part, scale[start:start + n], energies[groups[gi]], upstream, voxel_mm,
                                           self.excess[groups[gi]], splat)
                else:
                    if upstream is not None:  # the matrix needs each spot-energy's corrected block
                        part = _entrance_spot_correction(part, energies[groups[gi]], upstream, voxel_mm,
                                                         self.excess[groups[gi]], splat)
                    spot = np.tensordot(scale[start:start + n], part, axes=(0, 0))
                parts[gi] = part
                bev.deposit_window(dose_grid, windows[gi], spot, shifts[gi])
                # range check along the block's central columns
                steps = hu_to_rsp(blk[:, centre[0], centre[1]]).mean(axis=(1, 2)) * voxel_mm[0]
                wed_end = float(steps.sum())
                stats["truncated_spot_energies"] += int(np.sum(self.ranges_mm[groups[gi]] > wed_end))
                halo_inputs.append((gi, start, n, steps))
                start += n
        if self.halo is not None:
            from dota.plan.halo import halo_patch

            table, norms, pad = self.halo
            with timer("halo"):
                for gi, start, n, steps in halo_inputs:
                    in_block = scale[start:start + n, None] * dose[start:start + n].sum(axis=(2, 3), dtype=np.float64)
                    wed = np.cumsum(steps) - 0.5 * steps  # at slice centres
                    w = windows[gi]
                    patch = halo_patch(in_block, wed, energies[groups[gi]], table, voxel_mm, w.residual, norms,
                                       self.ranges_mm[groups[gi]])
                    if shifts[gi] is None:
                        added = bev.deposit_patch(dose_grid, w.p0, w.r0 - pad, w.c0 - pad, patch)
                    else:  # along the spot's ray, to the nearest voxel (the halo is wide)
                        added = sum(bev.deposit_patch(dose_grid, w.p0 + a, w.r0 - pad + dr, w.c0 - pad + dc, patch[a:b])
                                    for a, b, dr, dc in bev.shift_runs(np.rint(shifts[gi]).astype(np.int64)))
                    stats["halo_gy_mm3"] += float(added) * float(np.prod(voxel_mm))
        if builder is not None:
            with timer("dij"):
                for gi in chunk:
                    blocks_of_spot = parts[gi]
                    sampler = self.carrier.window_sampler(windows[gi], self.block_shape,
                                                          depth=blocks_of_spot.shape[1], shifts=shifts[gi])
                    for m, spot_index in enumerate(groups[gi]):
                        gy_per_mu = float(protons_per_mu(energies[spot_index])) / PRIMARIES_UNIT  # one fraction
                        builder.add(self.column0 + int(spot_index), sampler, blocks_of_spot[m], gy_per_mu)
        self.bar.update(len(idx))

    def finish(self) -> np.ndarray:
        """The beam's dose carried into the CT grid (float32)."""
        self.close()
        self.stats["beam_grid_gy_mm3"] += float(self.dose_grid.sum()) * float(np.prod(self.voxel_mm))
        out = np.zeros(self.ct.shape, dtype=np.float32)
        with self.timer("deposit"):
            self.carrier.carry(self.dose_grid, out)
        self.dose_grid = self.hu_grid = None  # type: ignore[assignment]  # the next beam's memory
        return out


def _ray_shifts(grid: bev.BeamGrid, windows: list, positions_mm: np.ndarray, source_axis_mm: tuple[float, float] | None,
                length: int) -> list[np.ndarray | None]:
    """Per spot, the (L, 2) lateral offsets (voxels; rows, cols) of its ray from the virtual source, at each
    of its block's slices, from the parallel block's axis: ``(Y, X) * s / SAD`` at depth ``s`` from the
    isocentre (None for every spot of a parallel beam or a missed one)."""
    if source_axis_mm is None:
        return [None] * len(windows)
    _, dr, dc = grid.voxel_mm
    out: list[np.ndarray | None] = []
    for w, (x, y) in zip(windows, np.asarray(positions_mm, dtype=np.float64)):
        if w is None:
            out.append(None)
            continue
        s = grid.depth_mm(w.p0 + np.arange(length))
        out.append(np.stack([y * s / source_axis_mm[0] / dr, x * s / source_axis_mm[1] / dc], axis=1))
    return out


def _sheared_entries(grid: bev.BeamGrid, first_body: np.ndarray, windows: list, shifts: list, positions_mm: np.ndarray,
                     source_axis_mm: tuple[float, float] | None, block_shape: tuple[int, int, int]) -> tuple[list, list]:
    """Windows whose first slice is one before the first body voxel of the block's *sheared* footprint (the
    rows and columns its slices move across), with their ray shifts recomputed for the new first slice."""
    if source_axis_mm is None:
        return windows, shifts
    _, height, width = block_shape
    out_w, out_s = list(windows), list(shifts)
    for i, (w, sh) in enumerate(zip(windows, shifts)):
        if w is None or sh is None:
            continue
        for _ in range(3):  # the shifts depend on the first slice: settle it (one or two rounds)
            k = np.rint(sh).astype(np.int64)
            r_lo, r_hi = w.r0 + k[:, 0].min(), w.r0 + k[:, 0].max() + height
            c_lo, c_hi = w.c0 + k[:, 1].min(), w.c0 + k[:, 1].max() + width
            p0 = max(0, int(first_body[max(r_lo, 0):r_hi, max(c_lo, 0):c_hi].min()) - 1)
            if p0 >= w.p0:
                break
            w = bev.SpotWindow(p0, w.r0, w.c0, w.residual)
            sh = _ray_shifts(grid, [w], positions_mm[i:i + 1], source_axis_mm, block_shape[0])[0]
        out_w[i], out_s[i] = w, sh
    return out_w, out_s


def entrance_spot_delta_mm2(energy_mev: float, upstream_mm: float, depth_mm: float = 0.0) -> tuple[float, float]:
    """``sigma^2`` of the beam model's core spot ``depth_mm`` past the isocentre minus ``depth_mm`` past a point
    ``upstream_mm`` before it, (rows, cols) mm^2: at depth ``z`` in a block that MCsquare simulates with its entrance at
    the isocentre, against the same depth in a plan's block that enters ``upstream_mm`` before it. The beam's own
    spread drifts on through the patient as through air (its angles are carried along; scattering adds to it
    independently), so the difference grows with depth: ``delta(z) = delta(0) + 2 theta^2 u z`` (divergence
    ``theta``), e.g. 3.3 -> 4.1 mm^2 across at 100 MeV, ``u`` = 100 mm, from the entrance to 100 mm deep."""
    c = _core_sigma2_polynomial(float(energy_mev))
    at = lambda x: c[0] + c[1] * x + c[2] * x * x  # noqa: E731  (rows, cols) sigma^2 x mm past the isocentre
    iso, up = at(float(depth_mm)), at(float(depth_mm) - float(upstream_mm))
    return float(iso[0] - up[0]), float(iso[1] - up[1])


@lru_cache(maxsize=4096)
def _core_sigma2_polynomial(energy_mev: float) -> np.ndarray:
    """(3, 2): the beam model's core spot ``sigma^2`` (rows, cols) ``x`` mm past the isocentre is ``c0 + c1 x + c2
    x^2`` (:func:`dota.engines.analytic.beam_model_spot`, a quadratic in the distance), through its values at ``x`` =
    -1, 0, 1 mm: a plan asks for a few energies thousands of times."""
    from dota.engines.analytic import beam_model_spot

    v = np.array([[s * s for s in beam_model_spot(energy_mev, -x)[0][1:]] for x in (-1.0, 0.0, 1.0)])
    poly = np.stack([v[1], 0.5 * (v[2] - v[0]), 0.5 * (v[2] + v[0]) - v[1]])
    poly.flags.writeable = False  # shared by every caller (cached)
    return poly


def _second_difference(a: np.ndarray, axis: int) -> np.ndarray:
    """Central second difference along ``axis`` with zero outside (sums to zero less the edge flux)."""
    out = -2.0 * a
    n = a.shape[axis]
    lo = [slice(None)] * a.ndim
    hi = [slice(None)] * a.ndim
    lo[axis], hi[axis] = slice(0, n - 1), slice(1, n)
    out[tuple(hi)] += a[tuple(lo)]
    out[tuple(lo)] += a[tuple(hi)]
    return out


#: Largest gain the plans' sharpening (:func:`_sharpen_sums`) gives any spatial frequency. The deconvolution is
#: exact below it; a smooth beamlet (sigma >= 3 mm) has no content where it binds, and a Monte Carlo beamlet's
#: noise is not amplified beyond it.
SHARPEN_MAX_GAIN: float = 10.0
#: Smallest lateral FFT size of the sharpening, and the zero padding it keeps beside a block at least (voxels): the
#: sharpening's kernel is a few voxels wide.
_SHARPEN_FFT = 32
_SHARPEN_MARGIN = 8
#: Slices of padding before (the first slice repeated) and behind (zeros) a block for the sharpening along depth.
_SHARPEN_DEPTH_PAD = 8


def _entrance_spot_correction(part: np.ndarray, energies: np.ndarray, upstream_mm: float,
                              voxel_mm: tuple[float, float, float], excess: np.ndarray | None = None,
                              slice_mm2: np.ndarray | None = None) -> np.ndarray:
    """Beamlet blocks (n, L, H, W) of one spot corrected for the narrower spot at their real entrance and the blur
    still to come (module docstring), each on its own (what the dose-influence matrix holds): the same linear
    correction :func:`_corrected_spot` applies to their weighted sum. Not clipped (the sharpening dips below zero
    far out in the tails: the plan's total is clipped, and the matrix keeps those small negative entries, so both
    agree)."""
    part = np.asarray(part, dtype=np.float64)
    mean, dev = _spot_deltas(part, energies, upstream_mm, voxel_mm, excess)
    sums = np.stack([part, dev[:, :, 0, None, None] * part, dev[:, :, 1, None, None] * part], axis=1)
    return np.stack([_sharpen_sums(sums[m], mean, slice_mm2, voxel_mm) for m in range(len(part))])


def _spot_deltas(part: np.ndarray, energies: np.ndarray, upstream_mm: float, voxel_mm: tuple[float, float, float],
                 excess: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The spot's sharpening per slice (:func:`_entrance_deltas`, (n, L, 2) mm^2 for blocks ``part`` (n, L, H, W)) as
    its mean over the energy layers (L, 2) (weighted by each layer's in-block dose, not by the plan's weights, so the
    matrix's blocks do not depend on them) and each layer's deviation from it (n, L, 2)."""
    deltas = _entrance_deltas(energies, upstream_mm, voxel_mm, excess, part.shape[1])
    mass = np.abs(part.reshape(len(part), -1).sum(axis=1))
    mean = np.tensordot(mass, deltas, axes=(0, 0)) / mass.sum() if mass.sum() > 0 else deltas.mean(axis=0)
    return mean, deltas - mean[None]


def _entrance_deltas(energies: np.ndarray, upstream_mm: float, voxel_mm: tuple[float, float, float],
                     excess: np.ndarray | None = None, length: int = 1) -> np.ndarray:
    """(n, L, 2) mm^2 the ``length`` slices of the blocks of :func:`_entrance_spot_correction` are sharpened by: the
    spot's sigma^2 with the block's entrance at the isocentre minus with it at the plan's entrance, at each slice's
    depth (:func:`entrance_spot_delta_mm2`; linear in depth, so two evaluations per energy), plus the resampling blur
    (:func:`resampling_blur_mm2`), plus ``excess`` (n, 2), the engine's own beamlets' width above Monte Carlo's
    (:meth:`~dota.engines.base.DoseEngine.lateral_excess_mm2`)."""
    at0 = np.array([entrance_spot_delta_mm2(float(e), upstream_mm) for e in energies]).reshape(-1, 2)  # (n, 2)
    at1 = np.array([entrance_spot_delta_mm2(float(e), upstream_mm, 1.0) for e in energies]).reshape(-1, 2)
    depth = (np.arange(int(length)) + 0.5) * voxel_mm[0]  # slice centres from the entrance face
    deltas = at0[:, None, :] + (at1 - at0)[:, None, :] * depth[None, :, None]
    deltas = deltas + resampling_blur_mm2(voxel_mm)
    return deltas if excess is None else deltas + np.asarray(excess, dtype=np.float64).reshape(-1, 1, 2)


def resampling_blur_mm2(voxel_mm: tuple[float, float, float]) -> np.ndarray:
    """(rows, cols) variance (mm^2) a block's dose gains on its way into the CT that MCsquare's own plan scoring
    does not have: the block's voxels are averages over ``h`` wide boxes (variance ``h^2/12``) and the trilinear
    carry interpolates between them (a tent, ``h^2/6``); both voxel averages over the CT voxel agree. Together
    ``h^2/4``, 1 mm^2 on the 2 mm grid; the same along depth (:func:`depth_blur_mm2`). (The bilinear splat onto the
    beam grid adds its own, per slice: :func:`splat_blur_mm2`.)"""
    return np.array([voxel_mm[1] ** 2, voxel_mm[2] ** 2]) / 4.0


def depth_blur_mm2(voxel_mm: tuple[float, float, float]) -> float:
    """Variance (mm^2) the dose gains along the beam on its way into the CT: the slices' box and the trilinear
    carry's tent, ``h^2/4`` (as :func:`resampling_blur_mm2` across)."""
    return float(voxel_mm[0]) ** 2 / 4.0


def splat_blur_mm2(residual: tuple[float, float], shifts: np.ndarray | None, length: int,
                   voxel_mm: tuple[float, float, float]) -> np.ndarray:
    """(length, 2) variance (mm^2, rows and cols) each slice of a spot's dose gains when it is splatted
    bilinearly onto the beam grid at its fractional position ``f`` (:func:`dota.plan.bev.sheared_splat`,
    :func:`~dota.plan.bev.splat_window`): ``f (1 - f) h^2``, 0 on a voxel centre, ``h^2/4`` half-way."""
    total = np.zeros((length, 2)) + np.asarray(residual, dtype=np.float64)[None, :]
    if shifts is not None:
        total = total + np.asarray(shifts, dtype=np.float64)[:length]
    frac = total - np.floor(total)
    return frac * (1.0 - frac) * np.array([voxel_mm[1] ** 2, voxel_mm[2] ** 2])


def _corrected_spot(part: np.ndarray, weights: np.ndarray, energies: np.ndarray, upstream_mm: float,
                    voxel_mm: tuple[float, float, float], excess: np.ndarray | None = None,
                    slice_mm2: np.ndarray | None = None) -> np.ndarray:
    """``sum_m weights[m] * corrected(part[m])`` (:func:`_entrance_spot_correction`) for one spot's blocks
    (n, L, H, W), as one correction of three weighted sums over its energy layers (the correction is linear in
    each block, with the layers' deviations from the spot's mean sharpening to first order), so one FFT per spot
    replaces n. ``slice_mm2`` (L, 2) adds a sharpening per slice common to all of them (the splat's)."""
    part = np.asarray(part, dtype=np.float64)
    mean, dev = _spot_deltas(part, energies, upstream_mm, voxel_mm, excess)
    weights = np.asarray(weights, dtype=np.float64)
    sums = np.stack([np.tensordot(weights, part, axes=(0, 0)),  # S, S_r, S_c (the deviations differ per slice)
                     np.einsum("ml,mlhw->lhw", weights[:, None] * dev[:, :, 0], part, optimize=True),
                     np.einsum("ml,mlhw->lhw", weights[:, None] * dev[:, :, 1], part, optimize=True)])
    return _sharpen_sums(sums, mean, slice_mm2, voxel_mm)


def _sharpen_sums(sums: np.ndarray, mean: np.ndarray, slice_mm2: np.ndarray | None,
                  voxel_mm: tuple[float, float, float]) -> np.ndarray:
    """The sharpened dose (L, H, W) from ``sums`` (3, L, H, W): the dose ``S`` and its layers weighted by their
    deviations ``d`` from the mean sharpening ``mean`` (rows, cols mm^2; (2,) or per slice (L, 2)), ``S_r = sum d_r
    D``, ``S_c``. Exact
    Gaussian deconvolution in Fourier space, the gain ``exp((mean_r + s_r(z)) k_r^2 / 2 + (mean_c + s_c(z)) k_c^2
    / 2)`` per slice ``z`` (``s``: ``slice_mm2``), capped at :data:`SHARPEN_MAX_GAIN`, applied to ``S - S_r'' / 2
    - S_c'' / 2`` (the deviations to first order: second differences along rows and columns); then along depth by
    :func:`depth_blur_mm2`. The integral is kept (gain 1 at zero frequency); a Gaussian's variance drops by the
    sharpening, per axis."""
    from scipy import fft

    _, n_l, n_h, n_w = sums.shape
    size_r = max(_SHARPEN_FFT, fft.next_fast_len(n_h + _SHARPEN_MARGIN, real=True))
    size_c = max(_SHARPEN_FFT, fft.next_fast_len(n_w + _SHARPEN_MARGIN, real=True))
    kr2 = (2.0 * np.pi * np.fft.fftfreq(size_r, d=voxel_mm[1])) ** 2
    kc2 = (2.0 * np.pi * np.fft.rfftfreq(size_c, d=voxel_mm[2])) ** 2
    mean = np.broadcast_to(np.asarray(mean, dtype=np.float64), (n_l, 2))
    rows, cols = mean[:, 0].copy(), mean[:, 1].copy()
    if slice_mm2 is not None:
        rows = rows + slice_mm2[:n_l, 0]
        cols = cols + slice_mm2[:n_l, 1]
    # the layers' deviations to first order (second differences, as a first-order sharpening), then one FFT
    first = sums[0] - 0.5 * (_second_difference(sums[1], 1) / voxel_mm[1] ** 2
                             + _second_difference(sums[2], 2) / voxel_mm[2] ** 2)
    # FFTs in float32 (2-6x faster here; rounding 1e-7 of the maximum, below the dose's own float32)
    spec = fft.rfft2(first.astype(np.float32), s=(size_r, size_c), axes=(1, 2))  # (L, size_r, size_c // 2 + 1)
    # the gain is separable (rows x cols) below the cap
    gain = np.exp(0.5 * rows[:, None, None] * kr2[None, :, None]) * np.exp(0.5 * cols[:, None, None] * kc2[None, None, :])
    np.minimum(gain, SHARPEN_MAX_GAIN, out=gain)
    out = fft.irfft2(gain.astype(np.float32) * spec, s=(size_r, size_c), axes=(1, 2))[:, :n_h, :n_w]
    depth = depth_blur_mm2(voxel_mm)
    if depth > 0 and n_l > 1:  # the first slice continued in front (no step at the block's start), zeros behind
        pad = _SHARPEN_DEPTH_PAD
        n_z = fft.next_fast_len(n_l + 2 * pad, real=True)
        kz2 = (2.0 * np.pi * np.fft.rfftfreq(n_z, d=voxel_mm[0])) ** 2
        gz = np.minimum(np.exp(0.5 * depth * kz2), SHARPEN_MAX_GAIN).astype(np.float32)
        ext = np.concatenate([np.repeat(out[:1], pad, axis=0), out])
        out = fft.irfft(fft.rfft(ext, n=n_z, axis=0) * gz[:, None, None], n=n_z, axis=0)[pad:pad + n_l]
    return out.astype(np.float64)


#: Most worker processes a plan starts by default (:func:`plan_workers`).
DEFAULT_MAX_WORKERS = 8


def _cpu_budget() -> int:
    """The cores a plan may use: torch's thread count in this process (torch's default, the machine's cores,
    unless set: ``OMP_NUM_THREADS``, ``torch.set_num_threads``, a Ray batch task's CPUs)."""
    import torch

    return max(1, torch.get_num_threads())


def plan_workers(engine: Any, workers: int | None = None) -> int:
    """Worker processes for a plan's engine calls: ``workers`` when given (>= 1; more than 1 only for an
    engine that can run so, ``engine.concurrent``, on a system that can fork), else for such an engine one
    per core of the CPU budget (torch's thread count; at most :data:`DEFAULT_MAX_WORKERS`), otherwise 1. Each
    worker runs on one torch thread: torch's OpenMP runtime does not survive a fork once this process has used
    it on several threads (a forked child that asked for two then hung in its first parallel operation).
    Measured on this project's 2-core VM (the engine on the 1,908 spot-energy head-and-neck plan's blocks,
    default model, quiet): one process
    with 2 torch threads 13.6-14.1 ms per spot-energy, two processes with one thread each 10.3-10.8 ms (the
    model's analytic base dose is single-threaded numpy for a good part); worker threads instead of
    processes were slower than one process (the interpreter's lock)."""
    can = bool(getattr(engine, "concurrent", False)) and "fork" in mp.get_all_start_methods()
    if workers is None:
        return min(_cpu_budget(), DEFAULT_MAX_WORKERS) if can else 1
    if int(workers) < 1:
        raise InputError(f"workers must be >= 1, got {workers}")
    if int(workers) > 1 and not can:
        raise InputError(f"the {getattr(engine, 'name', '?')} engine cannot run in several worker processes here: "
                         "use workers=1")
    return int(workers)


@dataclass
class _Job:
    """One engine call of a plan: the chunk's blocks (one per spot), how many energies each goes through,
    those energies and the spot-energies' seeds, in plan order."""

    blocks: list[np.ndarray]
    idx: np.ndarray
    repeats: list[int]
    energies: np.ndarray
    seeds: list[int]
    voxel_mm: tuple[float, float, float]

    def run(self, engine: Any) -> np.ndarray:
        geometry = np.concatenate([np.repeat(b[None], r, axis=0) for b, r in zip(self.blocks, self.repeats)])
        return engine.plan_dose(geometry, self.energies, self.voxel_mm, seeds=self.seeds)


def _worker_main(engine: Any, conn: Any, buffer: Any, shape: tuple[int, ...]) -> None:
    """A forked worker: jobs from ``conn``, each dose written into the shared ``buffer`` and its count sent back
    (a dose larger than the buffer, or the exception, goes through the pipe); ``None`` or a closed pipe ends it."""
    import signal

    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the plan's to handle: it stops the workers
    torch.set_num_threads(1)  # one thread: the parent's OpenMP pool does not survive the fork (plan_workers)
    out = np.frombuffer(buffer, dtype=np.float32).reshape(shape)
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):  # the plan has gone
            return
        if job is None:
            return
        try:
            dose = job.run(engine)
            if len(dose) > len(out):  # one spot with more energies than a call's bound: through the pipe
                conn.send(("dose", dose))
                continue
            out[:len(dose)] = dose
            conn.send(("ok", len(dose)))
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the plan, which re-raises it
            try:
                conn.send(("error", exc))
            except Exception:  # an exception that does not pickle: its text
                conn.send(("error", RuntimeError(f"{type(exc).__name__}: {exc}")))


class _EnginePool:
    """A plan's engine calls in ``n`` forked worker processes (each inherits the engine and runs it on one torch
    thread; doses come back through shared memory), results in submission order while the calling process
    cuts blocks and deposits; ``n = 1`` runs them in the calling process."""

    def __init__(self, engine: Any, n: int, max_beamlets: int, block_shape: tuple[int, int, int]) -> None:
        self.engine, self.n = engine, int(n)
        self.shape = (int(max_beamlets), *block_shape)
        self._workers: list[tuple[Any, Any, np.ndarray]] = []

    def __enter__(self) -> _EnginePool:
        if self.n > 1:
            import mmap

            ctx = mp.get_context("fork")
            try:
                for _ in range(self.n):
                    buffer = mmap.mmap(-1, int(np.prod(self.shape)) * 4)  # anonymous, shared with the child
                    mine, theirs = ctx.Pipe()
                    proc = ctx.Process(target=_worker_main, args=(self.engine, theirs, buffer, self.shape),
                                       daemon=True, name="dota-plan-worker")
                    proc.start()
                    theirs.close()
                    self._workers.append((proc, mine, np.frombuffer(buffer, dtype=np.float32).reshape(self.shape)))
            except BaseException:
                self.__exit__(RuntimeError, None, None)
                raise
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        for proc, conn, _ in self._workers:
            if exc_type is None:  # done: each worker ends after its last job
                try:
                    conn.send(None)
                except OSError:
                    pass
            else:  # stopped by an error: the workers' pending results are of no use
                proc.terminate()
        for proc, conn, _ in self._workers:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join()
            conn.close()
        self._workers = []

    def _died(self, w: int) -> RuntimeError:
        """The error for worker ``w``, which is gone (joined here, for its exit code)."""
        proc = self._workers[w][0]
        proc.join(timeout=5)
        return RuntimeError(f"plan worker process {w} died (exit code {proc.exitcode}; out of memory?)")

    def _send(self, w: int, job: _Job) -> None:
        conn = self._workers[w][1]
        try:
            conn.send(job)
        except OSError:  # its end of the pipe is closed: the worker is gone
            raise self._died(w) from None

    def _reply(self, w: int) -> np.ndarray:
        """Worker ``w``'s reply to its job (waited for): the dose, copied out of its buffer."""
        proc, conn, out = self._workers[w]
        try:
            while not conn.poll(1.0):
                if not proc.is_alive():
                    raise EOFError
            status, value = conn.recv()
        except (EOFError, OSError):
            raise self._died(w) from None
        if status == "error":
            raise value
        if status == "dose":
            return value
        return out[:value].copy()  # the worker's buffer takes its next job once this returns

    def _first_ready(self, busy: list[int]) -> list[int]:
        """The workers of ``busy`` that have replied, waiting until one has (and checking that they live)."""
        from multiprocessing.connection import wait

        conns = {self._workers[w][1]: w for w in busy}
        while True:
            ready = wait(list(conns), timeout=1.0)
            if ready:
                return sorted(conns[c] for c in ready)
            for w in busy:
                if not self._workers[w][0].is_alive():
                    raise self._died(w)

    def map(self, items: Iterator[tuple[Any, ...]], timer: StageTimer) -> Iterator[tuple[tuple[Any, ...], np.ndarray]]:
        """``(item, dose)`` for each item (a tuple whose last element is the :class:`_Job`), in order;
        ``timer``'s "infer" holds the time spent waiting on (or, with one worker, running) the engine.

        With workers, a worker that replies gets the next job at once, whichever worker's result is due next:
        results are held (at most one per worker) until those before them are in, so no worker waits while
        the calling process waits on another one or deposits."""
        if not self._workers:
            for item in items:
                with timer("infer"):
                    dose = item[-1].run(self.engine)
                yield item, dose
            return
        items = iter(items)
        inflight: dict[int, tuple[int, tuple[Any, ...]]] = {}  # worker -> (position in the stream, item)
        held: dict[int, tuple[tuple[Any, ...], np.ndarray]] = {}  # position -> (item, dose), until it is due
        sent = due = 0

        def feed(w: int) -> None:  # the next item's blocks are cut (its beam rotated) here
            nonlocal sent
            item = next(items, None)
            if item is not None:
                self._send(w, item[-1])
                inflight[w] = (sent, item)
                sent += 1

        for w in range(self.n):
            feed(w)
        while inflight or due in held:
            if due not in held:
                with timer("infer"):
                    ready = self._first_ready(sorted(inflight))
                for w in ready:
                    position, item = inflight.pop(w)
                    held[position] = (item, self._reply(w))
                    feed(w)
                continue
            item, dose = held.pop(due)
            due += 1
            yield item, dose
