import numpy as np
import pytest

from dota.errors import InputError
from dota.physics import MATERIAL_HU_RANGES, PHANTOM_KINDS, make_phantom


def _in_material_ranges(hu: np.ndarray) -> np.ndarray:
    ok = np.zeros(hu.shape, bool)
    for lo, hi in MATERIAL_HU_RANGES.values():
        ok |= (hu >= lo) & (hu <= hi)
    return ok


@pytest.mark.parametrize("kind", PHANTOM_KINDS)
def test_deterministic_per_seed_and_in_ranges(kind):
    for seed in range(8):
        a = make_phantom(kind, np.random.default_rng(seed))
        b = make_phantom(kind, np.random.default_rng(seed))
        assert a.dtype == np.float32 and a.shape == (150, 24, 24)
        np.testing.assert_array_equal(a, b)
        assert _in_material_ranges(a).all(), f"{kind} seed {seed}: HU outside the material ranges"


def test_water_is_water():
    assert np.all(make_phantom("water", np.random.default_rng(0)) == 0)


def test_seeds_differ_and_heterogeneous_mixes_materials():
    blocks = [make_phantom("heterogeneous", np.random.default_rng(s)) for s in range(20)]
    assert any(not np.array_equal(blocks[0], b) for b in blocks[1:])
    seen = set()
    for b in blocks:
        for name, (lo, hi) in MATERIAL_HU_RANGES.items():
            if np.any((b >= lo) & (b <= hi)):
                seen.add(name)
    assert {"lung", "fat", "bone", "air"} <= seen
    # some of them are not layered: material changes across the beam, not only along it
    assert any(np.any(b.min(axis=(1, 2)) != b.max(axis=(1, 2))) for b in blocks)


def test_slab_has_one_slab_perpendicular():
    for seed in range(10):
        b = make_phantom("slab", np.random.default_rng(seed))
        assert np.all(b == b[:, :1, :1])  # laterally uniform
        assert b[0, 0, 0] == 0 and len(np.unique(b)) <= 2


def test_lung_and_bone_kinds():
    lung = make_phantom("lung", np.random.default_rng(1))
    assert np.mean((lung >= -850) & (lung <= -650)) > 0.1
    bone = make_phantom("bone", np.random.default_rng(1))
    assert np.any(bone >= 700)


def test_other_shapes_and_voxels():
    b = make_phantom("heterogeneous", np.random.default_rng(0), shape=(40, 10, 12), voxel_mm=(1.0, 3.0, 3.0))
    assert b.shape == (40, 10, 12)


@pytest.mark.parametrize(
    "args",
    [("marble", 0, (150, 24, 24)), ("water", 0, (150, 24)), ("water", 0, (0, 24, 24)), ("water", "seed", (150, 24, 24))],
)
def test_bad_input(args):
    kind, seed, shape = args
    rng = np.random.default_rng(seed) if isinstance(seed, int) else seed
    with pytest.raises(InputError):
        make_phantom(kind, rng, shape=shape)
