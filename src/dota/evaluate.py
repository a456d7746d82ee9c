"""``dota evaluate`` and ``dota predict``: run any engine on a reference dataset and compare.

Any engine (the learned model, the analytic pencil beam, MCsquare) against any reference dataset:
gamma pass rates under the paper's protocol (or other criteria), relative error, R80 range error,
failures by depth. Writes ``metrics.json``, plots and (by default) ``predictions.h5``.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from dota.fileio import atomic_write, check_output
from dota.constants import (
    PAPER_GAMMA_PASS_DOTA,
    PAPER_GAMMA_PASS_PENCIL_BEAM,
    PAPER_REL_ERROR_DOTA,
    PAPER_REL_ERROR_PENCIL_BEAM,
)
from dota.data.hdf5 import BeamletFile, write_dataset
from dota.engines.base import DoseEngine, get_engine
from dota.errors import DataFileError, InputError
from dota.evaluation.gamma import GammaCriteria, paper_gamma
from dota.data.splits import patient_of, site_of
from dota.evaluation.metrics import range_error_mm, relative_error_percent, summarize


def make_engine(engine: str | DoseEngine, model: str | None = None, device: str = "auto",
                seed: int = 0) -> DoseEngine:
    """An engine by name; ``dota`` takes ``model`` (checkpoint path or preset; default: the shipped model)
    and ``seed`` (the random weights of a preset)."""
    if isinstance(engine, DoseEngine):
        return engine
    if engine == "dota":
        from dota.train import resolve_device

        return get_engine("dota", model=model, device=str(resolve_device(device)), seed=int(seed))
    if model is not None:
        raise InputError(f"--model applies to the dota engine only, not {engine!r}")
    return get_engine(engine)


def _parse_criteria(criteria: str | list[str]) -> list[GammaCriteria]:
    items = criteria.split(",") if isinstance(criteria, str) else list(criteria)
    out = []
    for c in items:
        c = c.strip()
        out.append(GammaCriteria() if c.lower() == "paper" else GammaCriteria.from_string(c))
    if not out:
        raise InputError("give at least one gamma criterion, e.g. 1%/3mm")
    return out


def evaluate(
    reference: str | Path,
    out_dir: str | Path,
    *,
    engine: str | DoseEngine = "dota",
    model: str | None = None,
    criteria: str | list[str] = "1%/3mm",
    max_beamlets: int | None = None,
    device: str = "auto",
    batch_size: int = 16,
    progress: bool = True,
    save_predictions: bool = True,
    plots: bool = True,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Evaluate ``engine`` against the dose in ``reference``; write results to ``out_dir``.

    Returns the dict written to ``out_dir/metrics.json``: ``summary`` (per criterion: pass-rate
    statistics; relative error; range error; timing), ``per_beamlet`` and ``failures_by_depth``.
    ``out_dir`` follows :func:`dota.fileio.check_output` (results already there are replaced only with
    ``overwrite``). ``seed`` seeds the random weights of a preset ``model``.
    """
    crits = _parse_criteria(criteria)
    if int(batch_size) < 1:
        raise InputError(f"batch size must be positive, got {batch_size}")
    if max_beamlets is not None and int(max_beamlets) < 1:
        raise InputError(f"max_beamlets must be positive, got {max_beamlets}")
    writes = [w for w in EVALUATE_OUTPUTS if (w != "predictions.h5" or save_predictions)
              and (not w.endswith(".png") or plots)]
    out_dir = check_output(out_dir, inputs=[reference, _model_path(model)], overwrite=overwrite, folder=True,
                           writes=writes)
    eng = make_engine(engine, model, device, seed)
    with BeamletFile(reference) as f:
        if f.dose is None:
            raise DataFileError(f"reference {reference} has no dose to compare with")
        n = len(f) if max_beamlets is None else min(len(f), int(max_beamlets))
        if n == 0:
            raise DataFileError(f"reference {reference} holds no beamlets")
        voxel_mm = f.voxel_mm
        depth = f.block_shape[0]
        ref_attrs = dict(f.attrs)
        per_beamlet: list[dict[str, Any]] = []
        fail_counts = {c.name: np.zeros(depth) for c in crits}
        eval_counts = {c.name: np.zeros(depth) for c in crits}
        predictions = np.zeros((n, *f.block_shape), np.float32) if save_predictions else None
        geometry = np.zeros((n, *f.block_shape), f.geometry.dtype) if save_predictions else None
        engine_seconds = 0.0
        sources = f.meta.get("source")
        bar = _progress(n, progress, "evaluating")
        for s in range(0, n, batch_size):
            chunk = f.load(slice(s, min(n, s + batch_size)))
            t0 = time.perf_counter()
            pred = checked_dose(eng.dose(chunk.geometry, chunk.energy, voxel_mm), chunk.geometry.shape, eng, s)
            engine_seconds += time.perf_counter() - t0
            if predictions is not None:
                predictions[s : s + len(chunk)] = pred
                geometry[s : s + len(chunk)] = chunk.geometry
            for j in range(len(chunk)):
                ref, ev = chunk.dose[j], pred[j]
                row: dict[str, Any] = {
                    "index": s + j,
                    "energy_mev": float(chunk.energy[j]),
                    "relative_error_percent": float(relative_error_percent(ref, ev)),
                    "range_error_mm": float(range_error_mm(ref, ev, voxel_mm[0])),
                    "max_dose_ref": float(ref.max()),
                    "max_dose_eval": float(ev.max()),
                    "pass_rate_percent": {},
                }
                if sources is not None:
                    row["source"] = str(sources[s + j])
                    row["patient"], row["site"] = patient_of(row["source"]), site_of(row["source"])
                for c in crits:
                    g = paper_gamma(ref, ev, voxel_mm, c)
                    row["pass_rate_percent"][c.name] = g.pass_rate_percent
                    with np.errstate(invalid="ignore"):
                        fail_counts[c.name] += (g.gamma > 1).sum(axis=(1, 2))
                        eval_counts[c.name] += (g.gamma > 0).sum(axis=(1, 2))
                per_beamlet.append(row)
                bar.update(1)
        bar.close()
        meta = f.meta
        energies = f.energy[:n]

    summary: dict[str, Any] = {
        "beamlets": n,
        "gamma": {
            c.name: summarize(np.array([r["pass_rate_percent"][c.name] for r in per_beamlet])) for c in crits
        },
        "relative_error_percent": summarize(np.array([r["relative_error_percent"] for r in per_beamlet])),
        "range_error_mm": summarize(np.array([r["range_error_mm"] for r in per_beamlet])),
        "engine_ms_per_beamlet": 1e3 * engine_seconds / n,
        "by_site": _grouped(per_beamlet, crits, lambda r: r.get("site")),
        "by_energy": _grouped(per_beamlet, crits, _energy_band),
    }
    from dota import __version__

    result = {
        "reference": str(reference),
        "reference_engine": ref_attrs.get("engine"),
        "reference_primaries": ref_attrs.get("primaries"),
        "engine": eng.name,
        "engine_version": eng.version,
        "model": None if model is None else str(model),
        "criteria": [c.name for c in crits],
        "protocol": "global gamma; reference < 0.1 % of max and evaluated < 0.5 % set to 0; "
        "pass rate = 1 - N(gamma>1)/N(gamma>0) (Pastor-Serrano & Perko 2022)",
        "summary": summary,
        "paper": {
            "dota_gamma_1pct_3mm": PAPER_GAMMA_PASS_DOTA,
            "pencil_beam_gamma_1pct_3mm": PAPER_GAMMA_PASS_PENCIL_BEAM,
            "dota_relative_error_percent": PAPER_REL_ERROR_DOTA,
            "pencil_beam_relative_error_percent": PAPER_REL_ERROR_PENCIL_BEAM,
        },
        "failures_by_depth": {
            k: (fail_counts[k] / np.maximum(eval_counts[k], 1)).tolist() for k in fail_counts
        },
        "per_beamlet": per_beamlet,
        "provenance": {
            "dota_version": __version__,
            "python": platform.python_version(),
            "command": " ".join(sys.argv),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "metrics.json", lambda t: Path(t).write_text(json.dumps(result, indent=2)))
    if predictions is not None:
        write_dataset(
            out_dir / "predictions.h5", geometry, predictions,
            energies, attrs={**eng.file_attrs(), "reference": str(reference)},
            voxel_mm=voxel_mm, meta={k: v[:n] for k, v in meta.items()},
        )
    if plots:
        plot_evaluation(result, out_dir)
    return result


#: What :func:`evaluate` writes into its folder (names and glob patterns, for :func:`~dota.fileio.check_output`).
EVALUATE_OUTPUTS: tuple[str, ...] = ("metrics.json", "predictions.h5", "pass_rates.png", "failures_by_depth.png",
                                     "error_vs_energy.png")


def _model_path(model: Any) -> str | None:
    """``model`` when it names a file (an input that no output may replace), else None."""
    return str(model) if model is not None and Path(str(model)).exists() else None


def checked_dose(dose: Any, shape: tuple[int, ...], engine: DoseEngine, first: int = 0) -> np.ndarray:
    """An engine's output, refused unless it has the input's ``shape`` and only finite values (a checkpoint
    with broken weights or normalisation must not reach a file or a metric)."""
    dose = np.asarray(dose)
    if dose.shape != tuple(shape):
        raise InputError(f"the {engine.name} engine returned dose of shape {dose.shape} for blocks {tuple(shape)}")
    if not np.isfinite(dose).all():
        bad = np.flatnonzero(~np.isfinite(dose.reshape(len(dose), -1)).all(axis=1))
        source = getattr(engine, "source", engine.name)
        raise DataFileError(f"the {engine.name} engine ({source}) predicted NaN or inf dose for beamlet "
                            f"{first + int(bad[0])}: its model or normalisation is broken")
    return dose


#: Energy bands (MeV) of the per-energy summary: lower edges; the last band is open above.
ENERGY_BANDS_MEV: tuple[float, ...] = (70.0, 100.0, 130.0, 160.0, 190.0)


def _energy_band(row: dict[str, Any]) -> str:
    edges = ENERGY_BANDS_MEV
    k = max(0, int(np.searchsorted(edges, row["energy_mev"], side="right")) - 1)
    return f"{edges[k]:g}-{edges[k + 1]:g} MeV" if k + 1 < len(edges) else f">={edges[k]:g} MeV"


def _grouped(rows: list[dict[str, Any]], crits: list, key) -> dict[str, Any]:
    """Summaries of gamma, relative error and range error per group (site or energy band)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        k = key(r)
        if k is not None:
            groups.setdefault(str(k), []).append(r)
    return {
        k: {
            "beamlets": len(g),
            "gamma": {c.name: summarize(np.array([r["pass_rate_percent"][c.name] for r in g])) for c in crits},
            "relative_error_percent": summarize(np.array([r["relative_error_percent"] for r in g])),
            "range_error_mm": summarize(np.array([r["range_error_mm"] for r in g])),
        }
        for k, g in sorted(groups.items())
    }


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, unit="beamlet", desc=desc, dynamic_ncols=True)


def predict_file(
    data: str | Path, out: str | Path, *, model: str | None = None, device: str = "auto", batch_size: int = 16,
    progress: bool = True, seed: int = 0, overwrite: bool = False,
) -> Path:
    """Predict every beamlet of ``data`` with ``model`` (default: the shipped model); write the shared
    format to ``out``: never ``data`` itself, an existing file only with ``overwrite``
    (:func:`dota.fileio.check_output`). ``seed`` seeds the random weights of a preset ``model``."""
    if int(batch_size) < 1:
        raise InputError(f"batch size must be positive, got {batch_size}")
    out = check_output(out, inputs=[data, _model_path(model)], overwrite=overwrite)
    eng = make_engine("dota", model, device, seed)
    with BeamletFile(data) as f:
        n = len(f)
        dose = np.zeros((n, *f.block_shape), np.float32)
        bar = _progress(n, progress, "predicting")
        for s in range(0, n, batch_size):
            chunk = f.load(slice(s, min(n, s + batch_size)))
            dose[s : s + len(chunk)] = checked_dose(eng.dose(chunk.geometry, chunk.energy, f.voxel_mm),
                                                    chunk.geometry.shape, eng, s)
            bar.update(len(chunk))
        bar.close()
        return write_dataset(out, np.asarray(f.geometry[...]), dose, f.energy,
                             attrs={**eng.file_attrs(), "model": str(model)}, voxel_mm=f.voxel_mm, meta=f.meta)


def plot_evaluation(result: dict[str, Any], out_dir: Path) -> None:
    """pass_rates.png (histogram), failures_by_depth.png, error_vs_energy.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["per_beamlet"]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name in result["criteria"]:
        rates = [r["pass_rate_percent"][name] for r in rows]
        ax.hist(rates, bins=np.linspace(min(80.0, min(rates)), 100, 41), alpha=0.6, label=f"{name} (mean {np.mean(rates):.2f} %)")
    ax.axvline(PAPER_GAMMA_PASS_DOTA, color="k", ls="--", lw=1, label=f"DoTA paper mean {PAPER_GAMMA_PASS_DOTA} %")
    ax.set_xlabel("gamma pass rate per beamlet (%)")
    ax.set_ylabel("beamlets")
    ax.set_title(f"{result['engine']} vs {result['reference_engine']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "pass_rates.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, frac in result["failures_by_depth"].items():
        ax.plot(np.arange(len(frac)) * 2.0, 100 * np.asarray(frac), label=name)
    ax.set_xlabel("depth (mm, 2 mm slices)")
    ax.set_ylabel("failing voxels (% of evaluated)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "failures_by_depth.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.scatter([r["energy_mev"] for r in rows], [r["relative_error_percent"] for r in rows], s=12)
    ax.set_xlabel("energy (MeV)")
    ax.set_ylabel("relative error, 100 x mean|diff| / max (%)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "error_vs_energy.png", dpi=110)
    plt.close(fig)
