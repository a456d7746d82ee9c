"""Plans: the plan pages of ``dota dose`` / ``dota plan --report DIR``, read through their summaries
(:class:`dota.plan.workflow.PlanSummary`).

One table per CT and plan, its runs (engines) side by side: beams, spot-energies, the time of each
stage, gamma against the run's reference dose, DVH statistics. Each page is copied into the report
(``plans/<plan>-<engine>/index.html``, with its ``run_summary.json``) and linked, so that the report
folder stays self-contained and works offline.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from dota.errors import DiskFullError
from dota.plan.report import PAGE, PAGE_SUMMARY
from dota.report.inputs import PlanRun, ReportInputs
from dota.report.page import PLANS_DIR, Page, Raw, code, esc, missing, plan_provenance, table


def _copy_name(run: PlanRun, used: set[str]) -> str:
    """``<plan>-<engine>``, made unique among ``used`` (which it joins) with ``-2``, ``-3``, ..."""
    stem = Path(run.summary["plan"].split(", ")[0]).stem
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{stem}-{run.engine}").strip("-.") or "plan"
    name, n = base, 1
    while name.lower() in used:
        n += 1
        name = f"{base}-{n}"
    used.add(name.lower())
    return name


def copy_plan_pages(runs: list[PlanRun], page: Page) -> list[Raw | str]:
    """Each run's page and summary copied into ``plans/<name>/``; the links to the copies (a dash where a
    page could not be copied, with a note)."""
    links: list[Raw | str] = []
    used: set[str] = set()
    for run in runs:
        folder = f"{PLANS_DIR}/{_copy_name(run, used)}"
        try:
            copied = page.copy(run.path / PAGE, f"{folder}/{PAGE}")
            page.copy(run.path / PAGE_SUMMARY, f"{folder}/{PAGE_SUMMARY}")
        except DiskFullError:
            raise
        except OSError as exc:
            page.note(f"plan page {run.path / PAGE} could not be copied into the report ({exc}); not linked")
            links.append("-")
            continue
        links.append(page.link(copied))
    return links


def _rate(rate: float, voxels: int) -> str:
    return "-" if not math.isfinite(rate) else f"{rate:.2f} % of {voxels:,} voxels"


def _gy(value: float) -> str:
    return f"{value:.3f}" if math.isfinite(value) else "-"


def _dvh(run: PlanRun, structure: str) -> str:
    stats = run.summary.get("dvh", {}).get(structure)
    return "-" if stats is None else f"{_gy(stats['D95_gy'])} / {_gy(stats['mean_gy'])}"


def _beams(run: PlanRun) -> int:
    beams = run.summary["beams"]
    return len(beams) if isinstance(beams, list) else beams


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def stages(runs: list[PlanRun]) -> list[str]:
    """The stages of all runs, each run's in its order (a stage only some runs have after the one before it)."""
    out: list[str] = []
    for r in runs:
        at = 0
        for stage in r.summary["timings_s"]:
            if stage in out:
                at = out.index(stage) + 1
            else:
                out.insert(at, stage)
                at += 1
    return out


def plan_rows(runs: list[PlanRun], links: list[Raw | str]) -> list[list[Any]]:
    """The rows of one CT and plan's table: one column per run."""
    structures = list(dict.fromkeys(k for r in runs for k in r.summary.get("dvh", {})))
    rows: list[list[Any]] = [
        ["plan page", *links],
        ["folder", *(str(r.path) for r in runs)],
        ["beams", *(_beams(r) for r in runs)],
        ["spot-energies", *(r.summary["spot_energies"] for r in runs)],
        ["total time (s)", *(_seconds(sum(r.summary["timings_s"].values())) for r in runs)],
    ]
    rows += [[f"time: {stage} (s)", *(_seconds(r.summary["timings_s"].get(stage)) for r in runs)]
             for stage in stages(runs)]
    gammas = [r.summary.get("gamma") for r in runs]
    if any(gammas):
        rows += [
            ["gamma against the reference", *(g["criteria"] if g else "no reference given" for g in gammas)],
            ["gamma pass rate", *(_rate(g["pass_rate_percent"], g["voxels"]) if g else "-" for g in gammas)],
            ["gamma pass rate inside the patient",
             *(_rate(g["pass_rate_in_patient_percent"], g["voxels_in_patient"]) if g else "-" for g in gammas)],
        ]
    rows += [[f"{name}: D95 / mean (Gy)", *(_dvh(r, name) for r in runs)] for name in structures]
    return rows


def _highlight(run: PlanRun) -> str:
    g = run.summary.get("gamma")
    total = sum(run.summary["timings_s"].values())
    head = f"plan {run.label}: {run.summary['spot_energies']} spot-energies, {total:.2f} s in all"
    if g is None:
        return head
    return (f"{head}; gamma {g['criteria']}: {_rate(g['pass_rate_percent'], g['voxels'])}, inside the patient "
            f"{_rate(g['pass_rate_in_patient_percent'], g['voxels_in_patient'])}")


INTRO = (
    '<p class="small">Whole-plan dose from <code>dota dose</code> / <code>dota plan</code> with '
    "<code>--report DIR</code>: one table per CT and plan, its runs side by side. Each plan page (dose on "
    "the CT with a slider, DVHs, gamma map) is copied into this report and linked.</p>"
)


def plans_section(inputs: ReportInputs, page: Page) -> tuple[str, list[str]]:
    if not inputs.plans:
        return missing(
            page,
            "no plan page (index.html with run_summary.json) given: no plans. Run dota dose (or dota plan) "
            "with --report DIR and pass --plan DIR.",
        ), []
    links = dict(zip(map(id, inputs.plans), copy_plan_pages(inputs.plans, page)))
    groups: dict[tuple[str, str], list[PlanRun]] = {}
    for run in inputs.plans:
        groups.setdefault((run.summary["ct"], run.summary["plan"]), []).append(run)
    parts = [INTRO]
    for (ct, plan), runs in groups.items():
        heads = [r.engine for r in runs]
        if len(set(heads)) < len(heads):
            heads = [f"{r.engine} ({r.path.name})" for r in runs]
        parts.append(f"<h3>{esc(runs[0].plan_names)} on {esc(Path(ct).name)}</h3>")
        parts.append(f"<p>CT {code(ct)}, plan {code(plan)}</p>")
        parts.append(table(["", *heads], plan_rows(runs, [links[id(r)] for r in runs]), "compact"))
        parts.append('<p class="small">' + "<br>".join(plan_provenance(r).html() for r in runs) + "</p>")
    return "\n".join(parts), [_highlight(r) for r in inputs.plans]
