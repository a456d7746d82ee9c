"""The shipped default model: it loads offline, runs through every entry point without --model, and
keeps its measured accuracy on the Monte Carlo beamlets shipped with it (regression test).

Thresholds were taken from the measurement when the model was shipped (see the model card,
``dota/resources/models/default.md``) with a small allowance for float rounding across machines; they
must not be loosened to make a new model pass: a new model ships with its own measurement.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import dota
from dota.checkpoint import DEFAULT_MODEL, default_model_path
from dota.data.hdf5 import read_dataset
from dota.demo import golden_set_path
from dota.evaluation.gamma import paper_gamma
from dota.evaluation.metrics import relative_error_percent
from dota.inference import InferenceEngine

RECORD = json.loads((default_model_path().parent / "default.json").read_text())
#: Measured on the shipped golden set when the model was shipped (default.json, "golden").
GOLDEN = RECORD["golden"]


def test_default_model_loads_offline_with_its_card():
    model = dota.load_model()
    assert model.config == dota.load_model(DEFAULT_MODEL).config
    assert default_model_path().stat().st_size < 60e6
    card = (default_model_path().parent / "default.md").read_text()
    assert "Not for clinical use" in card or "not for clinical use" in card.lower()
    assert model.checkpoint_info["extra"]["model_card"] == "default.md"


def test_default_model_keeps_its_accuracy_on_the_golden_monte_carlo_set():
    data = read_dataset(golden_set_path())
    dose = dota.get_engine("dota").dose(data.geometry, data.energy)
    gamma = [paper_gamma(data.dose[i], dose[i]).pass_rate_percent for i in range(len(data.energy))]
    rel = [relative_error_percent(data.dose[i], dose[i]) for i in range(len(data.energy))]
    assert np.mean(gamma) >= GOLDEN["dota_gamma_mean"] - 0.05
    assert np.min(gamma) >= GOLDEN["dota_gamma_min"] - 0.1
    assert np.mean(rel) <= GOLDEN["dota_relative_error_mean"] + 0.005


def test_predict_and_evaluate_use_the_default_model_without_model(tmp_path: Path):
    golden = golden_set_path()
    out = tmp_path / "dose.h5"
    proc = subprocess.run([sys.executable, "-m", "dota.cli", "predict", str(golden), "--out", str(out),
                           "--no-progress"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    pred = read_dataset(out)
    assert pred.dose.shape == read_dataset(golden).dose.shape and np.isfinite(pred.dose).all()
    proc = subprocess.run([sys.executable, "-m", "dota.cli", "evaluate", str(golden), "--engine", "dota",
                           "--out", str(tmp_path / "eval"), "--no-progress", "--no-predictions"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["model"] is None and metrics["summary"]["beamlets"] == len(pred.energy)


def test_default_model_fast_paths_equal_its_plain_pass():
    data = read_dataset(golden_set_path())
    model = dota.load_model()
    check = InferenceEngine(model).compare_with_full_pass(data.geometry, data.energy)
    assert check["max_abs_diff_rel"] <= 1e-5


@pytest.mark.slow
def test_bf16_error_of_the_default_model_is_what_the_card_says():
    data = read_dataset(golden_set_path())
    model = dota.load_model()
    fp32 = InferenceEngine(model, path="engine").predict(data.geometry, data.energy)
    bf16 = InferenceEngine(model, path="engine", precision="bf16").predict(data.geometry, data.energy)
    worst = max(float(np.abs(bf16[i] - fp32[i]).max() / fp32[i].max()) for i in range(len(data.energy)))
    assert worst <= 2 * RECORD["bf16"]["max_abs_diff_rel"] + 1e-3  # bf16 is opt-in and not exact
