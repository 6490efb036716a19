"""Candidate nodule centres: blob responses at several scales inside the lungs.

Recall matters more than precision here; Res-MTNet rejects the vessels and airways that
come along. Faint ground-glass nodules would lose against vessels in a plain HU image, so
the image is clipped at the soft-tissue end first: a vessel then stands out no more than a
ground-glass nodule of the same size, and each scale keeps its own strongest responses.
The search runs inside the lungs' bounding box, large blobs on a grid half as fine, and the
scales in parallel threads (scipy's filters release the GIL).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from inference.volume import Volume

#: Nodule radii (mm) the detector is tuned for: 3 to 30 mm nodules.
BLOB_RADII_MM = (2.0, 3.5, 6.0, 10.0, 15.0)
#: Radii from which the search runs on a grid downsampled by two.
COARSE_FROM_MM = 5.0
CLIP_LOW_HU, CLIP_HIGH_HU = -1000.0, -350.0


@dataclass(frozen=True)
class Candidate:
    """A voxel (k, j, i) on the preprocessed grid and the blob radius that fired there."""

    kji: tuple[int, int, int]
    radius_mm: float
    response: float


def find_candidates(
    volume: Volume, lungs: np.ndarray, per_scale: int = 200, min_distance_mm: float = 4.0
) -> list[Candidate]:
    """Up to ``per_scale`` local maxima of a scale-normalised difference of Gaussians per radius.

    Maxima closer than the smaller blob's radius (at least ``min_distance_mm``) are merged,
    keeping the strongest, so each nodule gives about one candidate.
    """
    spacing_kji = np.asarray(volume.spacing[::-1])
    box = bounding_box(lungs)
    image = np.where(lungs[box], np.clip(volume.array[box], CLIP_LOW_HU, CLIP_HIGH_HU), CLIP_LOW_HU)
    offset = np.array([s.start for s in box])
    grids = {1: (image.astype(np.float32), lungs[box])}
    grids[2] = (
        ndimage.zoom(grids[1][0], 0.5, order=1, grid_mode=True, mode="nearest"),
        ndimage.zoom(grids[1][1], 0.5, order=0, grid_mode=True, mode="nearest"),
    )

    def search(radius: float) -> list[Candidate]:
        factor = 2 if radius >= COARSE_FROM_MM else 1
        grid, mask = grids[factor]
        scale = np.array(grids[1][0].shape) / np.array(grid.shape)
        sigma_vox = radius / np.sqrt(3.0) / (spacing_kji * scale)
        response = ndimage.gaussian_filter(grid, sigma_vox, truncate=3.0)
        response -= ndimage.gaussian_filter(grid, sigma_vox * 1.6, truncate=3.0)
        size = tuple(int(max(3, round(radius / s) | 1)) for s in spacing_kji * scale)
        peaks = (response == ndimage.maximum_filter(response, size=size)) & (response > 0) & mask
        kji = np.argwhere(peaks)
        values = response[peaks]
        order = np.argsort(values)[::-1][:per_scale]
        fine = np.minimum(np.round((kji[order] + 0.5) * scale - 0.5), np.array(image.shape) - 1)
        return [
            Candidate(tuple(int(x) for x in p + offset), radius, float(v))  # type: ignore[arg-type]
            for p, v in zip(fine.astype(int), values[order], strict=True)
        ]

    with ThreadPoolExecutor(max_workers=2) as pool:
        found = [c for scale in pool.map(search, BLOB_RADII_MM) for c in scale]
    return merge_close(found, spacing_kji, min_distance_mm)


def bounding_box(mask: np.ndarray, margin: int = 2) -> tuple[slice, slice, slice]:
    """The smallest box holding the mask, grown by ``margin`` voxels; the whole grid if empty."""
    if not mask.any():
        return (slice(0, mask.shape[0]), slice(0, mask.shape[1]), slice(0, mask.shape[2]))
    out = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(mask.any(axis=other))
        out.append(slice(max(0, hit[0] - margin), min(mask.shape[axis], hit[-1] + margin + 1)))
    return (out[0], out[1], out[2])


def merge_close(
    candidates: list[Candidate], spacing_kji: np.ndarray, min_distance_mm: float
) -> list[Candidate]:
    """Greedy suppression in millimetres; a larger blob absorbs smaller ones inside it."""
    if not candidates:
        return []
    ranked = sorted(candidates, key=lambda c: c.response * c.radius_mm, reverse=True)
    points = np.array([c.kji for c in ranked], dtype=float) * spacing_kji
    radii = np.array([c.radius_mm for c in ranked])
    kept: list[int] = []
    for n in range(len(ranked)):
        if kept:
            d = np.linalg.norm(points[kept] - points[n], axis=1)
            if np.any(d < np.maximum(min_distance_mm, np.minimum(radii[kept], radii[n]))):
                continue
        kept.append(n)
    return [ranked[n] for n in kept]
