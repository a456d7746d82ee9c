"""Dose views: the worst, median and best beamlet by gamma, as figures and as depth-slider data."""

from __future__ import annotations

import base64
import math
from pathlib import Path
from typing import Any

import numpy as np

from dota.report import figures as F
from dota.report.inputs import Evaluation, ReportInputs
from dota.report.page import PAPER_CRITERION, Page, esc, eval_provenance, fmt, missing, note

#: Beamlets shown in the dose views, chosen by gamma pass rate.
BEAMLET_TAGS = ("worst", "median", "best")


def choose_beamlets(ev: Evaluation, criterion: str) -> list[tuple[str, int, float]]:
    """(tag, index, pass rate) for the worst, median and best beamlet by gamma pass rate; ties are
    broken by relative error (worst: largest error, best: smallest)."""
    ranked = []
    for r in ev.rows:
        rate, err = r["pass_rate_percent"][criterion], r["relative_error_percent"]
        if math.isfinite(rate):
            ranked.append((rate, -err if math.isfinite(err) else 0.0, r["index"]))
    if not ranked:
        return []
    ranked.sort()
    picks = {"worst": ranked[0], "median": ranked[len(ranked) // 2], "best": ranked[-1]}
    out, seen = [], set()
    for tag in BEAMLET_TAGS:
        rate, _, idx = picks[tag]
        if idx not in seen:
            seen.add(idx)
            out.append((tag, idx, rate))
    return out


def _load_one(path: Path, index: int, what: str):
    from dota.data.hdf5 import BeamletFile

    with BeamletFile(path) as f:
        if index >= len(f):
            raise IndexError(f"{what} {path} holds {len(f)} beamlets, beamlet #{index} is missing")
        return f.load(slice(index, index + 1)), f.voxel_mm


def _same_file(a: Path | None, b: Path | None) -> bool:
    try:
        return a is not None and b is not None and a.resolve().samefile(b.resolve())
    except OSError:
        return False


def load_views(
    inputs: ReportInputs, page: Page, analytic: bool = True
) -> tuple[list[F.BeamletView], Evaluation | None]:
    """The beamlets to show, with gamma maps; notes in ``page`` say why something is missing."""
    from dota.evaluation.gamma import paper_gamma

    usable = [e for e in inputs.evaluations if e.predictions is not None and e.reference is not None and e.rows]
    for e in inputs.evaluations:
        if e.predictions is None:
            page.note(f"{e.path}: no predictions.h5 (evaluated with --no-predictions?), so no dose maps from it")
        elif e.reference is None:
            page.note(f"{e.path}: reference dataset {e.metrics['reference']!r} not found, so no dose maps from it")
    if not usable:
        return [], None
    primary = next((e for e in usable if e.engine == "dota"), usable[0])
    criteria = primary.criteria
    crit = PAPER_CRITERION if PAPER_CRITERION in criteria else criteria[0]
    others = [e for e in usable if e is not primary and _same_file(e.reference, primary.reference)]
    use_analytic = (
        analytic and primary.reference_engine != "analytic" and not any(e.engine == "analytic" for e in others)
    )
    if analytic and primary.reference_engine == "analytic":
        page.note(
            "the reference dataset was computed by the analytic engine, so the analytic curve is the reference curve"
        )
    analytic_engine = None
    if use_analytic:
        try:
            from dota.engines.base import get_engine

            analytic_engine = get_engine("analytic")
        except Exception as exc:  # the analytic engine is optional here
            page.note(f"analytic engine not available ({exc}); profiles show reference and prediction only")

    views = []
    for tag, idx, _rate in choose_beamlets(primary, crit):
        try:
            ref, voxel_mm = _load_one(primary.reference, idx, "reference")
            pred, _ = _load_one(primary.predictions, idx, "predictions")
        except Exception as exc:
            page.note(f"dose of beamlet #{idx} could not be read ({exc}); skipped")
            continue
        if ref.dose is None or pred.dose is None or ref.dose.shape != pred.dose.shape:
            page.note(f"beamlet #{idx}: reference and prediction have no dose or different shapes; skipped")
            continue
        extra: dict[str, np.ndarray] = {}
        for e in others:
            try:
                d, _ = _load_one(e.predictions, idx, "predictions")
                if d.dose is not None and d.dose.shape == ref.dose.shape:
                    extra[_unique(e.engine, extra)] = d.dose[0]
            except Exception as exc:
                page.note(f"{e.predictions}: beamlet #{idx} not shown ({exc})")
        if analytic_engine is not None:
            try:
                extra[_unique("analytic", extra)] = analytic_engine.dose(ref.geometry, ref.energy, voxel_mm)[0]
            except Exception as exc:
                page.note(f"analytic dose of beamlet #{idx} failed ({exc}); not shown")
                analytic_engine = None
        g = paper_gamma(ref.dose[0], pred.dose[0], voxel_mm, crit)
        views.append(
            F.BeamletView(
                tag=tag,
                index=idx,
                energy_mev=float(ref.energy[0]),
                voxel_mm=tuple(voxel_mm),
                ct_hu=np.asarray(ref.geometry[0], np.float32),
                reference=ref.dose[0],
                prediction=pred.dose[0],
                gamma=np.asarray(g.gamma, np.float32),
                pass_rate_percent=float(g.pass_rate_percent),
                criterion=crit,
                reference_label=primary.reference_engine,
                prediction_label=primary.engine,
                others=extra,
            )
        )
    return views, primary


def _unique(name: str, taken: dict[str, Any]) -> str:
    out, i = name, 2
    while out in taken:
        out, i = f"{name} {i}", i + 1
    return out


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a, np.uint8).tobytes()).decode("ascii")


def slice_data(view: F.BeamletView) -> dict[str, Any]:
    """Compact arrays for the depth slider: every (L, H, W) map quantised to uint8, rows flipped so that
    the canvas shows them the same way up as the figures."""
    flip = (slice(None), slice(None, None, -1), slice(None))
    dmax = view.dose_max
    diff = view.diff_percent
    diff_max = max(float(np.abs(diff).max()), 1e-6)
    lo, hi = F.CT_WINDOW_HU
    gamma = np.nan_to_num(view.gamma.astype(float), nan=0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        evaluated = (gamma > 0).sum(axis=(1, 2))
        failed = (gamma > 1).sum(axis=(1, 2))
        slice_pass = np.where(evaluated > 0, 100.0 * (1 - failed / np.maximum(evaluated, 1)), np.nan)
    codes = {
        "ct": np.clip((view.ct_hu - lo) / (hi - lo), 0, 1) * 255,
        "ref": np.clip(view.reference / dmax, 0, 1) * 255,
        "pred": np.clip(view.prediction / dmax, 0, 1) * 255,
        "diff": 127.5 + np.clip(diff / diff_max, -1, 1) * 127.5,
        "gamma": np.where(gamma > 0, 1 + np.clip(gamma / F.GAMMA_MAX, 0, 1) * 254, 0),
    }
    l, h, w = view.reference.shape
    return {
        "title": view.title(),
        "shape": [l, h, w],
        "voxel_mm": list(view.voxel_mm),
        "dose_max": dmax,
        "diff_max_percent": diff_max,
        "overlay_threshold": F.OVERLAY_THRESHOLD,
        "plane_row": h - 1 - view.beam_row,
        "slice_ref_max": [round(float(x), 6) for x in view.reference.max(axis=(1, 2))],
        "slice_pred_max": [round(float(x), 6) for x in view.prediction.max(axis=(1, 2))],
        "slice_pass": [None if not math.isfinite(x) else round(float(x), 2) for x in slice_pass],
        **{k: _b64(np.round(v[flip])) for k, v in codes.items()},
    }


def slicer_html(key: str, view: F.BeamletView) -> str:
    l, h, w = view.reference.shape
    start = view.peak_slice
    panels = [
        ("ctdose", "CT + reference dose"),
        ("ref", f"reference ({view.reference_label})"),
        ("pred", f"prediction ({view.prediction_label})"),
        ("diff", "prediction - reference"),
        ("gamma", f"gamma {view.criterion}"),
    ]
    figs = "".join(
        f'<figure><canvas data-panel="{p}" width="{w}" height="{h}"></canvas><figcaption>{esc(t)}</figcaption></figure>'
        for p, t in panels
    )
    return (
        f'<div class="slicer" data-key="{esc(key)}">'
        f'<div class="slicer-controls"><label>depth slice <input type="range" min="0" max="{l - 1}" value="{start}" '
        f'step="1" aria-label="depth slice of beamlet {view.index}"></label> <span class="slice-label"></span></div>'
        f'<canvas class="plane" width="{l}" height="{w}" '
        'title="reference dose in the beam plane; the line marks the slice"></canvas>'
        f'<div class="slicer-panels">{figs}</div>'
        f'<p class="legend">dose: 0 to {fmt(view.dose_max)} Gy per 1e9 (inferno); difference: ±'
        f"{fmt(max(float(np.abs(view.diff_percent).max()), 1e-6))} % of the reference maximum "
        "(blue: under, red: over); "
        f"gamma: 0 to {F.GAMMA_MAX:g} (green: pass, orange-red: fail, grey: not evaluated)</p></div>"
    )


def dose_section(inputs: ReportInputs, page: Page, analytic: bool) -> tuple[str, dict[str, Any]]:
    if not inputs.evaluations:
        return missing(
            page, "no evaluation (metrics.json) given: no dose maps. Run dota evaluate, or pass --evaluate DIR."
        ), {}
    views, primary = load_views(inputs, page, analytic)
    if not views or primary is None:
        return note("No beamlet could be shown (see the notes at the top)."), {}
    prov = eval_provenance(primary, "predictions.h5")
    prov.source = f"{primary.predictions} and {primary.reference}"
    parts = [
        f"<p>Beamlets of {esc(primary.label)} chosen by their gamma {esc(views[0].criterion)} pass rate "
        f"(worst, median, best of {len(primary.rows)}); gamma maps recomputed here with the paper's protocol.</p>"
    ]
    data = {}
    for v in views:
        key = f"{v.tag}-{v.index}"
        data[key] = slice_data(v)
        parts.append(f'<h3 id="beamlet-{esc(key)}">{esc(v.title())}</h3>')
        parts.append(slicer_html(key, v))
        for name, fn, caption in (
            (
                "plane",
                F.beam_plane_figure,
                "Beam plane: CT with reference dose, reference, prediction, difference, gamma",
            ),
            (
                "across",
                F.cross_plane_figure,
                "Across the beam at half the peak depth and at the Bragg peak, "
                "and maximum-intensity projections along the beam",
            ),
            (
                "profiles",
                F.profiles_figure,
                "Integrated depth-dose and lateral profiles" + (f" (also: {', '.join(v.others)})" if v.others else ""),
            ),
        ):
            path = fn(v, page.img(f"dose_{key}_{name}.png"))
            parts.append(page.figure(path, f"{caption}, beamlet #{v.index}.", prov))
    return "\n".join(parts), data
