"""The 3D filters of the lung mask and the candidate search, on the CPU (scipy) or a GPU (torch).

On the CPU scipy's filters are the fast choice; on a GPU the same operations as convolutions
and pooling take milliseconds instead of seconds. The torch versions compute the same thing:
scipy's Gaussian kernel and its mirror-symmetric border, the same window for the maximum, and
a ball closing that is exact (sums of 0/1 over a ball kernel are integers), so a detector gives
the same candidates on either device. TF32 is off inside them: it would round the Gaussian.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

GAUSSIAN_TRUNCATE = 3.0


def on_gpu(device: torch.device | None) -> bool:
    return device is not None and device.type != "cpu"


def gaussian_filter(
    array: np.ndarray, sigma: Sequence[float], device: torch.device | None = None
) -> np.ndarray:
    if not on_gpu(device):
        return ndimage.gaussian_filter(array, sigma, truncate=GAUSSIAN_TRUNCATE)
    return torch_gaussian_filter(array, sigma, device or torch.device("cpu"))


def maximum_filter(
    array: np.ndarray, size: Sequence[int], device: torch.device | None = None
) -> np.ndarray:
    if not on_gpu(device):
        return ndimage.maximum_filter(array, size=tuple(size))
    return torch_maximum_filter(array, size, device or torch.device("cpu"))


def ball_closing(
    mask: np.ndarray,
    spacing_kji: Sequence[float],
    radius_mm: float,
    device: torch.device | None = None,
) -> np.ndarray:
    """Morphological closing with a ball of ``radius_mm`` (voxels within the radius)."""
    if not on_gpu(device):
        return _edt_closing(mask, spacing_kji, radius_mm)
    return torch_ball_closing(mask, spacing_kji, radius_mm, device or torch.device("cpu"))


def _edt_closing(mask: np.ndarray, spacing_kji: Sequence[float], radius_mm: float) -> np.ndarray:
    """Via two distance transforms: they cost the same whatever the radius, where a
    structuring element of 10 mm makes scipy's binary_closing take tens of seconds."""
    pad = [(int(np.ceil(radius_mm / s)) + 1,) * 2 for s in spacing_kji]
    padded = np.pad(mask, pad)
    dilated = ndimage.distance_transform_edt(~padded, sampling=spacing_kji) <= radius_mm
    closed = ndimage.distance_transform_edt(dilated, sampling=spacing_kji) > radius_mm
    return closed[tuple(slice(p[0], -p[0]) for p in pad)]


def _symmetric_pad(volume: torch.Tensor, widths: Sequence[int]) -> torch.Tensor:
    """scipy's "reflect" border (d c b a | a b c d) along the last three axes: numpy's
    "symmetric" padding of the indices, which also mirrors again past a short axis."""
    for axis, width in zip((-3, -2, -1), widths, strict=True):
        if width:
            index = np.pad(np.arange(volume.shape[axis]), width, mode="symmetric")
            volume = volume.index_select(axis, torch.from_numpy(index).to(volume.device))
    return volume


def torch_gaussian_filter(
    array: np.ndarray, sigma: Sequence[float], device: torch.device
) -> np.ndarray:
    volume = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(device)[None, None]
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        for axis, s in enumerate(sigma):
            radius = int(GAUSSIAN_TRUNCATE * float(s) + 0.5)
            x = torch.arange(-radius, radius + 1, dtype=torch.float64)
            kernel = torch.exp(-0.5 * (x / float(s)) ** 2)
            kernel = (kernel / kernel.sum()).to(torch.float32).to(device)
            shape = [1, 1, 1, 1, 1]
            shape[2 + axis] = kernel.numel()
            widths = [0, 0, 0]
            widths[axis] = radius
            volume = F.conv3d(_symmetric_pad(volume, widths), kernel.reshape(shape))
    return volume[0, 0].cpu().numpy()


def torch_maximum_filter(
    array: np.ndarray, size: Sequence[int], device: torch.device
) -> np.ndarray:
    """For a maximum, scipy's mirrored border adds only values already in the window, so the
    pooling's own border (ignored cells) gives the same result."""
    volume = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(device)[None, None]
    kernel = tuple(int(s) for s in size)
    pooled = F.max_pool3d(volume, kernel, stride=1, padding=tuple(k // 2 for k in kernel))
    return pooled[0, 0].cpu().numpy()


def torch_ball_closing(
    mask: np.ndarray, spacing_kji: Sequence[float], radius_mm: float, device: torch.device
) -> np.ndarray:
    """Dilation: any voxel of the mask within the ball; erosion: every voxel within it. Both
    are sums over a 0/1 ball kernel, exact in float32. Outside the array counts as empty,
    as in the distance-transform version (which pads with empty space)."""
    reach = [int(np.floor(radius_mm / s)) for s in spacing_kji]
    grid = np.meshgrid(
        *[np.arange(-r, r + 1) * s for r, s in zip(reach, spacing_kji, strict=True)], indexing="ij"
    )
    ball = (np.sqrt(sum(g**2 for g in grid)) <= radius_mm).astype(np.float32)
    kernel = torch.from_numpy(ball).to(device)[None, None]
    pad = [int(np.ceil(radius_mm / s)) + 1 for s in spacing_kji]
    volume = torch.from_numpy(np.pad(mask, [(p, p) for p in pad]).astype(np.float32)).to(device)
    volume = volume[None, None]
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        dilated = (F.conv3d(volume, kernel, padding=tuple(reach)) > 0.5).float()
        eroded = F.conv3d(dilated, kernel, padding=tuple(reach)) > float(ball.sum()) - 0.5
    closed = eroded[0, 0].cpu().numpy()
    return closed[tuple(slice(p, -p) for p in pad)]
