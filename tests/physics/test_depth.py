import numpy as np
import pytest

from dota.engines.analytic import AnalyticEngine
from dota.errors import InputError
from dota.physics import (
    beam_extent_wed_mm,
    hu_to_rsp,
    make_phantom,
    stopping_depth_index,
    water_equivalent_depth_mm,
)


def test_wed_in_water_is_depth():
    g = np.zeros((150, 4, 5), np.int16)
    wed = water_equivalent_depth_mm(g)
    expected = (np.arange(150) + 0.5) * 2.0
    np.testing.assert_allclose(wed, np.broadcast_to(expected[:, None, None], g.shape))
    wed4 = water_equivalent_depth_mm(np.zeros((3, 20, 2, 2)), voxel_mm=(1.0, 2.0, 2.0))
    assert wed4.shape == (3, 20, 2, 2)
    np.testing.assert_allclose(wed4[2, :, 1, 0], np.arange(20) + 0.5)


def test_wed_through_a_bone_column():
    g = np.zeros((50, 3, 3), np.float32)
    g[10:20, 1, 1] = 1200.0
    wed = water_equivalent_depth_mm(g)
    extra = wed[30, 1, 1] - wed[30, 0, 0]
    assert extra == pytest.approx(10 * 2.0 * (hu_to_rsp(1200.0) - 1.0))
    assert wed[5, 1, 1] == wed[5, 0, 0]


def test_wed_bad_input():
    with pytest.raises(InputError):
        water_equivalent_depth_mm(np.full((5, 2, 2), np.nan))
    with pytest.raises(InputError):
        water_equivalent_depth_mm(np.zeros((5, 2)))
    with pytest.raises(InputError):
        water_equivalent_depth_mm(np.zeros((5, 2, 2)), voxel_mm=(0, 2, 2))


def test_stopping_index_in_water():
    e = np.array([70.0, 150.0, 225.0])
    s = stopping_depth_index(np.zeros((3, 150, 24, 24)), e, margin_mm=0.0)
    limit = beam_extent_wed_mm(e)
    # first slice whose entrance is at or beyond the extent
    np.testing.assert_array_equal(s, np.minimum(np.ceil(limit / 2.0).astype(int), 150))
    assert s[2] == 150
    assert np.all(stopping_depth_index(np.zeros((3, 150, 24, 24)), e) >= s)


def test_stopping_index_uses_the_least_stopping_column():
    g = np.full((1, 150, 24, 24), 1500.0, np.float32)
    base = stopping_depth_index(g, [150.0])[0]
    g[0, :, 0, 23] = -1000.0  # one air channel at the corner of the block
    assert stopping_depth_index(g, [150.0])[0] == 150 > base


def _extreme_blocks():
    rng = np.random.default_rng(7)
    blocks = []
    b = np.zeros((150, 24, 24), np.float32)
    b[5:25] = 1500.0  # thick cortical bone
    blocks.append(b)
    b = np.full((150, 24, 24), -750.0, np.float32)  # all lung
    b[:10] = 40.0
    blocks.append(b)
    b = np.zeros((150, 24, 24), np.float32)
    b[10:40, :, 12:] = -1000.0  # air gap beside the axis
    b[40:60, :12] = 1400.0  # bone on the other half
    blocks.append(b)
    b = np.zeros((150, 24, 24), np.float32)
    b[:, 10:14, 10:14] = -1000.0  # air channel along the axis
    blocks.append(b)
    for kind in ("heterogeneous", "lung", "bone", "heterogeneous"):
        blocks.append(make_phantom(kind, rng))
    return np.stack(blocks)


@pytest.mark.parametrize("margin_mm", [0.0, 5.0])
def test_stopping_index_never_cuts_analytic_dose(margin_mm):
    g = _extreme_blocks()
    n = len(g)
    engine = AnalyticEngine()
    for energies in (np.full(n, 70.0), np.linspace(90, 200, n)):
        dose = engine.dose(g, energies)
        s = stopping_depth_index(g, energies, margin_mm=margin_mm)
        for i in range(n):
            assert dose[i, s[i]:].max(initial=0.0) <= 1e-6 * dose[i].max(), (i, energies[i], s[i])
        assert np.any(s < 150)


def test_stopping_index_bad_input():
    with pytest.raises(InputError):
        stopping_depth_index(np.zeros((150, 4, 4)), 100.0, margin_mm=-1.0)
    with pytest.raises(InputError):
        stopping_depth_index(np.zeros((2, 150, 4, 4)), [100.0])
    with pytest.raises(InputError):
        stopping_depth_index(np.zeros((150, 4, 4)), np.nan)
