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
    return TrainingConfig(
        seed=seed,
        synthetic=8,
        transplanted=4,
        voi_views=4,
        negatives=8,
        phantoms=1,
        epochs=1,
        batch_size=8,
    )


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
        assert np.linalg.norm(labels.offset_mm - expected) < 2.0
        assert 0 <= labels.composition < len(COMPOSITIONS)
        # Synthetic nodules teach malignancy only where benign calcification says "low";
        # otherwise only the readers' ratings do.
        if labels.calcified:
            assert labels.malignancy == 0.0
        else:
            assert np.isnan(labels.malignancy)
        assert labels.diameter_mm >= 2.5


def test_training_shows_progress_bars_with_eta(capsys: pytest.CaptureFixture[str]) -> None:
    train_model([], _tiny(3), torch.device("cpu"), log=lambda _: None)
    err = capsys.readouterr().err
    for stage in ("synthetic nodules", "epoch 1/1"):
        assert stage in err, f"no progress bar for {stage!r}"
    # tqdm's [elapsed<remaining]: the ETA.
    assert re.search(r"\[\d\d:\d\d<\d\d:\d\d", err)


@pytest.fixture(scope="module")
def real_nodules(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from inference.lab.nodule_folder import read_nodule_folder
    from tests.test_transplant import small_folder

    return read_nodule_folder(small_folder(tmp_path_factory.mktemp("nodules"), rows=6))


def test_real_nodule_patches_carry_the_readers_labels_and_their_mask(real_nodules) -> None:  # type: ignore[no-untyped-def]
    from inference.lab.training import transplanted_patch, voi_view_patch

    rng = np.random.default_rng(1)
    config = NetworkConfig()
    background = phantom_background(rng, config)
    middle = patch_geometric_centre(np.full(3, 16))
    for voi in real_nodules:
        for patch, mask, labels in (
            transplanted_patch(background, voi, rng, config.patch_voxels),
            voi_view_patch(voi, rng, config.patch_voxels, config.spacing_mm),
        ):
            assert patch.shape == mask.shape == (32, 32, 32) and mask.any()
            expected = (np.argwhere(mask).mean(axis=0) - middle) * config.spacing_mm
            assert np.linalg.norm(labels.offset_mm - expected) < 2.0
            assert labels.malignancy == (voi.ratings.malignancy - 1) / 4
            assert COMPOSITIONS[labels.composition] == voi.ratings.composition
            assert labels.calcified == float(voi.ratings.calcified)
            assert labels.diameter_mm == voi.ratings.diameter_mm


def test_training_with_real_nodules_shows_their_sources(real_nodules, capsys) -> None:  # type: ignore[no-untyped-def]
    trained = train_model([], _tiny(4), torch.device("cpu"), real_nodules, log=lambda _: None)
    err = capsys.readouterr().err
    assert "transplanted real nodules" in err and "real nodules as VOIs" in err
    patients = len({v.patient_id for v in real_nodules})
    assert trained.record["real_nodules"] == {"nodules": 6, "patients": patients}
