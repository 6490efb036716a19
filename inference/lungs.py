"""Lung segmentation by thresholds and morphology: no downloaded model, a few seconds on CPU."""

from __future__ import annotations

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


def segment_lungs(volume: Volume, device: torch.device | None = None) -> np.ndarray:
    """Boolean lung mask on the volume's grid, nodules and vessels included.

    Outside air is removed slice by slice through the in-plane border: a 3D flood from every
    face would also take the trachea (it touches the first and last slices, and with it both
    lungs), and a body wider than the field of view joins the lungs to outside air in 3D.
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
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    sizes = ndimage.sum_labels(body_air, labels, index=np.arange(1, n + 1)) * voxel_ml
    order = np.argsort(sizes)[::-1]
    keep = [int(idx) + 1 for idx in order[:2] if sizes[idx] >= MIN_LUNG_ML]
    lungs = np.isin(labels, keep)
    lungs = ball_closing(lungs, volume.spacing[::-1], JUXTAPLEURAL_CLOSING_MM, device)
    for k in range(lungs.shape[0]):
        lungs[k] = ndimage.binary_fill_holes(lungs[k])
    return lungs
