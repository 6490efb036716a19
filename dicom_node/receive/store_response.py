"""C-STORE responses encoded straight into their P-DATA.

pynetdicom answers each C-STORE by filling a pydicom Dataset with the command set and running
pydicom's general writer over it: about a third of a millisecond of interpreter time per
instance, as much as indexing it. A response's command set has a handful of elements whose
shape never changes (PS3.7 9.3.1.2, Implicit VR Little Endian as PS3.7 6.3.1 requires), so it
is encoded here directly; anything else (a response with an Offending Element, a PDU limit too
small for it, a handler bound to EVT_DIMSE_SENT) goes through pynetdicom's own path.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

#: Message Control Header (PS3.8 E.2): a command, and its last fragment.
LAST_COMMAND_FRAGMENT = b"\x03"
#: Command Field of a C-STORE-RSP, and Command Data Set Type "no data set".
C_STORE_RSP = 0x8001
NO_DATA_SET = 0x0101
#: Item header of a PDV (4-byte length, context ID) plus its control header.
PDV_OVERHEAD = 6


def _element(element: int, value: bytes, padding: bytes) -> bytes:
    if len(value) % 2:
        value += padding
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def _text(element: int, value: str | None, padding: bytes) -> bytes:
    return b"" if value is None else _element(element, value.encode("ascii"), padding)


def _unsigned_short(element: int, value: int) -> bytes:
    return struct.pack("<HHIH", 0x0000, element, 2, value)


def encode_store_response(primitive: C_STORE) -> bytes | None:
    """The command set of a C-STORE-RSP, as pynetdicom would encode it (elements in tag
    order, group length first); None when the response carries a field beyond Status and
    Error Comment, or a value pynetdicom would refuse."""
    if primitive.OffendingElement is not None or primitive.MessageIDBeingRespondedTo is None:
        return None
    status, comment = primitive.Status, primitive.ErrorComment
    if status is None:
        return None
    try:
        body = b"".join(
            (
                _text(0x0002, primitive.AffectedSOPClassUID, b"\0"),
                _unsigned_short(0x0100, C_STORE_RSP),
                _unsigned_short(0x0120, primitive.MessageIDBeingRespondedTo),
                _unsigned_short(0x0800, NO_DATA_SET),
                _unsigned_short(0x0900, status),
                _text(0x0902, comment, b" "),
                _text(0x1000, primitive.AffectedSOPInstanceUID, b"\0"),
            )
        )
    except (UnicodeEncodeError, struct.error):
        return None
    return struct.pack("<HHII", 0x0000, 0x0000, 4, len(body)) + body


def answer_stores_directly(assoc: Association) -> None:
    """Send this association's C-STORE responses through :func:`encode_store_response`."""
    dimse = assoc.dimse
    general: Callable[[Any, int], None] = dimse.send_msg

    def send_msg(primitive: Any, context_id: int) -> None:
        encoded = (
            encode_store_response(primitive)
            if isinstance(primitive, C_STORE) and not assoc.get_handlers(evt.EVT_DIMSE_SENT)
            else None
        )
        limit = dimse.maximum_pdu_size
        if encoded is None or (limit and len(encoded) + PDV_OVERHEAD > limit):
            general(primitive, context_id)
            return
        pdata = P_DATA()
        pdata.presentation_data_value_list.append((context_id, LAST_COMMAND_FRAGMENT + encoded))
        dimse.dul.send_pdu(pdata)

    dimse.send_msg = send_msg  # type: ignore[method-assign]
