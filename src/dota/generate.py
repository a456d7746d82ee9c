"""Generate beamlet datasets with any dose engine: deterministic, parallel and resumable.

Every beamlet is fixed in advance by the master seed (its energy, geometry source and a seed of its own),
so the same call gives the same file whether it runs serially, on Ray workers, or is killed and resumed.
Work is done in groups of beamlets; each finished group is written atomically to a parts folder next to
the output (``OUT.h5.parts/``), a resumed run skips the groups found there, and the parts are merged in
beamlet order into the HDF5 file at the end (atomically as well), after which the folder is removed.

Example::

    generate_dataset("water.h5", engine="analytic", phantom="water", energies=[70, 100, 150, 200, 225])
    generate_dataset("mc.h5", engine="mcsquare", engine_kwargs={"primaries": 10_000}, n_beamlets=200,
                     energy_range_mev=(70, 220), ct="all", workers=2, resume=True)
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dota.constants import BLOCK_SHAPE, HU_CLIP, VOXEL_MM
from dota.engines.base import beamlet_seed
from dota.errors import DataFileError, DiskFullError, InputError
from dota.fileio import atomic_write, check_output, is_disk_full

logger = logging.getLogger(__name__)

_PARTS_SUFFIX = ".parts"
_MANIFEST = "manifest.json"
#: Beamlets per task when none is given: one MC run is seconds (4 amortise the task and part-file costs),
#: an analytic beamlet milliseconds.
_DEFAULT_GROUP_SIZE = {"mcsquare": 4}
_DEFAULT_GROUP_SIZE_OTHER = 16


@dataclass(frozen=True)
class BeamletSpec:
    """One beamlet to generate, fully determined by the master seed and its index."""

    index: int
    energy_mev: float
    source: str  # "phantom:<kind>" or "ct:<path>"
    master_seed: int
    #: For a beamlet whose energy follows its geometry (``peak_in_body``): the energy range to keep it in
    #: and the uniform number in [0, 1) that places its Bragg peak along the body (see
    #: :func:`peak_in_body_energy`); ``energy_mev`` is then only the fallback for a block without body.
    peak_bounds_mev: tuple[float, float] | None = None
    peak_u: float | None = None

    def rng(self, stream: int) -> np.random.Generator:
        """Independent random stream ``stream`` of this beamlet (0: geometry)."""
        return np.random.default_rng(np.random.SeedSequence(self.master_seed, spawn_key=(self.index, stream)))

    @property
    def seed(self) -> int:
        """The engine's seed for this beamlet (e.g. MCsquare's RNG_Seed), in 1 .. 2**31 - 1: stream 1,
        :func:`dota.engines.base.beamlet_seed`."""
        return beamlet_seed(self.master_seed, self.index)


# --------------------------------------------------------------------------------------------------
# Sources and specs


def default_ct_root() -> Path:
    """``$DOTA_CT_DIR``, else ``shared/data/ct`` beside the repository (or the working directory)."""
    if os.environ.get("DOTA_CT_DIR"):
        return Path(os.environ["DOTA_CT_DIR"]).expanduser()
    candidates = [Path.cwd().parent / "shared" / "data" / "ct",
                  Path(__file__).resolve().parents[3] / "shared" / "data" / "ct"]
    for c in candidates:
        if c.is_dir():
            return c
    raise DataFileError("no CT folder found: set DOTA_CT_DIR or pass CT paths explicitly")


def resolve_sources(phantom: str | Sequence[str] | None = None,
                    ct: str | os.PathLike | Sequence[str | os.PathLike] | None = None) -> list[str]:
    """Geometry sources as strings ``phantom:<kind>`` / ``ct:<path>``.

    ``phantom`` is a kind of :data:`dota.physics.PHANTOM_KINDS` (or several, or a comma-separated list);
    ``ct`` is ``"all"`` (every CT under :func:`default_ct_root`), a CT file, a DICOM folder, a folder
    holding several CTs, or a list of those.
    """
    sources: list[str] = []
    if phantom is not None:
        from dota.physics import PHANTOM_KINDS

        kinds = phantom.split(",") if isinstance(phantom, str) else list(phantom)
        for kind in (k.strip() for k in kinds):
            if kind not in PHANTOM_KINDS:
                raise InputError(f"unknown phantom kind {kind!r}; choose from {', '.join(PHANTOM_KINDS)}")
            sources.append(f"phantom:{kind}")
    if ct is not None:
        from dota.data.ct import find_ct_sources

        items = [ct] if isinstance(ct, (str, os.PathLike)) else list(ct)
        for item in items:
            if str(item) == "all":
                paths = find_ct_sources(default_ct_root())
            else:
                path = Path(item).expanduser()
                if not path.exists():
                    raise InputError(f"no CT at {path}")
                is_dicom_dir = path.is_dir() and any(p.suffix.lower() == ".dcm" for p in path.iterdir())
                paths = find_ct_sources(path) if path.is_dir() and not is_dicom_dir else [path]
            if not paths:
                raise InputError(f"no CT found in {item}")
            sources.extend(f"ct:{p.resolve()}" for p in paths)
    if not sources:
        raise InputError("give a geometry source: a phantom kind or CT data")
    return sources


def make_specs(n_beamlets: int | None, sources: Sequence[str], seed: int, *,
               energies: Sequence[float] | None = None,
               energy_range_mev: tuple[float, float] | None = None,
               balance_sites: bool = False, peak_in_body: float = 0.0) -> list[BeamletSpec]:
    """The beamlets of a run, in order. Depends only on the arguments (never on workers or timing).

    Listed ``energies`` are cycled (every source gets every energy in turn); an ``energy_range_mev`` is
    sampled uniformly per beamlet. With ``peak_in_body`` (a fraction, with an energy range), that share
    of the beamlets instead takes the energy that puts its range at a random point of the body on its
    axis (:func:`peak_in_body_energy`, decided once its block is cut): plans place their Bragg peaks in
    the patient, where a uniform energy often stops in air beyond it or leaves the block.
    Without ``n_beamlets``, one beamlet per listed energy and source.
    With ``balance_sites``, beamlets go to the anatomical sites in turn (:func:`dota.data.splits.site_of`)
    and to the sources of a site in turn, so every site gets the same share whatever its number of files.
    """
    if balance_sites:
        from dota.data.splits import site_balanced_order

        groups = site_balanced_order(sources)

        def source_of(k: int) -> str:
            _, members = groups[k % len(groups)]
            return members[(k // len(groups)) % len(members)]
    else:

        def source_of(k: int) -> str:
            return sources[k % len(sources)]

    if (energies is None) == (energy_range_mev is None):
        raise InputError("give either a list of energies or an energy range")
    if energies is not None:
        energies = [float(e) for e in energies]
        if not energies:
            raise InputError("the list of energies is empty")
        if n_beamlets is None:
            n_beamlets = len(energies) * len(sources)
    else:
        lo, hi = (float(v) for v in energy_range_mev)  # type: ignore[union-attr]
        if not lo <= hi:
            raise InputError(f"energy range {lo:g}:{hi:g} MeV is empty")
        if n_beamlets is None:
            raise InputError("an energy range needs a number of beamlets")
    if int(n_beamlets) < 1:
        raise InputError(f"number of beamlets must be positive, got {n_beamlets}")
    peak_in_body = float(peak_in_body)
    if not 0.0 <= peak_in_body <= 1.0:
        raise InputError(f"peak_in_body is a fraction of the beamlets, in [0, 1]; got {peak_in_body:g}")
    if peak_in_body > 0 and energies is not None:
        raise InputError("--peak-in-body chooses energies within an --energy-range; it does not apply to "
                         "listed --energies")
    specs = []
    for i in range(int(n_beamlets)):
        if energies is not None:
            energy = energies[i % len(energies)]
            source = source_of(i // len(energies))
        else:
            energy = float(np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(i, 2))).uniform(lo, hi))
            energy = round(energy, 3)
            source = source_of(i)
        bounds = u = None
        if peak_in_body > 0:
            draw = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(i, 3))).random(2)
            if draw[0] < peak_in_body:
                bounds, u = (lo, hi), float(draw[1])
        specs.append(BeamletSpec(index=i, energy_mev=energy, source=source, master_seed=int(seed),
                                 peak_bounds_mev=bounds, peak_u=u))
    return specs


def peak_in_body_energy(block_hu: np.ndarray, u: float, bounds_mev: tuple[float, float],
                        voxel_mm: tuple[float, float, float] = VOXEL_MM) -> float | None:
    """The energy (MeV, 3 decimals) whose CSDA range in water is the water-equivalent depth of a point
    on the block's axis, placed at fraction ``u`` of the way from the first to the last body voxel there.

    The axis is the block's central column (the mean stopping power of its central 2 x 2 voxels when the
    width is even); body is above :data:`dota.data.ct.BODY_THRESHOLD_HU`, air cavities between its first
    and last voxel included. The energy is kept within ``bounds_mev``; ``None`` when the axis meets no
    body.
    """
    from dota.data.ct import BODY_THRESHOLD_HU
    from dota.physics import energy_from_csda_range_mev, hu_to_rsp

    _, h, w = block_hu.shape
    rows = slice((h - 1) // 2, h // 2 + 1)
    cols = slice((w - 1) // 2, w // 2 + 1)
    axis_hu = np.asarray(block_hu[:, rows, cols], dtype=np.float64)
    body = np.flatnonzero((axis_hu > BODY_THRESHOLD_HU).any(axis=(1, 2)))
    if len(body) == 0:
        return None
    dz = float(voxel_mm[0])
    rsp = hu_to_rsp(axis_hu).mean(axis=(1, 2))
    wed_at_faces = np.concatenate([[0.0], np.cumsum(rsp * dz)])  # WED at the upstream face of each slice
    depth_mm = (body[0] + float(u) * (body[-1] + 1 - body[0])) * dz
    wed = float(np.interp(depth_mm, dz * np.arange(len(wed_at_faces)), wed_at_faces))
    lo, hi = bounds_mev
    energy = float(energy_from_csda_range_mev(max(wed, 1e-3)))
    return round(min(max(energy, lo), hi), 3)


# --------------------------------------------------------------------------------------------------
# Work done per group (in-process or on a Ray worker)


@functools.lru_cache(maxsize=16)
def _ct(path: str) -> tuple[Any, np.ndarray]:
    from dota.data.ct import body_mask, read_ct

    volume = read_ct(path)
    return volume, body_mask(volume)


def build_geometry(spec: BeamletSpec, block_shape: tuple[int, int, int] = BLOCK_SHAPE,
                   voxel_mm: tuple[float, float, float] = VOXEL_MM) -> tuple[np.ndarray, dict[str, Any]]:
    """The block (int16 HU, clipped to the HU range engines use) of ``spec`` and its metadata."""
    rng = spec.rng(0)
    kind, _, name = spec.source.partition(":")
    if kind == "phantom":
        from dota.physics import make_phantom

        block = make_phantom(name, rng, block_shape, voxel_mm)
        meta = {"source": spec.source, "gantry_deg": 0.0, "couch_deg": 0.0, "spot_offset_mm": (0.0, 0.0)}
    elif kind == "blocks":
        path, _, index = name.rpartition("#")
        block = _blocks_file_block(path, int(index))
        if tuple(block.shape) != tuple(block_shape):
            raise InputError(f"{path} holds blocks of {tuple(block.shape)}, not {tuple(block_shape)}: "
                             f"pass --block-shape {'x'.join(str(v) for v in block.shape)}")
        meta = {"source": f"blocks:{Path(path).name}#{index}", "gantry_deg": 0.0, "couch_deg": 0.0,
                "spot_offset_mm": (0.0, 0.0)}
        meta.update(_blocks_file_meta(path, int(index)))
    elif kind == "ct":
        from dota.data.ct import extract_bev_block, sample_beamlet_pose

        volume, mask = _ct(name)
        pose = sample_beamlet_pose(volume, rng, mask=mask)
        block = extract_bev_block(volume.hu, volume.spacing_mm, pose.entry_point_mm, pose.gantry_deg,
                                  pose.couch_deg, pose.offset_mm, block_shape, voxel_mm)
        meta = {"source": f"ct:{volume.name}", "gantry_deg": pose.gantry_deg, "couch_deg": pose.couch_deg,
                "spot_offset_mm": pose.offset_mm}
    else:
        raise InputError(f"unknown geometry source {spec.source!r}")
    return np.rint(np.clip(block, *HU_CLIP)).astype(np.int16), meta


def _blocks_file_block(path: str, index: int) -> np.ndarray:
    from dota.data.hdf5 import BeamletFile

    with BeamletFile(path) as f:
        return np.asarray(f.geometry[index], dtype=np.float32)


@functools.lru_cache(maxsize=4)
def _blocks_file_meta_all(path: str) -> dict[str, np.ndarray]:
    from dota.data.hdf5 import BeamletFile

    with BeamletFile(path) as f:
        return f.meta


def _blocks_file_meta(path: str, index: int) -> dict[str, Any]:
    """The pose metadata a user's blocks file carries (source, angles, offset), where it has them."""
    meta = _blocks_file_meta_all(path)
    found: dict[str, Any] = {}
    for key in ("source", "gantry_deg", "couch_deg"):
        if key in meta:
            found[key] = meta[key][index].item() if hasattr(meta[key][index], "item") else meta[key][index]
    if "spot_offset_mm" in meta:
        found["spot_offset_mm"] = tuple(float(v) for v in np.asarray(meta["spot_offset_mm"][index]).reshape(-1)[:2])
    return found


def geometry_file_specs(path: str | os.PathLike, seed: int, n_beamlets: int | None = None) -> list[BeamletSpec]:
    """One beamlet per block of a user's dataset file (its own energy), for recomputing its dose."""
    from dota.data.hdf5 import BeamletFile

    path = Path(path).expanduser().resolve()
    with BeamletFile(path) as f:
        energies = np.asarray(f.energy, dtype=np.float64)
    if len(energies) == 0:
        raise InputError(f"{path} holds no blocks")
    count = len(energies) if n_beamlets is None else min(int(n_beamlets), len(energies))
    return [BeamletSpec(index=i, energy_mev=round(float(energies[i]), 3), source=f"blocks:{path}#{i}",
                        master_seed=int(seed)) for i in range(count)]


@functools.lru_cache(maxsize=4)
def _engine(name: str, kwargs_json: str) -> Any:
    from dota.engines import get_engine

    kwargs = json.loads(kwargs_json)
    try:
        return get_engine(name, **kwargs)
    except TypeError as exc:  # a parameter this engine does not take
        raise InputError(f"the {name} engine does not accept the parameters {sorted(kwargs)}: {exc}") from None


def _match_priority(niceness: int | None) -> None:
    """Run at the driver's priority. Ray starts its workers at niceness 15 (seen here: MCsquare under Ray
    got a third of the cores' time as soon as anything else ran, 4,600 instead of 11,000 beamlets/h);
    raising the priority back needs the privilege to do so, so this is best effort."""
    if niceness is None or not hasattr(os, "getpriority"):
        return
    try:
        if os.getpriority(os.PRIO_PROCESS, 0) > niceness:
            os.setpriority(os.PRIO_PROCESS, 0, niceness)
    except OSError:  # not permitted: the worker keeps Ray's niceness
        pass


def _energy_of(spec: BeamletSpec, block: np.ndarray, voxel_mm: tuple[float, float, float]) -> float:
    if spec.peak_bounds_mev is None:
        return spec.energy_mev
    matched = peak_in_body_energy(block, spec.peak_u, spec.peak_bounds_mev, voxel_mm)  # type: ignore[arg-type]
    return spec.energy_mev if matched is None else matched


def run_group(specs: Sequence[BeamletSpec], engine: str, engine_kwargs_json: str,
              block_shape: tuple[int, int, int], voxel_mm: tuple[float, float, float],
              niceness: int | None = None) -> dict[str, np.ndarray]:
    """Geometry and dose of a group of beamlets, as the arrays of one part file (at the driver's
    ``niceness`` where the process may raise its priority to it)."""
    from dota.data.ct import geometry_sha256

    _match_priority(niceness)
    eng = _engine(engine, engine_kwargs_json)
    blocks, metas = zip(*(build_geometry(s, block_shape, voxel_mm) for s in specs), strict=True)
    geometry = np.stack(blocks)
    energy = np.array([_energy_of(s, b, voxel_mm) for s, b in zip(specs, geometry, strict=True)],
                      dtype=np.float32)
    seeds = np.array([s.seed for s in specs], dtype=np.int64)
    crash_reruns = getattr(eng, "crash_reruns", [])  # the MCsquare engine's (seed, rerun seed) log
    before = len(crash_reruns)
    dose = eng.dose(geometry, energy, voxel_mm, seeds=seeds.tolist())
    rerun = dict(crash_reruns[before:])  # seed -> the seed a crashed run was redone with
    return {
        "crash_rerun_seed": np.array([rerun.get(int(s), 0) for s in seeds], dtype=np.int64),
        "index": np.array([s.index for s in specs], dtype=np.int64),
        "geometry": geometry,
        "dose": np.asarray(dose, dtype=np.float32),
        "energy": energy,
        "seed": seeds,
        "source": np.array([m["source"] for m in metas]),
        "gantry_deg": np.array([m["gantry_deg"] for m in metas], dtype=np.float32),
        "couch_deg": np.array([m["couch_deg"] for m in metas], dtype=np.float32),
        "spot_offset_mm": np.array([m["spot_offset_mm"] for m in metas], dtype=np.float32).reshape(-1, 2),
        "sha256": np.array([geometry_sha256(b) for b in geometry]),
    }


# --------------------------------------------------------------------------------------------------
# Parts folder


def parts_dir_for(out_path: str | os.PathLike) -> Path:
    out = Path(out_path)
    return out.with_name(out.name + _PARTS_SUFFIX)


def _part_path(parts: Path, group: int) -> Path:
    return parts / f"group_{group:06d}.npz"


def _write_part(parts: Path, group: int, arrays: dict[str, np.ndarray]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)

    atomic_write(_part_path(parts, group), write)


def _read_part(parts: Path, group: int, expected_index: np.ndarray) -> dict[str, np.ndarray] | None:
    try:
        with np.load(_part_path(parts, group), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, KeyError, EOFError):
        return None
    if not np.array_equal(arrays.get("index"), expected_index):
        return None
    return arrays


def _check_manifest(parts: Path, manifest: dict[str, Any]) -> None:
    path = parts / _MANIFEST
    try:
        found = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        raise DataFileError(f"{parts} has no readable {_MANIFEST}: delete the folder to start over") from None
    differing = sorted(k for k in set(found) | set(manifest) if found.get(k) != manifest.get(k))
    if differing:
        raise InputError(f"{parts} was started with different settings ({', '.join(differing)}); "
                         "use the same arguments to resume, or delete the folder to start over")


# --------------------------------------------------------------------------------------------------
# The driver


def generate_dataset(
    out_path: str | os.PathLike,
    *,
    engine: str = "analytic",
    engine_kwargs: dict[str, Any] | None = None,
    n_beamlets: int | None = None,
    energies: Sequence[float] | None = None,
    energy_range_mev: tuple[float, float] | None = None,
    phantom: str | Sequence[str] | None = None,
    ct: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    split: str | None = None,
    balance_sites: bool = False,
    peak_in_body: float = 0.0,
    geometry_file: str | os.PathLike | None = None,
    seed: int = 0,
    resume: bool = False,
    overwrite: bool = False,
    workers: int = 1,
    ray_address: str | None = None,
    group_size: int | None = None,
    block_shape: tuple[int, int, int] = BLOCK_SHAPE,
    voxel_mm: tuple[float, float, float] = VOXEL_MM,
    progress: bool = True,
    keep_parts: bool = False,
    on_group_done: Callable[[int, int], None] | None = None,
    command: str | None = None,
) -> Path:
    """Generate a beamlet dataset (``dataset-format.md``) and return its path.

    Parameters
    ----------
    out_path
        The HDF5 file to write. Finished groups go to ``out_path + ".parts/"`` until the final merge.
    engine, engine_kwargs
        A registered engine (``"analytic"``, ``"mcsquare"``) and its constructor arguments, e.g.
        ``{"primaries": 10_000}`` for MCsquare (each beamlet gets its own MC seed from the master seed).
    n_beamlets, energies, energy_range_mev, phantom, ct, seed
        What to generate; see :func:`make_specs` and :func:`resolve_sources`.
    split
        Keep only the sources of one patient split (``train``, ``val``, ``test``;
        :data:`dota.data.splits.PATIENT_SPLIT`): patients never cross splits.
    balance_sites
        Give every anatomical site the same share of beamlets (:func:`make_specs`).
    peak_in_body
        The fraction of beamlets whose energy puts the Bragg peak at a random point of the body on the
        beam's axis instead of being uniform in ``energy_range_mev`` (:func:`make_specs`).
    geometry_file
        A dataset file whose blocks (and energies) to recompute with ``engine`` instead of sampling
        geometry: e.g. Monte Carlo for blocks a user brings. Excludes phantom, ct and energies.
    resume
        Continue a run whose parts folder exists (same arguments required); without it, an existing
        parts folder is an error, and so is an existing output file unless ``overwrite``.
    overwrite
        Replace an existing output file (never an input: :func:`dota.fileio.check_output`).
    workers, ray_address
        ``workers > 1`` runs groups on a local Ray instance with that many CPUs; ``ray_address`` joins
        an existing Ray cluster. With neither, groups run serially in this process.
    group_size
        Beamlets per task (default 1 for MCsquare, 16 otherwise). Part of the run's identity.
    command
        The command line, recorded in the manifest written beside the output (``OUT.manifest.json``).
    on_group_done
        Called as ``on_group_done(done_beamlets, total)`` after each group is saved (tests use it to
        interrupt a run).
    """
    out = check_output(out_path, inputs=[geometry_file], overwrite=overwrite, resumable=True)
    engine_kwargs = dict(engine_kwargs or {})
    if geometry_file is not None:
        if (phantom is not None or ct is not None or energies is not None or energy_range_mev is not None
                or peak_in_body):
            raise InputError("--geometry takes the blocks and energies of its file: do not combine it with "
                             "--phantom, --ct, --energies, --energy-range or --peak-in-body")
        specs = geometry_file_specs(geometry_file, seed, n_beamlets)
        sources = [f"blocks:{Path(geometry_file).expanduser().resolve()}"]
    else:
        sources = resolve_sources(phantom, ct)
        if split is not None:
            from dota.data.splits import select_split

            sources = select_split(sources, split)
        specs = make_specs(n_beamlets, sources, seed, energies=energies, energy_range_mev=energy_range_mev,
                           balance_sites=balance_sites, peak_in_body=peak_in_body)
    if group_size is None:
        group_size = _DEFAULT_GROUP_SIZE.get(engine, _DEFAULT_GROUP_SIZE_OTHER)
    if int(group_size) < 1:
        raise InputError(f"group_size must be positive, got {group_size}")
    if int(workers) < 1:
        raise InputError(f"workers must be positive, got {workers}")
    groups = [specs[i : i + group_size] for i in range(0, len(specs), group_size)]

    eng = _engine(engine, json.dumps(engine_kwargs, sort_keys=True))
    lo, hi = eng.energy_range_mev
    bad = [s.energy_mev for s in specs if not lo - 1e-3 <= s.energy_mev <= hi + 1e-3]
    if bad:
        raise InputError(f"energy {bad[0]:g} MeV is outside the range {lo:g}-{hi:g} MeV of the {engine} engine")
    manifest = {
        "format": 1,
        "engine": engine,
        "engine_kwargs": engine_kwargs,
        "n_beamlets": len(specs),
        "energies": None if energies is None else [float(e) for e in energies],
        "energy_range_mev": None if energy_range_mev is None else [float(v) for v in energy_range_mev],
        "sources": sources,
        "split": split,
        "balance_sites": bool(balance_sites),
        # only when used: runs started before the option existed keep their manifest and still resume
        **({"peak_in_body": float(peak_in_body)} if peak_in_body else {}),
        "seed": int(seed),
        "group_size": int(group_size),
        "block_shape": [int(v) for v in block_shape],
        "voxel_mm": [float(v) for v in voxel_mm],
    }

    parts = parts_dir_for(out)
    created_parts = False
    if parts.exists():
        if not resume:
            raise InputError(f"{parts} holds an unfinished run: pass resume=True (--resume) to continue it")
        _check_manifest(parts, manifest)
    else:
        if out.exists():
            if resume and _same_run(out, manifest):
                logger.info("%s is already complete", out)
                return out
            if not overwrite:
                raise InputError(f"{out} exists: pass --overwrite to replace it, delete it, or choose another "
                                 "output path")
        try:
            parts.mkdir(parents=True)
            created_parts = True
            _write_json_atomic(parts / _MANIFEST, manifest)
        except BaseException:
            if created_parts:
                shutil.rmtree(parts, ignore_errors=True)
            raise
    try:
        return _generate(out, parts, specs, groups, engine, engine_kwargs, eng, manifest, block_shape, voxel_mm,
                         workers, ray_address, progress, keep_parts, on_group_done, command)
    except BaseException as exc:
        saved = sorted(parts.glob("group_*.npz")) if parts.is_dir() else []
        if created_parts and not saved:  # nothing to resume: do not leave a folder that blocks the next run
            shutil.rmtree(parts, ignore_errors=True)
        if isinstance(exc, OSError) and is_disk_full(exc) or isinstance(exc, DiskFullError):
            kept = (f"the {sum(len(groups[_group_of(p)]) for p in saved if _group_of(p) < len(groups))} "
                    f"finished beamlets are kept in {parts}; free some space and run again with --resume"
                    if saved else "free some space and run again")
            raise DiskFullError(f"no space left on device while generating {out}: {kept}") from None
        raise


def _group_of(part: Path) -> int:
    try:
        return int(part.stem.removeprefix("group_"))
    except ValueError:
        return 1 << 62


def _generate(out: Path, parts: Path, specs: list[BeamletSpec], groups: list[list[BeamletSpec]], engine: str,
              engine_kwargs: dict[str, Any], eng: Any, manifest: dict[str, Any],
              block_shape: tuple[int, int, int], voxel_mm: tuple[float, float, float], workers: int,
              ray_address: str | None, progress: bool, keep_parts: bool,
              on_group_done: Callable[[int, int], None] | None, command: str | None) -> Path:
    """The work of :func:`generate_dataset` once its parts folder is in place: run the missing groups,
    merge, write the manifest beside the output."""
    todo = [g for g, grp in enumerate(groups)
            if _read_part(parts, g, np.array([s.index for s in grp])) is None]
    done = len(specs) - sum(len(groups[g]) for g in todo)
    niceness = os.getpriority(os.PRIO_PROCESS, 0) if hasattr(os, "getpriority") else None
    args = (engine, json.dumps(engine_kwargs, sort_keys=True), tuple(block_shape), tuple(voxel_mm), niceness)

    from tqdm.auto import tqdm

    started_at = time.perf_counter()
    done_at_start = done
    with tqdm(total=len(specs), initial=done, unit="beamlet", disable=not progress, smoothing=0.05,
              desc=f"{engine} -> {out.name}") as bar:

        def finished(group: int, arrays: dict[str, np.ndarray]) -> None:
            nonlocal done
            _write_part(parts, group, arrays)
            done += len(groups[group])
            bar.update(len(groups[group]))
            elapsed = time.perf_counter() - started_at
            bar.set_postfix_str(f"{(done - done_at_start) / max(elapsed, 1e-9) * 3600:,.0f} beamlets/h")
            if on_group_done is not None:
                on_group_done(done, len(specs))
            for i, seed, again in _crash_reruns(arrays):
                logger.warning("MCsquare crashed on beamlet %d with seed %d; its dose is the rerun's with seed %d "
                               "(crash_retry_seed)", i, seed, again)

        if todo and (workers > 1 or ray_address):
            _run_on_ray(groups, todo, args, workers, ray_address, finished,
                        cpus_per_task=int(engine_kwargs.get("threads", 1)))
        else:
            for g in todo:
                finished(g, run_group(groups[g], *args))

    computed, elapsed = done - done_at_start, time.perf_counter() - started_at
    rate = computed / elapsed * 3600 if computed and elapsed > 0 else None
    if rate is not None:
        logger.info("%d beamlets in %.1f s: %.0f beamlets/hour with %d worker(s)", computed, elapsed, rate, workers)
    reruns = _merge(out, parts, groups, eng.file_attrs(), manifest, voxel_mm)
    _write_json_atomic(manifest_path_for(out), {
        "dataset": out.name,
        "command": command,
        "generation": manifest,
        "engine_version": eng.version,
        "attrs": {k: v for k, v in eng.file_attrs().items() if isinstance(v, (str, int, float))},
        "rate_beamlets_per_hour": None if rate is None else round(rate, 1),
        "rate_note": f"{computed} beamlets computed in this call in {elapsed:.1f} s, {workers} worker(s)",
        "seeds": "beamlet i: SeedSequence(seed, spawn_key=(i, 0)) geometry, (i, 1) engine, (i, 2) energy",
        "crash_reruns": [{"beamlet": i, "seed": seed, "rerun_seed": again} for i, seed, again in reruns],
    })
    if not keep_parts:
        shutil.rmtree(parts, ignore_errors=True)
    return out


def manifest_path_for(out_path: str | os.PathLike) -> Path:
    """``OUT.h5`` -> ``OUT.manifest.json``: how the dataset was made (also stored in the file's attributes)."""
    out = Path(out_path)
    return out.with_name(out.name.removesuffix(".h5").removesuffix(".hdf5") + ".manifest.json")


def _run_on_ray(groups: list[list[BeamletSpec]], todo: list[int], args: tuple, workers: int,
                ray_address: str | None, finished: Callable[[int, dict[str, np.ndarray]], None],
                cpus_per_task: int) -> None:
    from dota.runtime import ray_session

    with ray_session(workers, ray_address, purpose="parallel generation") as ray:
        task = ray.remote(num_cpus=cpus_per_task, max_retries=2)(run_group)
        capacity = max(1, int(ray.cluster_resources().get("CPU", workers)) // cpus_per_task)
        window = 2 * capacity
        queue = list(todo)
        pending: dict[Any, int] = {}
        while queue or pending:
            while queue and len(pending) < window:
                g = queue.pop(0)
                pending[task.remote(groups[g], *args)] = g
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                g = pending.pop(ref)
                finished(g, ray.get(ref))


def _crash_reruns(arrays: dict[str, np.ndarray]) -> list[tuple[int, int, int]]:
    """``(beamlet, seed, rerun seed)`` of a part's beamlets whose engine run crashed and was redone
    (:func:`dota.engines.mcsquare.crash_retry_seed`); parts written before this was recorded have none."""
    again = arrays.get("crash_rerun_seed")
    if again is None:
        return []
    return [(int(arrays["index"][k]), int(arrays["seed"][k]), int(again[k])) for k in np.flatnonzero(again)]


def _merge(out: Path, parts: Path, groups: list[list[BeamletSpec]], attrs: dict[str, Any],
           manifest: dict[str, Any], voxel_mm: tuple[float, float, float]) -> list[tuple[int, int, int]]:
    """Stream the parts, in beamlet order, into the output file (atomically): one part in memory at a time.
    Returns the crash reruns the parts record (:func:`_crash_reruns`)."""
    from dota.data.hdf5 import DatasetWriter

    meta_keys = ("seed", "source", "gantry_deg", "couch_deg", "spot_offset_mm", "sha256")
    block_shape = tuple(manifest["block_shape"])
    leaving: list[np.ndarray] = []
    energies: list[np.ndarray] = []
    reruns: list[tuple[int, int, int]] = []

    def write(tmp: str) -> None:
        with DatasetWriter(tmp, block_shape, attrs={**attrs, "generation": manifest}, voxel_mm=voxel_mm) as w:
            for g, grp in enumerate(groups):
                arrays = _read_part(parts, g, np.array([s.index for s in grp]))
                if arrays is None:
                    raise DataFileError(f"part {g} of {parts} is missing or unreadable; run again with --resume")
                w.append(arrays["geometry"], arrays["dose"], arrays["energy"],
                         meta={k: arrays[k] for k in meta_keys})
                leaving.append(_leaving(arrays["dose"], 0.01))
                energies.append(arrays["energy"])
                reruns.extend(_crash_reruns(arrays))

    atomic_write(out, write)
    shape_only = np.empty((0, *block_shape), dtype=np.float32)
    warn_beams_leaving_block(shape_only, np.concatenate(energies), voxel_mm, leaving=np.concatenate(leaving))
    return reruns


def _leaving(dose: np.ndarray, fraction: float) -> np.ndarray:
    """Mask of the beamlets whose last slice still holds more than ``fraction`` of their maximum."""
    last = dose[:, -1].reshape(len(dose), -1).max(axis=1)
    peak = dose.reshape(len(dose), -1).max(axis=1)
    return last > fraction * np.maximum(peak, 1e-30)


def warn_beams_leaving_block(dose: np.ndarray, energy: np.ndarray, voxel_mm: tuple[float, float, float],
                             fraction: float = 0.01, *, leaving: np.ndarray | None = None) -> int:
    """Log a warning for beamlets that still carry dose in the last slice (more than ``fraction`` of
    their maximum): their Bragg peak lies beyond the block. Returns how many there are.

    ``leaving`` (a precomputed mask) lets a streaming caller pass only the block shape in ``dose``."""
    leaving = np.flatnonzero(_leaving(dose, fraction) if leaving is None else leaving)
    if leaving.size:
        from dota.physics import csda_range_mm

        worst = leaving[np.argmax(energy[leaving])]
        needed = int(np.ceil((float(csda_range_mm(energy[worst])) + 10.0) / voxel_mm[0]))
        logger.warning(
            "%d beamlet(s) leave the %.0f mm deep block before stopping (e.g. #%d at %.0f MeV): their dose "
            "beyond the block is not recorded; in water that energy needs --block-shape %dx%dx%d or deeper",
            leaving.size, dose.shape[1] * voxel_mm[0], worst, float(energy[worst]),
            max(needed, dose.shape[1] + 1), dose.shape[2], dose.shape[3])
    return int(leaving.size)


def _same_run(out: Path, manifest: dict[str, Any]) -> bool:
    from dota.data.hdf5 import BeamletFile

    try:
        with BeamletFile(out) as f:
            return f.attrs.get("generation") == json.loads(json.dumps(manifest))
    except DataFileError:
        return False


def _write_json_atomic(path: Path, obj: Any) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1, sort_keys=True)))


def parse_energies(text: str) -> list[float]:
    """``"70,100,150"`` -> [70.0, 100.0, 150.0]."""
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"energies must be comma-separated numbers in MeV, got {text!r}") from None


def parse_energy_range(text: str) -> tuple[float, float]:
    """``"70:220"`` -> (70.0, 220.0)."""
    try:
        lo, hi = (float(v) for v in text.split(":"))
    except ValueError:
        raise InputError(f"energy range must look like 70:220 (MeV), got {text!r}") from None
    return lo, hi


__all__ = [
    "BeamletSpec",
    "build_geometry",
    "generate_dataset",
    "make_specs",
    "parse_energies",
    "parse_energy_range",
    "resolve_sources",
    "run_group",
]
