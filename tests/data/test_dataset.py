import numpy as np
import pytest
import torch

from dota.data.dataset import BeamletDataset, compute_normalization, split_indices
from dota.data.hdf5 import write_dataset
from dota.errors import DataFileError
from tests.conftest import TEST_ATTRS, synthetic_beamlets


def test_normalization_from_training_split(small_h5):
    train_idx, val_idx = split_indices(24, 0.25, seed=0)
    assert len(val_idx) == 6 and not set(train_idx) & set(val_idx)
    norm = compute_normalization(small_h5, train_idx)
    ds = BeamletDataset(small_h5, norm, train_idx)
    maxes = [float(ds.raw(i)[2].max()) for i in range(len(ds))]
    assert norm.dose_max == pytest.approx(max(maxes))
    energies = [ds.raw(i)[1] for i in range(len(ds))]
    assert norm.energy_range_mev == (np.floor(min(energies)), np.ceil(max(energies)))
    g, e, d = ds[0]
    assert g.shape == d.shape == (150, 24, 24) and 0 <= float(g.min()) and float(g.max()) <= 1
    assert 0 <= float(e) <= 1 and float(d.max()) <= 1 + 1e-6


def test_augmentation_rotates_geometry_and_dose_together_reproducibly(tmp_path):
    g, e, d = synthetic_beamlets(8)
    rng = np.random.default_rng(0)
    g = (g + rng.integers(-50, 50, g.shape)).astype(np.int16)  # no lateral symmetry left
    d = d * rng.uniform(0.5, 1.0, d.shape).astype(np.float32)
    path = write_dataset(tmp_path / "asym.h5", g, d, e, attrs=TEST_ATTRS)
    norm = compute_normalization(path)
    plain = BeamletDataset(path, norm)
    aug = BeamletDataset(path, norm, augment=True, flips=True, seed=3)
    seen = set()
    for epoch in range(8):
        aug.set_epoch(epoch)
        g, _, d = aug[5]
        g0, _, d0 = plain[5]
        match = [
            (k, f) for k in range(4) for f in (False, True)
            if torch.equal(_t(g0, k, f), g) and torch.equal(_t(d0, k, f), d)
        ]
        assert match, "geometry and dose must get the same rotation/flip"
        seen.add(match[0])
        aug.set_epoch(epoch)
        assert torch.equal(aug[5][0], g), "same (seed, epoch, index) gives the same transform"
    assert len(seen) > 1


def test_flips_without_rotations_never_swap_rows_and_columns(tmp_path):
    """The beam model's spot differs along rows and columns: flips alone keep each axis's width, and all four
    row/column flips occur."""
    g, e, d = synthetic_beamlets(8)
    rng = np.random.default_rng(1)
    g = (g + rng.integers(-50, 50, g.shape)).astype(np.int16)
    d = d * rng.uniform(0.5, 1.0, d.shape).astype(np.float32)
    path = write_dataset(tmp_path / "asym.h5", g, d, e, attrs=TEST_ATTRS)
    norm = compute_normalization(path)
    plain = BeamletDataset(path, norm)
    flipped = BeamletDataset(path, norm, augment=False, flips=True, seed=3)
    g0, _, d0 = plain[2]
    seen = set()
    for epoch in range(16):
        flipped.set_epoch(epoch)
        g1, _, d1 = flipped[2]
        match = [dims for dims in ((), (1,), (2,), (1, 2))
                 if torch.equal(torch.flip(g0, dims) if dims else g0, g1) and torch.equal(torch.flip(d0, dims) if dims else d0, d1)]
        assert match, "geometry and dose must get the same flips, and no rotation"
        seen.add(match[0])
    assert seen == {(), (1,), (2,), (1, 2)}


def _t(x, k, flip):
    x = torch.rot90(x, k, dims=(1, 2))
    return torch.flip(x, dims=(2,)) if flip else x


def test_dataset_is_picklable_for_workers(small_h5):
    norm = compute_normalization(small_h5)
    ds = BeamletDataset(small_h5, norm)
    ds[0]
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    g, e, d = next(iter(loader))
    assert g.shape == (4, 150, 24, 24)


def test_errors(small_h5, tmp_path):
    norm = compute_normalization(small_h5)
    with pytest.raises(DataFileError, match="out of range"):
        BeamletDataset(small_h5, norm, indices=[0, 99])
    with pytest.raises(DataFileError, match="at least 2"):
        split_indices(1)


def test_normalization_uses_the_generated_energy_range(tmp_path):
    from dota.generate import generate_dataset

    path = generate_dataset(tmp_path / "g.h5", engine="analytic", n_beamlets=3, energy_range_mev=(70, 220),
                            phantom="water", seed=0, progress=False)
    norm = compute_normalization(path)
    assert norm.energy_range_mev == (70.0, 220.0)
