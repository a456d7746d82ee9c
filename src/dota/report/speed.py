"""Speed: what ``dota bench`` measured (read defensively: keys may differ between versions)."""

from __future__ import annotations

import re
from typing import Any

from dota.report import figures as F
from dota.report.inputs import Benchmark, ReportInputs
from dota.report.page import Page, Raw, bench_provenance, code, esc, fmt, missing, note, number, table


def _latency(v: Any) -> F.Latency | None:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return F.Latency(float(v))
    if isinstance(v, dict):
        med = next((v[k] for k in ("median", "p50", "mean") if isinstance(v.get(k), (int, float))), None)
        if med is None:
            return None
        p10, p90 = v.get("p10"), v.get("p90")
        return F.Latency(
            float(med),
            float(p10) if isinstance(p10, (int, float)) else None,
            float(p90) if isinstance(p90, (int, float)) else None,
        )
    return None


def _first(d: dict[str, Any], *keys: str) -> Any:
    return next((d[k] for k in keys if k in d and d[k] is not None), None)


def scenario_timing(s: dict[str, Any]) -> F.ScenarioTiming:
    name = str(_first(s, "name", "scenario", "workload") or "?")
    base = _latency(_first(s, "baseline_ms", "baseline_ms_per_beamlet", "plain_ms", "baseline"))
    eng = _latency(_first(s, "engine_ms", "engine_ms_per_beamlet", "cached_ms", "engine"))
    sp = _first(s, "speedup")
    speedup, rng = None, None
    if isinstance(sp, dict):
        speedup = _latency(sp).median if _latency(sp) else None
        if isinstance(sp.get("p10"), (int, float)) and isinstance(sp.get("p90"), (int, float)):
            rng = (float(sp["p10"]), float(sp["p90"]))
    elif isinstance(sp, (int, float)):
        speedup = float(sp)
    if speedup is None and base and eng and eng.median > 0:
        speedup = base.median / eng.median
    lo, hi = _first(s, "speedup_p10", "speedup_lo"), _first(s, "speedup_p90", "speedup_hi")
    if rng is None and isinstance(lo, (int, float)) and isinstance(hi, (int, float)):
        rng = (float(lo), float(hi))
    if rng is None and base and eng and None not in (base.p10, base.p90, eng.p10, eng.p90) and eng.p10 > 0:
        rng = (base.p10 / eng.p90, base.p90 / eng.p10)
    return F.ScenarioTiming(name, speedup, rng, base, eng)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        elif isinstance(v, (str, int, float, bool)) or v is None:
            out[key] = v
        elif isinstance(v, (list, tuple)) and all(isinstance(x, (str, int, float, bool)) for x in v):
            out[key] = ", ".join(fmt(x) for x in v)
    return out


_BATCH_SUFFIX = re.compile(r"[\s_,-]*(?:batch|bs|b)[\s=_-]*\d+$", re.I)


def batch_curves(b: Benchmark) -> dict[str, list[tuple[float, float | None, float | None]]]:
    """Batch-size curves: scenarios carrying a batch size (grouped by name without the batch part), or
    lists of {batch_size, baseline_ms, engine_ms} at the top level or inside a scenario."""
    curves: dict[str, list[tuple[float, float | None, float | None]]] = {}

    def add(name: str, rec: dict[str, Any]) -> None:
        bs = _first(rec, "batch_size", "batch")
        if not isinstance(bs, (int, float)):
            return
        t = scenario_timing(rec)
        curves.setdefault(name, []).append(
            (float(bs), t.baseline_ms.median if t.baseline_ms else None, t.engine_ms.median if t.engine_ms else None)
        )

    for key in ("batch_sizes", "batch_curve", "batch"):
        if isinstance(b.data.get(key), list):
            for rec in b.data[key]:
                if isinstance(rec, dict):
                    add(str(rec.get("name") or rec.get("workload") or key), rec)
    for s in b.scenarios:
        for key in ("batch_sizes", "batch_curve"):
            if isinstance(s.get(key), list):
                for rec in s[key]:
                    if isinstance(rec, dict):
                        add(str(s.get("name", "?")), rec)
        if isinstance(_first(s, "batch_size", "batch"), (int, float)):
            name = str(_first(s, "workload", "group") or _BATCH_SUFFIX.sub("", str(s.get("name", "?"))) or "?")
            add(name, s)
    return {k: v for k, v in curves.items() if len({p[0] for p in v}) > 1}


def memory_items(s: dict[str, Any]) -> tuple[list[tuple[str, float]], float | None]:
    """(cache part, MiB) of one scenario, and its peak resident memory in MiB."""
    parts = []
    stats = s.get("cache_stats") if isinstance(s.get("cache_stats"), dict) else {}
    for key, v in _flatten(stats).items():
        if key.endswith("bytes") and not key.endswith("max_bytes") and isinstance(v, (int, float)):
            parts.append((key.removesuffix(".bytes").removesuffix("_bytes").replace("_", " "), float(v) / 2**20))
    if not parts and isinstance(s.get("cache_bytes"), (int, float)):
        parts.append(("cache", float(s["cache_bytes"]) / 2**20))
    rss = s.get("peak_rss_bytes")
    return parts, float(rss) / 2**20 if isinstance(rss, (int, float)) else None


_SCENARIO_COLUMNS = {
    "name",
    "scenario",
    "description",
    "speedup",
    "speedup_p10",
    "speedup_p90",
    "baseline_ms",
    "engine_ms",
    "max_abs_diff_rel",
    "tail_rel",
    "computed_fraction",
    "cache_bytes",
    "peak_rss_bytes",
    "cache_stats",
    "margins",
    "warmup_ms",
    "batch_curve",
    "batch_sizes",
    "cold_start_ms",
}


def _pct(v: Any) -> Any:
    return f"{100 * v:.0f} %" if isinstance(v, (int, float)) else "-"


def _mib_text(v: Any) -> Any:
    return f"{v / 2**20:.1f}" if isinstance(v, (int, float)) else "-"


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
        facts = [f"command: {code(prov.command)}"]
        if "quick" in d:
            facts.append("quick sizes" if d.get("quick") else "full sizes")
        if isinstance(d.get("wall_s"), (int, float)):
            facts.append(f"wall time {d['wall_s']:.0f} s")
        parts.append(f"<p>{'; '.join(facts)}</p>")
        boxes = []
        for key, title in (("machine", "Machine"), ("model", "Model"), ("engine", "Engine settings")):
            if isinstance(d.get(key), dict):
                boxes.append(
                    f"<div><h4>{title}</h4>"
                    + table(["", ""], [[k, v] for k, v in _flatten(d[key]).items()], "kv")
                    + "</div>"
                )
            elif key != "engine":
                parts.append(note(f"bench.json has no '{key}' record."))
        parts.append('<div class="side-by-side">' + "".join(boxes) + "</div>")
        scen = b.scenarios
        if not scen:
            parts.append(note(f"{b.path / 'bench.json'} holds no scenarios."))
            continue
        timings = [scenario_timing(s) for s in scen]
        rows = []
        for s, t in zip(scen, timings):
            rest = {k: v for k, v in _flatten({k: v for k, v in s.items() if k not in _SCENARIO_COLUMNS}).items()}
            sp = (
                "-"
                if t.speedup is None
                else f"{t.speedup:.2f}x"
                + (f" [{t.speedup_range[0]:.2f}-{t.speedup_range[1]:.2f}]" if t.speedup_range else "")
            )
            lat = [
                "-" if x is None else f"{fmt(x.median)} [{fmt(x.p10)}-{fmt(x.p90)}]"
                for x in (t.baseline_ms, t.engine_ms)
            ]
            name = Raw(
                f"<b>{esc(t.name)}</b>"
                + (f'<br><span class="small">{esc(s["description"])}</span>' if s.get("description") else "")
            )
            rows.append(
                [
                    name,
                    sp,
                    *lat,
                    _pct(s.get("computed_fraction")),
                    number(s.get("max_abs_diff_rel")),
                    number(s.get("tail_rel")),
                    _mib_text(s.get("cache_bytes")),
                    _mib_text(s.get("peak_rss_bytes")),
                    Raw("<br>".join(f"{esc(k)}: {esc(fmt(v))}" for k, v in rest.items())),
                ]
            )
        parts.append(
            "<h4>Scenarios</h4>"
            + table(
                [
                    "scenario",
                    "speed-up [range]",
                    "plain pass ms per beamlet [p10-p90]",
                    "engine ms per beamlet [p10-p90]",
                    "slices computed",
                    "max |diff| / max dose",
                    "plain-pass dose beyond the cut / max",
                    "cache MiB",
                    "peak RSS MiB",
                    "other",
                ],
                rows,
                "compact",
            )
        )
        parts.append(
            '<p class="small">Speed-up: ratio of medians; the range, where bench.json gives none, is '
            "plain p10 / engine p90 to plain p90 / engine p10.</p>"
        )
        best = max((t for t in timings if t.speedup is not None), key=lambda t: t.speedup, default=None)
        if best is not None:
            highlights.append(f"best speed-up {best.speedup:.2f}x ({best.name})")
        if any(t.speedup is not None for t in timings):
            parts.append(
                page.figure(
                    F.speedup_figure(timings, page.img(f"speed_{n}_speedup.png")),
                    "Speed-up of the engine over the plain full pass per scenario.",
                    prov,
                )
            )
        if any(t.baseline_ms or t.engine_ms for t in timings):
            parts.append(
                page.figure(
                    F.latency_figure(timings, page.img(f"speed_{n}_latency.png")),
                    "Latency per beamlet of the plain full pass and of the engine.",
                    prov,
                )
            )
        curves = batch_curves(b)
        if curves:
            parts.append(
                page.figure(
                    F.batch_curve_figure(curves, page.img(f"speed_{n}_batch.png")),
                    "Time per beamlet and speed-up against batch size.",
                    prov,
                )
            )
        else:
            parts.append(note("bench.json has no batch-size sweep: batch-size curves skipped."))
        mem = {t.name: memory_items(s) for s, t in zip(scen, timings)}
        if any(p or r is not None for p, r in mem.values()):
            parts.append(
                page.figure(
                    F.memory_figure(mem, page.img(f"speed_{n}_memory.png")),
                    "Cache memory (by cache) and peak resident memory per scenario.",
                    prov,
                )
            )
        else:
            parts.append(note("bench.json records no memory sizes: memory figure skipped."))
        parts.append(_cold_warm(d, scen, timings))
        margins = [(t.name, s["margins"]) for s, t in zip(scen, timings) if isinstance(s.get("margins"), dict)]
        if margins:
            mrows = []
            for name, m in margins:
                sl = m.get("slack_mm") if isinstance(m.get("slack_mm"), dict) else {}
                mrows.append(
                    [
                        name,
                        f"{fmt(m.get('beamlets'))} ({fmt(m.get('truncated_beamlets'))})",
                        " / ".join(fmt(number(sl.get(k))) for k in ("min", "p10", "median", "max")) if sl else "-",
                        number(m.get("analytic_tail_rel_max")),
                        number(m.get("margin_mm")),
                    ]
                )
            parts.append(
                "<h4>Truncation margin against the analytic engine</h4>"
                + table(
                    [
                        "scenario",
                        "beamlets (truncated)",
                        "slack min / p10 / median / max (mm)",
                        "analytic dose at or beyond the cut / max",
                        "margin mm",
                    ],
                    mrows,
                    "compact",
                )
            )
        parts.append(f'<p class="small">{prov.html()}</p>')
    return "\n".join(parts), highlights


def _cold_warm(d: dict[str, Any], scen: list[dict[str, Any]], timings: list[F.ScenarioTiming]) -> str:
    """First call in the process, each scenario's warm-up call, and the warm medians."""
    rows = []
    cold = d.get("cold_start_ms")
    if isinstance(cold, dict):
        rows.append(
            [
                "first call in the process (cold start, one beamlet)",
                number(cold.get("baseline")),
                number(cold.get("engine")),
                "-",
                "-",
            ]
        )
    for s, t in zip(scen, timings):
        w = s.get("warmup_ms") if isinstance(s.get("warmup_ms"), dict) else {}
        c = s.get("cold_start_ms")
        if w or isinstance(c, (int, float)):
            rows.append(
                [
                    f"{t.name}: first request (warm-up, excluded)" if w else f"{t.name}: cold start",
                    number(w.get("baseline")) if w else "-",
                    number(w.get("engine")) if w else number(c),
                    t.baseline_ms.median if t.baseline_ms else "-",
                    t.engine_ms.median if t.engine_ms else "-",
                ]
            )
    if not rows:
        return note("bench.json records no cold-start or warm-up time: cold vs warm table skipped.")
    return "<h4>Cold start vs warm (ms per beamlet)</h4>" + table(
        ["call", "plain pass", "engine", "plain pass, warm median", "engine, warm median"], rows, "compact"
    )
