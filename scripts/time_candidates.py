#!/usr/bin/env python
"""Time candidate models (and the analytic engine) per beamlet on the same beamlets, interleaved.

    python scripts/time_candidates.py --data data/mc/mc_val_1e6.h5 --model analytic --model runs/a/best.safetensors ...

Each beamlet is one request (the "single" workload); every round runs every candidate once on every
beamlet, rounds alternate the order, the first round is warm-up (reported apart). Prints and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--model", action="append", required=True, help="'analytic', 'analytic-bdl' or a checkpoint")
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path)
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from dota.data.hdf5 import read_dataset
    from dota.engines import get_engine

    data = read_dataset(args.data, slice(0, args.n))
    engines = {m: get_engine(m) if m.startswith("analytic") else get_engine("dota", model=m) for m in args.model}
    times: dict[str, list[float]] = {m: [] for m in engines}
    warm: dict[str, float] = {}
    for r in range(args.rounds + 1):
        order = list(engines) if r % 2 == 0 else list(reversed(engines))
        for m in order:
            for i in range(len(data.energy)):
                t = time.perf_counter()
                engines[m].dose(data.geometry[i : i + 1], data.energy[i : i + 1])
                ms = (time.perf_counter() - t) * 1e3
                if r == 0:
                    warm[m] = warm.get(m, 0.0) + ms / len(data.energy)
                else:
                    times[m].append(ms)
    result = {"data": str(args.data), "beamlets": len(data.energy), "rounds": args.rounds, "threads": args.threads,
              "machine": platform.processor() or platform.machine(),
              "load_average": list(__import__("os").getloadavg()),
              "ms_per_beamlet": {m: {"median": float(np.median(v)), "p10": float(np.percentile(v, 10)),
                                     "p90": float(np.percentile(v, 90))} for m, v in times.items()},
              "warmup_ms_per_beamlet": warm}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
