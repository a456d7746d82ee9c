"""The HDF5 beamlet format (``dataset-format.md``): the one reader and writer every command uses.

One file holds N beamlets: ``geometry`` (N, L, H, W) HU, ``dose`` (N, L, H, W) Gy per 1e9 primaries,
``energy`` (N,) MeV, optional ``uncertainty`` and per-beamlet ``meta/`` arrays, and required file
attributes. :class:`BeamletFile` reads lazily (one beamlet at a time) so datasets larger than memory
work; :func:`write_dataset` writes atomically (a temporary file renamed into place).
"""

from __future__ import annotations

import io
import json
import re
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
        if attrs.get("dose_unit", DOSE_UNIT) != DOSE_UNIT:
            raise InputError(f"dose_unit {attrs['dose_unit']!r}: files are written in {DOSE_UNIT!r}; "
                             "convert the dose before writing it")
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
        self._raw = _GuardedFile(self.path)
        try:
            self._f = h5py.File(self._raw, "w")
        except BaseException:
            self._raw.close()
            raise
        chunks = (1, *block_shape)
        maxshape = (None, *block_shape)
        try:
            self._f.create_dataset("geometry", shape=(0, *block_shape), maxshape=maxshape, chunks=chunks,
                                   dtype=np.int16 if geometry_int16 else np.float32, compression=compression)
            self._f.create_dataset("dose", shape=(0, *block_shape), maxshape=maxshape, chunks=chunks,
                                   dtype=np.float32, compression=compression)
            self._f.create_dataset("energy", shape=(0,), maxshape=(None,), chunks=(4096,), dtype=np.float32)
        except BaseException:
            self._abort()
            raise

    def append(self, geometry: np.ndarray, dose: np.ndarray, energy: np.ndarray, *,
               meta: dict[str, np.ndarray] | None = None, uncertainty: np.ndarray | None = None) -> None:
        """Add beamlets ``(n, L, H, W)`` with their dose, energies (n,), meta arrays (n, ...) and uncertainty."""
        geometry = _numeric(geometry, "geometry")
        dose = _numeric(dose, "dose")
        energy = _numeric(energy, "energies").astype(np.float32).reshape(-1)
        n = int(energy.shape[0])
        if geometry.shape != (n, *self.block_shape):
            raise InputError(f"geometry shape {geometry.shape} does not hold {n} blocks of {self.block_shape}")
        if dose.shape != geometry.shape:
            raise InputError(f"dose shape {dose.shape} differs from geometry shape {geometry.shape}")
        if not np.isfinite(dose).all():
            raise InputError(f"dose contains NaN or inf (beamlets {_bad_rows(dose)}); refusing to write it")
        if np.issubdtype(geometry.dtype, np.floating) and not np.isfinite(geometry).all():
            raise InputError(f"geometry contains NaN or inf (beamlets {_bad_rows(geometry)}); refusing to write it")
        if not np.isfinite(energy).all() or (energy <= 0).any():
            raise InputError("energies must be finite and positive; refusing to write them")
        if self._f["geometry"].dtype == np.int16 and not _fits_int16(geometry):
            raise InputError("geometry does not fit the int16 HU this file was opened with")
        meta = dict(meta or {})
        for k, v in meta.items():
            v = np.asarray(v)
            if v.ndim == 0 or len(v) != n:
                raise InputError(f"meta/{k} has {'no rows' if v.ndim == 0 else f'{len(v)} rows'} for {n} beamlets")
            if v.dtype.kind == "f" and not np.isfinite(v).all():
                raise InputError(f"meta/{k} contains NaN or inf; refusing to write it")
        if uncertainty is not None:
            u = _numeric(uncertainty, "uncertainty").astype(np.float32)
            if u.shape not in (dose.shape, (n,)):
                raise InputError(f"uncertainty shape {u.shape} is neither the dose shape {dose.shape} nor ({n},)")
            if not np.isfinite(u).all() or (u < 0).any():
                raise InputError("uncertainty must be finite and non-negative; refusing to write it")
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
        self._raw.raise_if_failed()

    def _meta_keys(self) -> list[str]:
        return list(self._f["meta"].keys()) if "meta" in self._f else []

    def close(self) -> None:
        """Write the file attributes and close; a write that failed (e.g. a full disk) is raised here."""
        if not self._f:
            return
        try:
            for k, v in self._attrs.items():
                self._f.attrs[k] = json.dumps(v) if isinstance(v, dict) else v
        finally:
            self._f.close()
            self._raw.close()
        self._raw.raise_if_failed()

    def _abort(self) -> None:
        """Close after a failure without raising (the first error is the one to report)."""
        try:
            if self._f:
                self._f.close()
        except Exception:  # noqa: BLE001
            pass
        finally:
            self._raw.close()

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort()


class _GuardedFile(io.RawIOBase):
    """The file object HDF5 writes a new dataset through. A failed write (a full disk, an I/O error) is
    recorded and later writes are skipped, so HDF5 never sees a failure: after one, HDF5's own clean-up
    crashes the interpreter (h5py 3.16 / HDF5 2.0 segfault on ENOSPC). The writer raises the recorded
    error after each append and at close, and the partial file is removed by its caller."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._fh = open(path, "w+b", buffering=0)  # noqa: SIM115 - closed by close()
        self.error: OSError | None = None

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        return self._fh.readinto(buffer)

    def seek(self, pos: int, whence: int = 0) -> int:
        return self._fh.seek(pos, whence)

    def tell(self) -> int:
        return self._fh.tell()

    def truncate(self, size: int | None = None) -> int:
        if self.error is None:
            try:
                return self._fh.truncate(size)
            except OSError as exc:
                self.error = exc
        return self._fh.tell() if size is None else size

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        if self.error is None:
            try:
                done = 0
                while done < n:
                    done += self._fh.write(view[done:]) or 0
                return n
            except OSError as exc:
                self.error = exc
        self._fh.seek(n, io.SEEK_CUR)
        return n

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()
        super().close()

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error


def _numeric(a: Any, name: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise InputError(f"{name} must be numeric, got dtype {arr.dtype}")
    return arr


def _bad_rows(a: np.ndarray, offset: int = 0) -> list[int]:
    """The first few beamlets (rows) of ``a`` holding NaN or inf."""
    bad = ~np.isfinite(a.reshape(len(a), -1)).all(axis=1)
    return (np.flatnonzero(bad)[:5] + offset).tolist()


def _fits_int16(geometry: np.ndarray) -> bool:
    if np.issubdtype(geometry.dtype, np.integer):
        return geometry.size == 0 or (geometry.min() >= -32768 and geometry.max() <= 32767)
    return False


_DOSE_UNIT_RE = re.compile(
    r"^\s*(gy|cgy|mgy)\s*(?:per|/)\s*(?:(\d+(?:\.\d*)?(?:e[+-]?\d+)?)\s*)?(?:primary|primaries|protons?)\s*$",
    re.IGNORECASE)
_GRAY = {"gy": 1.0, "cgy": 1e-2, "mgy": 1e-3}


def dose_unit_factor(unit: Any, path: str | Path = "dataset") -> float:
    """The factor that turns dose in ``unit`` into :data:`~dota.constants.DOSE_UNIT` (Gy per 1e9 primaries).

    Known: Gy, cGy or mGy per primary or per N primaries (``"cGy per 1e9 primaries"``, ``"Gy/primary"``).

    Raises
    ------
    DataFileError
        For any other unit, naming the file.
    """
    text = str(unit)
    if text == DOSE_UNIT:
        return 1.0
    m = _DOSE_UNIT_RE.match(text)
    count = float(m.group(2)) if m and m.group(2) else 1.0
    if not m or not np.isfinite(count) or count <= 0:
        raise DataFileError(f"{path}: dose_unit {text!r} is not known; expected {DOSE_UNIT!r} "
                            "(Gy, cGy or mGy per N primaries are converted)")
    return _GRAY[m.group(1).lower()] * 1e9 / count


class CheckedArray:
    """A dataset array of a :class:`BeamletFile`, read with checks: every read is refused (one
    :class:`~dota.errors.DataFileError` naming the file and the beamlets) if it holds NaN or inf, and dose
    is converted to the canonical unit (``scale``). Index it like the h5py dataset it wraps."""

    def __init__(self, dataset: h5py.Dataset, path: Path, name: str, scale: float = 1.0) -> None:
        self._ds, self._path, self._name, self._scale = dataset, path, name, float(scale)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._ds.shape)

    @property
    def ndim(self) -> int:
        return self._ds.ndim

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32) if self._scale != 1.0 else self._ds.dtype

    def __len__(self) -> int:
        return int(self._ds.shape[0])

    def __getattr__(self, name: str) -> Any:  # chunks, compression, attrs, ...
        return getattr(self._ds, name)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = self[...]
        return a if dtype is None else a.astype(dtype, copy=False)

    def __getitem__(self, index: Any) -> np.ndarray:
        try:
            a = self._ds[index]
        except OSError as exc:
            raise DataFileError(f"{self._path}: cannot read {self._name} ({exc}); the file may be corrupt") from None
        if self._scale != 1.0:
            a = (np.asarray(a, dtype=np.float64) * self._scale).astype(np.float32)
        if np.asarray(a).dtype.kind == "f" and not np.isfinite(a).all():
            raise DataFileError(f"{self._path}: {self._name} of beamlet(s) {self._rows(index, np.asarray(a))} "
                                "contains NaN or inf; refusing to read it")
        return a

    def _rows(self, index: Any, a: np.ndarray) -> list[int] | str:
        n = len(self)
        if isinstance(index, (int, np.integer)):
            return [int(index) % n]
        if isinstance(index, slice):
            rows = np.arange(n)[index]
        elif index is Ellipsis:
            rows = np.arange(n)
        elif isinstance(index, (list, np.ndarray)):
            rows = np.asarray(index).reshape(-1)
        else:
            return "selected"
        if a.ndim == 0 or len(a) != len(rows):
            return "selected"
        bad = ~np.isfinite(a.reshape(len(a), -1)).all(axis=1)
        return rows[bad][:5].astype(int).tolist()


class BeamletFile:
    """Lazy reader of one dataset file (the shared format, or the original DoTA layout).

    Opening checks what the writer checks (shapes, energies finite and positive, three positive voxel
    sizes, meta and uncertainty with one row per beamlet, a known ``dose_unit``); ``geometry``, ``dose`` and
    ``uncertainty`` are :class:`CheckedArray` views that refuse NaN or inf on every read and give dose in
    :data:`~dota.constants.DOSE_UNIT` whatever unit the file stores (``attrs["dose_unit_in_file"]``).

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
        geometry, dose = f["geometry"], f["dose"] if "dose" in f else None
        uncertainty = f["uncertainty"] if "uncertainty" in f else None
        for name, arr in (("geometry", geometry), ("dose", dose), ("energy", f["energy"]),
                          ("uncertainty", uncertainty)):
            if arr is not None and (not isinstance(arr, h5py.Dataset) or arr.dtype.kind not in "fiu"):
                raise DataFileError(f"{self.path}: '{name}' is not a numeric array")
        try:
            self.energy = np.asarray(f["energy"][...], dtype=np.float32).reshape(-1)
        except OSError as exc:
            raise DataFileError(f"{self.path}: cannot read the energies ({exc}); the file may be corrupt") from None
        if geometry.ndim != 4:
            raise DataFileError(f"{self.path}: geometry must be 4-D (N, L, H, W), found {geometry.shape}")
        n = geometry.shape[0]
        if dose is not None and dose.shape != geometry.shape:
            raise DataFileError(f"{self.path}: dose shape {dose.shape} != geometry shape {geometry.shape}")
        if self.energy.shape[0] != n:
            raise DataFileError(f"{self.path}: {self.energy.shape[0]} energies for {n} beamlets")
        bad = np.flatnonzero(~np.isfinite(self.energy) | (self.energy <= 0))
        if bad.size:
            raise DataFileError(f"{self.path}: energies must be finite and positive MeV; beamlet {int(bad[0])} "
                                f"has {float(self.energy[bad[0]])}")
        if uncertainty is not None and uncertainty.shape not in (geometry.shape, (n,)):
            raise DataFileError(f"{self.path}: uncertainty shape {uncertainty.shape} is neither the dose shape "
                                f"{geometry.shape} nor ({n},)")
        if "meta" in f:
            for k, v in f["meta"].items():
                if not isinstance(v, h5py.Dataset) or v.ndim == 0 or v.shape[0] != n:
                    rows = v.shape[0] if isinstance(v, h5py.Dataset) and v.ndim else "no"
                    raise DataFileError(f"{self.path}: meta/{k} has {rows} rows for {n} beamlets")
        self.attrs = {k: _attr(v) for k, v in f.attrs.items()}
        missing = [k for k in REQUIRED_ATTRS if k not in self.attrs]
        if missing:
            raise DataFileError(f"{self.path}: required attributes missing: {missing}")
        try:
            version = int(self.attrs["format_version"])
        except (TypeError, ValueError):
            version = None
        if version != FORMAT_VERSION:
            raise DataFileError(f"{self.path}: format_version {self.attrs['format_version']} is not supported")
        voxel = np.asarray(self.attrs["voxel_size_mm"], dtype=object).reshape(-1)
        try:
            voxel = voxel.astype(np.float64)
        except (TypeError, ValueError):
            voxel = np.full(1, np.nan)
        if voxel.shape != (3,) or not np.isfinite(voxel).all() or (voxel <= 0).any():
            raise DataFileError(f"{self.path}: voxel_size_mm must be three positive millimetre values, "
                                f"found {self.attrs['voxel_size_mm']!r}")
        scale = dose_unit_factor(self.attrs["dose_unit"], self.path)
        if scale != 1.0:
            self.attrs["dose_unit_in_file"] = self.attrs["dose_unit"]
            self.attrs["dose_unit"] = DOSE_UNIT
        self.dose_scale = scale
        self.geometry = CheckedArray(geometry, self.path, "geometry")
        self.dose = None if dose is None else CheckedArray(dose, self.path, "dose", scale)
        self.uncertainty = None if uncertainty is None else CheckedArray(uncertainty, self.path, "uncertainty")

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
        """Read beamlets ``index`` (default all) into memory; h5py fancy indexing needs sorted indices.

        Dose is in :data:`~dota.constants.DOSE_UNIT` (converted from the file's ``dose_unit``); beamlets
        holding NaN or inf are refused with a :class:`~dota.errors.DataFileError`."""
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
        except DataFileError:
            raise
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
