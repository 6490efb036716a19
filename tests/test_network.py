"""Res-MTNet: each head's shape, the residual block, and that joint training learns."""

from __future__ import annotations

import random

import numpy as np
import torch
from scipy import ndimage

from inference.blocks import ResidualBlock3d
from inference.lab.training import augment, multitask_loss, rotate, seed_everything
from inference.network import COMPOSITIONS, NetworkConfig, build_model
from inference.patches import patch_geometric_centre


def test_each_head_has_its_shape() -> None:
    config = NetworkConfig()
    model = build_model(config).eval()
    p = config.patch_voxels
    with torch.no_grad():
        out = model(torch.rand(3, 1, p, p, p))
    assert out.nodule_logit.shape == (3,)
    assert out.malignancy_logit.shape == (3,)
    assert out.composition_logits.shape == (3, len(COMPOSITIONS))
    assert out.diameter_mm.shape == (3,)
    assert bool((out.diameter_mm >= 0).all())
    assert out.offset_mm.shape == (3, 3)
    assert out.mask_logits is not None and out.mask_logits.shape == (3, 1, p, p, p)
    assert model(torch.rand(2, 1, p, p, p), with_mask=False).mask_logits is None


def test_residual_block_projects_skip_when_shape_changes() -> None:
    block = ResidualBlock3d(4, 8, stride=2)
    assert block(torch.rand(1, 4, 8, 8, 8)).shape == (1, 8, 4, 4, 4)
    same = ResidualBlock3d(4, 4)
    assert isinstance(same.skip, torch.nn.Identity)


def _toy_batch(p: int, n: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    patches = torch.rand(n, 1, p, p, p, generator=g) * 0.1
    masks = torch.zeros(n, 1, p, p, p, dtype=torch.bool)
    c = p // 2
    for k in range(0, n, 2):  # every other patch holds a bright cube: a "nodule"
        patches[k, :, c - 3 : c + 3, c - 3 : c + 3, c - 3 : c + 3] = 0.8
        masks[k, :, c - 3 : c + 3, c - 3 : c + 3, c - 3 : c + 3] = True
    nodule = torch.tensor([1.0, 0.0] * (n // 2))
    return {
        "patches": patches,
        "masks": masks,
        "nodule": nodule,
        "malignancy": nodule * 0.7,
        "composition": torch.zeros(n, dtype=torch.long),
        "diameter_mm": nodule * 7.5,
        "offset_mm": torch.zeros(n, 3),
    }


def test_training_steps_lower_the_joint_loss() -> None:
    seed_everything(0)
    config = NetworkConfig(patch_voxels=16)
    model = build_model(config)
    batch = _toy_batch(16)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    first, _ = multitask_loss(model, batch)
    for _ in range(15):
        loss, terms = multitask_loss(model, batch)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    last, terms = multitask_loss(model, batch)
    assert float(last.detach()) < 0.6 * float(first.detach())
    assert set(terms) == {"detection", "malignancy", "composition", "diameter", "offset", "mask"}


def test_augment_moves_offsets_with_the_image() -> None:
    p = 16
    batch = _toy_batch(p, 2)
    batch["patches"] = torch.zeros(2, 1, p, p, p)
    batch["patches"][0, 0, 10, 4, 12] = 1.0
    mm_per_voxel = 2.0
    middle = patch_geometric_centre(np.full(3, p // 2))
    batch["offset_mm"] = torch.from_numpy(
        np.stack([(np.array([10, 4, 12]) - middle) * mm_per_voxel, np.zeros(3)]).astype(np.float32)
    )
    for seed in range(8):
        out = augment(batch, random.Random(seed))
        kji = np.argwhere(out["patches"][0, 0].numpy() == 1.0)[0]
        np.testing.assert_allclose(kji - middle, out["offset_mm"][0].numpy() / mm_per_voxel)


def test_with_context_the_network_reads_two_channels() -> None:
    config = NetworkConfig(context=2)
    model = build_model(config).eval()
    p = config.patch_voxels
    with torch.no_grad():
        out = model(torch.rand(2, 2, p, p, p))
    assert out.nodule_logit.shape == (2,)
    assert out.mask_logits is not None and out.mask_logits.shape == (2, 1, p, p, p)


def test_rotation_turns_offsets_and_masks_with_the_image() -> None:
    p = 32
    batch = _toy_batch(p, 2)
    middle = patch_geometric_centre(np.full(3, p // 2))
    grid = np.stack(np.meshgrid(*[np.arange(p)] * 3, indexing="ij"), axis=-1).astype(float)
    centre = middle + np.array([4.0, -2.5, 1.5])
    blob = np.exp(-np.sum((grid - centre) ** 2, axis=-1) / (2 * 1.5**2)).astype(np.float32)
    batch["patches"] = torch.from_numpy(np.stack([blob, blob]))[:, None]
    batch["masks"] = torch.from_numpy(np.stack([blob, blob]) > 0.5)[:, None]
    mm_per_voxel = 2.0
    batch["offset_mm"] = torch.from_numpy(
        np.stack([(centre - middle) * mm_per_voxel] * 2).astype(np.float32)
    )
    moved = 0
    for seed in range(6):
        out = rotate(batch, random.Random(seed), share=1.0)
        for n in range(2):
            image = out["patches"][n, 0].numpy()
            found = np.array(ndimage.center_of_mass(image))
            np.testing.assert_allclose(found - middle, out["offset_mm"][n] / mm_per_voxel, atol=0.1)
            mask = np.array(ndimage.center_of_mass(out["masks"][n, 0].numpy()))
            np.testing.assert_allclose(mask, found, atol=0.5)
            moved += np.linalg.norm(found - centre) > 1.0
    assert moved >= 10  # the blob did turn away from where it was


def test_rotation_leaves_a_patch_alone_outside_its_share() -> None:
    batch = _toy_batch(16, 3)
    out = rotate(batch, random.Random(0), share=0.0)
    assert torch.equal(out["patches"], batch["patches"])
    assert torch.equal(out["offset_mm"], batch["offset_mm"])
