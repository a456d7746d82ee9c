"""Building blocks of the report page: HTML snippets, figure captions with provenance, statistics."""

from __future__ import annotations

import html
import logging
import math
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dota.report.inputs import Benchmark, Evaluation, TrainRun

log = logging.getLogger(__name__)

IMG_DIR = "img"
INDEX = "index.html"
PAPER_CRITERION = "1%/3mm"


# -- small HTML helpers ------------------------------------------------------------------------------


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any, digits: int = 3) -> str:
    """Numbers to short text; None and NaN to a dash."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        a = abs(value)
        if not math.isfinite(value):
            return "-"
        if a != 0 and (a < 1e-3 or a >= 1e6):
            return f"{value:.{max(digits - 1, 1)}e}"
        if a >= 10**digits:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{c if isinstance(c, Raw) else esc(fmt(c))}</td>" for c in r) + "</tr>" for r in rows
    )
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


class Raw(str):
    """Already-escaped HTML that :func:`table` inserts as is."""


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def missing(page: Page, text: str) -> str:
    page.note(text)
    return note(text[0].upper() + text[1:])


def code(text: str) -> str:
    return f"<code>{esc(text)}</code>"


@dataclass
class Provenance:
    """Where a figure's numbers come from and the command that produced them."""

    source: str
    command: str
    versions: str = ""

    def html(self) -> str:
        parts = [f"source: {code(self.source)}", f"produced by: {code(self.command)}"]
        if self.versions:
            parts.append(esc(self.versions))
        return '<span class="prov">' + "; ".join(parts) + "</span>"


@dataclass
class Page:
    """Collects figures and notes while the sections are built."""

    out_dir: Path
    notes: list[str] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)

    def figure(self, path: Path, caption: str, prov: Provenance, alt: str = "") -> str:
        self.images.append(path)
        rel = path.relative_to(self.out_dir).as_posix()
        return (
            f'<figure><img src="{esc(rel)}" alt="{esc(alt or caption)}">'
            f"<figcaption>{esc(caption)}<br>{prov.html()}</figcaption></figure>"
        )

    def note(self, text: str) -> None:
        log.warning("report: %s", text)
        self.notes.append(text)

    def img(self, name: str) -> Path:
        return self.out_dir / IMG_DIR / name


# -- provenance --------------------------------------------------------------------------------------


def software_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    from dota import __version__

    out = {"dota-dose": __version__, "python": platform.python_version()}
    for pkg in ("numpy", "torch", "h5py", "matplotlib", "scipy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    out["platform"] = platform.platform()
    return out


def eval_provenance(ev: Evaluation, source: str) -> Provenance:
    p = ev.metrics.get("provenance") if isinstance(ev.metrics.get("provenance"), dict) else {}
    command = (
        p.get("command") or f"dota evaluate {ev.metrics.get('reference', '?')} --out {ev.path} --engine {ev.engine}"
    )
    versions = ", ".join(f"{k} {p[k]}" for k in ("dota_version", "python", "created") if p.get(k))
    return Provenance(str(ev.path / source), str(command), versions)


def train_command(run: TrainRun) -> str:
    """The command recorded in the run, or one rebuilt from ``train_config.json``."""
    for holder in (run.summary, run.summary.get("provenance") or {}):
        if isinstance(holder, dict) and holder.get("command"):
            return str(holder["command"])
    c = run.config
    if not c:
        return f"dota train DATA --out {run.path}"
    flags = [f"--out {run.path}"]
    names = {
        "preset": "--preset",
        "epochs": "--epochs",
        "batch_size": "--batch-size",
        "lr": "--lr",
        "weight_decay": "--weight-decay",
        "optimizer": "--optimizer",
        "lr_halving_epochs": "--lr-halving-epochs",
        "val_fraction": "--val-fraction",
        "seed": "--seed",
        "device": "--device",
    }
    flags += [f"{flag} {c[k]}" for k, flag in names.items() if k in c]
    if c.get("augment") is False:
        flags.append("--no-augment")
    if c.get("flips"):
        flags.append("--flips")
    return "dota train DATA " + " ".join(flags) + "  (rebuilt from train_config.json; DATA not recorded)"


def train_provenance(run: TrainRun, source: str) -> Provenance:
    created = run.checkpoint.get("created_by", "")
    return Provenance(str(run.path / source), train_command(run), f"checkpoint written by {created}" if created else "")


def bench_provenance(b: Benchmark) -> Provenance:
    d = b.data
    prov = d.get("provenance") if isinstance(d.get("provenance"), dict) else {}
    machine = d.get("machine") if isinstance(d.get("machine"), dict) else {}
    command = d.get("command") or prov.get("command") or machine.get("command") or f"dota bench --out {b.path}"
    top = {k: d[k] for k in ("torch", "python") if k in d}
    versions = ", ".join(
        f"{k} {v}"
        for k, v in {**machine, **top, **prov}.items()
        if ("version" in k or k in ("python", "torch", "dota", "created")) and isinstance(v, (str, int, float))
    )
    return Provenance(str(b.path / "bench.json"), str(command), versions)


# -- statistics --------------------------------------------------------------------------------------


def number(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else float("nan")


def stats(values: Sequence[float]) -> dict[str, float]:
    """Count, mean, standard deviation, min, median and max of the finite values (NaN when none)."""
    a = np.asarray([v for v in values if math.isfinite(v)], float)
    if a.size == 0:
        return {"n": 0, **dict.fromkeys(("mean", "std", "min", "median", "max"), float("nan"))}
    return {"n": int(a.size), "mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()),
            "median": float(np.median(a)), "max": float(a.max())}  # fmt: skip


def pm(s: dict[str, float], digits: int = 3) -> str:
    return "-" if not s["n"] else f"{fmt(s['mean'], digits)} ± {fmt(s['std'], 2)}"
