"""C-STORE requests read straight from their P-DATA.

pynetdicom copies each received P-DATA-TF PDU three times before its fragments reach the
DIMSE provider (to bytes, past the PDU header, per item), decodes every request's command set
into a pydicom Dataset and copies it element by element onto the primitive, and copies each
data set fragment once more on the way into the message: about 0.4 ms of interpreter time
and a few MB of copying per instance, on the thread that also reads the socket.

Here a P-DATA-TF's items are views into the bytes received, a C-STORE-RQ command set (a
handful of elements of fixed VR, PS3.7 9.3.1.1, Implicit VR Little Endian as PS3.7 6.3.1
requires) is read directly, and the data set fragments are appended without the extra copy.
Anything else (another command, an element this reader does not know, a handler bound to
EVT_DIMSE_RECV, pynetdicom's chunked storage) goes through pynetdicom's own path; a message
that breaks PS3.8 Annex E part-way (a command fragment or another presentation context
inside a data set) is an invalid PDU, as pynetdicom treats an undecodable message: the
association is aborted.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from io import BytesIO
from typing import Any

from pynetdicom import _config, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_items import PresentationDataValueItem
from pynetdicom.pdu_primitives import P_DATA

from dicom_node.receive.transport import INVALID_PDU

log = logging.getLogger(__name__)

#: Command Field of a C-STORE-RQ, and the Command Data Set Type that means "no data set".
C_STORE_RQ = 0x0001
NO_DATA_SET = 0x0101
#: Message Control Header bits (PS3.8 E.2).
COMMAND, LAST_FRAGMENT = 1, 2
#: PDU type of a P-DATA-TF (PS3.8 9.3.5), and the state machine's event for one received.
P_DATA_TF_TYPE = b"\x04"
P_DATA_RECEIVED = "Evt10"
#: A PDU's header (type, reserved, length), then each item's length and context ID.
PDU_HEADER_BYTES = 6
_PDV_HEADER = struct.Struct(">IB")

_ELEMENT_HEADER = struct.Struct("<HHI")
_UNSIGNED_SHORT = struct.Struct("<H")
_UIDS = {0x0002: "AffectedSOPClassUID", 0x1000: "AffectedSOPInstanceUID"}
_NUMBERS = {0x0110: "MessageID", 0x0700: "Priority", 0x1031: "MoveOriginatorMessageID"}
_MOVE_ORIGINATOR = 0x1030
_SKIPPED = {0x0000, 0x0100, 0x0800}  # group length; command field and data set type, checked


def decode_store_request(command: bytes) -> C_STORE | None:
    """The C-STORE primitive of a complete C-STORE-RQ command set, as pynetdicom's decoder
    would fill it; None for any other command, any other element, a value of another length
    than its VR has, or a value pynetdicom's setters refuse."""
    fields: dict[str, Any] = {}
    command_field = data_set_type = None
    at = 0
    try:
        while at < len(command):
            group, element, length = _ELEMENT_HEADER.unpack_from(command, at)
            value = command[at + 8 : at + 8 + length]
            at += 8 + length
            if group != 0x0000 or len(value) != length:
                return None
            if element in _UIDS:
                fields[_UIDS[element]] = value.decode("ascii").rstrip("\0 ")
            elif element in _NUMBERS or element in (0x0100, 0x0800):
                if length != 2:
                    return None
                (number,) = _UNSIGNED_SHORT.unpack(value)
                if element == 0x0100:
                    command_field = number
                elif element == 0x0800:
                    data_set_type = number
                else:
                    fields[_NUMBERS[element]] = number
            elif element == _MOVE_ORIGINATOR:
                fields["MoveOriginatorApplicationEntityTitle"] = value.decode("ascii").strip()
            elif element not in _SKIPPED:
                return None
        if command_field != C_STORE_RQ or data_set_type in (None, NO_DATA_SET):
            return None
        primitive = C_STORE()
        for name, value in fields.items():
            setattr(primitive, name, value)
    except (struct.error, UnicodeDecodeError, ValueError, TypeError):
        return None
    return primitive


def split_p_data(pdu: bytearray) -> P_DATA_TF | None:
    """A received P-DATA-TF PDU whose items hold views into ``pdu``, not copies; None when its
    items do not fill it exactly or one is too short for its control header (pynetdicom's
    decoder then says why)."""
    view, at, items = memoryview(pdu), PDU_HEADER_BYTES, []
    while at < len(pdu):
        if len(pdu) - at < _PDV_HEADER.size:
            return None
        length, context_id = _PDV_HEADER.unpack_from(pdu, at)
        if length < 2 or at + 4 + length > len(pdu):
            return None
        item = PresentationDataValueItem()
        item.presentation_context_id = context_id
        item.presentation_data_value = view[at + 5 : at + 4 + length]  # type: ignore[assignment]
        items.append(item)
        at += 4 + length
    decoded = P_DATA_TF()
    decoded.presentation_data_value_items = items
    return decoded


def read_stores_directly(assoc: Association) -> None:
    """Receive this association's P-DATA through :func:`split_p_data` and its C-STORE requests
    through :func:`decode_store_request`."""
    dimse, dul = assoc.dimse, assoc.dul
    general: Callable[[P_DATA], None] = dimse.receive_primitive
    decode_pdu: Callable[[bytearray], tuple[Any, str]] = dul._decode_pdu
    store: C_STORE | None = None
    context = 0
    data = BytesIO()

    def receive_primitive(primitive: P_DATA) -> None:
        nonlocal store, context, data
        fragments = primitive.presentation_data_value_list
        if store is None:
            first = fragments[0] if fragments else None
            if (
                first is None
                or first[1][0] & (COMMAND | LAST_FRAGMENT) != COMMAND | LAST_FRAGMENT
                or dimse.message is not None  # pynetdicom holds part of a message
                or _config.STORE_RECV_CHUNKED_DATASET
                or assoc.get_handlers(evt.EVT_DIMSE_RECV)
            ):
                general(primitive)
                return
            store = decode_store_request(bytes(first[1][1:]))
            if store is None:
                general(primitive)
                return
            context, data = first[0], BytesIO()
            fragments = fragments[1:]
        for context_id, fragment in fragments:
            if fragment[0] & COMMAND or context_id != context:
                log.error(
                    "association from %s: a C-STORE data set broken by a command fragment or "
                    "another presentation context (PS3.8 E.2); aborting",
                    assoc.requestor.address,
                )
                store = None
                dul.event_queue.put(INVALID_PDU)
                return
            data.write(memoryview(fragment)[1:])
            if fragment[0] & LAST_FRAGMENT:
                store.DataSet = data
                store._context_id = context
                done, store = store, None
                dimse.msg_queue.put((context, done))
                return

    def split_or_decode(bytestream: bytearray) -> tuple[Any, str]:
        if bytestream[:1] == P_DATA_TF_TYPE and not (
            assoc.get_handlers(evt.EVT_DATA_RECV) or assoc.get_handlers(evt.EVT_PDU_RECV)
        ):
            split = split_p_data(bytestream)
            if split is not None:
                return split, P_DATA_RECEIVED
        return decode_pdu(bytestream)

    dimse.receive_primitive = receive_primitive  # type: ignore[method-assign]
    dul._decode_pdu = split_or_decode  # type: ignore[method-assign]
