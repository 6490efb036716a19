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
import time
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


class ConnectionShares:
    """Open connections of each process accepting on one socket, in memory they share.

    Every waiting process is woken by a new connection and the first to call ``accept``
    takes it: the one that just took a connection is often first again, and a burst of four
    associations from a PACS router lands in one process while the others idle. A process
    with more open connections than the least busy one therefore lets a connection wait a
    moment for it before taking it itself."""

    #: How long a busier process leaves a waiting connection to the others.
    HAND_OVER_SECONDS = 0.05

    def __init__(self, counts: Any, slot: int) -> None:
        self.counts = counts  # multiprocessing.Array("i", processes, lock=False)
        self.slot = slot
        self.counts[slot] = 0

    def publish(self, open_connections: int) -> None:
        self.counts[self.slot] = open_connections

    def yield_to_others(self) -> bool:
        return bool(self.counts[self.slot] > min(self.counts[:]))

    def open_elsewhere(self) -> int:
        """Connections the other processes hold: the node's association limit counts them."""
        counts = self.counts[:]
        return int(sum(counts) - counts[self.slot])


class GuardedRequestHandler(RequestHandler):
    server: GuardedAssociationServer

    def handle(self) -> None:
        assoc = self._create_association()
        refuse_invalid_requests(assoc, str(self.client_address[0]))
        close_always_told(assoc, self.client_address)
        fileno = self.request.fileno()
        assoc.bind(evt.EVT_CONN_CLOSE, lambda event: self.server.closed(fileno))
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        assoc.start()


class GuardedAssociationServer(ThreadedAssociationServer):
    """``admit(host)`` is asked where connections are accepted: False closes the connection
    there, without a thread. ``read_timeout`` bounds every read and write of a connection,
    the TLS handshake included.

    Given ``listening`` (a socket another receiving process bound), the server accepts on it
    instead of binding its own: several processes then take turns at one port, whichever is
    free first taking the next connection. The listening socket is non-blocking, so a
    process that loses the race for a connection goes back to waiting instead of blocking in
    ``accept`` until the next one, and closing it here never shuts it down for the others.
    """

    def __init__(
        self,
        *args: Any,
        admit: Callable[[str], bool],
        read_timeout: float,
        listening: socket.socket | None = None,
        shares: ConnectionShares | None = None,
        **kwargs: Any,
    ) -> None:
        self.admit = admit
        self.read_timeout = read_timeout
        self.listening = listening
        self.shares = shares
        self._open: set[int] = set()
        self._open_lock = threading.Lock()
        kwargs["request_handler"] = GuardedRequestHandler
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        if self.listening is None:
            super().server_bind()
        else:
            assert self.socket is not None
            self.socket.close()  # the one socketserver made: never bound
            self.socket = self.listening
            self.server_address = self.socket.getsockname()
        assert self.socket is not None
        self.socket.setblocking(False)

    def server_close(self) -> None:
        assert self.socket is not None
        self.socket.close()  # not shutdown(): other processes may accept on the same socket

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        if self.shares is not None and self.shares.yield_to_others():
            time.sleep(ConnectionShares.HAND_OVER_SECONDS)
        connection, address = self.socket.accept()  # BlockingIOError: another process won
        connection.setblocking(True)
        self._count(connection.fileno(), opened=True)
        return connection, address

    def _count(self, fileno: int, opened: bool) -> None:
        with self._open_lock:
            if opened:
                self._open.add(fileno)
            else:
                self._open.discard(fileno)
            if self.shares is not None:
                self.shares.publish(len(self._open))

    def closed(self, fileno: int) -> None:
        """The connection with this descriptor ended (its association's EVT_CONN_CLOSE)."""
        self._count(fileno, opened=False)

    def end_associations(self, grace_seconds: float) -> None:
        """After ``shutdown()``: associations in progress get ``grace_seconds`` to finish,
        then are aborted; a process cannot exit while pynetdicom's connection threads run,
        and what an aborted sender had not been answered for, it sends again."""
        deadline = time.monotonic() + grace_seconds
        while self.active_associations and time.monotonic() < deadline:
            time.sleep(0.1)
        open_ones = self.active_associations
        if open_ones:
            log.info(
                "aborting %d association(s) still open after %.0f s", len(open_ones), grace_seconds
            )
        for association in open_ones:
            association.abort()

    def shutdown_request(self, request: Any) -> None:
        """Closes a connection no association took over (refused at admission, failed TLS
        handshake, an error before the association started)."""
        self._count(request.fileno(), opened=False)
        super().shutdown_request(request)

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
