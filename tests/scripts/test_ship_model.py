"""scripts/ship_model.py: what the model card says of fine-tuning stages, from the run folders kept."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ship():
    spec = importlib.util.spec_from_file_location("ship_model", ROOT / "scripts" / "ship_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


HISTORY = [{"epoch": 1, "val_loss": 2.0e-5, "seconds": 1800.0}, {"epoch": 2, "val_loss": 1.5e-5, "seconds": 1800.0},
           {"epoch": 3, "val_loss": 1.6e-5, "seconds": 1800.0}]
CONFIG = {"init": "checkpoints/a/best.safetensors", "optimizer": "adamw", "lr": 5e-4, "lr_halving_epochs": 1,
          "ema": 0.999, "augment": False, "flips": True, "integral_weight": 0.0, "ring_weight": 0.0}


def test_fine_tuning_from_summary(ship, tmp_path):
    cmd = "dota train a.h5 b.h5 --init checkpoints/a/best.safetensors --no-augment --flips"
    (tmp_path / "summary.json").write_text(json.dumps({"command": cmd, "config": CONFIG, "history": HISTORY,
                                                       "epochs_done": 3, "data": ["a.h5", "b.h5"]}))
    ft = ship._fine_tuning(tmp_path)
    assert (ft["best_epoch"], ft["best_val_loss"], ft["data"]) == (2, 1.5e-5, ["a.h5", "b.h5"])
    assert ft["hours"] == pytest.approx(1.5)
    text = ship.fine_tuning_card_text(ft)
    assert f"`{cmd}`: 3 epochs (best: 2)" in text
    assert "row and column flips, no 90-degree rotations" in text and "EMA 0.999" in text
    assert "lateral-integral" not in text  # no such term in this loss


def test_fine_tuning_from_kept_history(ship, tmp_path):
    (tmp_path / "history.json").write_text(json.dumps(HISTORY))
    (tmp_path / "train_config.json").write_text(json.dumps({**CONFIG, "augment": True, "flips": False,
                                                            "integral_weight": 0.5}))
    ft = ship._fine_tuning(tmp_path)
    assert ft["epochs_done"] == 3 and ft["command"] is None
    text = ship.fine_tuning_card_text(ft)
    assert "--init checkpoints/a/best.safetensors --optimizer adamw --lr 0.0005" in text and "recorded settings" in text
    assert "augmentation: 90-degree rotations," in text and "0.5 x the lateral-integral term" in text
    import torch  # a run stopped before its end: its resumable state names its data and settings

    torch.save({"train_config": {**CONFIG, "lr": 2.5e-4}, "data": ["data/mc/a.h5", "data/mc/b.h5"],
                "val_data": "data/mc/v.h5", "model": {}}, tmp_path / "state.pt")
    ft = ship._fine_tuning(tmp_path)
    text = ship.fine_tuning_card_text(ft)
    assert "--lr 0.00025" in text and "on `a.h5`, `b.h5` (validation `v.h5`)" in text
    assert "row and column flips, no 90-degree rotations" in text


def test_fine_tuning_refuses_what_is_not_one(ship, tmp_path):
    with pytest.raises(SystemExit, match="summary.json or history.json"):
        ship._fine_tuning(tmp_path)
    (tmp_path / "history.json").write_text(json.dumps(HISTORY))
    (tmp_path / "train_config.json").write_text(json.dumps({**CONFIG, "init": None}))
    with pytest.raises(SystemExit, match="no --init"):
        ship._fine_tuning(tmp_path)
    (tmp_path / "history.json").write_text("[]")
    with pytest.raises(SystemExit, match="no finished epoch"):
        ship._fine_tuning(tmp_path)


def test_the_shipped_file_records_its_data_engines(ship):
    """The shipped weights say which engine made their training data, so that a copy of them loaded by its own
    path still gets the plans' MCsquare block corrections (found: a copy lost them; its plan passed 88.5 %
    against 97.9 %)."""
    record = {"training": {"checkpoint_extra": {"data_engines": ["mcsquare"]}}, "data": []}
    assert ship.shipped_data_engines(record) == ["mcsquare"]
    record = {"training": {"checkpoint_extra": {}},
              "data": [{"attrs": {"engine": "mcsquare"}}, {"attrs": {"engine": "analytic"}}, {"attrs": {}}]}
    assert ship.shipped_data_engines(record) == ["analytic", "mcsquare"]
    with pytest.raises(SystemExit, match="which engine made the training data"):
        ship.shipped_data_engines({"training": {"checkpoint_extra": {}}, "data": []})
