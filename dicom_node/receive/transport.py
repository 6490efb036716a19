"""The SCP's TCP side: which connections get a thread, how long a read may wait, and TLS.

pynetdicom's server wraps each accepted socket in TLS where connections are accepted (one
silent peer on the TLS port then blocks every other caller), leaves accepted sockets without a
timeout (a peer that sends half a PDU holds its thread for ever) and lets an A-ASSOCIATE-RQ
whose presentation context ID is even kill the association's reactor. This server closes a
connection from an address no peer may call from before any thread is started, gives every
connection its own read timeout, does the TLS handshake on the connection's own thread, and
answers an invalid A-ASSOCIATE-RQ with an A-ABORT as PS3.8's state machine says (Evt19).
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

log = logging.getLogger(__name__)

#: PS3.8 Table 9-10, "Unrecognized or invalid PDU received": in Sta2 it leads to AA-1, an
#: A-ABORT and the ARTIM timer, after which the transport is closed.
INVALID_PDU = "Evt19"


def invalid_context_ids(pdu: Any) -> list[int]:
    """Presentation context IDs of an A-ASSOCIATE-RQ that PS3.8 9.3.2.2 forbids (they are
    odd integers, 1-255)."""
    if not isinstance(pdu, A_ASSOCIATE_RQ):
        return []
    return [
        item.presentation_context_id
        for item in pdu.presentation_context
        if item.presentation_context_id is not None and item.presentation_context_id % 2 == 0
    ]


def refuse_invalid_requests(assoc: Association, host: str) -> None:
    """Check each PDU as it is decoded, before pynetdicom turns it into a primitive (where an
    even context ID raises on the reactor's thread and leaves the socket open)."""
    dul = assoc.dul
    decode = dul._decode_pdu

    def checked(bytestream: bytearray) -> tuple[Any, str]:
        pdu, event = decode(bytestream)
        even = invalid_context_ids(pdu)
        if even:
            log.warning(
                "association request from %s aborted: even presentation context ID(s) %s "
                "(PS3.8 9.3.2.2: odd, 1-255)",
                host,
                ", ".join(map(str, even)),
            )
            return pdu, INVALID_PDU
        return pdu, event

    dul._decode_pdu = checked  # type: ignore[method-assign]


def close_always_told(assoc: Association, address: Any) -> None:
    """Make every opened connection end with EVT_CONN_CLOSE: when no A-ASSOCIATE-RQ comes
    within the ACSE timeout, pynetdicom kills the association and closes its socket without
    it, and what the handlers keep per connection would never be released."""
    told = threading.Event()
    assoc.bind(evt.EVT_CONN_CLOSE, lambda event: told.set())
    kill = assoc.kill

    def kill_and_tell() -> None:
        kill()
        if not told.is_set():
            evt.trigger(assoc, evt.EVT_CONN_CLOSE, {"address": address})

    assoc.kill = kill_and_tell  # type: ignore[method-assign]


class GuardedRequestHandler(RequestHandler):
    def handle(self) -> None:
        assoc = self._create_association()
        refuse_invalid_requests(assoc, str(self.client_address[0]))
        close_always_told(assoc, self.client_address)
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        assoc.start()


class GuardedAssociationServer(ThreadedAssociationServer):
    """``admit(host)`` is asked where connections are accepted: False closes the connection
    there, without a thread. ``read_timeout`` bounds every read and write of a connection,
    the TLS handshake included."""

    def __init__(
        self,
        *args: Any,
        admit: Callable[[str], bool],
        read_timeout: float,
        **kwargs: Any,
    ) -> None:
        self.admit = admit
        self.read_timeout = read_timeout
        kwargs["request_handler"] = GuardedRequestHandler
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        connection, address = self.socket.accept()
        return connection, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        try:
            return self.admit(str(client_address[0]))
        except Exception:  # fail closed, and keep accepting
            log.exception("admission check for %s failed; closing", client_address[0])
            return False

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        request.settimeout(self.read_timeout)
        if self.ssl_context is not None:
            try:
                request = self.ssl_context.wrap_socket(request, server_side=True)
            except (OSError, ssl.SSLError) as exc:
                log.warning("TLS handshake with %s failed: %s", client_address[0], exc)
                self.shutdown_request(request)
                return
        super().process_request_thread(request, client_address)
