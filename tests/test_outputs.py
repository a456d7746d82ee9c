"""The typed output files: ``metrics.json`` (dota evaluate), ``bench.json`` (dota bench), ``summary.json`` and
``history.json`` (dota train) read back through their readers exactly as written, and refused with one line
naming the file and the key when a key is missing or of the wrong type."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dota.bench import BENCH_VERSION, read_bench, run_benchmark
from dota.errors import DataFileError
from dota.evaluate import METRICS_VERSION, evaluate, read_metrics
from dota.train import SUMMARY_VERSION, TrainConfig, read_history, read_summary, train
from tests.test_bench import TINY_SIZES


@pytest.fixture(scope="module")
def outputs(small_h5, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """file name -> (path, what the writer returned)."""
    root = tmp_path_factory.mktemp("outputs")
    summary = train(small_h5, root / "train", TrainConfig(preset="tiny", epochs=1, batch_size=4, checkpoint_every=0,
                                                         validate_cache_beamlets=2, device="cpu"), progress=False)
    metrics = evaluate(small_h5, root / "evaluate", engine="analytic", max_beamlets=3, progress=False,
                       save_predictions=False)
    bench = run_benchmark(root / "bench", model="tiny", sizes=TINY_SIZES, scenarios=["single"], progress=False,
                          threads=1)
    return {
        "summary.json": (root / "train" / "summary.json", summary),
        "metrics.json": (root / "evaluate" / "metrics.json", metrics),
        "bench.json": (root / "bench" / "bench.json", bench),
    }


READERS = {"summary.json": read_summary, "metrics.json": read_metrics, "bench.json": read_bench}


def _same(a, b) -> None:
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # NaN-safe equality


def test_round_trip_and_the_writers_figures(outputs):
    for name, (path, written) in outputs.items():
        _same(READERS[name](path), written)
    path, summary = outputs["summary.json"]
    _same(read_history(path.parent / "history.json"), summary["history"])
    assert summary["version"] == SUMMARY_VERSION and summary["config"]["preset"] == "tiny"
    metrics = outputs["metrics.json"][1]
    assert metrics["version"] == METRICS_VERSION and metrics["voxel_mm"] == [2.0, 2.0, 2.0]
    bench = outputs["bench.json"][1]
    assert bench["version"] == BENCH_VERSION and "path_decisions" in bench
    single = bench["scenarios"][0]
    assert {"tail_check_recomputed_fraction", "plain_path_fraction", "analytic_ms", "analytic_speedup"} <= set(single)
    # the figures of dota.report.figures, under each command's own file names
    for folder, names in (("train", ["history.png"]), ("bench", ["speedup.png"]),
                          ("evaluate", ["pass_rates.png", "failures_by_depth.png", "error_vs_energy.png"])):
        for name in names:
            png = path.parent.parent / folder / name
            assert png.read_bytes()[:4] == b"\x89PNG", png


@pytest.mark.parametrize(
    ("name", "edit", "problem"),
    [
        ("metrics.json", lambda d: d["summary"].pop("by_site"), "key summary.by_site is missing"),
        ("metrics.json", lambda d: d["per_beamlet"][1].update(energy_mev="high"),
         'key per_beamlet[1].energy_mev should be a number, got "high"'),
        ("metrics.json", lambda d: d["summary"]["by_energy"].update(x={"beamlets": 1}), "key summary.by_energy.x.gamma "
         "is missing"),
        ("metrics.json", lambda d: d.update(version=2), "version 2, but this dota reads version 1"),
        ("bench.json", lambda d: d["scenarios"][0].pop("tail_rel"), "key scenarios[0].tail_rel is missing"),
        ("bench.json", lambda d: d.update(path_decisions=[]), "key path_decisions should be an object, got a list"),
        ("bench.json", lambda d: d["scenarios"][0].update(plain_path_fraction=True),
         "key scenarios[0].plain_path_fraction should be a number, got true"),
        ("summary.json", lambda d: d["config"].pop("lr"), "key config.lr is missing"),
        ("summary.json", lambda d: d["history"][0].update(val_loss=None),
         "key history[0].val_loss should be a number, got null"),
        ("summary.json", lambda d: d.pop("version"), "key version is missing (written by an older dota; write it again)"),
    ],
)
def test_a_bad_key_is_one_line_naming_file_and_key(outputs, tmp_path, name, edit, problem):
    source, _ = outputs[name]
    data = json.loads(source.read_text())
    edit(data)
    path = tmp_path / name
    path.write_text(json.dumps(data))
    with pytest.raises(DataFileError) as exc:
        READERS[name](path)
    assert str(exc.value) == f"{path}: {problem}"


def test_unreadable_files(tmp_path):
    with pytest.raises(DataFileError, match="does not exist"):
        read_metrics(tmp_path / "metrics.json")
    (tmp_path / "history.json").write_text("[{")
    with pytest.raises(DataFileError, match=r"history.json could not be read \(JSONDecodeError"):
        read_history(tmp_path / "history.json")
    (tmp_path / "history.json").write_text('{"epoch": 1}')
    with pytest.raises(DataFileError, match=r"history.json: key \(top level\) should be a list, got an object$"):
        read_history(tmp_path / "history.json")
