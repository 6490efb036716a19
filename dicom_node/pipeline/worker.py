"""The analysis worker: claim a series, run Res-MTNet on it, store the results, queue delivery.

The model is loaded once per worker and kept. A series the engine cannot read (geometry,
modality, undecodable pixels) is a decision, not a failure: it is marked ``rejected`` with the
reason and not retried. Anything else is a failure, retried with backoff, then dead-lettered.
"""

from __future__ import annotations

import io
import logging
import tempfile
import threading
from datetime import date
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import NodeConfig
from dicom_node.fetch.priors import FetchedPrior, fetch_prior
from dicom_node.jobs import HandedBack, JobHandler, Lease, LeaseLost
from dicom_node.observe import metrics
from dicom_node.observe.audit import AuditTrail
from dicom_node.pipeline.priors import (
    PriorOutcome,
    parse_da,
    read_against_prior,
    study_date,
    within_interval,
)
from dicom_node.pipeline.results import Amendment, ResultObjects, ResultRecord, build_results
from dicom_node.pipeline.series import (
    CTSeries,
    SeriesFiles,
    SeriesRejected,
    load_series,
    read_series,
)
from inference.detector import DetectionResult, NoduleDetector
from storage import index, queue
from storage.files import FileStore
from storage.models import Result, Series
from storage.states import JobKind, JobState, SeriesState

log = logging.getLogger(__name__)


def _read_stored(paths: list[Path], series_uid: str) -> tuple[SeriesFiles, list[Path]]:
    """The series' files, and the indexed paths that have no file."""
    files, missing = SeriesFiles(series_uid), []
    for path in paths:
        try:
            files.datasets.append((path, pydicom.dcmread(path, defer_size="1 KB")))
        except FileNotFoundError:
            missing.append(path)
    return files, missing


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
        self.audit = audit
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
        stored, missing = _read_stored(paths, series_row.series_uid)
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
            outcome = self._against_prior(job.series_id, series, detection)
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
                f"{len(record.findings)} nodule(s)",
            )
            if not queue.complete(session, job):
                raise LeaseLost(f"job {job.id} was taken over while analyzing")
        log.info(
            "series %s analyzed: %d nodule(s)%s",
            series.series_instance_uid,
            len(record.findings),
            " (amends the earlier report)" if amends else "",
        )

    def _against_prior(
        self, series_id: int, series: CTSeries, detection: DetectionResult
    ) -> PriorOutcome:
        """Compare with the most recent eligible earlier series of the patient that this node
        holds and analyzed, reusing what it found there; a baseline reading says why not."""
        today = study_date(series)
        if today is None:
            return PriorOutcome.baseline(
                detection.findings, "the series has no valid Study Date (0008,0020)"
            )
        with self.db() as session:
            earlier = index.earlier_analyzed_series(session, series_id)
            files = {e.series_id: index.instances_of(session, e.series_id) for e in earlier}
        reasons = []
        for candidate in earlier:
            when = parse_da(candidate.study_date)
            days = (today - when).days if when else -1
            if not within_interval(days, self.config.priors):
                reasons.append(f"{candidate.study_uid}: {days} days earlier")
                continue
            stored, missing = _read_stored(
                [Path(i.path) for i in files[candidate.series_id]], candidate.series_uid
            )
            if missing or not stored.datasets:
                reasons.append(f"{candidate.study_uid}: its images are no longer held")
                continue
            try:
                prior = load_series(stored, self.config.eligibility)
            except SeriesRejected as exc:
                reasons.append(f"{candidate.study_uid}: {exc}")
                continue
            found = ResultRecord.from_json(candidate.findings_json).findings
            return read_against_prior(self.detector, series, detection, prior, days, found)
        if self.config.priors.peers:
            return self._from_peers(series, detection, today, reasons)
        why = "; ".join(reasons) or "no earlier CT of this patient analyzed here"
        return PriorOutcome.baseline(detection.findings, f"no eligible prior: {why}")

    def _from_peers(
        self, series: CTSeries, detection: DetectionResult, today: date, reasons: list[str]
    ) -> PriorOutcome:
        """Ask the query/retrieve peers for a prior, fetch it into a folder of its own that
        is deleted afterwards, and read against it: its results stay here, unsent."""
        ds = series.slices[0]
        patient = str(ds.get("PatientID", "") or "")
        issuer = str(ds.get("IssuerOfPatientID", "") or "")
        if not patient:
            return PriorOutcome.baseline(detection.findings, "the series has no Patient ID")
        root = Path(self.config.storage.path)
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".prior-", dir=root) as folder:
            fetched, why = fetch_prior(
                self.config, patient, issuer, today, Path(folder), self.audit, self._expect
            )
            if fetched is None:
                held = "; ".join(reasons) or "none held here"
                return PriorOutcome.baseline(
                    detection.findings, f"no eligible prior ({held}; peers: {why})"
                )
            prior, reason = self._moved(fetched) if fetched.moved else self._got(fetched)
            if prior is None:
                return PriorOutcome.baseline(
                    detection.findings,
                    f"the prior {fetched.series_uid} from {fetched.peer.name} cannot be read: "
                    f"{reason}",
                )
            theirs = prior.slices[0]
            if (
                str(theirs.get("PatientID", "")),
                str(theirs.get("IssuerOfPatientID", "") or ""),
            ) != (
                patient,
                issuer,
            ):
                return PriorOutcome.baseline(
                    detection.findings,
                    f"{fetched.peer.name} sent series {fetched.series_uid} of another patient: "
                    "refused",
                )
            return read_against_prior(self.detector, series, detection, prior, fetched.days)

    def _expect(self, series_uid: str, study_uid: str, peer_ae: str) -> None:
        with self.db.begin() as session:
            index.expect_prior(session, series_uid, study_uid, peer_ae)

    def _got(self, fetched: FetchedPrior) -> tuple[CTSeries | None, str]:
        found, rejected, _ = read_series([fetched.folder], self.config.eligibility)
        prior = next((p for p in found if p.series_instance_uid == fetched.series_uid), None)
        return prior, rejected.get(fetched.series_uid, "no readable CT series arrived")

    def _moved(self, fetched: FetchedPrior) -> tuple[CTSeries | None, str]:
        """The moved series from the node's own store; only what came from the peer asked."""
        with self.db() as session:
            row = index.series_by_uid(session, fetched.series_uid)
            if row is None:
                return None, "nothing arrived (does the PACS know this node's AE title?)"
            if row.calling_ae != fetched.peer.ae_title:
                return None, f"it was sent by {row.calling_ae!r}, not {fetched.peer.ae_title!r}"
            paths = [Path(i.path) for i in index.instances_of(session, row.id)]
        stored, missing = _read_stored(paths, fetched.series_uid)
        if missing:
            return None, f"{len(missing)} of its instances have no file"
        try:
            return load_series(stored, self.config.eligibility), ""
        except SeriesRejected as exc:
            return None, str(exc)

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
