"""Real nodules pasted into other lungs: the textures synthesis cannot invent (cavities,
calcification, air bronchograms, irregular margins), at places and orientations their own
scan never had.

A nodule's voxels (its mask, grown by a feathered rim) are resampled from its volume of
interest onto the host's grid, rotated about the slice axis by any angle and flipped at
random, and blended in: inside the mask the nodule's own HU, across the rim a smooth mix of
nodule and host. Where the host is noisier than the nodule's scan, noise makes up the
difference, so that a pasted nodule is no smoother than the lung around it. The returned mask
is exactly the voxels that took the nodule's values: labels and image never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

from inference.lab.nodule_folder import NoduleVOI
from inference.patches import coarsened
from inference.transforms import NETWORK_HU_WINDOW, normalize_hu

#: Width of the blended rim around the mask (mm): no seam, and no more of the nodule's own
#: surroundings than a reader would call its edge.
FEATHER_MM = 1.5
#: Only aerated lung measures a scan's noise: tissue edges would count as noise.
NOISE_LUNG_HU = (-950.0, -650.0)


@dataclass(frozen=True)
class Placement:
    """How a nodule is put down: its centre on the host grid (k, j, i), an in-plane rotation
    and flips of the three axes."""

    centre_kji: np.ndarray
    angle_rad: float
    flips: tuple[bool, bool, bool]

    @classmethod
    def random(cls, centre_kji: np.ndarray, rng: np.random.Generator) -> Placement:
        flips = tuple(bool(f) for f in rng.random(3) < 0.5)
        return cls(np.asarray(centre_kji, float), float(rng.uniform(0, 2 * np.pi)), flips)  # type: ignore[arg-type]


def placement_showing(
    voi: NoduleVOI,
    point_kji: np.ndarray,
    at_kji: np.ndarray,
    spacing_mm: float,
    rng: np.random.Generator,
) -> Placement:
    """A random turn and flips under which the VOI's voxel ``point_kji`` lands at voxel
    ``at_kji`` of a patch on an isotropic ``spacing_mm`` grid: a view of the VOI centred
    elsewhere than on its nodule (:func:`_voi_coordinates` run backwards)."""
    turned = Placement.random(np.zeros(3), rng)
    voi_spacing = np.asarray(voi.image.spacing[::-1])
    centroid = np.argwhere(voi.mask).mean(axis=0)
    offset_mm = (np.asarray(point_kji, float) - centroid) * voi_spacing
    c, s = np.cos(turned.angle_rad), np.sin(turned.angle_rad)
    j, i = offset_mm[1], offset_mm[2]
    offset_mm[1], offset_mm[2] = c * j + s * i, -s * j + c * i
    for axis, flip in enumerate(turned.flips):
        if flip:
            offset_mm[axis] *= -1
    return replace(turned, centre_kji=np.asarray(at_kji, float) - offset_mm / spacing_mm)


def noise_sigma(image: np.ndarray, box: tuple[slice, ...] | None = None) -> float:
    """The scan's noise in aerated lung: the spread of what a light blur removes."""
    region = image[box] if box is not None else image
    residual = region - ndimage.gaussian_filter(region, 1.0)
    lung = (region > NOISE_LUNG_HU[0]) & (region < NOISE_LUNG_HU[1])
    if lung.sum() < 50:
        return 0.0
    return float(residual[lung].std())


def _voi_coordinates(
    voi: NoduleVOI,
    shape: tuple[int, ...],
    spacing_kji: np.ndarray,
    placement: Placement,
    lo: np.ndarray,
) -> np.ndarray:
    """For each voxel of a box starting at ``lo`` on a grid of ``spacing_kji``: where it falls
    in the VOI, (k, j, i), with the nodule's centroid at ``placement.centre_kji``."""
    grid = np.indices(shape, dtype=float).reshape(3, -1)
    offset_mm = (grid + lo[:, None] - placement.centre_kji[:, None]) * spacing_kji[:, None]
    for axis, flip in enumerate(placement.flips):
        if flip:
            offset_mm[axis] *= -1
    c, s = np.cos(placement.angle_rad), np.sin(placement.angle_rad)
    j, i = offset_mm[1].copy(), offset_mm[2].copy()
    offset_mm[1], offset_mm[2] = c * j - s * i, s * j + c * i
    voi_spacing = np.asarray(voi.image.spacing[::-1])
    centre = np.argwhere(voi.mask).mean(axis=0)
    return centre[:, None] + offset_mm / voi_spacing[:, None]


def paste_nodule(
    image: np.ndarray,
    spacing_kji: np.ndarray,
    voi: NoduleVOI,
    placement: Placement,
    rng: np.random.Generator,
) -> np.ndarray:
    """Paste ``voi``'s nodule into ``image`` (HU, changed in place) at ``placement``; return
    its mask on the host grid."""
    spacing_kji = np.asarray(spacing_kji, float)
    voi_spacing = np.asarray(voi.image.spacing[::-1])
    extent_mm = np.asarray(voi.mask.shape) * voi_spacing
    half = np.ceil((np.linalg.norm(extent_mm) / 2 + 2 * FEATHER_MM) / spacing_kji).astype(int)
    centre = np.round(placement.centre_kji).astype(int)
    lo = np.maximum(centre - half, 0)
    hi = np.minimum(centre + half + 1, image.shape)
    shape = tuple(int(b - a) for a, b in zip(lo, hi, strict=True))
    coords = _voi_coordinates(voi, shape, spacing_kji, placement, lo)
    nodule_hu = ndimage.map_coordinates(voi.image.array, coords, order=1, mode="nearest")
    inside = ndimage.map_coordinates(voi.mask.astype(np.float32), coords, order=1, cval=0.0)
    nodule_hu = nodule_hu.reshape(shape)
    mask = inside.reshape(shape) >= 0.5
    full = np.zeros(image.shape, dtype=bool)
    if not mask.any():
        return full
    distance = ndimage.distance_transform_edt(~mask, sampling=spacing_kji)
    weight = np.clip(1.0 - distance / FEATHER_MM, 0.0, 1.0)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    host = image[box]
    blended = host * (1.0 - weight) + nodule_hu * weight
    missing_noise = noise_sigma(host) ** 2 - _voi_noise(voi) ** 2
    if missing_noise > 0:
        blended += rng.normal(0.0, np.sqrt(missing_noise), size=shape) * weight
    image[box] = blended.astype(image.dtype)
    full[box] = mask
    return full


def _voi_noise(voi: NoduleVOI) -> float:
    return noise_sigma(np.where(voi.mask, NOISE_LUNG_HU[1], voi.image.array))


def lung_fill_hu(voi: NoduleVOI) -> float:
    """What lies beyond a VOI's edges (it covers only the nodule's own slices): the median of
    its aerated lung, the tissue most of its surroundings would be."""
    around = voi.image.array[~voi.mask]
    lung = around[(around > NOISE_LUNG_HU[0]) & (around < NOISE_LUNG_HU[1])]
    return float(np.median(lung)) if lung.size else -850.0


def voi_patch(voi: NoduleVOI, spacing_mm: float, size: int, placement: Placement) -> np.ndarray:
    """A ``size``-voxel HU cube on an isotropic ``spacing_mm`` grid holding the whole VOI,
    its nodule centroid at ``placement.centre_kji`` (patch voxels), turned and flipped as the
    placement says; beyond the VOI, :func:`lung_fill_hu`. This is how a nodule is seen when
    all there is of it is its VOI: its own in-plane surroundings, no context above or below."""
    spacing = np.full(3, spacing_mm)
    coords = _voi_coordinates(voi, (size, size, size), spacing, placement, np.zeros(3))
    cube = ndimage.map_coordinates(
        voi.image.array, coords, order=1, mode="constant", cval=lung_fill_hu(voi)
    )
    return cube.reshape(size, size, size).astype(np.float32)


def voi_input(
    voi: NoduleVOI, spacing_mm: float, size: int, placement: Placement, context: int = 1
) -> np.ndarray:
    """The network's (C, size, size, size) input for the VOI placed as ``placement`` says,
    in [0, 1]: :func:`voi_patch`, and with ``context`` > 1 the same placement seen ``context``
    times wider at that much coarser resolution (see :func:`inference.patches.network_input`)."""

    def seen(cube: np.ndarray) -> np.ndarray:
        return normalize_hu(np.clip(cube, *NETWORK_HU_WINDOW))

    channels = [seen(voi_patch(voi, spacing_mm, size, placement))]
    if context > 1:
        wide = size * context
        centre = np.asarray(placement.centre_kji) + (wide - size) / 2
        view = replace(placement, centre_kji=centre)
        channels.append(coarsened(seen(voi_patch(voi, spacing_mm, wide, view)), context))
    return np.stack(channels)


def voi_mask_patch(
    voi: NoduleVOI, spacing_mm: float, size: int, placement: Placement
) -> np.ndarray:
    """The nodule's mask on the cube :func:`voi_patch` makes with the same placement."""
    spacing = np.full(3, spacing_mm)
    coords = _voi_coordinates(voi, (size, size, size), spacing, placement, np.zeros(3))
    inside = ndimage.map_coordinates(voi.mask.astype(np.float32), coords, order=1, cval=0.0)
    return inside.reshape(size, size, size) >= 0.5
