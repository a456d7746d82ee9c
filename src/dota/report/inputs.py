"""Find and read what ``dota train``, ``dota evaluate``, ``dota bench`` and the plan pages of ``dota dose`` /
``dota plan`` (``--report DIR``) wrote.

Files are read only through their writers' readers (:func:`dota.train.read_summary`,
:func:`dota.train.read_history`, :func:`dota.evaluate.read_metrics`, :func:`dota.bench.read_bench`,
:func:`dota.plan.workflow.read_plan_summary`), which check them against the writers' schemas. A missing
or bad file becomes a note for the page (the reader's one line), never an exception, because a report of
what exists is more useful than none.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from dota.errors import DataFileError
from dota.plan.report import PAGE, PAGE_SUMMARY

if TYPE_CHECKING:  # the writers import torch: they are loaded when a file is read
    from dota.bench import BenchFile, Scenario
    from dota.evaluate import BeamletResult, MetricsFile
    from dota.plan.workflow import PlanSummary
    from dota.train import EpochRecord, TrainSummary

log = logging.getLogger(__name__)

TRAIN_MARKERS = ("history.json", "summary.json")
EVALUATE_MARKER = "metrics.json"
BENCH_MARKER = "bench.json"
PLAN_MARKERS = (PAGE, PAGE_SUMMARY)
#: How far below an input folder that is none of the kinds its runs are searched for (``dota demo``:
#: ``train/``, ``evaluate-*/``, ``bench/`` one level down, the plan page ``plan/report/`` two).
SEARCH_DEPTH = 2


@dataclass
class TrainRun:
    """A training run folder: per-epoch history, the summary (None while the run has not finished) and
    checkpoint metadata."""

    path: Path
    history: list[EpochRecord] = field(default_factory=list)
    summary: TrainSummary | None = None
    checkpoint: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.path.name or str(self.path)


@dataclass
class Evaluation:
    """An evaluation folder: ``metrics.json``, and where its predictions and reference lie (if found)."""

    path: Path
    metrics: MetricsFile
    predictions: Path | None = None
    reference: Path | None = None

    @property
    def engine(self) -> str:
        return self.metrics["engine"]

    @property
    def reference_engine(self) -> str:
        return self.metrics["reference_engine"] or "reference"

    @property
    def label(self) -> str:
        return f"{self.engine} vs {self.reference_engine} ({self.path.name})"

    @property
    def criteria(self) -> list[str]:
        return self.metrics["criteria"]

    @property
    def rows(self) -> list[BeamletResult]:
        return self.metrics["per_beamlet"]


@dataclass
class Benchmark:
    path: Path
    data: BenchFile

    @property
    def scenarios(self) -> list[Scenario]:
        return self.data["scenarios"]


@dataclass
class PlanRun:
    """A plan page folder (``dota dose`` / ``dota plan --report DIR``): ``index.html`` and the run's summary."""

    path: Path
    summary: PlanSummary

    @property
    def engine(self) -> str:
        return self.summary["engine"]

    @property
    def plan_names(self) -> str:
        """The plan file's name (``dota plan``: the names of the files it wrote)."""
        return ", ".join(Path(p).name for p in self.summary["plan"].split(", "))

    @property
    def label(self) -> str:
        return f"{self.plan_names} on {Path(self.summary['ct']).name} ({self.engine})"


@dataclass
class ReportInputs:
    """Everything the report shows, plus notes about what was missing or unreadable."""

    train: list[TrainRun] = field(default_factory=list)
    evaluations: list[Evaluation] = field(default_factory=list)
    benchmarks: list[Benchmark] = field(default_factory=list)
    plans: list[PlanRun] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        log.warning("report: %s", text)
        self.notes.append(text)


T = TypeVar("T")


def read_or_note(reader: Callable[[Path], T], path: Path, inputs: ReportInputs, needed_by: str = "") -> T | None:
    """``reader(path)``; None with the reader's one line as a note when the file cannot be read or does not
    match its schema; None when it does not exist, with a note when ``needed_by`` names what needs it."""
    if not path.is_file():
        if needed_by:
            inputs.note(f"{needed_by} has no {path.name}; skipped")
        return None
    try:
        return reader(path)
    except DataFileError as exc:
        inputs.note(f"{exc}; skipped")
        return None


def _classify(folder: Path) -> list[str]:
    kinds = []
    if any((folder / m).is_file() for m in TRAIN_MARKERS):
        kinds.append("train")
    if (folder / EVALUATE_MARKER).is_file():
        kinds.append("evaluate")
    if (folder / BENCH_MARKER).is_file():
        kinds.append("bench")
    if all((folder / m).is_file() for m in PLAN_MARKERS):
        kinds.append("plan")
    return kinds


def _search(folder: Path, depth: int) -> list[tuple[str, Path]]:
    """(kind, folder) for ``folder`` if it is of any kind, else for its sub-folders, ``depth`` levels down."""
    kinds = _classify(folder)
    if kinds or depth == 0:
        return [(k, folder) for k in kinds]
    subs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    return [hit for s in subs for hit in _search(s, depth - 1)]


def _as_paths(items: str | Path | Iterable[str | Path] | None) -> list[Path]:
    if items is None:
        return []
    if isinstance(items, (str, Path)):
        return [Path(items)]
    return [Path(p) for p in items]


def discover_inputs(
    roots: str | Path | Sequence[str | Path] | None = None,
    *,
    train: str | Path | Sequence[str | Path] | None = None,
    evaluate: str | Path | Sequence[str | Path] | None = None,
    bench: str | Path | Sequence[str | Path] | None = None,
    plan: str | Path | Sequence[str | Path] | None = None,
) -> ReportInputs:
    """Collect report inputs.

    Each of ``roots`` is classified by the files it holds (``history.json``/``summary.json``: a
    training run; ``metrics.json``: an evaluation; ``bench.json``: a benchmark; ``index.html`` with
    ``run_summary.json``: a plan page); a root that is none of these is searched down to
    :data:`SEARCH_DEPTH` levels (the layout of ``dota demo``: ``train/``, ``evaluate-dota/``,
    ``evaluate-analytic/``, ``bench/``, ``plan/report/``). ``train``, ``evaluate``, ``bench`` and ``plan``
    name folders (or the JSON or HTML files in them) explicitly. Missing folders become notes.
    """
    found: dict[str, list[Path]] = {"train": [], "evaluate": [], "bench": [], "plan": []}
    inputs = ReportInputs()
    for root in _as_paths(roots):
        root = root.parent if root.is_file() else root
        if not root.is_dir():
            inputs.note(f"input folder {root} does not exist; skipped")
            continue
        hits = _search(root, SEARCH_DEPTH)
        if not hits:
            inputs.note(f"{root} holds no training run, evaluation, benchmark or plan page (nor do its sub-folders)")
        for k, s in hits:
            found[k].append(s)
    for kind, items in (("train", train), ("evaluate", evaluate), ("bench", bench), ("plan", plan)):
        for p in _as_paths(items):
            p = p.parent if p.suffix in (".json", ".html") else p
            if not p.is_dir():
                inputs.note(f"--{kind} folder {p} does not exist; skipped")
            elif p not in found[kind]:
                found[kind].append(p)

    for p in _dedupe(found["train"]):
        run = load_train_run(p, inputs)
        if run is not None:
            inputs.train.append(run)
    for p in _dedupe(found["evaluate"]):
        ev = load_evaluation(p, inputs)
        if ev is not None:
            inputs.evaluations.append(ev)
    for p in _dedupe(found["bench"]):
        b = load_benchmark(p, inputs)
        if b is not None:
            inputs.benchmarks.append(b)
    for p in _dedupe(found["plan"]):
        run = load_plan_run(p, inputs)
        if run is not None:
            inputs.plans.append(run)
    return inputs


def _dedupe(paths: list[Path]) -> list[Path]:
    seen, out = set(), []
    for p in paths:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def load_train_run(path: Path, inputs: ReportInputs) -> TrainRun | None:
    from dota.train import read_history, read_summary

    summary = read_or_note(read_summary, path / "summary.json", inputs)
    history = read_or_note(read_history, path / "history.json", inputs)
    if history is None and summary is not None:
        history = summary["history"]
    if history is None:
        if not any((path / m).is_file() for m in TRAIN_MARKERS):
            inputs.note(f"training run {path} has neither history.json nor summary.json; skipped")
        return None
    run = TrainRun(path, history=history, summary=summary)
    best = path / "best.safetensors"
    if best.is_file():
        try:
            from dota.checkpoint import read_checkpoint_metadata

            run.checkpoint = read_checkpoint_metadata(best)
        except Exception as exc:  # a report never fails on one unreadable file
            inputs.note(f"checkpoint {best} could not be read ({exc}); its metadata is not shown")
    return run


def load_evaluation(path: Path, inputs: ReportInputs) -> Evaluation | None:
    from dota.evaluate import read_metrics

    metrics = read_or_note(read_metrics, path / EVALUATE_MARKER, inputs, f"evaluation {path}")
    if metrics is None:
        return None
    ev = Evaluation(path, metrics)
    if (path / "predictions.h5").is_file():
        ev.predictions = path / "predictions.h5"
    ev.reference = resolve_reference(metrics["reference"], path)
    return ev


def load_benchmark(path: Path, inputs: ReportInputs) -> Benchmark | None:
    from dota.bench import read_bench

    data = read_or_note(read_bench, path / BENCH_MARKER, inputs, f"benchmark {path}")
    return None if data is None else Benchmark(path, data)


def load_plan_run(path: Path, inputs: ReportInputs) -> PlanRun | None:
    from dota.plan.workflow import read_plan_summary

    if not (path / PAGE).is_file():
        inputs.note(f"plan page folder {path} has no {PAGE}; skipped")
        return None
    summary = read_or_note(read_plan_summary, path / PAGE_SUMMARY, inputs, f"plan page folder {path}")
    return None if summary is None else PlanRun(path, summary)


def resolve_reference(reference: str, eval_dir: Path) -> Path | None:
    """The reference dataset named in ``metrics.json``: as written, else relative to the evaluation
    folder or its parents, else a file of the same name in a sibling ``data/`` folder (the demo layout)."""
    if not reference:
        return None
    ref = Path(reference)
    candidates = [ref]
    if not ref.is_absolute():
        candidates += [base / ref for base in (eval_dir, *eval_dir.resolve().parents[:3])]
    candidates += [eval_dir.parent / "data" / ref.name, eval_dir / ref.name]
    for c in candidates:
        if c.is_file():
            return c
    return None
