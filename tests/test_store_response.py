"""C-STORE responses encoded directly carry the same bytes pynetdicom's encoder writes."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pydicom.uid import CTImageStorage
from pynetdicom import AE, _config
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode

from dicom_node.dimse import StoreStatus, with_comment
from dicom_node.receive.store_response import encode_store_response
from tests.dicom_factory import SeriesSpec, ct_datasets, phantom


def response(status: int, comment: str | None = None, **fields: object) -> C_STORE:
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = 7
    primitive.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # odd length: padded
    primitive.AffectedSOPInstanceUID = "1.2.3.44"  # even length
    primitive.Status = status
    primitive.ErrorComment = comment
    for name, value in fields.items():
        setattr(primitive, name, value)
    return primitive


def pynetdicom_encoding(primitive: C_STORE) -> bytes:
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    return bytes(encode(message.command_set, True, True))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "primitive",
    [
        response(StoreStatus.SUCCESS),
        response(StoreStatus.CANNOT_UNDERSTAND, "odd length"),
        response(StoreStatus.DUPLICATE_INSTANCE, "even-length!"),
        response(
            StoreStatus.MISSING_ATTRIBUTE,
            str(with_comment(StoreStatus.MISSING_ATTRIBUTE, "x" * 90).ErrorComment),
        ),
        response(StoreStatus.SUCCESS, AffectedSOPClassUID=None, AffectedSOPInstanceUID=None),
        response(StoreStatus.SUCCESS, MessageIDBeingRespondedTo=65535),
    ],
    ids=["success", "odd-comment", "even-comment", "longest-comment", "no-uids", "last-id"],
)
def test_a_response_is_encoded_as_pynetdicom_encodes_it(primitive: C_STORE) -> None:
    assert encode_store_response(primitive) == pynetdicom_encoding(primitive)


def test_a_response_with_fields_beyond_status_and_comment_is_left_to_pynetdicom() -> None:
    primitive = response(StoreStatus.MISSING_ATTRIBUTE, OffendingElement=[0x00100010])
    assert encode_store_response(primitive) is None


@pytest.fixture
def pynetdicom_level() -> Iterator[Callable[[int], None]]:
    """Sets the pynetdicom logger's level (setLevel: logging caches isEnabledFor) and
    restores it afterwards."""
    logger = logging.getLogger("pynetdicom")
    before = logger.level
    yield logger.setLevel
    logger.setLevel(before)


def test_the_nodes_answers_skip_pynetdicoms_encoder_unless_its_log_is_kept(
    start_node: Any, monkeypatch: pytest.MonkeyPatch, pynetdicom_level: Callable[[int], None]
) -> None:
    """pynetdicom's encoder refuses to run here: the answers must come the direct way."""
    monkeypatch.setattr(_config, "LOG_HANDLER_LEVEL", "standard")
    pynetdicom_level(logging.WARNING)
    node = start_node(workers={"count": 0})
    assert _config.LOG_HANDLER_LEVEL == "none"

    def refuse(*args: object) -> None:
        raise AssertionError("C-STORE-RSP encoded by pynetdicom")

    monkeypatch.setattr(C_STORE_RSP, "encode_msg", refuse)
    spec = SeriesSpec(slices=2)
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.config.node.port, ae_title="RESMTNET")
    answers = [assoc.send_c_store(ds) for ds in ct_datasets(spec, phantom(spec, None))]
    assoc.release()
    assert [int(a.Status) for a in answers] == [StoreStatus.SUCCESS] * 2

    pynetdicom_level(logging.INFO)
    start_node(workers={"count": 0})
    assert _config.LOG_HANDLER_LEVEL == "standard"
