"""Procedural CT blocks in the beam's-eye view, to feed the dose engines (``dota generate --phantom``).

Every phantom is a float32 block of CT numbers (HU), depth-major (L, H, W), the beam entering at
depth 0 and centred laterally, built only from the materials of :data:`MATERIAL_HU_RANGES` (each
object draws one integer HU inside its material's range). The result depends only on the state of
the generator passed in.

Kinds (:data:`PHANTOM_KINDS`):

``water``
    Water everywhere (0 HU).
``slab``
    Water with one slab perpendicular to the beam: lung, fat, soft tissue, bone or air, 4-40 mm thick.
``heterogeneous``
    Water or soft-tissue background with 1-4 slabs (perpendicular or tilted up to 60 degrees), 0-3
    ellipsoids (lung, fat, soft tissue, bone, air cavities), 0-2 lateral interfaces (a material
    boundary running along the beam, so that part of the spot crosses it), and half the time an air
    gap before an oblique skin surface.
``lung``
    Chest-wall-like: optional air gap, fat and muscle layers, often a rib, then lung holding a
    soft-tissue tumour, sometimes followed by mediastinal soft tissue.
``bone``
    Head-like: soft tissue with a tilted bone plate near the surface, bony ellipsoids deeper, and
    sometimes a fat layer or an air cavity (sinus).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dota.constants import BLOCK_SHAPE, VOXEL_MM
from dota.errors import InputError
from dota.physics.depth import check_voxel_mm

#: HU range (inclusive) of each phantom material.
MATERIAL_HU_RANGES: dict[str, tuple[float, float]] = {
    "air": (-1000.0, -1000.0),
    "lung": (-850.0, -650.0),
    "fat": (-120.0, -80.0),
    "water": (0.0, 0.0),
    "soft_tissue": (20.0, 60.0),
    "bone": (700.0, 1500.0),
}

PHANTOM_KINDS: tuple[str, ...] = ("water", "slab", "heterogeneous", "lung", "bone")


class _Block:
    """Voxel-centre coordinates (mm) of a block: depth from the entrance, lateral from the beam axis."""

    def __init__(self, shape: tuple[int, int, int], voxel_mm: tuple[float, float, float], rng: np.random.Generator):
        length, rows, cols = shape
        dz, dy, dx = voxel_mm
        self.rng = rng
        self.z = ((np.arange(length) + 0.5) * dz).reshape(-1, 1, 1)
        self.y = ((np.arange(rows) - (rows - 1) / 2) * dy).reshape(1, -1, 1)
        self.x = ((np.arange(cols) - (cols - 1) / 2) * dx).reshape(1, 1, -1)
        self.depth_mm = length * dz
        self.half_width_mm = 0.5 * max(rows * dy, cols * dx)
        self.hu = np.zeros(shape, dtype=np.float32)

    def hu_of(self, material: str) -> float:
        lo, hi = MATERIAL_HU_RANGES[material]
        return float(np.round(self.rng.uniform(lo, hi))) if hi > lo else lo

    def paint(self, mask: np.ndarray, material: str) -> None:
        self.hu[np.broadcast_to(mask, self.hu.shape)] = self.hu_of(material)

    def unit_vector(self, tilt_max_deg: float) -> np.ndarray:
        """A direction (z, y, x) within ``tilt_max_deg`` of the beam axis, random azimuth."""
        tilt = np.deg2rad(self.rng.uniform(0.0, tilt_max_deg))
        azimuth = self.rng.uniform(0.0, 2.0 * np.pi)
        return np.array([np.cos(tilt), np.sin(tilt) * np.cos(azimuth), np.sin(tilt) * np.sin(azimuth)])

    def slab(self, depth_mm: float, thickness_mm: float, tilt_max_deg: float = 0.0) -> np.ndarray:
        """Voxels within ``thickness/2`` of a plane through (depth, 0, 0) whose normal is tilted from the axis."""
        n = self.unit_vector(tilt_max_deg)
        distance = n[0] * (self.z - depth_mm - 0.5 * thickness_mm) + n[1] * self.y + n[2] * self.x
        return np.abs(distance) < 0.5 * thickness_mm

    def ellipsoid(self, centre_mm: Sequence[float], radii_mm: Sequence[float]) -> np.ndarray:
        """Voxels inside a randomly oriented ellipsoid."""
        rotation, _ = np.linalg.qr(self.rng.normal(size=(3, 3)))
        d = (self.z - centre_mm[0], self.y - centre_mm[1], self.x - centre_mm[2])
        total = 0.0
        for axis in range(3):
            along = rotation[0, axis] * d[0] + rotation[1, axis] * d[1] + rotation[2, axis] * d[2]
            total = total + (along / radii_mm[axis]) ** 2
        return total <= 1.0

    def interface(self, offset_mm: float, depth_from_mm: float, depth_to_mm: float) -> np.ndarray:
        """A half-space bounded by a plane nearly parallel to the beam (tilted up to 20 degrees), between two depths."""
        azimuth = self.rng.uniform(0.0, 2.0 * np.pi)
        tilt = np.deg2rad(self.rng.uniform(-20.0, 20.0))
        side = np.cos(azimuth) * self.y + np.sin(azimuth) * self.x + np.tan(tilt) * (self.z - depth_from_mm)
        return (side > offset_mm) & (self.z >= depth_from_mm) & (self.z < depth_to_mm)

    def entrance_air(self, gap_mm: float, tilt_max_deg: float) -> np.ndarray:
        """Air upstream of an oblique skin surface that crosses the axis at ``gap_mm``."""
        n = self.unit_vector(tilt_max_deg)
        return n[0] * (self.z - gap_mm) + n[1] * self.y + n[2] * self.x < 0.0


def _slab_phantom(b: _Block) -> None:
    rng = b.rng
    material = str(rng.choice(["lung", "fat", "soft_tissue", "bone", "air"]))
    depth = rng.uniform(10.0, 0.6 * b.depth_mm)
    b.paint(b.slab(depth, rng.uniform(4.0, 40.0)), material)


def _heterogeneous_phantom(b: _Block) -> None:
    rng = b.rng
    b.hu[:] = b.hu_of(str(rng.choice(["water", "soft_tissue"])))
    for _ in range(int(rng.integers(1, 5))):
        tilt = 0.0 if rng.random() < 0.5 else 60.0
        material = str(rng.choice(["lung", "fat", "soft_tissue", "bone"]))
        b.paint(b.slab(rng.uniform(0.0, 0.8 * b.depth_mm), rng.uniform(4.0, 40.0), tilt), material)
    for _ in range(int(rng.integers(0, 3))):
        start = rng.uniform(0.0, 0.7 * b.depth_mm)
        mask = b.interface(rng.uniform(-0.5, 0.5) * b.half_width_mm, start, start + rng.uniform(20.0, 150.0))
        b.paint(mask, str(rng.choice(["lung", "fat", "soft_tissue", "bone"])))
    for _ in range(int(rng.integers(0, 4))):
        centre = (
            rng.uniform(0.05, 0.9) * b.depth_mm,
            rng.uniform(-1.0, 1.0) * b.half_width_mm,
            rng.uniform(-1.0, 1.0) * b.half_width_mm,
        )
        material = str(rng.choice(["lung", "fat", "soft_tissue", "bone", "air"]))
        b.paint(b.ellipsoid(centre, rng.uniform(4.0, 30.0, 3)), material)
    if rng.random() < 0.5:
        b.paint(b.entrance_air(rng.uniform(0.0, 30.0), 30.0), "air")


def _lung_phantom(b: _Block) -> None:
    rng = b.rng
    b.hu[:] = b.hu_of("soft_tissue")
    depth = rng.uniform(0.0, 20.0)
    air_gap = depth
    depth += rng.uniform(2.0, 5.0)  # skin, soft tissue
    fat = rng.uniform(5.0, 20.0)
    b.paint((b.z >= depth) & (b.z < depth + fat), "fat")
    depth += fat + rng.uniform(10.0, 30.0)  # muscle, soft tissue
    if rng.random() < 0.7:
        rib = rng.uniform(6.0, 12.0)
        centre = rng.uniform(-1.0, 1.0) * b.half_width_mm
        width = rng.uniform(8.0, 16.0)
        b.paint((b.z >= depth) & (b.z < depth + rib) & (np.abs(b.y - centre) < 0.5 * width), "bone")
        depth += rib
    lung_end = rng.uniform(0.6, 1.0) * b.depth_mm
    b.paint((b.z >= depth) & (b.z < lung_end), "lung")
    centre = (
        rng.uniform(depth + 10.0, max(depth + 10.0, min(lung_end, 0.8 * b.depth_mm))),
        rng.uniform(-0.5, 0.5) * b.half_width_mm,
        rng.uniform(-0.5, 0.5) * b.half_width_mm,
    )
    b.paint(b.ellipsoid(centre, rng.uniform(5.0, 25.0, 3)), "soft_tissue")
    if air_gap > 0.0:
        b.paint(b.entrance_air(air_gap, 20.0), "air")


def _bone_phantom(b: _Block) -> None:
    rng = b.rng
    b.hu[:] = b.hu_of("soft_tissue")
    surface = rng.uniform(0.0, 15.0)
    if rng.random() < 0.5:
        b.paint(b.slab(surface + rng.uniform(2.0, 10.0), rng.uniform(5.0, 20.0)), "fat")
    b.paint(b.slab(surface + rng.uniform(3.0, 15.0), rng.uniform(4.0, 12.0), 45.0), "bone")
    for _ in range(int(rng.integers(1, 4))):
        centre = (
            rng.uniform(0.2, 0.8) * b.depth_mm,
            rng.uniform(-1.0, 1.0) * b.half_width_mm,
            rng.uniform(-1.0, 1.0) * b.half_width_mm,
        )
        b.paint(b.ellipsoid(centre, rng.uniform(5.0, 25.0, 3)), "bone")
    if rng.random() < 0.5:
        centre = (rng.uniform(0.1, 0.5) * b.depth_mm, rng.uniform(-0.5, 0.5) * b.half_width_mm, 0.0)
        b.paint(b.ellipsoid(centre, rng.uniform(8.0, 20.0, 3)), "air")
    if surface > 0.0:
        b.paint(b.entrance_air(surface, 30.0), "air")


_BUILDERS = {
    "water": lambda b: None,
    "slab": _slab_phantom,
    "heterogeneous": _heterogeneous_phantom,
    "lung": _lung_phantom,
    "bone": _bone_phantom,
}


def make_phantom(
    kind: str,
    rng: np.random.Generator,
    shape: Sequence[int] = BLOCK_SHAPE,
    voxel_mm: Sequence[float] = VOXEL_MM,
) -> np.ndarray:
    """A procedural CT block (float32 HU, ``shape`` = (L, H, W)) of the given kind; see the module docstring.

    Raises
    ------
    InputError
        On an unknown kind, a shape that is not three positive integers, or a bad voxel size.
    """
    if kind not in _BUILDERS:
        raise InputError(f"unknown phantom kind {kind!r}; choose one of {', '.join(PHANTOM_KINDS)}")
    if not isinstance(rng, np.random.Generator):
        raise InputError("rng must be a numpy.random.Generator, e.g. numpy.random.default_rng(seed)")
    try:
        dims = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise InputError(f"shape must be three positive integers (L, H, W), got {shape!r}") from None
    if len(dims) != 3 or min(dims) < 1:
        raise InputError(f"shape must be three positive integers (L, H, W), got {shape!r}")
    block = _Block(dims, check_voxel_mm(voxel_mm), rng)
    _BUILDERS[kind](block)
    return block.hu
