"""The audit trail: who sent or received what, when, from where, and whether it was let in.

Every event goes to the database (``storage.audit``); with ``security.audit_syslog`` set, also
to a collector as an RFC 5424 line (facility authpriv, as IHE ATNA audit repositories expect).
Events carry AE titles, addresses, UIDs and counts, never a patient's name or ID. Writing an
audit event never fails the work it records: a database or collector that is down is logged.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import AuditSyslog
from dicom_node.observe import metrics
from storage.audit import record_event

log = logging.getLogger(__name__)

#: RFC 5424 facility 10 (security/authorization messages).
AUTHPRIV = 10
NOTICE, WARNING = 5, 4
#: The structured data element's ID: "name@private enterprise number" (32473 is the number
#: RFC 5612 reserves for documentation and examples; a site may set its own).
SD_ID = "audit@32473"


@dataclass(frozen=True)
class AuditRecord:
    event: str
    outcome: str
    calling_ae: str = ""
    called_ae: str = ""
    host: str = ""
    study_uid: str = ""
    detail: str = ""


def _sd_value(value: str) -> str:
    """PARAM-VALUE escaping of RFC 5424 6.3.3."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def rfc5424_line(record: AuditRecord, app_name: str, when: datetime | None = None) -> bytes:
    severity = NOTICE if record.outcome == "success" else WARNING
    stamp = (when or datetime.now(UTC)).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    params = " ".join(
        f'{name}="{_sd_value(value)}"'
        for name, value in (
            ("outcome", record.outcome),
            ("callingAE", record.calling_ae),
            ("calledAE", record.called_ae),
            ("host", record.host),
            ("studyUID", record.study_uid),
        )
        if value
    )
    header = (
        f"<{AUTHPRIV * 8 + severity}>1 {stamp} {socket.gethostname()} {app_name} "
        f"{os.getpid()} {record.event} [{SD_ID} {params}]"
    )
    return (header + (f" {record.detail}" if record.detail else "")).encode("utf-8")


class SyslogSink:
    """UDP datagrams, or TCP with octet counting (RFC 6587), reconnecting when needed."""

    def __init__(self, settings: AuditSyslog) -> None:
        self.settings = settings
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()

    def _connect(self) -> socket.socket:
        kind = socket.SOCK_DGRAM if self.settings.protocol == "udp" else socket.SOCK_STREAM
        family, _, _, _, address = socket.getaddrinfo(
            self.settings.host, self.settings.port, type=kind
        )[0]
        connection = socket.socket(family, kind)
        connection.settimeout(5)
        connection.connect(address)
        return connection

    def send(self, line: bytes) -> None:
        with self._lock:
            try:
                if self._socket is None:
                    self._socket = self._connect()
                if self.settings.protocol == "udp":
                    self._socket.send(line)
                else:
                    self._socket.sendall(b"%d " % len(line) + line)
            except OSError as exc:
                metrics.AUDIT_EVENTS_LOST.labels("syslog").inc()
                log.error(
                    "audit syslog %s:%d unreachable: %s",
                    self.settings.host,
                    self.settings.port,
                    exc.strerror or exc.__class__.__name__,
                )
                if self._socket is not None:
                    self._socket.close()
                self._socket = None


class AuditTrail:
    def __init__(self, db: sessionmaker[Session], syslog: AuditSyslog | None = None) -> None:
        self.db = db
        self.syslog = SyslogSink(syslog) if syslog else None
        self.app_name = syslog.app_name if syslog else "dicom-node"

    def record(self, record: AuditRecord) -> None:
        try:
            with self.db.begin() as session:
                record_event(
                    session,
                    record.event,
                    record.outcome,
                    record.calling_ae,
                    record.called_ae,
                    record.host,
                    record.study_uid,
                    record.detail,
                )
        except Exception as exc:  # the database may be down: the work goes on, the gap is counted
            log.error("audit event %s not written: %s", record.event, exc.__class__.__name__)
            metrics.AUDIT_EVENTS_LOST.labels("database").inc()
        if self.syslog is not None:
            self.syslog.send(rfc5424_line(record, self.app_name))
