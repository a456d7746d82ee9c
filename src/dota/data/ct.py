"""Real CT volumes (HU) and beam's-eye-view blocks resampled from them along arbitrary beam directions.

Readers return a :class:`CTVolume`: a (z, y, x) float32 array of HU (axis 0 = slices) with its voxel
spacing in mm. Supported sources: NIfTI (``.nii``/``.nii.gz``, reoriented to the closest canonical
orientation), a folder of DICOM CT slices, and OpenKBP sparse CSV (``*_ct.csv`` with its
``*_voxel_dimensions.csv``).

Geometry of a block (all in the volume's array frame, mm, origin at the centre of voxel (0, 0, 0)):
the beam direction ``d`` is set by the gantry angle (rotation in the axial (y, x) plane; gantry 0 runs
along +y, gantry 90 along -x) and the couch angle (which tilts ``d`` out of the axial plane towards +z).
Depth slice ``i`` of the block is centred at ``(i + 0.5) * voxel_depth`` from the entrance plane through
``entry_point_mm``; the beam axis passes through ``entry_point_mm + offset_mm[0] * u + offset_mm[1] * v``,
with ``u`` (block rows) the direction in the plane perpendicular to ``d`` closest to +z and ``v = d x u``
(block columns).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from dota.constants import BLOCK_SHAPE, HU_AIR, VOXEL_MM
from dota.errors import DataFileError, InputError

#: HU above which a voxel counts as part of the body when tracing beams.
BODY_THRESHOLD_HU: float = -400.0


@dataclass(frozen=True)
class CTVolume:
    """A CT in HU: ``hu`` (z, y, x) float32, ``spacing_mm`` (z, y, x), and the file it came from."""

    hu: np.ndarray
    spacing_mm: tuple[float, float, float]
    name: str

    @property
    def extent_mm(self) -> np.ndarray:
        return (np.asarray(self.hu.shape) - 1) * np.asarray(self.spacing_mm)


# --------------------------------------------------------------------------------------------------
# Readers


def read_nifti(path: str | os.PathLike) -> CTVolume:
    """A NIfTI CT (HU), reoriented to the closest canonical (RAS) orientation, axes returned as (z, y, x)."""
    import nibabel as nib

    try:
        img = nib.as_closest_canonical(nib.load(str(path)))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:  # nibabel raises many types for unreadable files
        raise DataFileError(f"cannot read NIfTI {path}: {exc}") from None
    if data.ndim != 3:
        raise DataFileError(f"{path}: expected a 3-D CT, got shape {data.shape}")
    zooms = tuple(float(v) for v in img.header.get_zooms()[:3])
    return CTVolume(np.ascontiguousarray(data.transpose(2, 1, 0)), (zooms[2], zooms[1], zooms[0]), _name(path))


def read_dicom_series(folder: str | os.PathLike) -> CTVolume:
    """A folder of axial DICOM CT slices, sorted along the slice normal, rescaled to HU."""
    import pydicom

    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in (".dcm", ""))
    slices = []
    for f in files:
        try:
            ds = pydicom.dcmread(f)
        except Exception:  # not a DICOM file
            continue
        if "ImagePositionPatient" in ds and "PixelSpacing" in ds:
            slices.append(ds)
    if len(slices) < 2:
        raise DataFileError(f"{folder} holds fewer than two DICOM CT slices")
    orient = np.asarray(slices[0].ImageOrientationPatient, dtype=np.float64)
    normal = np.cross(orient[:3], orient[3:])
    positions = np.array([float(np.dot(normal, np.asarray(s.ImagePositionPatient, dtype=np.float64))) for s in slices])
    order = np.argsort(positions)
    steps = np.diff(positions[order])
    if np.any(steps <= 0) or np.ptp(steps) > 0.01 * np.median(steps):
        raise DataFileError(f"{folder}: DICOM slices are not evenly spaced along the slice normal")
    hu = np.stack([
        slices[i].pixel_array.astype(np.float32) * float(getattr(slices[i], "RescaleSlope", 1.0))
        + float(getattr(slices[i], "RescaleIntercept", 0.0))
        for i in order
    ])
    row_mm, col_mm = (float(v) for v in slices[0].PixelSpacing)
    return CTVolume(hu, (float(np.median(steps)), row_mm, col_mm), _name(folder))


def read_openkbp_csv(path: str | os.PathLike, shape: tuple[int, int, int] = (128, 128, 128)) -> CTVolume:
    """An OpenKBP sparse CT (``pt_N_ct.csv``: ``flat_index,value`` rows, C order, third axis = slices).

    HU = clip(value, 0, 4095) - 1024; absent voxels are 0, i.e. air. The spacing comes from the
    ``pt_N_voxel_dimensions.csv`` beside it (in-plane, in-plane, slice, mm).
    """
    path = Path(path)
    dims_path = path.with_name(path.name.replace("_ct.csv", "_voxel_dimensions.csv"))
    try:
        table = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)
        dims = np.loadtxt(dims_path, ndmin=1)
    except (OSError, ValueError) as exc:
        raise DataFileError(f"cannot read OpenKBP CT {path} (and {dims_path.name}): {exc}") from None
    flat = np.zeros(int(np.prod(shape)), dtype=np.float32)
    idx = table[:, 0].astype(np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= flat.size):
        raise DataFileError(f"{path}: voxel index outside a {shape} volume")
    flat[idx] = table[:, 1]
    hu = np.clip(flat, 0, 4095).reshape(shape) - 1024.0
    return CTVolume(np.ascontiguousarray(hu.transpose(2, 0, 1)), (float(dims[2]), float(dims[0]), float(dims[1])),
                    _name(path))


def read_ct(path: str | os.PathLike) -> CTVolume:
    """Read any supported CT source: NIfTI file, DICOM folder or OpenKBP ``*_ct.csv``."""
    path = Path(path)
    if not path.exists():
        raise DataFileError(f"no CT at {path}")
    if path.is_dir():
        return read_dicom_series(path)
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return read_nifti(path)
    if name.endswith("_ct.csv"):
        return read_openkbp_csv(path)
    raise DataFileError(f"{path}: not a NIfTI file, DICOM folder or OpenKBP *_ct.csv")


def find_ct_sources(root: str | os.PathLike) -> list[Path]:
    """Every CT source under ``root`` (NIfTI files, DICOM folders, OpenKBP CSVs), sorted by path."""
    root = Path(root)
    if not root.is_dir():
        raise DataFileError(f"no CT folder at {root}")
    found: set[Path] = set()
    for p in root.rglob("*"):
        n = p.name.lower()
        if p.is_file() and (n.endswith((".nii", ".nii.gz")) or n.endswith("_ct.csv")):
            found.add(p)
        elif p.is_file() and n.endswith(".dcm"):
            found.add(p.parent)
    return sorted(found)


def _name(path: str | os.PathLike) -> str:
    p = Path(path)
    return f"{p.parent.name}/{p.name}" if p.parent.name else p.name


# --------------------------------------------------------------------------------------------------
# Beam geometry


def beam_frame(gantry_deg: float, couch_deg: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit vectors ``(d, u, v)`` in (z, y, x) components: beam direction, block-row and block-column axes."""
    g, c = np.deg2rad(gantry_deg), np.deg2rad(couch_deg)
    # Axial direction of the gantry, tilted by the couch towards +z.
    d = np.array([np.sin(g) * np.sin(c), np.cos(g), -np.sin(g) * np.cos(c)])
    d /= np.linalg.norm(d)
    ref = np.array([1.0, 0.0, 0.0]) if abs(d[0]) < 0.99 else np.array([0.0, 0.0, 1.0])
    u = ref - np.dot(ref, d) * d
    u /= np.linalg.norm(u)
    v = np.cross(d, u)
    return d, u, v


def extract_bev_block(
    volume_hu: np.ndarray,
    spacing_mm: Sequence[float],
    entry_point_mm: Sequence[float],
    gantry_deg: float,
    couch_deg: float,
    offset_mm: Sequence[float] = (0.0, 0.0),
    block_shape: tuple[int, int, int] = BLOCK_SHAPE,
    voxel_mm: tuple[float, float, float] = VOXEL_MM,
) -> np.ndarray:
    """Resample a beam's-eye-view block (L, H, W) of HU from a (z, y, x) volume, trilinear, air outside.

    ``entry_point_mm`` (z, y, x, from the centre of voxel (0, 0, 0)) lies on the entrance plane; the beam
    axis is shifted from it by ``offset_mm`` (rows, columns) in that plane. See the module docstring.
    """
    vol = np.asarray(volume_hu)
    if vol.ndim != 3:
        raise InputError(f"volume must be 3-D (z, y, x), got shape {vol.shape}")
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    if spacing.shape != (3,) or np.any(spacing <= 0):
        raise InputError(f"spacing_mm must be three positive numbers, got {spacing_mm}")
    if len(block_shape) != 3 or min(block_shape) < 1:
        raise InputError(f"block_shape must be three positive sizes, got {block_shape}")
    d, u, v = beam_frame(gantry_deg, couch_deg)
    length, height, width = block_shape
    dl, dh, dw = voxel_mm
    axis0 = np.asarray(entry_point_mm, dtype=np.float64) + offset_mm[0] * u + offset_mm[1] * v
    depth = (np.arange(length) + 0.5) * dl
    rows = (np.arange(height) - (height - 1) / 2) * dh
    cols = (np.arange(width) - (width - 1) / 2) * dw
    pts = (axis0[:, None, None, None] + d[:, None, None, None] * depth[None, :, None, None]
           + u[:, None, None, None] * rows[None, None, :, None] + v[:, None, None, None] * cols[None, None, None, :])
    coords = pts / spacing[:, None, None, None]
    block = ndimage.map_coordinates(vol.astype(np.float32, copy=False), coords.reshape(3, -1), order=1,
                                    mode="constant", cval=HU_AIR, prefilter=False)
    return block.reshape(block_shape).astype(np.float32)


def body_mask(volume: CTVolume, threshold_hu: float = BODY_THRESHOLD_HU) -> np.ndarray:
    """Voxels above ``threshold_hu``, keeping only the largest connected component (the patient)."""
    mask = volume.hu > threshold_hu
    labels, n = ndimage.label(mask)
    if n == 0:
        raise DataFileError(f"{volume.name}: no voxel above {threshold_hu:g} HU (is it a CT in HU?)")
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (1 + int(np.argmax(sizes)))


@dataclass(frozen=True)
class BeamletPose:
    """Where a beamlet comes from: entrance point (z, y, x mm), angles, lateral spot offset (rows, cols mm)."""

    entry_point_mm: tuple[float, float, float]
    gantry_deg: float
    couch_deg: float
    offset_mm: tuple[float, float]


def sample_beamlet_pose(
    volume: CTVolume,
    rng: np.random.Generator,
    *,
    mask: np.ndarray | None = None,
    max_offset_mm: float = 30.0,
    max_couch_deg: float = 30.0,
    air_gap_mm: tuple[float, float] = (0.0, 10.0),
    min_path_mm: float = 40.0,
    tries: int = 200,
) -> BeamletPose:
    """A random beam direction and spot position whose axis passes through at least ``min_path_mm`` of body.

    An isocentre is drawn among the body voxels, the gantry uniformly in [0, 360), the couch as 0 half of
    the time and uniformly in ``[-max_couch_deg, max_couch_deg]`` otherwise, and a lateral spot offset
    uniformly in a disc of radius ``max_offset_mm``. The entrance plane is placed ``air_gap_mm`` (drawn
    uniformly) upstream of where the spot's axis first meets the skin.
    """
    if mask is None:
        mask = body_mask(volume)
    body = np.argwhere(mask)
    spacing = np.asarray(volume.spacing_mm, dtype=np.float64)
    step_mm = 0.5 * float(spacing.min())
    reach_mm = float(np.linalg.norm(volume.extent_mm)) + 2 * step_mm
    n_steps = int(np.ceil(2 * reach_mm / step_mm))
    for _ in range(tries):
        iso = body[rng.integers(len(body))] * spacing
        gantry = float(rng.uniform(0.0, 360.0))
        couch = 0.0 if rng.random() < 0.5 else float(rng.uniform(-max_couch_deg, max_couch_deg))
        radius, phi = max_offset_mm * np.sqrt(rng.random()), rng.uniform(0, 2 * np.pi)
        offset = (float(radius * np.cos(phi)), float(radius * np.sin(phi)))
        d, u, v = beam_frame(gantry, couch)
        spot = iso + offset[0] * u + offset[1] * v
        # Walk the spot's axis from far upstream through the volume; find the body along it.
        s = -reach_mm + step_mm * np.arange(n_steps)
        idx = np.rint((spot[:, None] + d[:, None] * s[None]) / spacing[:, None]).astype(np.int64)
        inside = np.all((idx >= 0) & (idx < np.asarray(mask.shape)[:, None]), axis=0)
        hit = np.zeros(n_steps, dtype=bool)
        hit[inside] = mask[idx[0, inside], idx[1, inside], idx[2, inside]]
        if hit.sum() * step_mm < min_path_mm:
            continue
        skin_s = s[np.argmax(hit)]
        gap = float(rng.uniform(*air_gap_mm))
        entry_on_axis = spot + d * (skin_s - step_mm - gap)
        entry = entry_on_axis - offset[0] * u - offset[1] * v
        return BeamletPose(tuple(float(x) for x in entry), gantry, couch, offset)
    raise DataFileError(f"{volume.name}: found no beam through {min_path_mm:g} mm of body in {tries} tries")


def geometry_sha256(block: np.ndarray) -> str:
    """SHA-256 of a block's bytes as stored (float32, C order): identifies a geometry across files."""
    return hashlib.sha256(np.ascontiguousarray(block, dtype=np.float32).tobytes()).hexdigest()
