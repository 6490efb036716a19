"""Reading a scan against the patient's prior: detect in both, align, look again, compare.

A reader with two scans side by side looks at the place of every nodule of one scan in the
other, so a nodule seen in one is rarely missed in the other. The same is done here: where
one scan has a finding and the other, at the registered place, has none at the operating
point, the other scan's candidates there are taken at a lower score
(:meth:`NoduleDetector.look_again`). Current findings found that way are reported too: a
known nodule still present is what the reader needs to know about.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from inference.comparison import MATCH_MIN_MM, Comparison, compare
from inference.detector import DetectionResult, NoduleDetector
from inference.findings import FindingSummary, NoduleFinding
from inference.registration import Registration, register_prior
from inference.volume import Volume


@dataclass(frozen=True)
class PriorReading:
    """Current findings (Lung-RADS with the prior applied), the prior's, and how they relate."""

    findings: list[NoduleFinding]
    prior_findings: tuple[FindingSummary, ...]
    registration: Registration
    comparison: Comparison


def read_with_prior(
    detector: NoduleDetector,
    current: Volume,
    prior: Volume,
    interval_days: int,
    current_result: DetectionResult | None = None,
    prior_findings: Sequence[FindingSummary] | None = None,
) -> PriorReading:
    """``prior_findings``: what an earlier analysis of the prior found, reused as it was
    reported (the prior is then only registered, not read again, and not looked at twice)."""
    now = current_result or detector.detect(current)
    registration = register_prior(current, prior)
    if prior_findings is None:
        before = detector.detect(prior)
        found_before = tuple(
            f.summary()
            for f in _with_second_look(detector, prior, before, now.findings, registration.to_prior)
        )
        seen_before: Sequence[FindingSummary | NoduleFinding] = before.findings
    else:
        found_before = tuple(prior_findings)
        seen_before = found_before
    found_now = _with_second_look(detector, current, now, seen_before, registration.to_current)
    comparison = compare(
        [f.summary() for f in found_now], list(found_before), registration, interval_days
    )
    findings = [
        replace(f, lung_rads=change.lung_rads)
        for f, change in zip(found_now, comparison.changes, strict=True)
    ]
    return PriorReading(findings, found_before, registration, comparison)


def _with_second_look(
    detector: NoduleDetector,
    volume: Volume,
    result: DetectionResult,
    other: Sequence[FindingSummary | NoduleFinding],
    to_here: Callable[[np.ndarray], np.ndarray],
) -> list[NoduleFinding]:
    """``result``'s findings plus those found again where ``other`` has one and this scan
    has none within reach; renumbered by score."""
    here = np.array([f.center_mm for f in result.findings], dtype=float).reshape(-1, 3)
    points, reach = [], []
    for finding in other:
        place = to_here(np.asarray(finding.center_mm))
        radius = max(MATCH_MIN_MM, finding.diameter_mm / 2.0)
        if len(here) == 0 or np.min(np.linalg.norm(here - place, axis=1)) > radius:
            points.append(place)
            reach.append(radius)
    extra = detector.look_again(volume, result.scored, np.array(points), np.array(reach))
    ranked = sorted([*result.findings, *extra], key=lambda f: f.score, reverse=True)
    return [replace(f, id=number) for number, f in enumerate(ranked, start=1)]
