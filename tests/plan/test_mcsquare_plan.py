"""MCsquare's own plan simulation agrees with the beam's-eye-view pipeline on beam sides, spot positions and
couch rotation (which fixes the frame conversion of dota.plan.mcsquare_plan), and on absolute dose."""

from __future__ import annotations

import numpy as np
import pytest

from dota.engines import get_engine
from dota.errors import InputError
from dota.plan.dose import compute_plan_dose
from dota.plan.geometry import PatientCT, ct_from_array, iec_beam_axes
from dota.plan.mcsquare_plan import dicom_to_mcsquare, mcsquare_to_dicom
from dota.plan.model import Beam, EnergyLayer, Plan

pytestmark = pytest.mark.mc


@pytest.fixture(scope="module")
def box():
    pytest.importorskip("dota.engines.mcsquare").find_mcsquare()
    hu = np.full((40, 60, 64), -1000.0, np.float32)
    hu[3:37, 5:55, 4:60] = 0.0
    return ct_from_array(hu, (3.0, 3.0, 3.0), origin_mm=(-90.0, -80.0, -40.0))  # off-centre on purpose


@pytest.fixture(scope="module")
def corner_box():
    """A box whose isocentre lies far from the CT's centre (42.5, 98.5, -26.5): a frame conversion that reverses
    an axis MCsquare does not (or misses one it does) puts the beam mirrored about the centre, 60-70 mm off."""
    pytest.importorskip("dota.engines.mcsquare").find_mcsquare()
    hu = np.full((30, 50, 56), -1000.0, np.float32)
    hu[2:28, 3:47, 3:53] = 0.0
    return ct_from_array(hu, (3.0, 3.0, 3.0), origin_mm=(-40.0, 25.0, -70.0))


def _centroid(ct, dose, level):
    m = dose > level * dose.max()
    xyz, w = ct.index_to_patient(np.argwhere(m)), dose[m]
    return (xyz * w[:, None]).sum(axis=0) / w.sum()


@pytest.mark.parametrize("gantry, couch, xy", [(0, 0, (20, 0)), (90, 0, (0, 25)), (270, 0, (10, 0)),
                                               (0, 0, (0, -15)), (90, 90, (10, 5)), (90, 30, (10, 5))])
def test_mcsquare_plan_matches_the_pipeline(box, gantry, couch, xy):
    from dota.plan.mcsquare_plan import mcsquare_plan_dose

    plan = Plan([Beam("b", gantry, couch, (5.0, -3.0, 2.0), [EnergyLayer(100.0, [xy], [1.0])])])
    ours = compute_plan_dose(box, plan, get_engine("analytic")).dose_gy
    mc = mcsquare_plan_dose(box, plan, primaries=100000, seed=3)  # (see the off-centre test on noise)
    axes = iec_beam_axes(gantry, couch)
    lateral = _centroid(box, mc, 0.1) - _centroid(box, ours, 0.1)
    assert abs(lateral @ axes.x_axis) < 1.5 and abs(lateral @ axes.y_axis) < 1.5  # mm: spot positions agree
    # along the beam the depth-dose shapes differ (Monte Carlo vs analytic): the high-dose region within 4 mm
    assert abs((_centroid(box, mc, 0.5) - _centroid(box, ours, 0.5)) @ axes.direction) < 4.0
    assert mc.max() == pytest.approx(ours.max(), rel=0.15)  # absolute dose: MU -> protons -> Gy
    assert mc.sum() == pytest.approx(ours.sum(), rel=0.15)


@pytest.mark.parametrize("gantry", [0, 90, 180, 270])
def test_mcsquare_plan_matches_the_pipeline_off_centre(corner_box, gantry):
    from dota.plan.mcsquare_plan import mcsquare_plan_dose

    iso = (77.5, 68.5, -16.5)  # the CT's centre + (35, -30, 10) mm
    plan = Plan([Beam("b", gantry, 0.0, iso, [EnergyLayer(90.0, [(5.0, 0.0)], [1.0])])])
    ours = compute_plan_dose(corner_box, plan, get_engine("analytic"), progress=False).dose_gy
    # 1e5 protons: at 1e4 the centroid of the voxels above half the (noisy) maximum moved by up to 4.1 mm
    # along the beam from one seed to the next (0.02-0.13 mm here at 1e5, on every side)
    mc = mcsquare_plan_dose(corner_box, plan, primaries=100000, seed=3)
    axes = iec_beam_axes(gantry)
    lateral = _centroid(corner_box, mc, 0.1) - _centroid(corner_box, ours, 0.1)
    assert abs(lateral @ axes.x_axis) < 1.5 and abs(lateral @ axes.y_axis) < 1.5
    assert abs((_centroid(corner_box, mc, 0.5) - _centroid(corner_box, ours, 0.5)) @ axes.direction) < 2.0


def test_frame_conversion_round_trip_and_refusals():
    ct = ct_from_array(np.zeros((4, 5, 6)), (2.0, 3.0, 1.5), origin_mm=(10.0, -4.0, 7.0))
    pts = np.array([[10.0, -4.0, 7.0], [12.5, 3.0, 9.0]])
    mc = dicom_to_mcsquare(ct, pts)
    np.testing.assert_allclose(mc[0], [0.75, 5 * 3.0 - 1.5, 1.0])  # first voxel centre: only y reversed
    last = ct.index_to_patient(np.array([3, 4, 5]))  # centre of the last voxel (k, j, i)
    np.testing.assert_allclose(dicom_to_mcsquare(ct, last), [6 * 1.5 - 0.75, 1.5, 4 * 2.0 - 1.0])
    np.testing.assert_allclose(mcsquare_to_dicom(ct, mc), pts)
    rotated = PatientCT(hu=np.zeros((4, 5, 6)), spacing_mm=(2.0, 3.0, 1.5),
                        direction=np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))
    with pytest.raises(InputError, match="axis-aligned CT"):
        dicom_to_mcsquare(rotated, pts)
