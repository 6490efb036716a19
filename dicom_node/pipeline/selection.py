"""Which complete series are analyzed: the configured rules, then one series per study.

A scanner sends many reconstructions of one scan (thin and thick, lung and soft-tissue
kernels, coronal reformats, a scout, a dose report). The detector wants the thinnest axial
reconstruction with a sharp (lung) kernel; analyzing the others costs time and puts duplicate
findings in front of the radiologist.
"""

from __future__ import annotations

import logging
import re
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy.orm import Session

from dicom_node.config import SelectionSettings
from dicom_node.pipeline.slices import is_localizer, slice_steps
from dicom_node.sop_classes import CT_STORAGE_CLASSES, MULTI_FRAME_CT
from storage import index, queue
from storage.models import Instance, Series
from storage.states import CHOSEN, JobKind, SeriesState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SeriesCandidate:
    """A series as selection sees it, summarised from its instances' index rows."""

    series: Series
    sop_classes: frozenset[str]
    image_type: str
    thickness_mm: float | None
    images: int

    @classmethod
    def of(cls, series: Series, instances: Sequence[Instance]) -> SeriesCandidate:
        images = [i for i in instances if not is_localizer(i.image_type)]
        thickness = [i.slice_thickness_mm for i in images if i.slice_thickness_mm]
        if not thickness:
            thickness = slice_steps(i.position_mm for i in images if i.position_mm is not None)
        common = Counter(i.image_type for i in images).most_common(1)
        return cls(
            series=series,
            sop_classes=frozenset(i.sop_class_uid for i in instances),
            image_type=common[0][0] if common else "",
            thickness_mm=statistics.median(thickness) if thickness else None,
            images=sum(i.frames for i in images),
        )

    def is_lung_kernel(self, rules: SelectionSettings) -> bool:
        text = (self.series.convolution_kernel, self.series.description)
        return any(
            re.search(pattern, value, re.IGNORECASE)
            for pattern in rules.lung_kernel_patterns
            for value in text
            if value
        )

    def rank(self, rules: SelectionSettings) -> tuple[bool, float, int]:
        """Higher is better: lung kernel, then thinner, then more images."""
        return (self.is_lung_kernel(rules), -(self.thickness_mm or 99.0), self.images)


def refusal(candidate: SeriesCandidate, rules: SelectionSettings) -> str | None:
    """Why the rules exclude this series, or None."""
    series = candidate.series
    if series.modality not in rules.modalities:
        return (
            f"Modality {series.modality or '(empty)'} is not one of {', '.join(rules.modalities)}"
        )
    other = candidate.sop_classes - CT_STORAGE_CLASSES
    if other:
        return f"SOP class {sorted(other)[0]} is not a CT image storage class"
    if rules.calling_ae_titles and series.calling_ae not in rules.calling_ae_titles:
        return f"sent by {series.calling_ae!r}, which selection.calling_ae_titles does not list"
    description = series.description or ""
    for pattern in rules.series_description_exclude:
        if re.search(pattern, description, re.IGNORECASE):
            return f"Series Description {description!r} matches excluded pattern {pattern!r}"
    if rules.series_description_include and not any(
        re.search(p, description, re.IGNORECASE) for p in rules.series_description_include
    ):
        return f"Series Description {description!r} matches no selection.series_description_include pattern"
    if candidate.images == 0:
        return "only localizer images"
    image_type = candidate.image_type.upper().split("\\")
    missing = [v for v in rules.image_type_required if v.upper() not in image_type]
    if missing and not MULTI_FRAME_CT & candidate.sop_classes:
        return f"Image Type {candidate.image_type!r} lacks {', '.join(missing)}"
    thickness = candidate.thickness_mm
    if thickness is not None and not (
        rules.min_slice_thickness_mm <= thickness <= rules.max_slice_thickness_mm
    ):
        return (
            f"slice thickness {thickness:.2f} mm is outside "
            f"{rules.min_slice_thickness_mm}-{rules.max_slice_thickness_mm} mm"
        )
    return None


def select(
    session: Session, completed: Sequence[Series], rules: SelectionSettings, max_attempts: int
) -> dict[int, SeriesState]:
    """Decide for each completed series: queue its analysis or say why not.

    Series completed together (one association) are ranked together, so the best of a study
    is queued and the others are not; a series completed later is analyzed only if it beats
    what its study already has. Returns the new state by series id.
    """
    candidates = [SeriesCandidate.of(s, index.instances_of(session, s.id)) for s in completed]
    candidates.sort(key=lambda c: c.rank(rules), reverse=True)
    decided: dict[int, SeriesState] = {}
    for candidate in candidates:
        series = candidate.series
        reason = (
            "fetched from a PACS as a prior for comparison: read by that comparison, "
            "not reported on its own"
            if index.fetched_prior(session, series.series_uid) is not None
            else refusal(candidate, rules)
        )
        if reason is None and rules.one_per_study:
            reason = _better_in_study(session, candidate, rules)
        log.info(
            "series %s (%s): %s",
            series.series_uid,
            series.description or "no description",
            "queued for analysis" if reason is None else f"not selected: {reason}",
        )
        if reason is None:
            queue.enqueue(
                session,
                JobKind.ANALYZE,
                series.id,
                series_version=series.version,
                max_attempts=max_attempts,
            )
            index.set_series_state(session, series.id, SeriesState.QUEUED, version=series.version)
            decided[series.id] = SeriesState.QUEUED
        else:
            index.set_series_state(
                session, series.id, SeriesState.NOT_SELECTED, reason, version=series.version
            )
            decided[series.id] = SeriesState.NOT_SELECTED
    return decided


def _better_in_study(
    session: Session, candidate: SeriesCandidate, rules: SelectionSettings
) -> str | None:
    """Why another series of the study is preferred to this one, or None. A chosen series this
    one beats is withdrawn if its analysis has not started (a running one is left to finish)."""
    mine = candidate.rank(rules)
    beaten = []
    for other in index.study_series(session, candidate.series.study_id):
        if other.id == candidate.series.id or other.state not in CHOSEN:
            continue
        theirs = SeriesCandidate.of(other, index.instances_of(session, other.id)).rank(rules)
        if theirs >= mine:
            return _preferred(other.series_uid)
        beaten.append(other)
    for other in beaten:
        reason = _preferred(candidate.series.series_uid)
        if queue.cancel_waiting(session, JobKind.ANALYZE, other.id, reason):
            index.set_series_state(session, other.id, SeriesState.NOT_SELECTED, reason)
            log.info("series %s withdrawn: %s", other.series_uid, reason)
    return None


def _preferred(series_uid: str) -> str:
    return (
        f"series {series_uid} of the same study is preferred "
        "(one series per study: lung kernel, then thinnest)"
    )
