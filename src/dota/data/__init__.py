"""Beamlet data: the HDF5 format (one reader, one writer), the training dataset, CT readers."""

from dota.data.dataset import BeamletDataset, compute_normalization, split_indices
from dota.data.hdf5 import BeamletData, BeamletFile, import_original_dota, read_dataset, write_dataset

__all__ = [
    "BeamletData",
    "BeamletDataset",
    "BeamletFile",
    "compute_normalization",
    "import_original_dota",
    "read_dataset",
    "split_indices",
    "write_dataset",
]
