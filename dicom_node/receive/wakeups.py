"""An established association's two threads wait for their work instead of polling for it.

pynetdicom runs two threads per association: the DUL reactor, which sleeps a short delay
whenever it finds neither a PDU on the socket nor a primitive to send, and the association
reactor, which sleeps 1 ms between looks at its queue of DIMSE messages. Each look costs the
interpreter's lock; with several associations open their thousands of looks a second take
the CPU the instances need (four associations received slower than one, in one process). Here
the DUL thread blocks in ``select`` on its socket and on a wake-up socket that every queued
primitive writes to, and the association thread blocks on its message queue, which the DUL
also wakes when it hands up anything else (a release or abort request). Both still look at
their timers and stop flags every :data:`CHECK_SECONDS`.
"""

from __future__ import annotations

import contextlib
import queue
import select
import socket
import ssl
from typing import Any

from pynetdicom import evt
from pynetdicom.association import Association

#: Longest either thread waits before it looks at its timers and stop flags again.
CHECK_SECONDS = 0.05
#: The DUL state in which the transport is closing: pynetdicom reads what is left and closes.
CLOSING_STATE = "Sta13"
#: The DUL state without a connection, in which pynetdicom's stop_dul stops the thread.
IDLE_STATE = "Sta1"
#: Put on the message queue to wake the association thread: not a message (pynetdicom's own
#: "nothing arrived" value).
NO_MESSAGE = (None, None)


def wait_for_events(assoc: Association) -> None:
    """Install the waits on an established association, on its own thread at
    EVT_ESTABLISHED; until then pynetdicom keeps its own pace (a 1 ms sleep), which a peer
    that connects and never asks costs only until the ACSE timeout."""
    dul = assoc.dul
    transport = dul.socket
    if transport is None or transport.socket is None:
        return
    receiver, sender = socket.socketpair()
    receiver.setblocking(False)
    sender.setblocking(False)

    def wake() -> None:
        # OSError: its buffer is full (a wake-up is pending anyway) or it is closed.
        with contextlib.suppress(OSError):
            sender.send(b"\0")

    def drain() -> None:
        with contextlib.suppress(OSError):  # empty, or closed
            while receiver.recv(4096):
                pass

    def send_and_wake(primitive: Any) -> None:
        send_pdu(primitive)
        wake()

    def stop_and_wake() -> bool:
        # stop_dul sets the flag and then waits for the thread: wake it to see the flag.
        if dul.state_machine.current_state == IDLE_STATE:
            dul._kill_thread = True
            wake()
        return bool(stop_dul())

    def wait_then_check() -> bool:
        connection = transport.socket
        if connection is not None and idle(connection):
            try:
                ready, _, _ = select.select([connection, receiver], [], [], CHECK_SECONDS)
            except (OSError, ValueError):  # closed under us: the plain check reports it
                ready = []
            if receiver in ready:
                drain()
                if dul._process_recv_primitive():  # what the next loop would do first
                    return True
        return bool(check_transport())

    def idle(connection: socket.socket) -> bool:
        """Nothing to read that select cannot see and nothing to do before reading."""
        return (
            dul.state_machine.current_state != CLOSING_STATE
            and dul.event_queue.empty()
            and dul.to_provider_queue.empty()
            and not (isinstance(connection, ssl.SSLSocket) and connection.pending())
        )

    def next_message(block: bool = False) -> Any:
        if block:
            return get_msg(block)
        try:
            return messages.get(timeout=CHECK_SECONDS)
        except queue.Empty:
            return NO_MESSAGE

    def hand_up_and_wake(item: Any, block: bool = True, timeout: float | None = None) -> None:
        hand_up(item, block, timeout)
        messages.put(NO_MESSAGE)

    def close(event: evt.Event) -> None:
        receiver.close()
        sender.close()

    send_pdu, stop_dul, check_transport = dul.send_pdu, dul.stop_dul, dul._is_transport_event
    messages, get_msg = assoc.dimse.msg_queue, assoc.dimse.get_msg
    hand_up = dul.to_user_queue.put
    assoc.bind(evt.EVT_CONN_CLOSE, close)
    # Wake-ups first, the waits last: the threads run while these are swapped in.
    dul.send_pdu = send_and_wake  # type: ignore[method-assign]
    dul.stop_dul = stop_and_wake  # type: ignore[method-assign]
    dul.to_user_queue.put = hand_up_and_wake  # type: ignore[method-assign]
    assoc.dimse.get_msg = next_message  # type: ignore[method-assign]
    dul._is_transport_event = wait_then_check  # type: ignore[method-assign]
