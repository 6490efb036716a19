"""Image pipeline pieces: geometry of resampling, lung mask, candidates, synthetic nodules."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from inference.candidates import find_candidates
from inference.detector import prepare, suppress_same_nodule
from inference.lab.synthesis import NoduleSpec, insert_nodule
from inference.measure import measure
from inference.network import NetworkConfig
from inference.transforms import ClipHU, ResampleToSpacing, ThickenSlices
from inference.volume import Volume


def _volume_with_point(spacing=(0.7, 0.7, 2.5)) -> tuple[Volume, np.ndarray]:  # type: ignore[no-untyped-def]
    array = np.zeros((40, 64, 64), dtype=np.float32)
    array[20, 30, 10] = 1000.0
    direction = np.diag([-1.0, 1.0, 1.0])  # rows run right to left: any orientation must work
    volume = Volume(array, (10.0, -20.0, -100.0), spacing, direction)
    return volume, volume.index_to_world(np.array([10, 30, 20]))


def test_volume_index_world_round_trip() -> None:
    volume, _ = _volume_with_point()
    ijk = np.array([[1.5, 2.0, 3.25], [0, 0, 0]])
    np.testing.assert_allclose(volume.world_to_index(volume.index_to_world(ijk)), ijk)
    with pytest.raises(ValueError, match="differs"):
        volume.with_array(np.zeros((2, 2, 2)))


def test_resampling_keeps_world_positions() -> None:
    volume, point = _volume_with_point()
    out = ResampleToSpacing(1.25)(volume)
    assert out.spacing == pytest.approx((1.25, 1.25, 1.25), rel=0.06)
    peak = np.array(np.unravel_index(np.argmax(out.array), out.array.shape))[::-1]
    assert (
        np.linalg.norm(out.index_to_world(peak) - point) <= np.linalg.norm(out.spacing) / 2 + 1e-6
    )
    # The field of view is the same: first and last voxel edges coincide.
    for axis in range(3):
        n_in, n_out = volume.array.shape[2 - axis], out.array.shape[2 - axis]
        assert n_out * out.spacing[axis] == pytest.approx(n_in * volume.spacing[axis])


def _z_variance_mm2(array: np.ndarray, spacing_mm: float) -> float:
    profile = array.sum(axis=(1, 2))
    z = np.arange(len(profile)) * spacing_mm
    mean = (profile * z).sum() / profile.sum()
    return float((profile * (z - mean) ** 2).sum() / profile.sum())


def test_thin_slices_are_thickened_along_the_slice_axis_only() -> None:
    thin = Volume(np.zeros((41, 9, 9), np.float32), (0.0, 0.0, 0.0), (0.7, 0.7, 1.25), np.eye(3))
    thin.array[20, 4, 4] = 1000.0
    out = ThickenSlices(2.5)(thin)
    # A 2.5 mm slice, interpolated: T^2 / 4 along z; the thin scan had t^2 / 4 of it.
    expected = (2.5**2 - 1.25**2) / 4
    assert _z_variance_mm2(out.array, 1.25) == pytest.approx(expected, rel=0.05)
    assert out.array.sum() == pytest.approx(1000.0)
    assert np.count_nonzero(out.array.sum(axis=0)) == 1  # nothing spreads in-plane
    assert (out.origin, out.spacing) == (thin.origin, thin.spacing)
    thick = Volume(thin.array, thin.origin, (0.7, 0.7, 2.5), np.eye(3))
    assert ThickenSlices(2.5)(thick) is thick
    assert ThickenSlices(0.0)(thin) is thin
    with pytest.raises(ValueError, match="negative"):
        ThickenSlices(-1.0)


def test_prepare_thickens_slices_when_the_network_asks() -> None:
    volume, _ = _volume_with_point()
    volume.array[20, 30, 10] = 300.0  # inside the network's HU window
    as_scanned, _ = prepare(volume, NetworkConfig(spacing_mm=1.25))
    thickened, _ = prepare(volume, NetworkConfig(spacing_mm=1.25, slice_mm=5.0))
    assert thickened.array.shape == as_scanned.array.shape
    variances = [_z_variance_mm2(np.clip(w.array, 0, None), 1.25) for w in (as_scanned, thickened)]
    assert variances[1] - variances[0] == pytest.approx((5.0**2 - 2.5**2) / 4, rel=0.1)


def test_clip_hu() -> None:
    volume, _ = _volume_with_point()
    assert ClipHU(-1024, 400)(volume).array.max() == 400


def _phantom_with_nodule(spec: NoduleSpec) -> tuple[Volume, np.ndarray, np.ndarray]:
    from tests.dicom_factory import SeriesSpec, phantom

    s = SeriesSpec(
        slices=100, rows=160, columns=160, pixel_mm=1.2, slice_mm=1.25, origin=(-96, -96, -150)
    )
    hu = phantom(s, None)
    volume = Volume(hu, s.origin, (s.pixel_mm, s.pixel_mm, s.slice_mm), np.eye(3))
    centre_mm = np.array([-40.0, 10.0, -90.0])
    centre_kji = volume.world_to_index(centre_mm)[::-1]
    mask = insert_nodule(
        hu, spec, centre_kji, np.array(volume.spacing[::-1]), np.random.default_rng(0)
    )
    return volume, mask, centre_mm


@pytest.mark.parametrize("composition", ["solid", "ground-glass"])
def test_lung_mask_holds_the_nodule_and_candidates_find_it(composition: str) -> None:
    spec = NoduleSpec(10.0, composition, "round", 0.4, 40.0, -550.0, seed=3)
    volume, _, centre_mm = _phantom_with_nodule(spec)
    work, lungs = prepare(volume, NetworkConfig(spacing_mm=1.25))
    assert lungs.any()
    centre_work = np.round(work.world_to_index(centre_mm)[::-1]).astype(int)
    assert lungs[tuple(centre_work)]
    lung_ml = lungs.sum() * np.prod(work.spacing) / 1000
    # The phantom's lungs are two elliptic cylinders (32 x 55 mm half-axes) through 125 mm.
    assert lung_ml == pytest.approx(2 * np.pi * 32 * 55 * 125 / 1000, rel=0.15)
    candidates = find_candidates(work, lungs)
    points = work.index_to_world(np.array([c.kji[::-1] for c in candidates], dtype=float))
    assert np.linalg.norm(points - centre_mm, axis=1).min() < 5.0


def test_synthetic_nodule_truth_has_its_size() -> None:
    spec = NoduleSpec(12.0, "solid", "round", 0.4, 40.0, -550.0, seed=1)
    volume, mask, _ = _phantom_with_nodule(spec)
    m = measure(mask, volume.array, volume.spacing[::-1])  # type: ignore[arg-type]
    assert m.diameter_mm == pytest.approx(12.0, rel=0.2)
    assert m.mean_hu > -200


def test_blobness_tells_a_ball_from_a_vessel_and_a_plate() -> None:
    from scipy import ndimage

    from inference.candidates import blobness

    k, j, i = np.mgrid[:41, :41, :41] - 20
    shapes = {
        "ball": (k**2 + j**2 + i**2 <= 16),
        "vessel": (j**2 + i**2 <= 9),
        "plate": (np.abs(i) <= 2),
    }
    centre = np.array([[20, 20, 20]])
    values = {
        name: float(
            blobness(ndimage.gaussian_filter(mask.astype(float), 2.5), centre, np.ones(3))[0]
        )
        for name, mask in shapes.items()
    }
    assert values["ball"] > 0.9
    assert values["vessel"] < 0.1 and values["plate"] < 0.1


def test_scan_without_lungs_gives_no_findings_and_no_error() -> None:
    from inference.detector import DEFAULT_WEIGHTS, NoduleDetector

    if not DEFAULT_WEIGHTS.exists():
        pytest.skip("shipped weights missing")
    detector = NoduleDetector.from_weights(DEFAULT_WEIGHTS, "cpu")
    volume = Volume(
        np.full((80, 64, 64), 40.0, dtype=np.float32), (0.0, 0.0, 0.0), (1.0, 1.0, 1.25), np.eye(3)
    )
    result = detector.detect(volume)
    assert result.findings == [] and result.candidates == 0


def test_nodules_below_the_smallest_reported_size_are_not_reported() -> None:
    from inference.detector import DEFAULT_WEIGHTS, NoduleDetector

    if not DEFAULT_WEIGHTS.exists():
        pytest.skip("shipped weights missing")
    spec = NoduleSpec(12.0, "solid", "round", 0.4, 40.0, -550.0, seed=1)
    volume, _, centre_mm = _phantom_with_nodule(spec)
    every = NoduleDetector.from_weights(DEFAULT_WEIGHTS, "cpu", min_diameter_mm=0.0)
    large_only = NoduleDetector.from_weights(DEFAULT_WEIGHTS, "cpu", min_diameter_mm=20.0)
    found = every.detect(volume).findings
    assert any(np.linalg.norm(np.subtract(f.center_mm, centre_mm)) < 6 for f in found)
    assert large_only.detect(volume).findings == []


def test_suppression_keeps_the_best_detection_of_one_nodule_and_both_of_two() -> None:
    """Inside a higher-scored detection's radius a detection is the same nodule; two small
    nodules 6 mm apart are two."""
    points = np.array([[0.0, 0.0, 0.0], [1.7, 0.0, 0.0], [30.0, 0.0, 0.0], [36.0, 0.0, 0.0]])
    scores = np.array([0.9, 0.99, 0.8, 0.7])
    diameters = np.array([25.0, 25.0, 6.0, 6.0])
    assert suppress_same_nodule(points, scores, diameters).tolist() == [1, 2, 3]


def test_a_large_nodule_is_reported_once(lidc_root: Path) -> None:
    """LIDC-IDRI-0002's 23 mm ground-glass nodule draws candidates 10 mm apart whose diameter
    heads say 16-19 mm, so both pass the first suppression; their masks each take in the
    whole nodule. No finding may lie inside another's extent."""
    from dicom_node.pipeline.series import read_series
    from inference.detector import DEFAULT_WEIGHTS, NoduleDetector

    if not DEFAULT_WEIGHTS.exists():
        pytest.skip("shipped weights missing")
    (series,), _, _ = read_series([lidc_root / "LIDC-IDRI-0002"])
    findings = NoduleDetector.from_weights(DEFAULT_WEIGHTS, "cpu").detect(series.volume).findings
    assert findings
    for a, b in itertools.combinations(findings, 2):
        apart = np.linalg.norm(np.subtract(a.center_mm, b.center_mm))
        assert apart >= max(a.long_axis_mm, b.long_axis_mm) / 2, (a.id, b.id, apart)


def test_flipped_scoring_gives_a_mirrored_scan_the_same_scores() -> None:
    """Averaged over the eight flips, a candidate's score and diameter do not depend on
    which way the scan faces, and its offset mirrors with it: the flips are undone."""
    from inference.detector import FLIPPED_CANDIDATES, ModelInfo, NoduleDetector, OperatingPoint
    from inference.network import NetworkConfig, build_model

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    config = NetworkConfig()
    detector = NoduleDetector(
        build_model(config), OperatingPoint(flips=True), ModelInfo("test", "0", "none")
    )
    rng = np.random.default_rng(3)
    image = rng.uniform(-1000, 300, (48, 50, 52)).astype(np.float32)
    centres = rng.integers(16, 32, (FLIPPED_CANDIDATES + 6, 3))
    plain = detector._run(image, centres, with_mask=False)
    averaged = detector._averaged_over_flips(image, centres, plain)
    best = np.argsort(plain["nodule_logit"])[::-1][:FLIPPED_CANDIDATES]
    rest = np.setdiff1d(np.arange(len(centres)), best)
    assert np.array_equal(averaged["nodule_logit"][rest], plain["nodule_logit"][rest])
    assert not np.allclose(averaged["nodule_logit"][best], plain["nodule_logit"][best])
    few = centres[:10]  # all of them among the best, however a flipped scan ranks them
    facing = detector._averaged_over_flips(image, few, detector._run(image, few, False))
    for axis in range(3):
        mirrored_image = np.ascontiguousarray(np.flip(image, axis=axis))
        mirrored = few.copy()
        mirrored[:, axis] = image.shape[axis] - few[:, axis]  # a patch spans c - 16 .. c + 15
        again = detector._averaged_over_flips(
            mirrored_image, mirrored, detector._run(mirrored_image, mirrored, False)
        )
        assert np.allclose(again["nodule_logit"], facing["nodule_logit"], atol=1e-4)
        assert np.allclose(again["diameter_mm"], facing["diameter_mm"], atol=1e-3)
        sign = np.ones(3)
        sign[axis] = -1.0
        assert np.allclose(again["offset_mm"], facing["offset_mm"] * sign, atol=1e-4)


def test_scan_relative_scores_ignore_how_the_network_sees_the_scan_as_a_whole() -> None:
    """A scan whose every candidate the network scores higher or more spread out (an unseen
    scanner's vessels) gets the same relative scores; a candidate standing out from the
    median by RELATIVE_MIDPOINT median deviations scores 0.5, and a few nodules among many
    candidates do not move the others' scores."""
    from inference.detector import RELATIVE_MIDPOINT, relative_scores

    rng = np.random.default_rng(5)
    vessels = rng.normal(-2.0, 1.0, 400)
    spread = np.median(np.abs(vessels - np.median(vessels)))
    probe = np.array([np.median(vessels) + RELATIVE_MIDPOINT * spread])
    assert relative_scores(probe, vessels)[0] == pytest.approx(0.5)
    shifted = relative_scores(3.0 * vessels + 1.5, 3.0 * vessels + 1.5)
    assert np.allclose(shifted, relative_scores(vessels, vessels))
    with_nodules = np.concatenate([vessels, [9.0, 10.0, 11.0]])
    changed = relative_scores(vessels, with_nodules) - relative_scores(vessels, vessels)
    assert np.abs(changed).max() < 0.02


def test_scan_relative_scoring_ranks_as_probabilities_and_measures_against_its_population() -> None:
    """Relative scores keep the candidates' order; measured against only the weaker half of
    the scan's candidates (as calibration measures against the half no training patch saw),
    the stronger half stands out further."""
    from dataclasses import replace

    from inference.detector import DEFAULT_WEIGHTS, NoduleDetector

    if not DEFAULT_WEIGHTS.exists():
        pytest.skip("shipped weights missing")
    spec = NoduleSpec(10.0, "solid", "round", 0.4, 40.0, -550.0, seed=2)
    volume, _, _ = _phantom_with_nodule(spec)
    detector = NoduleDetector.from_weights(DEFAULT_WEIGHTS, "cpu")
    plain = detector.score(volume)
    detector.operating_point = replace(detector.operating_point, scan_relative=True)
    relative = detector.score(volume)
    assert len(plain.keep) > 10
    assert np.all(np.diff(relative.scores[np.argsort(plain.scores, kind="stable")]) >= 0)
    kept = plain.scores[plain.keep]
    weak = {tuple(p) for p in plain.points_mm[plain.keep][kept < np.median(kept)]}
    against_weak = detector.score(
        volume, population=lambda points: np.array([tuple(p) in weak for p in points])
    )
    strong = relative.keep[kept >= np.median(kept)]
    unsaturated = strong[relative.scores[strong] < 1.0]
    assert len(unsaturated) and np.all(against_weak.scores[strong] >= relative.scores[strong])
    assert np.all(against_weak.scores[unsaturated] > relative.scores[unsaturated])
