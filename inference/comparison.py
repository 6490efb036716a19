"""Comparison with a prior scan: which nodule is which, and what each did in between.

Nodules are matched one to one by registered position (a prior nodule mapped into the current
scan must lie within reach of the current one) at the least total distance, so that two
neighbouring nodules are never both matched to the same prior. Growth follows Lung-RADS: a
mean diameter up by more than 1.5 mm. The volume doubling time is reported for a nodule that
grew, because growth rate, not size, is what tells a cancer from a granuloma.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from inference.findings import FindingSummary
from inference.lungrads import lung_rads_with_prior
from inference.registration import Registration

#: Lung-RADS v2022: growth is a mean diameter increase of more than 1.5 mm (within 12 months).
GROWTH_MM = 1.5
#: A prior nodule matches a current one when its registered centre lies within the larger
#: of this and the two nodules' mean radius (registration and breathing leave millimetres).
MATCH_MIN_MM = 8.0


class Status(StrEnum):
    NEW = "new"
    GROWING = "growing"
    STABLE = "stable"
    SHRINKING = "shrinking"
    RESOLVED = "resolved"


@dataclass(frozen=True)
class NoduleChange:
    """What one current nodule did since the prior (``findings.json``: ``change``), and the
    Lung-RADS category that follows from it."""

    status: Status
    lung_rads: str
    lung_rads_rule: str
    prior_id: int | None = None
    prior_diameter_mm: float | None = None
    prior_volume_mm3: float | None = None
    diameter_change_mm: float | None = None
    volume_change_percent: float | None = None
    vdt_days: float | None = None
    #: Distance between the current centre and the registered prior centre.
    distance_mm: float | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "status": str(self.status),
            "lung_rads": self.lung_rads,
            "lung_rads_rule": self.lung_rads_rule,
            "prior_id": self.prior_id,
            "prior_diameter_mm": self.prior_diameter_mm,
            "prior_volume_mm3": self.prior_volume_mm3,
            "diameter_change_mm": self.diameter_change_mm,
            "volume_change_percent": self.volume_change_percent,
            "vdt_days": self.vdt_days,
            "distance_mm": self.distance_mm,
        }

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> NoduleChange:
        return cls(**{**entry, "status": Status(entry["status"])})


@dataclass(frozen=True)
class Comparison:
    """Each current finding's change (same order), and the prior nodules no longer seen."""

    changes: tuple[NoduleChange, ...]
    resolved: tuple[FindingSummary, ...]
    interval_days: int


def volume_doubling_time_days(
    volume_prior_mm3: float, volume_now_mm3: float, interval_days: float
) -> float | None:
    """VDT = interval x ln 2 / ln(V_now / V_prior); None when it did not grow."""
    if volume_prior_mm3 <= 0 or volume_now_mm3 <= volume_prior_mm3 or interval_days <= 0:
        return None
    return interval_days * math.log(2.0) / math.log(volume_now_mm3 / volume_prior_mm3)


def change_between(
    current: FindingSummary, prior: FindingSummary, interval_days: int, distance_mm: float
) -> NoduleChange:
    """The change of one matched pair."""
    delta = current.diameter_mm - prior.diameter_mm
    status = (
        Status.GROWING
        if delta > GROWTH_MM
        else Status.SHRINKING
        if delta < -GROWTH_MM
        else Status.STABLE
    )
    vdt = (
        volume_doubling_time_days(prior.volume_mm3, current.volume_mm3, interval_days)
        if status is Status.GROWING
        else None
    )
    category, rule = _category(current, status, interval_days, delta)
    percent = (
        100.0 * (current.volume_mm3 - prior.volume_mm3) / prior.volume_mm3
        if prior.volume_mm3 > 0
        else None
    )
    return NoduleChange(
        status=status,
        lung_rads=category,
        lung_rads_rule=rule,
        prior_id=prior.id,
        prior_diameter_mm=prior.diameter_mm,
        prior_volume_mm3=prior.volume_mm3,
        diameter_change_mm=round(delta, 1),
        volume_change_percent=None if percent is None else round(percent, 1),
        vdt_days=None if vdt is None else round(vdt),
        distance_mm=round(distance_mm, 1),
    )


def compare(
    current: Sequence[FindingSummary],
    prior: Sequence[FindingSummary],
    registration: Registration,
    interval_days: int,
) -> Comparison:
    """Match current and prior findings one to one and describe each change."""
    changes = [NoduleChange(Status.NEW, *_category(f, Status.NEW, interval_days)) for f in current]
    matched_prior: set[int] = set()
    if current and prior:
        here = np.array([f.center_mm for f in current], dtype=float)
        there = registration.to_current(np.array([f.center_mm for f in prior], dtype=float))
        distance = np.linalg.norm(here[:, None, :] - there[None, :, :], axis=2)
        reach = np.maximum(
            MATCH_MIN_MM,
            (np.array([f.diameter_mm for f in current])[:, None] + [f.diameter_mm for f in prior])
            / 2.0,
        )
        # Pairs out of reach cost more than any set of pairs in reach, so they are never
        # preferred; they are dropped below.
        cost = np.where(distance <= reach, distance / reach, 1e6)
        for i, j in zip(*linear_sum_assignment(cost), strict=True):
            if distance[i, j] <= reach[i, j]:
                changes[i] = change_between(
                    current[i], prior[j], interval_days, float(distance[i, j])
                )
                matched_prior.add(int(j))
    resolved = tuple(f for j, f in enumerate(prior) if j not in matched_prior)
    return Comparison(tuple(changes), resolved, interval_days)


def _category(
    finding: FindingSummary, status: Status, interval_days: int, delta_mm: float = 0.0
) -> tuple[str, str]:
    return lung_rads_with_prior(
        finding.composition,
        finding.diameter_mm,
        finding.solid_part_mm,
        finding.calcified,
        str(status),
        interval_days,
        delta_mm,
    )
