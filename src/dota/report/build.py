"""``dota report``: one self-contained HTML page (plus its PNG images and copied plan pages) from train /
evaluate / bench outputs and plan pages.

The page works offline: no CDN, no external script. The depth slider draws slices from compact
arrays embedded in the page (uint8, base64) on canvases, with the same colour maps as the figures.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from dota.fileio import atomic_write
from dota.plan.report import PAGE, PAGE_SUMMARY
from dota.report import figures as F
from dota.report.accuracy import WORST_K, accuracy_section
from dota.report.dose import dose_section
from dota.report.inputs import ReportInputs, discover_inputs
from dota.report.page import (
    IMG_DIR,
    INDEX,
    PLANS_DIR,
    Page,
    bench_provenance,
    esc,
    eval_provenance,
    note,
    plan_command,
    software_versions,
    table,
    train_command,
)
from dota.report.plans import plans_section
from dota.report.speed import speed_section
from dota.report.training import training_section

log = logging.getLogger(__name__)


# -- page --------------------------------------------------------------------------------------------


def _resource(name: str) -> str:
    return resources.files("dota").joinpath("resources", "report", name).read_text(encoding="utf-8")


def _luts() -> dict[str, str]:
    return {
        name: base64.b64encode(F.colormap_lut(cmap)).decode("ascii")
        for name, cmap in (("dose", F.DOSE_CMAP), ("diff", F.DIFF_CMAP), ("gamma", "gamma"), ("ct", F.CT_CMAP))
    }


def _json_script(data: Any) -> str:
    return json.dumps(data, separators=(",", ":")).replace("</", "<\\/")


def build_report(
    source: str | Path | Sequence[str | Path] | None = None,
    out_dir: str | Path = "report",
    *,
    train: str | Path | Sequence[str | Path] | None = None,
    evaluate: str | Path | Sequence[str | Path] | None = None,
    bench: str | Path | Sequence[str | Path] | None = None,
    plan: str | Path | Sequence[str | Path] | None = None,
    worst_k: int = WORST_K,
    analytic: bool = True,
    command: str | None = None,
    title: str = "DoTA results report",
) -> Path:
    """Write ``out_dir/index.html`` and its images from the outputs of train, evaluate and bench, and copy
    the plan pages of dota dose / dota plan into ``out_dir/plans/``.

    ``source`` is one or more folders: a ``dota demo`` folder (its ``train/``, ``evaluate*/``, ``bench/``
    and ``plan/report/`` sub-folders are found), or a run, evaluation, benchmark or plan page folder itself;
    ``train``, ``evaluate``, ``bench`` and ``plan`` add folders explicitly. Missing inputs are noted in the
    page, never an error.
    ``analytic`` adds the analytic engine's dose to the profiles when that engine is available.
    Returns the path of ``index.html``.
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    inputs = discover_inputs(source, train=train, evaluate=evaluate, bench=bench, plan=plan)
    page = Page(out_dir, notes=list(inputs.notes))
    (out_dir / IMG_DIR).mkdir(parents=True, exist_ok=True)
    if command is None:
        command = f"dota.report.build_report({source!r}, {str(out_dir)!r})"

    dose_html, slices = dose_section(inputs, page, analytic)
    acc_html, acc_hi = accuracy_section(inputs, page, worst_k)
    speed_html, speed_hi = speed_section(inputs, page)
    train_html, train_hi = training_section(inputs, page)
    plans_html, plans_hi = plans_section(inputs, page)
    versions = software_versions()
    inputs_rows = (
        [["training run", str(r.path), train_command(r)] for r in inputs.train]
        + [["evaluation", str(e.path), eval_provenance(e, "").command] for e in inputs.evaluations]
        + [["benchmark", str(b.path), bench_provenance(b).command] for b in inputs.benchmarks]
        + [["plan page", str(r.path), plan_command(r)] for r in inputs.plans]
    )
    prov_html = (
        "<h3>This report</h3>"
        + table(
            ["", ""],
            [
                ["command", command],
                ["written", time.strftime("%Y-%m-%d %H:%M:%S %z")],
                *[[k, v] for k, v in versions.items()],
            ],
            "kv",
        )
        + "<h3>Inputs and the commands that produced them</h3>"
        + (table(["kind", "folder", "command"], inputs_rows) if inputs_rows else note("no inputs"))
    )
    highlights = acc_hi + speed_hi + train_hi + plans_hi
    sections = [
        ("overview", "Overview", _overview(inputs, highlights, page.notes)),
        ("dose", "Dose", dose_html),
        ("accuracy", "Accuracy", acc_html),
        ("speed", "Speed", speed_html),
        ("training", "Training", train_html),
        ("plans", "Plans", plans_html),
        ("provenance", "Provenance", prov_html),
    ]
    nav = "".join(f'<a href="#{sid}">{esc(t)}</a>' for sid, t, _ in sections)
    body = "\n".join(f'<section id="{sid}"><h2>{esc(t)}</h2>\n{h}\n</section>' for sid, t, h in sections)
    slice_json = _json_script({"luts": _luts(), "beamlets": slices})
    doc = (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<link rel="icon" href="data:,"><title>{esc(title)}</title><style>{_resource("report.css")}</style></head>\n'
        f"<body><nav>{nav}</nav><main><h1>{esc(title)}</h1>\n{body}\n</main>\n"
        f'<script type="application/json" id="dota-slices">{slice_json}</script>\n'
        f"<script>{_resource('report.js')}</script>\n</body></html>\n"
    )
    index = out_dir / INDEX
    atomic_write(index, lambda t: Path(t).write_text(doc, encoding="utf-8"))
    _remove_stale(out_dir, page)
    log.info("report written to %s (%d figures, %.1f s)", index, len(page.images), time.perf_counter() - t0)
    return index


#: What a build writes besides the page: files of an earlier build that this one did not write are removed.
WRITTEN = (f"{IMG_DIR}/*.png", f"{PLANS_DIR}/*/{PAGE}", f"{PLANS_DIR}/*/{PAGE_SUMMARY}")


def _remove_stale(out_dir: Path, page: Page) -> None:
    """Remove the images and plan page copies of an earlier build that this one did not write (and the plan
    folders that leaves empty)."""
    written = {p.resolve() for p in page.images + page.copies}
    for pattern in WRITTEN:
        for old in out_dir.glob(pattern):
            if old.resolve() not in written:
                old.unlink()
    for folder in (out_dir / PLANS_DIR).glob("*/"):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def _overview(inputs: ReportInputs, highlights: list[str], notes: list[str]) -> str:
    counts = (
        f"{len(inputs.train)} training run(s), {len(inputs.evaluations)} evaluation(s), "
        f"{len(inputs.benchmarks)} benchmark(s), {len(inputs.plans)} plan page(s)."
    )
    parts = [f"<p>Inputs: {esc(counts)}</p>"]
    if highlights:
        parts.append('<ul class="highlights">' + "".join(f"<li>{esc(h)}</li>" for h in highlights) + "</ul>")
    if notes:
        parts.append(
            '<div class="notes"><h3>Notes: what is missing or skipped</h3><ul>'
            + "".join(f"<li>{esc(n)}</li>" for n in dict.fromkeys(notes))
            + "</ul></div>"
        )
    return "\n".join(parts)
