"""Training: loss curves, learning rate and the per-epoch check of the cached inference path."""

from __future__ import annotations

import math

from dota.report import figures as F
from dota.report.inputs import ReportInputs
from dota.report.page import Page, esc, missing, note, number, table, train_provenance


def training_section(inputs: ReportInputs, page: Page) -> tuple[str, list[str]]:
    if not inputs.train:
        return missing(
            page,
            "no training run (history.json / summary.json) given: no training curves. "
            "Run dota train and pass --train DIR.",
        ), []
    parts, highlights = [], []
    for n, run in enumerate(inputs.train):
        s, c, h = run.summary, run.config, run.history
        cfg = run.checkpoint.get("config", {}) if run.checkpoint else {}
        val = [number(r.get("val_loss")) for r in h]
        best_val = number(s.get("best_val_loss")) if "best_val_loss" in s else (min(val) if val else float("nan"))
        diffs = [number(r.get("cache_max_abs_diff_rel")) for r in h if "cache_max_abs_diff_rel" in r]
        rows = [
            ["folder", str(run.path)],
            ["preset", c.get("preset", "-")],
            ["parameters", s.get("parameters", "-")],
            ["epochs done / planned", f"{s.get('epochs_done', len(h))} / {s.get('epochs', c.get('epochs', '-'))}"],
            ["stopped early (time budget)", s.get("stopped_early", "-")],
            ["training / validation beamlets", f"{s.get('train_beamlets', '-')} / {s.get('val_beamlets', '-')}"],
            ["best validation loss", best_val],
            ["training time (s)", sum(number(r.get("seconds")) for r in h if "seconds" in r) if h else "-"],
            [
                "optimizer, lr, weight decay, batch",
                f"{c.get('optimizer', '-')}, {c.get('lr', '-')}, "
                f"{c.get('weight_decay', '-')}, {c.get('batch_size', '-')}",
            ],
            ["cached path vs plain pass, worst over epochs", max(diffs) if diffs else "-"],
            [
                "model block shape / look-ahead",
                f"{cfg.get('block_shape', '-')} / {cfg.get('num_forward', '-')}" if cfg else "-",
            ],
            [
                "checkpoint",
                run.checkpoint.get("created_by", "not found") if run.checkpoint else "best.safetensors not found",
            ],
        ]
        parts.append(f"<h3>{esc(run.path)}</h3>" + table(["", ""], rows, "kv"))
        if h:
            path = F.training_figure(h, page.img(f"training_{n}.png"), title=str(run.path))
            parts.append(
                page.figure(
                    path,
                    "Loss curves, learning rate, and the per-epoch validation of the cached "
                    "inference path against the plain full pass.",
                    train_provenance(run, "history.json"),
                )
            )
            if math.isfinite(best_val):
                highlights.append(f"best validation loss {best_val:.3e} ({run.label})")
        else:
            parts.append(note(f"{run.path} has no per-epoch history: no curves."))
    return "\n".join(parts), highlights
