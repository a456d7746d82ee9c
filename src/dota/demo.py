"""``dota demo``: the whole workflow in about ten minutes on two CPU cores.

1. generate a small heterogeneous dataset with the analytic pencil-beam engine (the fast baseline;
   Monte Carlo ground truth is ``dota generate --engine mcsquare``),
2. train the ``small`` preset for a few minutes,
3. evaluate it on held-out beamlets with the paper's gamma protocol,
4. write a report. Every step resumes: re-running the demo reuses what is already done.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from dota.errors import InputError
from dota.fileio import atomic_write, check_output

log = logging.getLogger(__name__)

#: Demo sizes, chosen so generation + training + evaluation fit in about ten minutes on 2 cores.
DEMO_TRAIN_BEAMLETS = 480
DEMO_TEST_BEAMLETS = 48
DEMO_ENERGY_RANGE_MEV = (70.0, 220.0)
DEMO_EPOCHS = 24


def run_demo(
    out: str | Path = "dota-demo",
    *,
    minutes: float = 6.0,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
    train_beamlets: int = DEMO_TRAIN_BEAMLETS,
    test_beamlets: int = DEMO_TEST_BEAMLETS,
    epochs: int = DEMO_EPOCHS,
) -> Path:
    """Run the demo into ``out``; returns the folder. ``minutes`` bounds the training time."""
    from dota.evaluate import evaluate
    from dota.generate import generate_dataset
    from dota.train import TrainConfig, train

    if not minutes > 0:
        raise InputError(f"--minutes must be positive, got {minutes}")
    # the demo resumes (it reuses what a previous run in the same folder finished): an existing folder is fine
    out = check_output(out, folder=True, resumable=True)
    (out / "data").mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def say(msg: str) -> None:
        print(f"[demo] {msg}", flush=True)

    t = time.perf_counter()
    for name, n, s in (("train", train_beamlets, seed), ("test", test_beamlets, seed + 1000)):
        path = out / "data" / f"{name}.h5"
        if path.is_file():
            say(f"reusing {path}")
            continue
        say(f"generating {n} {name} beamlets (analytic engine, heterogeneous phantoms)")
        generate_dataset(
            path, engine="analytic", n_beamlets=n, energy_range_mev=DEMO_ENERGY_RANGE_MEV,
            phantom="heterogeneous", seed=s, resume=True, progress=progress,
        )
    timings["generate_s"] = time.perf_counter() - t

    t = time.perf_counter()
    run_dir = out / "train"
    if (run_dir / "summary.json").is_file():
        say(f"reusing the trained model in {run_dir}")
    else:
        say(f"training the 'small' preset for at most {minutes:g} minutes")
        cfg = TrainConfig(preset="small", epochs=epochs, batch_size=8, optimizer="adamw", lr=2e-3, lr_halving_epochs=4,
                          seed=seed, device=device, checkpoint_every=25)
        train(out / "data" / "train.h5", run_dir, cfg, resume=(run_dir / "state.pt").is_file(),
              progress=progress, time_budget_s=minutes * 60)
    timings["train_s"] = time.perf_counter() - t

    t = time.perf_counter()
    say("evaluating the model against the held-out analytic beamlets (gamma 1%/3mm, paper protocol)")
    result = evaluate(out / "data" / "test.h5", out / "evaluate", engine="dota",
                      model=str(run_dir / "best.safetensors"), criteria="1%/3mm,2%/2mm",
                      device=device, progress=progress, overwrite=True)
    timings["evaluate_s"] = time.perf_counter() - t

    summary: dict[str, Any] = {
        "what": "DoTA 'small' preset trained on analytic pencil-beam beamlets, evaluated on held-out ones",
        "gamma": result["summary"]["gamma"],
        "relative_error_percent": result["summary"]["relative_error_percent"],
        "engine_ms_per_beamlet": result["summary"]["engine_ms_per_beamlet"],
        "timings_s": timings,
    }
    from dota.report import build_report

    say("writing the report")
    report = build_report(out, out / "report")
    summary["report"] = str(report)
    atomic_write(out / "demo_summary.json", lambda p: Path(p).write_text(json.dumps(summary, indent=2)))
    g = result["summary"]["gamma"]["1%/3mm"]
    say(f"gamma 1%/3mm pass rate: mean {g['mean']:.2f} %, min {g['min']:.2f} % over {result['summary']['beamlets']} beamlets")
    say(f"results: {out.resolve()}")
    say(f"report: {report.resolve()}  (open it with 'dota view {out}')")
    return out
