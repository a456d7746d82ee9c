"""The two plan workflows behind ``dota dose`` and ``dota plan``, as functions (the CLI calls one each).

:func:`run_dose`: read a CT and a plan, compute the plan dose with an engine (or MCsquare's own plan
simulation), write RTDOSE / MHD / NIfTI, DVH tables and plot, a dose-influence matrix and a plan page.
:func:`run_plan`: place spots for a target and beam angles, optimise their weights, write the plan
(RT Ion Plan, JSON or PlanPencil) and optionally its recomputed dose and page.

Every stage is timed (``timings_s``: read, setup, rotate, infer, deposit, dij, optimize, write, dvh,
gamma, report). With a plan page (``--report DIR``) the run's summary is also written beside it
(``DIR/run_summary.json``, :data:`dota.plan.report.PAGE_SUMMARY`), so that the folder says what it
shows; ``dota report --plan DIR`` reads it with :func:`read_plan_summary`.

Outputs follow the rule of every command (:func:`dota.fileio.check_output`): every file a run will write
(dose outputs with their data files, DVH tables and plot, ``--dij``, ``--summary``, the page folder's
files, plan files) is checked before anything is read or computed; an existing one is replaced only with
``overwrite``, none may be an input, and each is written atomically (:func:`check_outputs`).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, NotRequired, TypedDict

import numpy as np

from dota.errors import InputError
from dota.fileio import atomic_write, check_output
from dota.plan.dose import StageTimer, compute_plan_dose
from dota.plan.geometry import PatientCT, read_patient_ct
from dota.plan.model import Plan
from dota.plan.report import PAGE, PAGE_DVH, PAGE_SUMMARY
from dota.report.schema import read_json

ENGINES = ("dota", "analytic", "mcsquare", "mcsquare-plan", "stored")
#: Version of the layout of the summary (:class:`PlanSummary`); raised when a key changes meaning.
PLAN_SUMMARY_VERSION = 1


class PlanGamma(TypedDict):
    """``gamma`` of a :func:`run_dose` summary (with ``--reference``): :class:`dota.plan.report.GammaResult`."""

    criteria: str
    references: NotRequired[list[str]]  # the reference files (several: their mean was the reference)
    pass_rate_percent: float
    voxels: int
    pass_rate_in_patient_percent: float  # over the voxels denser than air (dota.constants.AIR_HU)
    voxels_in_patient: int
    # with two or more references (dota.plan.report.ReferenceNoise): the mean's per-voxel noise in % of its
    # maximum, and the pass rates an error-free dose would reach against it
    reference_noise_percent: NotRequired[float]
    noise_ceiling_percent: NotRequired[float]
    noise_ceiling_in_patient_percent: NotRequired[float]


class PlanDvhStats(TypedDict):
    """One structure's entry of ``dvh`` (:func:`dota.plan.dvh.compute_dvh` statistics, rounded; more keys)."""

    mean_gy: float
    D95_gy: float


class PlanSummary(TypedDict):
    """The keys of a :func:`run_dose` or :func:`run_plan` summary that ``dota report`` reads; the summaries
    hold more (counts, statistics, ``written``). ``dvh`` is keyed by structure, in the order given (the
    target first in :func:`run_plan`)."""

    version: int
    ct: str
    plan: str  # run_plan: the plan files written, comma-separated
    engine: str
    beams: int | list[dict[str, Any]]  # run_dose: the count; run_plan: one object per beam
    spot_energies: int
    timings_s: dict[str, float]  # stage -> seconds, in the order run
    gamma: NotRequired[PlanGamma]
    dvh: NotRequired[dict[str, PlanDvhStats]]


def read_plan_summary(path: str | os.PathLike) -> PlanSummary:
    """A run's summary (``--summary``, or ``run_summary.json`` in a plan page folder) read and checked;
    :class:`~dota.errors.DataFileError` (one line naming the file and the key) when a key is missing or of
    the wrong type."""
    return read_json(path, PlanSummary, PLAN_SUMMARY_VERSION)


def _check_blocks_in(engine: str, blocks_in: str | os.PathLike | None) -> None:
    """``--blocks-in`` goes with ``--engine stored`` and with it only."""
    if (engine == "stored") != (blocks_in is not None):
        raise InputError("--engine stored replays the beamlets of --blocks-in BLOCKS.h5 (a --blocks-out file), and "
                         "--blocks-in applies to it only")


def build_engine(name: str, *, model: str | None = None, device: str = "auto", seed: int = 0,
                 primaries: int | None = None, threads: int | None = None,
                 blocks_in: str | os.PathLike | None = None) -> Any:
    """A beamlet engine by name for plan dose (``dota``, ``analytic``, ``mcsquare``, or ``stored``: the beamlets of
    ``blocks_in``, a ``--blocks-out`` file, :class:`dota.engines.stored.StoredBeamletEngine`)."""
    from dota.evaluate import make_engine
    from dota.engines import get_engine

    if name not in ENGINES or name == "mcsquare-plan":
        raise InputError(f"unknown plan engine {name!r}; choose from {', '.join(ENGINES)}")
    _check_blocks_in(name, blocks_in)
    if name == "stored":
        if model is not None or primaries is not None or threads is not None:
            raise InputError("--model, --primaries and --threads do not apply to stored beamlets")
        return get_engine("stored", path=blocks_in)
    if name == "mcsquare":
        if model is not None:
            raise InputError("--model applies to the dota engine only")
        kwargs: dict[str, Any] = {"seed": int(seed) + 1}
        if primaries is not None:
            kwargs["primaries"] = int(primaries)
        if threads is not None:
            kwargs["threads"] = int(threads)
        return get_engine("mcsquare", **kwargs)
    if primaries is not None and name != "mcsquare":
        raise InputError("--primaries applies to the mcsquare engines only")
    return make_engine(name, model=model, device=device, seed=seed)


def load_structure_specs(specs: list[str] | None, ct: PatientCT) -> list[Any]:
    from dota.plan.structures import load_structures

    out = []
    for spec in specs or []:
        out.extend(load_structures(spec, ct))
    return out


def _write_outputs(outputs: list[str | os.PathLike], dose: np.ndarray, ct: PatientCT, plan: Plan) -> list[Path]:
    from dota.plan.doseio import write_dose

    return [write_dose(p, dose, ct, plan) for p in outputs]


def dij_file(path: str | os.PathLike) -> Path:
    """The file ``--dij path`` becomes (numpy adds ``.npz`` when missing, :meth:`DoseInfluence.save`)."""
    path = Path(path)
    return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")


def _save_dij(dij: Any, path: str | os.PathLike) -> Path:
    from dota.plan.doseio import write_by_name

    return write_by_name(dij_file(path), dij.save)  # atomically


def _input_files(*paths: str | os.PathLike | None, specs: list[str] | None = None) -> list[Path]:
    """The files a run reads: ``paths`` and the files of structure specs (not ``sphere:``)."""
    from dota.plan.structures import _split_spec

    files = [Path(p) for p in paths if p is not None]
    files += [_split_spec(s)[0] for s in specs or [] if not s.startswith("sphere:")]
    return files


def _check(option: str, path: str | os.PathLike, **kwargs: Any) -> Path:
    """:func:`dota.fileio.check_output`, its one line naming ``option`` instead of ``--out``."""
    try:
        return check_output(path, **kwargs)
    except InputError as exc:
        text = str(exc)
        if option != "--out" and text.startswith("--out"):
            raise InputError(option + text[len("--out"):]) from None
        raise


def check_outputs(files: list[tuple[str, str | os.PathLike]], *, inputs: list[Path], overwrite: bool = False,
                  report_dir: str | os.PathLike | None = None, report_writes: tuple[str, ...] = ()) -> None:
    """The rule for ``--out`` (:func:`dota.fileio.check_output`) for every file a run will write, given as
    ``(option, path)``, and for the plan page folder ``report_dir`` (the files ``report_writes`` in it):
    never an input, an existing file only with ``overwrite``, a writable place; and no two outputs at one
    path. Raises :class:`~dota.errors.InputError`, one line naming the option."""
    seen: dict[Path, str] = {}

    def claim(option: str, path: str | os.PathLike) -> None:
        key = Path(path).expanduser().resolve()
        if key in seen:
            raise InputError(f"{option} {path} is also written by {seen[key]}: give each output its own path")
        seen[key] = option

    for option, path in files:
        claim(option, path)
        _check(option, path, inputs=inputs, overwrite=overwrite)
    if report_dir is not None:
        for name in report_writes:
            claim("--report", Path(report_dir) / name)
        _check("--report", report_dir, inputs=inputs, overwrite=overwrite, folder=True, writes=report_writes)


def run_dose(
    ct_path: str | os.PathLike,
    plan_path: str | os.PathLike,
    outputs: list[str | os.PathLike],
    *,
    engine: str = "dota",
    model: str | None = None,
    device: str = "auto",
    seed: int = 0,
    primaries: int | None = None,
    threads: int | None = None,
    structures: list[str] | None = None,
    dvh_csv: str | os.PathLike | None = None,
    prescription_gy: float | None = None,
    reference: str | os.PathLike | list[str | os.PathLike] | None = None,
    report_dir: str | os.PathLike | None = None,
    dij_path: str | os.PathLike | None = None,
    dij_threshold: float = 1e-3,
    max_beamlets_per_call: int = 128,
    progress: bool = True,
    summary_path: str | os.PathLike | None = None,
    overwrite: bool = False,
    parallel_beams: bool = False,
    block_corrections: bool = True,
    workers: int | None = None,
    blocks_out: str | os.PathLike | None = None,
    blocks_in: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """``dota dose``: see the module docstring. ``reference``: a reference dose, or several independent runs
    of one (Monte Carlo with different seeds), whose mean is the reference (its noise falls as 1/sqrt(runs)).
    ``workers``: worker processes for the engine calls
    (:func:`dota.plan.dose.plan_workers`; default one per core, at most 8, for the dota and analytic engines). ``parallel_beams`` sends every spot along the beam axis
    (no virtual source); ``block_corrections=False`` leaves out the halo and the entrance-spot correction
    of engines with MCsquare blocks (:func:`dota.plan.dose.compute_plan_dose`). ``blocks_out``: write every spot-energy's block, energy and beamlet
dose as a dataset file (``compute_plan_dose(blocks=...)``; atomically); ``blocks_in``: such a file, whose
    beamlets the ``stored`` engine replays. Returns a summary (paths, statistics, timings), also written
    to ``summary_path`` when given. Every output is checked first (:func:`check_outputs`); existing ones are
    replaced only with ``overwrite``."""
    from dota.plan.doseio import dose_files
    from dota.plan.dvh import dvh_files
    from dota.plan.planio import read_plan

    if not outputs and report_dir is None and dvh_csv is None and dij_path is None and blocks_out is None:
        raise InputError("nothing to write: give --out (and/or --report, --dvh, --dij, --blocks-out)")
    if dvh_csv is not None and not structures:
        raise InputError("--dvh needs structures (--structure)")
    if engine == "mcsquare-plan" and dij_path is not None:
        raise InputError("--dij needs a beamlet engine (dota, analytic, mcsquare), not mcsquare-plan")
    _check_blocks_in(engine, blocks_in)
    if engine == "mcsquare-plan" and blocks_out is not None:
        raise InputError("--blocks-out needs a beamlet engine (dota, analytic, mcsquare), not mcsquare-plan")
    if engine == "mcsquare-plan" and (parallel_beams or not block_corrections):
        raise InputError("--parallel-beams and --no-block-corrections apply to beamlet engines (dota, analytic, "
                         "mcsquare), not to MCsquare's own plan simulation")
    references = [reference] if isinstance(reference, (str, os.PathLike)) else list(reference or [])
    files = [("--out", f) for o in outputs for f in dose_files(o)]
    files += [("--dvh", f) for f in dvh_files(dvh_csv)] if dvh_csv is not None else []
    files += [("--dij", dij_file(dij_path))] if dij_path is not None else []
    files += [("--summary", summary_path)] if summary_path is not None else []
    files += [("--blocks-out", blocks_out)] if blocks_out is not None else []
    check_outputs(files, inputs=_input_files(ct_path, plan_path, *references, blocks_in, specs=structures),
                  overwrite=overwrite, report_dir=report_dir, report_writes=(PAGE, PAGE_SUMMARY) + ((PAGE_DVH,) if structures else ()))
    timer = StageTimer()
    started = time.perf_counter()
    with timer("read"):
        ct = read_patient_ct(ct_path)
        plan = read_plan(plan_path, ct)
        structs = load_structure_specs(structures, ct)
    summary: dict[str, Any] = {"version": PLAN_SUMMARY_VERSION, "ct": str(ct_path), "ct_shape": list(ct.shape),
                               "ct_spacing_mm": list(ct.spacing_mm), "plan": str(plan_path), "beams": len(plan.beams),
                               "spot_energies": plan.n_spots, "total_mu": plan.total_mu, "fractions": plan.fractions,
                               "engine": engine}
    if engine == "mcsquare-plan":
        from dota.plan.mcsquare_plan import mcsquare_plan_dose

        kwargs: dict[str, Any] = {"seed": int(seed) + 1}
        if primaries is not None:
            kwargs["primaries"] = int(primaries)
        if threads is not None:
            kwargs["threads"] = int(threads)
        with timer("mcsquare"):
            dose = mcsquare_plan_dose(ct, plan, **kwargs)
        dij = None
    else:
        with timer("setup"):
            eng = build_engine(engine, model=model, device=device, seed=seed, primaries=primaries, threads=threads,
                               blocks_in=blocks_in)
        corrections = None if block_corrections else False

        def compute(blocks: Any = None) -> Any:
            return compute_plan_dose(ct, plan, eng, progress=progress, max_beamlets_per_call=max_beamlets_per_call,
                                     dij=dij_path is not None, dij_threshold=dij_threshold, timer=timer,
                                     halo=False if dij_path is not None else corrections, entrance_spot=corrections,
                                     diverging=not parallel_beams, workers=workers, blocks=blocks)

        if blocks_out is None:
            result = compute()
        else:
            from dota.constants import BLOCK_SHAPE
            from dota.data.hdf5 import DatasetWriter

            done: list[Any] = []

            def write_blocks(tmp: str) -> None:
                attrs = {**eng.file_attrs(), "plan": str(plan_path), "ct": str(ct_path),
                         "note": "a plan's blocks as its engine got them (dota dose --blocks-out)"}
                with DatasetWriter(tmp, BLOCK_SHAPE, attrs=attrs) as writer:
                    done.append(compute(writer))

            atomic_write(blocks_out, write_blocks)
            result = done[0]
            summary["blocks_out"] = str(blocks_out)
        dose, dij = result.dose_gy, result.dij
        summary.update({k: v for k, v in result.stats.items() if k not in ("beams", "spot_energies")})
    with timer("write"):
        written = _write_outputs(outputs, dose, ct, plan)
        if dij is not None:
            written.append(_save_dij(dij, dij_path))
            summary["dij_megabytes"] = dij.nbytes / 1e6
            summary["dij_dropped_fraction"] = dij.dropped_fraction
    dvhs = []
    if structs:
        from dota.plan.dvh import compute_dvh, plot_dvh, write_dvh_csv

        with timer("dvh"):
            dvhs = [compute_dvh(dose, s, ct.voxel_volume_mm3, prescription_gy=prescription_gy) for s in structs]
            if dvh_csv is not None:
                written.extend(write_dvh_csv(dvh_csv, dvhs))
                written.append(plot_dvh(dvh_files(dvh_csv)[2], dvhs, prescription_gy=prescription_gy))
        summary["dvh"] = {h.name: {k: round(v, 4) for k, v in h.stats.items()} for h in dvhs}
    gamma = None
    if references:
        from dota.plan.doseio import read_dose, resample_to_ct
        from dota.plan.report import plan_gamma, reference_noise

        with timer("gamma"):
            runs = []
            for path in references:  # independent runs of one reference: their mean
                one, grid = read_dose(path)
                runs.append(resample_to_ct(one, grid, ct).astype(np.float64))
            gamma = plan_gamma(dose, np.mean(runs, axis=0), ct)
            noise = reference_noise(dose, runs, ct) if len(runs) > 1 else None
        summary["gamma"] = {"criteria": gamma.criteria, "references": [str(r) for r in references],
                            "pass_rate_percent": round(gamma.pass_rate_percent, 3), "voxels": gamma.evaluated,
                            "pass_rate_in_patient_percent": round(gamma.pass_rate_in_patient_percent, 3),
                            "voxels_in_patient": gamma.evaluated_in_patient}
        if noise is not None:
            summary["gamma"].update({
                "reference_noise_percent": round(noise.sigma_percent, 3),
                "noise_ceiling_percent": round(noise.ceiling.pass_rate_percent, 3),
                "noise_ceiling_in_patient_percent": round(noise.ceiling.pass_rate_in_patient_percent, 3)})
    summary["max_dose_gy"] = float(dose.max())
    summary["timings_s"] = timer.as_dict()
    if report_dir is not None:
        from dota.plan.report import write_plan_report

        with timer("report"):
            page = write_plan_report(report_dir, ct, dose, structures=structs, dvhs=dvhs, gamma=gamma,
                                     timings_s=timer.as_dict(), prescription_gy=prescription_gy,
                                     summary={k: v for k, v in summary.items()
                                              if not isinstance(v, dict) and k != "version"},
                                     title=f"{Path(plan_path).name} on {ct.name} ({engine})")
        written.append(page)
        summary["timings_s"] = timer.as_dict()
    summary["wall_s"] = round(time.perf_counter() - started, 3)  # the whole run, stages and all
    _finish(summary, written, report_dir, summary_path)
    return summary


def _finish(summary: dict[str, Any], written: list[Path], report_dir: str | os.PathLike | None,
            summary_path: str | os.PathLike | None) -> None:
    """``summary["written"]``, the summary in the plan page folder (listed there too) and at ``summary_path``."""
    if report_dir is not None:
        written.append(Path(report_dir) / PAGE_SUMMARY)
    summary["written"] = [str(p) for p in written]
    if report_dir is not None:
        write_summary(written[-1], summary)
    if summary_path is not None:
        write_summary(summary_path, summary)


def parse_angles(angles: str, couches: str | None = None) -> list[tuple[float, float]]:
    """``"0,90"`` (and optional ``"0,10"``) -> [(gantry, couch), ...] in degrees."""
    try:
        g = [float(v) for v in angles.split(",") if v.strip()]
        c = [float(v) for v in couches.split(",") if v.strip()] if couches else [0.0] * len(g)
    except ValueError:
        raise InputError(f"angles must be comma-separated degrees, got {angles!r} / {couches!r}") from None
    if not g:
        raise InputError("give at least one gantry angle (--angles 0,90)")
    if len(c) != len(g):
        raise InputError(f"{len(g)} gantry angles but {len(c)} couch angles")
    return list(zip(g, c))


def run_plan(
    ct_path: str | os.PathLike,
    target: str,
    out: str | os.PathLike | list[str | os.PathLike],
    *,
    angles: str = "0",
    couches: str | None = None,
    oars: list[str] | None = None,
    prescription_gy: float = 2.0,
    fractions: int = 1,
    engine: str = "analytic",
    model: str | None = None,
    device: str = "auto",
    seed: int = 0,
    spot_spacing_mm: float | None = None,
    layer_spacing_mm: float = 5.0,
    lateral_margin_mm: float | None = None,
    oar_weight: float = 0.3,
    oar_limit_gy: float = 0.0,
    max_iterations: int = 300,
    dij_path: str | os.PathLike | None = None,
    dose_out: list[str | os.PathLike] | None = None,
    report_dir: str | os.PathLike | None = None,
    progress: bool = True,
    summary_path: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """``dota plan``: see the module docstring. Returns the optimisation summary, also written to
    ``summary_path`` when given. Every output is checked first (:func:`check_outputs`); existing ones are
    replaced only with ``overwrite``."""
    from dota.plan.doseio import dose_files
    from dota.plan.optimize import make_plan
    from dota.plan.planio import write_plan

    outs = [out] if isinstance(out, (str, os.PathLike)) else list(out)
    if not outs:
        raise InputError("give a plan file to write (--out plan.dcm)")
    if engine == "mcsquare-plan":
        raise InputError("dota plan needs a beamlet engine (analytic, dota, mcsquare) for its dose-influence matrix")
    files = [("--out", o) for o in outs]
    files += [("--dij", dij_file(dij_path))] if dij_path is not None else []
    files += [("--dose-out", f) for o in dose_out or [] for f in dose_files(o)]
    files += [("--summary", summary_path)] if summary_path is not None else []
    check_outputs(files, inputs=_input_files(ct_path, specs=[target, *(oars or [])]), overwrite=overwrite,
                  report_dir=report_dir, report_writes=(PAGE, PAGE_DVH, PAGE_SUMMARY))
    timer = StageTimer()
    with timer("read"):
        ct = read_patient_ct(ct_path)
        targets = load_structure_specs([target], ct)
        if len(targets) != 1:
            raise InputError(f"--target {target!r} names {len(targets)} structures; name one (e.g. file.dcm:PTV)")
        organ = load_structure_specs(oars, ct)
    with timer("setup"):
        eng = build_engine(engine, model=model, device=device, seed=seed)
    plan, summary = make_plan(ct, targets[0].mask, parse_angles(angles, couches), eng,
                              prescription_gy=prescription_gy, fractions=fractions, oars=[s.mask for s in organ],
                              oar_weight=oar_weight, oar_limit_gy=oar_limit_gy, spot_spacing_mm=spot_spacing_mm,
                              layer_spacing_mm=layer_spacing_mm, lateral_margin_mm=lateral_margin_mm,
                              max_iterations=max_iterations, name=Path(outs[0]).stem[:16] or "dota_plan",
                              progress=progress, timer=timer)
    dij = summary.pop("dij")
    summary.update({"version": PLAN_SUMMARY_VERSION, "ct": str(ct_path), "plan": ", ".join(map(str, outs)),
                    "engine": engine})
    with timer("write"):
        written = [write_plan(o, plan, ct) for o in outs]
        if dij_path is not None:
            written.append(_save_dij(dij, dij_path))
    if dose_out or report_dir is not None:
        result = compute_plan_dose(ct, plan, eng, progress=progress, timer=timer)
        with timer("write"):
            written.extend(_write_outputs(list(dose_out or []), result.dose_gy, ct, plan))
        if report_dir is not None:
            from dota.plan.dvh import compute_dvh
            from dota.plan.report import write_plan_report

            with timer("report"):
                structs = targets + organ
                dvhs = [compute_dvh(result.dose_gy, s, ct.voxel_volume_mm3, prescription_gy=prescription_gy)
                        for s in structs]
                summary["dvh"] = {h.name: {k: round(v, 4) for k, v in h.stats.items()} for h in dvhs}
                page = write_plan_report(report_dir, ct, result.dose_gy, structures=structs, dvhs=dvhs,
                                         timings_s=timer.as_dict(), prescription_gy=prescription_gy,
                                         summary={"plan": ", ".join(map(str, outs)), "spot-energies": plan.n_spots,
                                                  "beams": ", ".join(b.name for b in plan.beams),
                                                  "prescription (Gy)": prescription_gy},
                                         title=f"plan {Path(outs[0]).name} on {ct.name}")
            written.append(page)
    summary["timings_s"] = timer.as_dict()
    _finish(summary, written, report_dir, summary_path)
    return summary


def write_summary(path: str | os.PathLike, summary: dict[str, Any]) -> Path:
    """``summary`` as JSON (atomically: a reader never sees half of it)."""
    path = Path(path)
    text = json.dumps(summary, indent=1, default=str) + "\n"
    atomic_write(path, lambda t: Path(t).write_text(text))
    return path
