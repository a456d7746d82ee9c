"""A demo-like folder (tiny training run, evaluation with predictions, hand-written bench.json) and
its report, built once per session for the report and browser tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dota.data.hdf5 import write_dataset
from dota.evaluate import evaluate
from dota.report import build_report
from dota.train import TrainConfig, train
from tests.conftest import TEST_ATTRS, synthetic_beamlets


def _ms(median: float) -> dict[str, float]:
    return {"median": median, "p10": 0.9 * median, "p90": 1.2 * median, "n": 5}


# The shape dota.bench.run_benchmark writes (abridged): per-scenario spreads, cache and memory, warm-up,
# truncation margins, a batch-size curve inside the "batch" scenario, cold start at the top level.
BENCH = {
    "machine": {
        "cpu": "test CPU",
        "cores_available": 2,
        "cpu_flags": ["avx2", "fma"],
        "torch": "2.x",
        "torch_threads": 2,
        "load_average": [0.5, 0.4, 0.3],
    },
    "model": {
        "source": "tiny",
        "weights": "random (seed 0)",
        "config": {"block_shape": [150, 24, 24]},
        "parameters": 55533,
    },
    "engine": {"truncation": "physics", "margin_mm": 5.0},
    "cold_start_ms": {"baseline": 120.0, "engine": 150.0},
    "command": "dota bench --quick --out bench",
    "torch": "2.x",
    "python": "3.11",
    "quick": True,
    "wall_s": 42.0,
    "scenarios": [
        {
            "name": "energy_sweep",
            "description": "one geometry, 20 energies",
            "beamlets": 20,
            "baseline_ms": _ms(60.0),
            "engine_ms": _ms(18.75),
            "speedup": 3.2,
            "max_abs_diff_rel": 2e-6,
            "tail_rel": 0.0,
            "computed_fraction": 0.57,
            "warmup_ms": {"baseline": 80.0, "engine": 95.0},
            "cache_bytes": 4194304,
            "cache_stats": {
                "geometry_cache": {"bytes": 3145728, "max_bytes": 1 << 27},
                "prefix_cache": None,
                "kv_buffer_bytes": 1048576,
            },
            "peak_rss_bytes": 734003200,
            "margins": {
                "beamlets": 20,
                "truncated_beamlets": 12,
                "margin_mm": 5.0,
                "analytic_tail_rel_max": 0.0,
                "slack_mm": {"min": 6.0, "p10": 6.0, "median": 8.0, "max": 12.0},
            },
        },
        {
            "name": "batch",
            "description": "distinct beamlets in requests of 1-16",
            "beamlets": 16,
            "baseline_ms": _ms(45.0),
            "engine_ms": _ms(13.0),
            "speedup": 45.0 / 13.0,
            "max_abs_diff_rel": 1e-6,
            "cache_bytes": 1048576,
            "peak_rss_bytes": 800000000,
            "hit_rate": None,
            "batch_curve": [
                {
                    "batch_size": b,
                    "baseline_ms": _ms(70.0 / b**0.2),
                    "engine_ms": _ms(30.0 / b**0.3),
                    "speedup": (70.0 / b**0.2) / (30.0 / b**0.3),
                }
                for b in (1, 4, 16)
            ],
        },
    ],
}


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report_inputs")
    g, e, d = synthetic_beamlets(30, seed=3)
    write_dataset(root / "data" / "train.h5", g[:6], d[:6], e[:6], attrs=TEST_ATTRS)
    inside = np.flatnonzero((e > e[:6].min()) & (e < e[:6].max()))
    test = inside[inside >= 6][:3]  # held out, within the energies the model was normalised for
    write_dataset(root / "data" / "test.h5", g[test], d[test], e[test], attrs=TEST_ATTRS, meta={"seed": test})
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
    (root / "bench").mkdir()
    (root / "bench" / "bench.json").write_text(json.dumps(BENCH))
    return root


@pytest.fixture(scope="session")
def built_report(demo_dir, tmp_path_factory) -> Path:
    return build_report(
        demo_dir, tmp_path_factory.mktemp("report") / "report", analytic=False, command="dota report DEMO --no-analytic"
    )
