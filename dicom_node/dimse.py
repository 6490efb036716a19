"""DIMSE statuses: the ones this node answers a C-STORE with, and how it reads a peer's.

The codes and their meaning come from pynetdicom's tables of the Storage Service Class
(PS3.4 Annex B.2.3, with the general statuses of PS3.7 Annex C); this module only chooses
which of them the node uses, so that one place maps a refusal to its status.
"""

from __future__ import annotations

from enum import IntEnum

from pydicom.dataset import Dataset
from pynetdicom.status import (
    STATUS_SUCCESS,
    STATUS_WARNING,
    STORAGE_SERVICE_CLASS_STATUS,
)


class StoreStatus(IntEnum):
    """What the storage SCP answers: the first code of a PS3.4 B.2.3 range, or a general
    status of PS3.7 C."""

    SUCCESS = 0x0000
    #: Failure: Duplicate SOP Instance (PS3.7 C): a UID held for another patient, study or
    #: series.
    DUPLICATE_INSTANCE = 0x0111
    #: Refused: Out of Resources. Transient: the sender should retry later.
    OUT_OF_RESOURCES = 0xA700
    #: Error: Data Set Does Not Match SOP Class (a required attribute missing or inconsistent).
    MISSING_ATTRIBUTE = 0xA900
    #: Error: Cannot Understand (an unparseable data set, an invalid UID).
    CANNOT_UNDERSTAND = 0xC000


def is_stored(code: int) -> bool:
    """Whether a C-STORE SCP's answer means the instance was stored: success or one of the
    Storage Service Class's warnings (coercion, elements discarded, ...)."""
    category = STORAGE_SERVICE_CLASS_STATUS.get(code, ("", ""))[0]
    return category in (STATUS_SUCCESS, STATUS_WARNING)


def with_comment(code: int, comment: str) -> Dataset:
    """A status dataset whose Error Comment (LO, 64 characters) carries the reason."""
    ds = Dataset()
    ds.Status = int(code)
    ds.ErrorComment = comment.replace("\\", "/")[:64]
    return ds
