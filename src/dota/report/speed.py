"""Speed: what ``dota bench`` measured (``bench.json``, :class:`dota.bench.BenchFile`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dota.report import figures as F
from dota.report.inputs import ReportInputs
from dota.report.page import Page, Provenance, Raw, bench_provenance, code, esc, fmt, missing, note, table

if TYPE_CHECKING:
    from dota.bench import BenchFile, Scenario


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested records as ``a.b: value`` rows (lists of plain values joined)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = ", ".join(fmt(x) for x in v)
        else:
            out[key] = v
    return out


def memory_items(s: Scenario) -> tuple[list[tuple[str, float]], float]:
    """(cache part, MiB) of one scenario, and its peak resident memory in MiB."""
    mib = 2.0**-20
    stats = s.get("cache_stats")
    if stats is None:  # the batch scenario records the largest total only
        parts = [("cache", s["cache_bytes"] * mib)]
    else:
        prefix = stats["prefix_cache"]
        parts = [
            ("geometry cache", stats["geometry_cache"]["bytes"] * mib),
            ("prefix cache", (prefix["bytes"] if prefix else 0) * mib),
            ("K/V buffers", stats["kv_buffer_bytes"] * mib),
        ]
    return parts, s["peak_rss_bytes"] * mib


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.0f} %"


def _ms_text(lat: F.Latency) -> str:
    return f"{fmt(lat.median)} [{fmt(lat.p10)}-{fmt(lat.p90)}]"


def _other(s: Scenario) -> Raw:
    """The keys only some scenarios have, one per line."""
    items = []
    if "kernels_only_ms" in s:
        items.append(f"kernels only: {_ms_text(F.Latency.of(s['kernels_only_ms']))} ms, {s['kernels_only_speedup']:.2f}x")
    if s.get("hit_rate") is not None:
        items.append(f"prefix-cache hit rate: {_pct(s['hit_rate'])}")
    if "baseline_best_batch" in s:
        items.append(f"fastest batch: plain {s['baseline_best_batch']}, engine {s['engine_best_batch']}")
    if "requests" in s:
        items.append(f"requests x repeats: {s['requests']} x {s['repeats']}")
    return Raw("<br>".join(esc(i) for i in items))


def _scenario_rows(scen: list[Scenario], timings: list[F.ScenarioTiming]) -> list[list[Any]]:
    rows = []
    for s, t in zip(scen, timings):
        name = Raw(f"<b>{esc(t.name)}</b><br><span class=\"small\">{esc(s['description'])}</span>")
        analytic = (
            f"{_ms_text(F.Latency.of(s['analytic_ms']))} ({s['analytic_speedup']:.2f}x)" if "analytic_ms" in s else "-"
        )
        rows.append(
            [
                name,
                f"{t.speedup:.2f}x [{t.speedup_range[0]:.2f}-{t.speedup_range[1]:.2f}]",
                _ms_text(t.baseline_ms),
                _ms_text(t.engine_ms),
                _pct(s["computed_fraction"]),
                s["max_abs_diff_rel"],
                s["tail_rel"],
                _pct(s.get("tail_check_recomputed_fraction")),
                _pct(s.get("plain_path_fraction")),
                analytic,
                f"{s['cache_bytes'] / 2**20:.1f}",
                f"{s['peak_rss_bytes'] / 2**20:.1f}",
                _other(s),
            ]
        )
    return rows


SCENARIO_HEADERS = [
    "scenario",
    "speed-up [range]",
    "plain pass ms per beamlet [p10-p90]",
    "engine ms per beamlet [p10-p90]",
    "slices computed",
    "max |diff| / max dose",
    "plain-pass dose beyond the cut / max",
    "beamlets the tail check recomputed",
    "requests sent to the plain pass",
    "analytic pencil beam ms per beamlet (speed-up over the plain pass)",
    "cache MiB",
    "peak RSS MiB",
    "other",
]


def speed_section(inputs: ReportInputs, page: Page) -> tuple[str, list[str]]:
    if not inputs.benchmarks:
        return missing(
            page,
            "no benchmark (bench.json) given: no speed figures. Run dota bench (e.g. dota bench --quick) "
            "and pass its folder with --bench, or put it in the report's input folder.",
        ), []
    parts, highlights = [], []
    for n, b in enumerate(inputs.benchmarks):
        d, prov = b.data, bench_provenance(b)
        parts.append(f"<h3>{esc(b.path)}</h3>")
        facts = [f"command: {code(prov.command)}", "quick sizes" if d["quick"] else "full sizes",
                 f"wall time {d['wall_s']:.0f} s"]
        parts.append(f"<p>{'; '.join(facts)}</p>")
        boxes = [
            f"<div><h4>{title}</h4>" + table(["", ""], [[k, v] for k, v in _flatten(d[key]).items()], "kv") + "</div>"
            for key, title in (("machine", "Machine"), ("model", "Model"), ("engine", "Engine settings"))
        ]
        parts.append('<div class="side-by-side">' + "".join(boxes) + "</div>")
        scen = b.scenarios
        if not scen:
            parts.append(note(f"{b.path / 'bench.json'} holds no scenarios."))
            continue
        timings = [F.scenario_timing(s) for s in scen]
        parts.append("<h4>Scenarios</h4>" + table(SCENARIO_HEADERS, _scenario_rows(scen, timings), "compact"))
        parts.append(
            '<p class="small">Speed-up: ratio of medians; the range is plain p10 / engine p90 to plain p90 / '
            "engine p10.</p>"
        )
        best = max(timings, key=lambda t: t.speedup)
        highlights.append(f"best speed-up {best.speedup:.2f}x ({best.name})")
        parts += _figures(d, timings, page, n, prov)
        parts.append(_path_decisions(d))
        parts.append(_cold_warm(d, timings))
        parts.append(_margins(scen))
        parts.append(f'<p class="small">{prov.html()}</p>')
    return "\n".join(parts), highlights


def _figures(d: BenchFile, timings: list[F.ScenarioTiming], page: Page, n: int, prov: Provenance) -> list[str]:
    scen = d["scenarios"]
    parts = [
        page.figure(
            F.speedup_figure(timings, page.img(f"speed_{n}_speedup.png")),
            "Speed-up of the engine over the plain full pass per scenario.",
            prov,
        ),
        page.figure(
            F.latency_figure(timings, page.img(f"speed_{n}_latency.png")),
            "Latency per beamlet of the plain full pass and of the engine.",
            prov,
        ),
    ]
    curves = F.batch_curves(scen)
    if curves:
        parts.append(
            page.figure(
                F.batch_curve_figure(curves, page.img(f"speed_{n}_batch.png")),
                "Time per beamlet and speed-up against batch size.",
                prov,
            )
        )
    else:
        parts.append(note("bench.json has no batch-size sweep (the batch scenario did not run): curves skipped."))
    mem = {t.name: memory_items(s) for s, t in zip(scen, timings)}
    parts.append(
        page.figure(
            F.memory_figure(mem, page.img(f"speed_{n}_memory.png")),
            "Cache memory (by cache) and peak resident memory per scenario.",
            prov,
        )
    )
    return parts


def _path_decisions(d: BenchFile) -> str:
    """What the engine's auto path chose per kind of request."""
    decisions = d["path_decisions"]
    if not decisions:
        return note("bench.json records no engine path decisions.")
    return "<h4>Engine path per kind of request</h4>" + table(
        ["kind of request", "path (best ms per beamlet of each)"], [[k, v] for k, v in decisions.items()], "compact"
    )


def _cold_warm(d: BenchFile, timings: list[F.ScenarioTiming]) -> str:
    """First call in the process, each scenario's warm-up call, and the warm medians."""
    cold = d["cold_start_ms"]
    rows = [["first call in the process (cold start, one beamlet)", cold["baseline"], cold["engine"], "-", "-"]]
    for s, t in zip(d["scenarios"], timings):
        w = s["warmup_ms"]
        rows.append(
            [
                f"{t.name}: first request (warm-up, excluded)",
                w["baseline"],
                w["engine"],
                t.baseline_ms.median,
                t.engine_ms.median,
            ]
        )
    return "<h4>Cold start vs warm (ms per beamlet)</h4>" + table(
        ["call", "plain pass", "engine", "plain pass, warm median", "engine, warm median"], rows, "compact"
    )


def _margins(scen: list[Scenario]) -> str:
    """Truncation margins against the analytic engine, for the scenarios that checked them."""
    rows = []
    for s in scen:
        m = s.get("margins")
        if m is None:
            continue
        sl = m.get("slack_mm")
        rows.append(
            [
                s["name"],
                f"{m['beamlets']} ({m['truncated_beamlets']})",
                " / ".join(fmt(sl[k]) for k in ("min", "p10", "median", "max")) if sl else "-",
                m["analytic_tail_rel_max"],
                m["margin_mm"],
            ]
        )
    if not rows:
        return note("bench.json holds no truncation margins (no analytic engine, or no truncation).")
    return "<h4>Truncation margin against the analytic engine</h4>" + table(
        [
            "scenario",
            "beamlets (truncated)",
            "slack min / p10 / median / max (mm)",
            "analytic dose at or beyond the cut / max",
            "margin mm",
        ],
        rows,
        "compact",
    )
