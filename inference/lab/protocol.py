"""The cross-case protocol: how well Res-MTNet finds nodules in a scan it never trained in.

For each annotated case B, models are trained (one per seed) with positives placed only in
the other cases' lungs (plus phantoms), and the training patients' real nodules; each model's
operating point is chosen on calibration scans of those other cases (synthetic nodules and
the calibration patients' real ones), in the half of their lungs that never trained
(``training.LungHalves``). Only then is B scored, three ways:

- its own reader-marked nodules, and its false positives, at that operating point;
- real nodules of the validation patients (never trained on, never calibrated on) pasted
  into B's lungs: sensitivity at the operating point and at 1 false positive per scan;
- synthetic nodules in B's lungs: the FROC's CPM.

A case's own nodules never train a model scored on that case: they are kept out of every
training patch (``training.AVOID_MM``), and here B is not even a training background.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import numpy as np
import torch

from inference.detector import MODEL_NAME, NoduleDetector, OperatingPoint
from inference.findings import ModelInfo
from inference.lab.evaluation import Reference, ScanOutcome, froc
from inference.lab.experiments import (
    Case,
    calibration_outcomes,
    choose_threshold,
    score_scan,
    synthetic_outcomes,
)
from inference.lab.nodule_folder import NoduleSplit, NoduleVOI
from inference.lab.training import TrainingConfig, make_background, train_model

#: Nodules per scan of the held-out case, pasted or synthetic.
NODULES_PER_SCAN = 4
#: The smallest reported sizes the protocol compares (mm; 0: every size). Each has its own
#: threshold, chosen on the calibration scans counting only detections of that size.
MIN_DIAMETERS_MM = (0.0, 3.0, 4.0, 5.0, 6.0)


def wilson(hits: int, total: int) -> tuple[float, float]:
    """95 % Wilson interval of a proportion."""
    if total == 0:
        return (math.nan, math.nan)
    z = 1.959964
    p = hits / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return (centre - half, centre + half)


@dataclass(frozen=True)
class Detection:
    """How a set of scans went at one threshold, and along the whole FROC."""

    scans: int
    targets: int
    found: int
    false_positives: int
    cpm: float
    sensitivity_at_1_fp: float
    #: (found, targets) at the threshold, per morphology of the nodules.
    by_morphology: dict[str, tuple[int, int]]

    @classmethod
    def of(cls, outcomes: list[ScanOutcome], threshold: float) -> Detection:
        fps, sens, cpm = froc(outcomes)
        tally: dict[str, list[int]] = {}
        for outcome in outcomes:
            found = outcome.found(threshold)
            for r, ref in enumerate(outcome.references):
                if not ref.excluded:
                    counts = tally.setdefault(ref.morphology or "unknown", [0, 0])
                    counts[0] += r in found
                    counts[1] += 1
        return cls(
            scans=len(outcomes),
            targets=sum(o.targets() for o in outcomes),
            found=sum(len(o.found(threshold)) for o in outcomes),
            false_positives=sum(o.false_positives(threshold) for o in outcomes),
            cpm=cpm,
            sensitivity_at_1_fp=float(sens[fps <= 1.0].max()) if np.any(fps <= 1.0) else 0.0,
            by_morphology={k: (v[0], v[1]) for k, v in sorted(tally.items())},
        )

    @property
    def sensitivity(self) -> float:
        return self.found / self.targets if self.targets else math.nan

    @property
    def sensitivity_interval(self) -> tuple[float, float]:
        return wilson(self.found, self.targets)

    @property
    def false_positives_per_scan(self) -> float:
        return self.false_positives / self.scans if self.scans else math.nan


@dataclass(frozen=True)
class RealNodule:
    """One of the held-out case's reader-marked nodules, as the model saw it."""

    name: str
    diameter_mm: float
    target: bool  # a LUNA16 target, not an excluded region
    found: bool  # at the operating point
    score: float | None  # of the best detection on it
    rank: int | None  # of that detection among all the scan's, 1 = highest


@dataclass(frozen=True)
class AtSize:
    """The held-out case scored at one smallest reported size and its threshold."""

    min_diameter_mm: float
    threshold: float
    real: list[RealNodule]
    real_false_positives: int
    transplanted: Detection
    synthetic: Detection


@dataclass
class Run:
    """One model (one seed) trained without ``held_out`` and scored on it."""

    held_out: str
    trained_on: tuple[str, ...]
    seed: int
    sizes: list[AtSize] = field(default_factory=list)

    def at(self, min_diameter_mm: float) -> AtSize:
        return next(a for a in self.sizes if a.min_diameter_mm == min_diameter_mm)


def reader_marked(
    outcome: ScanOutcome, nodules: tuple[Reference, ...], threshold: float
) -> list[RealNodule]:
    """Each reader-marked nodule: the best detection within its radius (at least 5 mm, as
    the per-nodule tables count a hit), its score and rank, and whether it passes."""
    ranks = np.argsort(np.argsort(-outcome.scores)) + 1
    rows = []
    for ref in nodules:
        radius = max(ref.diameter_mm / 2.0, 5.0)
        distance = np.linalg.norm(outcome.points_mm - np.asarray(ref.center_mm), axis=1)
        on = np.flatnonzero(distance <= radius)
        best = int(on[np.argmax(outcome.scores[on])]) if len(on) else None
        score = float(outcome.scores[best]) if best is not None else None
        rows.append(
            RealNodule(
                name=ref.name,
                diameter_mm=ref.diameter_mm,
                target=not ref.excluded,
                found=score is not None and score >= threshold,
                score=score,
                rank=int(ranks[best]) if best is not None else None,
            )
        )
    return rows


def cross_case(
    cases: list[Case],
    nodules: list[NoduleVOI],
    split: NoduleSplit,
    config: TrainingConfig,
    seeds: list[int],
    fp_per_scan: float,
    device: torch.device,
    transplant_scans: int,
    synthetic_scans: int,
    on_run: Callable[[list[Run]], None] = lambda runs: None,
    held_out_names: Collection[str] = (),
    on_scores: Callable[
        [Run, NoduleDetector, dict[str, list[ScanOutcome]]], None
    ] = lambda run, detector, scans: None,
    flips: bool = False,
    scan_relative: bool = False,
) -> list[Run]:
    """Every (held-out case, seed) run of the protocol, in a fixed order; the held-out case
    is scored on ``transplant_scans`` scans of pasted validation nodules and
    ``synthetic_scans`` of synthetic ones, :data:`NODULES_PER_SCAN` each. ``on_run`` gets
    the runs so far after each one (a run takes most of an hour on 2 CPU cores).
    ``held_out_names``, where given, holds out only those cases (the others still train), so
    that one direction can run on its own machine or in its own session. ``on_scores`` gets
    each run's model and its scored scans by group (calibration, held_out, transplanted,
    synthetic). ``flips``: detection-time flips (:class:`OperatingPoint`), calibration
    included; ``scan_relative``: scan-relative scores, calibration included."""
    cases = sorted(cases, key=lambda c: c.name)
    learn = split.select(nodules, "train")
    calibrate = split.select(nodules, "calibration")
    validate = split.select(nodules, "validation")
    runs = []
    for held_out in cases:
        if held_out_names and held_out.name not in held_out_names:
            continue
        others = [c for c in cases if c.name != held_out.name]
        backgrounds = [make_background(c.volume, c.avoid_mm, config.network) for c in others]
        for seed in seeds:
            seeded = TrainingConfig(**{**config.__dict__, "seed": seed})
            trained = train_model(backgrounds, seeded, device, learn)
            detector = NoduleDetector(
                trained.model,
                OperatingPoint(
                    threshold=0.0,
                    temperature=trained.temperature,
                    flips=flips,
                    scan_relative=scan_relative,
                ),
                ModelInfo(MODEL_NAME, "cross-case", f"seed {seed}"),
                device,
            )
            calibration = calibration_outcomes(detector, others, seed + 1, calibrate)
            outcome, _ = score_scan(
                detector, held_out.volume, list(held_out.references), held_out.name, False
            )
            transplanted, _ = synthetic_outcomes(
                detector,
                [held_out],
                seed + 2,
                transplant_scans,
                NODULES_PER_SCAN,
                "transplanted",
                describe=False,
                real=validate,
                real_fraction=1.0,
            )
            synthetic, _ = synthetic_outcomes(
                detector,
                [held_out],
                seed + 3,
                synthetic_scans,
                NODULES_PER_SCAN,
                "held-out synthetic",
                describe=False,
            )
            run = Run(held_out.name, tuple(c.name for c in others), seed)
            for size in MIN_DIAMETERS_MM:
                threshold = choose_threshold(calibration, fp_per_scan, size)
                scan = outcome.at_least(size)
                run.sizes.append(
                    AtSize(
                        min_diameter_mm=size,
                        threshold=threshold,
                        real=reader_marked(
                            scan, held_out.annotated or held_out.references, threshold
                        ),
                        real_false_positives=scan.false_positives(threshold),
                        transplanted=Detection.of(
                            [o.at_least(size) for o in transplanted], threshold
                        ),
                        synthetic=Detection.of([o.at_least(size) for o in synthetic], threshold),
                    )
                )
            runs.append(run)
            on_run(runs)
            scans = {
                "calibration": calibration,
                "held_out": [outcome],
                "transplanted": transplanted,
                "synthetic": synthetic,
            }
            on_scores(run, detector, scans)
    return runs
