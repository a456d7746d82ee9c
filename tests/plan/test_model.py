from __future__ import annotations

import numpy as np
import pytest

from dota.errors import InputError

from .helpers import small_plan


def test_subset_keeps_the_masked_spots_in_order_and_drops_empty_layers_and_beams():
    plan = small_plan()  # beam B1: layers of 3 and 2 spots; beam B2: one layer of 1 spot
    keep = np.array([True, False, True, False, False, False])
    sub = plan.subset(keep)
    np.testing.assert_array_equal(sub.spot_weights(), plan.spot_weights()[keep])
    assert [b.name for b in sub.beams] == ["B1"]
    assert [la.energy_mev for la in sub.beams[0].layers] == [100.0]
    np.testing.assert_array_equal(sub.beams[0].layers[0].positions_mm, [[0.0, 0.0], [0.0, 6.0]])
    assert (sub.fractions, sub.name) == (plan.fractions, plan.name)
    assert plan.subset(np.ones(plan.n_spots, bool)).spot_weights().tolist() == plan.spot_weights().tolist()
    with pytest.raises(InputError, match="a mask of 5 for a plan of 6 spot-energies"):
        plan.subset(keep[:5])
