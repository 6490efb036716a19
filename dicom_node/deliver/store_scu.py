"""C-STORE SCU: results sent over one association to a destination's AE.

An instance counts as stored only when the destination answers with a status the Storage
Service Class calls success or warning (PS3.4 B.2.3), read from pynetdicom's status table.
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from dicom_node import dimse
from dicom_node.config import Destination
from dicom_node.jobs import HandedBack, JobFailed
from storage.models import ResultInstance, Series


@dataclass(frozen=True)
class RemoteAE:
    """Where one delivery goes: the destination's AE, or the sender of the study."""

    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def remote_for(destination: Destination, series: Series) -> RemoteAE:
    if destination.return_to_sender:
        if not series.calling_ae or not series.peer_host:
            raise JobFailed("return_to_sender: the series' sender is not known", retry=False)
        return RemoteAE(series.calling_ae, series.peer_host, destination.port)
    return RemoteAE(destination.ae_title, destination.host, destination.port)


def store_instances(
    calling_ae: str,
    peer: RemoteAE,
    instances: list[ResultInstance],
    timeout: float,
    on_stored: Callable[[ResultInstance, int], None],
    stopping: threading.Event | None = None,
    tls: ssl.SSLContext | None = None,
) -> None:
    """Send ``instances`` over one association; ``on_stored(instance, status)`` after each
    acknowledged one. Raises :class:`~dicom_node.jobs.JobFailed` at the first failure, and
    :class:`~dicom_node.jobs.HandedBack` between instances once ``stopping`` is set."""
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
            raise JobFailed(f"{peer} rejected the association (A-ASSOCIATE-RJ)")
        raise JobFailed(f"no association with {peer} (unreachable or aborted)")
    try:
        for instance in instances:
            if stopping is not None and stopping.is_set():
                raise HandedBack
            ds = pydicom.dcmread(instance.path)
            answer = assoc.send_c_store(ds)
            code = int(answer.get("Status", -1)) if answer else -1
            if not dimse.is_stored(code):
                comment = str(answer.get("ErrorComment", "")) if answer else ""
                what = f"0x{code:04X}" if code >= 0 else "no answer (timeout or abort)"
                raise JobFailed(
                    f"{peer} answered {what} to {instance.kind} {instance.sop_uid}"
                    + (f": {comment}" if comment else "")
                )
            on_stored(instance, code)
    finally:
        if assoc.is_established:
            assoc.release()
