"""Physical measurements of a nodule mask, as a radiologist takes them on lung windows."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
