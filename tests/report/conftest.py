"""A demo-like folder (tiny training run, evaluation with predictions, quick benchmark), all written by
the real commands, and its report, built once per session for the report and browser tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dota.bench import run_benchmark
from dota.data.hdf5 import write_dataset
from dota.evaluate import evaluate
from dota.report import build_report
from dota.train import TrainConfig, train
from tests.conftest import TEST_ATTRS, synthetic_beamlets
from tests.test_bench import TINY_SIZES


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report_inputs")
    g, e, d = synthetic_beamlets(30, seed=3)
    write_dataset(root / "data" / "train.h5", g[:6], d[:6], e[:6], attrs=TEST_ATTRS)
    inside = np.flatnonzero((e > e[:6].min()) & (e < e[:6].max()))
    test = inside[inside >= 6][:3]  # held out, within the energies the model was normalised for
    sources = np.array(["phantom:slab", "ct:openkbp_pt_201", "phantom:water"])  # two sites in the summary
    write_dataset(root / "data" / "test.h5", g[test], d[test], e[test], attrs=TEST_ATTRS,
                  meta={"seed": test, "source": sources[: len(test)]})
    cfg = TrainConfig(
        preset="tiny", epochs=2, batch_size=4, checkpoint_every=0, validate_cache_beamlets=2, device="cpu"
    )
    train(root / "data" / "train.h5", root / "train", cfg, progress=False)
    evaluate(
        root / "data" / "test.h5",
        root / "evaluate",
        engine="dota",
        model=str(root / "train" / "best.safetensors"),
        device="cpu",
        progress=False,
        plots=False,
    )
    run_benchmark(root / "bench", model="tiny", sizes=TINY_SIZES, scenarios=["energy_sweep", "batch"], progress=False,
                  threads=1, command="dota bench --model tiny --out bench")
    return root


@pytest.fixture(scope="session")
def built_report(demo_dir, tmp_path_factory) -> Path:
    return build_report(
        demo_dir, tmp_path_factory.mktemp("report") / "report", analytic=False, command="dota report DEMO --no-analytic"
    )
