"""Candidate nodule centres: blob responses at several scales inside the lungs.

Recall matters more than precision here; Res-MTNet rejects the vessels and airways that
come along. Faint ground-glass nodules would lose against vessels in a plain HU image, so
the image is clipped at the soft-tissue end first: a vessel then stands out no more than a
ground-glass nodule of the same size, and each scale keeps its own strongest responses,
ranked with a Hessian blobness term so that round things beat the far more numerous vessel
cross-sections.
The search runs inside the lungs' bounding box, large blobs on a grid half as fine, and the
scales in parallel threads (scipy's filters release the GIL).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from inference.filters import dog_peaks, on_gpu
from inference.volume import Volume

#: Nodule radii (mm) the detector is tuned for: 3 to 30 mm nodules.
BLOB_RADII_MM = (2.0, 3.5, 6.0, 10.0, 15.0)
#: Radii from which the search runs on a grid downsampled by two.
COARSE_FROM_MM = 5.0
#: Ranking weight left to a perfectly tubular peak: juxtavascular nodules look partly tubular.
BLOBNESS_FLOOR = 0.2
CLIP_LOW_HU, CLIP_HIGH_HU = -1000.0, -350.0


@dataclass(frozen=True)
class BlobCandidate:
    """A voxel (k, j, i) on the preprocessed grid and the blob radius that fired there.

    ``response`` is the difference-of-Gaussians value weighted by blobness: what ranks it.
    """

    kji: tuple[int, int, int]
    radius_mm: float
    response: float


def find_candidates(
    volume: Volume,
    lungs: np.ndarray,
    per_scale: int = 200,
    min_distance_mm: float = 4.0,
    device: torch.device | None = None,
) -> list[BlobCandidate]:
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

    def search(radius: float) -> list[BlobCandidate]:
        factor = 2 if radius >= COARSE_FROM_MM else 1
        grid, mask = grids[factor]
        scale = np.array(grids[1][0].shape) / np.array(grid.shape)
        sigma_vox = radius / np.sqrt(3.0) / (spacing_kji * scale)
        size = tuple(int(max(3, round(radius / s) | 1)) for s in spacing_kji * scale)
        smooth, kji, values = dog_peaks(grid, mask, sigma_vox, size, device)
        ranking = values * (BLOBNESS_FLOOR + blobness(smooth, kji, spacing_kji * scale))
        order = np.argsort(ranking)[::-1][:per_scale]
        fine = np.minimum(np.round((kji[order] + 0.5) * scale - 0.5), np.array(image.shape) - 1)
        return [
            BlobCandidate(tuple(int(x) for x in p + offset), radius, float(v))  # type: ignore[arg-type]
            for p, v in zip(fine.astype(int), ranking[order], strict=True)
        ]

    # On the CPU the scales run in two threads (scipy's filters release the GIL); a GPU
    # takes them one after the other.
    with ThreadPoolExecutor(max_workers=1 if on_gpu(device) else 2) as pool:
        found = [c for scale in pool.map(search, BLOB_RADII_MM) for c in scale]
    return merge_close(found, spacing_kji, min_distance_mm)


def blobness(smooth: np.ndarray, kji: np.ndarray, spacing_kji: np.ndarray) -> np.ndarray:
    """0..1 per point: how round the bright structure there is, from the Hessian.

    A blob curves down along all three axes (three negative eigenvalues of similar size); a
    vessel is flat along its course and a fissure or the pleura along two axes, so the
    smallest curvature over the largest tells them apart. Computed at the peaks only, by
    central differences of the already smoothed image.
    """
    if len(kji) == 0:
        return np.zeros(0)
    padded = np.pad(smooth, 1, mode="edge")
    p = kji + 1

    def at(dk: int, dj: int, di: int) -> np.ndarray:
        return padded[p[:, 0] + dk, p[:, 1] + dj, p[:, 2] + di]

    centre = at(0, 0, 0)
    hessian = np.empty((len(kji), 3, 3))
    steps = np.eye(3, dtype=int)
    for a in range(3):
        ea = steps[a]
        hessian[:, a, a] = (at(*ea) - 2 * centre + at(*-ea)) / spacing_kji[a] ** 2
        for b in range(a + 1, 3):
            eb = steps[b]
            mixed = at(*(ea + eb)) - at(*(ea - eb)) - at(*(eb - ea)) + at(*(-ea - eb))
            hessian[:, a, b] = hessian[:, b, a] = mixed / (4 * spacing_kji[a] * spacing_kji[b])
    eigen = np.linalg.eigvalsh(hessian)  # ascending: most negative first
    strongest, weakest = -eigen[:, 0], -eigen[:, 2]
    return np.where(strongest > 0, np.clip(weakest / np.maximum(strongest, 1e-9), 0.0, 1.0), 0.0)


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
    candidates: list[BlobCandidate], spacing_kji: np.ndarray, min_distance_mm: float
) -> list[BlobCandidate]:
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
