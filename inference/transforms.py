"""Small preprocessing steps, one class each, chained with :class:`Compose` (MONAI's pattern)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from inference.volume import Volume

Transform = Callable[[Volume], Volume]
ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)

#: The HU window the network sees (low, high): air to dense soft tissue. Lung findings live
#: inside it; metal and bone add nothing but range. Patches are padded with ``low`` (air).
NETWORK_HU_WINDOW = (-1024.0, 400.0)
#: Below this (in voxels) a Gaussian changes nothing worth its pass over the scan.
SMALLEST_SIGMA_VOXELS = 0.05


class Compose:
    """Apply transforms in order; the pipeline reads as the list it is built from."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, volume: Volume) -> Volume:
        for transform in self.transforms:
            volume = transform(volume)
        return volume


class ResampleToSpacing:
    """Trilinear resampling to (nearly) isotropic voxels so the network sees one scale.

    The output spacing is adjusted so that an integer number of voxels covers exactly the
    input's extent: the physical field of view and the voxel centres stay aligned with the
    source, which keeps positions mapped back to DICOM exact. Runs through torch, which uses
    every core, where scipy's zoom would use one.
    """

    def __init__(self, spacing_mm: float) -> None:
        if spacing_mm <= 0:
            raise ValueError(f"spacing must be positive, got {spacing_mm}")
        self.spacing_mm = spacing_mm

    def __call__(self, volume: Volume) -> Volume:
        shape_kji = volume.array.shape
        spacing_kji = volume.spacing[::-1]
        new_shape = tuple(
            max(1, round(n * s / self.spacing_mm))
            for n, s in zip(shape_kji, spacing_kji, strict=True)
        )
        tensor = torch.from_numpy(np.ascontiguousarray(volume.array, dtype=np.float32))
        out = F.interpolate(
            tensor[None, None], size=new_shape, mode="trilinear", align_corners=False
        )
        new_spacing_kji = [
            s * n / m for s, n, m in zip(spacing_kji, shape_kji, new_shape, strict=True)
        ]
        # With align_corners=False the first output voxel centre sits half a new voxel minus
        # half an old voxel beyond the first input voxel centre, along each axis.
        shift_ijk = np.array(
            [(ns - os) / 2 for ns, os in zip(new_spacing_kji, spacing_kji, strict=True)][::-1]
        )
        origin = np.asarray(volume.origin) + np.asarray(volume.direction) @ shift_ijk
        return Volume(
            out[0, 0].numpy(),
            (float(origin[0]), float(origin[1]), float(origin[2])),
            (new_spacing_kji[2], new_spacing_kji[1], new_spacing_kji[0]),
            volume.direction,
        )


class ThickenSlices:
    """Make a thin-slice scan look as a ``slice_mm`` reconstruction of it would on the
    network's grid; scans as thick or thicker pass unchanged.

    A model trained in one patient's 2.5 mm scan meets the sharper vessels of a 1.25 mm scan
    as something new, and scores them as nodules. Bringing every scan to one slice profile
    (the thickest common in chest CT) gives the network one look per structure whatever the
    scanner. A slice of thickness T sampled every T and interpolated onto a finer grid spreads
    a point along the slice axis with a variance of T^2 / 12 (the slice's profile) plus T^2 / 6
    (the interpolation, averaged over where the point falls): T^2 / 4. A scan of spacing t
    already has t^2 / 4; a Gaussian along the slice axis adds the difference. In-plane voxels
    and the grid stay as they are, so positions and masks on the grid keep their meaning.
    """

    def __init__(self, slice_mm: float) -> None:
        if slice_mm < 0:
            raise ValueError(f"slice thickness must not be negative, got {slice_mm}")
        self.slice_mm = slice_mm

    def sigma_mm(self, spacing_mm: float) -> float:
        """The Gaussian's width along the slice axis for a scan of ``spacing_mm`` slices."""
        return math.sqrt(max(0.0, self.slice_mm**2 - spacing_mm**2) / 4)

    def __call__(self, volume: Volume) -> Volume:
        spacing_mm = volume.spacing[2]
        sigma = self.sigma_mm(spacing_mm) / spacing_mm
        if sigma < SMALLEST_SIGMA_VOXELS:
            return volume
        array = np.asarray(volume.array, dtype=np.float32)
        return volume.with_array(ndimage.gaussian_filter1d(array, sigma, axis=0, mode="nearest"))


class ClipHU:
    """Limit intensities to a window of Hounsfield units.

    Args:
        low: HU below which every voxel reads as ``low``.
        high: HU above which every voxel reads as ``high``; must exceed ``low``.
    """

    def __init__(self, low: float, high: float) -> None:
        if low >= high:
            raise ValueError(f"low ({low}) must be below high ({high})")
        self.low, self.high = low, high

    def __call__(self, volume: Volume) -> Volume:
        return volume.with_array(np.clip(volume.array, self.low, self.high).astype(np.float32))


def normalize_hu(array: ArrayT) -> ArrayT:
    """Scale HU clipped to :data:`NETWORK_HU_WINDOW` to [0, 1]: the network's input convention."""
    low, high = NETWORK_HU_WINDOW
    return (array - low) / (high - low)
