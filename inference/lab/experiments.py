"""Choosing the operating point and measuring the detector: the numbers in the model card."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from inference.detector import NoduleDetector, prepare
from inference.findings import NoduleFinding
from inference.lab.evaluation import (
    Reference,
    ScanOutcome,
    synthetic_scan,
    threshold_for_fp_rate,
)
from inference.lab.nodule_folder import NoduleVOI
from inference.lab.training import CALIBRATING_SHARE, LungHalves, aerated_lung
from inference.network import NetworkConfig
from inference.volume import Volume


@dataclass(frozen=True)
class Case:
    """A scan with its reference nodules (targets and excluded regions)."""

    name: str
    volume: Volume
    references: tuple[Reference, ...]  # what FROC scores against (targets and excluded)
    annotated: tuple[Reference, ...] = ()  # the radiologists' nodules, for the per-nodule table

    @property
    def avoid_mm(self) -> np.ndarray:
        return np.array([r.center_mm for r in self.references]).reshape(-1, 3)


def seeded(seed: int, *keys: object) -> np.random.Generator:
    """A generator for one named draw, the same on any machine and in any call order."""
    digest = hashlib.sha256(":".join(map(str, (seed, *keys))).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "big"))


def lung_points_mm(
    volume: Volume, spacing_mm: float, rng: np.random.Generator, count: int = 4000
) -> np.ndarray:
    work, lungs = prepare(volume, NetworkConfig(spacing_mm=spacing_mm))
    voxels = aerated_lung(work.array, lungs)
    pick = voxels[rng.choice(len(voxels), size=min(count, len(voxels)), replace=False)]
    return work.index_to_world(pick[:, ::-1].astype(float))


def synthetic_outcomes(
    detector: NoduleDetector,
    cases: list[Case],
    seed: int,
    scans_per_case: int,
    nodules_per_scan: int,
    label: str,
    describe: bool = True,
    real: Sequence[NoduleVOI] = (),
    real_fraction: float = 0.5,
    halves: Mapping[str, LungHalves] | None = None,
) -> tuple[list[ScanOutcome], list[dict[str, object]]]:
    """Insert nodules (synthetic, and real ones from ``real`` where given) into each case's
    lungs, away from its own nodules, and score the detector. With ``halves`` (by case
    name) the nodules go into each case's calibrating half only, and only the detections
    there count.

    Returns the outcomes and, per synthetic nodule, what the detector made of it at the
    operating point (for diameter error and malignancy AUC).
    """
    outcomes, rows = [], []
    spacing = detector.model.config.spacing_mm
    cases = sorted(cases, key=lambda c: c.name)
    jobs = [(case, n) for case in cases for n in range(scans_per_case)]
    points = {
        case.name: lung_points_mm(case.volume, spacing, seeded(seed, case.name, "points"))
        for case in cases
    }
    if halves is not None:
        points = {name: p[halves[name].calibrates(p)] for name, p in points.items()}
    for case, n in tqdm(jobs, desc=f"{label} scans", unit="scan"):
        # Each scan draws from its own generator, named by case and number: what a scan
        # holds does not depend on which other cases were given, or in which order.
        rng = seeded(seed, case.name, n)
        volume, refs = synthetic_scan(
            case.volume,
            points[case.name],
            case.avoid_mm,
            rng,
            nodules_per_scan,
            real=real,
            real_fraction=real_fraction,
        )
        # The case's own nodules stay in the scan: they are excluded regions, not false positives.
        refs += [
            Reference(r.center_mm, r.diameter_mm, excluded=True, name=r.name)
            for r in case.references
        ]
        scan = f"{case.name} {label} {n}"
        calibrates = halves[case.name].calibrates if halves is not None else None
        outcome, findings = score_scan(detector, volume, refs, scan, describe, calibrates)
        if calibrates is not None:
            outcome = outcome.where(calibrates(outcome.points_mm))
        outcomes.append(outcome)
        rows += [nodule_row(ref, findings, scan) for ref in refs if not ref.excluded]
    return outcomes, rows


def score_scan(
    detector: NoduleDetector,
    volume: Volume,
    refs: list[Reference],
    name: str,
    describe: bool = True,
    population: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[ScanOutcome, list[NoduleFinding]]:
    """All candidates scored for the FROC and, with ``describe``, the findings at the
    operating point, from one pass of the network; ``population`` as
    :meth:`NoduleDetector.score` takes it."""
    result = detector.detect(volume, population) if describe else None
    scored = result.scored if result else detector.score(volume, population=population)
    keep = scored.keep
    outcome = ScanOutcome(
        name, refs, scored.scores[keep], scored.points_mm[keep], scored.diameters_mm[keep]
    )
    return outcome, result.findings if result else []


def nodule_row(ref: Reference, findings: list[NoduleFinding], scan: str) -> dict[str, object]:
    """What the detector made of one reference nodule at its operating point."""
    row: dict[str, object] = {
        "scan": scan,
        "reference": ref.name,
        "reference_diameter_mm": round(ref.diameter_mm, 1),
        "composition": ref.composition,
        "malignant": ref.malignant,
        "found": False,
    }
    radius = max(ref.diameter_mm / 2, 5.0)
    hits = [
        f for f in findings if np.linalg.norm(np.subtract(f.center_mm, ref.center_mm)) <= radius
    ]
    if hits:
        best = hits[0]
        row.update(
            found=True,
            score=round(best.score, 4),
            diameter_mm=round(best.diameter_mm, 1),
            diameter_error_mm=round(best.diameter_mm - ref.diameter_mm, 2),
            predicted_composition=best.composition,
            malignancy_probability=round(best.malignancy_probability, 3),
            lung_rads=best.lung_rads,
        )
    return row


#: Calibration scans per case and nodules per scan the operating point is chosen on.
CALIBRATION_SCANS, CALIBRATION_NODULES = 3, 4


def calibration_outcomes(
    detector: NoduleDetector, cases: list[Case], seed: int, real: Sequence[NoduleVOI]
) -> list[ScanOutcome]:
    """Fresh scans of ``cases`` holding synthetic nodules and the ``real`` ones (calibration
    patients'), scored in the calibrating half of their lungs, where no training patch lay:
    what an operating point is chosen on, never a scan the detector is then scored on."""
    config = detector.model.config
    halves = {}
    for case in cases:
        work, lungs = prepare(case.volume, config)
        halves[case.name] = LungHalves.of(work, lungs, config.patch_voxels * config.spacing_mm)
    outcomes, _ = synthetic_outcomes(
        detector,
        cases,
        seed,
        CALIBRATION_SCANS,
        CALIBRATION_NODULES,
        "calibration",
        describe=False,
        real=real,
        halves=halves,
    )
    return outcomes


def choose_threshold(
    outcomes: list[ScanOutcome], fp_per_scan: float, min_diameter_mm: float = 0.0
) -> float:
    """The score threshold for ``fp_per_scan`` false positives per scan on calibration
    ``outcomes`` (each a calibrating half: :data:`CALIBRATING_SHARE` of the budget),
    counting only detections of at least ``min_diameter_mm``."""
    return threshold_for_fp_rate(
        [o.at_least(min_diameter_mm) for o in outcomes], fp_per_scan * CALIBRATING_SHARE
    )
