"""Training is reproducible from its seed, and its patches carry consistent labels."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from inference.lab.training import TrainingConfig, phantom_background, positive_patch, train_model
from inference.network import COMPOSITIONS, NetworkConfig
from inference.patches import patch_geometric_centre


def _tiny(seed: int) -> TrainingConfig:
    return TrainingConfig(seed=seed, positives=8, negatives=8, phantoms=1, epochs=1, batch_size=8)


def test_same_seed_same_weights_other_seed_other_weights() -> None:
    first = train_model([], _tiny(1), torch.device("cpu"), log=lambda _: None)
    again = train_model([], _tiny(1), torch.device("cpu"), log=lambda _: None)
    other = train_model([], _tiny(2), torch.device("cpu"), log=lambda _: None)
    a, b, c = (m.model.state_dict() for m in (first, again, other))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert first.temperature > 0 and first.record["loss_weights"]


def test_positive_patch_labels_match_its_mask() -> None:
    rng = np.random.default_rng(0)
    config = NetworkConfig()
    background = phantom_background(rng, config)
    for _ in range(5):
        patch, mask, labels = positive_patch(background, rng, config.patch_voxels)
        assert patch.shape == mask.shape == (32, 32, 32)
        assert patch.min() >= 0.0 and patch.max() <= 1.0
        centre = np.argwhere(mask).mean(axis=0)
        # The offset label points from the patch's middle to the nodule's centre of mass.
        middle = patch_geometric_centre(np.full(3, 16))
        expected = (centre - middle) * config.spacing_mm
        assert np.linalg.norm(np.asarray(labels["offset_mm"]) - expected) < 2.0
        assert 0 <= int(labels["composition"]) < len(COMPOSITIONS)  # type: ignore[call-overload]
        assert 0.0 < float(labels["malignancy"]) < 1.0  # type: ignore[arg-type]
        assert float(labels["diameter_mm"]) >= 3.0  # type: ignore[arg-type]


def test_training_shows_progress_bars_with_eta(capsys: pytest.CaptureFixture[str]) -> None:
    train_model([], _tiny(3), torch.device("cpu"), log=lambda _: None)
    err = capsys.readouterr().err
    for stage in ("synthetic nodules", "epoch 1/1"):
        assert stage in err, f"no progress bar for {stage!r}"
    # tqdm's [elapsed<remaining]: the ETA.
    assert re.search(r"\[\d\d:\d\d<\d\d:\d\d", err)
