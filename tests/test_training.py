"""Training is reproducible from its seed, and its patches carry consistent labels."""

from __future__ import annotations

import copy
import math
import re

import numpy as np
import pytest
import torch

from inference.lab.training import (
    TrainingConfig,
    hardest,
    phantom_background,
    positive_patch,
    train_model,
)
from inference.network import COMPOSITIONS, NetworkConfig
from inference.patches import coarsened, patch_geometric_centre
from inference.volume import Volume


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
        assert patch.shape == (1, *mask.shape) == (1, 32, 32, 32)
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
            assert patch.shape == (1, *mask.shape) == (1, 32, 32, 32) and mask.any()
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


def test_voi_negatives_are_centred_away_from_the_nodule_mostly_on_dense_tissue(
    real_nodules,  # type: ignore[no-untyped-def]
) -> None:
    from inference.lab.training import (
        DENSE_HU,
        VOI_NEGATIVE_CLEARANCE_MM,
        voi_negative_centres,
        voi_negative_patch,
    )
    from inference.transforms import NETWORK_HU_WINDOW

    def seen(hu: float) -> float:  # the network's [0, 1] value of a HU
        low, high = NETWORK_HU_WINDOW
        return (hu - low) / (high - low)

    config = NetworkConfig()
    middle = patch_geometric_centre(np.full(3, config.patch_voxels // 2))
    centre = np.linalg.norm(np.indices((32, 32, 32)).T - middle, axis=-1).T * config.spacing_mm
    offering = 0
    for voi in real_nodules:
        spacing = np.asarray(voi.image.spacing[::-1])
        anywhere, dense = voi_negative_centres(voi)
        nodule = np.argwhere(voi.mask) * spacing
        for point in anywhere[:: max(1, len(anywhere) // 50)]:
            assert np.min(np.linalg.norm(nodule - point * spacing, axis=1)) >= (
                VOI_NEGATIVE_CLEARANCE_MM
            )
        assert all(voi.image.array[tuple(p)] > DENSE_HU for p in dense)
        if not len(dense):
            continue
        offering += 1
        # The nodule at 400 HU in lung of -800 HU, what is dense besides it at 100 HU: no
        # view shows the nodule near its centre, and most are centred on the dense tissue.
        marked = copy.deepcopy(voi)
        marked.image.array[...] = -800
        marked.image.array[voi.mask] = 400
        marked.image.array[tuple(dense.T)] = 100
        on_dense = 0
        for seed in range(12):
            (patch,) = voi_negative_patch(
                marked, (anywhere, dense), np.random.default_rng(seed), 32, config.spacing_mm
            )
            near = patch[centre <= VOI_NEGATIVE_CLEARANCE_MM - 2 * float(spacing.max())]
            assert near.max() < seen(100) + 0.01
            on_dense += bool(patch[centre <= 1.25].max() > seen(-400))
        assert on_dense >= 6
    assert offering >= 2


def test_training_with_voi_negatives_counts_them(real_nodules, capsys) -> None:  # type: ignore[no-untyped-def]
    config = TrainingConfig(**{**_tiny(5).__dict__, "voi_negatives": 4})
    trained = train_model([], config, torch.device("cpu"), real_nodules, log=lambda _: None)
    assert "real lung around VOIs" in capsys.readouterr().err
    assert trained.record["training_patches"]["voi_negatives"] == 4


def _real_like_background(seed: int) -> tuple[Volume, NetworkConfig]:
    """A phantom chest handed over as if it were a real scan (real scans are split)."""
    from inference.lab.synthesis import chest_phantom

    config = NetworkConfig()
    s = config.spacing_mm
    image = chest_phantom(np.random.default_rng(seed), shape=(80, 200, 240), spacing_mm=s)
    return Volume(image, (-150.0, -125.0, 0.0), (s, s, s), np.eye(3)), config


def test_the_calibrating_half_of_a_real_scan_never_trains() -> None:
    from inference.lab.training import _nodule_site, make_background

    volume, config = _real_like_background(0)
    background = make_background(volume, np.zeros((0, 3)), config)
    halves = background.halves
    assert halves is not None
    lung = np.argwhere(background.lungs[::4, ::4, ::4]) * 4
    lung_mm = background.work.index_to_world(lung[:, ::-1].astype(float))
    # Half of the lungs' voxels on each side of the plane.
    assert 0.4 < halves.calibrates(lung_mm).mean() < 0.6
    allowed = background.allowed(lung)
    assert allowed.any()
    # No training patch is centred in the calibrating half, nor close enough to reach it.
    assert np.all(lung_mm[allowed, 0] < halves.split_x_mm - 20.0)
    rng = np.random.default_rng(1)
    sites = np.array([_nodule_site(background, rng) for _ in range(30)])
    sites_mm = background.work.index_to_world(sites[:, ::-1].astype(float))
    assert not halves.calibrates(sites_mm).any() and halves.trains(sites_mm).all()


def test_calibration_counts_only_the_calibrating_half() -> None:
    from inference.detector import NoduleDetector, OperatingPoint, prepare
    from inference.findings import ModelInfo
    from inference.lab.experiments import Case, calibration_outcomes
    from inference.lab.training import LungHalves

    volume, config = _real_like_background(2)
    trained = train_model([], _tiny(5), torch.device("cpu"), log=lambda _: None)
    detector = NoduleDetector(
        trained.model, OperatingPoint(threshold=0.0), ModelInfo("m", "0", "t"), torch.device("cpu")
    )
    outcomes = calibration_outcomes(detector, [Case("phantom", volume, ())], 3, ())
    work, lungs = prepare(volume, config)
    halves = LungHalves.of(work, lungs, config.patch_voxels * config.spacing_mm)
    assert outcomes and all(len(o.scores) for o in outcomes)
    for outcome in outcomes:
        assert halves.calibrates(outcome.points_mm).all()
        centres = np.array([r.center_mm for r in outcome.references])
        assert len(centres) and halves.calibrates(centres).all()


def test_hardest_are_the_highest_scoring_highest_first() -> None:
    logits = np.array([0.1, 3.0, -1.0, 2.0, 2.5])
    assert hardest(logits, 3).tolist() == [1, 4, 3]
    assert hardest(logits, 10).tolist() == [1, 4, 3, 0, 2]


def test_hard_negatives_join_the_second_half_of_training(
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = TrainingConfig(**{**_tiny(6).__dict__, "epochs": 2, "hard_negatives": 4})
    trained = train_model([], config, torch.device("cpu"), log=lambda _: None)
    patches = trained.record["training_patches"]
    assert isinstance(patches, dict) and patches["hard_negatives_per_epoch"] == 4
    total = config.synthetic + config.negatives  # no real nodules: no real positives
    rows = total - int(total * config.validation_fraction)
    err = capsys.readouterr().err

    def batches(epoch: str) -> int:
        return max(int(n) for n in re.findall(rf"{epoch}: .*?\| *\d+/(\d+)", err))

    assert batches("epoch 1/2") == math.ceil(rows / config.batch_size)
    assert batches("epoch 2/2") == math.ceil((rows + 4) / config.batch_size)


def _context_matches_patch(patch: np.ndarray, context: int) -> None:
    """The context channel's middle is the patch itself, averaged to the coarser grid."""
    p = patch.shape[-1]
    lo, hi = p // 2 - p // (2 * context), p // 2 + p // (2 * context)
    middle = patch[1, lo:hi, lo:hi, lo:hi].astype(np.float32)
    np.testing.assert_allclose(middle, coarsened(patch[0].astype(np.float32), context), atol=2e-3)


def test_positive_patches_with_context_see_the_same_nodule_wider(real_nodules) -> None:  # type: ignore[no-untyped-def]
    from inference.lab.training import transplanted_patch, voi_view_patch

    rng = np.random.default_rng(2)
    config = NetworkConfig(context=2)
    background = phantom_background(rng, config)
    size = config.patch_voxels
    for patch, mask, _ in (
        positive_patch(background, rng, size, 2),
        transplanted_patch(background, real_nodules[0], rng, size, 2),
        voi_view_patch(real_nodules[0], rng, size, config.spacing_mm, 2),
    ):
        assert patch.shape == (2, size, size, size) and mask.shape == (size, size, size)
        _context_matches_patch(patch, 2)


def test_a_real_nodule_thickened_keeps_its_mask_and_loses_its_thin_slices(real_nodules) -> None:  # type: ignore[no-untyped-def]
    thin = min(real_nodules, key=lambda voi: voi.image.spacing[2])
    assert thin.image.spacing[2] < 2.5
    thickened = thin.thickened(2.5)
    assert thickened.mask is thin.mask and thickened.ratings == thin.ratings
    assert thickened.image.spacing == thin.image.spacing
    slice_to_slice = [
        np.abs(np.diff(v.image.array.astype(float), axis=0)).mean() for v in (thin, thickened)
    ]
    assert slice_to_slice[1] < slice_to_slice[0]
    assert thin.thickened(0.0) is thin


def test_weights_keep_the_slice_thickness_they_were_trained_for(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from inference.detector import NoduleDetector
    from inference.lab.training import save_weights

    config = TrainingConfig(**{**_tiny(7).__dict__, "network": NetworkConfig(slice_mm=2.5)})
    trained = train_model([], config, torch.device("cpu"), log=lambda _: None)
    path = tmp_path / "w.pt"
    path.write_bytes(save_weights(trained.model, trained.record, {"threshold": 0.5}, "test"))
    assert NoduleDetector.from_weights(path, "cpu").model.config.slice_mm == 2.5


@pytest.mark.slow
def test_calibrate_chooses_the_operating_point_again_and_keeps_the_network(
    lidc_root, tmp_path, capsys
) -> None:  # type: ignore[no-untyped-def]
    """`dicom-node calibrate --scan-relative` stores scan-relative scoring with a threshold
    chosen that way; the network and what the weights held of their scoring (flips) stay."""
    import json

    from dicom_node.cli import EXIT_OK, main
    from inference.detector import NoduleDetector
    from inference.lab.training import save_weights

    trained = train_model([], _tiny(3), torch.device("cpu"), log=lambda _: None)
    weights, recalibrated = tmp_path / "w.pt", tmp_path / "r.pt"
    stored = {"threshold": 0.5, "temperature": 1.0, "flips": True}
    weights.write_bytes(save_weights(trained.model, trained.record, stored, "test"))
    args = [
        "calibrate",
        str(lidc_root / "LIDC-IDRI-0001"),
        "--weights",
        str(weights),
        "--out",
        str(recalibrated),
    ]
    assert main([*args, "--scan-relative"]) == EXIT_OK
    assert "threshold" in capsys.readouterr().out
    before = NoduleDetector.from_weights(weights, "cpu")
    after = NoduleDetector.from_weights(recalibrated, "cpu")
    assert after.operating_point.scan_relative and after.operating_point.flips
    assert after.operating_point.threshold != 0.5 and 0.0 < after.operating_point.threshold <= 1
    for name, value in before.model.state_dict().items():
        assert torch.equal(value, after.model.state_dict()[name]), name
    record = json.loads(recalibrated.with_suffix(".json").read_text())
    assert record["operating_point"]["chosen_by"].startswith("dicom-node calibrate")
