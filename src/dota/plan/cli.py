"""The plan commands of ``dota`` (``dota dose``, ``dota plan``), registered by :func:`dota.cli.build_parser`.

Each command calls one function of :mod:`dota.plan.workflow` and prints a short summary. Every file it
will write follows the rule of the other commands' ``--out`` (:func:`dota.fileio.check_output`, checked
before any work; existing files replaced only with ``--overwrite``). Bad input
raises :class:`dota.errors.InputError` / :class:`dota.errors.DataFileError`, which the ``dota`` entry point
turns into one line and exit code 2.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

# the one argparse type for each rule (dota.cli imports this module only inside build_parser: no cycle)
from dota.cli import _add_overwrite, positive_float, positive_int


def _print_summary(summary: dict, keys: tuple[str, ...]) -> None:
    for k in keys:
        if k in summary:
            print(f"{k}: {summary[k]}")
    timings = summary.get("timings_s", {})
    if timings:
        total = f"; total {sum(timings.values()):.2f}"
        if summary.get("workers", 1) > 1:
            total += f" (engine calls in {summary['workers']} worker processes)"
        print("time per stage (s): " + ", ".join(f"{k} {v:.2f}" for k, v in timings.items()) + total)
    for p in summary.get("written", []):
        print(f"wrote {p}")


def cmd_dose(args: argparse.Namespace) -> int:
    from dota.plan.workflow import run_dose

    summary = run_dose(
        args.ct, args.plan, args.out or [], engine=args.engine, model=args.model, device=args.device,
        seed=args.seed, primaries=args.primaries, threads=args.threads, structures=args.structure,
        dvh_csv=args.dvh, prescription_gy=args.prescription, reference=args.reference, report_dir=args.report,
        dij_path=args.dij, dij_threshold=args.dij_threshold, max_beamlets_per_call=args.max_beamlets_per_call,
        parallel_beams=args.parallel_beams, block_corrections=not args.no_block_corrections,
        progress=not args.no_progress, summary_path=args.summary, overwrite=args.overwrite, workers=args.workers,
        blocks_out=args.blocks_out, blocks_in=args.blocks_in,
    )
    _print_summary(summary, ("beams", "spot_energies", "spot_positions", "engine_calls", "max_dose_gy",
                             "dij_megabytes", "gamma", "dvh"))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from dota.plan.workflow import run_plan

    summary = run_plan(
        args.ct, args.target, args.out, angles=args.angles, couches=args.couch, oars=args.oar,
        prescription_gy=args.dose, fractions=args.fractions, engine=args.engine, model=args.model,
        device=args.device, seed=args.seed, spot_spacing_mm=args.spot_spacing, layer_spacing_mm=args.layer_spacing,
        lateral_margin_mm=args.margin, oar_weight=args.oar_weight, oar_limit_gy=args.oar_limit,
        max_iterations=args.iterations, dij_path=args.dij, dose_out=args.dose_out, report_dir=args.report,
        progress=not args.no_progress, summary_path=args.summary, overwrite=args.overwrite,
    )
    _print_summary(summary, ("beams", "spot_energies_placed", "spot_energies", "dij_megabytes", "optimizer",
                             "target_dose_gy"))
    return 0


def add_commands(sub: argparse._SubParsersAction, add_common: Callable[..., None]) -> None:
    """Add ``dota dose`` and ``dota plan`` to the ``dota`` parser."""
    p = sub.add_parser(
        "dose", help="dose of a whole treatment plan on a CT (RTDOSE, MHD/NIfTI, DVH, report)",
        description="Compute the dose of a proton plan (DICOM RT Ion Plan, dota JSON or MCsquare PlanPencil .txt) "
        "on a CT (DICOM folder, .mhd/.mha, .nrrd, .nii/.nii.gz, OpenKBP *_ct.csv): per beam one rotation of the CT "
        "into the beam's eye view, per spot one 150x24x24 block through all its energy layers, trilinear deposition "
        "back into the CT grid. Output format by suffix: .dcm (RTDOSE), .mhd/.mha/.nrrd/.nii/.nii.gz. "
        "Format and conventions: docs/plans.md.")
    p.add_argument("--ct", type=Path, required=True, help="CT: DICOM folder, .mhd/.mha, .nrrd, .nii(.gz), *_ct.csv")
    p.add_argument("--plan", type=Path, required=True, help="plan: RT Ion Plan (.dcm), dota .json, PlanPencil .txt")
    p.add_argument("--engine", default="dota", choices=["dota", "analytic", "mcsquare", "mcsquare-plan", "stored"],
                   help="beamlet engine (dota, analytic, mcsquare), MCsquare's own full-plan run, or stored: the "
                        "beamlets of --blocks-in replayed (default dota)")
    p.add_argument("--model", help="DoTA checkpoint path or preset name (dota engine; default: the shipped model)")
    p.add_argument("--primaries", type=positive_int,
                   help="MCsquare protons: per beamlet (mcsquare) or for the whole plan (mcsquare-plan)")
    p.add_argument("--threads", type=positive_int, help="MCsquare threads (default 1)")
    p.add_argument("--out", type=Path, action="append", help="dose output; repeat for several formats")
    p.add_argument("--structure", action="append", metavar="SPEC",
                   help="structure for DVHs: rtstruct.dcm[:ROI], mask.nii.gz[:label], pt_N_<name>.csv or "
                   "sphere:x,y,z,r (repeatable)")
    p.add_argument("--dvh", type=Path, help="DVH table (CSV; also <stem>_stats.csv and <stem>.png)")
    p.add_argument("--prescription", type=positive_float, help="prescribed dose (Gy) for V95/V107 in the DVH stats")
    p.add_argument("--reference", type=Path, action="append",
                   help="reference dose (RTDOSE/MHD/NIfTI) for the gamma map (2%%/2mm); repeat it for independent "
                   "runs of one reference (Monte Carlo seeds): their mean is the reference, and the summary gives its "
                   "noise and the pass rate an error-free dose would reach against it (noise_ceiling_*)")
    p.add_argument("--report", type=Path, help="folder for the plan page (index.html)")
    p.add_argument("--dij", type=Path, help="write the dose-influence matrix (scipy.sparse, compressed .npz); it, and the "
                   "dose of a run with it, leave out the halo outside each block (docs/plans.md)")
    p.add_argument("--dij-threshold", type=float, default=1e-3,
                   help="drop dij values below this fraction of each beamlet's maximum (default 1e-3)")
    p.add_argument("--parallel-beams", action="store_true",
                   help="send every spot along the beam axis instead of along its ray from the beam model's "
                   "virtual source (for comparison; docs/plans.md)")
    p.add_argument("--no-block-corrections", action="store_true",
                   help="leave out the halo outside each block and the entrance-spot correction (with the "
                   "resampling blur and the model's measured excess width) that engines with MCsquare blocks (the "
                   "default model, mcsquare) get (for comparison; docs/plans.md)")
    p.add_argument("--workers", type=positive_int,
                   help="worker processes for the engine calls, one torch thread each, beside the deposition (dota "
                        "and analytic engines on the CPU; default one per core, at most 8; 1: in this process); the "
                        "dose is the same for any number (to float32 rounding)")
    p.add_argument("--max-beamlets-per-call", type=positive_int, default=128,
                   help="bound on beamlets per engine call (memory; default 128)")
    p.add_argument("--blocks-out", type=Path, metavar="BLOCKS.h5",
                   help="also write every spot-energy's block (as the engine got it), energy and beamlet dose as a "
                   "dataset file (HDF5 beamlet format): with --engine mcsquare, Monte Carlo beamlets of the plan's "
                   "own blocks to fine-tune on (dota train) or to evaluate engines against (dota evaluate)")
    p.add_argument("--blocks-in", type=Path, metavar="BLOCKS.h5",
                   help="with --engine stored: the --blocks-out file of an earlier run of the same plan and CT, whose "
                        "beamlets (e.g. Monte Carlo ones) go through this run's pipeline again, in seconds (the blocks "
                        "are checked against the stored ones)")
    p.add_argument("--summary", type=Path, help="write the run's summary (statistics, timings) as JSON")
    _add_overwrite(p, "existing outputs of --out, --dvh, --dij, --summary and --report")
    add_common(p)
    p.set_defaults(func=cmd_dose)

    p = sub.add_parser(
        "plan", help="make a proton plan for a target: spots, energy layers, optimised weights (RT Ion Plan)",
        description="Place spots and energy layers over a target from its water-equivalent depth, build the "
        "dose-influence matrix with an engine, and optimise non-negative spot weights (L-BFGS-B) for a uniform "
        "target dose with an organ-at-risk penalty. Writes an RT Ion Plan (.dcm), a dota .json or a PlanPencil .txt.")
    p.add_argument("--ct", type=Path, required=True, help="CT (as for dota dose)")
    p.add_argument("--target", required=True, metavar="SPEC",
                   help="target: rtstruct.dcm:ROI, mask.nii.gz[:label], pt_N_PTV70.csv or sphere:x,y,z,r (mm)")
    p.add_argument("--oar", action="append", metavar="SPEC", help="organ at risk (repeatable; same forms)")
    p.add_argument("--angles", default="0", help="gantry angles in degrees, comma-separated (default 0)")
    p.add_argument("--couch", help="couch angles in degrees, one per gantry angle (default 0)")
    p.add_argument("--dose", type=positive_float, default=2.0, help="prescribed target dose, Gy in total (default 2)")
    p.add_argument("--fractions", type=positive_int, default=1, help="number of fractions (default 1)")
    p.add_argument("--engine", default="analytic", choices=["analytic", "dota", "mcsquare"],
                   help="engine of the dose-influence matrix (default analytic)")
    p.add_argument("--model", help="DoTA checkpoint path or preset name (dota engine)")
    p.add_argument("--spot-spacing", type=positive_float,
                   help="lateral spot spacing, mm, a multiple of 2 (default 1.2 x spot sigma, rounded)")
    p.add_argument("--layer-spacing", type=positive_float, default=5.0,
                   help="energy layer spacing in water-equivalent range, mm (default 5)")
    p.add_argument("--margin", type=float, help="lateral margin around the target for spots, mm (default the spacing)")
    p.add_argument("--oar-weight", type=float, default=0.3, help="weight of the organ-at-risk penalty (default 0.3)")
    p.add_argument("--oar-limit", type=float, default=0.0, help="OAR dose (Gy, total) above which it is penalised")
    p.add_argument("--iterations", type=positive_int, default=300, help="L-BFGS-B iterations (default 300)")
    p.add_argument("--out", type=Path, action="append", required=True,
                   help="plan file: .dcm (RT Ion Plan), .json or .txt (repeatable: several formats)")
    p.add_argument("--dij", type=Path, help="also write the dose-influence matrix (target and OAR rows, .npz)")
    p.add_argument("--dose-out", type=Path, action="append", help="recompute and write the plan's dose (repeatable)")
    p.add_argument("--report", type=Path, help="folder for the plan page (recomputes the dose)")
    p.add_argument("--summary", type=Path, help="write the summary (spots, optimiser, timings) as JSON")
    _add_overwrite(p, "existing outputs of --out, --dij, --dose-out, --summary and --report")
    add_common(p)
    p.set_defaults(func=cmd_plan)
