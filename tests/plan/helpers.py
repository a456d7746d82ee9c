"""Builders of the plan tests' fixtures: DICOM CT series (pydicom), phantoms and small plans."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from dota.plan.model import Beam, EnergyLayer, Plan

CT_UID_ROOT = "1.2.826.0.1.3680043.8.498."


def write_dicom_ct(folder: Path, hu: np.ndarray, spacing_zyx=(2.5, 3.0, 3.0), origin_xyz=(-70.5, -60.0, -30.0),
                   patient_position: str = "HFS", slope: float = 1.0, intercept: float = -1024.0) -> Path:
    """A CT series, one file per slice, axial HFS orientation, stored as uint16 (HU = slope * v + intercept)."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(CT_UID_ROOT), generate_uid(CT_UID_ROOT), generate_uid(CT_UID_ROOT)
    nz, ny, nx = hu.shape
    stored = np.rint((hu - intercept) / slope).astype(np.uint16)
    order = np.random.default_rng(0).permutation(nz)  # files not in slice order
    for n, k in enumerate(order):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = generate_uid(CT_UID_ROOT)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = "CT"
        ds.PatientName = "Phantom^Test"
        ds.PatientID = "PT001"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientPosition = patient_position
        ds.InstanceNumber = int(k) + 1
        ds.ImagePositionPatient = [origin_xyz[0], origin_xyz[1], origin_xyz[2] + k * spacing_zyx[0]]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [spacing_zyx[1], spacing_zyx[2]]
        ds.SliceThickness = spacing_zyx[0]
        ds.Rows, ds.Columns = ny, nx
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.PixelData = stored[k].tobytes()
        pydicom.dcmwrite(folder / f"slice_{n:03d}.dcm", ds, enforce_file_format=True)
    return folder


def phantom_hu(shape=(24, 40, 40)) -> np.ndarray:
    """Water box in air with a bone insert (HU)."""
    hu = np.full(shape, -1000.0, np.float32)
    hu[2:-2, 4:-4, 4:-4] = 0.0
    hu[8:16, 10:18, 25:30] = 700.0
    return hu


def small_plan(iso=(0.0, 0.0, 0.0)) -> Plan:
    layers_a = [EnergyLayer(100.0, [[0.0, 0.0], [6.0, 0.0], [0.0, 6.0]], [0.5, 0.25, 0.125]),
                EnergyLayer(110.5, [[0.0, 0.0], [-6.0, -6.0]], [1.0, 0.75])]
    layers_b = [EnergyLayer(95.0, [[2.0, 4.0]], [2.0])]
    return Plan([Beam("B1", 0.0, 0.0, iso, layers_a), Beam("B2", 90.0, 10.0, iso, layers_b)], fractions=3, name="test")


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """One torch thread inside the block. torch's OpenMP pool at 2 threads slows the numpy-based analytic
    engine 4-7x on this shared 2-core machine, and module-scoped fixtures run before per-test fixtures."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
