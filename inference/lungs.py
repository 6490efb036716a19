"""Lung segmentation by thresholds and morphology: no downloaded model, a few seconds on CPU."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage

from inference.filters import ball_closing
from inference.volume import Volume

AIR_HU = -400.0
#: Components smaller than this are airways in the neck, bowel gas or noise, not a lung.
MIN_LUNG_ML = 50.0
#: Closing radius that pulls nodules (up to about 30 mm) stuck to the pleura and mediastinum
#: into the mask; a smaller one leaves large juxtapleural nodules outside, unseen.
JUXTAPLEURAL_CLOSING_MM = 20.0
#: Erosion depths tried, in steps of this, up to the deepest, to part two lungs that touch
#: (through the airways, or at the anterior and posterior junction lines).
PARTING_STEP_MM = 2.5
PARTING_MAX_MM = 25.0
PARTING_SUBSAMPLE = 2


def segment_lungs(volume: Volume, device: torch.device | None = None) -> np.ndarray:
    """Boolean lung mask on the volume's grid, nodules and vessels included.

    Outside air is removed slice by slice through the in-plane border: a 3D flood from every
    face would also take the trachea (it touches the first and last slices, and with it both
    lungs), and a body wider than the field of view joins the lungs to outside air in 3D.
    Each lung is closed and filled on its own: closed together, the two lungs bridge in front
    of and behind the mediastinum, and filling the ring they make takes in the heart and the
    great vessels: not lung, so every candidate there is a false positive.
    """
    air = volume.array < AIR_HU
    body_air = air.copy()
    for k in range(air.shape[0]):
        labels, n = ndimage.label(air[k])
        if n == 0:
            continue
        border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        body_air[k][np.isin(labels, border[border > 0])] = False
    labels, n = ndimage.label(body_air)
    if n == 0:
        return np.zeros_like(air)
    spacing = volume.spacing[::-1]
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    sizes = ndimage.sum_labels(body_air, labels, index=np.arange(1, n + 1)) * voxel_ml
    order = np.argsort(sizes)[::-1]
    keep = [int(idx) + 1 for idx in order[:2] if sizes[idx] >= MIN_LUNG_ML]
    parts = parted_lungs(labels == keep[0], spacing) if keep else []
    if len(parts) == 1 and len(keep) == 2:
        # The lungs were apart already; when they touch, the second air component is the
        # stomach's or the colon's gas, and stays out.
        parts.append(labels == keep[1])
    lungs = np.zeros_like(air)
    for part in parts:
        # A closing never reaches past its set's bounding box: closing the box alone is
        # the same and costs half as much for one lung.
        (box,) = ndimage.find_objects(part.astype(np.int8))
        closed = ball_closing(part[box], spacing, JUXTAPLEURAL_CLOSING_MM, device)
        for k in range(closed.shape[0]):
            closed[k] = ndimage.binary_fill_holes(closed[k])
        lungs[box] |= closed
    return lungs


def parted_lungs(air: np.ndarray, spacing_kji: Sequence[float]) -> list[np.ndarray]:
    """One air component cut into the two lungs it holds: the shallowest erosion that leaves
    two cores of lung size (the trachea's core is smaller) gives the seeds, and each voxel
    goes to its nearer core. A component that no erosion parts (one lung, or lungs fused
    over a long stretch) stays whole. The cut is found on a grid :data:`PARTING_SUBSAMPLE`
    times coarser: where two lungs meet, a voxel more or less on either side changes nothing,
    and the distance transforms cost an eighth."""
    step = PARTING_SUBSAMPLE
    coarse = air[::step, ::step, ::step]
    spacing = np.asarray(spacing_kji, dtype=float) * step
    depth = ndimage.distance_transform_edt(coarse, sampling=spacing)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    for level in np.arange(PARTING_STEP_MM, PARTING_MAX_MM + 1e-6, PARTING_STEP_MM):
        cores, n = ndimage.label(depth > level)
        if n < 2:
            continue
        sizes = ndimage.sum_labels(cores > 0, cores, index=np.arange(1, n + 1)) * voxel_ml
        two = np.argsort(sizes)[::-1][:2]
        if sizes[two[1]] < MIN_LUNG_ML:
            continue
        seeds = np.where(np.isin(cores, two + 1), cores, 0)
        _, nearest = ndimage.distance_transform_edt(
            seeds == 0, sampling=spacing, return_indices=True
        )
        owner = seeds[tuple(nearest)]
        for axis in range(3):
            owner = owner.repeat(step, axis=axis)
        owner = owner[: air.shape[0], : air.shape[1], : air.shape[2]]
        return [air & (owner == label) for label in two + 1]
    return [air]
