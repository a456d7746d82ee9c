#!/usr/bin/env python
"""Measure how much wider a model's beamlets are than their Monte Carlo twins (dota.plan.lateral) and write a
copy of the checkpoint with that table in its record, which plans then sharpen its beamlets by.

    python scripts/plan_blocks.py data/mc/hn_planblocks_val_geom.h5 --split val --per-patient 300 --seed 9010
    dota generate --engine mcsquare --geometry data/mc/hn_planblocks_val_geom.h5 --primaries 100000 \\
        --workers 2 --resume --seed 1010 --out data/mc/hn_planblocks_val_1e5.h5
    python scripts/fit_lateral.py default data/mc/hn_planblocks_val_1e5.h5 --out runs/default-lateral.safetensors \\
        --json runs/default-lateral.json

The Monte Carlo file should hold validation patients' blocks (never the patients a plan is scored on).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from dota.plan.lateral import DEFAULT_EDGES_MEV

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="model checkpoint (.safetensors), or 'default' for the shipped model")
    p.add_argument("data", type=Path, help="Monte Carlo beamlets (HDF5 beamlet format)")
    p.add_argument("--bins", default=",".join(f"{e:g}" for e in DEFAULT_EDGES_MEV),
                   help="energy bin edges, MeV (default %(default)s)")
    p.add_argument("--min-blocks", type=int, default=10, help="bins with fewer blocks are merged (default 10)")
    p.add_argument("--out", type=Path, help="write the checkpoint with the table in its record here")
    p.add_argument("--json", type=Path, help="write the fit, per bin, as JSON here")
    args = p.parse_args(argv)

    from dota.checkpoint import default_model_path, save_model
    from dota.data.hdf5 import read_dataset
    from dota.engines.learned import LearnedEngine
    from dota.plan.lateral import fit_lateral_excess, lateral_table

    path = default_model_path() if args.checkpoint == "default" else Path(args.checkpoint)
    data = read_dataset(args.data)
    engine = LearnedEngine(str(path))
    if engine.lateral_table is not None:
        print(f"note: {path} already has a lateral calibration; the fit is of its beamlets as they are", file=sys.stderr)
    rows = fit_lateral_excess(engine, data, [float(v) for v in args.bins.split(",")], min_blocks=args.min_blocks,
                              progress=lambda i, n: print(f"  {i}/{n} blocks", end="\r", file=sys.stderr))
    print(file=sys.stderr)
    print(f"{'energy MeV':>10} {'blocks':>6} {'rows mm2':>9} {'cols mm2':>9} {'iso mm2':>8} {'SSE removed %':>13}")
    for r in rows:
        print(f"{r['energy_mev']:>10.1f} {r['blocks']:>6d} {r['rows_mm2']:>9.3f} {r['cols_mm2']:>9.3f} "
              f"{r['isotropic_mm2']:>8.3f} {r['squared_error_removed_percent']:>13.2f}")
    table = lateral_table(rows, data=args.data.name, blocks=len(data))
    if args.json:
        args.json.write_text(json.dumps({"checkpoint": str(path), "bins": rows, "table": table}, indent=1) + "\n")
    if args.out:
        extra = {**engine.model.checkpoint_info["extra"], "plan_lateral_mm2": table}
        save_model(engine.model, args.out, extra=extra)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
