"""The statuses the node answers and reads are the Storage Service Class's (PS3.4 B.2.3)."""

from __future__ import annotations

from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

from dicom_node.dimse import StoreStatus, is_stored, with_comment


def test_every_status_the_node_answers_means_what_its_name_says() -> None:
    meanings = {status.name: STORAGE_SERVICE_CLASS_STATUS[status][1] for status in StoreStatus}
    assert meanings == {
        "SUCCESS": "",
        "DUPLICATE_INSTANCE": "Duplication SOP Instance",
        "OUT_OF_RESOURCES": "Refused: Out of Resources",
        "MISSING_ATTRIBUTE": "Data Set Does Not Match SOP Class",
        "CANNOT_UNDERSTAND": "Cannot Understand",
    }


def test_success_and_warnings_count_as_stored_failures_and_silence_do_not() -> None:
    assert [is_stored(c) for c in (0x0000, 0xB000, 0xB006, 0xB007)] == [True] * 4
    assert [is_stored(c) for c in (0xA700, 0xA900, 0xC000, 0x0122, -1)] == [False] * 5


def test_an_error_comment_fits_its_vr() -> None:
    status = with_comment(StoreStatus.CANNOT_UNDERSTAND, "a\\b" + "x" * 100)
    assert status.Status == 0xC000
    assert status.ErrorComment == "a/b" + "x" * 61
