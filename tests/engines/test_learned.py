"""The learned engine resolves its own device; nothing imports ``dota.train`` to get one."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from dota.engines import get_engine
from dota.errors import InputError


def test_evaluate_builds_the_dota_engine_without_the_training_code() -> None:
    code = ("import sys; from dota.evaluate import make_engine; e = make_engine('dota', model='tiny', device='auto'); "
            "print(e.model.device.type in ('cpu', 'cuda'), 'dota.train' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1")).stdout
    assert out.split() == ["True", "False"]


def test_device_is_resolved_by_the_engine() -> None:
    import torch

    engine = get_engine("dota", model="tiny", device="auto", seed=1)
    assert engine.model.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(InputError, match="unknown device 'tpu'"):
        get_engine("dota", model="tiny", device="tpu")
    geometry = np.zeros((1, *engine.model.config.block_shape), np.float32)
    with_seeds, without = engine.dose(geometry, [100.0], seeds=[1]), engine.dose(geometry, [100.0])
    np.testing.assert_allclose(with_seeds, without, atol=1e-5 * float(without.max()))  # the engine's own bound


def test_no_module_takes_its_device_from_the_training_code() -> None:
    from pathlib import Path

    import dota

    src = Path(dota.__file__).parent
    offenders = [str(p.relative_to(src)) for p in src.rglob("*.py")
                 if "from dota.train import resolve_device" in p.read_text()]
    assert offenders == []


def test_plan_dose_is_the_dose_before_clipping() -> None:
    """Plans sum the model's beamlets unclipped (each beamlet clipped at zero biased a plan's dose up)."""
    from dota.engines.learned import LearnedEngine

    eng = LearnedEngine()  # the shipped model: its correction dips a little below zero around the beam
    geometry = np.zeros((2, 150, 24, 24), dtype=np.float32)  # water
    energies = np.array([100.0, 130.0], dtype=np.float32)
    signed, clipped = eng.plan_dose(geometry, energies), eng.dose(geometry, energies)
    assert signed.min() < 0 <= clipped.min()
    np.testing.assert_array_equal(np.maximum(signed, 0), clipped)
    with pytest.raises(InputError, match="voxel size"):
        eng.plan_dose(geometry, energies, (1.0, 1.0, 1.0))


def test_other_engines_give_plans_their_dose() -> None:
    geometry = np.zeros((1, 150, 24, 24), dtype=np.float32)
    eng = get_engine("analytic")
    np.testing.assert_array_equal(eng.plan_dose(geometry, [120.0]), eng.dose(geometry, [120.0]))
