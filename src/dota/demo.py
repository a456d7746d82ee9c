"""``dota demo``: the shipped default model end to end, in a few minutes on two CPU cores.

1. **Beamlets against Monte Carlo**: the default model and the analytic pencil beam on the Monte Carlo
   beamlets shipped with the model (``dota/resources/models/default_golden.h5``: held-out patients,
   1e6 primaries), gamma 1 %/3 mm with the paper's protocol, relative error;
2. **a small plan**: a synthetic head-sized phantom (water, a bone slab, a lung-density insert), a
   spherical target, two beams: ``dota plan`` places spots and optimises their weights, ``dota dose``
   recomputes the dose with the default model and writes RTDOSE, DVHs and a plan page;
3. **a report** of both (one offline HTML page; ``dota view`` opens it).

``train_minutes > 0`` adds the training workflow: a small analytic dataset, the ``small`` preset
trained for that long, evaluated on held-out beamlets (a model trained for minutes on analytic data:
it shows the workflow, not DoTA's accuracy). Every step resumes: rerunning reuses what is done.
"""

from __future__ import annotations

import json
import logging
import time
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from dota.errors import InputError
from dota.fileio import atomic_write, check_output

log = logging.getLogger(__name__)

#: Sizes of the optional training part (about ten minutes on 2 cores in all).
DEMO_TRAIN_BEAMLETS = 480
DEMO_TEST_BEAMLETS = 48
DEMO_ENERGY_RANGE_MEV = (70.0, 220.0)
DEMO_EPOCHS = 24
#: The demo plan: prescription (Gy) on a 15 mm radius target, two beams (gantry 0 and 90), 4 mm spots.
DEMO_PLAN = {"prescription_gy": 2.0, "target_radius_mm": 15.0, "angles": "0,90", "spot_spacing_mm": 4.0}


def golden_set_path() -> Path:
    """The Monte Carlo beamlets shipped with the default model (held-out patients, 1e6 primaries)."""
    return Path(str(resources.files("dota").joinpath("resources", "models", "default_golden.h5")))


def write_phantom_ct(path: str | Path, voxel_mm: float = 3.0) -> tuple[Path, tuple[float, float, float]]:
    """A 15 x 15 x 15 cm phantom CT (MetaImage, HU; DICOM patient frame, head first supine) and the centre
    of its target (mm). Water body in air, a 1.5 cm bone slab (700 HU) in front of the target, a
    lung-density insert (-750 HU) on the patient's left; the target is a 3 cm sphere at the centre."""
    from dota.engines.mcsquare import write_mhd

    n = int(round(150.0 / voxel_mm))
    c = (np.arange(n) + 0.5) * voxel_mm - 75.0  # voxel centres, mm, origin at the centre of the box
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    hu = np.full((n, n, n), -1000.0, np.float32)
    body = (np.abs(x) < 65) & (np.abs(y) < 60) & (np.abs(z) < 70)
    hu[body] = 0.0
    hu[body & (y > -40) & (y < -25) & (np.abs(x) < 30)] = 700.0  # anterior bone slab (y < 0 is anterior)
    hu[body & (x > 25) & (x < 50) & (np.abs(y) < 30) & (np.abs(z) < 40)] = -750.0  # lung insert, patient's left
    origin = (float(c[0]),) * 3
    written = write_mhd(path, hu, (voxel_mm, voxel_mm, voxel_mm), origin)
    return written, (0.0, 0.0, 0.0)


def run_demo(
    out: str | Path = "dota-demo",
    *,
    train_minutes: float = 0.0,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
    train_beamlets: int = DEMO_TRAIN_BEAMLETS,
    test_beamlets: int = DEMO_TEST_BEAMLETS,
    epochs: int = DEMO_EPOCHS,
    model: str | None = None,
) -> Path:
    """Run the demo into ``out``; returns the folder (see the module docstring)."""
    from dota.evaluate import evaluate

    if train_minutes < 0:
        raise InputError(f"--train-minutes must be >= 0, got {train_minutes}")
    # the demo resumes (it reuses what a previous run in the same folder finished): an existing folder is fine
    out = check_output(out, folder=True, resumable=True)
    timings: dict[str, float] = {}

    def say(msg: str) -> None:
        print(f"[demo] {msg}", flush=True)

    # 1. the default model and the analytic engine against Monte Carlo beamlets
    golden = golden_set_path()
    results: dict[str, Any] = {}
    t = time.perf_counter()
    for name, engine in (("dota", "dota"), ("analytic", "analytic")):
        say(f"{name}: {golden.name} (Monte Carlo, held-out patients), gamma 1%/3mm with the paper's protocol")
        results[name] = evaluate(golden, out / f"evaluate-{name}", engine=engine,
                                 model=model if engine == "dota" else None, criteria="1%/3mm,2%/2mm",
                                 device=device, progress=progress, overwrite=True)["summary"]
    timings["beamlets_s"] = time.perf_counter() - t

    # 2. a small plan on a phantom, optimised and recomputed with the default model
    t = time.perf_counter()
    plan_dir = out / "plan"
    plan_summary = _demo_plan(plan_dir, model=model, device=device, seed=seed, progress=progress, say=say)
    timings["plan_s"] = time.perf_counter() - t

    # 3. optionally, the training workflow
    if train_minutes > 0:
        t = time.perf_counter()
        results["trained"] = _demo_training(out, train_minutes, seed=seed, device=device, progress=progress,
                                            train_beamlets=train_beamlets, test_beamlets=test_beamlets,
                                            epochs=epochs, say=say)
        timings["training_s"] = time.perf_counter() - t

    from dota.report import build_report

    say("writing the report")
    report = build_report(out, out / "report")
    summary: dict[str, Any] = {
        "what": "the shipped default model and the analytic engine against Monte Carlo beamlets; a phantom plan",
        "golden_set": str(golden),
        "beamlets": {k: {"gamma": v["gamma"], "relative_error_percent": v["relative_error_percent"],
                         "engine_ms_per_beamlet": v["engine_ms_per_beamlet"]} for k, v in results.items()},
        "plan": plan_summary,
        "timings_s": timings,
        "report": str(report),
    }
    atomic_write(out / "demo_summary.json", lambda p: Path(p).write_text(json.dumps(summary, indent=2, default=str)))
    for name, res in results.items():
        g = res["gamma"]["1%/3mm"]
        say(f"{name}: gamma 1%/3mm mean {g['mean']:.2f} % (min {g['min']:.1f} %), relative error "
            f"{res['relative_error_percent']['mean']:.3f} % over {res['beamlets']} beamlets")
    say(f"plan: {plan_summary['spot_energies']} spot-energies, target D95 {plan_summary['target_d95_gy']:.3f} Gy "
        f"for {DEMO_PLAN['prescription_gy']:g} Gy, dose in {plan_summary['dose_s']:.1f} s; page {plan_summary['page']}")
    say(f"results: {out.resolve()}")
    say(f"report: {report.resolve()}  (open it with 'dota view {out}')")
    return out


def _demo_plan(plan_dir: Path, *, model: str | None, device: str, seed: int, progress: bool, say) -> dict[str, Any]:
    from dota.plan.workflow import run_dose, run_plan

    done = plan_dir / "plan_summary.json"
    if done.is_file():
        say(f"reusing the plan in {plan_dir}")
        return json.loads(done.read_text())
    plan_dir.mkdir(parents=True, exist_ok=True)
    ct, centre = write_phantom_ct(plan_dir / "phantom_ct.mhd")
    target = "sphere:{:g},{:g},{:g},{:g}".format(*centre, DEMO_PLAN["target_radius_mm"])
    say(f"plan: phantom CT, target {target}, gantry {DEMO_PLAN['angles']}, spots placed and optimised with the "
        "default model's dose-influence matrix")
    planned = run_plan(ct, target, [plan_dir / "plan.dcm", plan_dir / "plan.json"], angles=DEMO_PLAN["angles"],
                       prescription_gy=DEMO_PLAN["prescription_gy"], engine="dota", model=model, device=device,
                       seed=seed, spot_spacing_mm=DEMO_PLAN["spot_spacing_mm"], progress=progress,
                       overwrite=True)  # a rerun (no plan_summary.json yet) replaces what an interrupted one left
    say("plan: recomputing its dose with the default model (RTDOSE, DVH, plan page)")
    t = time.perf_counter()
    dosed = run_dose(ct, plan_dir / "plan.dcm", [plan_dir / "dose.dcm", plan_dir / "dose.mhd"], engine="dota",
                     model=model, device=device, seed=seed, structures=[target], dvh_csv=plan_dir / "dvh.csv",
                     prescription_gy=DEMO_PLAN["prescription_gy"], report_dir=plan_dir / "report", progress=progress,
                     overwrite=True)
    dose_s = time.perf_counter() - t
    target_stats = _target_stats(dosed)
    summary = {"spot_energies": dosed.get("spot_energies"), "dose_s": dose_s,
               "target_d95_gy": target_stats.get("D95_gy", float("nan")), "target": target,
               "page": str(plan_dir / "report" / "index.html"), "plan": {k: v for k, v in planned.items()
                                                                         if k != "written"},
               "dose": {k: v for k, v in dosed.items() if k != "written"}}
    atomic_write(done, lambda p: Path(p).write_text(json.dumps(summary, indent=1, default=str)))
    return summary


def _target_stats(dose_summary: dict[str, Any]) -> dict[str, float]:
    """The first structure's DVH statistics from a ``run_dose`` summary (keys as it writes them)."""
    for stats in (dose_summary.get("dvh") or {}).values():
        return {"D95_gy": float(stats["D95_gy"])}
    return {}


def _demo_training(out: Path, minutes: float, *, seed: int, device: str, progress: bool, train_beamlets: int,
                   test_beamlets: int, epochs: int, say) -> dict[str, Any]:
    from dota.evaluate import evaluate
    from dota.generate import generate_dataset
    from dota.train import TrainConfig, train

    (out / "data").mkdir(parents=True, exist_ok=True)
    for name, n, s in (("train", train_beamlets, seed), ("test", test_beamlets, seed + 1000)):
        path = out / "data" / f"{name}.h5"
        if path.is_file():
            say(f"reusing {path}")
            continue
        say(f"generating {n} {name} beamlets (analytic engine, heterogeneous phantoms)")
        generate_dataset(path, engine="analytic", n_beamlets=n, energy_range_mev=DEMO_ENERGY_RANGE_MEV,
                         phantom="heterogeneous", seed=s, resume=True, progress=progress)
    run_dir = out / "train"
    if (run_dir / "summary.json").is_file():
        say(f"reusing the trained model in {run_dir}")
    else:
        say(f"training the 'small' preset for at most {minutes:g} minutes on analytic beamlets")
        cfg = TrainConfig(preset="small", epochs=epochs, batch_size=8, optimizer="adamw", lr=2e-3,
                          lr_halving_epochs=4, seed=seed, device=device, checkpoint_every=25)
        train(out / "data" / "train.h5", run_dir, cfg, resume=(run_dir / "state.pt").is_file(),
              progress=progress, time_budget_s=minutes * 60)
    say("evaluating the trained model against the held-out analytic beamlets")
    return evaluate(out / "data" / "test.h5", out / "evaluate", engine="dota",
                    model=str(run_dir / "best.safetensors"), criteria="1%/3mm,2%/2mm",
                    device=device, progress=progress, overwrite=True)["summary"]
