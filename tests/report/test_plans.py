"""Plan pages in the results report: ``dota report --plan DIR`` and a demo folder's ``plan/report/``.

The plan pages are written by ``dota dose --report`` (analytic engine, the plan tests' phantom CT and
small plan: six spot-energies, about a second each)."""

from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest

from dota.cli import main
from dota.plan.geometry import read_patient_ct
from dota.plan.planio import write_plan
from dota.plan.workflow import read_plan_summary
from dota.report import build_report, discover_inputs
from tests.plan.helpers import one_torch_thread, phantom_hu, small_plan, write_dicom_ct
from tests.report.test_report import parse

TARGET = "sphere:0,0,0,10"


@pytest.fixture(scope="module")
def plan_pages(tmp_path_factory) -> Path:
    """The layout of ``dota demo``: ``plan/report/`` (no reference) and ``plan/report-ref/`` (gamma against
    the first run's dose), both of one plan on one CT."""
    root = tmp_path_factory.mktemp("plans")
    ct = write_dicom_ct(root / "ct", phantom_hu())
    write_plan(root / "plan.json", small_plan(), read_patient_ct(ct))
    (root / "plan").mkdir()
    common = ["dose", "--ct", str(ct), "--plan", str(root / "plan.json"), "--engine", "analytic",
              "--structure", TARGET, "--no-progress"]
    with one_torch_thread():
        assert main([*common, "--out", str(root / "plan" / "dose.mhd"), "--report", str(root / "plan" / "report")]) == 0
        assert main([*common, "--reference", str(root / "plan" / "dose.mhd"),
                     "--report", str(root / "plan" / "report-ref")]) == 0
    return root


class _Tables(HTMLParser):
    """The tables of the Plans section: each a list of rows of cell texts (header row first)."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self._section = ""
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "section":
            self._section = dict(attrs).get("id", "")
        if self._section != "plans":
            return
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell))
            self._cell = None


def plan_tables(index: Path) -> list[dict[str, list[str]]]:
    """Each table of the Plans section as {first cell: the other cells of its row} ('' for the header)."""
    p = _Tables()
    p.feed(index.read_text(encoding="utf-8"))
    return [{row[0]: row[1:] for row in t} for t in p.tables]


def test_report_plan_shows_the_runs_side_by_side_and_copies_their_pages(plan_pages, tmp_path, capsys):
    page_dir, ref_dir = plan_pages / "plan" / "report", plan_pages / "plan" / "report-ref"
    plain, ref = read_plan_summary(page_dir / "run_summary.json"), read_plan_summary(ref_dir / "run_summary.json")
    assert "gamma" not in plain and ref["gamma"]["voxels_in_patient"] > 0
    out = tmp_path / "report"
    args = ["--plan", str(page_dir), "--plan", str(ref_dir / "index.html"), "--out", str(out), "--no-analytic"]
    assert main(["report", *args]) == 0
    index = out / "index.html"
    page = parse(index)
    assert "plans" in page.ids
    text = page.all_text
    assert f"dota report --plan {page_dir} --plan {ref_dir / 'index.html'} --out {out}" in text
    assert "2 plan page(s)" in text and "no plan page" not in text

    (table,) = plan_tables(index)  # one CT and plan: one table, the two runs side by side
    assert table[""] == ["analytic (report)", "analytic (report-ref)"]
    assert table["beams"] == ["2", "2"] and table["spot-energies"] == ["6", "6"]
    for n, s in enumerate((plain, ref)):
        for stage, seconds in s["timings_s"].items():
            assert table[f"time: {stage} (s)"][n] == f"{seconds:.3f}"
        assert table["total time (s)"][n] == f"{sum(s['timings_s'].values()):.3f}"
        (stats,) = s["dvh"].values()
        assert table["sphere_10mm: D95 / mean (Gy)"][n] == f"{stats['D95_gy']:.3f} / {stats['mean_gy']:.3f}"
    g = ref["gamma"]
    assert table["gamma against the reference"] == ["no reference given", "2%/2mm, 10% cutoff"]
    assert table["gamma pass rate"] == ["-", f"{g['pass_rate_percent']:.2f} % of {g['voxels']:,} voxels"]
    assert table["gamma pass rate inside the patient"] == [
        "-", f"{g['pass_rate_in_patient_percent']:.2f} % of {g['voxels_in_patient']:,} voxels"]
    assert g["voxels_in_patient"] < g["voxels"]  # the phantom's air around the water box is left out

    # each plan page copied into the report with its summary, and linked relative to the report
    links = [h for h in page.hrefs if not h.startswith(("#", "data:"))]
    assert links == ["plans/plan-analytic/index.html", "plans/plan-analytic-2/index.html"]
    assert table["plan page"] == links
    for link, src in zip(links, (page_dir, ref_dir)):
        copy = out / link
        assert copy.read_bytes() == (src / "index.html").read_bytes()
        assert (copy.parent / "run_summary.json").read_bytes() == (src / "run_summary.json").read_bytes()
        html = copy.read_text()
        assert "type='range'" in html and "<script src" not in html and "http://" not in html
    assert "Gamma against the reference" in (out / links[1]).read_text()

    # the report's own folder is never an input: a copy inside it given as --plan is refused
    capsys.readouterr()
    assert main(["report", "--plan", str(out / "plans" / "plan-analytic"), "--out", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert "would overwrite the input" in err and "\n" not in err


def test_demo_layout_finds_the_plan_pages_and_a_rebuild_drops_stale_copies(plan_pages, tmp_path):
    inputs = discover_inputs(plan_pages)  # plan/report/ and plan/report-ref/, two levels down
    assert [r.path for r in inputs.plans] == [plan_pages / "plan" / "report", plan_pages / "plan" / "report-ref"]
    assert inputs.notes == []
    out = tmp_path / "report"
    build_report(plan_pages, out, analytic=False)
    assert sorted(p.name for p in (out / "plans").iterdir()) == ["plan-analytic", "plan-analytic-2"]
    index = build_report(None, out, plan=plan_pages / "plan" / "report-ref", analytic=False)
    assert [p.name for p in (out / "plans").iterdir()] == ["plan-analytic"]
    (table,) = plan_tables(index)
    assert table[""] == ["analytic"] and table["plan page"] == ["plans/plan-analytic/index.html"]
    assert (out / "plans" / "plan-analytic" / "index.html").read_bytes() == (
        plan_pages / "plan" / "report-ref" / "index.html").read_bytes()


def _plan_folder(src: Path, folder: Path, **changes) -> Path:
    """A copy of the plan page folder ``src`` whose summary has ``changes``."""
    shutil.copytree(src, folder)
    s = json.loads((folder / "run_summary.json").read_text())
    s.update(changes)
    (folder / "run_summary.json").write_text(json.dumps(s))
    return folder


def test_engines_of_one_plan_share_a_table_other_plans_get_their_own(plan_pages, tmp_path):
    ref = plan_pages / "plan" / "report-ref"
    timings = read_plan_summary(ref / "run_summary.json")["timings_s"]
    mc = {"read": 0.5, "mcsquare": 60.0, "write": 0.1, "dvh": 0.01, "gamma": 0.2, "report": 0.4}
    folders = [
        _plan_folder(ref, tmp_path / "dota", engine="dota"),
        plan_pages / "plan" / "report",
        _plan_folder(ref, tmp_path / "mc", engine="mcsquare-plan", timings_s=mc),
        _plan_folder(ref, tmp_path / "other", plan=str(tmp_path / "other_plan.dcm")),
    ]
    index = build_report(None, tmp_path / "report", plan=folders, analytic=False)
    same, other = plan_tables(index)
    assert same[""] == ["dota", "analytic", "mcsquare-plan"] and other[""] == ["analytic"]
    stages = [k.removeprefix("time: ").removesuffix(" (s)") for k in same if k.startswith("time: ")]
    assert stages[0] == "read" and stages.index("mcsquare") == 1 and stages[-3:] == ["dvh", "gamma", "report"]
    assert set(stages) == set(timings) | set(mc)
    assert same["time: mcsquare (s)"] == ["-", "-", "60.000"] and same["total time (s)"][2] == f"{sum(mc.values()):.3f}"
    assert same["gamma against the reference"][1] == "no reference given"
    text = parse(index).all_text
    assert "plan.json on ct" in text and "other_plan.dcm on ct" in text
    assert sorted(p.name for p in (tmp_path / "report" / "plans").iterdir()) == [
        "other_plan-analytic", "plan-analytic", "plan-dota", "plan-mcsquare-plan"]


def test_bad_plan_inputs_are_one_line_notes(plan_pages, tmp_path):
    src = plan_pages / "plan" / "report"
    no_page = tmp_path / "no-page"
    no_page.mkdir()
    shutil.copy(src / "run_summary.json", no_page)
    no_summary = tmp_path / "no-summary"
    no_summary.mkdir()
    shutil.copy(src / "index.html", no_summary)
    corrupt = _plan_folder(src, tmp_path / "corrupt")
    (corrupt / "run_summary.json").write_text('{"version": 1, "engine": ')
    no_engine = _plan_folder(src, tmp_path / "no-engine")
    s = json.loads((no_engine / "run_summary.json").read_text())
    del s["engine"]
    (no_engine / "run_summary.json").write_text(json.dumps(s))
    bad_gamma = _plan_folder(plan_pages / "plan" / "report-ref", tmp_path / "bad-gamma")
    s = json.loads((bad_gamma / "run_summary.json").read_text())
    s["gamma"]["voxels_in_patient"] = "many"
    (bad_gamma / "run_summary.json").write_text(json.dumps(s))
    missing = tmp_path / "missing"

    folders = [missing, no_page, no_summary, corrupt, no_engine, bad_gamma]
    inputs = discover_inputs(plan=folders)
    assert inputs.plans == []
    expected = [
        f"--plan folder {missing} does not exist; skipped",
        f"plan page folder {no_page} has no index.html; skipped",
        f"plan page folder {no_summary} has no run_summary.json; skipped",
        f"{corrupt / 'run_summary.json'} could not be read (JSONDecodeError: ",
        f"{no_engine / 'run_summary.json'}: key engine is missing; skipped",
        f"{bad_gamma / 'run_summary.json'}: key gamma.voxels_in_patient should be an integer, got \"many\"; skipped",
    ]
    assert len(inputs.notes) == len(expected)
    for note, line in zip(inputs.notes, expected):
        assert note.startswith(line) and note.endswith("; skipped") and "\n" not in note, note

    out = tmp_path / "report"
    text = parse(build_report(None, out, plan=folders, analytic=False)).all_text
    for note in inputs.notes:
        assert note in text
    assert "no plan page (index.html with run_summary.json) given" in text and not (out / "plans").exists()
