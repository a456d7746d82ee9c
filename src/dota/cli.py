"""``dota <command>``: a thin shell over the package's functions; one function call per command."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from dota.errors import DotaError


def _energies(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"energies must be comma-separated numbers in MeV, got {text!r}") from None


def _add_common(p: argparse.ArgumentParser, device: bool = True) -> None:
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    if device:
        p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


# -- commands ----------------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    from dota.train import TrainConfig, train

    cfg = TrainConfig(
        preset=args.preset, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, optimizer=args.optimizer, lr_halving_epochs=args.lr_halving_epochs,
        val_fraction=args.val_fraction, augment=not args.no_augment, flips=args.flips, seed=args.seed,
        checkpoint_every=args.checkpoint_every, device=args.device,
    )
    summary = train(args.data, args.out, cfg, resume=args.resume, val_data=args.val_data,
                    progress=not args.no_progress)
    if summary["world_size"] == 1 or int(__import__("os").environ.get("RANK", "0")) == 0:
        print(f"best validation loss {summary['best_val_loss']:.4e}; model: {summary['best_checkpoint']}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from dota.evaluate import evaluate

    result = evaluate(
        args.reference, args.out, engine=args.engine, model=args.model, criteria=args.criteria,
        max_beamlets=args.max_beamlets, device=args.device, progress=not args.no_progress,
        save_predictions=not args.no_predictions,
    )
    print(json.dumps(result["summary"], indent=2))
    print(f"results: {Path(args.out).resolve()}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from dota.evaluate import predict_file

    out = predict_file(args.data, args.out, model=args.model, device=args.device,
                       batch_size=args.batch_size, progress=not args.no_progress)
    print(f"predicted dose written to {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from dota.demo import run_demo

    out = run_demo(args.out, minutes=args.minutes, seed=args.seed, device=args.device,
                   progress=not args.no_progress)
    print(f"demo results: {out.resolve()}")
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
    p.add_argument("--preset", default="paper", help="model preset: paper, small, tiny (default paper)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--optimizer", choices=["lamb", "adamw"], default="lamb")
    p.add_argument("--lr-halving-epochs", type=int, default=4, help="halve the lr every N epochs (0: never)")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--no-augment", action="store_true", help="no random 90-degree lateral rotations")
    p.add_argument("--flips", action="store_true", help="also random lateral flips")
    p.add_argument("--checkpoint-every", type=int, default=50, help="save resumable state every N steps")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last saved state")
    _add_common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="compare an engine with a reference dataset (gamma, errors)",
                       description="Evaluate any engine (the learned model, the analytic pencil beam, MCsquare) "
                       "against a reference dataset: gamma pass rates (paper protocol 1%%/3mm by default), "
                       "relative error, failures by depth. Writes metrics.json and plots.")
    p.add_argument("reference", type=Path, help="reference dataset with dose (e.g. Monte Carlo)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--engine", default="dota", help="dota (needs --model), analytic or mcsquare")
    p.add_argument("--model", help="checkpoint path or preset name for --engine dota")
    p.add_argument("--criteria", default="1%/3mm", help="comma-separated gamma criteria, e.g. 1%%/3mm,2%%/2mm")
    p.add_argument("--max-beamlets", type=int, help="evaluate only the first N beamlets")
    p.add_argument("--no-predictions", action="store_true", help="do not save predictions.h5")
    _add_common(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="predict dose for the beamlets of a dataset file",
                       description="Predict dose (Gy per 1e9 primaries) with a trained model for every beamlet "
                       "in a dataset file; writes the shared HDF5 format.")
    p.add_argument("data", type=Path, help="input dataset (geometry and energy are used)")
    p.add_argument("--model", required=True, help="checkpoint path (or a preset name for random weights)")
    p.add_argument("--out", type=Path, required=True, help="output HDF5 file")
    p.add_argument("--batch-size", type=int, default=16)
    _add_common(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("demo", help="generate data, train the small model, evaluate it (about 10 min on 2 cores)",
                       description="End to end on the analytic engine: generate a small heterogeneous dataset, "
                       "train the 'small' preset for a few minutes, evaluate it with the gamma index, "
                       "and write metrics and plots to --out.")
    p.add_argument("--out", type=Path, default=Path("dota-demo"), help="results folder (default ./dota-demo)")
    p.add_argument("--minutes", type=float, default=5.0, help="training time budget in minutes (default 5)")
    _add_common(p)
    p.set_defaults(func=cmd_demo)

    # -- further commands are registered below this line (generate, bench, report, ...) --

    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        return int(args.func(args) or 0)
    except DotaError as exc:
        print(f"dota {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dota {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
