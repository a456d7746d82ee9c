import json
import os
import subprocess
import sys
from pathlib import Path

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


def test_resume_with_more_epochs_extends_the_run_bit_identically(small_h5, tmp_path):
    train(small_h5, tmp_path / "full", TrainConfig(**CFG), progress=False)
    train(small_h5, tmp_path / "ext", TrainConfig(**{**CFG, "epochs": 1}), progress=False)
    train(small_h5, tmp_path / "ext", {"epochs": 2}, resume=True, progress=False)
    a = load_file(str(tmp_path / "full" / "last.safetensors"))
    b = load_file(str(tmp_path / "ext" / "last.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    hb = json.loads((tmp_path / "ext" / "history.json").read_text())
    assert [h["epoch"] for h in hb] == [1, 2]
    with pytest.raises(InputError, match="--epochs 2"):  # fewer epochs than the run has would drop some
        train(small_h5, tmp_path / "ext", {"epochs": 1}, resume=True, progress=False)


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


def test_training_loss_integral_term_counts_shared_error_not_noise():
    from dota.train import INTEGRAL_GRIDS, training_loss

    target = torch.rand(2, 5, 24, 24)
    assert float(training_loss(target, target, 1.0)) == 0.0
    pred = target + 0.01  # one bias over every voxel: each cell's n voxels count it n times
    n_cells = sum(24 * 24 / (r * c) for r, c in INTEGRAL_GRIDS)
    assert float(training_loss(pred, target)) == pytest.approx(1e-4, rel=1e-4)
    assert float(training_loss(pred, target, 0.5)) == pytest.approx(1e-4 * (1 + 0.5 * n_cells), rel=1e-4)
    # independent noise: the term expects the noise variance, as the voxel MSE does
    gen = torch.Generator().manual_seed(0)
    noise = 0.01 * torch.randn(64, 10, 24, 24, generator=gen)
    extra = float(training_loss(target.new_zeros(noise.shape), noise, 1.0)) - float(training_loss(noise * 0, noise))
    assert extra == pytest.approx(len(INTEGRAL_GRIDS) * 1e-4, rel=0.1)
    # an error that sums to zero over every cell adds nothing
    checker = 0.01 * (torch.arange(24)[:, None] + torch.arange(24)[None, :]).remainder(2).mul(2).sub(1).float()
    flat = checker.expand(1, 1, 24, 24)
    assert float(training_loss(flat, flat * 0, 3.0)) == pytest.approx(float(training_loss(flat, flat * 0)), rel=1e-6)


def test_training_loss_ring_term_scores_the_radial_profile():
    from dota.train import RING_EDGES_VOXELS, _ring_means, training_loss

    means, counts = _ring_means(24, 24)
    assert counts.tolist() == [4, 8, 20, 20, 28, 32, 96, 108, 192, 68]  # every voxel in one ring
    assert len(counts) == len(RING_EDGES_VOXELS) - 1 and float(counts.sum()) == 24 * 24
    target = torch.rand(2, 5, 24, 24)
    assert float(training_loss(target, target, ring_weight=1.0)) == 0.0
    # a profile too wide by one sign all round each ring: the term counts it n times per ring
    y, x = torch.meshgrid(torch.arange(24.0), torch.arange(24.0), indexing="ij")
    r2 = (y - 11.5) ** 2 + (x - 11.5) ** 2
    wide = torch.exp(-r2 / (2 * 3.1**2)) - torch.exp(-r2 / (2 * 3.0**2))
    err = wide.expand(1, 1, 24, 24)
    mse = float(training_loss(err, err * 0))
    ring_means = means @ wide.flatten()
    expected = float((ring_means.pow(2) * counts).mean())
    assert float(training_loss(err, err * 0, ring_weight=2.0)) == pytest.approx(mse + 2 * expected, rel=1e-5)
    assert expected > 5 * mse  # the shared error weighs more than in the voxel MSE
    # independent noise: the term expects the noise variance, as the voxel MSE does
    gen = torch.Generator().manual_seed(0)
    noise = 0.01 * torch.randn(64, 10, 24, 24, generator=gen)
    extra = float(training_loss(noise * 0, noise, ring_weight=1.0)) - float(training_loss(noise * 0, noise))
    assert extra == pytest.approx(1e-4, rel=0.1)
    # an error odd in x sums to zero over every ring: nothing added
    odd = (x - 11.5).sign() * torch.rand(24, 24, generator=gen)
    odd = (odd - odd.flip(-1)).expand(1, 1, 24, 24) / 2
    assert float(training_loss(odd, odd * 0, ring_weight=3.0)) == pytest.approx(float(training_loss(odd, odd * 0)),
                                                                               rel=1e-5)


def test_weight_average_is_saved_and_resumes_bit_identically(small_h5, tmp_path):
    cfg = {**CFG, "ema": 0.9, "ring_weight": 0.5}
    run = train(small_h5, tmp_path / "ema", TrainConfig(**cfg), progress=False)
    assert run["history"][-1]["val_mse"] > 0
    state = torch.load(tmp_path / "ema" / "state.pt", weights_only=True)
    saved = load_file(tmp_path / "ema" / "last.safetensors")
    avg, raw = state["ema"]["model"], state["model"]
    assert state["ema"]["steps"] == 2 * (run["train_beamlets"] // CFG["batch_size"])
    differs = [k for k in raw if raw[k].is_floating_point() and not torch.equal(raw[k], avg[k])]
    assert differs  # the average is not the last weights...
    for k in differs:  # ...and it is what the checkpoint holds
        assert torch.equal(saved[k], avg[k]), k

    def crash(epoch, step):
        if epoch == 1 and step == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(small_h5, tmp_path / "cut", TrainConfig(**cfg), progress=False, on_step=crash)
    resumed = train(small_h5, tmp_path / "cut", resume=True, progress=False)
    assert [h["val_loss"] for h in resumed["history"]] == [h["val_loss"] for h in run["history"]]
    again = load_file(tmp_path / "cut" / "last.safetensors")
    assert all(torch.equal(again[k], saved[k]) for k in saved)
    with pytest.raises(InputError, match="ema"):
        TrainConfig(**{**CFG, "ema": 1.0}).check()


def test_fine_tuning_starts_from_the_checkpoint_and_keeps_its_model(small_h5, tmp_path):
    first = train(small_h5, tmp_path / "a", TrainConfig(**{**CFG, "epochs": 1}), progress=False)
    init = first["best_checkpoint"]
    base = load_model(init)
    with pytest.raises(InputError, match="--init or --preset"):
        train(small_h5, tmp_path / "b", TrainConfig(**{**CFG, "init": init}), progress=False)
    cfg = {k: v for k, v in CFG.items() if k != "preset"}
    with pytest.raises(DataFileError, match="does not exist"):
        train(small_h5, tmp_path / "c", TrainConfig(**cfg, init=str(tmp_path / "none.safetensors")), progress=False)
    # a learning rate too small to move the weights: the run ends where the checkpoint began
    tuned = train(small_h5, tmp_path / "d", TrainConfig(**{**cfg, "epochs": 1, "lr": 1e-12}, init=init,
                                                      integral_weight=0.5), progress=False)
    model = load_model(tmp_path / "d" / "last.safetensors")
    assert model.config == base.config
    assert model.normalization.to_dict() == base.normalization.to_dict()
    for (k, a), b in zip(base.state_dict().items(), model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k
    record = tuned["history"][0]
    assert record["val_loss"] > record["val_mse"] > 0  # the objective holds the integral term beside the MSE
    # interrupted and resumed, a fine-tuning run needs its state only (the checkpoint may be gone)
    def crash(epoch, step):
        if step == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(small_h5, tmp_path / "e", TrainConfig(**cfg, init=init, integral_weight=0.5), progress=False,
              on_step=crash)
    full = train(small_h5, tmp_path / "f", TrainConfig(**cfg, init=init, integral_weight=0.5), progress=False)
    Path(init).rename(tmp_path / "moved.safetensors")
    resumed = train(small_h5, tmp_path / "e", resume=True, progress=False)
    assert [h["val_loss"] for h in resumed["history"]] == [h["val_loss"] for h in full["history"]]


def test_init_takes_a_checkpoint_not_a_preset(small_h5, tmp_path):
    cfg = {k: v for k, v in CFG.items() if k != "preset"}
    with pytest.raises(InputError, match="--init takes a checkpoint file"):
        train(small_h5, tmp_path / "p", TrainConfig(**cfg, init="tiny"), progress=False)
