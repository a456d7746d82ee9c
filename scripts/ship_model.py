#!/usr/bin/env python
"""Ship a trained checkpoint as dota's default model: weights, a JSON record and a model card.

Writes ``src/dota/resources/models/default.safetensors`` (the checkpoint, with the training record in
its metadata), ``default.json`` (data manifests, training command and history, metrics per site and
energy band against Monte Carlo for DoTA and the analytic engine, speed, bf16 error) and
``default.md`` (the model card, rendered from that JSON). Every figure in the card comes from the
files given here; nothing is typed in by hand.

    python scripts/ship_model.py --checkpoint runs/default/best.safetensors --train runs/default \
        --eval-dota runs/eval-test-dota --eval-analytic runs/eval-test-analytic \
        --val-dota runs/eval-val-dota --val-analytic runs/eval-val-analytic \
        --manifest data/mc_train_2e4.manifest.json --manifest ... --bench runs/bench --bf16 runs/bf16.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "src" / "dota" / "resources" / "models"
CRIT = "1%/3mm"


def _load(path: Path | None, name: str = "") -> Any:
    if path is None:
        return None
    p = path / name if name else path
    return json.loads(p.read_text())


def _metrics(ev: dict[str, Any] | None) -> dict[str, Any] | None:
    if ev is None:
        return None
    s = ev["summary"]
    return {
        "reference": Path(ev["reference"]).name,
        "reference_primaries": ev.get("reference_primaries"),
        "beamlets": s["beamlets"],
        "gamma": s["gamma"],
        "gamma_in_patient": s.get("gamma_in_patient", {}),
        "relative_error_percent": s["relative_error_percent"],
        "range_error_mm": s["range_error_mm"],
        "engine_ms_per_beamlet": s["engine_ms_per_beamlet"],
        "by_site": s.get("by_site", {}),
        "by_energy": s.get("by_energy", {}),
        "patients": sorted({r.get("patient") for r in ev["per_beamlet"] if r.get("patient")}),
    }


def _g(m: dict[str, Any], crit: str = CRIT) -> str:
    g = m["gamma"][crit]
    return f"{g['mean']:.2f} +- {g['std']:.2f} (min {g['min']:.1f})"


def _gp(m: dict[str, Any], crit: str = CRIT) -> str:
    g = m.get("gamma_in_patient", {}).get(crit)
    return f"{g['mean']:.2f} (min {g['min']:.1f})" if g else "n/a"


def _rel(m: dict[str, Any]) -> str:
    r = m["relative_error_percent"]
    return f"{r['mean']:.3f} +- {r['std']:.3f}"


def _range(m: dict[str, Any]) -> str:
    r = m["range_error_mm"]
    return f"{r['mean']:+.2f} +- {r['std']:.2f}"


def card(record: dict[str, Any]) -> str:
    cfg = record["config"]
    test_d, test_a = record["test"]["dota"], record["test"]["analytic"]
    lines = [
        "# dota default model: model card",
        "",
        "**Intended use: research and development of proton dose engines and planning tools. Not for "
        "clinical use**: it has not been validated for treatment planning, and its accuracy is known only "
        "for the data described here.",
        "",
        "## What it is",
        "",
        f"Preset `{record['preset']}`: a DoTA transformer ({record['parameters']:,} parameters; "
        f"encoder {cfg['enc_channels']}, {cfg['num_heads']} heads of {cfg['head_dim']}, {cfg['num_blocks']} "
        f"block(s)) that " + (
            "learns the Monte Carlo dose minus the analytic pencil beam's"
            + (", with the analytic dose as an input channel beside the CT" if cfg.get("base_input") else "")
            + "; the analytic dose (`dota.engines.analytic`) is computed at inference and added, and counts "
            "in its time."
            if cfg.get("base_engine") else "predicts the dose from the CT block and the energy.")
        + (f" Range support: its dose is zero from {cfg['support_margin_mm']:g} mm past the last slice where the "
           f"analytic dose exceeds {cfg['support_fraction']:g} of its maximum (the network's tail behind the Bragg "
           "peak, where Monte Carlo has none in tissue, is cut), so truncated inference is exact by construction."
           if cfg.get("support_fraction") else ""),
        f" Block {cfg['block_shape'][0]}x{cfg['block_shape'][1]}x{cfg['block_shape'][2]} voxels of "
        f"{cfg['voxel_mm'][0]:g} mm, beam along the first axis; energies {record['energy_range_mev'][0]:g}-"
        f"{record['energy_range_mev'][1]:g} MeV (others are refused). Dose to water in Gy per 1e9 primaries, "
        "calibration of the training data (dota's HU-to-stopping-power table with MCsquare's materials).",
        "",
        "## Data",
        "",
        "Monte Carlo ground truth from MCsquare (`dota generate --engine mcsquare`), beam's-eye-view blocks "
        "through real CT volumes (random beam directions and spot offsets) and synthetic phantoms; patients "
        "never cross splits (`dota.data.splits.PATIENT_SPLIT`).",
        "",
        "| set | beamlets | primaries | seed | sources (patients) | command |",
        "|---|---|---|---|---|---|",
    ]
    for m in record["data"]:
        gen = m["generation"]
        pats = sorted({s.split("/")[-1] for s in gen["sources"]})
        lines.append(f"| {m['dataset']} | {gen['n_beamlets']} | {gen['engine_kwargs'].get('primaries')} | "
                     f"{gen['seed']} | {len(pats)}: {', '.join(pats)} | `{m.get('command')}` |")
    lines += ["", f"MC engine: {record['data'][0].get('engine_version')}.", ""]
    tr = record["training"]
    lines += [
        "## Training",
        "",
        f"`{tr.get('command')}`: {tr['epochs_done']} epochs"
        + (f" of the {tr['planned_epochs']} planned (stopped at the session's deadline; the best "
           f"validation epoch was {tr['best_epoch']})"
           if tr.get("planned_epochs") and tr["epochs_done"] < tr["planned_epochs"] else "")
        + f", {tr['train_beamlets']} training beamlets, best validation MSE {tr['best_val_loss']:.3e} "
        f"(scaled dose), {tr['hours']:.2f} h on {tr.get('machine', 'this machine')}. History: "
        "`default.json` (`training.history`).",
        "",
    ]
    for ft in record.get("fine_tuning") or []:
        lines += [fine_tuning_card_text(ft), ""]
    lines += [
        "## Accuracy against Monte Carlo (held-out patients)",
        "",
        f"Gamma {CRIT} with the paper's protocol (global, normalised to each beamlet's MC maximum), relative "
        "error (paper's definition) and R80 range error, on the test set "
        f"({test_d['beamlets']} beamlets at {test_d['reference_primaries']:,} primaries; patients "
        f"{', '.join(test_d['patients'])}). Paper rows are the published figures on their own test set.",
        "",
        f"| engine | gamma {CRIT} (%) | gamma in patient (%) | relative error (%) | R80 error (mm) | "
        "ms per beamlet (evaluate) |",
        "|---|---|---|---|---|---|",
        f"| dota default | {_g(test_d)} | {_gp(test_d)} | {_rel(test_d)} | {_range(test_d)} | "
        f"{test_d['engine_ms_per_beamlet']:.1f} |",
        f"| analytic pencil beam | {_g(test_a)} | {_gp(test_a)} | {_rel(test_a)} | {_range(test_a)} | "
        f"{test_a['engine_ms_per_beamlet']:.1f} |",
        "| DoTA, paper | 99.37 +- 1.17 | | 0.126 | | |",
        "| pencil beam, paper | 98.68 +- 3.15 | | 0.306 | | |",
        "",
        "\"In patient\": the same gamma over voxels denser than air (HU > -900); most failures of both engines "
        "are dose to water in the air behind the patient, where beams that leave the body carry on.",
        "",
        "Per site (test set):",
        "",
        f"| site | beamlets | dota gamma {CRIT} | analytic gamma | dota rel. error | analytic rel. error |",
        "|---|---|---|---|---|---|",
    ]
    for site, m in test_d["by_site"].items():
        a = test_a["by_site"].get(site)
        lines.append(f"| {site} | {m['beamlets']} | {_g(m)} | {_g(a) if a else ''} | {_rel(m)} | {_rel(a) if a else ''} |")
    lines += ["", "Per energy band (test set):", "",
              f"| energy | beamlets | dota gamma {CRIT} | analytic gamma | dota rel. error | analytic rel. error |",
              "|---|---|---|---|---|---|"]
    for band, m in test_d["by_energy"].items():
        a = test_a["by_energy"].get(band)
        lines.append(f"| {band} | {m['beamlets']} | {_g(m)} | {_g(a) if a else ''} | {_rel(m)} | {_rel(a) if a else ''} |")
    val = record.get("validation")
    if val and val.get("dota"):
        lines += ["", f"Validation set (`{val['dota']['reference']}`, {val['dota']['beamlets']} beamlets, patients "
                  f"{', '.join(val['dota']['patients'])}): dota {_g(val['dota'])}, analytic "
                  f"{_g(val['analytic']) if val.get('analytic') else 'n/a'}."]
    if record.get("bf16"):
        b = record["bf16"]
        lines += ["", f"bf16 (opt-in): largest |bf16 - fp32| over {b['beamlets']} test beamlets "
                  f"{b['max_abs_diff_rel']:.2e} of the beamlet maximum (median {b['median_abs_diff_rel']:.2e}); "
                  f"gamma {CRIT} against MC {b['gamma_mean']:.2f} % (fp32 {b['gamma_mean_fp32']:.2f} %)."]
    if record.get("speed"):
        lines += ["", "## Speed", ""] + [f"- {s}" for s in record["speed"]]
    lines += [
        "",
        "## Limits",
        "",
        "- Trained on the blocks, energies and calibration above: other CT scanners' calibrations, beam models "
        "(spot size, energy spread) or voxel sizes are outside what it has seen.",
        "- A few thousand training beamlets with low primaries (unbiased noise averages out under the MSE loss), "
        "not the paper's 80,000; sites with few patients (thorax, upper abdomen) are learned from phantoms and "
        "other sites only.",
        "- Beamlets, not plans: plan dose sums beamlets (`dota dose`), and plan-level accuracy is reported there."
        + lateral_card_text(record.get("plan_lateral")),
        "- The exact engine's truncation and caching do not change its output beyond 1e-5 of the maximum on the "
        "slices it computes (tested); " + ("it computes each beamlet to its range support only." if cfg.get("support_fraction")
                                          else "where its tail check cannot trust the cut it recomputes in full."),
        "",
    ]
    return "\n".join(lines)


def write_golden(source: Path, out: Path, checkpoint: Path, per_site: int) -> dict[str, Any]:
    """The first ``per_site`` beamlets of every site of ``source`` (a held-out MC file) as the golden set
    shipped with the model, and the model's and the analytic engine's measured accuracy on it."""
    import numpy as np

    from dota.data.hdf5 import BeamletFile, write_dataset
    from dota.data.splits import site_of
    from dota.engines import get_engine
    from dota.evaluation.gamma import paper_gamma
    from dota.evaluation.metrics import relative_error_percent

    with BeamletFile(source) as f:
        sources = f.meta["source"]
        picked: dict[str, list[int]] = {}
        for i, src in enumerate(sources):
            picked.setdefault(site_of(str(src)), [])
            if len(picked[site_of(str(src))]) < per_site:
                picked[site_of(str(src))].append(i)
        index = sorted(i for v in picked.values() for i in v)
        data = f.load(index)
    write_dataset(out, np.rint(data.geometry).astype(np.int16), data.dose, data.energy, attrs=data.attrs,
                  meta=data.meta, voxel_mm=data.voxel_mm)
    result: dict[str, Any] = {"file": out.name, "from": source.name, "indices": index, "beamlets": len(index)}
    for name, engine in (("dota", get_engine("dota", model=str(checkpoint))), ("analytic", get_engine("analytic"))):
        dose = engine.dose(data.geometry, data.energy)
        gamma = [paper_gamma(data.dose[i], dose[i]).pass_rate_percent for i in range(len(index))]
        rel = [relative_error_percent(data.dose[i], dose[i]) for i in range(len(index))]
        result[f"{name}_gamma_mean"] = float(np.mean(gamma))
        result[f"{name}_gamma_min"] = float(np.min(gamma))
        result[f"{name}_relative_error_mean"] = float(np.mean(rel))
    return result


def _fine_tuning(run: Path) -> dict:
    """What the card says of a fine-tuning run (``dota train --init``): its command (or, for a run folder kept
    without ``summary.json``, its settings from ``train_config.json``), data, augmentation, loss and best epoch."""
    config = _load(run, "train_config.json") if (run / "train_config.json").is_file() else {}
    if (run / "summary.json").is_file():
        summary = _load(run, "summary.json")
        config = summary.get("config") or config
    elif (run / "history.json").is_file():  # a run stopped before its end: its state names its data
        summary = {"history": _load(run, "history.json"), "command": None, "data": None}
        if (run / "state.pt").is_file():
            import torch

            state = torch.load(run / "state.pt", map_location="cpu", weights_only=True)
            config = state.get("train_config") or config
            summary.update(data=state.get("data"), val_data=state.get("val_data"))
    else:
        raise SystemExit(f"{run}: a fine-tuning run needs summary.json or history.json")
    history = summary.get("history", [])
    if not history:
        raise SystemExit(f"{run}: the fine-tuning run has no finished epoch")
    if not config.get("init"):
        raise SystemExit(f"{run}: not a fine-tuning run (its settings name no --init checkpoint)")
    best = min(history, key=lambda r: r["val_loss"])
    return {"run": run.name, "command": summary.get("command"), "init": config.get("init"),
            "data": summary.get("data"), "val_data": summary.get("val_data"),
            "optimizer": config.get("optimizer"), "lr": config.get("lr"),
            "lr_halving_epochs": config.get("lr_halving_epochs"), "ema": config.get("ema", 0.0),
            "augment": config.get("augment", True), "flips": config.get("flips", False),
            "integral_weight": config.get("integral_weight", 0.0), "ring_weight": config.get("ring_weight", 0.0),
            "epochs_done": summary.get("epochs_done", len(history)), "best_epoch": best["epoch"],
            "best_val_loss": best["val_loss"], "best_val_mse": best.get("val_mse", best["val_loss"]),
            "hours": sum(r.get("seconds", 0.0) for r in history) / 3600, "history": history}


def fine_tuning_card_text(ft: dict) -> str:
    """The card's sentence on one fine-tuning stage (:func:`_fine_tuning`)."""
    if ft.get("command"):
        how = f"`{ft['command']}`"
    else:  # a kept run folder without its summary: its recorded settings
        how = (f"run `{ft.get('run')}` (`dota train --init {ft['init']} --optimizer {ft.get('optimizer')} --lr "
               f"{ft.get('lr'):g} --lr-halving-epochs {ft.get('lr_halving_epochs')}"
               + (f" --ema {ft['ema']:g}" if ft.get("ema") else "") + "`, from its recorded settings)")
    if ft.get("data") and not ft.get("command"):  # the command names them itself
        how += " on " + ", ".join(f"`{Path(d).name}`" for d in ft["data"]) + (
            f" (validation `{Path(ft['val_data']).name}`)" if ft.get("val_data") else "")
    aug = ("row and column flips, no 90-degree rotations" if not ft.get("augment") and ft.get("flips")
           else "no augmentation" if not ft.get("augment")
           else "90-degree rotations and flips" if ft.get("flips") else "90-degree rotations")
    loss = "voxel MSE"
    if ft.get("integral_weight"):
        loss += (f" + {ft['integral_weight']:g} x the lateral-integral term (`dota.train.training_loss`: errors shared "
                 "by the voxels of 3 x 3 cells and of whole slices)")
    if ft.get("ring_weight"):
        loss += f" + {ft['ring_weight']:g} x the ring-profile term"
    text = (f"Then fine-tuned from the previous stage's checkpoint: {how}: {ft['epochs_done']} epochs (best: "
            f"{ft['best_epoch']}), augmentation: {aug}, loss {loss}"
            + (f", weights averaged (EMA {ft['ema']:g})" if ft.get("ema") else "")
            + f"; best validation objective {ft['best_val_loss']:.3e}")
    if ft.get("best_val_mse") != ft.get("best_val_loss"):
        text += f" (voxel MSE {ft['best_val_mse']:.3e})"
    return text + f", {ft['hours']:.2f} h. History: `default.json` (`fine_tuning`)."


def lateral_card_text(table: dict | None) -> str:
    """The card's words on the model's lateral calibration (``plan_lateral_mm2``, ``scripts/fit_lateral.py``)."""
    if not table:
        return ""
    pairs = ", ".join(f"{e:.0f} MeV {r:+.2f} / {c:+.2f}" for e, r, c in
                      zip(table["energy_mev"], table["rows_mm2"], table["cols_mm2"]))
    return (" Plans sharpen its beamlets by its measured excess width over MCsquare's (variance, rows / cols, "
            f"mm^2: {pairs}; fitted on {table.get('blocks', '?')} validation plan blocks, {table.get('data', '?')}; "
            "`dota.plan.lateral`), constant beyond those energies.")


def shipped_data_engines(record: dict) -> list[str]:
    """The engines of the shipped model's training data: its checkpoint's own record (``dota train`` writes
    ``data_engines``), else the engines of the dataset manifests given."""
    engines = record["training"]["checkpoint_extra"].get("data_engines")
    if engines is None:
        engines = sorted({(d.get("attrs") or {}).get("engine") for d in record["data"]} - {None})
    if not engines:
        raise SystemExit("cannot tell which engine made the training data: give the checkpoint dota train wrote, "
                         "or --manifest files")
    return list(engines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--train", type=Path, required=True, help="training run folder (summary.json, history.json)")
    p.add_argument("--fine-tune", type=Path, action="append", default=[],
                   help="fine-tuning run folder (dota train --init from the previous stage's checkpoint; repeatable, "
                   "in the order they ran)")
    p.add_argument("--eval-dota", type=Path, required=True, help="evaluate folder: the model on the test set")
    p.add_argument("--eval-analytic", type=Path, required=True, help="evaluate folder: analytic on the test set")
    p.add_argument("--val-dota", type=Path)
    p.add_argument("--val-analytic", type=Path)
    p.add_argument("--manifest", type=Path, action="append", default=[], help="dataset manifest (repeatable)")
    p.add_argument("--bf16", type=Path, help="JSON with the measured bf16 error")
    p.add_argument("--speed", action="append", default=[], help="a measured speed line for the card (repeatable)")
    p.add_argument("--golden-from", type=Path, help="Monte Carlo test file to take the shipped golden beamlets from")
    p.add_argument("--golden-per-site", type=int, default=2, help="golden beamlets per site (default 2)")
    p.add_argument("--machine", default="2 x86-64 cores (AMD EPYC), no GPU")
    p.add_argument("--command", help="training command, for a run stopped before it wrote summary.json")
    p.add_argument("--train-beamlets", type=int, help="training beamlets, for a run without summary.json")
    p.add_argument("--val-beamlets", type=int, help="validation beamlets, for a run without summary.json")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(args.checkpoint), framework="pt") as f:
        meta = dict(f.metadata() or {})
    state = load_file(str(args.checkpoint))
    cfg = json.loads(meta["config"])
    norm = json.loads(meta["normalization"])
    if (args.train / "summary.json").is_file():
        summary = _load(args.train, "summary.json")
    else:  # a run stopped before its last epoch (e.g. at a deadline): its history and state say what was done
        history = _load(args.train, "history.json")
        import torch

        train_state = torch.load(args.train / "state.pt", map_location="cpu", weights_only=True)
        best = min(history, key=lambda r: r["val_loss"])
        summary = {"command": args.command, "epochs_done": len(history), "history": history,
                   "best_val_loss": best["val_loss"], "best_epoch": best["epoch"],
                   "train_beamlets": args.train_beamlets, "val_beamlets": args.val_beamlets,
                   "stopped_after_epoch": len(history), "planned_epochs": train_state["train_config"]["epochs"]}
    history = summary.get("history", [])
    hours = sum(r.get("seconds", 0.0) for r in history) / 3600
    preset = _load(args.train, "train_config.json").get("preset")
    record = {
        "preset": preset,
        "config": cfg,
        "energy_range_mev": norm["energy_range_mev"],
        "normalization": norm,
        "parameters": int(sum(v.numel() for v in state.values())),
        "data": [_load(m) for m in args.manifest],
        "training": {
            "command": summary.get("command"),
            "epochs_done": summary.get("epochs_done"),
            "train_beamlets": summary.get("train_beamlets"),
            "val_beamlets": summary.get("val_beamlets"),
            "best_val_loss": summary.get("best_val_loss"),
            "best_epoch": summary.get("best_epoch"),
            "planned_epochs": summary.get("planned_epochs"),
            "hours": hours,
            "machine": args.machine,
            "history": history,
            "checkpoint_extra": json.loads(meta.get("extra", "{}")),
        },
        "fine_tuning": [_fine_tuning(d) for d in args.fine_tune],
        "test": {"dota": _metrics(_load(args.eval_dota, "metrics.json")),
                 "analytic": _metrics(_load(args.eval_analytic, "metrics.json"))},
        "validation": {"dota": _metrics(_load(args.val_dota, "metrics.json")) if args.val_dota else None,
                       "analytic": _metrics(_load(args.val_analytic, "metrics.json")) if args.val_analytic else None},
        "bf16": _load(args.bf16) if args.bf16 else None,
        "speed": args.speed,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    if args.golden_from is not None:
        record["golden"] = write_golden(args.golden_from, args.out / "default_golden.h5", args.checkpoint,
                                        args.golden_per_site)
    shipped_extra = {"model_card": "default.md", "preset": preset,
                     "test_gamma_1pct_3mm": record["test"]["dota"]["gamma"][CRIT]["mean"]}
    # the engines its data came from: a copy of the shipped file, loaded by its path elsewhere, must still get the
    # plans' corrections for MCsquare blocks (dota.engines.learned; without this record a copy lost them silently)
    shipped_extra["data_engines"] = shipped_data_engines(record)
    lateral = record["training"]["checkpoint_extra"].get("plan_lateral_mm2")  # scripts/fit_lateral.py
    if lateral is not None:
        shipped_extra["plan_lateral_mm2"] = record["plan_lateral"] = lateral
    meta["extra"] = json.dumps(shipped_extra)
    save_file(state, str(args.out / "default.safetensors"), metadata=meta)
    (args.out / "default.json").write_text(json.dumps(record, indent=1))
    (args.out / "default.md").write_text(card(record))
    print(f"shipped {args.checkpoint} -> {args.out} ({(args.out / 'default.safetensors').stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
