"""A CT volume with the geometry needed to map voxels to DICOM patient coordinates."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def apply_affine(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Map (..., 3) points by a 4x4 homogeneous matrix."""
    return np.asarray(points, dtype=float) @ matrix[:3, :3].T + matrix[:3, 3]


@dataclass(frozen=True)
class Volume:
    """Voxels in ``(k, j, i)`` = (slice, row, column) order plus their place in LPS space.

    ``direction`` holds, as columns, the unit vectors of the i (column), j (row) and k (slice)
    index axes in patient coordinates, so one affine serves any patient orientation instead of
    assuming a head-first supine scan.
    """

    array: np.ndarray
    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]
    direction: np.ndarray

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise ValueError(f"a volume needs 3 dimensions, got shape {self.array.shape}")
        if min(self.spacing) <= 0:
            raise ValueError(f"spacing must be positive, got {self.spacing}")

    @property
    def affine(self) -> np.ndarray:
        """4x4 matrix taking homogeneous (i, j, k) indices to LPS millimetres."""
        out = np.eye(4)
        out[:3, :3] = np.asarray(self.direction) * np.asarray(self.spacing)[None, :]
        out[:3, 3] = self.origin
        return out

    def index_to_world(self, ijk: np.ndarray) -> np.ndarray:
        """Map (..., 3) indices in (i, j, k) order to LPS mm."""
        return apply_affine(self.affine, ijk)

    def world_to_index(self, xyz: np.ndarray) -> np.ndarray:
        """Map (..., 3) LPS mm to fractional (i, j, k) indices."""
        return apply_affine(np.linalg.inv(self.affine), xyz)

    def with_array(self, array: np.ndarray) -> Volume:
        """The same geometry around other voxels (a mask, a filtered image)."""
        if array.shape != self.array.shape:
            raise ValueError(f"shape {array.shape} differs from the volume's {self.array.shape}")
        return Volume(array, self.origin, self.spacing, self.direction)
