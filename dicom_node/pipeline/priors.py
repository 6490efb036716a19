"""Which earlier series a new one is compared with (the same patient, old enough, not too
old), and what a reading against it hands to the writers and to findings.json.

A comparison with another patient's scan would be worse than none, so identity is checked on
Patient ID and its issuer (both, because two hospitals' ID ranges overlap), and a candidate
that fails is named with the reason, not silently skipped. ``analyze --prior`` and the node
(``prior_search``) read against a prior through :func:`read_against_prior`, so both report it
the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date

from dicom_node.config import PriorsSettings
from dicom_node.pipeline.series import CTSeries
from dicom_node.writers.common import TimePoint
from inference.detector import DetectionResult, NoduleDetector
from inference.findings import FindingSummary, NoduleFinding
from inference.prior_reading import read_with_prior
from inference.registration import RegistrationFailed


@dataclass(frozen=True)
class PriorChoice:
    """The prior chosen, or None and why there is none (the report's "baseline because")."""

    prior: CTSeries | None
    reason: str
    interval_days: int = 0


@dataclass(frozen=True)
class PriorOutcome:
    """A reading's findings (Lung-RADS with the prior applied where there was one), how the
    result objects place it in time, and findings.json's ``prior``."""

    findings: list[NoduleFinding]
    time_point: TimePoint
    prior: dict[str, object]
    #: What was found in the prior (read afresh or reused), for keeping with a fetched prior.
    prior_findings: tuple[FindingSummary, ...] = ()

    @classmethod
    def baseline(cls, findings: list[NoduleFinding], reason: str) -> PriorOutcome:
        return cls(findings, TimePoint(baseline_reason=reason), {"reason": reason})


def read_against_prior(
    detector: NoduleDetector,
    series: CTSeries,
    detection: DetectionResult,
    prior: CTSeries,
    interval_days: int,
    prior_findings: Sequence[FindingSummary] | None = None,
) -> PriorOutcome:
    """Compare ``series`` with ``prior``; a prior that cannot be aligned gives a baseline
    reading that says so."""
    try:
        reading = read_with_prior(
            detector, series.volume, prior.volume, interval_days, detection, prior_findings
        )
    except RegistrationFailed as exc:
        return PriorOutcome.baseline(
            detection.findings, f"the prior {prior.series_instance_uid} could not be aligned: {exc}"
        )
    when = str(study_date(prior))
    return PriorOutcome(
        reading.findings,
        TimePoint(
            prior=prior.slices[0],
            prior_date=when,
            changes=reading.comparison.changes,
            resolved=reading.comparison.resolved,
            prior_volume=prior.volume,
            registration=reading.registration,
        ),
        {
            "study_instance_uid": prior.study_instance_uid,
            "series_instance_uid": prior.series_instance_uid,
            "study_date": when,
            "interval_days": interval_days,
            "registration_residual_mm": round(reading.registration.residual_mm, 1),
            # 4x4, row by row: a current point (LPS mm) to the same anatomy in the prior.
            "registration_current_to_prior": [
                [round(float(v), 6) for v in row] for row in reading.registration.current_to_prior
            ],
        },
        reading.prior_findings,
    )


def within_interval(days: int, rules: PriorsSettings) -> bool:
    return rules.min_interval_days <= days <= rules.max_age_days


def parse_da(text: str) -> date | None:
    """A DICOM DA value (YYYYMMDD) as a date; None when empty or not one."""
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:8])) if len(text) == 8 else None
    except ValueError:
        return None


def study_date(series: CTSeries) -> date | None:
    """Study Date (0008,0020); None when absent or not a DICOM DA value."""
    return parse_da(str(series.slices[0].get("StudyDate", "") or ""))


def patient_of(series: CTSeries) -> tuple[str, str]:
    """(Patient ID, Issuer of Patient ID): who a series is of, as priors are matched."""
    ds = series.slices[0]
    return str(ds.get("PatientID", "") or ""), str(ds.get("IssuerOfPatientID", "") or "")


def choose_prior(
    current: CTSeries, candidates: Sequence[CTSeries], rules: PriorsSettings
) -> PriorChoice:
    """The most recent candidate of the same patient dated ``min_interval_days`` to
    ``max_age_days`` before the current study; of its series, the thinnest."""
    today = study_date(current)
    if today is None:
        return PriorChoice(None, "the current series has no valid Study Date (0008,0020)")
    patient = patient_of(current)
    if not patient[0]:
        return PriorChoice(None, "the current series has no Patient ID (0010,0020)")
    eligible: list[tuple[int, float, CTSeries]] = []
    reasons = []
    for candidate in candidates:
        if candidate.study_instance_uid == current.study_instance_uid:
            continue
        if patient_of(candidate) != patient:
            reasons.append(f"{candidate.series_instance_uid}: another patient (Patient ID/issuer)")
            continue
        when = study_date(candidate)
        if when is None:
            reasons.append(f"{candidate.series_instance_uid}: no valid Study Date (0008,0020)")
            continue
        days = (today - when).days
        if not within_interval(days, rules):
            reasons.append(
                f"{candidate.series_instance_uid}: {days} days earlier, outside "
                f"{rules.min_interval_days}-{rules.max_age_days}"
            )
            continue
        eligible.append((days, candidate.volume.spacing[2], candidate))
    if not eligible:
        why = "; ".join(reasons) if reasons else "no earlier CT of this patient was given"
        return PriorChoice(None, f"no eligible prior: {why}")
    days, _, prior = min(eligible, key=lambda e: (e[0], e[1]))
    return PriorChoice(prior, f"{prior.study_instance_uid} ({days} days earlier)", days)
