"""Patient geometry for whole plans: a CT with its DICOM patient frame, and the IEC 61217 beam axes.

Frames and units
----------------
- **DICOM patient coordinates** (LPS), mm: +x towards the patient's left, +y posterior, +z superior.
  Every position in a plan (isocentre, structures, dose grids) is given in this frame.
- **CT array**: ``hu[k, j, i]`` (slices, rows, columns). Voxel ``(k, j, i)`` has its centre at
  ``origin_mm + direction @ (i * sx, j * sy, k * sz)``, with ``direction`` the 3x3 matrix whose
  columns are the patient-frame unit vectors of the column, row and slice index axes (as in DICOM's
  ImageOrientationPatient and ITK's direction). Spacings are kept in (z, y, x) order, as in
  :class:`dota.data.ct.CTVolume`.
- **IEC 61217** fixed frame (origin at the isocentre, +X to the right of an observer facing the
  gantry, +Y towards the gantry, +Z up), gantry frame (rotated by the gantry angle about Y) and
  patient-support frame (rotated by the couch angle about Z, positive counter-clockwise seen from
  above). At gantry 0 the source is above the patient (beam travels -Z), at gantry 90 the source is at
  +X (beam travels -X). Spot positions ``(X, Y)`` of a plan are in the beam-limiting-device frame (the
  gantry frame for collimator angle 0) at the isocentre plane, mm.
- Patient positions HFS, HFP, FFS and FFP map the IEC patient-support frame onto DICOM coordinates.
  For HFS: IEC X = +x (patient left), IEC Y = +z (superior), IEC Z = -y (anterior). So for a head-first
  supine patient a beam at gantry 0 enters from the anterior side, gantry 90 from the patient's left,
  gantry 270 from the right; this agrees with :func:`dota.data.ct.beam_frame` for HFS.

These axes are parallel to the beam's central axis; plan dose sends each spot along its ray from the
beam model's virtual source instead (:func:`dota.plan.dose.compute_plan_dose`, ``diverging``): at the
isocentre plane it passes through ``isocentre + X * x_axis + Y * y_axis``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dota.errors import DataFileError, InputError

#: DICOM PatientPosition values supported, mapped to the DICOM (x, y, z) components of the IEC
#: patient-support axes X, Y, Z (rows of the matrix).
_IEC_TO_DICOM: dict[str, np.ndarray] = {
    "HFS": np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]]),
    "HFP": np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]),
    "FFS": np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, -1.0, 0.0]]),
    "FFP": np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]]),
}
PATIENT_POSITIONS: tuple[str, ...] = tuple(_IEC_TO_DICOM)


@dataclass(frozen=True)
class BeamAxes:
    """Unit vectors of one beam in DICOM patient coordinates (x, y, z).

    ``direction`` points from the source into the patient; ``x_axis`` and ``y_axis`` are the IEC
    beam-limiting-device X and Y axes (spot positions), with ``direction x y_axis = x_axis``. In a
    beam's-eye-view block, rows run along ``y_axis`` and columns along ``x_axis``.
    """

    direction: np.ndarray
    x_axis: np.ndarray
    y_axis: np.ndarray


def _rot_z(angle_deg: float) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def iec_beam_axes(gantry_deg: float, couch_deg: float = 0.0, patient_position: str = "HFS") -> BeamAxes:
    """Beam direction and spot axes (DICOM patient frame) for IEC 61217 gantry and couch angles (degrees).

    See the module docstring for the conventions. The collimator angle is taken as 0.
    """
    pos = str(patient_position).upper()
    if pos not in _IEC_TO_DICOM:
        raise InputError(f"patient position {patient_position!r} is not supported; use one of "
                         f"{', '.join(PATIENT_POSITIONS)}")
    g = np.deg2rad(float(gantry_deg))
    # Gantry frame in IEC fixed coordinates: Z_g points towards the source.
    z_g = np.array([np.sin(g), 0.0, np.cos(g)])
    x_g = np.array([np.cos(g), 0.0, -np.sin(g)])
    y_g = np.array([0.0, 1.0, 0.0])
    # Fixed -> patient support: the support is rotated by the couch angle about Z.
    to_support = _rot_z(float(couch_deg)).T
    m = _IEC_TO_DICOM[pos].T  # columns: DICOM vectors of IEC X, Y, Z
    to_dicom = m @ to_support
    d = -(to_dicom @ z_g)
    return BeamAxes(direction=d, x_axis=to_dicom @ x_g, y_axis=to_dicom @ y_g)


@dataclass(frozen=True)
class PatientCT:
    """A CT in HU with its place in DICOM patient coordinates (see the module docstring).

    Attributes
    ----------
    hu : (nz, ny, nx) float32
        CT numbers, indexed ``[k, j, i]``.
    spacing_mm : (sz, sy, sx)
        Voxel size along the slice, row and column index axes, mm.
    origin_mm : (x, y, z)
        Patient position of the centre of voxel (0, 0, 0), mm.
    direction : (3, 3)
        Columns are the patient unit vectors of the i (column), j (row), k (slice) index axes.
    name : str
        Where it came from.
    info : dict
        DICOM identifiers carried to outputs when known: ``PatientID``, ``PatientName``,
        ``StudyInstanceUID``, ``FrameOfReferenceUID``, ``PatientPosition``, ``StudyID``.
    """

    hu: np.ndarray
    spacing_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    name: str = "ct"
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        hu = np.asarray(self.hu)
        if hu.ndim != 3:
            raise InputError(f"a CT must be 3-D (z, y, x), got shape {hu.shape}")
        sp = np.asarray(self.spacing_mm, dtype=np.float64)
        if sp.shape != (3,) or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
            raise InputError(f"CT spacing must be three positive numbers of mm, got {self.spacing_mm}")
        d = np.asarray(self.direction, dtype=np.float64)
        if d.shape != (3, 3) or not np.allclose(d.T @ d, np.eye(3), atol=1e-4):
            raise InputError(f"CT direction must be an orthonormal 3x3 matrix, got {d.tolist()}")
        object.__setattr__(self, "direction", d)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.hu.shape)  # type: ignore[return-value]

    @property
    def patient_position(self) -> str:
        return str(self.info.get("PatientPosition", "HFS")).upper()

    @property
    def voxel_volume_mm3(self) -> float:
        return float(np.prod(self.spacing_mm))

    def affine(self) -> np.ndarray:
        """4x4 matrix taking ``(k, j, i, 1)`` (array index order) to patient ``(x, y, z, 1)``, mm."""
        sz, sy, sx = self.spacing_mm
        a = np.eye(4)
        # columns for k, j, i
        a[:3, 0] = self.direction[:, 2] * sz
        a[:3, 1] = self.direction[:, 1] * sy
        a[:3, 2] = self.direction[:, 0] * sx
        a[:3, 3] = self.origin_mm
        return a

    def index_to_patient(self, kji: np.ndarray) -> np.ndarray:
        """Patient coordinates (..., 3) of continuous array indices (..., 3) in (k, j, i) order."""
        a = self.affine()
        return np.asarray(kji, dtype=np.float64) @ a[:3, :3].T + a[:3, 3]

    def patient_to_index(self, xyz: np.ndarray) -> np.ndarray:
        """Continuous array indices (..., 3) in (k, j, i) order of patient points (..., 3) in mm."""
        a = self.affine()
        return (np.asarray(xyz, dtype=np.float64) - a[:3, 3]) @ np.linalg.inv(a[:3, :3]).T

    def voxel_centres(self, mask: np.ndarray) -> np.ndarray:
        """Patient coordinates (n, 3) of the centres of the voxels where ``mask`` is true."""
        return self.index_to_patient(np.argwhere(mask))

    def corners_mm(self) -> np.ndarray:
        """Patient coordinates (8, 3) of the outer corners of the CT's voxel box."""
        n = np.asarray(self.shape, dtype=np.float64)
        c = np.array([[a, b, e] for a in (0, 1) for b in (0, 1) for e in (0, 1)], dtype=np.float64)
        return self.index_to_patient(c * n - 0.5)

    def same_grid(self, other: PatientCT, tol_mm: float = 1e-3) -> bool:
        return (self.shape == other.shape and np.allclose(self.spacing_mm, other.spacing_mm, atol=tol_mm)
                and np.allclose(self.origin_mm, other.origin_mm, atol=tol_mm)
                and np.allclose(self.direction, other.direction, atol=1e-6))


# --------------------------------------------------------------------------------------------------
# Readers

_ITK_SUFFIXES = (".mhd", ".mha", ".nrrd", ".nhdr", ".nii", ".nii.gz")


def _is_itk_file(path: Path) -> bool:
    return path.name.lower().endswith(_ITK_SUFFIXES)


def read_itk_image(path: str | os.PathLike) -> tuple[np.ndarray, tuple[float, float, float],
                                                      tuple[float, float, float], np.ndarray]:
    """An image read by SimpleITK: ``(array (z, y, x), spacing (z, y, x) mm, origin (x, y, z) mm, direction)``.

    SimpleITK gives LPS (DICOM) patient coordinates for MetaImage, NRRD and NIfTI alike.
    """
    import SimpleITK as sitk

    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise DataFileError(f"cannot read image {path}: {first[-1] if first else exc}") from None
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise DataFileError(f"{path}: expected a scalar 3-D image, got {img.GetDimension()}-D with "
                            f"{img.GetNumberOfComponentsPerPixel()} components")
    arr = sitk.GetArrayFromImage(img)
    sx, sy, sz = img.GetSpacing()
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    return arr, (float(sz), float(sy), float(sx)), tuple(float(v) for v in img.GetOrigin()), direction


def _dicom_ct_headers(folder: Path) -> list:
    import pydicom

    headers = []
    for f in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception:  # not a DICOM file: skipped, as dota.data.ct does
            continue
        if "ImagePositionPatient" in ds and "PixelSpacing" in ds and str(getattr(ds, "Modality", "CT")) == "CT":
            headers.append(ds)
    return headers


def read_dicom_ct(folder: str | os.PathLike) -> PatientCT:
    """A DICOM CT series (one folder) with its patient geometry and identifiers.

    The voxel values and slice order come from :func:`dota.data.ct.read_dicom_series` (sorted along the
    slice normal, rescaled to HU); the origin is the ImagePositionPatient of the first slice in that
    order, the direction from ImageOrientationPatient and the slice normal.
    """
    from dota.data.ct import read_dicom_series

    folder = Path(folder)
    vol = read_dicom_series(folder)
    headers = _dicom_ct_headers(folder)
    if not headers:
        raise DataFileError(f"{folder} holds no DICOM CT slices")
    orient = np.asarray(headers[0].ImageOrientationPatient, dtype=np.float64)
    row_dir, col_dir = orient[:3], orient[3:]  # direction of increasing column index, of increasing row
    normal = np.cross(row_dir, col_dir)
    positions = [np.asarray(h.ImagePositionPatient, dtype=np.float64) for h in headers]
    first = positions[int(np.argmin([float(np.dot(normal, p)) for p in positions]))]
    h0 = headers[0]
    info = {key: str(getattr(h0, key)) for key in ("PatientID", "PatientName", "StudyInstanceUID",
                                                   "FrameOfReferenceUID", "PatientPosition", "StudyID",
                                                   "SeriesInstanceUID")
            if getattr(h0, key, None) not in (None, "")}
    direction = np.stack([row_dir, col_dir, normal], axis=1)
    return PatientCT(hu=vol.hu, spacing_mm=vol.spacing_mm, origin_mm=tuple(float(v) for v in first),
                     direction=direction, name=vol.name, info=info)


def read_patient_ct(path: str | os.PathLike) -> PatientCT:
    """Read a CT with its geometry: a DICOM series folder, MetaImage (.mhd/.mha), NRRD, NIfTI, or an
    OpenKBP ``*_ct.csv`` (no patient frame in the file: origin 0, identity direction, HFS).

    MetaImage, NRRD and NIfTI are read with SimpleITK (LPS coordinates, origin and direction kept);
    values must be HU.
    """
    from dota.data.ct import read_ct

    path = Path(path)
    if not path.exists():
        raise DataFileError(f"no CT at {path}")
    if path.is_dir():
        return read_dicom_ct(path)
    if _is_itk_file(path):
        arr, spacing, origin, direction = read_itk_image(path)
        return PatientCT(hu=np.ascontiguousarray(arr, dtype=np.float32), spacing_mm=spacing, origin_mm=origin,
                         direction=direction, name=path.name, info={"PatientPosition": "HFS"})
    if path.name.lower().endswith("_ct.csv"):
        vol = read_ct(path)
        return PatientCT(hu=vol.hu, spacing_mm=vol.spacing_mm, name=vol.name, info={"PatientPosition": "HFS"})
    raise DataFileError(f"{path}: not a DICOM folder, .mhd/.mha, .nrrd, .nii/.nii.gz or OpenKBP *_ct.csv")


def ct_from_array(hu: np.ndarray, spacing_mm: tuple[float, float, float],
                  origin_mm: tuple[float, float, float] = (0.0, 0.0, 0.0), name: str = "array",
                  patient_position: str = "HFS") -> PatientCT:
    """A :class:`PatientCT` from a (z, y, x) HU array on an axis-aligned grid (identity direction)."""
    return PatientCT(hu=np.ascontiguousarray(hu, dtype=np.float32), spacing_mm=tuple(float(v) for v in spacing_mm),
                     origin_mm=tuple(float(v) for v in origin_mm), name=name,
                     info={"PatientPosition": patient_position})
