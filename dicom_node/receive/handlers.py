"""The storage SCP's event handlers: C-ECHO, C-STORE, and the end of an association.

pynetdicom calls these on the association's own thread; C-STORE blocks there until the
instance is durable and indexed, so the status the sender gets is the truth.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.events import Event
from pynetdicom.pdu_primitives import A_RELEASE

from dicom_node import dimse
from dicom_node.dimse import StoreStatus
from dicom_node.observe import metrics
from dicom_node.observe.audit import AuditRecord, AuditTrail
from dicom_node.pipeline.completion import SeriesCompletion
from dicom_node.receive.access import AccessPolicy, GatedAE, Verdict
from dicom_node.receive.ingest import (
    IdentityConflict,
    InstanceRefused,
    Receiver,
    file_meta_header,
)
from dicom_node.receive.store_request import read_stores_directly
from dicom_node.receive.store_response import answer_stores_directly
from dicom_node.receive.wakeups import wait_for_events

log = logging.getLogger(__name__)

#: Room for a PDU other than P-DATA (an A-ASSOCIATE-RQ with many contexts) when the largest
#: P-DATA PDU the node accepts is small.
NEGOTIATION_PDU_BYTES = 1 << 20


class TransferTooLarge(OSError):
    """Raised from the socket reader: pynetdicom then closes the association's transport."""


def receive_exactly(connection: socket.socket, count: int) -> bytearray:
    """Read ``count`` bytes straight into one buffer, fewer if the peer closes first.

    pynetdicom's own reader takes 4 KiB per ``recv`` and appends each piece: about 130 Python
    iterations and copies per 512 x 512 slice, a large share of its per-instance cost."""
    buffer = bytearray(count)
    view = memoryview(buffer)
    read = 0
    while read < count:
        got = connection.recv_into(view[read:], count - read)
        if not got:
            del view
            return buffer[:read]
        read += got
    return buffer


class BoundedReader:
    """The association's socket reads, bounded: a PDU header may declare any length up to
    4 GiB, and pynetdicom holds a whole message in memory before the C-STORE handler sees it,
    so a PDU longer than negotiated or a message past ``security.max_instance_bytes`` closes
    the connection before the memory is taken."""

    def __init__(self, connection: socket.socket, max_pdu: int, max_message: int) -> None:
        self.connection = connection
        self.max_pdu = max(max_pdu, NEGOTIATION_PDU_BYTES) if max_pdu else max_message
        self.max_message = max_message
        self.in_message = 0
        self.refused = ""

    def recv(self, nr_bytes: int) -> bytearray:
        if nr_bytes > self.max_pdu:
            self.refused = f"a PDU of {nr_bytes} bytes (at most {self.max_pdu} accepted)"
            raise TransferTooLarge(self.refused)
        self.in_message += nr_bytes
        if self.in_message > self.max_message:
            self.refused = f"a message over {self.max_message} bytes (security.max_instance_bytes)"
            raise TransferTooLarge(self.refused)
        try:
            return receive_exactly(self.connection, nr_bytes)
        except TimeoutError:  # short: pynetdicom then closes the transport (Evt17)
            waited = self.connection.gettimeout()
            self.refused = f"the peer sent nothing for {waited:g} s in the middle of a PDU"
            return bytearray()

    def message_done(self) -> None:
        self.in_message = 0


@dataclass
class Transfer:
    """One association as the node sees it, for its end: what it stored, and for whom."""

    verdict: Verdict
    reader: BoundedReader | None = None
    series: set[int] = field(default_factory=set)
    #: Study Instance UID -> instances stored (new or resent) on this association.
    stored: Counter[str] = field(default_factory=Counter)
    refused: int = 0
    #: The peer asked to release: everything it sent was answered.
    release_requested: bool = False


class StorageHandlers:
    def __init__(
        self,
        receiver: Receiver,
        completion: SeriesCompletion,
        complete_on_release: bool,
        access: AccessPolicy,
        audit: AuditTrail,
        max_pdu: int,
        max_instance_bytes: int,
    ) -> None:
        self.receiver = receiver
        self.completion = completion
        self.complete_on_release = complete_on_release
        self.access = access
        self.audit = audit
        self.max_pdu = max_pdu
        self.max_instance_bytes = max_instance_bytes
        self._transfers: dict[int, Transfer] = {}
        self._lock = threading.Lock()
        #: Connections the node's other receiving processes hold (:func:`scp.bind_scp`).
        self.open_elsewhere: Callable[[], int] = lambda: 0

    def bindings(self) -> list[tuple[evt.EventType, object]]:
        return [
            (evt.EVT_CONN_OPEN, self.on_open),
            (evt.EVT_ESTABLISHED, self.on_established),
            (evt.EVT_REJECTED, self.on_rejected),
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_C_STORE, self.on_store),
            (evt.EVT_ACSE_RECV, self.on_acse_received),
            (evt.EVT_RELEASED, self.on_released),
            (evt.EVT_ABORTED, self.on_aborted),
            (evt.EVT_CONN_CLOSE, self.on_aborted),
        ]

    def admits(self, host: str) -> bool:
        """Asked where connections are accepted: a connection from an address no peer may call
        from is closed there, before it costs a thread. One audit event per host and minute
        up to its association rate, so a flood cannot fill the audit trail."""
        if self.access.titles_for(host) != ():
            return True
        if not self.access.judge(host).over_rate:
            detail = f"no peer may call from {host} (security.peers)"
            log.warning("connection closed: %s", detail)
            self.audit.record(AuditRecord("connection", "refused", host=host, detail=detail))
        return False

    def on_open(self, event: Event) -> None:
        """Before pynetdicom negotiates: the caller's allowlist and rate (:mod:`access`), and
        the bounded socket reader."""
        assoc = event.assoc
        host = str(getattr(event, "address", ("",))[0])
        try:
            verdict = self.access.judge(host)
        except Exception:  # pynetdicom would swallow it and let the caller in: fail closed
            log.exception("access check for %s failed; rejecting", host)
            verdict = Verdict(host, (), over_rate=False)
        assoc._ae = GatedAE(assoc.ae, verdict, self.open_elsewhere)  # type: ignore[assignment]
        transfer = Transfer(verdict)
        transport = assoc.dul.socket
        if transport is not None and transport.socket is not None:
            transfer.reader = BoundedReader(transport.socket, self.max_pdu, self.max_instance_bytes)
            transport.recv = transfer.reader.recv  # type: ignore[method-assign]
        with self._lock:
            self._transfers[id(assoc)] = transfer

    def _transfer(self, event: Event) -> Transfer | None:
        with self._lock:
            return self._transfers.get(id(event.assoc))

    def _end(self, event: Event) -> Transfer | None:
        with self._lock:
            return self._transfers.pop(id(event.assoc), None)

    def _record(self, event: Event, kind: str, outcome: str, **fields: str) -> None:
        self.audit.record(
            AuditRecord(
                kind,
                outcome,
                calling_ae=str(event.assoc.requestor.ae_title).strip(),
                called_ae=str(event.assoc.acceptor.ae_title).strip(),
                host=str(event.assoc.requestor.address),
                **fields,
            )
        )

    def on_established(self, event: Event) -> None:
        """pynetdicom's threads poll for work, which costs several ms per instance in a CT
        stream and the CPU of every other association (pydicom/pynetdicom issue 650):
        from here on they wait for it (:mod:`wakeups`), and C-STORE requests and responses
        skip pydicom's general reader and writer (:mod:`store_request`, :mod:`store_response`)."""
        wait_for_events(event.assoc)
        read_stores_directly(event.assoc)
        answer_stores_directly(event.assoc)
        self._record(event, "association", "success")

    def on_rejected(self, event: Event) -> None:
        transfer = self._end(event)
        calling = str(event.assoc.requestor.ae_title).strip()
        request = event.assoc.requestor.primitive
        called = str(request.called_ae_title).strip() if request is not None else ""
        reason = transfer.verdict.refusal(calling) if transfer else ""
        if not reason and called != str(event.assoc.acceptor.ae_title).strip():
            reason = f"called AE title {called!r} is not this node's"
        reason = reason or "too many simultaneous associations"
        host = event.assoc.requestor.address
        log.warning("association from %s (%s) rejected: %s", calling, host, reason)
        self._record(event, "association", "refused", detail=reason)

    def on_echo(self, event: Event) -> int:
        return StoreStatus.SUCCESS

    def on_store(self, event: Event) -> int | Dataset:
        requestor = event.assoc.requestor
        transfer = self._transfer(event)
        if transfer is not None and transfer.reader is not None:
            transfer.reader.message_done()
        sop_uid = str(getattr(event.request, "AffectedSOPInstanceUID", "") or "")
        try:
            encoded = file_meta_header(
                str(getattr(event.request, "AffectedSOPClassUID", "") or ""),
                sop_uid,
                str(event.context.transfer_syntax),
                str(requestor.ae_title).strip(),
            ) + event.encoded_dataset(include_meta=False)
            done = self.receiver.ingest(
                encoded,
                calling_ae=str(requestor.ae_title).strip(),
                peer_host=str(requestor.address),
                expected_sop_uid=sop_uid or None,
            )
        except InstanceRefused as exc:
            log.warning(
                "C-STORE from %s refused with 0x%04X: %s", requestor.ae_title, exc.status, exc
            )
            if transfer is not None:
                transfer.refused += 1
            if isinstance(exc, IdentityConflict):
                self._record(event, "identity-conflict", "refused", detail=str(exc))
            metrics.INSTANCES_REFUSED.labels(f"0x{exc.status:04X}").inc()
            return dimse.with_comment(exc.status, str(exc))
        except Exception:  # the node keeps serving; the sender may retry this one
            log.exception("C-STORE from %s failed", requestor.ae_title)
            if transfer is not None:
                transfer.refused += 1
            metrics.INSTANCES_REFUSED.labels(f"0x{StoreStatus.OUT_OF_RESOURCES:04X}").inc()
            return dimse.with_comment(StoreStatus.OUT_OF_RESOURCES, "internal error; see node log")
        if done.changed:
            detail = f"SOPInstanceUID {sop_uid} received again with another data set; first kept"
            self._record(
                event, "identity-conflict", "first-kept", study_uid=done.study_uid, detail=detail
            )
        with self._lock:
            if transfer is not None:
                transfer.series.add(done.series_id)
                transfer.stored[done.study_uid] += 1
        metrics.INSTANCES_RECEIVED.inc()
        return StoreStatus.SUCCESS

    def _audit_stored(self, event: Event, transfer: Transfer, ended: str) -> None:
        """One audit event per study an association stored into (the ATNA "DICOM Instances
        Transferred" granularity); the instances themselves are rows of the index."""
        for study_uid, count in sorted(transfer.stored.items()):
            detail = f"{count} instance(s) stored; association {ended}"
            self._record(event, "instances-stored", "success", study_uid=study_uid, detail=detail)
        if transfer.refused:
            detail = f"{transfer.refused} instance(s) refused; association {ended}"
            self._record(event, "instances-stored", "refused", detail=detail)
        if transfer.reader is not None and transfer.reader.refused:
            detail = f"connection closed: {transfer.reader.refused}"
            log.warning("association from %s: %s", event.assoc.requestor.address, detail)
            self._record(event, "instances-stored", "refused", detail=detail)

    def on_acse_received(self, event: Event) -> None:
        """A release request, marked on the association's thread before the node answers it:
        the peer may close the connection as soon as the answer reaches it, and the
        transport's thread may then report the close (EVT_CONN_CLOSE) before this thread
        reports the release (EVT_RELEASED)."""
        primitive = getattr(event, "primitive", None)
        if isinstance(primitive, A_RELEASE) and primitive.result is None:
            transfer = self._transfer(event)
            if transfer is not None:
                transfer.release_requested = True

    def on_released(self, event: Event) -> None:
        transfer = self._end(event)
        if transfer is not None:
            self._released(event, transfer)

    def _released(self, event: Event, transfer: Transfer) -> None:
        if transfer.series and self.complete_on_release:
            try:
                self.completion.on_release(transfer.series)
            except Exception:  # the quiet period completes them instead
                log.exception("early completion of %d series failed", len(transfer.series))
        self._audit_stored(event, transfer, "released")

    def on_aborted(self, event: Event) -> None:
        """An aborted or dropped association: its series wait for the quiet period. A
        connection that closes after its release was asked for was released."""
        transfer = self._end(event)
        if transfer is None:
            return
        if transfer.release_requested:
            self._released(event, transfer)
        else:
            self._audit_stored(event, transfer, "aborted")
