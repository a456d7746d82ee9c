"""Dose grids on disk: DICOM RTDOSE, MetaImage (.mhd/.mha), NRRD and NIfTI, all in DICOM patient
coordinates (mm) with the CT's grid, and dose in Gy.

RTDOSE: unsigned 32-bit pixels times ``DoseGridScaling`` (chosen so the maximum uses the full range:
relative rounding below 2.4e-10 of the maximum), ``DoseUnits`` GY, ``DoseType`` PHYSICAL,
``DoseSummationType`` PLAN, the CT's ``FrameOfReferenceUID``, study and patient, ``PatientPosition``
as the CT's, ``ImagePositionPatient``/``ImageOrientationPatient`` from the CT grid and
``GridFrameOffsetVector`` the slice offsets along the slice normal.

Every file is written atomically (:func:`dota.fileio.atomic_write`): a reader never sees half a dose, and
an existing file is replaced only once the new one is complete. :func:`dose_files` names the files a dose
output becomes, for :func:`dota.fileio.check_output` before any work.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from dota.errors import DataFileError, InputError
from dota.fileio import atomic_write
from dota.plan.geometry import PatientCT, _is_itk_file, read_itk_image

RT_DOSE_STORAGE = "1.2.840.10008.5.1.4.1.1.481.2"
#: Image files whose header names a data file beside it (SimpleITK writes ``<stem>.raw`` uncompressed).
_DETACHED_HEADERS = (".mhd", ".nhdr")


def dose_files(path: str | os.PathLike) -> list[Path]:
    """The files :func:`write_dose` writes for ``path``: ``path``, and for a MetaImage ``.mhd`` or NRRD
    ``.nhdr`` header the data file it names, ``<stem>.raw``; :class:`~dota.errors.InputError` for a suffix
    it cannot write. For checking the outputs before any work."""
    path = Path(path)
    if path.suffix.lower() == ".dcm":
        return [path]
    if _is_itk_file(path):
        return [path, path.with_suffix(".raw")] if path.name.lower().endswith(_DETACHED_HEADERS) else [path]
    raise InputError(f"{path}: choose .dcm (RTDOSE), .mhd, .mha, .nrrd, .nii or .nii.gz for a dose")


def write_by_name(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """For writers that choose the format, or add files, by the file's name (SimpleITK, numpy's ``.npz``):
    ``write(scratch)`` writes ``scratch`` (named as ``path``) in a temporary folder beside ``path``; every
    file it made is then moved into place with :func:`dota.fileio.atomic_write`, ``path`` itself last (a
    header after the data file it names). The folder is removed, also on error."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataFileError(f"cannot write {path}: {exc.strerror or exc}") from None
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp") as scratch:
        write(Path(scratch) / path.name)
        for made in sorted(Path(scratch).iterdir(), key=lambda p: p.name == path.name):
            atomic_write(path.parent / made.name, lambda t, made=made: os.replace(made, t))
    return path


def write_dose(path: str | os.PathLike, dose_gy: np.ndarray, ct: PatientCT, plan: Any = None) -> Path:
    """Write a dose on ``ct``'s grid by suffix: ``.dcm`` RTDOSE, or an image SimpleITK writes
    (``.mhd``, ``.mha``, ``.nrrd``, ``.nii``, ``.nii.gz``)."""
    path = Path(path)
    dose = np.asarray(dose_gy)
    if tuple(dose.shape) != ct.shape:
        raise InputError(f"dose shape {dose.shape} differs from the CT grid {ct.shape}")
    if not np.all(np.isfinite(dose)):
        raise InputError("the dose holds NaN or inf")
    dose_files(path)  # the suffix
    if path.suffix.lower() == ".dcm":
        return write_rtdose(path, dose, ct, plan)
    return write_itk_image(path, dose.astype(np.float32), ct)


def write_itk_image(path: str | os.PathLike, array_zyx: np.ndarray, ct: PatientCT) -> Path:
    """Write a (z, y, x) array on ``ct``'s grid (spacing, origin and direction kept) with SimpleITK
    (atomically, :func:`write_by_name`)."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(array_zyx))
    sz, sy, sx = ct.spacing_mm
    img.SetSpacing((float(sx), float(sy), float(sz)))
    img.SetOrigin(tuple(float(v) for v in ct.origin_mm))
    img.SetDirection(tuple(float(v) for v in ct.direction.reshape(-1)))
    path = Path(path)
    compress = path.name.lower().endswith((".mha", ".nrrd", ".nii.gz"))
    return write_by_name(path, lambda scratch: sitk.WriteImage(img, str(scratch), useCompression=compress))


def write_rtdose(path: str | os.PathLike, dose_gy: np.ndarray, ct: PatientCT, plan: Any = None) -> Path:
    """A DICOM RTDOSE of ``dose_gy`` (z, y, x, Gy) on ``ct``'s grid; see the module docstring."""
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as Seq

    from dota.plan.planio import RT_ION_PLAN_STORAGE, _ds, new_dicom_instance

    dose = np.asarray(dose_gy, dtype=np.float64)
    if dose.min() < 0:
        raise InputError(f"RTDOSE cannot hold negative dose (minimum {dose.min():g} Gy)")
    ds = new_dicom_instance(RT_DOSE_STORAGE, "RTDOSE", ct)
    ds.ContentDate, ds.ContentTime = ds.InstanceCreationDate, ds.InstanceCreationTime
    ds.InstanceNumber = 1
    ds.PositionReferenceIndicator = ""
    ds.PatientPosition = ct.patient_position
    nz, ny, nx = ct.shape
    sz, sy, sx = ct.spacing_mm
    ds.ImagePositionPatient = [_ds(v) for v in ct.origin_mm]
    ds.ImageOrientationPatient = [_ds(v) for v in np.concatenate([ct.direction[:, 0], ct.direction[:, 1]])]
    ds.PixelSpacing = [_ds(sy), _ds(sx)]
    ds.SliceThickness = _ds(sz)
    normal = np.cross(ct.direction[:, 0], ct.direction[:, 1])
    sign = float(np.sign(np.dot(normal, ct.direction[:, 2])))
    ds.GridFrameOffsetVector = [_ds(sign * k * sz) for k in range(nz)]
    ds.FrameIncrementPointer = pydicom.tag.Tag(0x3004, 0x000C)
    ds.NumberOfFrames = nz
    ds.Rows, ds.Columns = ny, nx
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 32
    ds.HighBit = 31
    ds.PixelRepresentation = 0
    ds.DoseUnits = "GY"
    ds.DoseType = "PHYSICAL"
    ds.DoseSummationType = "PLAN"
    top = float(dose.max())
    scaling = top / 4294967295.0 if top > 0 else 1.0
    ds.DoseGridScaling = _ds(scaling)
    pixels = np.rint(dose / scaling).clip(0, 4294967295).astype("<u4")
    ds.PixelData = pixels.tobytes()
    uid = getattr(plan, "info", {}).get("SOPInstanceUID") if plan is not None else None
    if uid:
        ref = Dataset()
        ref.ReferencedSOPClassUID = RT_ION_PLAN_STORAGE
        ref.ReferencedSOPInstanceUID = uid
        ds.ReferencedRTPlanSequence = Seq([ref])
    path = Path(path)
    atomic_write(path, lambda t: pydicom.dcmwrite(t, ds, enforce_file_format=True))
    return path


def read_rtdose(path: str | os.PathLike) -> tuple[np.ndarray, PatientCT]:
    """An RTDOSE: ``(dose (z, y, x) Gy float64, its grid as a PatientCT with hu set to zeros)``."""
    import pydicom

    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # pydicom raises many types for non-DICOM files
        raise DataFileError(f"cannot read RTDOSE {path}: {exc}") from None
    if str(getattr(ds, "Modality", "")) != "RTDOSE":
        raise DataFileError(f"{path} is not an RTDOSE (modality {getattr(ds, 'Modality', '?')})")
    pix = ds.pixel_array.astype(np.float64)
    if pix.ndim == 2:
        pix = pix[None]
    dose = pix * float(getattr(ds, "DoseGridScaling", 1.0))
    orient = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
    normal = np.cross(orient[:3], orient[3:])
    offsets = np.asarray(getattr(ds, "GridFrameOffsetVector", [0.0]), dtype=np.float64)
    if len(offsets) > 1:
        steps = np.diff(offsets)
        if np.ptp(steps) > 1e-3 * max(1e-9, abs(float(np.median(steps)))):
            raise DataFileError(f"{path}: unevenly spaced dose frames are not supported")
        step = float(np.median(steps))
    else:
        step = float(getattr(ds, "SliceThickness", 1.0) or 1.0)
    direction = np.stack([orient[:3], orient[3:], normal * np.sign(step)], axis=1)
    origin = np.asarray(ds.ImagePositionPatient, dtype=np.float64) + offsets[0] * normal
    row_mm, col_mm = (float(v) for v in ds.PixelSpacing)
    grid = PatientCT(hu=np.zeros(dose.shape, np.float32), spacing_mm=(abs(step), row_mm, col_mm),
                     origin_mm=tuple(origin), direction=direction, name=Path(path).name,
                     info={"FrameOfReferenceUID": str(getattr(ds, "FrameOfReferenceUID", ""))})
    return dose, grid


def read_dose(path: str | os.PathLike) -> tuple[np.ndarray, PatientCT]:
    """A dose grid (Gy) from RTDOSE (``.dcm``) or an image file (.mhd, .mha, .nrrd, .nii, .nii.gz)."""
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"no dose at {path}")
    if _is_itk_file(path):
        arr, spacing, origin, direction = read_itk_image(path)
        grid = PatientCT(hu=np.zeros(arr.shape, np.float32), spacing_mm=spacing, origin_mm=origin,
                         direction=direction, name=path.name)
        return arr.astype(np.float64), grid
    return read_rtdose(path)


def resample_to_ct(values: np.ndarray, grid: PatientCT, ct: PatientCT, order: int = 1) -> np.ndarray:
    """``values`` on ``grid`` resampled onto ``ct``'s voxel centres (trilinear for ``order`` 1, nearest for 0),
    zero outside ``grid``."""
    if grid.same_grid(ct):
        return np.asarray(values, dtype=np.float64)
    a_ct, a_g = ct.affine(), grid.affine()
    m = np.linalg.inv(a_g[:3, :3]) @ a_ct[:3, :3]
    b = np.linalg.inv(a_g[:3, :3]) @ (a_ct[:3, 3] - a_g[:3, 3])
    out = ndimage.affine_transform(np.asarray(values, dtype=np.float64), m, offset=b, output_shape=ct.shape,
                                   order=order, mode="grid-constant", cval=0.0, prefilter=False)
    return out
