"""The plan page: one self-contained HTML file (PNG images inline as data URIs, inline JavaScript, no
network) with the dose on the CT in three orthogonal planes and a slider through the slices, the DVHs,
the gamma map against a reference dose (2 %/2 mm, global, 10 % lower cutoff by default) and the time
of each stage.

Images are drawn directly from the arrays (CT window -1000..1500 HU in grey, dose above 5 % of its
maximum in the ``turbo`` colormap, structure outlines), scaled so that pixels have the true aspect.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dota.constants import AIR_HU
from dota.errors import InputError
from dota.fileio import atomic_write
from dota.plan.geometry import PatientCT

#: Criteria for plans: global 2 % / 2 mm with a 10 % lower dose cutoff.
PLAN_GAMMA_DOSE_PERCENT = 2.0
PLAN_GAMMA_DTA_MM = 2.0
PLAN_GAMMA_CUTOFF_PERCENT = 10.0
#: Slices per plane offered by the slider (evenly over the region with dose).
MAX_SLICES = 40
#: The files of a plan page folder: the page, and the run's summary that the workflows write beside it
#: (:func:`dota.plan.workflow.read_plan_summary` reads it; ``dota report --plan`` shows it).
PAGE = "index.html"
PAGE_SUMMARY = "run_summary.json"
#: The DVH plot beside the page (when there are DVHs).
PAGE_DVH = "dvh.png"
_CT_WINDOW = (-1000.0, 1500.0)
_OUTLINE_COLOURS = [(255, 255, 255), (255, 80, 200), (80, 255, 255), (255, 255, 80), (140, 255, 80),
                    (255, 150, 60), (170, 140, 255)]


@dataclass
class GammaResult:
    """Gamma of a dose against a reference on the CT grid (NaN where not evaluated); the pass rate over all
    evaluated voxels and over those inside the patient (denser than air, :data:`dota.constants.AIR_HU`)."""

    gamma: np.ndarray
    pass_rate_percent: float
    evaluated: int
    criteria: str
    pass_rate_in_patient_percent: float
    evaluated_in_patient: int


def plan_gamma(dose_gy: np.ndarray, reference_gy: np.ndarray, ct: PatientCT,
               dose_percent: float = PLAN_GAMMA_DOSE_PERCENT, dta_mm: float = PLAN_GAMMA_DTA_MM,
               cutoff_percent: float = PLAN_GAMMA_CUTOFF_PERCENT) -> GammaResult:
    """Global 3D gamma of ``dose_gy`` against ``reference_gy`` (same CT grid) with
    :func:`dota.evaluation.gamma.gamma_index`, computed on the box where the reference exceeds the cutoff
    (plus the search radius). The pass rate is also given over the voxels inside the patient (HU above
    :data:`dota.constants.AIR_HU`, as for beamlets): MCsquare scores dose to water in all the air its protons
    cross from the CT's edge, the beamlet engines only from a block's entrance near the skin, and gamma
    there says nothing about the patient."""
    from dota.evaluation.gamma import gamma_index

    if dose_gy.shape != reference_gy.shape:
        raise InputError(f"dose {dose_gy.shape} and reference {reference_gy.shape} are not on one grid")
    ref = np.asarray(reference_gy, dtype=np.float64)
    norm = float(ref.max())
    if norm <= 0:
        raise InputError("the reference dose is zero everywhere")
    out = np.full(ref.shape, np.nan)
    hot = np.argwhere(ref >= cutoff_percent / 100.0 * norm)
    pad = np.ceil(2.0 * dta_mm / np.asarray(ct.spacing_mm)).astype(int) + 1
    lo = np.maximum(hot.min(axis=0) - pad, 0)
    hi = np.minimum(hot.max(axis=0) + pad + 1, np.asarray(ref.shape))
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    g = gamma_index(ref[box], np.asarray(dose_gy, dtype=np.float64)[box], voxel_mm=tuple(ct.spacing_mm),
                    dose_percent=dose_percent, dta_mm=dta_mm, global_norm=norm, lower_cutoff_percent=cutoff_percent)
    out[box] = g
    valid = np.isfinite(out)
    inside = valid & (np.asarray(ct.hu) > AIR_HU)
    return GammaResult(out, _pass_rate(out[valid]), int(valid.sum()),
                       f"{dose_percent:g}%/{dta_mm:g}mm, {cutoff_percent:g}% cutoff",
                       _pass_rate(out[inside]), int(inside.sum()))


@dataclass(frozen=True)
class ReferenceNoise:
    """What the noise of a reference made of independent runs (Monte Carlo with different seeds) costs.

    ``sigma_percent``: the per-voxel standard deviation of the runs' mean, in % of its maximum (root mean
    square over the voxels inside the patient above the gamma cutoff). ``ceiling``: the gamma of a dose against that
    dose plus one realisation of the mean's noise, i.e. the pass rate a dose free of error would reach
    against this reference; a pass rate near it says the failures are the reference's noise."""

    runs: int
    sigma_percent: float
    ceiling: GammaResult


def reference_noise(dose_gy: np.ndarray, runs_gy: list[np.ndarray], ct: PatientCT,
                    cutoff_percent: float = PLAN_GAMMA_CUTOFF_PERCENT) -> ReferenceNoise:
    """:class:`ReferenceNoise` of the mean of ``runs_gy`` (two or more independent runs on the CT grid).

    The noise realisation is run 0 minus the mean of the others, scaled to the variance of the mean of all
    ``N`` runs (factor ``sqrt(N - 1) / N``): it keeps the runs' spatial correlation and dose dependence and,
    for independent runs, carries none of the dose itself."""
    n = len(runs_gy)
    if n < 2:
        raise InputError("the reference's noise needs two or more independent runs")
    stack = np.stack([np.asarray(r, dtype=np.float64) for r in runs_gy])
    mean = stack.mean(axis=0)
    norm = float(mean.max())
    if norm <= 0:
        raise InputError("the reference dose is zero everywhere")
    sigma = stack.std(axis=0, ddof=1) / np.sqrt(n)  # unbiased in variance, hence the RMS below
    sel = (mean >= cutoff_percent / 100.0 * norm) & (np.asarray(ct.hu) > AIR_HU)
    sigma_percent = float(100.0 * np.sqrt(np.mean(sigma[sel] ** 2)) / norm) if sel.any() else float("nan")
    noise = (stack[0] - stack[1:].mean(axis=0)) * (np.sqrt(n - 1) / n)
    dose = np.asarray(dose_gy, dtype=np.float64)
    return ReferenceNoise(n, sigma_percent, plan_gamma(dose, dose + noise, ct, cutoff_percent=cutoff_percent))


def _pass_rate(gamma: np.ndarray) -> float:
    """Percentage of ``gamma`` (evaluated voxels) at most 1; NaN for none."""
    return float(100.0 * np.mean(gamma <= 1.0)) if gamma.size else float("nan")


def _png(rgb: np.ndarray, scale_rc: tuple[float, float]) -> str:
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8))
    h, w = rgb.shape[:2]
    base = 360.0 / max(h * scale_rc[0], w * scale_rc[1])
    size = (max(1, int(round(w * scale_rc[1] * base))), max(1, int(round(h * scale_rc[0] * base))))
    img = img.resize(size, Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _overlay(ct2d: np.ndarray, dose2d: np.ndarray | None, dose_max: float, outlines: list[np.ndarray],
             cmap_name: str = "turbo", vmax: float | None = None, threshold: float = 0.05) -> np.ndarray:
    from matplotlib import colormaps

    lo, hi = _CT_WINDOW
    grey = (np.clip((ct2d - lo) / (hi - lo), 0, 1) * 255).astype(np.float64)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    if dose2d is not None and dose_max > 0:
        top = vmax if vmax is not None else dose_max
        col = np.asarray(colormaps[cmap_name](np.clip(np.nan_to_num(dose2d) / top, 0, 1)))[..., :3] * 255
        show = np.isfinite(dose2d) & (np.nan_to_num(dose2d) >= threshold * dose_max)
        rgb[show] = 0.45 * rgb[show] + 0.55 * col[show]
    for n, m in enumerate(outlines):
        edge = m & ~_erode(m)
        rgb[edge] = _OUTLINE_COLOURS[n % len(_OUTLINE_COLOURS)]
    return rgb


def _erode(m: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return ndimage.binary_erosion(m, border_value=0)


def _plane(arr: np.ndarray, axis: int, index: int) -> np.ndarray:
    """A 2-D cut with superior up for coronal/sagittal planes (slice axis reversed)."""
    cut = np.take(arr, index, axis=axis)
    return cut if axis == 0 else cut[::-1]


def _slices(dose: np.ndarray, axis: int, max_slices: int) -> list[int]:
    profile = np.max(dose, axis=tuple(a for a in range(3) if a != axis))
    hot = np.nonzero(profile >= 0.05 * max(float(dose.max()), 1e-30))[0]
    lo, hi = (int(hot[0]), int(hot[-1])) if hot.size else (0, dose.shape[axis] - 1)
    n = min(max_slices, hi - lo + 1)
    return sorted({int(round(v)) for v in np.linspace(lo, hi, n)})


def write_plan_report(
    folder: str | os.PathLike,
    ct: PatientCT,
    dose_gy: np.ndarray,
    *,
    structures: list[Any] | None = None,
    dvhs: list[Any] | None = None,
    reference_gy: np.ndarray | None = None,
    gamma: GammaResult | None = None,
    timings_s: dict[str, float] | None = None,
    summary: dict[str, Any] | None = None,
    title: str = "dota plan dose",
    prescription_gy: float | None = None,
) -> Path:
    """Write ``folder/index.html`` (self-contained) and ``folder/dvh.png``, each atomically; return the page's
    path. Existing files are replaced: the workflows check the folder first (:func:`dota.fileio.check_output`).

    ``gamma`` is computed with :func:`plan_gamma` when ``reference_gy`` is given and ``gamma`` is not.
    ``summary`` is shown as a table; the workflows write their whole summary beside the page afterwards
    (:data:`PAGE_SUMMARY`, once the time of this stage is known).
    """
    from dota.plan.dvh import plot_dvh

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dose = np.asarray(dose_gy, dtype=np.float64)
    if dose.shape != ct.shape:
        raise InputError(f"dose shape {dose.shape} differs from the CT's {ct.shape}")
    structures = structures or []
    dmax = float(dose.max())
    sz, sy, sx = ct.spacing_mm
    aspect = {0: (sy, sx), 1: (sz, sx), 2: (sz, sy)}
    planes = {}
    for axis, label in ((0, "axial"), (1, "coronal"), (2, "sagittal")):
        idx = _slices(dose, axis, MAX_SLICES)
        frames = []
        for k in idx:
            outlines = [_plane(s.mask, axis, k) for s in structures]
            rgb = _overlay(_plane(ct.hu, axis, k), _plane(dose, axis, k), dmax, outlines)
            frames.append(_png(rgb, aspect[axis]))
        planes[label] = {"index": idx, "frames": frames, "start": int(np.argmin(np.abs(np.asarray(idx) - np.unravel_index(
            int(np.argmax(dose)), dose.shape)[axis])))}
    parts = [f"<h1>{html.escape(title)}</h1>"]
    if summary:
        rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>"
                       for k, v in summary.items())
        parts.append(f"<h2>Plan</h2><table>{rows}</table>")
    parts.append(f"<h2>Dose on the CT</h2><p>Maximum {dmax:.4g} Gy; colour from 5 % of it (turbo colormap); "
                 "outlines: " + (", ".join(f"<span style='color:rgb{_OUTLINE_COLOURS[i % 7]}'>{html.escape(s.name)}"
                                          "</span>" for i, s in enumerate(structures)) or "none") + ".</p>")
    parts.append("<div class='planes'>")
    for label, p in planes.items():
        parts.append(f"<figure><img id='img-{label}' src='{p['frames'][p['start']]}' alt='{label} dose'>"
                     f"<figcaption>{label} <input type='range' id='sl-{label}' min='0' max='{len(p['frames']) - 1}' "
                     f"value='{p['start']}'> slice <span id='lb-{label}'>{p['index'][p['start']]}</span></figcaption>"
                     "</figure>")
    parts.append("</div>")
    if dvhs:
        png = plot_dvh(folder / PAGE_DVH, dvhs, prescription_gy=prescription_gy)
        rows = "".join("<tr><td>" + html.escape(h.name) + "</td>" + "".join(
            f"<td>{h.stats.get(k, float('nan')):.3f}</td>" for k in ("mean_gy", "D98_gy", "D95_gy", "D50_gy", "D2_gy",
                                                                     "max_gy")) + "</tr>" for h in dvhs)
        parts.append("<h2>Dose-volume histograms</h2>"
                     f"<img src='data:image/png;base64,{base64.b64encode(png.read_bytes()).decode('ascii')}' alt='DVH'>"
                     "<table><tr><th>structure</th><th>mean</th><th>D98</th><th>D95</th><th>D50</th><th>D2</th>"
                     f"<th>max (Gy)</th></tr>{rows}</table>")
    if gamma is None and reference_gy is not None:
        gamma = plan_gamma(dose, np.asarray(reference_gy, dtype=np.float64), ct)
    if gamma is not None:
        from dota.report.figures import gamma_colormap

        centre = np.unravel_index(int(np.nanargmax(np.where(np.isfinite(gamma.gamma), dose, -1))), dose.shape)
        imgs = []
        for axis, label in ((0, "axial"), (1, "coronal"), (2, "sagittal")):
            rgb = _overlay_gamma(_plane(ct.hu, axis, centre[axis]), _plane(gamma.gamma, axis, centre[axis]), gamma_colormap())
            imgs.append(f"<figure><img src='{_png(rgb, aspect[axis])}' alt='gamma {label}'><figcaption>{label} slice "
                        f"{centre[axis]}</figcaption></figure>")
        parts.append(f"<h2>Gamma against the reference</h2><p>{html.escape(gamma.criteria)}: pass rate "
                     f"<b>{gamma.pass_rate_percent:.2f} %</b> of {gamma.evaluated} voxels, inside the patient "
                     f"<b>{gamma.pass_rate_in_patient_percent:.2f} %</b> of {gamma.evaluated_in_patient} (green "
                     "passes, orange to red fails, gamma drawn to 2).</p>"
                     "<div class='planes'>" + "".join(imgs) + "</div>")
    if timings_s:
        total = sum(timings_s.values())
        rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.3f}</td><td>{100 * v / max(total, 1e-12):.1f} %</td></tr>"
                       for k, v in timings_s.items())
        parts.append(f"<h2>Time per stage</h2><table><tr><th>stage</th><th>s</th><th>share</th></tr>{rows}"
                     f"<tr><th>total</th><th>{total:.3f}</th><th></th></tr></table>")
    data = {label: {"frames": p["frames"], "index": p["index"]} for label, p in planes.items()}
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>" + html.escape(title) + "</title><style>"
        "body{font-family:system-ui,sans-serif;margin:1.5em;max-width:1250px;color:#222}"
        ".planes{display:flex;flex-wrap:wrap;gap:1em}figure{margin:0}figcaption{font-size:.9em}"
        "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}"
        "img{image-rendering:pixelated;background:#000}</style></head><body>" + "".join(parts)
        + "<script>const PLANES=" + json.dumps(data) + ";for(const [k,p] of Object.entries(PLANES)){"
        "const s=document.getElementById('sl-'+k),im=document.getElementById('img-'+k),lb=document.getElementById('lb-'+k);"
        "s.addEventListener('input',()=>{im.src=p.frames[+s.value];lb.textContent=p.index[+s.value];});}</script>"
        "</body></html>"
    )
    out = folder / PAGE
    atomic_write(out, lambda t: Path(t).write_text(page))
    return out


def _overlay_gamma(ct2d: np.ndarray, g2d: np.ndarray, cmap: Any) -> np.ndarray:
    lo, hi = _CT_WINDOW
    grey = (np.clip((ct2d - lo) / (hi - lo), 0, 1) * 255).astype(np.float64)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    ok = np.isfinite(g2d)
    col = np.asarray(cmap(np.clip(np.nan_to_num(g2d) / 2.0, 0, 1)))[..., :3] * 255
    rgb[ok] = 0.25 * rgb[ok] + 0.75 * col[ok]
    return rgb


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v)
    return str(v)
