"""DIMSE status codes this node answers with (PS3.4 B.2.3, PS3.7 C) and their meaning."""

from __future__ import annotations

from pydicom.dataset import Dataset

SUCCESS = 0x0000
#: Refused: Out of Resources. Transient: the sender should retry later.
OUT_OF_RESOURCES = 0xA700
#: Error: Data Set does not match SOP Class (a required attribute is missing or inconsistent).
MISSING_ATTRIBUTE = 0xA900
#: Error: Cannot understand (unparseable dataset, invalid UID).
CANNOT_UNDERSTAND = 0xC000
#: Refused: SOP Class not supported.
SOP_CLASS_NOT_SUPPORTED = 0x0122

#: Statuses a C-STORE SCU may treat as "stored" (success and the warnings of PS3.4 B.2.3).
STORED = {SUCCESS, 0xB000, 0xB007, 0xB006}


def with_comment(code: int, comment: str) -> Dataset:
    """A status dataset whose Error Comment (LO, 64 characters) carries the reason."""
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment.replace("\\", "/")[:64]
    return ds
