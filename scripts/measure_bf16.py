#!/usr/bin/env python
"""Measure the opt-in bf16 path of a model against its fp32 engine and against Monte Carlo.

    python scripts/measure_bf16.py --model src/dota/resources/models/default.safetensors \
        --data data/mc/mc_test_1e6.h5 --n 20 --out runs/bf16.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()

    from dota.checkpoint import load_model
    from dota.data.hdf5 import read_dataset
    from dota.evaluation.gamma import paper_gamma
    from dota.inference import InferenceEngine

    model = load_model(args.model)
    data = read_dataset(args.data, slice(0, args.n))
    fp32 = InferenceEngine(model, path="engine").predict(data.geometry, data.energy)
    bf16 = InferenceEngine(model, path="engine", precision="bf16").predict(data.geometry, data.energy)
    rel = [float(np.abs(bf16[i] - fp32[i]).max() / fp32[i].max()) for i in range(len(data.energy))]
    g32 = [paper_gamma(data.dose[i], fp32[i]).pass_rate_percent for i in range(len(data.energy))]
    g16 = [paper_gamma(data.dose[i], bf16[i]).pass_rate_percent for i in range(len(data.energy))]
    result = {"model": str(args.model), "data": str(args.data), "beamlets": len(rel),
              "max_abs_diff_rel": max(rel), "median_abs_diff_rel": float(np.median(rel)),
              "gamma_mean": float(np.mean(g16)), "gamma_mean_fp32": float(np.mean(g32))}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
