"""The storage SCP: which SOP classes and transfer syntaxes the node accepts, and its limits."""

from __future__ import annotations

import logging
import socket
import ssl
import threading

from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, _config
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node.config import NodeSettings
from dicom_node.receive.handlers import StorageHandlers
from dicom_node.receive.transport import ConnectionShares, GuardedAssociationServer
from dicom_node.sop_classes import CT_STORAGE_CLASSES

#: Every syntax the node can decode (pylibjpeg's plugins): what scanners and PACS send CT in.
TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGExtended12Bit,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
]


def build_ae(settings: NodeSettings) -> AE:
    # pynetdicom binds its logging handlers to every association and runs them for each PDU
    # and message, dozens of calls per instance: only worth it when their lines are kept.
    heard = logging.getLogger("pynetdicom").isEnabledFor(logging.INFO)
    _config.LOG_HANDLER_LEVEL = "standard" if heard else "none"
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_pdu_size = settings.max_pdu
    ae.maximum_associations = settings.max_associations
    # A peer that addresses another AE title is misconfigured: reject it at association.
    ae.require_called_aet = True
    ae.network_timeout = settings.timeout_seconds
    ae.acse_timeout = min(30.0, settings.timeout_seconds)
    ae.dimse_timeout = settings.timeout_seconds
    ae.add_supported_context(Verification)
    for sop_class in sorted(CT_STORAGE_CLASSES):
        ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
    if settings.other_sop_classes == "store":
        for context in AllStoragePresentationContexts:
            if context.abstract_syntax and context.abstract_syntax not in CT_STORAGE_CLASSES:
                ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
    return ae


def bind_scp(
    settings: NodeSettings,
    handlers: StorageHandlers,
    tls: ssl.SSLContext | None = None,
    listening: socket.socket | None = None,
    shares: ConnectionShares | None = None,
) -> GuardedAssociationServer:
    """The SCP bound to its port (with DICOM TLS only, given ``tls``; on another process's
    socket, given ``listening``, taking turns with it by ``shares``), not yet accepting:
    connections wait in the socket's backlog until :func:`serve` or another process takes
    them."""
    ae = build_ae(settings)
    if shares is not None:  # the association limit is the node's, not each process's
        handlers.open_elsewhere = shares.open_elsewhere
    server = ae.make_server(
        (settings.host, settings.port),
        ssl_context=tls,
        evt_handlers=handlers.bindings(),  # type: ignore[arg-type]
        server_class=GuardedAssociationServer,
        admit=handlers.admits,
        read_timeout=settings.timeout_seconds,
        listening=listening,
        shares=shares,
    )
    assert isinstance(server, GuardedAssociationServer)
    return server


def serve(server: GuardedAssociationServer) -> None:
    """Accept in a background thread; ``shutdown()`` on the server stops it."""
    # As AE.start_server(block=False) does, with the guarded server class.
    threading.Thread(target=server.serve_forever, name="dicom-accept", daemon=True).start()
    server.ae._servers.append(server)
