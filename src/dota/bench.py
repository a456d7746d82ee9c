"""``dota bench``: the plain full forward pass against the inference engine, workload by workload.

Scenarios (:data:`SCENARIOS`), each timing both variants on the same model and inputs in one
interleaved run (the order alternates between repetitions):

``single``        one beamlet per request, mixed phantoms and energies 70-220 MeV;
``energy_sweep``  one geometry, 20 energies 70-220 MeV in one request;
``plan``          a spot map: per spot one heterogeneous geometry and 10-30 energy layers, one request per spot;
``prefix``        single-beamlet requests at one energy whose geometries share their leading slices;
``batch``         distinct beamlets in requests of 1-32.

Reported per scenario: ``baseline_ms`` and ``engine_ms`` per beamlet (median, p10, p90 over requests),
``speedup`` (ratio of medians), ``max_abs_diff_rel`` (largest |engine - plain| over the slices the
engine computed, relative to the beamlet's maximum), ``tail_rel`` (largest dose the plain pass puts
beyond those slices, same scale; random weights put "dose" everywhere, a trained model should not),
the fraction of slices computed, warm-up time (excluded from the statistics), cache bytes and peak
RSS. Truncation margins are checked against the analytic engine (``margins``). The process's first
call of each variant is reported separately as ``cold_start_ms``.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NotRequired, TypedDict

import numpy as np

from dota.constants import OUTPUT_CUTOFF_FRACTION
from dota.errors import InputError
from dota.report.schema import read_json

log = logging.getLogger(__name__)

SCENARIOS = ("single", "energy_sweep", "plan", "prefix", "batch")
OMP_WAIT_POLICIES = ("bounded", "passive", "active", "default")
#: Spin iterations of an idle OpenMP thread before it sleeps, for the ``bounded`` policy.
OMP_BOUNDED_SPIN_COUNT = 10_000


def set_omp_wait_policy(policy: str) -> bool:
    """Choose how idle OpenMP threads wait; only effective before the first ``import torch``.

    torch's CPU kernels run on GNU OpenMP, whose worker threads by default spin (up to 300,000
    iterations) after every parallel region, waiting for the next. On cores shared with other
    processes a spinning thread takes CPU from the one with work. Measured on this project's 2-core
    machine (paper preset, one beamlet, 2 threads), wall time of plain pass / engine:

    ============  ======================  ==================
    policy        load average 3.7        quiet (encoder + decoder only)
    ============  ======================  ==================
    ``active``    456 ms / 1037 ms        38 ms
    ``bounded``   171 ms / 161 ms         41 ms
    ``passive``   158 ms / 126 ms         49 ms
    ============  ======================  ==================

    ``bounded`` (``GOMP_SPINCOUNT=10000``) keeps most of the quiet-machine speed and avoids the
    collapse under load; ``passive`` (``OMP_WAIT_POLICY=PASSIVE``) sleeps at once; ``active`` spins
    (``OMP_WAIT_POLICY=ACTIVE``); ``default`` leaves the environment alone. libgomp reads these once,
    when torch loads it, so ``dota bench`` calls this before importing torch.

    Returns True when the setting holds or will hold, False when torch was already imported.
    """
    if policy not in OMP_WAIT_POLICIES:
        raise InputError(f"OpenMP wait policy must be one of {OMP_WAIT_POLICIES}, got {policy!r}")
    if policy == "default":
        return True
    wanted = {"bounded": {"GOMP_SPINCOUNT": str(OMP_BOUNDED_SPIN_COUNT)},
              "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
              "active": {"OMP_WAIT_POLICY": "ACTIVE"}}[policy]
    if all(os.environ.get(k) == v for k, v in wanted.items()):
        return True
    if "torch" in sys.modules:
        return False
    os.environ.update(wanted)
    return True


@dataclass(frozen=True)
class Sizes:
    """How much work each scenario does."""

    single: int  # beamlets, one request each
    sweep_repeats: int  # repetitions of the 20-energy request
    plan_spots: int
    plan_layers: tuple[int, int]  # energy layers per spot (inclusive range)
    prefix_groups: int  # base geometries (each with its own energy)
    prefix_variants: int  # further requests sharing the base's leading slices
    prefix_shared_slices: int
    prefix_rounds: int  # the request sequence is repeated on cold caches
    batch_sizes: tuple[int, ...]
    batch_beamlets: int
    batch_rounds: int


QUICK = Sizes(
    single=6, sweep_repeats=3, plan_spots=3, plan_layers=(10, 14), prefix_groups=1, prefix_variants=4,
    prefix_shared_slices=96, prefix_rounds=2, batch_sizes=(1, 4, 16), batch_beamlets=16, batch_rounds=1,
)
FULL = Sizes(
    single=30, sweep_repeats=7, plan_spots=12, plan_layers=(10, 30), prefix_groups=3, prefix_variants=6,
    prefix_shared_slices=96, prefix_rounds=3, batch_sizes=(1, 2, 4, 8, 16, 32), batch_beamlets=32, batch_rounds=2,
)
SWEEP_ENERGIES_MEV = np.linspace(70.0, 220.0, 20).astype(np.float32)
PHANTOM_MIX = ("heterogeneous", "lung", "bone", "slab", "water")


def spread(values_ms: Sequence[float]) -> dict[str, float]:
    """Median, 10th and 90th percentile, count."""
    v = np.asarray(values_ms, dtype=float)
    return {
        "median": float(np.median(v)),
        "p10": float(np.percentile(v, 10)),
        "p90": float(np.percentile(v, 90)),
        "n": int(v.size),
    }


class _DoseEngineRunner:
    """A :class:`~dota.engines.base.DoseEngine` (e.g. the analytic pencil beam) timed like a variant."""

    def __init__(self, engine, voxel_mm) -> None:
        self.engine, self.voxel_mm = engine, voxel_mm

    def predict(self, g: np.ndarray, e: np.ndarray, batch_size: int = 1) -> np.ndarray:
        return self.engine.dose(g, e, self.voxel_mm)

    def reset(self) -> None:
        pass


class _Bench:
    """Model, the two variants and the bookkeeping shared by the scenarios."""

    def __init__(self, model, engine, baseline, sizes: Sizes, seed: int, batch_size: int, progress: bool,
                 analytic) -> None:
        self.model, self.engine, self.baseline = model, engine, baseline
        self.sizes, self.seed, self.batch_size, self.progress = sizes, seed, batch_size, progress
        self.analytic = analytic
        self.num_slices = model.config.block_shape[0]
        self.variants: dict[str, Any] = {}
        self.reference_variants: list[str] = []  # engines timed beside the model (the analytic pencil beam)

    def rng(self, name: str) -> np.random.Generator:
        return np.random.default_rng([self.seed, sum(map(ord, name))])

    def phantoms(self, kinds: Sequence[str], rng: np.random.Generator) -> np.ndarray:
        from dota.physics import make_phantom

        shape = self.model.config.block_shape
        voxel = self.model.config.voxel_mm
        return np.stack([make_phantom(k, rng, shape=shape, voxel_mm=voxel) for k in kinds]).astype(np.float32)

    def energies(self, rng: np.random.Generator, n: int) -> np.ndarray:
        lo, hi = self.model.normalization.energy_range_mev
        return rng.uniform(lo, hi, n).astype(np.float32)

    # -- timing --------------------------------------------------------------------------------
    def _call(self, which: str, g: np.ndarray, e: np.ndarray) -> tuple[np.ndarray, float]:
        runner = {"engine": self.engine, "baseline": self.baseline}.get(which) or self.variants[which]
        t0 = time.perf_counter()
        dose = runner.predict(g, e, batch_size=self.batch_size if which == "baseline" else max(self.batch_size, len(e)))
        return dose, (time.perf_counter() - t0) * 1e3

    def run(
        self,
        name: str,
        requests: list[tuple[np.ndarray, np.ndarray]],
        repeats: int,
        reset_every: int = 1,
        extra: dict[str, Any] | None = None,
        variants: Sequence[str] = (),
    ) -> dict[str, Any]:
        """Time baseline and engine on every request ``repeats`` times, interleaved.

        The engine's caches are cleared before every ``reset_every``-th request (1: every request
        starts cold; the prefix scenario clears once per round of its request sequence).
        ``variants`` names further engines of ``self.variants`` timed alongside (``<name>_ms``).
        """
        from tqdm.auto import tqdm

        # warm-up on the first request: allocations, oneDNN primitives; excluded, reported
        g0, e0 = requests[0]
        self.engine.reset()
        _, warm_b = self._call("baseline", g0, e0)
        _, warm_e = self._call("engine", g0, e0)
        self.engine.reset()
        before = self.engine.cache_stats()
        base_ms: list[float] = []
        eng_ms: list[float] = []
        more_ms: dict[str, list[float]] = {v: [] for v in variants}
        for v in variants:
            self._call(v, g0, e0)
        diff = tail = 0.0
        computed = total = 0
        recomputed = truncated_requests = plain_path = engine_requests = 0
        cache_bytes = 0
        bar = tqdm(total=repeats * len(requests), desc=name, disable=not self.progress, leave=False)
        for rep in range(repeats):
            for r, (g, e) in enumerate(requests):
                if r % reset_every == 0:
                    self.engine.reset()
                order = ("baseline", "engine") if (rep + r) % 2 == 0 else ("engine", "baseline")
                out = {}
                for which in order:
                    out[which], ms = self._call(which, g, e)
                    (base_ms if which == "baseline" else eng_ms).append(ms / len(e))
                stats = self.engine.last_stats
                done = np.asarray(stats["computed"])
                engine_requests += 1
                if stats.get("path") == "plain":
                    plain_path += 1
                else:
                    recomputed += int(stats.get("recomputed", 0))
                    truncated_requests += len(e)
                for v in variants:
                    self.variants[v].reset()
                    more_ms[v].append(self._call(v, g, e)[1] / len(e))
                cache_bytes = max(cache_bytes, self.engine.cache_bytes)
                if rep == 0:
                    d, t = _exactness_gy(out["engine"], out["baseline"], done)
                    diff, tail = max(diff, d), max(tail, t)
                    computed += int(done.sum())
                    total += len(e) * self.num_slices
                bar.update()
        bar.close()
        from dota.inference.runtime import peak_rss_bytes

        b, en = spread(base_ms), spread(eng_ms)
        result = {
            "name": name,
            "beamlets": int(sum(len(e) for _, e in requests)),
            "requests": len(requests),
            "repeats": repeats,
            "baseline_ms": b,
            "engine_ms": en,
            "speedup": b["median"] / en["median"],
            "max_abs_diff_rel": diff,
            "tail_rel": tail,
            "computed_fraction": computed / max(1, total),
            "tail_check_recomputed_fraction": recomputed / truncated_requests if truncated_requests else None,
            "plain_path_fraction": plain_path / max(1, engine_requests),
            "warmup_ms": {"baseline": warm_b / len(e0), "engine": warm_e / len(e0)},
            "cache_bytes": int(cache_bytes),
            "cache_stats": _jsonable(_stats_delta(before, self.engine.cache_stats())),
            "peak_rss_bytes": peak_rss_bytes(),
        }
        for v, times in more_ms.items():
            result[f"{v}_ms"] = spread(times)
            result[f"{v}_speedup"] = b["median"] / result[f"{v}_ms"]["median"]
        result.update(extra or {})
        return result

    def margins(self, requests: list[tuple[np.ndarray, np.ndarray]], limit: int) -> dict[str, Any] | None:
        """Truncation margins against the analytic engine for up to ``limit`` beamlets of ``requests``."""
        if self.analytic is None or self.engine.truncation != "physics":
            return None
        g = np.concatenate([r[0] for r in requests])[:limit]
        e = np.concatenate([r[1] for r in requests])[:limit]
        return truncation_margins(self.engine, self.analytic, g, e)


def _stats_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Cache statistics of one scenario: counters as differences, sizes as they are at its end."""
    out: dict[str, Any] = {}
    for name, now in after.items():
        then = before.get(name)
        if isinstance(now, dict) and isinstance(then, dict):
            counters = ("hits", "misses", "evictions", "inserts")
            out[name] = {k: v - then[k] if k in counters else v for k, v in now.items()}
        else:
            out[name] = now
    return out


def _exactness_gy(engine_gy: np.ndarray, plain_gy: np.ndarray, computed: np.ndarray) -> tuple[float, float]:
    diff = tail = 0.0
    for i, k in enumerate(computed.tolist()):
        peak = float(plain_gy[i].max())
        if peak <= 0:
            continue
        diff = max(diff, float(np.abs(engine_gy[i, :k] - plain_gy[i, :k]).max(initial=0.0)) / peak)
        if k < plain_gy.shape[1]:
            tail = max(tail, float(plain_gy[i, k:].max()) / peak)
    return diff, tail


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x


def truncation_margins(engine, analytic, geometry_hu: np.ndarray, energies_mev: np.ndarray) -> dict[str, Any]:
    """How far the engine's cut lies behind the last slice where the analytic dose exceeds the cutoff.

    ``slack_mm``: (cut - 1 - last slice above ``OUTPUT_CUTOFF_FRACTION`` of the maximum) x slice
    thickness, statistics over beamlets (negative would mean the cut removed dose; never seen);
    ``analytic_tail_rel``: largest analytic dose at or beyond the cut relative to the maximum.
    """
    cut = engine.required_slices(geometry_hu, energies_mev)
    dose = analytic.dose(geometry_hu, energies_mev, voxel_mm=engine.model.config.voxel_mm)
    dz = float(engine.model.config.voxel_mm[0])
    slack, tails, cut_short = [], [], 0
    for i, s in enumerate(cut.tolist()):
        per_slice = dose[i].reshape(dose.shape[1], -1).max(axis=1)
        peak = float(per_slice.max())
        if peak <= 0:
            continue
        above = np.flatnonzero(per_slice > OUTPUT_CUTOFF_FRACTION * peak)
        tails.append(float(per_slice[s:].max(initial=0.0)) / peak)
        if s < dose.shape[1]:
            cut_short += 1
            slack.append((s - 1 - int(above.max())) * dz)
    out: dict[str, Any] = {
        "beamlets": int(len(cut)),
        "truncated_beamlets": cut_short,
        "margin_mm": engine.margin_mm,
        "cutoff_fraction": OUTPUT_CUTOFF_FRACTION,
        "analytic_tail_rel_max": max(tails, default=0.0),
    }
    if slack:
        out["slack_mm"] = {
            "min": float(np.min(slack)),
            "p10": float(np.percentile(slack, 10)),
            "median": float(np.median(slack)),
            "max": float(np.max(slack)),
        }
    return out


# ---------------------------------------------------------------------------------------------
# Scenarios


def scenario_single(b: _Bench) -> dict[str, Any]:
    rng = b.rng("single")
    n = b.sizes.single
    g = b.phantoms([PHANTOM_MIX[i % len(PHANTOM_MIX)] for i in range(n)], rng)
    e = b.energies(rng, n)
    requests = [(g[i : i + 1], e[i : i + 1]) for i in range(n)]
    res = b.run("single", requests, repeats=1, variants=["kernels_only", *b.reference_variants])
    res["description"] = (
        f"{n} beamlets, one per request, mixed phantoms, energies 70-220 MeV; kernels_only: the engine "
        "with truncation and caches off (every slice, faster kernels and allocator only)"
    )
    res["margins"] = b.margins(requests, n)
    return res


def scenario_energy_sweep(b: _Bench) -> dict[str, Any]:
    rng = b.rng("energy_sweep")
    geo = b.phantoms(["heterogeneous"], rng)
    lo, hi = b.model.normalization.energy_range_mev
    e = np.clip(SWEEP_ENERGIES_MEV, lo, hi).astype(np.float32)  # within the model's trained range
    request = (np.repeat(geo, len(e), axis=0), e)
    res = b.run("energy_sweep", [request], repeats=b.sizes.sweep_repeats, variants=b.reference_variants)
    res["description"] = f"one heterogeneous geometry, {len(e)} energies 70-220 MeV in one request"
    res["margins"] = b.margins([request], len(e))
    return res


def plan_requests(b: _Bench) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = b.rng("plan")
    lo, hi = b.sizes.plan_layers
    e_lo, e_hi = b.model.normalization.energy_range_mev
    kinds = ["heterogeneous", "lung", "bone", "heterogeneous", "slab"]
    geos = b.phantoms([kinds[i % len(kinds)] for i in range(b.sizes.plan_spots)], rng)
    requests = []
    for geo in geos:
        layers = int(rng.integers(lo, hi + 1))
        top = float(rng.uniform(max(e_lo + 20.0, 120.0), min(e_hi, 200.0)))  # Bragg peaks inside the block
        bottom = max(e_lo, top - 3.0 * (layers - 1))  # about 3 MeV between layers
        energies = np.linspace(top, bottom, layers).astype(np.float32)
        requests.append((np.repeat(geo[None], layers, axis=0), energies))
    return requests


def scenario_plan(b: _Bench) -> dict[str, Any]:
    requests = plan_requests(b)
    res = b.run("plan", requests, repeats=1, variants=b.reference_variants)
    layers = [len(e) for _, e in requests]
    res["description"] = (
        f"{len(requests)} spots (heterogeneous, lung, bone, slab phantoms), {min(layers)}-{max(layers)} energy "
        "layers each about 3 MeV apart (deepest 120-200 MeV), one request per spot"
    )
    res["margins"] = b.margins(requests, 10_000)
    return res


def scenario_prefix(b: _Bench) -> dict[str, Any]:
    rng = b.rng("prefix")
    s = b.sizes
    shared = s.prefix_shared_slices
    requests = []
    for _ in range(s.prefix_groups):
        geos = b.phantoms(["heterogeneous"] * (1 + s.prefix_variants), rng)
        geos[1:, :shared] = geos[0, :shared]  # same entrance and leading anatomy, different distal part
        energy = float(rng.uniform(195.0, min(220.0, b.model.normalization.energy_range_mev[1])))
        requests += [(geos[i : i + 1], np.array([energy], np.float32)) for i in range(len(geos))]
    group = 1 + s.prefix_variants
    res = b.run("prefix", requests, repeats=s.prefix_rounds, reset_every=len(requests))
    res["description"] = (
        f"{s.prefix_groups} x {group} single-beamlet requests at one energy (195-220 MeV) whose geometries share "
        f"their first {shared} slices; caches cleared once per round of {len(requests)} requests"
    )
    res["hit_rate"] = _hit_rate(res["cache_stats"])
    return res


def _hit_rate(stats: dict[str, Any]) -> float | None:
    prefix = stats.get("prefix_cache")
    if not prefix:
        return None
    looked = prefix["hits"] + prefix["misses"]
    return prefix["hits"] / looked if looked else None


def scenario_batch(b: _Bench) -> dict[str, Any]:
    rng = b.rng("batch")
    s = b.sizes
    n = s.batch_beamlets
    g = b.phantoms([PHANTOM_MIX[i % len(PHANTOM_MIX)] for i in range(n)], rng)
    e = b.energies(rng, n)
    points = []
    saved = b.batch_size
    try:
        for size in s.batch_sizes:
            b.batch_size = size
            requests = [(g[i : i + size], e[i : i + size]) for i in range(0, n, size)]
            p = b.run(f"batch {size}", requests, repeats=s.batch_rounds)
            p["batch_size"] = size
            points.append(p)
    finally:
        b.batch_size = saved
    best_b = min(points, key=lambda p: p["baseline_ms"]["median"])
    best_e = min(points, key=lambda p: p["engine_ms"]["median"])
    return {
        "name": "batch",
        "description": f"{n} distinct beamlets (mixed phantoms and energies) in requests of {list(s.batch_sizes)}; "
        "headline: each variant at its fastest batch size",
        "beamlets": n,
        "baseline_ms": best_b["baseline_ms"],
        "engine_ms": best_e["engine_ms"],
        "baseline_best_batch": best_b["batch_size"],
        "engine_best_batch": best_e["batch_size"],
        "speedup": best_b["baseline_ms"]["median"] / best_e["engine_ms"]["median"],
        "max_abs_diff_rel": max(p["max_abs_diff_rel"] for p in points),
        "tail_rel": max(p["tail_rel"] for p in points),
        "computed_fraction": points[0]["computed_fraction"],
        "warmup_ms": points[0]["warmup_ms"],
        "cache_bytes": max(p["cache_bytes"] for p in points),
        "peak_rss_bytes": max(p["peak_rss_bytes"] for p in points),
        "batch_curve": [
            {k: p[k] for k in ("batch_size", "baseline_ms", "engine_ms", "speedup", "max_abs_diff_rel", "requests")}
            for p in points
        ],
    }


SCENARIO_FUNCS: dict[str, Callable[[_Bench], dict[str, Any]]] = {
    "single": scenario_single,
    "energy_sweep": scenario_energy_sweep,
    "plan": scenario_plan,
    "prefix": scenario_prefix,
    "batch": scenario_batch,
}


# ---------------------------------------------------------------------------------------------
# bench.json

#: Version of the layout of ``bench.json`` (:class:`BenchFile`); raised when a key changes meaning.
BENCH_VERSION = 1


class Spread(TypedDict):
    """Milliseconds per beamlet over requests (:func:`spread`)."""

    median: float
    p10: float
    p90: float
    n: int


class PerVariant(TypedDict):
    """Milliseconds per beamlet of one call of the plain pass and of the engine."""

    baseline: float
    engine: float


class SlackStats(TypedDict):
    min: float
    p10: float
    median: float
    max: float


class Margins(TypedDict):
    """Truncation margins against the analytic engine (:func:`truncation_margins`)."""

    beamlets: int
    truncated_beamlets: int
    margin_mm: float
    cutoff_fraction: float
    analytic_tail_rel_max: float
    slack_mm: NotRequired[SlackStats]  # when a beamlet was truncated


class CacheStats(TypedDict):
    """The engine's caches at the end of a scenario (counters: during it)."""

    geometry_cache: dict[str, int]
    prefix_cache: dict[str, int] | None
    kv_buffer_bytes: int


class BatchPoint(TypedDict):
    batch_size: int
    baseline_ms: Spread
    engine_ms: Spread
    speedup: float
    max_abs_diff_rel: float
    requests: int


class Scenario(TypedDict):
    """One scenario of ``bench.json``: the keys of :meth:`_Bench.run` and of the scenario functions."""

    name: str
    description: str
    beamlets: int
    baseline_ms: Spread
    engine_ms: Spread
    speedup: float
    max_abs_diff_rel: float
    tail_rel: float
    computed_fraction: float
    warmup_ms: PerVariant
    cache_bytes: int
    peak_rss_bytes: int
    requests: NotRequired[int]
    repeats: NotRequired[int]
    tail_check_recomputed_fraction: NotRequired[float | None]  # None: no request was truncated
    plain_path_fraction: NotRequired[float]
    cache_stats: NotRequired[CacheStats]
    kernels_only_ms: NotRequired[Spread]  # single: the engine with truncation and caches off
    kernels_only_speedup: NotRequired[float]
    analytic_ms: NotRequired[Spread]  # the analytic pencil beam on the same requests, when available
    analytic_speedup: NotRequired[float]
    margins: NotRequired[Margins | None]
    hit_rate: NotRequired[float | None]  # prefix: block hit rate of the prefix cache
    baseline_best_batch: NotRequired[int]  # batch: the fastest batch size of each variant
    engine_best_batch: NotRequired[int]
    batch_curve: NotRequired[list[BatchPoint]]


class Machine(TypedDict):
    """:func:`dota.inference.runtime.machine_info` after the run, with the load before and what was set."""

    cpu: str
    cores_available: int
    cpu_flags: list[str]
    python: str
    torch: str
    torch_threads: int
    omp_wait_policy: str
    load_average: list[float]
    load_average_before: list[float]
    threads_set: int
    allocator_tuned: bool


class BenchModel(TypedDict):
    source: str
    weights: str
    config: dict[str, Any]
    parameters: int
    precision: str
    compile: bool
    baseline_batch_size: int


class EngineSettings(TypedDict):
    truncation: str
    margin_mm: float
    verify_tail: bool
    cutoff_fraction: float
    chunk_slices: int
    prefix_block_slices: int | None
    geometry_cache_max_bytes: int
    prefix_cache_max_bytes: int


class BenchFile(TypedDict):
    """``bench.json``: what :func:`run_benchmark` writes and returns."""

    version: int
    machine: Machine
    model: BenchModel
    engine: EngineSettings
    cold_start_ms: PerVariant  # the process's first call (ms, one beamlet)
    path_decisions: dict[str, str]  # kind of request -> the path the auto engine chose, with its times
    quick: bool
    seed: int
    command: str
    torch: str
    python: str
    wall_s: float
    scenarios: list[Scenario]


def read_bench(path: str | Path) -> BenchFile:
    """``bench.json`` read and checked; :class:`~dota.errors.DataFileError` (one line naming the file and the
    key) when a key is missing or of the wrong type."""
    return read_json(path, BenchFile, BENCH_VERSION)


# ---------------------------------------------------------------------------------------------
# Entry point


def run_benchmark(
    out_dir: str | Path,
    *,
    model: Any = "default",
    quick: bool = False,
    scenarios: Sequence[str] | None = None,
    seed: int = 0,
    threads: int | None = None,
    progress: bool = True,
    precision: str = "fp32",
    compile: bool = False,
    batch_size: int = 8,
    sizes: Sizes | None = None,
    command: str | None = None,
) -> BenchFile:
    """Benchmark the inference engine against the plain full pass; write ``bench.json``,
    ``bench.md`` and PNG plots to ``out_dir``; return the JSON content.

    Parameters
    ----------
    model : str or DoTA
        ``"default"`` (the shipped trained model), a checkpoint path, a preset name (random weights,
        ``seed``: on request only), or a model.
    quick : bool
        Small scenarios (under 2 minutes for the paper preset on 2 cores).
    scenarios : names from :data:`SCENARIOS` (default all).
    threads : torch intra-op threads (default: one per available core).
    precision, compile : engine options (bf16 is not exact: its error shows in ``max_abs_diff_rel``).
    batch_size : batch of the plain pass (the batch scenario varies it).
    sizes : override the scenario sizes (tests).
    command : the command line recorded in the outputs (the CLI passes its own).
    """
    import torch

    from dota.checkpoint import load_model
    from dota.inference import InferenceEngine
    from dota.inference.runtime import configure_runtime, machine_info
    from dota.model import DoTA

    names = list(SCENARIOS if scenarios is None else scenarios)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown or not names:
        raise InputError(f"unknown benchmark scenarios {unknown}; choose from {', '.join(SCENARIOS)}")
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    runtime = configure_runtime(threads, set_threads=True)
    net = model if isinstance(model, DoTA) else load_model(model, seed=seed)
    net.eval()
    # Random weights put "dose" everywhere, so the tail check would recompute every beamlet in full:
    # for them the benchmark times the truncated engine and reports the tail separately (tail_rel).
    from dota.checkpoint import DEFAULT_MODEL
    from dota.model import PRESETS

    random_weights = isinstance(model, str) and model != DEFAULT_MODEL and model in PRESETS
    engine = InferenceEngine(net, precision=precision, compile=compile, verify_tail=not random_weights)
    baseline = InferenceEngine(net)
    baseline.enabled = False
    try:
        from dota.engines import get_engine

        analytic = get_engine("analytic")
    except Exception as exc:  # the margin check is skipped, and says so, without the analytic engine
        log.warning("analytic engine unavailable (%s): no truncation margin check", exc)
        analytic = None
    bench = _Bench(net, engine, baseline, sizes or (QUICK if quick else FULL), seed, batch_size, progress, analytic)
    if analytic is not None:
        bench.variants["analytic"] = _DoseEngineRunner(analytic, net.config.voxel_mm)
        bench.reference_variants.append("analytic")
    bench.variants["kernels_only"] = InferenceEngine(
        net, truncation="none", share_geometry=False, geometry_cache_bytes=0, prefix_cache_bytes=0,
        precision=precision, compile=compile,
    )

    # the process's first call of each variant (one beamlet)
    rng = bench.rng("cold")
    g = bench.phantoms(["heterogeneous"], rng)
    e = np.array([150.0], np.float32)
    cold = {}
    for which in ("baseline", "engine"):
        _, cold[which] = bench._call(which, g, e)
    engine.reset()

    load_before = machine_info()["load_average"]
    results = []
    for name in names:
        log.info("bench: scenario %s", name)
        results.append(SCENARIO_FUNCS[name](bench))
    info = machine_info()
    info["load_average_before"] = load_before
    info["threads_set"] = runtime["threads"]
    info["allocator_tuned"] = runtime["allocator_tuned"]
    source = str(model) if not isinstance(model, DoTA) else "given model"
    report = {
        "version": BENCH_VERSION,
        "machine": info,
        "model": {
            "source": source,
            "weights": f"random (seed {seed})" if random_weights else "checkpoint",
            "config": _jsonable(asdict(net.config)),
            "parameters": net.num_parameters(),
            "precision": precision,
            "compile": compile,
            "baseline_batch_size": batch_size,
        },
        "engine": {
            "truncation": engine.truncation,
            "margin_mm": engine.margin_mm,
            "verify_tail": engine.verify_tail,
            "cutoff_fraction": engine.cutoff_fraction,
            "chunk_slices": engine.chunk_slices,
            "prefix_block_slices": engine.prefix_cache.block_slices if engine.prefix_cache else None,
            "geometry_cache_max_bytes": engine.geometry_cache.max_bytes,
            "prefix_cache_max_bytes": engine.prefix_cache.max_bytes if engine.prefix_cache else 0,
        },
        "cold_start_ms": cold,
        "path_decisions": engine.chooser.decisions() if engine.path == "auto" else {"all requests": engine.path},
        "quick": quick,
        "seed": seed,
        "command": command or f"run_benchmark({str(out_dir)!r}, model={source!r}, quick={quick})",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "wall_s": time.perf_counter() - started,
        "scenarios": results,
    }
    report: BenchFile = _jsonable(report)
    (out_dir / "bench.json").write_text(json.dumps(report, indent=2))
    write_plots(report, out_dir)
    (out_dir / "bench.md").write_text(summary_markdown(report))
    return report


# ---------------------------------------------------------------------------------------------
# Output


def write_plots(report: BenchFile, out_dir: Path) -> list[Path]:
    """``speedup.png`` (ms per beamlet of both variants and the speed-up, every scenario) and ``batch.png``
    (ms per beamlet and speed-up against batch size) when the batch scenario ran: the report's figures."""
    from dota.report import figures as F

    m, mod = report["machine"], report["model"]
    timings = [F.scenario_timing(s) for s in report["scenarios"]]
    title = f"{mod['source']} ({mod['precision']}), {m['torch_threads']} threads"
    paths = [F.latency_figure(timings, out_dir / "speedup.png", title=title)]
    curves = F.batch_curves(report["scenarios"])
    if curves:
        paths.append(F.batch_curve_figure(curves, out_dir / "batch.png", title=title))
    return paths


def _ms(s: dict[str, float]) -> str:
    return f"{s['median']:.1f} [{s['p10']:.1f}, {s['p90']:.1f}]"


def summary_markdown(report: BenchFile) -> str:
    """The benchmark as a markdown page: machine, model, one row per scenario, margins, notes."""
    m, mod = report["machine"], report["model"]
    lines = [
        "# dota bench",
        "",
        f"Command: `{report['command']}`" + (" (quick)" if report["quick"] else ""),
        "",
        f"Machine: {m['cpu']}, {m['cores_available']} cores available, torch {m['torch']}, "
        f"{m['torch_threads']} threads, flags {', '.join(m['cpu_flags']) or 'n/a'}, allocator "
        f"{'tuned (mallopt)' if m['allocator_tuned'] else 'default'}, OpenMP wait "
        f"{m['omp_wait_policy']}; load average "
        f"{m['load_average_before']} before, {m['load_average']} after (1, 5, 15 min).",
        "",
        f"Model: {mod['source']}, {mod['weights']}, {mod['parameters'] / 1e6:.2f} M parameters, "
        f"{mod['config']['num_blocks']} block(s), num_forward {mod['config']['num_forward']}, {mod['precision']}"
        f"{', torch.compile' if mod['compile'] else ''}; plain pass in batches of {mod['baseline_batch_size']}.",
        "",
        f"Cold start (first call in the process, one beamlet): plain {report['cold_start_ms']['baseline']:.0f} ms, "
        f"engine {report['cold_start_ms']['engine']:.0f} ms.",
        "",
        "| scenario | beamlets | plain ms/beamlet (median [p10, p90]) | engine ms/beamlet | speedup | "
        "slices computed | max abs diff / max (computed slices) | plain-pass dose beyond the cut / max | "
        "cache MiB | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["scenarios"]:
        lines.append(
            f"| {r['name']} | {r['beamlets']} | {_ms(r['baseline_ms'])} | {_ms(r['engine_ms'])} | "
            f"**{r['speedup']:.2f}x** | {100 * r['computed_fraction']:.0f} % | {r['max_abs_diff_rel']:.1e} | "
            f"{r['tail_rel']:.1e} | {r['cache_bytes'] / 2**20:.0f} | {r['peak_rss_bytes'] / 2**20:.0f} |"
        )
    lines.append("")
    for r in report["scenarios"]:
        lines.append(f"- **{r['name']}**: {r['description']}.")
        if r["name"] == "batch":
            pts = ", ".join(f"{p['batch_size']}: {p['baseline_ms']['median']:.1f} / {p['engine_ms']['median']:.1f} ms"
                            for p in r["batch_curve"])
            lines.append(f"  Per batch size (plain / engine, median ms per beamlet): {pts}.")
        if "kernels_only_ms" in r:
            lines.append(
                f"  Engine without truncation or caches (kernels, allocator, channels-last only): "
                f"{_ms(r['kernels_only_ms'])} ms per beamlet, {r['kernels_only_speedup']:.2f}x."
            )
        if r.get("hit_rate") is not None:
            lines.append(f"  Prefix-cache block hit rate {100 * r['hit_rate']:.0f} %.")
        if "analytic_ms" in r:
            lines.append(f"  Analytic pencil-beam engine on the same requests: {_ms(r['analytic_ms'])} ms per beamlet.")
        if r.get("tail_check_recomputed_fraction") is not None or r.get("plain_path_fraction"):
            rec = r.get("tail_check_recomputed_fraction")
            lines.append(
                f"  Requests the engine sent to the plain pass (auto path): {100 * r.get('plain_path_fraction', 0):.0f} %"
                + ("" if rec is None else f"; beamlets its tail check recomputed in full: {100 * rec:.0f} %") + ".")
    if report["path_decisions"]:
        lines += ["", "Engine path per kind of request (auto: the faster of the truncated, cached engine and "
                  "the plain pass, measured): " + "; ".join(f"{k}: {v}" for k, v in report["path_decisions"].items()) + "."]
    margins = [(r["name"], r["margins"]) for r in report["scenarios"] if r.get("margins")]
    if margins:
        lines += [
            "",
            f"Truncation margin against the analytic engine (margin {report['engine']['margin_mm']:g} mm water, "
            f"cutoff {report['engine']['cutoff_fraction']:g} of the maximum): slack = cut depth minus the deepest "
            "slice where the analytic dose exceeds the cutoff.",
            "",
            "| scenario | beamlets (truncated) | slack min / p10 / median / max (mm) | "
            "analytic dose at or beyond the cut / max |",
            "|---|---|---|---|",
        ]
        for name, mg in margins:
            sl = mg.get("slack_mm")
            sl_txt = f"{sl['min']:.0f} / {sl['p10']:.0f} / {sl['median']:.0f} / {sl['max']:.0f}" if sl else "n/a"
            lines.append(
                f"| {name} | {mg['beamlets']} ({mg['truncated_beamlets']}) | {sl_txt} | "
                f"{mg['analytic_tail_rel_max']:.1e} |"
            )
    lines += [
        "",
        "Notes: times are per beamlet; each request ran through both variants back to back, the order "
        "alternating; warm-up calls are excluded; peak RSS is the process's high-water mark so far. "
        "`max abs diff` compares the engine with the plain pass on "
        "every slice the engine computed; slices beyond the cut are returned as zero and the plain pass's "
        "dose there is reported separately (random weights put dose everywhere; for a trained model it "
        f"must stay below the output cutoff {OUTPUT_CUTOFF_FRACTION:g}).",
        "",
    ]
    return "\n".join(lines)


__all__ = ["SCENARIOS", "QUICK", "FULL", "Sizes", "run_benchmark", "truncation_margins", "summary_markdown"]
