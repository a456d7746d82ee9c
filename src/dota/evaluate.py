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
from typing import Any, NotRequired, TypedDict

import numpy as np

from dota.constants import (
    AIR_HU,
    PAPER_GAMMA_PASS_DOTA,
    PAPER_GAMMA_PASS_PENCIL_BEAM,
    PAPER_REL_ERROR_DOTA,
    PAPER_REL_ERROR_PENCIL_BEAM,
)
from dota.data.hdf5 import BeamletFile, DatasetWriter, write_dataset
from dota.data.splits import patient_of, site_of
from dota.engines.base import DoseEngine, get_engine
from dota.errors import DataFileError, InputError
from dota.evaluation.gamma import GammaCriteria, paper_gamma
from dota.evaluation.metrics import range_error_mm, relative_error_percent, summarize
from dota.fileio import atomic_write, check_output
from dota.report.schema import read_json


def make_engine(engine: str | DoseEngine, model: str | None = None, device: str = "auto",
                seed: int = 0) -> DoseEngine:
    """An engine by name; ``dota`` takes ``model`` (checkpoint path or preset; default: the shipped model)
    and ``seed`` (the random weights of a preset)."""
    if isinstance(engine, DoseEngine):
        return engine
    if engine == "dota":
        return get_engine("dota", model=model, device=device, seed=int(seed))
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
) -> MetricsFile:
    """Evaluate ``engine`` against the dose in ``reference``; write results to ``out_dir``.

    Returns the dict written to ``out_dir/metrics.json`` (:class:`MetricsFile`): ``summary`` (per
    criterion: pass-rate statistics; relative error; range error; timing; the same by site and by energy
    band), ``per_beamlet`` and ``failures_by_depth``.
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
        per_beamlet: list[BeamletResult] = []
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
                row: BeamletResult = {
                    "index": s + j,
                    "energy_mev": float(chunk.energy[j]),
                    "relative_error_percent": float(relative_error_percent(ref, ev)),
                    "range_error_mm": float(range_error_mm(ref, ev, voxel_mm[0])),
                    "max_dose_ref": float(ref.max()),
                    "max_dose_eval": float(ev.max()),
                    "pass_rate_percent": {},
                    "pass_rate_in_patient_percent": {},
                }
                in_patient = chunk.geometry[j] > AIR_HU
                if sources is not None:
                    row["source"] = str(sources[s + j])
                    row["patient"], row["site"] = patient_of(row["source"]), site_of(row["source"])
                for c in crits:
                    g = paper_gamma(ref, ev, voxel_mm, c)
                    row["pass_rate_percent"][c.name] = g.pass_rate_percent
                    row["pass_rate_in_patient_percent"][c.name] = _pass_rate_within(g.gamma, in_patient)
                    with np.errstate(invalid="ignore"):
                        fail_counts[c.name] += (g.gamma > 1).sum(axis=(1, 2))
                        eval_counts[c.name] += (g.gamma > 0).sum(axis=(1, 2))
                per_beamlet.append(row)
                bar.update(1)
        bar.close()
        meta = f.meta
        energies = f.energy[:n]

    summary: EvaluationSummary = {
        "beamlets": n,
        "gamma": {
            c.name: summarize(np.array([r["pass_rate_percent"][c.name] for r in per_beamlet])) for c in crits
        },
        "relative_error_percent": summarize(np.array([r["relative_error_percent"] for r in per_beamlet])),
        "range_error_mm": summarize(np.array([r["range_error_mm"] for r in per_beamlet])),
        "gamma_in_patient": {
            c.name: summarize(np.array([r["pass_rate_in_patient_percent"][c.name] for r in per_beamlet]))
            for c in crits
        },
        "engine_ms_per_beamlet": 1e3 * engine_seconds / n,
        "by_site": _grouped(per_beamlet, crits, lambda r: r.get("site")),
        "by_energy": _grouped(per_beamlet, crits, _energy_band),
    }
    from dota import __version__

    result: MetricsFile = {
        "version": METRICS_VERSION,
        "reference": str(reference),
        "reference_engine": ref_attrs.get("engine"),
        "reference_primaries": ref_attrs.get("primaries"),
        "engine": eng.name,
        "engine_version": eng.version,
        "model": None if model is None else str(model),
        "criteria": [c.name for c in crits],
        "protocol": "global gamma; reference < 0.1 % of max and evaluated < 0.5 % set to 0; "
        "pass rate = 1 - N(gamma>1)/N(gamma>0) (Pastor-Serrano & Perko 2022)",
        "voxel_mm": [float(v) for v in voxel_mm],
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


# -- metrics.json ------------------------------------------------------------------------------------

#: Version of the layout of ``metrics.json`` (:class:`MetricsFile`); raised when a key changes meaning.
METRICS_VERSION = 1

class Stats(TypedDict):
    """Statistics of per-beamlet values (:func:`dota.evaluation.metrics.summarize`; None when there are none)."""

    n: int
    n_nan: int
    mean: float | None
    std: float | None
    min: float | None
    max: float | None
    p1: float | None
    p5: float | None
    p25: float | None
    p50: float | None
    p75: float | None
    p95: float | None
    p99: float | None


class GroupSummary(TypedDict):
    """Gamma pass rates (per criterion), relative error and R80 range error of a group of beamlets."""

    beamlets: int
    gamma: dict[str, Stats]
    relative_error_percent: Stats
    range_error_mm: Stats
    gamma_in_patient: NotRequired[dict[str, Stats]]  # over voxels denser than air (AIR_HU)


class EvaluationSummary(GroupSummary):
    """All beamlets, the engine's time, and the same per site and per energy band."""

    engine_ms_per_beamlet: float
    by_site: dict[str, GroupSummary]
    by_energy: dict[str, GroupSummary]


class BeamletResult(TypedDict):
    """One beamlet's results (``per_beamlet``); ``source``, ``patient`` and ``site`` when the reference
    records where its geometry came from."""

    index: int
    energy_mev: float
    relative_error_percent: float
    range_error_mm: float
    max_dose_ref: float
    max_dose_eval: float
    pass_rate_percent: dict[str, float]
    pass_rate_in_patient_percent: NotRequired[dict[str, float]]
    source: NotRequired[str]
    patient: NotRequired[str]
    site: NotRequired[str]


class PaperFigures(TypedDict):
    dota_gamma_1pct_3mm: float
    pencil_beam_gamma_1pct_3mm: float
    dota_relative_error_percent: float
    pencil_beam_relative_error_percent: float


class EvaluateProvenance(TypedDict):
    dota_version: str
    python: str
    command: str
    created: str


class MetricsFile(TypedDict):
    """``metrics.json``: what :func:`evaluate` writes and returns."""

    version: int
    reference: str
    reference_engine: str | None
    reference_primaries: float | None
    engine: str
    engine_version: str
    model: str | None
    criteria: list[str]
    protocol: str
    voxel_mm: list[float]
    summary: EvaluationSummary
    paper: PaperFigures
    failures_by_depth: dict[str, list[float]]  # criterion -> fraction of evaluated voxels failing, per slice
    per_beamlet: list[BeamletResult]
    provenance: EvaluateProvenance


def _pass_rate_within(gamma: np.ndarray, region: np.ndarray) -> float:
    """Pass rate (paper definition: 1 - N(gamma > 1) / N(gamma > 0)) over the voxels of ``region``."""
    with np.errstate(invalid="ignore"):
        evaluated = (gamma > 0) & region
        count = int(evaluated.sum())
        return 100.0 if count == 0 else 100.0 * (1.0 - float(((gamma > 1) & region).sum()) / count)


def read_metrics(path: str | Path) -> MetricsFile:
    """``metrics.json`` read and checked; :class:`~dota.errors.DataFileError` (one line naming the file and
    the key) when a key is missing or of the wrong type."""
    return read_json(path, MetricsFile, METRICS_VERSION)


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


def _group_order(key: str) -> tuple:
    """Energy bands by their lower edge (">=190 MeV" last), other groups by name."""
    import re

    m = re.match(r"(>=)?([0-9.]+)", key)
    return (0, float(m.group(2)), key) if m else (1, 0.0, key)


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
            "gamma_in_patient": {c.name: summarize(np.array([r["pass_rate_in_patient_percent"][c.name] for r in g]))
                                 for c in crits if all("pass_rate_in_patient_percent" in r for r in g)},
            "relative_error_percent": summarize(np.array([r["relative_error_percent"] for r in g])),
            "range_error_mm": summarize(np.array([r["range_error_mm"] for r in g])),
        }
        for k, g in sorted(groups.items(), key=lambda kv: _group_order(kv[0]))
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
        attrs = {**eng.file_attrs(), "model": str(model)}

        def write(tmp: str) -> None:  # streamed: one batch of beamlets in memory at a time
            bar = _progress(n, progress, "predicting")
            with DatasetWriter(tmp, f.block_shape, attrs=attrs, voxel_mm=f.voxel_mm,
                               geometry_int16=f.geometry.dtype == np.int16) as w:
                for s in range(0, n, batch_size):
                    chunk = f.load(slice(s, min(n, s + batch_size)))
                    dose = checked_dose(eng.dose(chunk.geometry, chunk.energy, f.voxel_mm), chunk.geometry.shape,
                                        eng, s)
                    # in the input's dtype (int16 HU read as float32 converts back exactly)
                    w.append(chunk.geometry.astype(f.geometry.dtype, copy=False), dose, chunk.energy,
                             meta=chunk.meta)
                    bar.update(len(chunk))
            bar.close()

        atomic_write(out, write)
        return Path(out)


def plot_evaluation(result: MetricsFile, out_dir: Path) -> list[Path]:
    """pass_rates.png (histogram), failures_by_depth.png, error_vs_energy.png: the report's accuracy figures
    for this one evaluation."""
    from dota.report import figures as F

    series = [F.eval_series(result, f"{result['engine']} vs {result['reference_engine'] or 'reference'}")]
    return [
        F.gamma_histogram_figure(series, out_dir / "pass_rates.png"),
        F.failures_by_depth_figure(series, out_dir / "failures_by_depth.png"),
        F.error_vs_energy_figure(series, out_dir / "error_vs_energy.png"),
    ]
