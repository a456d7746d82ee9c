"""Plan blocks of head-and-neck patients as a geometry file: data with the exact block distribution of plans.

For each head-and-neck training patient (OpenKBP, the default model's ``train`` split; with ``--split val`` the
validation patient, to select fine-tuned checkpoints on) and its two opposed beams,
spots and energy layers are placed on its PTV70 as ``dota plan`` places them (6 mm spots and layers, the
settings of ``scripts/plans/hn26.dcm``), a random subset of the spot-energies is kept, and the analytic engine's
plan dose is run with ``blocks=``: every block is cut, sheared onto its ray and written exactly as a plan hands it
to an engine. The file is then a ``--geometry`` for Monte Carlo beamlets::

    python scripts/plan_blocks.py data/mc/hn_planblocks_geom.h5 --per-patient 750 --seed 9009
    dota generate --engine mcsquare --geometry data/mc/hn_planblocks_geom.h5 --primaries 20000 --workers 2 \\
        --resume --seed 1009 --out data/mc/hn_planblocks_2e4.h5

A validation set for model selection (fewer blocks, more primaries)::

    python scripts/plan_blocks.py data/mc/hn_planblocks_val_geom.h5 --split val --per-patient 300 --seed 9010
    dota generate --engine mcsquare --geometry data/mc/hn_planblocks_val_geom.h5 --primaries 100000 \\
        --workers 2 --resume --seed 1010 --out data/mc/hn_planblocks_val_1e5.h5

The beamlet dose in the geometry file is the analytic engine's; ``dota generate`` replaces it with MCsquare's.
Test patients are refused (their plans score the model), and so is a patient outside the split asked for.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HN = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ct" / "head_neck_openkbp"
#: patient: the two opposed gantry angles (deg) of its plan, chosen for short paths to its PTV70
PATIENTS = {"pt_13": (90, 270), "pt_14": (60, 300), "pt_15": (90, 270), "pt_16": (120, 240), "pt_17": (90, 270),
            "pt_18": (45, 315), "pt_20": (90, 270), "pt_21": (70, 290), "pt_22": (90, 270), "pt_24": (110, 250),
            "pt_6": (90, 270)}


def main(argv: list[str] | None = None) -> int:
    from dota.constants import BLOCK_SHAPE
    from dota.data.hdf5 import DatasetWriter
    from dota.data.splits import split_of
    from dota.engines import get_engine
    from dota.fileio import atomic_write
    from dota.plan.dose import compute_plan_dose
    from dota.plan.geometry import read_patient_ct
    from dota.plan.model import Plan
    from dota.plan.optimize import place_spots
    from dota.plan.workflow import load_structure_specs

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--per-patient", type=int, default=750, help="spot-energies kept per patient (default 750)")
    p.add_argument("--seed", type=int, default=9009)
    p.add_argument("--split", choices=("train", "val"), default="train",
                   help="which patients: the training split (default) or the validation split")
    p.add_argument("--patients", help="comma-separated (default: all of the split's patients listed here)")
    a = p.parse_args(argv)
    names = a.patients.split(",") if a.patients else [n for n in PATIENTS if split_of(f"openkbp_{n}") == a.split]
    unknown = [n for n in names if n not in PATIENTS]
    if unknown:
        raise SystemExit(f"no gantry angles listed for {', '.join(unknown)}; known: {', '.join(PATIENTS)}")
    for name in names:
        if split_of(f"openkbp_{name}") != a.split:
            raise SystemExit(f"{name} is not a {a.split} patient ({split_of(f'openkbp_{name}')} split)")
    rng = np.random.default_rng(a.seed)
    engine = get_engine("analytic")
    plans = []
    for name in names:
        ct = read_patient_ct(HN / f"{name}_ct.csv")
        target = load_structure_specs([str(HN / f"{name}_PTV70.csv")], ct)[0].mask
        beams = [place_spots(ct, target, g, spot_spacing_mm=6.0, layer_spacing_mm=6.0, name=f"G{g}")
                 for g in PATIENTS[name]]
        plan = Plan(beams, name=name)
        n = plan.n_spots
        keep = np.zeros(n, dtype=bool)
        keep[rng.choice(n, size=min(a.per_patient, n), replace=False)] = True
        plans.append((ct, plan.subset(keep)))
        print(f"{name}: {n} spot-energies placed, {int(keep.sum())} kept", file=sys.stderr)

    def write(tmp: str) -> None:
        attrs = {**engine.file_attrs(), "note": f"plan blocks of head-and-neck {a.split} patients (scripts/plan_blocks.py)"}
        with DatasetWriter(tmp, BLOCK_SHAPE, attrs=attrs) as writer:
            for ct, plan in plans:
                compute_plan_dose(ct, plan, engine, blocks=writer, workers=1)

    atomic_write(a.out, write)
    print(f"wrote {a.out}: {sum(pl.n_spots for _, pl in plans)} blocks", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
