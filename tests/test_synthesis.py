"""Each synthetic morphology makes what it is named for, with a mask that outlines it."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from inference.lab.synthesis import CALCIFIED, MORPHOLOGIES, insert_nodule, random_spec

LUNG_HU = -850.0
SPACING = np.array([0.8, 0.8, 0.8])


def _nodule(morphology: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray, float]:
    rng = np.random.default_rng(seed)
    spec = random_spec(rng, morphology=morphology)
    size = int(np.ceil((spec.diameter_mm * 1.3 + 50) / SPACING[0]))
    image = np.full((size, size, size), LUNG_HU, dtype=np.float32)
    mask = insert_nodule(image, spec, np.full(3, size / 2), SPACING, rng)
    return image, mask, spec.diameter_mm


def _principal_axes_mm(mask: np.ndarray) -> np.ndarray:
    points = np.argwhere(mask) * SPACING
    return np.sqrt(np.linalg.eigvalsh(np.cov(points.T)))


@pytest.mark.parametrize("morphology", ["cavitary", "bubbly", "air-bronchogram"])
def test_air_lies_inside_tissue(morphology: str) -> None:
    image, mask, _ = _nodule(morphology)
    core = ndimage.binary_erosion(mask, iterations=2)
    air = core & (image < -880)
    assert air.sum() > 10, "no air inside the nodule"
    # The air is enclosed: the nodule's outer shell is tissue, not a hole to the lung.
    shell = mask & ~ndimage.binary_erosion(mask)
    assert np.median(image[shell]) > -600


@pytest.mark.parametrize("morphology", sorted(CALCIFIED))
def test_calcified_patterns_are_above_200_hu_and_others_are_not(morphology: str) -> None:
    image, mask, _ = _nodule(morphology)
    assert (image[mask] > 200).sum() > 10
    plain, plain_mask, _ = _nodule("plain")
    assert plain[plain_mask].max() < 200


def test_perifissural_nodules_are_flat() -> None:
    for seed in range(3):
        _, mask, _ = _nodule("perifissural", seed)
        axes = _principal_axes_mm(mask)
        assert axes[0] / axes[-1] < 0.6


def test_a_pleural_tag_runs_far_beyond_the_nodule() -> None:
    _, mask, diameter = _nodule("pleural-tag")
    reach = np.linalg.norm((np.argwhere(mask) - np.argwhere(mask).mean(axis=0)) * SPACING, axis=1)
    assert reach.max() > diameter / 2 + 6


@pytest.mark.parametrize(
    ("morphology", "low", "high"), [("large-lobulated", 15, 31), ("mass", 30, 71)]
)
def test_large_lesions_have_their_size(morphology: str, low: float, high: float) -> None:
    _, mask, diameter = _nodule(morphology)
    volume = mask.sum() * SPACING.prod()
    equivalent = (6 * volume / np.pi) ** (1 / 3)
    assert low <= diameter <= high and abs(equivalent - diameter) < 0.25 * diameter


def test_every_morphology_renders() -> None:
    for morphology in MORPHOLOGIES:
        _, mask, _ = _nodule(morphology, seed=4)
        assert mask.any(), morphology
