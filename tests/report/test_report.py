import base64
import json
import shutil
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from dota.bench import read_bench
from dota.cli import main
from dota.constants import PAPER_GAMMA_PASS_DOTA, PAPER_GAMMA_PASS_PENCIL_BEAM
from dota.errors import InputError
from dota.evaluate import read_metrics
from dota.report import build_report, discover_inputs, find_report, serve_report, view_report
from dota.report.dose import choose_beamlets, load_views, slice_data
from dota.report.figures import batch_curves, scenario_timing
from dota.report.inputs import Evaluation, resolve_reference
from dota.report.page import Page


class _Page(HTMLParser):
    """Collects what the tests check: image sources, links, scripts, slicers, section ids, text."""

    def __init__(self) -> None:
        super().__init__()
        self.imgs, self.hrefs, self.script_srcs, self.slicers, self.ids = [], [], [], [], []
        self.notes, self.text = [], []
        self._in_note = False
        self._json = None
        self._in_json = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a.get("src"))
        if tag in ("a", "link") and "href" in a:
            self.hrefs.append(a["href"])
        if tag == "script":
            if "src" in a:
                self.script_srcs.append(a["src"])
            self._in_json = a.get("id") == "dota-slices"
        if "class" in a and "slicer" in a["class"].split():
            self.slicers.append(a.get("data-key"))
        if "id" in a:
            self.ids.append(a["id"])

    def handle_data(self, data):
        if self._in_json:
            self._json = (self._json or "") + data
        self.text.append(data)

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_json = False

    @property
    def all_text(self) -> str:
        return " ".join(self.text)

    @property
    def slices(self) -> dict:
        return json.loads(self._json)


def parse(index: Path) -> _Page:
    p = _Page()
    p.feed(index.read_text(encoding="utf-8"))
    return p


def test_report_from_demo_folder_is_complete_and_offline(built_report, demo_dir):
    index = built_report
    assert index.name == "index.html" and index.is_file()
    page = parse(index)
    for sid in ("overview", "dose", "accuracy", "speed", "training", "provenance"):
        assert sid in page.ids
    # every image resolves to a PNG in the report folder; nothing is fetched from elsewhere
    assert len(page.imgs) >= 12
    for src in page.imgs:
        path = index.parent / src
        assert path.resolve().is_relative_to(index.parent.resolve()), src
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", src
    assert page.script_srcs == []
    assert all(h.startswith(("#", "data:")) for h in page.hrefs), page.hrefs
    # worst, median and best of the 3 evaluated beamlets, each with a slider and its data
    assert [k.split("-")[0] for k in page.slicers] == ["worst", "median", "best"]
    data = page.slices
    for key in page.slicers:
        b = data["beamlets"][key]
        size = int(np.prod(b["shape"]))
        for arr in ("ct", "ref", "pred", "diff", "gamma"):
            assert len(base64.b64decode(b[arr])) == size, (key, arr)
        assert len(b["slice_pass"]) == b["shape"][0]
    assert {len(base64.b64decode(v)) for v in data["luts"].values()} == {768}
    text = page.all_text
    assert str(PAPER_GAMMA_PASS_DOTA) in text and str(PAPER_GAMMA_PASS_PENCIL_BEAM) in text
    bench = read_bench(demo_dir / "bench" / "bench.json")
    sweep = bench["scenarios"][0]
    assert sweep["name"] == "energy_sweep" and f"{sweep['speedup']:.2f}x" in text
    assert "first call in the process" in text and bench["machine"]["cpu"] in text
    assert "slack min / p10 / median / max (mm)" in text and "Engine path per kind of request" in text
    assert "beamlets the tail check recomputed" in text and "analytic pencil beam ms per beamlet" in text
    assert f"{sweep['analytic_speedup']:.2f}x" in text
    # rebuilt training command: the data and settings recorded in summary.json
    assert f"dota train {demo_dir / 'data' / 'train.h5'}" in text and "--preset tiny" in text
    metrics = read_metrics(demo_dir / "evaluate" / "metrics.json")
    assert metrics["provenance"]["command"] in text
    assert set(metrics["summary"]["by_site"]) == {"phantom", "head_neck"}
    assert "By site and by energy band" in text and "head_neck" in text
    assert next(iter(metrics["summary"]["by_energy"])) in text
    assert "dota report DEMO --no-analytic" in text
    assert "no training run" not in text and "no benchmark" not in text
    names = {Path(s).name for s in page.imgs}
    assert {
        "accuracy_gamma_hist.png",
        "accuracy_failures_by_depth.png",
        "speed_0_batch.png",
        "speed_0_memory.png",
        "training_0.png",
    } <= names


def test_missing_inputs_are_notes_not_errors(demo_dir, tmp_path):
    index = build_report(None, tmp_path / "empty")
    text = parse(index).all_text
    for what in ("no evaluation", "no benchmark", "no training run"):
        assert what in text
    assert parse(index).imgs == []

    index = build_report(tmp_path / "does-not-exist", tmp_path / "r1", train=tmp_path / "nope")
    text = parse(index).all_text
    assert "does-not-exist does not exist" in text and "nope does not exist" in text

    # only an evaluation whose predictions are gone and whose reference moved: accuracy still shown
    ev = tmp_path / "ev"
    shutil.copytree(demo_dir / "evaluate", ev)
    (ev / "predictions.h5").unlink()
    metrics = json.loads((ev / "metrics.json").read_text())
    metrics["reference"] = str(tmp_path / "moved.h5")
    (ev / "metrics.json").write_text(json.dumps(metrics))
    (tmp_path / "tr").mkdir()
    (tmp_path / "tr" / "history.json").write_text("{not json")
    index = build_report(None, tmp_path / "r2", evaluate=ev, train=tmp_path / "tr")
    page = parse(index)
    assert "no predictions.h5" in page.all_text and "could not be read" in page.all_text
    assert page.slicers == []
    assert "accuracy_gamma_hist.png" in {Path(s).name for s in page.imgs}


def test_rebuild_removes_stale_images(built_report, demo_dir, tmp_path):
    out = tmp_path / "r"
    shutil.copytree(built_report.parent, out)
    index = build_report(None, out, train=demo_dir / "train")
    assert (
        {p.name for p in (out / "img").glob("*.png")} == {Path(s).name for s in parse(index).imgs} == {"training_0.png"}
    )


def test_choose_beamlets_worst_median_best_and_ties(tmp_path):
    rows = [
        {"index": i, "pass_rate_percent": {"1%/3mm": r}, "relative_error_percent": e}
        for i, (r, e) in enumerate([(100.0, 0.5), (90.0, 1.0), (100.0, 0.1), (95.0, 0.2), (90.0, 2.0)])
    ]
    ev = Evaluation(tmp_path, {"per_beamlet": rows, "criteria": ["1%/3mm"]})
    picks = choose_beamlets(ev, "1%/3mm")
    assert [(t, i) for t, i, _ in picks] == [("worst", 4), ("median", 3), ("best", 2)]
    one = Evaluation(tmp_path, {"per_beamlet": rows[:1]})
    assert [(t, i) for t, i, _ in choose_beamlets(one, "1%/3mm")] == [("worst", 0)]


def one_beamlet_evaluation(demo_dir: Path, folder: Path, engine: str | None = None) -> Path:
    """A copy of the demo evaluation that lists only its worst beamlet (one gamma map to compute)."""
    shutil.copytree(demo_dir / "evaluate", folder)
    m = json.loads((folder / "metrics.json").read_text())
    m["per_beamlet"] = sorted(m["per_beamlet"], key=lambda r: r["pass_rate_percent"]["1%/3mm"])[:1]
    if engine:
        m["engine"] = engine
    (folder / "metrics.json").write_text(json.dumps(m))
    return folder


def test_slice_data_quantisation(demo_dir, tmp_path):
    inputs = discover_inputs(one_beamlet_evaluation(demo_dir, tmp_path / "evaluate"))
    views, primary = load_views(inputs, Page(tmp_path), analytic=False)
    assert primary.engine == "dota" and len(views) == 1
    v = views[0]
    d = slice_data(v)
    l, h, w = d["shape"]
    ref = np.frombuffer(base64.b64decode(d["ref"]), np.uint8).reshape(l, h, w)[:, ::-1, :]
    assert ref.max() == 255
    np.testing.assert_allclose(ref / 255.0, np.clip(v.reference / v.dose_max, 0, 1), atol=0.5 / 255 + 1e-6)
    gamma = np.frombuffer(base64.b64decode(d["gamma"]), np.uint8).reshape(l, h, w)[:, ::-1, :]
    assert ((gamma == 0) == ~(np.nan_to_num(v.gamma) > 0)).all()
    rates = {r["index"]: r["pass_rate_percent"]["1%/3mm"] for r in primary.rows}
    assert v.pass_rate_percent == pytest.approx(rates[v.index], abs=1e-6)  # gamma recomputed as evaluate did


def test_other_engines_in_profiles(demo_dir, tmp_path, monkeypatch):
    one_beamlet_evaluation(demo_dir, tmp_path / "evaluate_analytic", engine="analytic")
    main_eval = one_beamlet_evaluation(demo_dir, tmp_path / "evaluate")
    views, primary = load_views(discover_inputs(tmp_path), Page(tmp_path), analytic=True)
    assert primary.path == main_eval and len(views) == 1
    assert list(views[0].others) == ["analytic"]
    np.testing.assert_array_equal(views[0].others["analytic"], views[0].prediction)  # same predictions file

    import dota.engines.base as base

    class Broken:
        def dose(self, *a):
            raise RuntimeError("boom")

    monkeypatch.setattr(base, "get_engine", lambda name, **kw: Broken())
    page = Page(tmp_path)
    views, _ = load_views(discover_inputs(main_eval), page, analytic=True)
    assert views and all(not v.others for v in views)
    assert any("analytic dose" in n and "boom" in n for n in page.notes)


def test_bench_figures_inputs_and_a_bad_file(demo_dir, tmp_path):
    bench = read_bench(demo_dir / "bench" / "bench.json")
    sweep, batch = bench["scenarios"]
    t = scenario_timing(sweep)
    assert t.name == "energy_sweep" and t.speedup == sweep["speedup"]
    assert t.speedup_range == (
        sweep["baseline_ms"]["p10"] / sweep["engine_ms"]["p90"],
        sweep["baseline_ms"]["p90"] / sweep["engine_ms"]["p10"],
    )
    curves = batch_curves(bench["scenarios"])
    assert list(curves) == ["batch"] and [p[0] for p in curves["batch"]] == [1, 3]
    assert curves["batch"][0][2].median == batch["batch_curve"][0]["engine_ms"]["median"]

    # a bench.json that does not match the schema: the reader's one line becomes a note
    (tmp_path / "bench").mkdir()
    del bench["scenarios"][0]["warmup_ms"]
    (tmp_path / "bench" / "bench.json").write_text(json.dumps(bench))
    index = build_report(tmp_path / "bench", tmp_path / "report")
    text = parse(index).all_text
    assert f"{tmp_path / 'bench' / 'bench.json'}: key scenarios[0].warmup_ms is missing; skipped" in text
    assert "no benchmark" in text


def test_resolve_reference_demo_layout(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "test.h5").write_bytes(b"")
    ev = tmp_path / "evaluate"
    ev.mkdir()
    assert resolve_reference("elsewhere/data/test.h5", ev) == tmp_path / "data" / "test.h5"
    assert resolve_reference("missing.h5", ev) is None


def test_cli_report_and_view(demo_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "cli-report"
    ev = demo_dir / "evaluate"
    (tmp_path / "ev").mkdir()
    shutil.copy(ev / "metrics.json", tmp_path / "ev")  # no predictions: no dose maps, a quick report
    args = ["--train", str(demo_dir / "train"), "--evaluate", str(tmp_path / "ev"), "--out", str(out), "--worst-k", "2"]
    assert main(["report", *args]) == 0
    assert str((out / "index.html").resolve()) in capsys.readouterr().out
    text = parse(out / "index.html").all_text
    assert "dota report " + " ".join(args) in text
    assert "Worst 2 beamlets" in text

    assert find_report(out) == out / "index.html"
    assert find_report(out / "index.html") == out / "index.html"
    with pytest.raises(InputError, match="no report"):
        find_report(tmp_path / "nothing")
    server, url = serve_report(out)
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert resp.status == 200 and b"dota-slices" in resp.read()
        with urllib.request.urlopen(url.replace("index.html", "img/training_0.png"), timeout=10) as resp:
            assert resp.read()[:4] == b"\x89PNG"
    finally:
        server.shutdown()
        server.server_close()

    opened = []
    monkeypatch.setattr("webbrowser.open", lambda u: opened.append(u) or True)
    view_report(out)
    assert opened == [(out / "index.html").resolve().as_uri()]
    assert main(["view", str(tmp_path / "nothing")]) == 2
    assert "no report" in capsys.readouterr().err
