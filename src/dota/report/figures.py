"""Every figure the package draws (PNG), with matplotlib's object API (no pyplot, no global backend): the
report's, and the same functions for the plots that ``dota evaluate`` (:func:`dota.evaluate.plot_evaluation`),
``dota train`` (:func:`dota.train.write_history`) and ``dota bench`` (:func:`dota.bench.write_plots`) write
beside their outputs.

Dose arrays are (L, H, W): depth first, in Gy per 1e9 primaries; voxel sizes in mm (depth, row, col).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.colors import ListedColormap, TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullFormatter

from dota.constants import PAPER_GAMMA_PASS_DOTA, PAPER_GAMMA_PASS_PENCIL_BEAM

if TYPE_CHECKING:  # the writers import this module: their types only for annotations
    from dota.bench import Scenario, Spread
    from dota.evaluate import MetricsFile
    from dota.train import EpochRecord

DPI = 90
DOSE_CMAP = "inferno"
DIFF_CMAP = "RdBu_r"
CT_CMAP = "gray"
CT_WINDOW_HU = (-1000.0, 1500.0)
#: Gamma maps are drawn from 0 to this value; above it the colour saturates.
GAMMA_MAX = 2.0
#: Dose below this fraction of the reference maximum is not drawn over the CT.
OVERLAY_THRESHOLD = 0.05
OTHER_STYLES = ("--", "-.", ":")


def gamma_colormap() -> ListedColormap:
    """Pale to dark green for gamma <= 1 (passing), orange to dark red above 1 (failing); NaN grey."""
    g = np.linspace(0.0, GAMMA_MAX, 256)
    t_pass = np.clip(g, 0, 1)[:, None]
    t_fail = np.clip(g - 1, 0, GAMMA_MAX - 1)[:, None] / (GAMMA_MAX - 1)
    passing = (1 - t_pass) * np.array([0.88, 0.96, 0.86]) + t_pass * np.array([0.10, 0.50, 0.20])
    failing = (1 - t_fail) * np.array([1.00, 0.70, 0.25]) + t_fail * np.array([0.65, 0.00, 0.05])
    colors = np.where((g <= 1.0)[:, None], passing, failing)
    return ListedColormap(colors, name="gamma").with_extremes(bad=(0.55, 0.55, 0.55))


def colormap_lut(name: str) -> bytes:
    """256 x RGB bytes of a colormap, for drawing in the browser exactly as in the static figures."""
    from matplotlib import colormaps

    cmap = gamma_colormap() if name == "gamma" else colormaps[name]
    return (np.asarray(cmap(np.linspace(0, 1, 256)))[:, :3] * 255).round().astype(np.uint8).tobytes()


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


# -- dose views --------------------------------------------------------------------------------------


@dataclass
class BeamletView:
    """One beamlet as the report shows it: CT, reference, prediction, gamma, and other engines' dose."""

    tag: str  # "worst", "median", "best"
    index: int
    energy_mev: float
    voxel_mm: tuple[float, float, float]
    ct_hu: np.ndarray
    reference: np.ndarray
    prediction: np.ndarray
    gamma: np.ndarray
    pass_rate_percent: float
    criterion: str
    reference_label: str
    prediction_label: str
    others: dict[str, np.ndarray] = field(default_factory=dict)  # label -> dose (e.g. the analytic engine)

    @property
    def dose_max(self) -> float:
        return max(float(self.reference.max()), 1e-30)

    @property
    def beam_row(self) -> int:
        """The row through the beam axis: the one holding the most reference dose."""
        return int(np.argmax(self.reference.sum(axis=(0, 2))))

    @property
    def peak_slice(self) -> int:
        """Depth index of the Bragg peak of the integrated depth-dose."""
        return int(np.argmax(self.reference.sum(axis=(1, 2))))

    @property
    def diff_percent(self) -> np.ndarray:
        return 100.0 * (self.prediction - self.reference) / self.dose_max

    def title(self) -> str:
        return (
            f"{self.tag} beamlet #{self.index}: {self.energy_mev:.1f} MeV, "
            f"gamma {self.criterion} pass rate {self.pass_rate_percent:.2f} %"
        )


def _plane_extent(view: BeamletView) -> list[float]:
    l, _, w = view.reference.shape
    vz, _, vx = view.voxel_mm
    return [0.0, l * vz, -w * vx / 2, w * vx / 2]


def _cross_extent(view: BeamletView) -> list[float]:
    _, h, w = view.reference.shape
    _, vy, vx = view.voxel_mm
    return [-w * vx / 2, w * vx / 2, -h * vy / 2, h * vy / 2]


def _diff_norm(diff: np.ndarray) -> TwoSlopeNorm:
    lim = max(float(np.abs(diff).max()), 1e-6)
    return TwoSlopeNorm(0.0, -lim, lim)


def _overlay(ax, ct: np.ndarray, dose: np.ndarray, dose_max: float, extent: list[float]):
    ax.imshow(
        ct,
        cmap=CT_CMAP,
        vmin=CT_WINDOW_HU[0],
        vmax=CT_WINDOW_HU[1],
        extent=extent,
        origin="lower",
        interpolation="nearest",
    )
    shown = np.ma.masked_less(dose, OVERLAY_THRESHOLD * dose_max)
    return ax.imshow(
        shown, cmap=DOSE_CMAP, vmin=0, vmax=dose_max, alpha=0.65, extent=extent, origin="lower", interpolation="nearest"
    )


def _panels(view: BeamletView, cut) -> list[tuple[str, Any, dict[str, Any], str]]:
    """(title, 2-D array, imshow kwargs, colorbar label) for CT+dose, reference, prediction, difference, gamma."""
    diff = cut(view.diff_percent)
    gamma = cut(view.gamma).astype(float)
    gamma = np.where(gamma > 0, gamma, np.nan)
    dose_kw = {"cmap": DOSE_CMAP, "vmin": 0, "vmax": view.dose_max}
    return [
        ("CT (HU) with reference dose", None, {}, "Gy per 1e9"),
        (f"reference ({view.reference_label})", cut(view.reference), dose_kw, "Gy per 1e9"),
        (f"prediction ({view.prediction_label})", cut(view.prediction), dose_kw, "Gy per 1e9"),
        ("prediction - reference", diff, {"cmap": DIFF_CMAP, "norm": _diff_norm(view.diff_percent)}, "% of ref. max"),
        (f"gamma {view.criterion}", gamma, {"cmap": gamma_colormap(), "vmin": 0, "vmax": GAMMA_MAX}, "gamma"),
    ]


def beam_plane_figure(view: BeamletView, path: Path) -> Path:
    """CT + dose, reference, prediction, difference and gamma in the plane containing the beam axis."""
    r = view.beam_row
    extent = _plane_extent(view)

    def cut(a: np.ndarray) -> np.ndarray:
        return a[:, r, :].T

    panels = _panels(view, cut)
    fig = Figure(figsize=(10, 1.5 * len(panels) + 0.7))
    fig.subplots_adjust(left=0.07, right=0.95, top=0.93, bottom=0.07, hspace=0.5)
    axes = fig.subplots(len(panels), 1, sharex=True)
    for ax, (title, arr, kw, unit) in zip(axes, panels):
        if arr is None:
            im = _overlay(ax, cut(view.ct_hu), cut(view.reference), view.dose_max, extent)
        else:
            im = ax.imshow(arr, extent=extent, origin="lower", interpolation="nearest", **kw)
        ax.set_aspect("auto")
        ax.set_title(title, fontsize=9, loc="left")
        ax.set_ylabel("lateral (mm)", fontsize=8)
        ax.tick_params(labelsize=8)
        cb = fig.colorbar(im, ax=ax, pad=0.01, fraction=0.03)
        cb.set_label(unit, fontsize=8)
        cb.ax.tick_params(labelsize=7)
    axes[-1].set_xlabel("depth (mm)")
    fig.suptitle(f"{view.title()} - beam plane (row {r})", fontsize=10)
    return _save(fig, path)


def cross_plane_figure(view: BeamletView, path: Path) -> Path:
    """The five maps across the beam at half the peak depth and at the Bragg peak, and their maximum
    along the beam (difference: the signed value of largest magnitude; CT: the mean along the beam)."""
    peak = view.peak_slice
    depths = [max(peak // 2, 0), peak]
    extent = _cross_extent(view)
    rows = [(f"depth {d * view.voxel_mm[0]:.0f} mm", lambda a, d=d: a[d]) for d in depths]

    def along(a: np.ndarray) -> np.ndarray:
        a = np.nan_to_num(np.asarray(a, float), nan=0.0)
        k = np.abs(a).argmax(axis=0)
        return np.take_along_axis(a, k[None], axis=0)[0]

    rows.append(("maximum along the beam", along))
    fig = Figure(figsize=(12.5, 8.4))
    fig.subplots_adjust(left=0.05, right=0.99, top=0.91, bottom=0.02, wspace=0.25, hspace=0.35)
    axes = fig.subplots(len(rows), 5, sharex=True, sharey=True)
    images = []
    for i, (label, cut) in enumerate(rows):
        for j, (title, arr, kw, unit) in enumerate(_panels(view, cut)):
            ax = axes[i, j]
            if arr is None:
                ct = view.ct_hu.mean(axis=0) if cut is along else cut(view.ct_hu)
                im = _overlay(ax, ct, cut(view.reference), view.dose_max, extent)
            else:
                im = ax.imshow(arr, extent=extent, origin="lower", interpolation="nearest", **kw)
            if i == 0:
                ax.set_title(f"{title}\n[{unit}]", fontsize=8)
            if j == 0:
                ax.set_ylabel(f"{label}\n(mm)", fontsize=8)
            ax.tick_params(labelsize=7)
            images.append((i, j, im))
    for i, j, im in images:
        if i == len(rows) - 1:
            cb = fig.colorbar(im, ax=list(axes[:, j]), orientation="horizontal", fraction=0.04, pad=0.04)
            cb.ax.tick_params(labelsize=7)
    fig.suptitle(f"{view.title()} - across the beam", fontsize=10)
    return _save(fig, path)


def profiles_figure(view: BeamletView, path: Path) -> Path:
    """Integrated depth-dose and lateral profiles (at the peak and at half its depth): reference,
    prediction and any other engine."""
    vz, vy, vx = view.voxel_mm
    curves = [
        (view.reference_label + " (reference)", view.reference, {"color": "k", "lw": 1.8}),
        (view.prediction_label, view.prediction, {"color": "C0", "lw": 1.4}),
    ]
    for i, (label, dose) in enumerate(view.others.items()):
        curves.append((label, dose, {"color": f"C{i + 1}", "ls": OTHER_STYLES[i % 3], "lw": 1.3}))
    l, h, w = view.reference.shape
    z = (np.arange(l) + 0.5) * vz
    x = (np.arange(w) - (w - 1) / 2) * vx
    peak, r = view.peak_slice, view.beam_row
    fig = Figure(figsize=(13, 3.8), layout="constrained")
    axes = fig.subplots(1, 3)
    for label, dose, kw in curves:
        axes[0].plot(z, dose.sum(axis=(1, 2)) * vy * vx, label=label, **kw)
        axes[1].plot(x, dose[peak, r], **kw)
        axes[2].plot(x, dose[max(peak // 2, 0), r], **kw)
    deepest = max(int(np.flatnonzero(d.max(axis=(1, 2)) > 1e-3 * view.dose_max).max(initial=0)) for _, d, _ in curves)
    axes[0].set_xlim(0, min(l * vz, (deepest + 1) * vz * 1.15 + 10))
    axes[0].set_xlabel("depth (mm)")
    axes[0].set_ylabel("integrated dose (Gy mm$^2$ per 1e9)")
    axes[0].set_title("integrated depth-dose", fontsize=9)
    axes[0].legend(fontsize=8)
    for ax, d in ((axes[1], peak), (axes[2], max(peak // 2, 0))):
        ax.set_xlabel("lateral (mm)")
        ax.set_ylabel("dose (Gy per 1e9)")
        ax.set_title(f"lateral profile at {d * vz:.0f} mm depth (row {r})", fontsize=9)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(view.title(), fontsize=10)
    return _save(fig, path)


# -- accuracy ----------------------------------------------------------------------------------------


@dataclass
class EvalSeries:
    """Per-beamlet results of one evaluation, as plain arrays."""

    label: str
    energy_mev: np.ndarray
    relative_error_percent: np.ndarray
    range_error_mm: np.ndarray
    pass_rates: dict[str, np.ndarray]  # criterion -> per-beamlet pass rate (%)
    failures_by_depth: dict[str, np.ndarray]  # criterion -> fraction failing per depth slice
    depth_mm: float


def eval_series(metrics: MetricsFile, label: str) -> EvalSeries:
    """The per-beamlet results of ``metrics.json`` as arrays."""
    rows = metrics["per_beamlet"]
    return EvalSeries(
        label=label,
        energy_mev=np.array([r["energy_mev"] for r in rows], float),
        relative_error_percent=np.array([r["relative_error_percent"] for r in rows], float),
        range_error_mm=np.array([r["range_error_mm"] for r in rows], float),
        pass_rates={c: np.array([r["pass_rate_percent"][c] for r in rows], float) for c in metrics["criteria"]},
        failures_by_depth={c: np.asarray(v, float) for c, v in metrics["failures_by_depth"].items()},
        depth_mm=metrics["voxel_mm"][0],
    )


def gamma_histogram_figure(series: Sequence[EvalSeries], path: Path) -> Path:
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    lows = [float(np.min(v)) for s in series for v in s.pass_rates.values() if len(v)]
    bins = np.linspace(min([80.0, *lows]), 100, 41)
    for s in series:
        for crit, rates in s.pass_rates.items():
            if len(rates):
                ax.hist(
                    np.clip(rates, bins[0], 100),
                    bins=bins,
                    alpha=0.55,
                    label=f"{s.label}, {crit}: mean {np.mean(rates):.2f} %",
                )
    ax.axvline(
        PAPER_GAMMA_PASS_DOTA, color="k", ls="--", lw=1, label=f"DoTA paper, 1%/3mm mean {PAPER_GAMMA_PASS_DOTA} %"
    )
    ax.axvline(
        PAPER_GAMMA_PASS_PENCIL_BEAM,
        color="grey",
        ls=":",
        lw=1,
        label=f"pencil beam (paper) {PAPER_GAMMA_PASS_PENCIL_BEAM} %",
    )
    ax.set_xlabel("gamma pass rate per beamlet (%)")
    ax.set_ylabel("beamlets")
    ax.legend(fontsize=7)
    return _save(fig, path)


def failures_by_depth_figure(series: Sequence[EvalSeries], path: Path) -> Path:
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    for s in series:
        for crit, frac in s.failures_by_depth.items():
            ax.plot(
                (np.arange(len(frac)) + 0.5) * s.depth_mm, 100 * np.asarray(frac, float), label=f"{s.label}, {crit}"
            )
    ax.set_xlabel("depth (mm)")
    ax.set_ylabel("failing voxels (% of evaluated at that depth)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def error_vs_energy_figure(series: Sequence[EvalSeries], path: Path) -> Path:
    fig = Figure(figsize=(13, 3.8), layout="constrained")
    axes = fig.subplots(1, 3)
    for i, s in enumerate(series):
        kw = {"s": 12, "color": f"C{i}", "label": s.label, "alpha": 0.8}
        axes[0].scatter(s.energy_mev, s.relative_error_percent, **kw)
        if s.pass_rates:
            crit, rates = next(iter(s.pass_rates.items()))
            axes[1].scatter(s.energy_mev, rates, **{**kw, "label": f"{s.label}, {crit}"})
        axes[2].scatter(s.energy_mev, s.range_error_mm, **kw)
    axes[0].set_ylabel("relative error, 100 x mean|diff| / max (%)")
    axes[1].set_ylabel("gamma pass rate (%)")
    axes[2].set_ylabel("R80 range error (mm)")
    for ax in axes:
        ax.set_xlabel("energy (MeV)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


# -- speed -------------------------------------------------------------------------------------------


@dataclass
class Latency:
    """Milliseconds per beamlet: median and 10th-90th percentile."""

    median: float
    p10: float
    p90: float

    @classmethod
    def of(cls, s: Spread) -> Latency:
        return cls(s["median"], s["p10"], s["p90"])

    def spread(self) -> tuple[float, float]:
        return max(self.median - self.p10, 0.0), max(self.p90 - self.median, 0.0)


@dataclass
class ScenarioTiming:
    name: str
    speedup: float  # ratio of the medians
    speedup_range: tuple[float, float]  # plain p10 / engine p90 to plain p90 / engine p10
    baseline_ms: Latency
    engine_ms: Latency


def scenario_timing(s: Scenario) -> ScenarioTiming:
    base, eng = Latency.of(s["baseline_ms"]), Latency.of(s["engine_ms"])
    rng = (base.p10 / eng.p90, base.p90 / eng.p10) if eng.p10 > 0 else (s["speedup"], s["speedup"])
    return ScenarioTiming(s["name"], s["speedup"], rng, base, eng)


#: A batch-size curve: (batch size, plain pass, engine) per point.
BatchCurve = list[tuple[int, Latency, Latency]]


def batch_curves(scenarios: Sequence[Scenario]) -> dict[str, BatchCurve]:
    """The batch-size sweeps of the scenarios that ran one (``batch_curve``), by scenario name."""
    return {
        s["name"]: [(p["batch_size"], Latency.of(p["baseline_ms"]), Latency.of(p["engine_ms"])) for p in s["batch_curve"]]
        for s in scenarios
        if len(s.get("batch_curve", [])) > 1
    }


def speedup_figure(items: Sequence[ScenarioTiming], path: Path) -> Path:
    fig = Figure(figsize=(8, 0.45 * len(items) + 1.4), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(items))
    err = np.array([[s.speedup - s.speedup_range[0], s.speedup_range[1] - s.speedup] for s in items]).T.clip(min=0)
    ax.barh(y, [s.speedup for s in items], xerr=err, color="C2", capsize=3)
    for yi, s in zip(y, items):
        ax.text(max(s.speedup, s.speedup_range[1]), yi, f" {s.speedup:.2f}x", va="center", fontsize=8)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks(y, [s.name for s in items], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up of the engine over the plain full pass (ratio of medians; bars: range)")
    return _save(fig, path)


def latency_figure(items: Sequence[ScenarioTiming], path: Path, title: str = "") -> Path:
    """ms per beamlet of the plain pass and of the engine per scenario, with the speed-up at the right."""
    fig = Figure(figsize=(8, 0.55 * len(items) + 1.4), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(items))
    for off, key, color, label in ((-0.2, "baseline_ms", "C7", "plain full pass"), (0.2, "engine_ms", "C0", "engine")):
        lat = [getattr(s, key) for s in items]
        err = np.array([v.spread() for v in lat]).T
        ax.barh(y + off, [v.median for v in lat], height=0.38, xerr=err, color=color, capsize=3, label=label)
    for yi, s in zip(y, items):
        ax.text(max(s.baseline_ms.p90, s.engine_ms.p90), yi, f"  {s.speedup:.2f}x", va="center", fontsize=8)
    ax.set_yticks(y, [s.name for s in items], fontsize=8)
    ax.invert_yaxis()
    medians = [v.median for s in items for v in (s.baseline_ms, s.engine_ms) if v.median > 0]
    if medians and max(medians) / min(medians) > 20:
        ax.set_xscale("log")
    ax.margins(x=0.12)  # room for the speed-up labels
    ax.set_xlabel("ms per beamlet (median; bars: p10-p90); speed-up: ratio of medians")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path)


def batch_curve_figure(curves: dict[str, BatchCurve], path: Path, title: str = "") -> Path:
    """ms per beamlet (median, band: p10-p90) and speed-up against batch size."""
    fig = Figure(figsize=(11, 3.8), layout="constrained")
    ax, ax2 = fig.subplots(1, 2)
    for i, (name, pts) in enumerate(curves.items()):
        pts = sorted(pts, key=lambda p: p[0])
        b = np.array([p[0] for p in pts], float)
        for k, style, alpha, what in ((1, "s--", 0.6, "plain pass"), (2, "o-", 1.0, "engine")):
            ax.plot(b, [p[k].median for p in pts], style, color=f"C{i}", alpha=alpha, label=f"{name}: {what}")
            ax.fill_between(b, [p[k].p10 for p in pts], [p[k].p90 for p in pts], color=f"C{i}", alpha=0.15)
        ax2.plot(b, [p[1].median / p[2].median for p in pts], "o-", color=f"C{i}", label=name)
    ax.set_ylabel("ms per beamlet")
    ax.set_ylim(bottom=0)
    ax2.set_ylabel("speed-up")
    ax2.axhline(1.0, color="k", lw=0.8)
    sizes = sorted({p[0] for pts in curves.values() for p in pts})
    for a in (ax, ax2):
        a.set_xscale("log", base=2)
        a.set_xticks(sizes, [str(b) for b in sizes])
        a.xaxis.set_minor_formatter(NullFormatter())
        a.set_xlabel("beamlets per request (batch size)")
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def memory_figure(items: dict[str, tuple[list[tuple[str, float]], float | None]], path: Path) -> Path:
    """``items``: scenario -> ([(cache part, MiB)], peak RSS MiB or None): stacked cache bars, RSS bars."""
    names = list(items)
    y = np.arange(len(names))
    fig = Figure(figsize=(11, 0.45 * len(names) + 1.5), layout="constrained")
    ax, ax2 = fig.subplots(1, 2, sharey=True)
    kinds = list(dict.fromkeys(k for parts, _ in items.values() for k, _ in parts))
    left = np.zeros(len(names))
    for i, kind in enumerate(kinds):
        vals = np.array([dict(items[n][0]).get(kind, 0.0) for n in names])
        ax.barh(y, vals, left=left, color=f"C{i}", label=kind)
        left += vals
    for yi, v in zip(y, left):
        ax.text(v, yi, f" {v:.1f}", va="center", fontsize=8)
    ax.set_xlabel("cache MiB (end of scenario)")
    if kinds:
        ax.legend(fontsize=7)
    rss = [items[n][1] for n in names]
    ax2.barh(y, [np.nan if r is None else r for r in rss], color="C7")
    ax2.set_xlabel("peak resident memory of the process, MiB")
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    return _save(fig, path)


# -- training ----------------------------------------------------------------------------------------


def _col(history: Sequence[EpochRecord], key: str) -> np.ndarray:
    """One key of every epoch (NaN in the epochs without it: the ``cache_*`` keys are optional)."""
    return np.array([r.get(key, np.nan) for r in history], float)


def training_figure(history: Sequence[EpochRecord], path: Path, title: str = "") -> Path:
    """Loss curves, learning rate, and the per-epoch check of the cached inference path."""
    epochs = _col(history, "epoch")
    fig = Figure(figsize=(12, 6.6), layout="constrained")
    (a, b), (c, d) = fig.subplots(2, 2)
    for key, mk, label in (("train_loss", "o-", "training"), ("val_loss", "s-", "validation")):
        a.plot(epochs, _col(history, key), mk, label=label)
    a.set_yscale("log")
    a.set_ylabel("MSE (scaled dose)")
    a.set_title("loss", fontsize=9)
    a.legend(fontsize=8)
    b.step(epochs, _col(history, "lr"), where="mid", color="C3")
    b.set_yscale("log")
    b.set_ylabel("learning rate")
    b.set_title("learning rate", fontsize=9)
    diff = _col(history, "cache_max_abs_diff_rel")
    if np.isfinite(diff).any():
        c.semilogy(epochs, np.maximum(diff, 1e-12), "o-", color="C2", label="cached vs plain pass")
        c.axhline(1e-5, color="red", ls="--", lw=1, label="exactness bound 1e-5")
        c.legend(fontsize=8)
    c.set_ylabel("max |diff| / max dose")
    c.set_title("cached inference path vs plain pass (validation beamlets)", fontsize=9)
    eng, base = _col(history, "cache_engine_ms"), _col(history, "cache_baseline_ms")
    if np.isfinite(eng).any():
        d.plot(epochs, base, "s--", color="C7", label="plain pass")
        d.plot(epochs, eng, "o-", color="C0", label="engine")
        d.set_ylabel("ms per beamlet")
        d.legend(fontsize=8, loc="upper left")
        d2 = d.twinx()
        d2.plot(epochs, _col(history, "cache_speedup"), "^:", color="C1")
        d2.set_ylabel("speed-up", color="C1")
    d.set_title("cached-path latency during validation", fontsize=9)
    a.yaxis.set_minor_formatter(NullFormatter())
    for ax in (a, b, c, d):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(epochs.min() - 0.5, epochs.max() + 0.5)  # whole epochs, also for a run of one
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)
