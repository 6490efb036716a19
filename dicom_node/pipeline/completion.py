"""When is a series complete? DICOM never says, so the node decides, early when it safely can.

A series is complete when no instance has arrived for the quiet period, or as soon as the
association that carried it is released if its slices already form a complete, regular
volume: contiguous positions at one step, and as many images as Images in Acquisition says
where the scanner sets it. A series with a gap waits out the quiet period (the missing slice
may come on another association). Instances arriving after completion reopen the series; it
completes again and its new analysis amends the earlier results.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Sequence
from datetime import timedelta

from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import NodeConfig
from dicom_node.observe import metrics
from dicom_node.pipeline.selection import select
from dicom_node.pipeline.slices import is_localizer, median_step
from storage import index
from storage.models import Instance, Series, utcnow
from storage.states import SeriesState

log = logging.getLogger(__name__)


def volume_gap(instances: Sequence[Instance], tolerance: float = 0.1) -> str | None:
    """None when the slices form a complete, regular volume; else what looks missing."""
    images = [i for i in instances if not is_localizer(i.image_type)]
    if not images:
        return "no images"
    if any(i.frames > 1 for i in images):  # Enhanced CT: one instance holds the volume
        return None if len(images) == 1 else f"{len(images)} multi-frame instances"
    positions = sorted(i.position_mm for i in images if i.position_mm is not None)
    if len(positions) < len(images):
        return f"{len(images) - len(positions)} image(s) without a slice position"
    if len(positions) < 3:
        return f"only {len(positions)} slice(s)"
    step = median_step(positions) or 0.0
    for before, after in itertools.pairwise(positions):
        if after - before > step * (1 + tolerance):
            return f"gap of {after - before:.2f} mm after {before:.2f} mm (step {step:.2f} mm)"
    declared = {i.images_in_acquisition for i in images if i.images_in_acquisition}
    if len(declared) == 1:
        (expected,) = declared
        if len(images) < expected:
            return f"{len(images)} of {expected} images (Images in Acquisition)"
    return None


class SeriesCompletion:
    """Completes series and hands them to selection, in one transaction each time."""

    def __init__(self, db: sessionmaker[Session], config: NodeConfig) -> None:
        self.db = db
        self.config = config

    def on_release(self, series_ids: Iterable[int]) -> dict[int, SeriesState]:
        """An association was released: complete those of its series that are whole."""
        with self.db.begin() as session:
            ready = []
            for series in index.series_awaiting_completion(session, ids=series_ids):
                gap = volume_gap(index.instances_of(session, series.id))
                if gap is None:
                    ready.append(series)
                else:
                    log.info(
                        "series %s not complete at release (%s); waiting %.0f s",
                        series.series_uid,
                        gap,
                        self.config.completion.quiet_seconds,
                    )
            return self._complete(session, ready, "association released")

    def sweep(self) -> dict[int, SeriesState]:
        """Complete every series that has been quiet for the configured period."""
        cutoff = utcnow() - timedelta(seconds=self.config.completion.quiet_seconds)
        with self.db.begin() as session:
            quiet = index.series_awaiting_completion(session, quiet_before=cutoff)
            return self._complete(session, quiet, "quiet period")

    def _complete(self, session: Session, series: list[Series], why: str) -> dict[int, SeriesState]:
        if not series:
            return {}
        for s in series:
            log.info("series %s complete (%s, %d instances)", s.series_uid, why, s.version)
        metrics.SERIES_COMPLETED.labels(why).inc(len(series))
        return select(session, series, self.config.selection, self.config.workers.max_attempts)
