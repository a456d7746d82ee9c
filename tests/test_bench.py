import json

import pytest

from dota.bench import SCENARIOS, Sizes, run_benchmark
from dota.errors import InputError

TINY_SIZES = Sizes(
    single=2, sweep_repeats=1, plan_spots=2, plan_layers=(3, 4), prefix_groups=1, prefix_variants=2,
    prefix_shared_slices=64, prefix_rounds=2, batch_sizes=(1, 3), batch_beamlets=3, batch_rounds=1,
)


def test_bench_writes_json_plots_and_summary(tmp_path):
    report = run_benchmark(tmp_path, model="tiny", sizes=TINY_SIZES, progress=False, threads=1)
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data == report
    assert {"machine", "model", "scenarios", "cold_start_ms"} <= set(data)
    assert data["machine"]["torch_threads"] == 1 and data["machine"]["cpu"]
    assert [s["name"] for s in data["scenarios"]] == list(SCENARIOS)
    for s in data["scenarios"]:
        for key in ("baseline_ms", "engine_ms"):
            assert s[key]["p10"] <= s[key]["median"] <= s[key]["p90"]
        assert s["speedup"] > 0
        assert s["max_abs_diff_rel"] <= 1e-5, s["name"]
        assert 0 < s["computed_fraction"] <= 1
        assert s["peak_rss_bytes"] > 0
    assert data["scenarios"][0]["kernels_only_ms"]["median"] > 0
    plan = data["scenarios"][2]
    assert plan["beamlets"] >= 6 and plan["margins"]["analytic_tail_rel_max"] <= 1e-6
    prefix = data["scenarios"][3]
    assert prefix["cache_stats"]["prefix_cache"]["hits"] > 0
    assert [p["batch_size"] for p in data["scenarios"][4]["batch_curve"]] == [1, 3]
    for name in ("speedup.png", "batch.png", "bench.md"):
        assert (tmp_path / name).stat().st_size > 0
    md = (tmp_path / "bench.md").read_text()
    assert "energy_sweep" in md and "Truncation margin" in md


def test_bench_refuses_unknown_scenarios(tmp_path):
    with pytest.raises(InputError, match="unknown benchmark scenarios"):
        run_benchmark(tmp_path, model="tiny", scenarios=["warp"], progress=False)


def test_omp_wait_policy_only_before_torch(monkeypatch):
    from dota.bench import set_omp_wait_policy

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    assert set_omp_wait_policy("default")
    assert not set_omp_wait_policy("passive")  # torch is loaded in this process: too late
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert set_omp_wait_policy("passive")  # already in force
    with pytest.raises(InputError, match="wait policy"):
        set_omp_wait_policy("sometimes")


def test_cli_bench(tmp_path, capsys):
    from dota.cli import main

    out = tmp_path / "bench"
    assert main(["bench", "--model", "tiny", "--quick", "--scenarios", "single", "--out", str(out),
                 "--threads", "1", "--no-progress"]) == 0
    assert "speedup" in capsys.readouterr().out
    data = json.loads((out / "bench.json").read_text())
    assert data["command"].startswith("dota bench --out") and "--quick" in data["command"]
    assert [s["name"] for s in data["scenarios"]] == ["single"]
    assert main(["bench", "--model", "tiny", "--scenarios", "nope", "--out", str(out), "--no-progress"]) == 2
