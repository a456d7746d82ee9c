"""MetaImage (``.mhd`` header + ``.raw`` data) as MCsquare reads its CT and writes its dose.

The package's one MetaImage reader and writer of its own, for the files exchanged with MCsquare (beamlet
blocks here, whole CTs in :mod:`dota.plan.mcsquare_plan`): uncompressed, little-endian, axis-aligned,
no SimpleITK needed. Patient images in any format (MetaImage with direction, NRRD, NIfTI) are read and
written with SimpleITK by :mod:`dota.plan.geometry` and :mod:`dota.plan.doseio`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dota.errors import DataFileError

_ELEMENT_TYPES = {np.dtype(np.float32): "MET_FLOAT", np.dtype(np.int16): "MET_SHORT",
                  np.dtype(np.float64): "MET_DOUBLE", np.dtype(np.int32): "MET_INT"}


def write_mhd(path: str | os.PathLike, array_zyx: np.ndarray, spacing_xyz_mm: Sequence[float],
              origin_xyz_mm: Sequence[float] = (0.0, 0.0, 0.0)) -> Path:
    """Write a MetaImage (``.mhd`` header + ``.raw`` data) from a C-order (z, y, x) array; other dtypes
    than float32/64 and int16/32 are written as float32."""
    path = Path(path)
    arr = np.ascontiguousarray(array_zyx)
    if arr.dtype not in _ELEMENT_TYPES:
        arr = arr.astype(np.float32)
    raw = path.with_suffix(".raw")
    arr.astype(arr.dtype.newbyteorder("<"), copy=False).tofile(raw)
    nz, ny, nx = arr.shape
    path.write_text(
        "ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
        "CompressedData = False\n"
        f"Offset = {' '.join(f'{v:g}' for v in origin_xyz_mm)}\n"
        f"ElementSpacing = {' '.join(f'{v:g}' for v in spacing_xyz_mm)}\n"
        f"DimSize = {nx} {ny} {nz}\n"
        f"ElementType = {_ELEMENT_TYPES[arr.dtype]}\n"
        f"ElementDataFile = {raw.name}\n"
    )
    return path


def read_mhd(path: str | os.PathLike) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Read an uncompressed MetaImage; return ``(array (z, y, x) float32, spacing (x, y, z) mm)``."""
    path = Path(path)
    try:
        header = dict(
            (k.strip(), v.strip()) for k, v in (ln.split("=", 1) for ln in path.read_text().splitlines() if "=" in ln)
        )
        dims = [int(v) for v in header["DimSize"].split()]
        spacing = tuple(float(v) for v in header["ElementSpacing"].split())
        dtype = {"MET_FLOAT": "<f4", "MET_DOUBLE": "<f8", "MET_SHORT": "<i2", "MET_INT": "<i4"}[header["ElementType"]]
        data = np.fromfile(path.parent / header["ElementDataFile"], dtype=dtype)
    except (OSError, KeyError, ValueError) as exc:
        raise DataFileError(f"cannot read MetaImage {path}: {exc}") from None
    if data.size != int(np.prod(dims)):
        raise DataFileError(f"{path}: {data.size} values for a {dims} image")
    return data.reshape(dims[::-1]).astype(np.float32), spacing  # type: ignore[return-value]
