import json

import pytest

from dota.demo import golden_set_path, run_demo


@pytest.mark.slow
def test_demo_runs_the_shipped_model_and_a_plan_and_resumes(tmp_path, capsys):
    """The demo's whole path: the default model and the analytic engine against the shipped Monte Carlo
    beamlets, a phantom plan made and recomputed with the default model, the report; rerunning reuses
    the plan."""
    out = run_demo(tmp_path / "demo", progress=False)
    summary = json.loads((out / "demo_summary.json").read_text())
    assert golden_set_path().is_file()
    for engine in ("dota", "analytic"):
        assert summary["beamlets"][engine]["gamma"]["1%/3mm"]["n"] >= 4
    plan = summary["plan"]
    assert plan["spot_energies"] > 50
    assert 1.7 < plan["target_d95_gy"] <= 2.05  # 2 Gy prescribed to the target
    for path in ("evaluate-dota/metrics.json", "evaluate-analytic/metrics.json", "plan/plan.dcm", "plan/dose.dcm",
                 "plan/dvh.csv", "plan/report/index.html", "report/index.html"):
        assert (out / path).is_file(), path
    printed = capsys.readouterr().out
    assert "report:" in printed and "index.html" in printed
    run_demo(out, progress=False)
    assert "reusing the plan" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_training_part_at_a_tiny_size(tmp_path):
    out = run_demo(tmp_path / "demo", train_minutes=1, progress=False, train_beamlets=20, test_beamlets=3, epochs=1)
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["beamlets"]["trained"]["gamma"]["1%/3mm"]["n"] == 3
    for path in ("data/train.h5", "data/test.h5", "train/best.safetensors", "evaluate/metrics.json"):
        assert (out / path).is_file(), path
