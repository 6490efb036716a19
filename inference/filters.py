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


def _upload(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(device)[None, None]


def _gaussian(volume: torch.Tensor, sigma: Sequence[float]) -> torch.Tensor:
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        for axis, s in enumerate(sigma):
            radius = int(GAUSSIAN_TRUNCATE * float(s) + 0.5)
            x = torch.arange(-radius, radius + 1, dtype=torch.float64)
            kernel = torch.exp(-0.5 * (x / float(s)) ** 2)
            kernel = (kernel / kernel.sum()).to(torch.float32).to(volume.device)
            shape = [1, 1, 1, 1, 1]
            shape[2 + axis] = kernel.numel()
            widths = [0, 0, 0]
            widths[axis] = radius
            volume = F.conv3d(_symmetric_pad(volume, widths), kernel.reshape(shape))
    return volume


def _maximum(volume: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """For a maximum, scipy's mirrored border adds only values already in the window, so the
    pooling's own border (ignored cells) gives the same result."""
    kernel = tuple(int(s) for s in size)
    return F.max_pool3d(volume, kernel, stride=1, padding=tuple(k // 2 for k in kernel))


def dog_peaks(
    grid: np.ndarray,
    mask: np.ndarray,
    sigma: Sequence[float],
    size: Sequence[int],
    device: torch.device | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Local maxima (within ``size``) of the difference of Gaussians at ``sigma`` and 1.6 x
    ``sigma``, positive and inside ``mask``: the smoothed image, the peaks' (k, j, i) in
    row-major order and their responses. On a GPU everything stays there but the peaks and
    the smoothed image (for the Hessian at the peaks)."""
    sigma = [float(s) for s in sigma]
    if not on_gpu(device):
        smooth = ndimage.gaussian_filter(grid, sigma, truncate=GAUSSIAN_TRUNCATE)
        wide = ndimage.gaussian_filter(grid, [s * 1.6 for s in sigma], truncate=GAUSSIAN_TRUNCATE)
        response = smooth - wide
        peaks = (
            (response == ndimage.maximum_filter(response, size=tuple(size))) & (response > 0) & mask
        )
        return smooth, np.argwhere(peaks), response[peaks]
    assert device is not None
    volume = _upload(grid, device)
    smoothed = _gaussian(volume, sigma)
    dog = smoothed - _gaussian(volume, [s * 1.6 for s in sigma])
    inside = torch.from_numpy(np.ascontiguousarray(mask)).to(device)[None, None]
    maxima = (dog == _maximum(dog, size)) & (dog > 0) & inside
    kji = torch.nonzero(maxima[0, 0]).cpu().numpy()
    return smoothed[0, 0].cpu().numpy(), kji, dog[maxima].cpu().numpy()


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
