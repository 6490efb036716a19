"""Cutting fixed-size patches around voxels: one function, shared by training and inference,
so that the offsets the network learns mean the same thing when it runs.

With context, the network gets a second channel: the same number of voxels around the same
centre, covering ``context`` times the field at 1/``context`` of the resolution. A hilum or
the diaphragm fills a 40 mm patch as a large nodule would; 80 mm show what it belongs to."""

from __future__ import annotations

import numpy as np

from inference.transforms import NETWORK_HU_WINDOW, normalize_hu

#: What lies beyond the image: air.
PAD_HU = NETWORK_HU_WINDOW[0]


def crop_cube(image: np.ndarray, corner_kji: np.ndarray, size: int) -> np.ndarray:
    """A float32 copy of ``image[corner : corner + size]`` per axis; voxels beyond it read as air."""
    out = np.full((size, size, size), PAD_HU, dtype=np.float32)
    lo = np.asarray(corner_kji, dtype=int)
    src_lo = np.maximum(lo, 0)
    src_hi = np.minimum(lo + size, image.shape)
    if np.any(src_hi <= src_lo):
        return out
    dst_lo = src_lo - lo
    dst_hi = dst_lo + (src_hi - src_lo)
    out[tuple(slice(a, b) for a, b in zip(dst_lo, dst_hi, strict=True))] = image[
        tuple(slice(a, b) for a, b in zip(src_lo, src_hi, strict=True))
    ]
    return out


def patch_geometric_centre(centres_kji: np.ndarray) -> np.ndarray:
    """Where the middle of an even-sized patch lies: half a voxel before its centre voxel.

    Offsets are measured from here so that flipping a patch simply negates them.
    """
    return np.asarray(centres_kji, dtype=float) - 0.5


def extract_patches(image: np.ndarray, centres_kji: np.ndarray, size: int) -> np.ndarray:
    """(N, size, size, size) float32 patches in [0, 1]; patch n covers c - size/2 .. c + size/2 - 1."""
    half = size // 2
    out = np.empty((len(centres_kji), size, size, size), dtype=np.float32)
    for n, centre in enumerate(np.asarray(centres_kji, dtype=int).reshape(-1, 3)):
        out[n] = crop_cube(image, centre - half, size)
    return normalize_hu(np.clip(out, *NETWORK_HU_WINDOW))


def coarsened(cube: np.ndarray, factor: int) -> np.ndarray:
    """``cube``'s last three axes averaged in blocks of ``factor`` voxels per axis; block n's
    middle lies where voxel n's would on a grid of that spacing, so a patch and its coarsened
    surroundings share their geometric centre. (Strided sums: numpy's mean over a reshaped
    array takes five times as long.)"""
    if factor == 1:
        return cube
    total = np.zeros(cube[..., ::factor, ::factor, ::factor].shape, dtype=np.float32)
    for k in range(factor):
        for j in range(factor):
            for i in range(factor):
                total += cube[..., k::factor, j::factor, i::factor]
    return total / np.float32(factor**3)


def network_input(
    image: np.ndarray, centres_kji: np.ndarray, size: int, context: int = 1
) -> np.ndarray:
    """(N, C, size, size, size) float32 in [0, 1]: :func:`extract_patches`, and with
    ``context`` > 1 the wider, coarser channel around the same centres."""
    fine = extract_patches(image, centres_kji, size)[:, None]
    if context == 1:
        return fine
    wide = size * context
    coarse = np.empty_like(fine)
    for n, centre in enumerate(np.asarray(centres_kji, dtype=int).reshape(-1, 3)):
        cube = crop_cube(image, centre - wide // 2, wide)
        np.clip(cube, *NETWORK_HU_WINDOW, out=cube)  # in place: the wide cube is 8x a patch
        coarse[n, 0] = coarsened(cube, context)
    return np.concatenate([fine, normalize_hu(coarse)], axis=1)
