import subprocess
import sys

import pytest

import dota
from dota.cli import build_parser, main

COMMANDS = ["train", "evaluate", "predict", "demo", "generate", "bench", "report", "view"]


def test_public_api_resolves():
    for name in dota.__all__:
        assert getattr(dota, name) is not None, name


def test_every_command_has_help(capsys):
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    missing = [c for c in COMMANDS if c not in sub.choices]
    assert not missing, f"commands missing from the CLI: {missing}"
    for name in sub.choices:
        with pytest.raises(SystemExit) as exc:
            main([name, "--help"])
        assert exc.value.code == 0
        assert "usage: dota" in capsys.readouterr().out


def test_errors_are_one_line_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "dota.cli", "evaluate", str(tmp_path / "missing.h5"), "--out", str(tmp_path / "o"),
         "--engine", "analytic"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "does not exist" in proc.stderr


def test_predict_with_wrong_model_is_a_clear_error(small_h5, tmp_path, capsys):
    bad = tmp_path / "model.safetensors"
    bad.write_text("not a model")
    assert main(["predict", str(small_h5), "--model", str(bad), "--out", str(tmp_path / "p.h5"), "--no-progress"]) == 2
    assert "corrupt" in capsys.readouterr().err


def test_predict_writes_shared_format(small_h5, tmp_path):
    from dota.checkpoint import load_model, save_model
    from dota.data import read_dataset

    model = load_model("tiny", seed=0)
    model.normalization.energy_range_mev = (60.0, 230.0)
    ckpt = save_model(model, tmp_path / "m.safetensors")
    assert main(["predict", str(small_h5), "--model", str(ckpt), "--out", str(tmp_path / "p.h5"), "--no-progress",
                 "--device", "cpu"]) == 0
    pred = read_dataset(tmp_path / "p.h5")
    assert pred.dose.shape == (24, 150, 24, 24) and pred.attrs["engine"] == "dota"
