"""C-STORE requests read directly give what pynetdicom's decoder gives, or are left to it."""

from __future__ import annotations

import io
import struct
from typing import Any

import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA

from dicom_node.dimse import StoreStatus
from dicom_node.receive.store_request import decode_store_request, split_p_data
from tests.dicom_factory import SeriesSpec, ct_datasets, phantom
from tests.peers import wait_for

FIELDS = (
    "MessageID",
    "AffectedSOPClassUID",
    "AffectedSOPInstanceUID",
    "Priority",
    "MoveOriginatorApplicationEntityTitle",
    "MoveOriginatorMessageID",
)


def request(**fields: object) -> C_STORE:
    primitive = C_STORE()
    primitive.MessageID = 7
    primitive.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # odd length: padded
    primitive.AffectedSOPInstanceUID = "1.2.3.44"  # even length
    primitive.Priority = 2
    primitive.DataSet = io.BytesIO(b"\x08\x00\x16\x00")
    for name, value in fields.items():
        setattr(primitive, name, value)
    return primitive


def command_set(primitive: C_STORE | C_ECHO) -> bytes:
    message = C_STORE_RQ() if isinstance(primitive, C_STORE) else C_ECHO_RQ()
    message.primitive_to_message(primitive)
    return bytes(encode(message.command_set, True, True))  # type: ignore[arg-type]


def pynetdicom_reading(command: bytes) -> Any:
    pdata = P_DATA()
    pdata.presentation_data_value_list.append((1, b"\x03" + command))
    message = DIMSEMessage()
    message.decode_msg(pdata)
    return message.message_to_primitive()


@pytest.mark.parametrize(
    "primitive",
    [
        request(),
        request(Priority=0, MessageID=65535),
        request(AffectedSOPInstanceUID="1.2.826.0.1.3680043.8.498.1234567890123456789012345"),
        request(MoveOriginatorApplicationEntityTitle="PACS", MoveOriginatorMessageID=3),
    ],
    ids=["plain", "low-priority-last-id", "long-uid", "move-originator"],
)
def test_a_request_is_read_as_pynetdicom_reads_it(primitive: C_STORE) -> None:
    command = command_set(primitive)
    direct, general = decode_store_request(command), pynetdicom_reading(command)
    assert direct is not None
    assert [getattr(direct, f) for f in FIELDS] == [getattr(general, f) for f in FIELDS]


def test_other_commands_and_unknown_elements_are_left_to_pynetdicom() -> None:
    echo = C_ECHO()
    echo.MessageID = 1
    echo.AffectedSOPClassUID = "1.2.840.10008.1.1"
    plain = command_set(request())
    unknown = plain + struct.pack("<HHI", 0x0000, 0x0902, 2) + b"ab"  # Error Comment
    wide_id = plain.replace(
        struct.pack("<HHIH", 0, 0x0110, 2, 7), struct.pack("<HHII", 0, 0x0110, 4, 7)
    )
    for command in (command_set(echo), unknown, wide_id, plain[:-3], b"\xff" * 8):
        assert decode_store_request(command) is None


def p_data_tf(*items: tuple[int, bytes]) -> bytearray:
    pdata = P_DATA()
    pdata.presentation_data_value_list.extend(items)
    return bytearray(P_DATA_TF(pdata).encode())


def test_a_p_data_pdu_is_split_into_what_pynetdicom_decodes() -> None:
    pdu = p_data_tf((1, b"\x03" + command_set(request())), (1, b"\x02" + b"\x08\x00" * 3001))
    general = P_DATA_TF()
    general.decode(bytes(pdu))
    split = split_p_data(pdu)
    assert split is not None
    assert [
        (i.presentation_context_id, bytes(i.presentation_data_value))
        for i in split.presentation_data_value_items
    ] == [
        (i.presentation_context_id, i.presentation_data_value)
        for i in general.presentation_data_value_items
    ]


def test_a_p_data_pdu_whose_items_do_not_add_up_is_left_to_pynetdicom() -> None:
    whole = p_data_tf((1, b"\x02abcd"))
    for broken in (
        whole + b"\0\0",  # a stray tail too short for an item header
        whole[:-1],  # the item runs past the PDU's end
        whole[:6] + struct.pack(">IB", 1, 1),  # an item without room for its control header
    ):
        assert split_p_data(bytearray(broken)) is None


def _ct_association(port: int) -> Any:
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="RESMTNET")
    assert assoc.is_established
    return assoc


def test_a_data_set_in_many_fragments_is_stored_as_sent(start_node: Any) -> None:
    node = start_node(workers={"count": 0}, node={"max_pdu": 4096})
    (ds,) = ct_datasets(SeriesSpec(slices=1), phantom(SeriesSpec(slices=1), None))
    assoc = _ct_association(node.config.node.port)
    assert int(assoc.send_c_store(ds).Status) == StoreStatus.SUCCESS
    assoc.release()
    (stored,) = node.instances.root.rglob("*.dcm")
    again = pydicom.dcmread(stored)
    assert again.SOPInstanceUID == ds.SOPInstanceUID
    assert again.PixelData == ds.PixelData and again.PatientName == ds.PatientName


def test_a_data_set_broken_by_a_command_fragment_aborts_the_association(
    start_node: Any,
) -> None:
    node = start_node(workers={"count": 0})
    assoc = _ct_association(node.config.node.port)
    context = assoc.accepted_contexts[0].context_id
    for fragments in (
        [b"\x03" + command_set(request()), b"\x00" + b"\x08\x00"],  # command, part of the data
        [b"\x01" + command_set(request())],  # then a command fragment where data must follow
    ):
        pdata = P_DATA()
        pdata.presentation_data_value_list.extend((context, f) for f in fragments)
        assoc.dul.send_pdu(pdata)
    wait_for(lambda: assoc.is_aborted, 10, "the node's A-ABORT")
    assert not list(node.instances.root.rglob("*.dcm"))
    (ds,) = ct_datasets(SeriesSpec(slices=1), phantom(SeriesSpec(slices=1), None))
    after = _ct_association(node.config.node.port)  # and the node serves on
    assert int(after.send_c_store(ds).Status) == StoreStatus.SUCCESS
    after.release()
