import json

import numpy as np
import pytest

from dota.errors import InputError
from dota.evaluation import (
    distal_range_mm,
    failures_by_depth,
    range_error_mm,
    relative_error_percent,
    summarize,
)


def block_with_depth_curve(curve, shape=(4, 3)):
    """A dose block whose integrated depth dose is ``curve`` (spread evenly over the lateral voxels)."""
    curve = np.asarray(curve, dtype=np.float64)
    return np.broadcast_to(curve[:, None, None] / (shape[0] * shape[1]), (curve.size, *shape)).copy()


def test_relative_error_is_mean_over_the_block_over_the_maximum():
    ref = np.zeros((10, 4, 4))
    ref[2:5, 1:3, 1:3] = 10.0
    pred = ref.copy()
    pred[3, 1, 1] += 8.0  # one voxel off by 8 among 160: mean abs error 0.05, 0.5 % of the maximum 10
    assert relative_error_percent(ref, pred) == pytest.approx(0.5)
    batch = relative_error_percent(np.stack([ref, ref]), np.stack([pred, ref + 1.0]))
    np.testing.assert_allclose(batch, [0.5, 10.0])
    assert isinstance(relative_error_percent(ref, ref), float)


@pytest.mark.parametrize(
    "ref, pred",
    [
        (np.ones((5, 3, 3)), np.ones((5, 3, 4))),
        (np.ones((5, 3, 3)), np.full((5, 3, 3), np.nan)),
        (np.zeros((5, 3, 3)), np.ones((5, 3, 3))),
        (np.ones((3, 3)), np.ones((3, 3))),
    ],
)
def test_relative_error_bad_input(ref, pred):
    with pytest.raises(InputError):
        relative_error_percent(ref, pred)


def test_distal_range_interpolates_r80_between_voxel_centres():
    dose = block_with_depth_curve([0.5, 0.7, 1.0, 0.9, 0.6, 0.2, 0.0, 0.0])
    # 80 % of the peak is crossed between voxel 3 (0.9) and 4 (0.6), a third of the way: centre 3.5 + 1/3
    assert distal_range_mm(dose, 2.0) == pytest.approx((3 + 1 / 3 + 0.5) * 2.0)
    assert distal_range_mm(dose, 2.0, level=0.5) == pytest.approx((4 + 0.25 + 0.5) * 2.0)
    assert np.isnan(distal_range_mm(block_with_depth_curve([0.2, 0.5, 1.0, 0.95]), 2.0))
    assert np.isnan(distal_range_mm(np.zeros((6, 2, 2))))


def test_range_error_of_a_deeper_beam():
    curve = np.array([0.3, 0.35, 0.4, 0.5, 0.7, 1.0, 0.6, 0.1, 0.0, 0.0, 0.0, 0.0])
    ref = block_with_depth_curve(curve)
    pred = block_with_depth_curve(np.concatenate([[0.3, 0.3], curve[:-2]]))
    assert range_error_mm(ref, pred, 2.0) == pytest.approx(4.0)
    assert range_error_mm(pred, ref, 2.0) == pytest.approx(-4.0)
    batch = range_error_mm(np.stack([ref, ref]), np.stack([pred, ref]), 2.0)
    np.testing.assert_allclose(batch, [4.0, 0.0], atol=1e-12)
    with pytest.raises(InputError):
        range_error_mm(ref, pred[:-1])


def test_failures_by_depth_rate_and_share():
    gamma = np.zeros((2, 4, 2, 2))
    gamma[0, 0] = 0.5  # depth 0: 8 evaluated, 2 failing
    gamma[1, 0] = [[1.5, 0.2], [2.0, 0.3]]
    gamma[0, 1, 0, 0] = 1.2  # depth 1: one evaluated voxel, failing
    gamma[1, 2, 0, 0] = np.nan  # depth 2: nothing evaluated; depth 3: all zero
    rate = failures_by_depth(gamma)
    np.testing.assert_allclose(rate, [2 / 8, 1.0, np.nan, np.nan])
    np.testing.assert_allclose(failures_by_depth(gamma, share=True), [2 / 3, 1 / 3, 0, 0])
    np.testing.assert_allclose(failures_by_depth(gamma[0]), [0.0, 1.0, np.nan, np.nan])
    np.testing.assert_array_equal(failures_by_depth(np.zeros((3, 2, 2)), share=True), np.zeros(3))
    with pytest.raises(InputError):
        failures_by_depth(np.zeros((3, 3)))


def test_summarize_is_json_ready():
    rates = np.array([99.0, 100.0, 97.0, np.nan, 98.0])
    s = summarize(rates)
    assert s["n"] == 4 and s["n_nan"] == 1
    assert s["mean"] == pytest.approx(98.5)
    assert s["std"] == pytest.approx(np.std([99, 100, 97, 98], ddof=1))
    assert (s["min"], s["max"], s["p50"]) == (97.0, 100.0, 98.5)
    assert json.loads(json.dumps(s)) == s
    assert summarize([5.0])["std"] == 0.0
    empty = summarize([])
    assert empty["n"] == 0 and empty["mean"] is None
    json.dumps(empty)
    with pytest.raises(InputError):
        summarize([1.0, np.inf])
