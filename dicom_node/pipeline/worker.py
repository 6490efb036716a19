"""The analysis worker: claim a series, run Res-MTNet on it, store the results, queue delivery.

The model is loaded once per worker and kept. A series the engine cannot read (geometry,
modality, undecodable pixels) is a decision, not a failure: it is marked ``rejected`` with the
reason and not retried. Anything else is a failure, retried with backoff, then dead-lettered.
"""

from __future__ import annotations

import io
import logging
import threading
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import NodeConfig
from dicom_node.jobs import HandedBack, JobHandler, Lease, LeaseLost
from dicom_node.observe import metrics
from dicom_node.observe.audit import AuditTrail
from dicom_node.pipeline.prior_search import PriorSearch
from dicom_node.pipeline.priors import (
    PriorOutcome,
)
from dicom_node.pipeline.results import (
    Amendment,
    ResultObjects,
    ResultRecord,
    build_results,
    count_findings,
)
from dicom_node.pipeline.series import (
    CTSeries,
    SeriesRejected,
    load_series,
    read_stored,
)
from inference.detector import NoduleDetector
from storage import index, queue
from storage.files import FileStore
from storage.models import Result, Series
from storage.states import JobKind, JobState, SeriesState

log = logging.getLogger(__name__)


def _amendment(session: Session, result: Result | None) -> Amendment | None:
    """What the series' current result must hand on to its replacement."""
    if result is None:
        return None
    record = ResultRecord.from_json(result.findings_json)
    (sr,) = index.result_files(session, result.id, "sr")
    tracked = [
        (finding.center_mm, uid)
        for finding, uid in zip(record.findings, record.tracking_uids, strict=True)
    ]
    return Amendment(pydicom.dcmread(sr.path), record.output_series, tracked)


def _encode(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


class AnalysisWorker(JobHandler):
    """Runs ``analyze`` jobs with one loaded detector."""

    kind = JobKind.ANALYZE

    def __init__(
        self,
        db: sessionmaker[Session],
        config: NodeConfig,
        detector: NoduleDetector,
        results: FileStore,
        stopping: threading.Event,
        audit: AuditTrail | None = None,
    ) -> None:
        super().__init__(config.workers)
        self.priors = PriorSearch(db, config, detector, audit)
        self.db = db
        self.config = config
        self.detector = detector
        self.results = results
        self.stopping = stopping

    def settle_failure(
        self, session: Session, job: queue.ClaimedJob, state: JobState, reason: str
    ) -> None:
        if state == JobState.FAILED:
            index.settle_analysis(
                session, job.series_id, job.series_version, SeriesState.FAILED, reason
            )

    def run(self, job: queue.ClaimedJob, lease: Lease) -> None:
        lease.stage("reading the series")
        with self.db() as session:
            series_row = session.get_one(Series, job.series_id)
            paths = [Path(i.path) for i in index.instances_of(session, job.series_id)]
            amends = _amendment(session, index.current_result(session, job.series_id))
        stored, missing = read_stored(paths, series_row.series_uid)
        if missing:
            with self.db.begin() as session:
                index.forget_instances(session, job.series_id, missing)
            log.warning(
                "series %s: %d indexed instance(s) had no file (a crash before their "
                "acknowledgement); removed from the index, analyzing the rest",
                series_row.series_uid,
                len(missing),
            )
        try:
            series = load_series(stored, self.config.eligibility)
        except SeriesRejected as exc:
            self._reject(job, series_row.series_uid, str(exc))
            return
        if self.stopping.is_set():  # the analysis would outlast the stop's grace period
            raise HandedBack
        lease.stage("detecting nodules")
        with metrics.MODEL_SECONDS.time():
            detection = self.detector.detect(series.volume)
        if self.config.priors.enabled:
            lease.stage("comparing with the prior")
            outcome = self.priors.outcome(job.series_id, series, detection)
        else:
            outcome = PriorOutcome.baseline(
                detection.findings, "comparison with earlier CT is off (priors.enabled)"
            )
        lease.stage("writing SR, SEG, key images")
        objects = build_results(
            series, outcome.findings, self.detector.info, amends, outcome.time_point
        )
        files = self._store(series, objects)
        record = ResultRecord.of(
            outcome.findings,
            objects,
            detection.candidates,
            detection.timings_s,
            outcome.time_point,
            outcome.prior,
            amends,
        )
        found = count_findings(f.finding for f in record.findings)
        with self.db.begin() as session:
            index.save_result(
                session,
                job.series_id,
                job.id,
                job.series_version,
                record.to_json(),
                len(record.findings),
                self.detector.info.weights_sha256,
                files,
            )
            for destination in self.config.destinations:
                queue.enqueue(
                    session,
                    JobKind.DELIVER,
                    job.series_id,
                    destination=destination.name,
                    max_attempts=self.config.sender.max_attempts,
                )
            index.settle_analysis(
                session,
                job.series_id,
                job.series_version,
                SeriesState.ANALYZED,
                found,
            )
            if not queue.complete(session, job):
                raise LeaseLost(f"job {job.id} was taken over while analyzing")
        log.info(
            "series %s analyzed: %s%s",
            series.series_instance_uid,
            found,
            " (amends the earlier report)" if amends else "",
        )

    def _reject(self, job: queue.ClaimedJob, series_uid: str, reason: str) -> None:
        """The engine cannot read the series: a decision, settled at once, never retried."""
        log.info("series %s rejected: %s", series_uid, reason)
        with self.db.begin() as session:
            index.settle_analysis(
                session, job.series_id, job.series_version, SeriesState.REJECTED, reason
            )
            if not queue.complete(session, job):
                raise LeaseLost(f"job {job.id} was taken over while reading")

    def _store(self, series: CTSeries, objects: ResultObjects) -> list[index.ResultFile]:
        files = []
        for kind, ds in objects.by_kind():
            stored = self.results.store(
                series.study_instance_uid,
                str(ds.SeriesInstanceUID),
                str(ds.SOPInstanceUID),
                _encode(ds),
            )
            files.append(
                index.ResultFile(str(ds.SOPInstanceUID), str(ds.SOPClassUID), kind, stored.path)
            )
        return files
