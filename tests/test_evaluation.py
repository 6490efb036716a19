"""FROC/CPM as LUNA16 defines them, and the LIDC XML reader against the shared summary."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dicom_node.pipeline.series import read_series
from inference.lab.evaluation import (
    LUNA_FP_RATES,
    Reference,
    ScanOutcome,
    auc,
    froc,
    threshold_for_fp_rate,
)
from inference.lab.lidc import read_lidc_xml
from tests.conftest import shared


def _outcome(
    refs: list[Reference], detections: list[tuple[float, tuple[float, float, float]]]
) -> ScanOutcome:
    return ScanOutcome(
        "scan",
        refs,
        np.array([s for s, _ in detections]),
        np.array([p for _, p in detections], dtype=float).reshape(-1, 3),
    )


NODULE = Reference((0.0, 0.0, 0.0), 10.0)


def test_hit_inside_radius_miss_outside() -> None:
    out = _outcome([NODULE], [(0.9, (4.9, 0.0, 0.0)), (0.8, (5.1, 0.0, 0.0))])
    assert out.hit.tolist() == [0, -1]
    assert out.found(0.5) == {0} and out.false_positives(0.5) == 1


def test_excluded_region_is_neither_hit_nor_false_positive() -> None:
    excluded = Reference((50.0, 0.0, 0.0), -1, excluded=True)
    out = _outcome([NODULE, excluded], [(0.9, (52.0, 0.0, 0.0))])
    assert out.hit.tolist() == [-2]
    assert out.false_positives(0.0) == 0 and out.targets() == 1


def test_perfect_detector_has_cpm_one() -> None:
    scans = [
        _outcome([NODULE], [(0.99, (0.0, 0.0, 0.0)), (0.1, (80.0, 0.0, 0.0))]) for _ in range(4)
    ]
    _, _, cpm = froc(scans)
    assert cpm == pytest.approx(1.0)


def test_cpm_averages_sensitivity_at_luna_rates() -> None:
    # Every scan has one false positive scored above its nodule: sensitivity is 0 until
    # 1 FP per scan is allowed, then 1.
    scans = [
        _outcome([NODULE], [(0.9, (80.0, 0.0, 0.0)), (0.5, (0.0, 0.0, 0.0))]) for _ in range(4)
    ]
    _, _, cpm = froc(scans)
    expected = np.mean([1.0 if rate >= 1.0 else 0.0 for rate in LUNA_FP_RATES])
    assert cpm == pytest.approx(expected)


def test_two_detections_on_one_nodule_count_once() -> None:
    scans = [_outcome([NODULE], [(0.9, (0.0, 0.0, 0.0)), (0.8, (1.0, 0.0, 0.0))])]
    fps, sens, _ = froc(scans)
    assert sens.max() == 1.0 and fps.max() == 0.0


def test_threshold_keeps_false_positives_within_budget() -> None:
    scans = [
        _outcome(
            [NODULE], [(0.9, (80.0, 0.0, 0.0)), (0.7, (0.0, 0.0, 0.0)), (0.6, (90.0, 0.0, 0.0))]
        )
    ]
    t = threshold_for_fp_rate(scans, 1.0)
    assert scans[0].false_positives(t) == 1 and scans[0].found(t) == {0}


def test_auc() -> None:
    scores = np.array([0.9, 0.8, 0.3, 0.1])
    assert auc(scores, np.array([True, True, False, False])) == 1.0
    assert auc(scores, np.array([False, False, True, True])) == 0.0
    assert auc(scores, np.array([True, True, True, True])) is None


def test_lidc_xml_reader_matches_the_shared_summary(lidc_root) -> None:  # type: ignore[no-untyped-def]
    summary = json.loads(shared("lidc/nodules.json").read_text())
    for case, info in summary.items():
        folder = lidc_root / info["series_dir"]
        (series,), _, _ = read_series([folder])
        nodules = read_lidc_xml(lidc_root / info["xml"], series.volume)
        for expected in info["nodules"]:
            match = min(
                nodules, key=lambda n: np.linalg.norm(n.center_mm - expected["centroid_mm"])
            )
            assert np.linalg.norm(match.center_mm - expected["centroid_mm"]) < 0.5, case
            assert match.readers == expected["n_readers"]
            assert sorted(match.scores("malignancy")) == sorted(expected["malignancy"])
