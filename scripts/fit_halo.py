"""Fit the out-of-block halo table (``dota/resources/halo/mcsquare_halo.json``) to MCsquare in water.

One MCsquare beamlet per energy in a water block 150 x 80 x 80 voxels of 2 mm (160 mm wide; the model's
blocks are 24 x 24), the same beam model and calibration as the training data; then
:func:`dota.plan.halo.fit_halo` per energy. Each beamlet is cached under ``--work`` (resumable).

    .venv/bin/python scripts/fit_halo.py                 # 9 energies x 3e5 protons: ~3 min on one core
    .venv/bin/python scripts/fit_halo.py --primaries 1000000 --out /tmp/halo.json
"""

from __future__ import annotations

import argparse
import datetime
import os
import time
from pathlib import Path

import numpy as np

from dota.constants import BLOCK_SHAPE, VOXEL_MM
from dota.plan.halo import HALO_SIGMAS_MM, HaloTable, fit_halo

ENERGIES_MEV = (70, 90, 110, 130, 150, 170, 190, 210, 225)
DEPTH_FRACTIONS = np.round(np.arange(0.0, 1.0501, 0.05), 4)
GRID_HW = (80, 80)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--primaries", type=int, default=300_000)
    ap.add_argument("--work", type=Path, default=Path("runs/halo"))
    ap.add_argument("--out", type=Path, default=Path("src/dota/resources/halo/mcsquare_halo.json"))
    args = ap.parse_args()
    from dota.engines.mcsquare import MCsquareEngine

    engine = MCsquareEngine(primaries=args.primaries, threads=1, seed=7)
    args.work.mkdir(parents=True, exist_ok=True)
    geometry = np.zeros((BLOCK_SHAPE[0], *GRID_HW), dtype=np.float32)  # water (0 HU)
    weights, fractions, errors = [], [], []
    for i, energy in enumerate(ENERGIES_MEV):
        cached = args.work / f"water_{energy}MeV_{args.primaries}.npy"
        if not cached.is_file():
            t0 = time.perf_counter()
            dose = engine.dose_one(geometry, float(energy), VOXEL_MM, seed=1000 + i)
            tmp = cached.with_suffix(".tmp.npy")
            np.save(tmp, dose)
            os.replace(tmp, cached)
            print(f"{energy} MeV: MCsquare {time.perf_counter() - t0:.1f} s", flush=True)
        dose = np.load(cached).astype(np.float64)
        w, diag = fit_halo(dose, float(energy), VOXEL_MM, BLOCK_SHAPE[1:], DEPTH_FRACTIONS)
        weights.append(w)
        fractions.append(round(diag["out_fraction"], 5))
        errors.append(round(float(np.nanmedian(diag["rms_error_of_max"])), 4))
        print(f"{energy} MeV: out-of-block fraction {diag['out_fraction']:.4f}, fit rms / max {errors[-1]:.3f}")
    table = HaloTable(np.asarray(ENERGIES_MEV, float), DEPTH_FRACTIONS, np.stack(weights), np.asarray(HALO_SIGMAS_MM),
                      BLOCK_SHAPE[1:], GRID_HW, {
                          "source": f"{engine.version}; water (0 HU, dota calibration), one spot per energy at the "
                                    f"block centre, {args.primaries} protons, seeds 1000+i",
                          "grid": f"{BLOCK_SHAPE[0]} x {GRID_HW[0]} x {GRID_HW[1]} voxels of 2 mm",
                          "out_of_block_fraction": dict(zip(map(str, ENERGIES_MEV), fractions)),
                          "fit_rms_of_max_median": dict(zip(map(str, ENERGIES_MEV), errors)),
                          "made_by": "scripts/fit_halo.py", "date": datetime.date.today().isoformat()})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(table.to_json())
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
