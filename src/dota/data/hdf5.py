"""The HDF5 beamlet format (``dataset-format.md``): the one reader and writer every command uses.

One file holds N beamlets: ``geometry`` (N, L, H, W) HU, ``dose`` (N, L, H, W) Gy per 1e9 primaries,
``energy`` (N,) MeV, optional ``uncertainty`` and per-beamlet ``meta/`` arrays, and required file
attributes. :class:`BeamletFile` reads lazily (one beamlet at a time) so datasets larger than memory
work; :func:`write_dataset` writes atomically (a temporary file renamed into place).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from dota.fileio import atomic_write
from dota.constants import DOSE_UNIT, FORMAT_VERSION, VOXEL_MM
from dota.errors import DataFileError, InputError

REQUIRED_ATTRS = (
    "format_version",
    "voxel_size_mm",
    "dose_unit",
    "engine",
    "engine_version",
    "primaries",
    "hu_calibration",
    "created_by",
)


@dataclass
class BeamletData:
    """A dataset in memory. ``dose`` may be None for geometry-only inputs (e.g. to predict)."""

    geometry: np.ndarray
    energy: np.ndarray
    dose: np.ndarray | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, np.ndarray] = field(default_factory=dict)
    uncertainty: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.energy.shape[0])

    @property
    def voxel_mm(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in self.attrs.get("voxel_size_mm", VOXEL_MM))

    def subset(self, index: np.ndarray | slice | list[int]) -> BeamletData:
        return BeamletData(
            geometry=self.geometry[index],
            energy=self.energy[index],
            dose=None if self.dose is None else self.dose[index],
            attrs=dict(self.attrs),
            meta={k: v[index] for k, v in self.meta.items()},
            uncertainty=None if self.uncertainty is None or self.uncertainty.ndim == 0 else self.uncertainty[index],
        )


def _created_by() -> str:
    from dota import __version__

    return f"dota-dose {__version__}"


def write_dataset(
    path: str | Path,
    geometry: np.ndarray,
    dose: np.ndarray,
    energy: np.ndarray,
    *,
    attrs: dict[str, Any],
    voxel_mm: tuple[float, float, float] = VOXEL_MM,
    meta: dict[str, np.ndarray] | None = None,
    uncertainty: np.ndarray | None = None,
    compression: str = "gzip",
) -> Path:
    """Write beamlets in the shared format, atomically.

    ``attrs`` must name ``engine``, ``engine_version``, ``primaries`` and ``hu_calibration`` (an
    engine's :meth:`~dota.engines.base.DoseEngine.file_attrs`); the others are filled in. Extra
    attributes are kept (dicts are stored as JSON strings).
    """
    geometry = np.asarray(geometry)
    dose = np.asarray(dose)
    energy = np.asarray(energy, dtype=np.float32).reshape(-1)
    if geometry.ndim != 4:
        raise InputError(f"geometry must be (N, L, H, W), got shape {geometry.shape}")
    if dose.shape != geometry.shape:
        raise InputError(f"dose shape {dose.shape} differs from geometry shape {geometry.shape}")
    if energy.shape[0] != geometry.shape[0]:
        raise InputError(f"{energy.shape[0]} energies for {geometry.shape[0]} beamlets")
    if not np.isfinite(dose).all():
        raise InputError("dose contains NaN or inf; refusing to write it")
    missing = [k for k in ("engine", "engine_version", "primaries", "hu_calibration") if k not in attrs]
    if missing:
        raise InputError(f"dataset attributes missing: {missing}")
    geometry = geometry.astype(np.int16) if _fits_int16(geometry) else geometry.astype(np.float32)
    all_attrs = {
        "format_version": FORMAT_VERSION,
        "voxel_size_mm": np.asarray(voxel_mm, dtype=np.float64),
        "dose_unit": DOSE_UNIT,
        "created_by": _created_by(),
        **attrs,
    }
    chunks = (1, *geometry.shape[1:]) if len(geometry) else None

    def write(tmp: str) -> None:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("geometry", data=geometry, chunks=chunks, compression=compression)
            f.create_dataset("dose", data=dose.astype(np.float32), chunks=chunks, compression=compression)
            f.create_dataset("energy", data=energy)
            if uncertainty is not None:
                u = np.asarray(uncertainty, dtype=np.float32)
                f.create_dataset("uncertainty", data=u, chunks=chunks if u.ndim == 4 else None,
                                 compression=compression if u.ndim == 4 else None)
            for k, v in (meta or {}).items():
                v = np.asarray(v)
                if v.dtype.kind in "UO":
                    v = v.astype(h5py.string_dtype())
                f.create_dataset(f"meta/{k}", data=v)
            for k, v in all_attrs.items():
                f.attrs[k] = json.dumps(v) if isinstance(v, dict) else v

    atomic_write(path, write)
    return Path(path)


def _fits_int16(geometry: np.ndarray) -> bool:
    if np.issubdtype(geometry.dtype, np.integer):
        return geometry.size == 0 or (geometry.min() >= -32768 and geometry.max() <= 32767)
    return False


class BeamletFile:
    """Lazy reader of one dataset file (the shared format, or the original DoTA layout).

    >>> with BeamletFile("train.h5") as f:
    ...     g, d, e = f.geometry[0], f.dose[0], f.energy[0]
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DataFileError(f"dataset {self.path} does not exist")
        try:
            self._f = h5py.File(self.path, "r")
        except OSError as exc:
            raise DataFileError(f"dataset {self.path} is not a readable HDF5 file ({exc})") from None
        try:
            self._open()
        except Exception:
            self._f.close()
            raise

    def _open(self) -> None:
        f = self._f
        if "dose0" in f and "energy0" in f:
            raise DataFileError(
                f"{self.path} uses the original DoTA layout; convert it with dota.data.import_original_dota"
            )
        for name in ("geometry", "energy"):
            if name not in f:
                raise DataFileError(f"dataset {self.path} has no '{name}' array: not a dota beamlet file")
        self.geometry = f["geometry"]
        self.dose = f["dose"] if "dose" in f else None
        self.energy = np.asarray(f["energy"][...], dtype=np.float32).reshape(-1)
        self.uncertainty = f["uncertainty"] if "uncertainty" in f else None
        if self.geometry.ndim != 4:
            raise DataFileError(f"{self.path}: geometry must be 4-D (N, L, H, W), found {self.geometry.shape}")
        if self.dose is not None and self.dose.shape != self.geometry.shape:
            raise DataFileError(f"{self.path}: dose shape {self.dose.shape} != geometry shape {self.geometry.shape}")
        if self.energy.shape[0] != self.geometry.shape[0]:
            raise DataFileError(f"{self.path}: {self.energy.shape[0]} energies for {self.geometry.shape[0]} beamlets")
        self.attrs = {k: _attr(v) for k, v in f.attrs.items()}
        missing = [k for k in REQUIRED_ATTRS if k not in self.attrs]
        if missing:
            raise DataFileError(f"{self.path}: required attributes missing: {missing}")
        if int(self.attrs["format_version"]) != FORMAT_VERSION:
            raise DataFileError(f"{self.path}: format_version {self.attrs['format_version']} is not supported")

    @property
    def meta(self) -> dict[str, np.ndarray]:
        if "meta" not in self._f:
            return {}
        return {k: _decode(v[...]) for k, v in self._f["meta"].items()}

    @property
    def voxel_mm(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in self.attrs["voxel_size_mm"])

    @property
    def block_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.geometry.shape[1:])

    def __len__(self) -> int:
        return int(self.energy.shape[0])

    def load(self, index: Any = slice(None)) -> BeamletData:
        """Read beamlets ``index`` (default all) into memory; h5py fancy indexing needs sorted indices."""
        if not isinstance(index, slice):
            index = np.sort(np.asarray(index, dtype=np.int64))
        try:
            return BeamletData(
                geometry=np.asarray(self.geometry[index], dtype=np.float32),
                energy=self.energy[index],
                dose=None if self.dose is None else np.asarray(self.dose[index], dtype=np.float32),
                attrs=dict(self.attrs),
                meta={k: v[index] for k, v in self.meta.items()},
                uncertainty=None if self.uncertainty is None else np.asarray(self.uncertainty[index]),
            )
        except OSError as exc:
            raise DataFileError(f"{self.path}: cannot read beamlets ({exc}); the file may be corrupt") from None

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> BeamletFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _attr(v: Any) -> Any:
    if isinstance(v, bytes):
        v = v.decode()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, str) and v.startswith("{"):
        try:
            return json.loads(v)
        except json.JSONDecodeError:
            return v
    return v


def _decode(v: np.ndarray) -> np.ndarray:
    if v.dtype.kind in "OS":
        return np.array([x.decode() if isinstance(x, bytes) else x for x in v.ravel()]).reshape(v.shape)
    return v


def read_dataset(path: str | Path, index: Any = slice(None)) -> BeamletData:
    """Read a whole dataset (or ``index``) into memory."""
    with BeamletFile(path) as f:
        return f.load(index)


def import_original_dota(path: str | Path, out_path: str | Path | None = None) -> BeamletData:
    """Read the original DoTA layout: ``geometry``, ``dose0``, ``energy0`` in MATLAB order (25, 25, 150, N),
    last row and column cropped to (N, 150, 24, 24). Writes the shared format to ``out_path`` if given."""
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"dataset {path} does not exist")
    try:
        with h5py.File(path, "r") as f:
            for name in ("geometry", "dose0", "energy0"):
                if name not in f:
                    raise DataFileError(f"{path} is not an original DoTA file: no '{name}' array")
            geometry = np.asarray(f["geometry"][...], dtype=np.float32)
            dose = np.asarray(f["dose0"][...], dtype=np.float32)
            energy = np.asarray(f["energy0"][...], dtype=np.float32).reshape(-1)
    except OSError as exc:
        raise DataFileError(f"{path} is not a readable HDF5 file ({exc})") from None
    # MATLAB order (rows, cols, depth, N) -> (N, depth, rows, cols), then crop the 25th row/col.
    geometry = np.transpose(geometry, (3, 2, 0, 1))[:, :, :-1, :-1]
    dose = np.transpose(dose, (3, 2, 0, 1))[:, :, :-1, :-1]
    if dose.shape != geometry.shape or energy.shape[0] != geometry.shape[0]:
        raise DataFileError(f"{path}: inconsistent shapes geometry {geometry.shape}, dose {dose.shape}, energy {energy.shape}")
    attrs = {
        "engine": "mcsquare",
        "engine_version": "unknown (original DoTA data)",
        "primaries": 0,
        "hu_calibration": "unknown",
        "imported_from": str(path),
    }
    data = BeamletData(np.ascontiguousarray(geometry), energy, np.ascontiguousarray(dose), attrs)
    if out_path is not None:
        write_dataset(out_path, data.geometry, data.dose, data.energy, attrs=attrs)
    return data
