"""Building blocks of the report page: HTML snippets, figure captions with provenance, statistics."""

from __future__ import annotations

import html
import logging
import math
import platform
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dota.fileio import atomic_write
from dota.plan.report import PAGE_SUMMARY
from dota.report.inputs import Benchmark, Evaluation, PlanRun, TrainRun

log = logging.getLogger(__name__)

IMG_DIR = "img"
PLANS_DIR = "plans"
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
    """Collects figures, copied files and notes while the sections are built."""

    out_dir: Path
    notes: list[str] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)
    copies: list[Path] = field(default_factory=list)

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

    def copy(self, source: Path, rel: str) -> Path:
        """``source`` copied (atomically) to ``rel`` inside the report folder; returns the copy's path."""
        path = self.out_dir / rel
        atomic_write(path, lambda t: shutil.copyfile(source, t))
        self.copies.append(path)
        return path

    def link(self, path: Path, text: str = "") -> Raw:
        """A link to a file inside the report folder, relative, so that the folder can move."""
        rel = path.relative_to(self.out_dir).as_posix()
        return Raw(f'<a href="{esc(rel)}">{esc(text or rel)}</a>')


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
    p = ev.metrics["provenance"]
    versions = f"dota_version {p['dota_version']}, python {p['python']}, created {p['created']}"
    return Provenance(str(ev.path / source), p["command"], versions)


#: ``dota train`` flags of the :class:`~dota.train.TrainConfig` fields that a rebuilt command shows.
TRAIN_FLAGS = {
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


def train_command(run: TrainRun) -> str:
    """The command recorded in ``summary.json``, or one rebuilt from the settings recorded there."""
    s = run.summary
    if s is None:
        return f"dota train DATA --out {run.path}  (no summary.json: the run has not finished)"
    if s["command"]:
        return s["command"]
    c = s["config"]
    flags = [*s["data"], f"--out {run.path}"]
    if s["val_data"]:
        flags.append(f"--val-data {s['val_data']}")
    flags += [f"{flag} {c[k]}" for k, flag in TRAIN_FLAGS.items()]
    if not c["augment"]:
        flags.append("--no-augment")
    if c["flips"]:
        flags.append("--flips")
    return "dota train " + " ".join(flags) + "  (rebuilt from summary.json)"


def train_provenance(run: TrainRun, source: str) -> Provenance:
    created = run.checkpoint.get("created_by", "")
    return Provenance(str(run.path / source), train_command(run), f"checkpoint written by {created}" if created else "")


def plan_command(run: PlanRun) -> str:
    """The command that wrote a plan page, rebuilt from its summary (which records the CT, plan and engine,
    not the command line)."""
    s = run.summary
    if isinstance(s["beams"], list):  # dota plan records each beam, dota dose their number
        outs = " ".join(f"--out {p}" for p in s["plan"].split(", "))
        return (f"dota plan --ct {s['ct']} {outs} --engine {s['engine']} --report {run.path}  (rebuilt from "
                f"{PAGE_SUMMARY}; the target and other options are not recorded)")
    return (f"dota dose --ct {s['ct']} --plan {s['plan']} --engine {s['engine']} --report {run.path}  (rebuilt from "
            f"{PAGE_SUMMARY}; other options are not recorded)")


def plan_provenance(run: PlanRun) -> Provenance:
    return Provenance(str(run.path / PAGE_SUMMARY), plan_command(run))


def bench_provenance(b: Benchmark) -> Provenance:
    d = b.data
    return Provenance(str(b.path / "bench.json"), d["command"], f"torch {d['torch']}, python {d['python']}")


# -- statistics --------------------------------------------------------------------------------------


def stats(values: Sequence[float]) -> dict[str, float]:
    """Count, mean, standard deviation, min, median and max of the finite values (NaN when none)."""
    a = np.asarray([v for v in values if math.isfinite(v)], float)
    if a.size == 0:
        return {"n": 0, **dict.fromkeys(("mean", "std", "min", "median", "max"), float("nan"))}
    return {"n": int(a.size), "mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()),
            "median": float(np.median(a)), "max": float(a.max())}  # fmt: skip


def pm(s: dict[str, float], digits: int = 3) -> str:
    return "-" if not s["n"] else f"{fmt(s['mean'], digits)} ± {fmt(s['std'], 2)}"
