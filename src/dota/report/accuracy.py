"""Accuracy: gamma pass rates, errors, failures by depth, worst beamlets, the paper's table beside ours."""

from __future__ import annotations

import numpy as np

from dota.constants import (
    PAPER_GAMMA_PASS_DOTA,
    PAPER_GAMMA_PASS_PENCIL_BEAM,
    PAPER_REL_ERROR_DOTA,
    PAPER_REL_ERROR_PENCIL_BEAM,
)
from dota.report import figures as F
from dota.report.inputs import Evaluation, ReportInputs
from dota.report.page import (
    PAPER_CRITERION,
    Page,
    Provenance,
    Raw,
    esc,
    eval_provenance,
    fmt,
    missing,
    pm,
    stats,
    table,
)

#: Rows in the worst-beamlet tables.
WORST_K = 10


def series_label(ev: Evaluation) -> str:
    return ev.engine if ev.path.name in ("evaluate", ev.engine) else f"{ev.engine} ({ev.path.name})"


def _group_rows(ev: Evaluation) -> list[list]:
    """One row per site and per energy band of the evaluation's summary."""
    summary = ev.metrics["summary"]
    return [
        [
            ev.engine,
            kind,
            name,
            g["beamlets"],
            *[Raw(esc(pm(g["gamma"][c]))) for c in ev.criteria],
            Raw(esc(pm(g["relative_error_percent"]))),
            g["range_error_mm"]["mean"],
        ]
        for kind, groups in (("site", summary["by_site"]), ("energy", summary["by_energy"]))
        for name, g in groups.items()
    ]


def accuracy_section(inputs: ReportInputs, page: Page, worst_k: int) -> tuple[str, list[str]]:
    evs = [e for e in inputs.evaluations if e.rows]
    for e in inputs.evaluations:
        if not e.rows:
            page.note(f"{e.path / 'metrics.json'} has no per-beamlet results; accuracy figures skip it")
    if not evs:
        return missing(
            page, "no evaluation results: no accuracy figures. Run dota evaluate (or dota demo) and pass its folder."
        ), []
    series = [F.eval_series(e.metrics, series_label(e)) for e in evs]
    highlights = []
    rows = []
    for e, s in zip(evs, series):
        rel = stats(list(s.relative_error_percent))
        rng = stats([abs(x) for x in s.range_error_mm])
        for crit, rates in s.pass_rates.items():
            g = stats(list(rates))
            rows.append(
                [
                    e.engine,
                    e.reference_engine,
                    e.path.name,
                    g["n"],
                    crit,
                    Raw(esc(pm(g))),
                    g["median"],
                    g["min"],
                    Raw(esc(pm(rel))),
                    rng["mean"],
                    e.metrics["summary"]["engine_ms_per_beamlet"],
                ]
            )
        g = stats(list(s.pass_rates.get(PAPER_CRITERION, [])))
        if g["n"]:
            highlights.append(
                f"{e.engine} vs {e.reference_engine}: gamma 1%/3mm {fmt(g['mean'], 4)} % "
                f"(paper DoTA {PAPER_GAMMA_PASS_DOTA} %)"
            )
    parts = [
        "<h3>Summary</h3>",
        table(
            [
                "engine",
                "reference",
                "folder",
                "beamlets",
                "criterion",
                "pass rate % (mean ± sd)",
                "median",
                "min",
                "relative error %",
                "mean |R80 error| mm",
                "ms per beamlet",
            ],
            rows,
        ),
    ]

    groups = [(e, _group_rows(e)) for e in evs]
    for e, rows in groups:
        if rows:
            parts += [
                f"<h3>By site and by energy band: {esc(e.label)}</h3>",
                table(
                    [
                        "engine",
                        "by",
                        "group",
                        "beamlets",
                        *[f"pass rate % {c} (mean ± sd)" for c in e.criteria],
                        "relative error %",
                        "mean R80 error mm",
                    ],
                    rows,
                    "compact",
                ),
            ]

    paper_rows = [
        [
            "DoTA (paper)",
            "MCsquare, 3888 test beamlets",
            f"{PAPER_GAMMA_PASS_DOTA} ± 1.17",
            f"{PAPER_REL_ERROR_DOTA} ± 0.109",
        ],
        [
            "pencil beam (paper)",
            "MCsquare, same test set",
            f"{PAPER_GAMMA_PASS_PENCIL_BEAM} ± 3.15",
            f"{PAPER_REL_ERROR_PENCIL_BEAM}",
        ],
    ]
    for e, s in zip(evs, series):
        g = stats(list(s.pass_rates.get(PAPER_CRITERION, [])))
        rel = stats(list(s.relative_error_percent))
        paper_rows.append(
            [
                f"{e.engine} (this run, {e.path.name})",
                f"{e.reference_engine}, {len(e.rows)} beamlets",
                pm(g, 4) if g["n"] else "not evaluated at 1%/3mm",
                pm(rel),
            ]
        )
    parts += [
        "<h3>The paper's table beside ours</h3>",
        table(["system", "reference and test set", "gamma 1%/3mm pass rate %", "relative error %"], paper_rows),
        '<p class="small">Paper: Pastor-Serrano &amp; Perko, PMB 2022, global gamma, reference &lt; 0.1 % and '
        "prediction &lt; 0.5 % of the maximum set to 0, pass rate = 1 - N(gamma&gt;1)/N(gamma&gt;0). Our rows use "
        "the same protocol but our own reference engine and beamlets, so they compare methods, not numbers.</p>",
    ]

    prov = Provenance(
        ", ".join(str(e.path / "metrics.json") for e in evs),
        " ; ".join(eval_provenance(e, "metrics.json").command for e in evs),
        "; ".join(v for v in (eval_provenance(e, "").versions for e in evs) if v),
    )
    parts.append(
        page.figure(
            F.gamma_histogram_figure(series, page.img("accuracy_gamma_hist.png")),
            "Gamma pass rate per beamlet, with the paper's means.",
            prov,
        )
    )
    parts.append(
        page.figure(
            F.failures_by_depth_figure(series, page.img("accuracy_failures_by_depth.png")),
            "Failing voxels (gamma > 1) by depth, as a share of the voxels evaluated at that depth.",
            prov,
        )
    )
    parts.append(
        page.figure(
            F.error_vs_energy_figure(series, page.img("accuracy_error_vs_energy.png")),
            "Relative error, gamma pass rate and R80 range error against beam energy.",
            prov,
        )
    )

    for e in evs:
        crit = PAPER_CRITERION if PAPER_CRITERION in e.criteria else e.criteria[0]
        ranked = sorted(
            e.rows,
            key=lambda r: (
                np.nan_to_num(r["pass_rate_percent"][crit], nan=np.inf),
                -np.nan_to_num(r["relative_error_percent"], nan=0.0),
            ),
        )[:worst_k]
        trows = [
            [
                r["index"],
                r["energy_mev"],
                *[r["pass_rate_percent"][c] for c in e.criteria],
                r["relative_error_percent"],
                r["range_error_mm"],
                r["max_dose_ref"],
                r["max_dose_eval"],
            ]
            for r in ranked
        ]
        parts.append(f"<h3>Worst {len(trows)} beamlets: {esc(e.label)}</h3>")
        parts.append(
            table(
                [
                    "beamlet",
                    "energy MeV",
                    *[f"pass % {c}" for c in e.criteria],
                    "relative error %",
                    "R80 error mm",
                    "max dose ref",
                    "max dose eval",
                ],
                trows,
                "compact",
            )
        )
        parts.append(f'<p class="small">{eval_provenance(e, "metrics.json").html()}</p>')
    return "\n".join(parts), highlights
