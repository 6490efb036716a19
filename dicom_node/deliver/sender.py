"""The sender: C-STORE SCU of results to each destination, with retries and a dead letter.

Each result instance is recorded as delivered only after the destination answers with a
success (or warning) status; a crash in between means it is sent again with the same SOP
Instance UID, which a PACS stores once. Failures back off exponentially with jitter; after
``sender.max_attempts`` the job is dead-lettered with the destination's answer as the reason.
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import Destination, NodeConfig
from dicom_node.deliver.store_scu import RemoteAE, remote_for, store_instances
from dicom_node.jobs import JobFailed, JobHandler, Lease, LeaseLost
from dicom_node.observe import metrics
from dicom_node.observe.audit import AuditRecord, AuditTrail
from dicom_node.tls import client_context
from storage import index, queue
from storage.models import ResultInstance, Series, Study
from storage.states import JobKind

log = logging.getLogger(__name__)


class Sender(JobHandler):
    """Runs ``deliver`` jobs: the current result's undelivered instances to one destination."""

    kind = JobKind.DELIVER

    def __init__(
        self,
        db: sessionmaker[Session],
        config: NodeConfig,
        stopping: threading.Event,
        audit: AuditTrail | None = None,
    ) -> None:
        super().__init__(config.sender)
        self.db = db
        self.audit = audit
        self.config = config
        self.stopping = stopping
        self.tls = client_context(config.security.tls) if config.security.tls else None

    def finished(self, job: queue.ClaimedJob, outcome: str, reason: str) -> None:
        if outcome in ("handed_back", "lease_lost"):
            return
        metrics.DELIVERIES.labels(job.destination, outcome).inc()
        if outcome == "failed":
            self._audit(job, "failed", reason)

    def _destination(self, job: queue.ClaimedJob) -> Destination:
        try:
            return self.config.destination(job.destination)
        except KeyError:  # taken out of config.yaml since the job was queued: no retry mends it
            raise JobFailed(
                f"destination {job.destination!r} is no longer in the configuration",
                retry=False,
            ) from None

    def _audit(self, job: queue.ClaimedJob, outcome: str, detail: str) -> None:
        if self.audit is None:
            return
        try:
            destination = self._destination(job)
            with self.db() as session:
                series = session.get_one(Series, job.series_id)
                study_uid = session.get_one(Study, series.study_id).study_uid
                remote = remote_for(destination, series)
        except JobFailed:
            remote, study_uid = RemoteAE(job.destination, "", 0), ""
        self.audit.record(
            AuditRecord(
                "delivery",
                outcome,
                calling_ae=self.config.node.ae_title,
                called_ae=remote.ae_title,
                host=remote.host,
                study_uid=study_uid,
                detail=f"{job.destination}: {detail}",
            )
        )

    def run(self, job: queue.ClaimedJob, lease: Lease) -> None:
        destination = self._destination(job)
        with self.db() as session:
            series = session.get_one(Series, job.series_id)
            due = index.undelivered(session, job.series_id, destination.name, destination.objects)
        if due:
            remote = remote_for(destination, series)
            lease.stage(f"sending {len(due)} object(s)")

            def stored(instance: ResultInstance, code: int) -> None:
                with self.db.begin() as session:
                    index.record_delivery(session, instance.id, destination.name, code)

            try:
                store_instances(
                    self.config.node.ae_title,
                    remote,
                    due,
                    self.config.sender.timeout_seconds,
                    stored,
                    self.stopping,
                    self.tls if destination.tls else None,
                )
            except OSError as exc:  # a result file unreadable, a socket error pynetdicom let out
                raise JobFailed(f"sending to {remote}: {exc}") from exc
            log.info(
                "series %s: %d result instance(s) delivered to %s (%s)",
                series.series_uid,
                len(due),
                destination.name,
                remote,
            )
            self._audit(job, "success", f"{len(due)} result instance(s) to {remote}")
        with self.db.begin() as session:
            if not queue.complete(session, job):
                raise LeaseLost(f"job {job.id} was taken over while delivering")
