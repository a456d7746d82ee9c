"""Training: loss curves, learning rate and the per-epoch check of the cached inference path."""

from __future__ import annotations

import math

from dota.report import figures as F
from dota.report.inputs import ReportInputs, TrainRun
from dota.report.page import Page, esc, missing, note, table, train_provenance


def _facts(run: TrainRun) -> list[list]:
    """The key-value rows of one run: from ``history.json``, ``summary.json`` (when the run finished) and
    the checkpoint."""
    h, s = run.history, run.summary
    diffs = [r["cache_max_abs_diff_rel"] for r in h if "cache_max_abs_diff_rel" in r]
    rows = [["folder", str(run.path)]]
    if s is not None:
        c = s["config"]
        rows += [
            ["preset", c["preset"]],
            ["parameters", s["parameters"]],
            ["epochs done / planned", f"{s['epochs_done']} / {s['epochs']}"],
            ["stopped early (time budget)", s["stopped_early"]],
            ["training / validation beamlets", f"{s['train_beamlets']} / {s['val_beamlets']}"],
            ["optimizer, lr, weight decay, batch", f"{c['optimizer']}, {c['lr']}, {c['weight_decay']}, {c['batch_size']}"],
        ]
    else:
        rows.append(["epochs done", f"{len(h)} (no summary.json: the run has not finished)"])
    cfg = run.checkpoint.get("config", {})
    rows += [
        ["best validation loss", best_val_loss(run)],
        ["training time (s)", sum(r["seconds"] for r in h) if h else "-"],
        ["cached path vs plain pass, worst over epochs", max(diffs) if diffs else "-"],
        [
            "model block shape / look-ahead",
            f"{cfg.get('block_shape', '-')} / {cfg.get('num_forward', '-')}" if cfg else "-",
        ],
        ["checkpoint", run.checkpoint.get("created_by", "not found") if run.checkpoint else "best.safetensors not found"],
    ]
    return rows


def best_val_loss(run: TrainRun) -> float:
    if run.summary is not None:
        return run.summary["best_val_loss"]
    return min((r["val_loss"] for r in run.history), default=math.nan)


def training_section(inputs: ReportInputs, page: Page) -> tuple[str, list[str]]:
    if not inputs.train:
        return missing(
            page,
            "no training run (history.json / summary.json) given: no training curves. "
            "Run dota train and pass --train DIR.",
        ), []
    parts, highlights = [], []
    for n, run in enumerate(inputs.train):
        parts.append(f"<h3>{esc(run.path)}</h3>" + table(["", ""], _facts(run), "kv"))
        if run.history:
            path = F.training_figure(run.history, page.img(f"training_{n}.png"), title=str(run.path))
            parts.append(
                page.figure(
                    path,
                    "Loss curves, learning rate, and the per-epoch validation of the cached "
                    "inference path against the plain full pass.",
                    train_provenance(run, "history.json"),
                )
            )
            best = best_val_loss(run)
            if math.isfinite(best):
                highlights.append(f"best validation loss {best:.3e} ({run.label})")
        else:
            parts.append(note(f"{run.path} has no per-epoch history: no curves."))
    return "\n".join(parts), highlights
