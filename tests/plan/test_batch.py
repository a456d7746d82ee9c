"""Plan dose for several (CT, plan) jobs on Ray, locally with 2 workers."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from dota.plan.batch import map_plan_doses
from dota.plan.dose import compute_plan_dose
from dota.plan.geometry import read_patient_ct
from dota.plan.planio import write_plan
from dota.engines import get_engine
from dota.errors import InputError

from .helpers import small_plan


@pytest.mark.slow
def test_ray_batch_matches_serial(tmp_path, dicom_ct):
    pytest.importorskip("ray")
    ct = read_patient_ct(dicom_ct)
    plans = []
    for i, iso in enumerate([(-10.0, 0.0, 0.0), (0.0, 5.0, 2.0), (-20.0, -5.0, 0.0)]):
        plans.append(write_plan(tmp_path / f"p{i}.json", small_plan(iso)))
    jobs = [{"ct": str(dicom_ct), "plan": str(p), "out": str(tmp_path / f"d{i}.mhd")} for i, p in enumerate(plans)]
    summaries = map_plan_doses(jobs, workers=2, engine="analytic")
    assert [s["plan"] for s in summaries] == [str(p) for p in plans]
    for i, p in enumerate(plans):
        from dota.plan.planio import read_plan

        serial = compute_plan_dose(ct, read_plan(p), get_engine("analytic")).dose_gy
        got = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"d{i}.mhd")))
        np.testing.assert_allclose(got, serial, rtol=1e-5, atol=1e-7 * serial.max())


def test_batch_refuses_bad_jobs():
    with pytest.raises(InputError, match="no plan jobs"):
        map_plan_doses([])
    with pytest.raises(InputError, match="needs 'ct' and 'plan'"):
        map_plan_doses([{"ct": "x"}])
