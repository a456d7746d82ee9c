"""MCsquare's plan simulation through the engine's one run (:meth:`MCsquareEngine.simulate`), with the stand-in
binary of ``tests/engines/mcsquare_stand_in.py``: the files MCsquare gets, the CT's flips there and back, and
the conversion to Gy. No MCsquare needed (the physics is in ``test_mcsquare_plan.py``, marked ``mc``)."""

from __future__ import annotations

import numpy as np
import pytest

from dota.engines.mcsquare import EV_PER_G_TO_GY, read_mhd
from dota.errors import EngineUnavailableError
from dota.plan.geometry import ct_from_array
from dota.plan.mcsquare_plan import format_planpencil, mcsquare_plan_dose
from dota.plan.model import Beam, EnergyLayer, Plan, protons_per_mu
from tests.engines.mcsquare_stand_in import FAILING_SEED, install_stand_in, logged_seeds


def test_plan_files_flips_and_units(tmp_path, monkeypatch):
    log = install_stand_in(tmp_path, monkeypatch)
    hu = np.random.default_rng(1).uniform(-1000, 1500, (3, 4, 5)).astype(np.float32)
    ct = ct_from_array(hu, (3.0, 2.0, 1.0), origin_mm=(-2.0, -3.0, -4.0))
    plan = Plan([Beam("b", 90.0, 0.0, (0.0, 0.0, 0.0), [EnergyLayer(100.0, [(0.0, 0.0), (2.0, 1.0)], [1.0, 2.0])])],
                fractions=2)
    work = tmp_path / "work"
    dose = mcsquare_plan_dose(ct, plan, primaries=1000, seed=4, hu_calibration="water", work_dir=work)
    assert (work / "plan.txt").read_text() == format_planpencil(plan, ct)
    ct_mc, spacing = read_mhd(work / "CT.mhd")
    np.testing.assert_array_equal(ct_mc, hu[:, ::-1, ::-1])  # columns and rows reversed (module docstring)
    assert spacing == (1.0, 2.0, 3.0) and logged_seeds(log) == [4]
    gy_per_ev_g = EV_PER_G_TO_GY * 3.0 * float(protons_per_mu(100.0)) * 2
    np.testing.assert_allclose(dose, hu * gy_per_ev_g, rtol=1e-6)  # the stand-in's dose is the CT it got
    with pytest.raises(EngineUnavailableError, match=r"MCsquare failed on the plan \(exit 3\)"):
        mcsquare_plan_dose(ct, plan, seed=FAILING_SEED, hu_calibration="water")
