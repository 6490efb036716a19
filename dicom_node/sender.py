"""The sender: C-STORE SCU of results to each destination, with retries and a dead letter.

Each result instance is recorded as delivered only after the destination answers with a
success (or warning) status; a crash in between means it is sent again with the same SOP
Instance UID, which a PACS stores once. Failures back off exponentially with jitter; after
``sender.max_attempts`` the job is dead-lettered with the destination's answer as the reason.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import metrics, status
from dicom_node.audit import AuditRecord, AuditTrail
from dicom_node.config import Destination, NodeConfig
from dicom_node.tls import client_context
from storage import index, queue
from storage.models import ResultInstance, Series, Study

log = logging.getLogger(__name__)


class DeliveryFailed(Exception):
    """The destination could not be reached or refused an instance; the message says how."""


@dataclass(frozen=True)
class Peer:
    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def peer_for(destination: Destination, series: Series) -> Peer:
    if destination.return_to_sender:
        if not series.calling_ae or not series.peer_host:
            raise DeliveryFailed("return_to_sender: the series' sender is not known")
        return Peer(series.calling_ae, series.peer_host, destination.port)
    return Peer(destination.ae_title, destination.host, destination.port)


def store_instances(
    calling_ae: str,
    peer: Peer,
    instances: list[ResultInstance],
    timeout: float,
    on_stored: Callable[[ResultInstance, int], None],
    stopping: threading.Event | None = None,
    tls: ssl.SSLContext | None = None,
) -> None:
    """Send ``instances`` over one association; ``on_stored(instance, status)`` after each
    acknowledged one. Raises :class:`DeliveryFailed` at the first failure, and
    :class:`storage.queue.HandedBack` between instances once ``stopping`` is set."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    for sop_class in sorted({i.sop_class_uid for i in instances}):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate(
        peer.host,
        peer.port,
        ae_title=peer.ae_title,
        tls_args=(tls, peer.host) if tls is not None else None,
    )
    if not assoc.is_established:
        if assoc.is_rejected:
            raise DeliveryFailed(f"{peer} rejected the association (A-ASSOCIATE-RJ)")
        raise DeliveryFailed(f"no association with {peer} (unreachable or aborted)")
    try:
        for instance in instances:
            if stopping is not None and stopping.is_set():
                raise queue.HandedBack
            ds = pydicom.dcmread(instance.path)
            answer = assoc.send_c_store(ds)
            code = int(answer.get("Status", -1)) if answer else -1
            if code not in status.STORED:
                comment = str(answer.get("ErrorComment", "")) if answer else ""
                what = f"0x{code:04X}" if code >= 0 else "no answer (timeout or abort)"
                raise DeliveryFailed(
                    f"{peer} answered {what} to {instance.kind} {instance.sop_uid}"
                    + (f": {comment}" if comment else "")
                )
            on_stored(instance, code)
    finally:
        if assoc.is_established:
            assoc.release()


class Sender:
    def __init__(
        self,
        db: sessionmaker[Session],
        config: NodeConfig,
        name: str,
        stopping: threading.Event,
        audit: AuditTrail | None = None,
    ) -> None:
        self.db = db
        self.audit = audit
        self.config = config
        self.name = name
        self.stopping = stopping
        settings = config.sender
        self.backoff = queue.Backoff(settings.backoff_seconds, settings.max_backoff_seconds)
        self.tls = client_context(config.security.tls) if config.security.tls else None

    def run_once(self) -> bool:
        """Deliver one job if one is ready; return whether there was one."""
        with self.db.begin() as session:
            job = queue.claim(
                session, "deliver", self.name, self.config.sender.timeout_seconds * 10
            )
        if job is None:
            return False
        started, outcome = time.monotonic(), "failed"
        try:
            self._deliver(job)
            outcome = "success"
        except queue.HandedBack:
            outcome = "handed_back"
            with self.db.begin() as session:
                queue.hand_back(session, job)
        except (DeliveryFailed, KeyError, OSError) as exc:
            reason = str(exc)
            with self.db.begin() as session:
                state = queue.fail(session, job, reason, self.backoff)
            self._audit(job, "failed", reason)
            log.warning(
                "delivery job %d to %s, attempt %d/%d: %s%s",
                job.id,
                job.destination,
                job.attempts,
                job.max_attempts,
                reason,
                " (dead-lettered)" if state == queue.FAILED else "",
            )
        except Exception as exc:
            log.exception("delivery job %d failed", job.id)
            with self.db.begin() as session:
                queue.fail(session, job, f"{exc.__class__.__name__}: {exc}", self.backoff)
        finally:
            metrics.JOB_SECONDS.labels("deliver", outcome).observe(time.monotonic() - started)
            if outcome != "handed_back":
                metrics.DELIVERIES.labels(job.destination, outcome).inc()
        return True

    def _audit(self, job: queue.ClaimedJob, outcome: str, detail: str) -> None:
        if self.audit is None:
            return
        try:
            destination = self.config.destination(job.destination)
            with self.db() as session:
                series = session.get_one(Series, job.series_id)
                study_uid = session.get_one(Study, series.study_id).study_uid
                peer = peer_for(destination, series)
        except (KeyError, DeliveryFailed):
            peer, study_uid = Peer(job.destination, "", 0), ""
        self.audit.record(
            AuditRecord(
                "delivery",
                outcome,
                calling_ae=self.config.node.ae_title,
                called_ae=peer.ae_title,
                host=peer.host,
                study_uid=study_uid,
                detail=f"{job.destination}: {detail}",
            )
        )

    def _deliver(self, job: queue.ClaimedJob) -> None:
        destination = self.config.destination(job.destination)
        with self.db() as session:
            series = session.get_one(Series, job.series_id)
            due = index.undelivered(session, job.series_id, destination.name, destination.objects)
        if due:
            peer = peer_for(destination, series)
            with self.db.begin() as session:
                queue.set_stage(session, job, f"sending {len(due)} object(s)")

            def stored(instance: ResultInstance, code: int) -> None:
                with self.db.begin() as session:
                    index.record_delivery(session, instance.id, destination.name, code)

            store_instances(
                self.config.node.ae_title,
                peer,
                due,
                self.config.sender.timeout_seconds,
                stored,
                self.stopping,
                self.tls if destination.tls else None,
            )
            log.info(
                "series %s: %d result instance(s) delivered to %s (%s)",
                series.series_uid,
                len(due),
                destination.name,
                peer,
            )
            self._audit(job, "success", f"{len(due)} result instance(s) to {peer}")
        with self.db.begin() as session:
            queue.complete(session, job)
