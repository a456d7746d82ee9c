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
    """Write beamlets in the shared format, atomically (one :class:`DatasetWriter` append).

    ``attrs`` must name ``engine``, ``engine_version``, ``primaries`` and ``hu_calibration`` (an
    engine's :meth:`~dota.engines.base.DoseEngine.file_attrs`); the others are filled in. Extra
    attributes are kept (dicts are stored as JSON strings).
    """
    geometry = np.asarray(geometry)
    if geometry.ndim != 4:
        raise InputError(f"geometry must be (N, L, H, W), got shape {geometry.shape}")
    int16 = _fits_int16(geometry)

    def write(tmp: str) -> None:
        with DatasetWriter(tmp, geometry.shape[1:], attrs=attrs, voxel_mm=voxel_mm, compression=compression,
                           geometry_int16=int16) as w:
            w.append(geometry, dose, energy, meta=meta, uncertainty=uncertainty)

    atomic_write(path, write)
    return Path(path)


class DatasetWriter:
    """Appends beamlets to a new dataset file without holding them in memory.

    Datasets are created resizable along the beamlet axis and grow with every :meth:`append`; the file
    attributes are written at :meth:`close`. It writes to ``path`` directly: wrap it in
    :func:`dota.fileio.atomic_write` (as :func:`write_dataset` and ``dota generate`` do) so that readers
    never see a partial file. Every append is checked (shapes, NaN/inf, meta lengths) before it is written.

    >>> with DatasetWriter(tmp, (150, 24, 24), attrs=engine.file_attrs()) as w:
    ...     for part in parts:
    ...         w.append(part.geometry, part.dose, part.energy, meta=part.meta)
    """

    def __init__(self, path: str | Path, block_shape: tuple[int, ...], *, attrs: dict[str, Any],
                 voxel_mm: tuple[float, float, float] = VOXEL_MM, compression: str | None = "gzip",
                 geometry_int16: bool = True) -> None:
        missing = [k for k in ("engine", "engine_version", "primaries", "hu_calibration") if k not in attrs]
        if missing:
            raise InputError(f"dataset attributes missing: {missing}")
        voxel = np.asarray(voxel_mm, dtype=np.float64).reshape(-1)
        if voxel.shape != (3,) or not np.isfinite(voxel).all() or (voxel <= 0).any():
            raise InputError(f"voxel size must be three positive millimetre values, got {tuple(voxel.tolist())}")
        block_shape = tuple(int(v) for v in block_shape)
        if len(block_shape) != 3 or min(block_shape) < 1:
            raise InputError(f"block shape must be (L, H, W), got {block_shape}")
        self.path = Path(path)
        self.block_shape = block_shape
        self.compression = compression
        self.count = 0
        self._attrs = {
            "format_version": FORMAT_VERSION,
            "voxel_size_mm": voxel,
            "dose_unit": DOSE_UNIT,
            "created_by": _created_by(),
            **attrs,
        }
        self._f = h5py.File(self.path, "w")
        chunks = (1, *block_shape)
        maxshape = (None, *block_shape)
        try:
            self._f.create_dataset("geometry", shape=(0, *block_shape), maxshape=maxshape, chunks=chunks,
                                   dtype=np.int16 if geometry_int16 else np.float32, compression=compression)
            self._f.create_dataset("dose", shape=(0, *block_shape), maxshape=maxshape, chunks=chunks,
                                   dtype=np.float32, compression=compression)
            self._f.create_dataset("energy", shape=(0,), maxshape=(None,), chunks=(4096,), dtype=np.float32)
        except BaseException:
            self._f.close()
            raise

    def append(self, geometry: np.ndarray, dose: np.ndarray, energy: np.ndarray, *,
               meta: dict[str, np.ndarray] | None = None, uncertainty: np.ndarray | None = None) -> None:
        """Add beamlets ``(n, L, H, W)`` with their dose, energies (n,), meta arrays (n, ...) and uncertainty."""
        geometry = np.asarray(geometry)
        dose = np.asarray(dose)
        energy = np.asarray(energy, dtype=np.float32).reshape(-1)
        n = int(energy.shape[0])
        if geometry.shape != (n, *self.block_shape):
            raise InputError(f"geometry shape {geometry.shape} does not hold {n} blocks of {self.block_shape}")
        if dose.shape != geometry.shape:
            raise InputError(f"dose shape {dose.shape} differs from geometry shape {geometry.shape}")
        if not np.isfinite(dose).all():
            raise InputError("dose contains NaN or inf; refusing to write it")
        if np.issubdtype(geometry.dtype, np.floating) and not np.isfinite(geometry).all():
            raise InputError("geometry contains NaN or inf; refusing to write it")
        if not np.isfinite(energy).all() or (energy <= 0).any():
            raise InputError("energies must be finite and positive; refusing to write them")
        if self._f["geometry"].dtype == np.int16 and not _fits_int16(geometry):
            raise InputError("geometry does not fit the int16 HU this file was opened with")
        meta = dict(meta or {})
        for k, v in meta.items():
            if len(np.asarray(v)) != n:
                raise InputError(f"meta/{k} has {len(np.asarray(v))} rows for {n} beamlets")
        if uncertainty is not None:
            u = np.asarray(uncertainty, dtype=np.float32)
            if u.shape not in (dose.shape, (n,)):
                raise InputError(f"uncertainty shape {u.shape} is neither the dose shape {dose.shape} nor ({n},)")
        if self.count and set(meta) != set(self._meta_keys()):
            raise InputError(f"meta keys {sorted(meta)} differ from the earlier appends' {sorted(self._meta_keys())}")
        lo, hi = self.count, self.count + n
        f = self._f
        for name, arr in (("geometry", geometry), ("dose", dose.astype(np.float32)), ("energy", energy)):
            f[name].resize(hi, axis=0)
            f[name][lo:hi] = arr
        if uncertainty is not None:
            if "uncertainty" not in f:
                if self.count:
                    raise InputError("uncertainty given for some appends only")
                per_voxel = u.ndim == 4
                f.create_dataset("uncertainty", shape=(0, *u.shape[1:]), maxshape=(None, *u.shape[1:]),
                                 chunks=(1, *self.block_shape) if per_voxel else None, dtype=np.float32,
                                 compression=self.compression if per_voxel else None)
            f["uncertainty"].resize(hi, axis=0)
            f["uncertainty"][lo:hi] = u
        for k, v in meta.items():
            v = np.asarray(v)
            key = f"meta/{k}"
            if key not in f:
                if v.dtype.kind in "UO":
                    f.create_dataset(key, shape=(0,), maxshape=(None,), dtype=h5py.string_dtype())
                else:
                    f.create_dataset(key, shape=(0, *v.shape[1:]), maxshape=(None, *v.shape[1:]), dtype=v.dtype)
            if v.dtype.kind in "UO":
                v = v.astype(object)
            f[key].resize(hi, axis=0)
            f[key][lo:hi] = v
        self.count = hi

    def _meta_keys(self) -> list[str]:
        return list(self._f["meta"].keys()) if "meta" in self._f else []

    def close(self) -> None:
        if not self._f:
            return
        try:
            for k, v in self._attrs.items():
                self._f.attrs[k] = json.dumps(v) if isinstance(v, dict) else v
        finally:
            self._f.close()

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self._f.close()


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
