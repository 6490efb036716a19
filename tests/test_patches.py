"""Patches and their context channel share one centre, so that flips and offsets mean the
same in both."""

from __future__ import annotations

import numpy as np
import pytest

from inference.patches import coarsened, extract_patches, network_input
from inference.transforms import NETWORK_HU_WINDOW


@pytest.mark.parametrize("context", [2, 3])
def test_context_channel_is_the_wider_field_around_the_same_centre(context: int) -> None:
    rng = np.random.default_rng(0)
    image = rng.uniform(*NETWORK_HU_WINDOW, size=(120, 130, 140)).astype(np.float32)
    centres = np.array([[60, 65, 70], [5, 120, 3]])  # the second one reaches past the image
    size = 12
    both = network_input(image, centres, size, context)
    assert both.shape == (2, 2, size, size, size)
    np.testing.assert_array_equal(both[:, 0], extract_patches(image, centres, size))
    wide = extract_patches(image, centres, size * context)
    np.testing.assert_allclose(both[:, 1], coarsened(wide, context), atol=1e-6)
    # The patch is the middle of the wider field: its coarsened voxels are the middle ones.
    lo = (size - size // context) // 2
    middle = both[
        :, 1, lo : lo + size // context, lo : lo + size // context, lo : lo + size // context
    ]
    np.testing.assert_allclose(middle, coarsened(both[:, 0], context), atol=1e-6)


def test_a_bright_voxel_lands_at_the_same_place_in_both_channels() -> None:
    image = np.full((64, 64, 64), NETWORK_HU_WINDOW[0], dtype=np.float32)
    centre = np.array([32, 32, 32])
    image[36, 28, 33] = NETWORK_HU_WINDOW[1]
    both = network_input(image, centre[None], 16, 2)[0]
    fine = np.argwhere(both[0] == both[0].max())[0]
    coarse = np.argwhere(both[1] == both[1].max())[0]
    # Fine voxel v lies at v - 8 + centre; coarse voxel w covers 2w - 16 + centre and the next.
    np.testing.assert_array_equal(fine, [36 - 32 + 8, 28 - 32 + 8, 33 - 32 + 8])
    np.testing.assert_array_equal(coarse, (np.array([36, 28, 33]) - 32 + 16) // 2)
