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
