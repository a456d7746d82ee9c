"""Find and read what ``dota train``, ``dota evaluate`` and ``dota bench`` wrote.

Every reader here is defensive: a missing or unreadable input becomes a note for the page, never an
exception, because a report of what exists is more useful than none.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TRAIN_MARKERS = ("history.json", "summary.json")
EVALUATE_MARKER = "metrics.json"
BENCH_MARKER = "bench.json"


@dataclass
class TrainRun:
    """A training run folder: per-epoch history, summary, config and checkpoint metadata."""

    path: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    checkpoint: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.path.name or str(self.path)


@dataclass
class Evaluation:
    """An evaluation folder: ``metrics.json``, and where its predictions and reference lie (if found)."""

    path: Path
    metrics: dict[str, Any]
    predictions: Path | None = None
    reference: Path | None = None

    @property
    def engine(self) -> str:
        return str(self.metrics.get("engine") or "?")

    @property
    def reference_engine(self) -> str:
        return str(self.metrics.get("reference_engine") or "reference")

    @property
    def label(self) -> str:
        return f"{self.engine} vs {self.reference_engine} ({self.path.name})"

    @property
    def criteria(self) -> list[str]:
        crit = self.metrics.get("criteria")
        if isinstance(crit, list) and crit:
            return [str(c) for c in crit]
        rows = self.rows
        return list(rows[0].get("pass_rate_percent", {})) if rows else []

    @property
    def rows(self) -> list[dict[str, Any]]:
        rows = self.metrics.get("per_beamlet")
        return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


@dataclass
class Benchmark:
    path: Path
    data: dict[str, Any]

    @property
    def scenarios(self) -> list[dict[str, Any]]:
        s = self.data.get("scenarios")
        if isinstance(s, dict):
            return [{"name": k, **v} for k, v in s.items() if isinstance(v, dict)]
        return [x for x in s if isinstance(x, dict)] if isinstance(s, list) else []


@dataclass
class ReportInputs:
    """Everything the report shows, plus notes about what was missing or unreadable."""

    train: list[TrainRun] = field(default_factory=list)
    evaluations: list[Evaluation] = field(default_factory=list)
    benchmarks: list[Benchmark] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        log.warning("report: %s", text)
        self.notes.append(text)


def read_json(path: Path, notes: ReportInputs | None = None) -> Any:
    """Parsed JSON, or None (with a note) when the file is missing or not valid JSON."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        if notes is not None:
            notes.note(f"{path} could not be read ({type(exc).__name__}: {exc}); skipped")
        return None


def _classify(folder: Path) -> list[str]:
    kinds = []
    if any((folder / m).is_file() for m in TRAIN_MARKERS):
        kinds.append("train")
    if (folder / EVALUATE_MARKER).is_file():
        kinds.append("evaluate")
    if (folder / BENCH_MARKER).is_file():
        kinds.append("bench")
    return kinds


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
) -> ReportInputs:
    """Collect report inputs.

    Each of ``roots`` is classified by the files it holds (``history.json``/``summary.json``: a
    training run; ``metrics.json``: an evaluation; ``bench.json``: a benchmark); a root that is none
    of these is searched one level down (the layout of ``dota demo``: ``train/``, ``evaluate/``,
    ``evaluate_analytic/``, ``bench/``). ``train``, ``evaluate`` and ``bench`` name folders (or the
    JSON files in them) explicitly. Missing folders become notes.
    """
    found: dict[str, list[Path]] = {"train": [], "evaluate": [], "bench": []}
    inputs = ReportInputs()
    for root in _as_paths(roots):
        root = root.parent if root.is_file() else root
        if not root.is_dir():
            inputs.note(f"input folder {root} does not exist; skipped")
            continue
        kinds = _classify(root)
        if kinds:
            for k in kinds:
                found[k].append(root)
            continue
        subs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        hits = [(k, s) for s in subs for k in _classify(s)]
        if not hits:
            inputs.note(f"{root} holds no training run, evaluation or benchmark (nor do its sub-folders)")
        for k, s in hits:
            found[k].append(s)
    for kind, items in (("train", train), ("evaluate", evaluate), ("bench", bench)):
        for p in _as_paths(items):
            p = p.parent if p.suffix == ".json" else p
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
        data = read_json(p / BENCH_MARKER, inputs)
        if isinstance(data, dict):
            inputs.benchmarks.append(Benchmark(p, data))
        elif data is not None:
            inputs.note(f"{p / BENCH_MARKER} is not a JSON object; skipped")
        else:
            inputs.note(f"{p} has no readable {BENCH_MARKER}; skipped")
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
    history = read_json(path / "history.json", inputs)
    summary = read_json(path / "summary.json", inputs)
    config = read_json(path / "train_config.json", inputs)
    if not isinstance(history, list) and isinstance(summary, dict):
        history = summary.get("history")
    if not isinstance(history, list) and not isinstance(summary, dict):
        inputs.note(f"training run {path} has neither history.json nor summary.json; skipped")
        return None
    run = TrainRun(
        path,
        history=[h for h in history if isinstance(h, dict)] if isinstance(history, list) else [],
        summary=summary if isinstance(summary, dict) else {},
        config=config if isinstance(config, dict) else {},
    )
    best = path / "best.safetensors"
    if best.is_file():
        try:
            from dota.checkpoint import read_checkpoint_metadata

            run.checkpoint = read_checkpoint_metadata(best)
        except Exception as exc:  # a report never fails on one unreadable file
            inputs.note(f"checkpoint {best} could not be read ({exc}); its metadata is not shown")
    return run


def load_evaluation(path: Path, inputs: ReportInputs) -> Evaluation | None:
    metrics = read_json(path / EVALUATE_MARKER, inputs)
    if not isinstance(metrics, dict):
        inputs.note(f"evaluation {path} has no readable {EVALUATE_MARKER}; skipped")
        return None
    ev = Evaluation(path, metrics)
    if (path / "predictions.h5").is_file():
        ev.predictions = path / "predictions.h5"
    ev.reference = resolve_reference(metrics.get("reference"), path)
    return ev


def resolve_reference(reference: Any, eval_dir: Path) -> Path | None:
    """The reference dataset named in ``metrics.json``: as written, else relative to the evaluation
    folder or its parents, else a file of the same name in a sibling ``data/`` folder (the demo layout)."""
    if not reference:
        return None
    ref = Path(str(reference))
    candidates = [ref]
    if not ref.is_absolute():
        candidates += [base / ref for base in (eval_dir, *eval_dir.resolve().parents[:3])]
    candidates += [eval_dir.parent / "data" / ref.name, eval_dir / ref.name]
    for c in candidates:
        if c.is_file():
            return c
    return None
