import json

import pytest

from dota.demo import run_demo


@pytest.mark.slow
def test_demo_end_to_end_small(tmp_path, capsys):
    """The demo's whole path (generate, train, evaluate, report) at a tiny size; rerunning reuses it."""
    out = run_demo(tmp_path / "demo", minutes=2, progress=False, train_beamlets=20, test_beamlets=3, epochs=1)
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["gamma"]["1%/3mm"]["n"] == 3
    for path in ("data/train.h5", "data/test.h5", "train/best.safetensors", "evaluate/metrics.json",
                 "evaluate/predictions.h5", "report/index.html"):
        assert (out / path).is_file(), path
    printed = capsys.readouterr().out
    assert "report:" in printed and "index.html" in printed
    run_demo(out, minutes=2, progress=False, train_beamlets=20, test_beamlets=3, epochs=1)
    assert "reusing" in capsys.readouterr().out
