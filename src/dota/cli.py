"""``dota <command>``: a thin shell over the package's functions; one function call per command."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import traceback
from pathlib import Path

from dota.constants import BLOCK_SHAPE
from dota.errors import DotaError


def positive_int(text: str) -> int:
    """The argparse type of every size, count and thread number: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0, for options where 0 means "never" (e.g. --lr-halving-epochs, --checkpoint-every)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (learning rate, minutes)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def _fraction(text: str) -> float:
    value = positive_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _share(text: str) -> float:
    """A fraction from 0 to 1, both ends included."""
    value = _non_negative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be a fraction from 0 to 1, got {text}")
    return value


def port_number(text: str) -> int:
    """A TCP port, 1-65535."""
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a port from 1 to 65535, got {value}")
    return value


def _block_shape(text: str) -> tuple[int, int, int]:
    try:
        shape = tuple(int(x) for x in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"block shape must look like 150x24x24, got {text!r}")
    return shape


def _add_common(p: argparse.ArgumentParser, device: bool = True, seed_help: str = "random seed (default 0)",
                seed_default: int | None = 0) -> None:
    p.add_argument("--seed", type=int, default=seed_default, help=seed_help)
    if device:
        p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _ema_decay(text: str) -> float:
    """A weight-average decay: at least 0 and below 1."""
    value = _non_negative_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be below 1, got {text}")
    return value


def _add_overwrite(p: argparse.ArgumentParser, what: str = "an existing output file") -> None:
    p.add_argument("--overwrite", action="store_true", help=f"replace {what} (never an input)")


#: ``dota train`` options passed on only when given (the others: TrainConfig's defaults for a new run, the
#: saved settings for a resumed one, which refuses given values that differ).
_TRAIN_OPTIONS = ("preset", "epochs", "batch_size", "lr", "weight_decay", "optimizer", "lr_halving_epochs",
                  "val_fraction", "checkpoint_every", "seed", "device", "init", "integral_weight",
                  "ring_weight", "ema")


# -- commands ----------------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    from dota.train import train

    # only what was given: a resumed run keeps its own settings and refuses changed ones
    given = {k: getattr(args, k) for k in _TRAIN_OPTIONS if getattr(args, k) is not None}
    if args.no_augment:
        given["augment"] = False
    if args.flips:
        given["flips"] = True
    summary = train(args.data, args.out, given, resume=args.resume, overwrite=args.overwrite,
                    val_data=args.val_data, progress=not args.no_progress,
                    command="dota " + " ".join(sys.argv[1:]))
    if summary["world_size"] == 1 or int(os.environ.get("RANK", "0")) == 0:
        best = summary["best_checkpoint"]
        print(f"best validation loss {summary['best_val_loss']:.4e}; model: {best}" if best
              else "no epoch finished: no checkpoint was written")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from dota.evaluate import evaluate

    result = evaluate(
        args.reference, args.out, engine=args.engine, model=args.model, criteria=args.criteria,
        max_beamlets=args.max_beamlets, device=args.device, progress=not args.no_progress,
        save_predictions=not args.no_predictions, seed=args.seed, overwrite=args.overwrite,
    )
    print(json.dumps(result["summary"], indent=2))
    print(f"results: {Path(args.out).resolve()}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from dota.evaluate import predict_file

    out = predict_file(args.data, args.out, model=args.model, device=args.device, batch_size=args.batch_size,
                       progress=not args.no_progress, seed=args.seed, overwrite=args.overwrite)
    print(f"predicted dose written to {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from dota.demo import run_demo

    out = run_demo(args.out, train_minutes=args.train_minutes, seed=args.seed, device=args.device,
                   progress=not args.no_progress, model=args.model)
    print(f"demo results: {out.resolve()}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from dota.generate import generate_dataset, parse_energies, parse_energy_range

    engine_kwargs = {k: v for k, v in (("primaries", args.primaries), ("threads", args.threads)) if v is not None}
    out = generate_dataset(
        args.out, engine=args.engine, engine_kwargs=engine_kwargs, n_beamlets=args.num_beamlets,
        energies=parse_energies(args.energies) if args.energies else None,
        energy_range_mev=parse_energy_range(args.energy_range) if args.energy_range else None,
        phantom=args.phantom, ct=args.ct.split(",") if args.ct else None, split=args.split,
        geometry_file=args.geometry,
        balance_sites=args.balance_sites, peak_in_body=args.peak_in_body, seed=args.seed,
        resume=args.resume, overwrite=args.overwrite, workers=args.workers, ray_address=args.ray_address, group_size=args.group_size,
        block_shape=args.block_shape, progress=not args.no_progress, command="dota " + " ".join(sys.argv[1:]),
    )
    print(f"dataset written to {out}")
    return 0


def cmd_mcsquare(args: argparse.Namespace) -> int:
    from dota.engines import mcsquare

    if args.action == "install":
        root = mcsquare.install_mcsquare(args.cache_dir, wheel=args.wheel, force=args.force)
        print(f"MCsquare installed in {root} (build that runs on this CPU: {mcsquare.runnable_build(root)})")
    elif args.action == "where":
        print(mcsquare.find_mcsquare(args.cache_dir).binary)
    else:  # beam-model
        from dota.errors import InputError
        from dota.fileio import atomic_write, check_output

        if args.out is None:
            raise InputError("dota mcsquare beam-model needs --out PATH")
        out = check_output(args.out, overwrite=args.overwrite)
        shipped = mcsquare.find_mcsquare(args.cache_dir).root / mcsquare.SHIPPED_BEAM_MODEL
        text = mcsquare.format_beam_model(mcsquare.extend_beam_model(mcsquare.read_beam_model(shipped)))
        atomic_write(out, lambda tmp: Path(tmp).write_text(text))
        print(f"beam model (70-225 MeV) written to {out}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from dota.bench import run_benchmark, set_omp_wait_policy
    from dota.fileio import check_output

    model_file = args.model if Path(args.model).exists() else None
    check_output(args.out, inputs=[model_file], folder=True, writes=("bench.json", "bench.md", "*.png"),
                 overwrite=args.overwrite)
    if not set_omp_wait_policy(args.omp_wait_policy):  # before torch is imported
        logging.getLogger("dota").warning("torch already imported: OMP_WAIT_POLICY unchanged")
    scenarios = [x.strip() for x in args.scenarios.split(",") if x.strip()] if args.scenarios else None
    words = ["dota bench", f"--out {args.out}", f"--model {args.model}", f"--seed {args.seed}"]
    words += [f"--{k.replace('_', '-')} {v}" for k, v in (("scenarios", args.scenarios), ("threads", args.threads),
                                                           ("batch_size", args.batch_size)) if v is not None]
    words += [f"--{flag}" for flag in ("quick", "bf16", "compile") if getattr(args, flag)]
    words += [f"--omp-wait-policy {args.omp_wait_policy}"]
    report = run_benchmark(args.out, model=args.model, quick=args.quick, scenarios=scenarios, seed=args.seed,
                           threads=args.threads, progress=not args.no_progress,
                           precision="bf16" if args.bf16 else "fp32", compile=args.compile, batch_size=args.batch_size,
                           command=" ".join(words))
    for s in report["scenarios"]:
        print(f"{s['name']:>13}: plain {s['baseline_ms']['median']:7.1f} ms/beamlet, engine {s['engine_ms']['median']:7.1f}"
              f" ms/beamlet, speedup {s['speedup']:.2f}x, max diff {s['max_abs_diff_rel']:.1e}")
    print(f"results: {Path(args.out).resolve()} (bench.json, bench.md, *.png)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from dota.fileio import check_output
    from dota.report import build_report

    roots = list(args.inputs)
    out = args.out or (roots[0] / "report" if len(roots) == 1 and roots[0].is_dir() else Path("report"))
    check_output(out, inputs=[*roots, *(args.train or []), *(args.evaluate or []), *(args.bench or []),
                              *(args.plan or [])],
                 folder=True, writes=("index.html", "img", "plans"), overwrite=args.overwrite)
    words = ["dota report", *map(str, roots)]
    for flag, values in (("--train", args.train), ("--evaluate", args.evaluate), ("--bench", args.bench),
                         ("--plan", args.plan)):
        words += [f"{flag} {v}" for v in values or []]
    words += [f"--out {out}", f"--worst-k {args.worst_k}"] + (["--no-analytic"] if args.no_analytic else [])
    index = build_report(roots or None, out, train=args.train, evaluate=args.evaluate, bench=args.bench,
                         plan=args.plan, worst_k=args.worst_k, analytic=not args.no_analytic, command=" ".join(words))
    print(f"report: {index.resolve()}  (open it with 'dota view {out}')")
    return 0


def cmd_view(args: argparse.Namespace) -> int:
    from dota.report import view_report

    view_report(args.report, port=args.port, open_browser=not args.no_browser)
    return 0


# -- parser ------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from dota import __version__

    parser = argparse.ArgumentParser(
        prog="dota",
        description="DoTA proton dose engine: transformer beamlet dose with exact KV caching, "
        "Monte Carlo ground truth (MCsquare), gamma evaluation.",
    )
    parser.add_argument("--version", action="version", version=f"dota-dose {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="command", required=True)

    p = sub.add_parser("train", help="train a DoTA model on beamlet datasets",
                       description="Train a DoTA model (paper recipe by default: LAMB lr 1e-3, weight decay 1e-4, "
                       "lr halved every 4 epochs, batch 8, 90/10 split, 90-degree rotations). Resumable with --resume; "
                       "runs unchanged under torchrun (DDP).")
    p.add_argument("data", nargs="+", type=Path, help="training dataset file(s) (HDF5 beamlet format)")
    p.add_argument("--out", type=Path, required=True, help="run folder: checkpoints, history.{json,csv,png}")
    p.add_argument("--val-data", type=Path, help="separate validation file (default: hold out --val-fraction)")
    p.add_argument("--preset", help="model preset: paper, small, tiny, small-res, small-pb, tiny-res, tiny-pb, "
                   "paper-pb (-res/-pb learn a correction to the analytic engine; default paper)")
    p.add_argument("--epochs", type=positive_int, help="epochs (default 30)")
    p.add_argument("--batch-size", type=positive_int, help="beamlets per optimizer step (default 8)")
    p.add_argument("--lr", type=positive_float, help="learning rate (default 1e-3)")
    p.add_argument("--weight-decay", type=_non_negative_float, help="weight decay (default 1e-4)")
    p.add_argument("--optimizer", choices=["lamb", "adamw"], help="lamb (default) or adamw")
    p.add_argument("--lr-halving-epochs", type=non_negative_int, help="halve the lr every N epochs (0: never; default 4)")
    p.add_argument("--val-fraction", type=_fraction, help="share of the data held out for validation (default 0.1)")
    p.add_argument("--no-augment", action="store_true",
                   help="no random 90-degree lateral rotations (they swap the beam model's spot widths along "
                   "rows and columns, which differ; with --flips: row and column flips only)")
    p.add_argument("--flips", action="store_true",
                   help="also random lateral flips (with --no-augment: rows and columns flipped independently)")
    p.add_argument("--init", help="fine-tune: start from this checkpoint's weights, model and normalisation "
                   "(instead of --preset)")
    p.add_argument("--integral-weight", type=_non_negative_float,
                   help="weight of the loss term on lateral dose integrals (3x3 cells and whole slices): an error "
                   "shared by a cell's n voxels, such as a bias in the low-dose tails, counts n times, noise once "
                   "(default 0: voxel MSE only)")
    p.add_argument("--ring-weight", type=_non_negative_float,
                   help="weight of the loss term on each slice's radial profile (dose means over rings around the "
                   "beam axis): an error of one sign all round a ring, such as a lateral width off by a fraction of "
                   "a millimetre, counts as many times as the ring has voxels, noise once (default 0)")
    p.add_argument("--ema", type=_ema_decay,
                   help="validate and save an exponential moving average of the weights with this decay per step, "
                   "e.g. 0.999 (about the last 1,000 steps; default 0: the weights themselves)")
    p.add_argument("--checkpoint-every", type=non_negative_int,
                   help="save resumable state every N steps (0: at epoch ends only; default 50)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last saved state, with its settings (changed ones are "
                        "refused, except a larger --epochs, which extends the run)")
    _add_overwrite(p, "the run already in --out (start over)")
    _add_common(p, seed_default=None)
    p.set_defaults(func=cmd_train, device=None)

    p = sub.add_parser("evaluate", help="compare an engine with a reference dataset (gamma, errors)",
                       description="Evaluate any engine (the learned model, the analytic pencil beam, MCsquare) "
                       "against a reference dataset: gamma pass rates (paper protocol 1%/3mm by default), "
                       "relative error, failures by depth. Writes metrics.json and plots.")
    p.add_argument("reference", type=Path, help="reference dataset with dose (e.g. Monte Carlo)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--engine", default="dota", help="dota (default), analytic or mcsquare")
    p.add_argument("--model", help="checkpoint path or preset name for --engine dota (default: the shipped model)")
    p.add_argument("--criteria", default="1%/3mm", help="comma-separated gamma criteria, e.g. 1%%/3mm,2%%/2mm")
    p.add_argument("--max-beamlets", type=positive_int, help="evaluate only the first N beamlets")
    p.add_argument("--no-predictions", action="store_true", help="do not save predictions.h5")
    _add_overwrite(p, "results already in --out")
    _add_common(p, seed_help="seed of the random weights when --model is a preset name (default 0)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="predict dose for the beamlets of a dataset file",
                       description="Predict dose (Gy per 1e9 primaries) with a trained model for every beamlet "
                       "in a dataset file; writes the shared HDF5 format.")
    p.add_argument("data", type=Path, help="input dataset (geometry and energy are used)")
    p.add_argument("--model", help="checkpoint path, or a preset name for random weights (default: the shipped model)")
    p.add_argument("--out", type=Path, required=True, help="output HDF5 file (never the input)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="beamlets per model call (default 16)")
    _add_overwrite(p)
    _add_common(p, seed_help="seed of the random weights when --model is a preset name (default 0)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("demo", help="the shipped model against Monte Carlo, and a small plan (a few minutes)",
                       description="The shipped default model end to end: its beamlets against the Monte Carlo "
                       "beamlets shipped with it (the analytic engine beside it), a small plan on a phantom made "
                       "and recomputed with it (RTDOSE, DVH, plan page), and a report. --train-minutes adds the "
                       "training workflow (analytic data, the small preset trained for that long).")
    p.add_argument("--out", type=Path, default=Path("dota-demo"), help="results folder (default ./dota-demo)")
    p.add_argument("--model", help="checkpoint to demonstrate instead of the shipped default model")
    p.add_argument("--train-minutes", type=_non_negative_float, default=0.0,
                   help="also generate analytic data and train the small preset for this long (default 0: no)")
    _add_common(p)
    p.set_defaults(func=cmd_demo)

    # -- further commands are registered below this line (generate, bench, report, ...) --

    p = sub.add_parser("generate", help="generate a beamlet dataset with an engine (analytic or MCsquare)",
                       description="Generate beamlets (geometry + dose) from phantoms or real CT along random beam "
                       "directions. Deterministic for a seed; parallel on Ray (--workers, --ray-address); finished "
                       "beamlets are saved as they finish and --resume completes an interrupted run.")
    p.add_argument("--engine", default="analytic", help="analytic or mcsquare (default analytic)")
    p.add_argument("--phantom", help="phantom kind(s), comma-separated: water, slab, heterogeneous, lung, bone")
    p.add_argument("--ct", help="'all' (every CT in ../shared/data/ct or $DOTA_CT_DIR), or CT paths, comma-separated")
    p.add_argument("--split", choices=["train", "val", "test"],
                   help="keep only the CT patients of this split (patients never cross splits; phantoms train)")
    p.add_argument("--balance-sites", action="store_true",
                   help="give every anatomical site (head and neck, thorax, abdomen, pelvis, limb, phantom) "
                   "the same share of beamlets")
    p.add_argument("--geometry", type=Path, metavar="BLOCKS.h5",
                   help="recompute the dose of the blocks (and energies) of this dataset file, e.g. Monte Carlo "
                   "for blocks you bring, instead of sampling phantoms or CT")
    en = p.add_mutually_exclusive_group()
    en.add_argument("--energies", help="comma-separated energies in MeV, cycled over the beamlets")
    en.add_argument("--energy-range", help="LO:HI in MeV, sampled uniformly per beamlet")
    p.add_argument("--peak-in-body", type=_share, default=0.0, metavar="FRACTION",
                   help="with --energy-range: this share of the beamlets takes the energy whose range in water "
                   "reaches a random point of the body on the beam's axis, as a plan's spots do (default 0: all "
                   "uniform)")
    p.add_argument("-n", "--num-beamlets", type=positive_int, help="number of beamlets (default: one per listed energy)")
    p.add_argument("--primaries", type=positive_int, help="protons per beamlet (mcsquare; default 1e5)")
    p.add_argument("--threads", type=positive_int, help="MCsquare threads per beamlet (default 1: bit-reproducible)")
    p.add_argument("--workers", type=positive_int, default=1, help="local Ray workers (default 1: in this process)")
    p.add_argument("--ray-address", help="address of an existing Ray cluster, e.g. auto or ray://host:10001")
    p.add_argument("--group-size", type=positive_int, help="beamlets per task (default 4 for mcsquare, 16 otherwise)")
    p.add_argument("--block-shape", type=_block_shape, default=BLOCK_SHAPE,
                   help="block LxHxW voxels of 2 mm (default 150x24x24; 225 MeV in water needs 164 slices)")
    p.add_argument("--resume", action="store_true", help="complete an interrupted run (same arguments)")
    p.add_argument("--out", type=Path, required=True, help="output HDF5 file")
    _add_overwrite(p)
    _add_common(p, device=False)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("mcsquare", help="install or locate the MCsquare Monte Carlo engine, rebuild its beam model",
                       description="install: install MCsquare from the PyPI wheel opentps-core==2.0.0 (Apache-2.0) "
                       "into $DOTA_CACHE/mcsquare (default ~/.cache/dota/mcsquare); where: print the MCsquare "
                       "build this CPU runs; beam-model: rebuild the extended beam model (70-225 MeV) the "
                       "package ships from the installed one (dota/resources/mcsquare/README.md).")
    p.add_argument("action", choices=["install", "where", "beam-model"])
    p.add_argument("--force", action="store_true", help="reinstall even when installed")
    p.add_argument("--wheel", type=Path, help="install from a local copy of the opentps-core 2.0.0 wheel")
    p.add_argument("--cache-dir", type=Path, help="install folder")
    p.add_argument("--out", type=Path, help="beam-model: the file to write")
    _add_overwrite(p)
    p.set_defaults(func=cmd_mcsquare)

    p = sub.add_parser("bench", help="benchmark the inference engine against the plain full pass",
                       description="Time the exact caching inference engine against the model's plain full forward "
                       "pass on single beamlets, an energy sweep, a spot map (plan), requests sharing leading slices "
                       "(prefix) and batch sizes 1-32, interleaved; check that every computed slice matches. Writes "
                       "bench.json, bench.md and PNG plots to --out.")
    p.add_argument("--out", type=Path, default=Path("runs/bench"), help="results folder (default runs/bench)")
    p.add_argument("--model", default="default",
                   help="checkpoint path, or a preset name for random weights (default: the shipped model)")
    p.add_argument("--quick", action="store_true", help="small scenarios (under 2 minutes; for CI)")
    p.add_argument("--scenarios", help="comma-separated subset of: single, energy_sweep, plan, prefix, batch")
    p.add_argument("--threads", type=positive_int, help="torch threads (default: one per available core)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="batch of the plain pass (default 8)")
    p.add_argument("--bf16", action="store_true", help="engine in bf16 autocast (not exact; error reported)")
    p.add_argument("--compile", action="store_true", help="torch.compile the engine's encoder and decoder")
    p.add_argument("--omp-wait-policy", choices=["bounded", "passive", "active", "default"], default="bounded",
                   help="how idle OpenMP threads wait between parallel regions: spin briefly then sleep (bounded, "
                   "default), sleep (passive), spin (active), or leave the environment alone (default); spinning "
                   "threads slow everything down on cores shared with other processes")
    _add_overwrite(p, "results already in --out")
    _add_common(p, device=False, seed_help="seed of the inputs and of the random weights of a preset (default 0)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("report", help="write the results report (one offline HTML page) from train/evaluate/bench "
                       "outputs and plan pages",
                       description="Build one self-contained HTML report (plus its PNG images) from the folders "
                       "written by dota train, evaluate, bench and demo: dose maps with a depth slider, gamma and "
                       "error statistics beside the paper's, speed-ups, training curves, versions and commands; "
                       "the plan pages of dota dose / dota plan --report side by side per CT and plan, copied "
                       "into the report and linked. Missing inputs are noted in the page.")
    p.add_argument("inputs", nargs="*", type=Path,
                   help="demo folder (its train/, evaluate*/, bench/, plan/report/ are found) or run, evaluation, "
                   "bench or plan page folders")
    p.add_argument("--train", type=Path, action="append", help="training run folder (repeatable)")
    p.add_argument("--evaluate", type=Path, action="append", help="evaluation folder (repeatable)")
    p.add_argument("--bench", type=Path, action="append", help="benchmark folder with bench.json (repeatable)")
    p.add_argument("--plan", type=Path, action="append",
                   help="plan page folder of dota dose/plan --report (index.html, run_summary.json; repeatable)")
    p.add_argument("--out", type=Path, help="report folder (default: INPUT/report for one input folder, else ./report)")
    p.add_argument("--worst-k", type=positive_int, default=10, help="rows in the worst-beamlet tables (default 10)")
    p.add_argument("--no-analytic", action="store_true", help="do not add the analytic engine's dose to the profiles")
    _add_overwrite(p, "a report already in --out")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("view", help="open a report in the browser, or serve it on localhost",
                       description="Open REPORT (a report folder, its index.html, or a folder holding report/) in "
                       "the default browser; with --port or --no-browser, serve it on 127.0.0.1 and print the URL.")
    p.add_argument("report", nargs="?", type=Path, default=Path("."), help="report folder or index.html (default .)")
    p.add_argument("--port", type=port_number, help="serve on this port, 1-65535 (--no-browser alone: any free port)")
    p.add_argument("--no-browser", action="store_true", help="do not open a browser; serve and print the URL")
    p.set_defaults(func=cmd_view)

    # whole treatment plans (dota dose, dota plan): their parsers live beside their code
    from dota.plan.cli import add_commands as add_plan_commands

    add_plan_commands(sub, _add_common)
    return parser


def _one_line(text: str) -> str:
    return "; ".join(part.strip() for part in str(text).splitlines() if part.strip())


def error_line(exc: BaseException) -> str:
    """One line naming the problem of an error that is not one of dota's own, and the file it concerns:
    the file an OSError names, else where in the code it was raised."""
    if isinstance(exc, DotaError):
        return _one_line(str(exc))
    from dota.fileio import is_disk_full

    if isinstance(exc, MemoryError):
        return "out of memory: use smaller batches (--batch-size) or fewer beamlets"
    if isinstance(exc, OSError):
        name = exc.filename if exc.filename is not None else ""
        if is_disk_full(exc):
            return f"no space left on device{f' writing {name}' if name else ''}; free some space and run again"
        reason = exc.strerror or _one_line(str(exc)) or type(exc).__name__
        return f"{name}: {reason}" if name else reason
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (in {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {_one_line(str(exc)) or 'no message'}{where}; --verbose shows the traceback"


def main(argv: list[str] | None = None) -> int:
    """Run one command; every error becomes one line on stderr (the traceback too with --verbose).

    Exit codes: 0 done, 2 refused input or a failure named by the message (dota's errors, files, disk,
    memory), 1 an unexpected internal error, 130 interrupted."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"dota {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the one place that turns every error into one line
        if args.verbose:
            traceback.print_exc(file=sys.stderr)
        print(f"dota {args.command}: error: {error_line(exc)}", file=sys.stderr)
        return 2 if isinstance(exc, (DotaError, OSError, MemoryError)) else 1


if __name__ == "__main__":
    sys.exit(main())
