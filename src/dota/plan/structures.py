"""Structures (targets and organs at risk) as boolean masks on the CT grid, for DVHs and plan optimisation.

A structure is named by a *spec* string:

- ``path/to/rtstruct.dcm`` (every ROI) or ``path/to/rtstruct.dcm:PTV`` (one ROI by name): DICOM RTSTRUCT,
  closed planar contours rasterised on the CT slices they lie on (voxel centres inside the polygon,
  even-odd rule, so inner contours cut holes);
- ``mask.nii.gz`` (non-zero voxels) or ``labels.nii.gz:3`` (voxels equal to 3): a mask or label image
  (.nii, .nii.gz, .mhd, .mha, .nrrd), resampled (nearest voxel) onto the CT grid if its grid differs;
- ``pt_1_PTV70.csv``: an OpenKBP structure (sparse flat indices on the 128^3 CT grid of ``pt_1_ct.csv``);
- ``sphere:x,y,z,r``: a sphere of radius ``r`` mm centred at patient ``(x, y, z)`` mm.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dota.errors import DataFileError, InputError
from dota.plan.geometry import PatientCT, _is_itk_file, read_itk_image


@dataclass(frozen=True)
class Structure:
    """A named boolean mask on the CT grid (z, y, x)."""

    name: str
    mask: np.ndarray

    @property
    def n_voxels(self) -> int:
        return int(self.mask.sum())


def sphere_mask(ct: PatientCT, centre_mm: tuple[float, float, float], radius_mm: float) -> np.ndarray:
    """Voxels whose centres lie within ``radius_mm`` of patient point ``centre_mm``."""
    if not radius_mm > 0:
        raise InputError(f"sphere radius must be positive (mm), got {radius_mm}")
    centre = np.asarray(centre_mm, dtype=np.float64)
    cube = np.array([[a, b, c] for a in (-1, 1) for b in (-1, 1) for c in (-1, 1)], dtype=np.float64)
    kji = ct.patient_to_index(centre + radius_mm * cube)
    lo = np.maximum(np.floor(kji.min(axis=0)).astype(int), 0)
    hi = np.minimum(np.ceil(kji.max(axis=0)).astype(int) + 1, np.asarray(ct.shape))
    mask = np.zeros(ct.shape, dtype=bool)
    if np.any(hi <= lo):
        return mask
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    idx = np.indices(tuple(hi - lo)).reshape(3, -1).T + lo
    inside = np.sum((ct.index_to_patient(idx) - centre) ** 2, axis=1) <= radius_mm**2
    mask[box] = inside.reshape(tuple(hi - lo))
    return mask


def _parse_sphere(spec: str) -> tuple[tuple[float, float, float], float]:
    try:
        values = [float(v) for v in spec.split(":", 1)[1].split(",")]
    except ValueError:
        values = []
    if len(values) != 4:
        raise InputError(f"sphere spec must be sphere:x,y,z,r (mm), got {spec!r}")
    return (values[0], values[1], values[2]), values[3]


def _split_spec(spec: str) -> tuple[Path, str | None]:
    """``path[:selector]``: the selector is what follows the last ':' when the whole string is not a file."""
    if Path(spec).exists() or ":" not in spec:
        return Path(spec), None
    head, tail = spec.rsplit(":", 1)
    return Path(head), tail


def load_structures(spec: str, ct: PatientCT) -> list[Structure]:
    """The structures a spec names (see the module docstring), as masks on ``ct``'s grid."""
    if spec.startswith("sphere:"):
        centre, radius = _parse_sphere(spec)
        mask = sphere_mask(ct, centre, radius)
        if not mask.any():
            raise InputError(f"{spec}: the sphere holds no CT voxel centre")
        return [Structure(f"sphere_{radius:g}mm", mask)]
    path, selector = _split_spec(spec)
    if not path.exists():
        raise DataFileError(f"no structure file at {path}")
    name = path.name.lower()
    if name.endswith(".csv"):
        return [read_openkbp_mask(path, ct)]
    if _is_itk_file(path):
        return [read_mask_image(path, ct, selector)]
    return read_rtstruct(path, ct, selector)


def read_openkbp_mask(path: str | os.PathLike, ct: PatientCT, shape: tuple[int, int, int] = (128, 128, 128)) -> Structure:
    """An OpenKBP structure CSV (flat C-order indices of the 128^3 grid, third axis = slices), on the
    (z, y, x) grid :func:`dota.data.ct.read_openkbp_csv` gives the CT."""
    path = Path(path)
    try:
        table = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2, usecols=0)
    except (OSError, ValueError) as exc:
        raise DataFileError(f"cannot read OpenKBP structure {path}: {exc}") from None
    flat = np.zeros(int(np.prod(shape)), dtype=bool)
    idx = np.asarray(table, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= flat.size):
        raise DataFileError(f"{path}: voxel index outside a {shape} volume")
    flat[idx] = True
    mask = np.ascontiguousarray(flat.reshape(shape).transpose(2, 0, 1))
    if mask.shape != ct.shape:
        raise InputError(f"{path}: OpenKBP mask grid {mask.shape} differs from the CT's {ct.shape}")
    stem = path.stem
    parts = stem.split("_", 2)
    label = parts[2] if len(parts) == 3 and parts[0] == "pt" else stem
    return Structure(label, mask)


def read_mask_image(path: str | os.PathLike, ct: PatientCT, label: str | None = None) -> Structure:
    """A mask or label image: voxels != 0 (or == ``label``), resampled (nearest) onto the CT grid."""
    from dota.plan.doseio import resample_to_ct

    arr, spacing, origin, direction = read_itk_image(path)
    if label is not None:
        try:
            value = float(label)
        except ValueError:
            raise InputError(f"{path}: label {label!r} is not a number") from None
        mask = arr == value
    else:
        mask = arr != 0
    grid = PatientCT(hu=np.zeros(arr.shape, np.float32), spacing_mm=spacing, origin_mm=origin, direction=direction)
    if not grid.same_grid(ct):
        mask = resample_to_ct(mask.astype(np.float64), grid, ct, order=0) > 0.5
    stem = Path(path).name.split(".")[0]
    return Structure(stem if label is None else f"{stem}_{label}", np.ascontiguousarray(mask))


def _polygon_mask(points_ji: np.ndarray, shape_ji: tuple[int, int]) -> np.ndarray:
    """Pixels (j, i) of a slice whose centres lie inside a polygon given in continuous (j, i) indices."""
    from matplotlib.path import Path as MplPath

    out = np.zeros(shape_ji, dtype=bool)
    lo = np.maximum(np.floor(points_ji.min(axis=0)).astype(int), 0)
    hi = np.minimum(np.ceil(points_ji.max(axis=0)).astype(int) + 1, np.asarray(shape_ji))
    if np.any(hi <= lo):
        return out
    jj, ii = np.meshgrid(np.arange(lo[0], hi[0]), np.arange(lo[1], hi[1]), indexing="ij")
    inside = MplPath(points_ji).contains_points(np.stack([jj.ravel(), ii.ravel()], axis=1))
    out[lo[0]:hi[0], lo[1]:hi[1]] = inside.reshape(jj.shape)
    return out


def read_rtstruct(path: str | os.PathLike, ct: PatientCT, roi: str | None = None) -> list[Structure]:
    """ROIs of a DICOM RTSTRUCT rasterised on ``ct`` (all, or the one named ``roi``)."""
    import pydicom

    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # pydicom raises many types for non-DICOM files
        raise DataFileError(f"cannot read {path} as DICOM RTSTRUCT: {exc}") from None
    if "StructureSetROISequence" not in ds or "ROIContourSequence" not in ds:
        raise InputError(f"{path}: not an RTSTRUCT (no StructureSetROISequence/ROIContourSequence)")
    names = {int(r.ROINumber): str(r.ROIName) for r in ds.StructureSetROISequence}
    if roi is not None and roi not in names.values():
        raise InputError(f"{path}: no ROI named {roi!r}; it has {', '.join(sorted(names.values()))}")
    out = []
    for rc in ds.ROIContourSequence:
        name = names.get(int(rc.ReferencedROINumber), f"roi{int(rc.ReferencedROINumber)}")
        if roi is not None and name != roi:
            continue
        mask = np.zeros(ct.shape, dtype=bool)
        for contour in getattr(rc, "ContourSequence", []):
            if str(getattr(contour, "ContourGeometricType", "CLOSED_PLANAR")) != "CLOSED_PLANAR":
                continue
            pts = np.asarray(contour.ContourData, dtype=np.float64).reshape(-1, 3)
            if len(pts) < 3:
                continue
            kji = ct.patient_to_index(pts)
            k = int(np.rint(kji[:, 0].mean()))
            if np.ptp(kji[:, 0]) > 0.5 or not 0 <= k < ct.shape[0]:
                continue  # not on one CT slice, or outside the CT
            mask[k] ^= _polygon_mask(kji[:, 1:], ct.shape[1:])
        out.append(Structure(name, mask))
    return out
