"""Physical measurements of a nodule mask, as a radiologist takes them on lung windows."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class Measurements:
    axes: AxialAxes
    volume_mm3: float
    mean_hu: float
    axial_slice: int  # k index of the slice the axes were measured on

    @property
    def long_axis_mm(self) -> float:
        return self.axes.long_axis_mm

    @property
    def short_axis_mm(self) -> float:
        return self.axes.short_axis_mm

    @property
    def diameter_mm(self) -> float:
        """Lung-RADS mean diameter: the average of long and short axis."""
        return (self.long_axis_mm + self.short_axis_mm) / 2.0


@dataclass(frozen=True)
class AxialAxes:
    """Long axis and the longest extent perpendicular to it on one slice.

    Lengths are in mm; end points in (i, j) pixel coordinates, for drawing.
    """

    long_axis_mm: float
    short_axis_mm: float
    long_ends_ij: np.ndarray  # (2, 2)
    short_ends_ij: np.ndarray  # (2, 2)


def axial_axes(mask2d: np.ndarray, spacing_ji: tuple[float, float]) -> AxialAxes:
    """Longest in-plane diameter and the extent perpendicular to it, as callipers read them.

    Distances run between pixel centres, so one pixel is added back: a disc of diameter D
    measures D, not D minus one pixel. The short axis is drawn through the long axis'
    middle, half a pixel past the outermost pixel centres at both ends, like the long one.
    """
    jj, ii = np.nonzero(mask2d)
    if jj.size == 0:
        zero = np.zeros((2, 2))
        return AxialAxes(0.0, 0.0, zero, zero)
    scale = np.array([spacing_ji[1], spacing_ji[0]])  # mm per (i, j) pixel
    points = np.stack([ii, jj], axis=1) * scale
    pixel = float(np.mean(spacing_ji))
    hull = _hull_candidates(points)
    d = np.linalg.norm(hull[:, None, :] - hull[None, :, :], axis=2)
    a, b = np.unravel_index(np.argmax(d), d.shape)
    pa, pb = hull[a], hull[b]
    length = float(d[a, b])
    u = (pb - pa) / length if length > 0 else np.array([1.0, 0.0])
    v = np.array([-u[1], u[0]])
    across = points @ v
    width = float(across.max() - across.min())
    middle = (pa + pb) / 2.0
    middle = middle + v * ((across.max() + across.min()) / 2.0 - middle @ v)
    long_ends = np.array([pa - u * pixel / 2, pb + u * pixel / 2]) / scale
    short_ends = (
        np.array([middle - v * (width + pixel) / 2, middle + v * (width + pixel) / 2]) / scale
    )
    return AxialAxes(length + pixel, width + pixel, long_ends, short_ends)


def _hull_candidates(points: np.ndarray) -> np.ndarray:
    """The points extreme in one of 64 directions: a superset of the hull vertices that
    matter for the diameter, small enough for an all-pairs distance."""
    if len(points) <= 256:
        return points
    angles = np.linspace(0, np.pi, 64, endpoint=False)
    dirs = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    proj = points @ dirs.T
    idx = np.unique(np.concatenate([proj.argmax(axis=0), proj.argmin(axis=0)]))
    return points[idx]


def measure(
    mask: np.ndarray, hu: np.ndarray, spacing_kji: tuple[float, float, float]
) -> Measurements:
    """Long/short axis on the axial slice where the long axis is greatest; volume; mean HU."""
    if mask.shape != hu.shape:
        raise ValueError(f"mask {mask.shape} and image {hu.shape} differ in shape")
    best, best_k = axial_axes(np.zeros((1, 1), dtype=bool), (1.0, 1.0)), 0
    for k in np.flatnonzero(mask.any(axis=(1, 2))):
        axes = axial_axes(mask[k], (spacing_kji[1], spacing_kji[2]))
        if axes.long_axis_mm > best.long_axis_mm:
            best, best_k = axes, int(k)
    voxels = int(mask.sum())
    return Measurements(
        axes=best,
        volume_mm3=voxels * float(np.prod(spacing_kji)),
        mean_hu=float(hu[mask].mean()) if voxels else float("nan"),
        axial_slice=best_k,
    )


#: HU from which a voxel of a nodule counts as its solid part (Lung-RADS part-solid rule).
SOLID_PART_HU = -300.0
#: Around a nodule, voxels denser than this are vessels or chest wall, not the lung whose
#: density sets the edge.
LUNG_MAX_HU = -500.0
#: Fewer lung voxels than this around a nodule (one inside the chest wall): no trimming.
MIN_LUNG_VOXELS = 20


def half_maximum_edge(mask: np.ndarray, hu: np.ndarray) -> np.ndarray:
    """A solid nodule's mask trimmed to where the density passes half-way from the lung
    around it to the nodule's core (the full-width-at-half-maximum edge).

    A learned mask's edge sits where its training outlines put it (LIDC's readers drew
    just outside the nodule), about half a millimetre out: a constant shell that weighs
    more on a small nodule than on a large one, so two scans of a growing nodule would
    understate its growth and overstate its volume doubling time. The half-maximum edge
    does not depend on nodule size, dose or kernel. Only voxels are removed, never added,
    so a vessel the mask left out stays out; part-solid and ground-glass nodules are not
    trimmed (half-way to their solid core would cut the ground glass away).
    """
    if mask.sum() < 8:
        return mask
    core = float(np.percentile(hu[mask], 90))
    shell = ndimage.binary_dilation(mask, iterations=4) & ~ndimage.binary_dilation(
        mask, iterations=1
    )
    lung = hu[shell & (hu < LUNG_MAX_HU)]
    if lung.size < MIN_LUNG_VOXELS:
        return mask
    trimmed = mask & (hu >= (core + float(np.median(lung))) / 2.0)
    labels, count = ndimage.label(trimmed)
    if count == 0:
        return mask
    if count > 1:
        sizes = ndimage.sum_labels(trimmed, labels, np.arange(1, count + 1))
        trimmed = labels == int(np.argmax(sizes)) + 1
    return trimmed


#: Of the voxels the half-maximum edge takes off a nodule, the share that must touch what it
#: keeps for them to be the blurred rim of a solid edge rather than a ground-glass part.
EDGE_RIM_SHARE = 0.95


def measured_voxels(mask: np.ndarray, hu: np.ndarray, composition: str) -> np.ndarray:
    """The voxels a nodule's size and volume are taken on: its half-maximum edge when it is
    solid, or when its voxels say so although the composition head did not.

    The head calls some small solid nodules part-solid or ground-glass (partial volume makes
    their rim look like ground glass); measured untrimmed, such a 6 mm nodule came out 70 %
    larger than in a scan where the head called it solid, and its volume doubling time
    wrong by as much. A solid core (median at least SOLID_PART_HU) whose trimmed-off voxels
    all but touch it is a solid nodule's blurred rim; a real ground-glass part lies further
    out and is kept.
    """
    trimmed = half_maximum_edge(mask, hu)
    if composition == "solid":
        return trimmed
    removed = mask & ~trimmed
    if not trimmed.any() or not removed.any() or np.median(hu[trimmed]) < SOLID_PART_HU:
        return mask
    rim = ndimage.binary_dilation(trimmed, structure=np.ones((3, 3, 3), dtype=bool))
    return trimmed if (removed & rim).sum() >= EDGE_RIM_SHARE * removed.sum() else mask
