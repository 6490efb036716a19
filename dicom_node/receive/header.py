"""A received instance's header, read from its bytes: checked whole, the index's fields picked.

One walk over the element headers does two jobs. It refuses an encoding that pydicom would
read leniently (pydicom stops quietly at a truncated end and switches to implicit VR when
explicit was declared, so such an instance would be stored with a file meta that lies about
it). And it keeps the top-level elements the index records, decoded here in the common case:
pydicom would build a Dataset of every element and validate every value, about 0.4 ms per CT
slice, an eighth of the node's CPU per instance. Where this reading is not sure to give what
pydicom gives (another character set, a multi-frame header, an unexpected VR), :func:`scan`
returns None and the caller reads the instance with pydicom.
"""

from __future__ import annotations

import struct
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.uid import DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian


class Unreadable(ValueError):
    """The data set is not encoded as its transfer syntax says (the message says where)."""


#: Explicit VRs with a 4-byte length (PS3.5 7.1.2); the others have 2 bytes.
LONG_VRS = frozenset(
    (b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV")
)
UNDEFINED_LENGTH = 0xFFFFFFFF
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
#: Deepest nesting of undefined-length sequences accepted: pydicom reads them recursively (a
#: few thousand levels overflow its stack when the stored file is read), and real headers,
#: SR content trees included, nest a few levels.
MAX_SEQUENCE_DEPTH = 64

#: What the index records (``ingest.read_record``), and the character set its text is in.
KEYWORDS = (
    "SpecificCharacterSet",
    "ImageType",
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyDate",
    "AccessionNumber",
    "Modality",
    "StudyDescription",
    "SeriesDescription",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "SliceThickness",
    "ConvolutionKernel",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "InstanceNumber",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "ImagesInAcquisition",
    "NumberOfFrames",
    # Only to notice it: a multi-frame CT keeps its slice thickness inside it.
    "SharedFunctionalGroupsSequence",
)
TAGS: dict[int, tuple[str, str]] = {
    int(tag_for_keyword(keyword) or 0): (keyword, dictionary_VR(keyword)) for keyword in KEYWORDS
}
#: VRs pydicom decodes with its default encoding whatever the character set says, and splits
#: at backslashes without stripping each value.
PLAIN_VRS = frozenset(("CS", "DA", "DS", "IS", "UI"))
#: Character sets decoded here (Specific Character Set -> Python codec); pydicom's default,
#: ISO-IR 6 included, is Latin-1. Others (ISO 2022 code extensions above all) go to pydicom.
CHARACTER_SETS = {"": "latin-1", "ISO_IR 6": "latin-1", "ISO_IR 100": "latin-1"}
CHARACTER_SETS["ISO_IR 192"] = "utf-8"


def file_meta(encoded: bytes) -> tuple[dict[int, str], int]:
    """The text values of a file's meta group (always explicit VR little endian), by element
    number, and where the data set starts; ({}, 0) when the bytes are not a DICOM file."""
    if encoded[128:132] != b"DICM":
        return {}, 0
    offset, values = 132, {}
    while offset + 8 <= len(encoded):
        group, element = struct.unpack_from("<HH", encoded, offset)
        if group != 0x0002:
            break
        if encoded[offset + 4 : offset + 6] in (b"OB", b"OW", b"UN", b"SQ", b"UT", b"UC"):
            (length,) = struct.unpack_from("<I", encoded, offset + 8)
            value_at = offset + 12
        else:
            (length,) = struct.unpack_from("<H", encoded, offset + 6)
            value_at = offset + 8
            raw = encoded[value_at : value_at + length].rstrip(b"\0 ")
            values[element] = raw.decode("ascii", "replace")
        offset = value_at + length
    return values, offset


class Header:
    """The picked elements of a data set, decoded as pydicom decodes them (one value: a str;
    several: a list of str), read through ``get`` like a pydicom Dataset."""

    def __init__(self, transfer_syntax: str, sop_class: str, values: dict[str, Any]) -> None:
        self.transfer_syntax = transfer_syntax
        #: The file meta's Media Storage SOP Class UID: the request's Affected SOP Class.
        self.requested_sop_class = sop_class
        self._values = values

    def get(self, keyword: str, default: Any = None) -> Any:
        return self._values.get(keyword, default)


def _split(text: str) -> str | list[str]:
    values = text.split("\\")
    return values[0] if len(values) == 1 else values


def _decode(raw: dict[str, tuple[str, bytes]]) -> dict[str, Any] | None:
    """The picked values, or None where pydicom might decode them otherwise."""
    if "SharedFunctionalGroupsSequence" in raw:
        return None
    charset = raw.get("SpecificCharacterSet", ("CS", b""))[1].decode("latin-1").strip("\0 ")
    codec = CHARACTER_SETS.get(charset)
    if codec is None:
        return None
    values: dict[str, Any] = {}
    try:
        for keyword, (vr, value) in raw.items():
            if vr in PLAIN_VRS:
                values[keyword] = _split(value.decode("latin-1").rstrip(" \0"))
            elif vr == "PN":
                values[keyword] = _split(value.rstrip(b"\0 ").decode(codec))
            else:  # LO, SH: in the character set, each value stripped of its padding
                texts = [text.rstrip("\0 ") for text in value.decode(codec).split("\\")]
                values[keyword] = texts[0] if len(texts) == 1 else texts
    except UnicodeDecodeError:
        return None
    return values


def scan(encoded: bytes) -> Header | None:
    """Walk the data set's element headers, skipping their values, and refuse one that is cut
    short, whose sequences never end, or that is not in the transfer syntax it declares;
    return the picked elements, or None where pydicom should read them. The walk keeps its
    own stack, so no nesting depth can exhaust Python's."""
    meta, at = file_meta(encoded)
    syntax = meta.get(0x0010, "")
    if not at or syntax == DeflatedExplicitVRLittleEndian:  # not a file, or not walkable raw
        return None
    end = len(encoded)
    # Undefined-length "sequence"s and "item"s still open, each with whether its content is
    # implicit VR (the data set's syntax, or implicit inside an undefined-length UN: PS3.5 6.2.2).
    containers: list[tuple[str, bool]] = []
    implicit = syntax == ImplicitVRLittleEndian
    picked: dict[str, tuple[str, bytes]] = {}
    as_expected = True
    while at < end:
        if at + 8 > end:
            raise Unreadable(f"data set truncated: {end - at} byte(s) where an element starts")
        group, element = struct.unpack_from("<HH", encoded, at)
        tag, where = (group << 16) | element, f"({group:04X},{element:04X})"
        inside, implicit_here = containers[-1] if containers else ("", implicit)
        if group == 0xFFFE:
            (length,) = struct.unpack_from("<I", encoded, at + 4)
            at += 8
            if tag == ITEM and inside == "sequence":
                if length == UNDEFINED_LENGTH:
                    containers.append(("item", implicit_here))
                elif at + length > end:
                    raise Unreadable(f"data set truncated inside an item of {length} bytes")
                else:
                    at += length
            elif (tag, inside) in ((ITEM_END, "item"), (SEQUENCE_END, "sequence")):
                containers.pop()
            else:
                raise Unreadable(f"misplaced item or delimiter {where}")
            continue
        if inside == "sequence":
            raise Unreadable(f"element {where} inside a sequence, where an item was expected")
        content_implicit = implicit_here
        vr = b""
        if implicit_here:
            (length,) = struct.unpack_from("<I", encoded, at + 4)
            at += 8
        else:
            vr = encoded[at + 4 : at + 6]
            if not (vr.isalpha() and vr.isupper()):
                raise Unreadable(
                    f"element {where} has no explicit VR ({vr!r}): not encoded in {syntax}"
                )
            if vr in LONG_VRS:
                if at + 12 > end:
                    raise Unreadable(f"data set truncated in the header of {where}")
                (length,) = struct.unpack_from("<I", encoded, at + 8)
                at += 12
                content_implicit = vr == b"UN"
            else:
                (length,) = struct.unpack_from("<H", encoded, at + 6)
                at += 8
        if not containers and tag in TAGS:
            keyword, expected_vr = TAGS[tag]
            as_expected &= length != UNDEFINED_LENGTH or keyword == "SharedFunctionalGroupsSequence"
            as_expected &= not vr or vr.decode() == expected_vr
            picked[keyword] = (expected_vr, encoded[at : at + length])
        if length == UNDEFINED_LENGTH:
            if len(containers) >= 2 * MAX_SEQUENCE_DEPTH:
                raise Unreadable(f"sequences nested more than {MAX_SEQUENCE_DEPTH} deep at {where}")
            containers.append(("sequence", content_implicit))
        elif at + length > end:
            raise Unreadable(
                f"data set truncated: {where} declares {length} bytes, {end - at} remain"
            )
        else:
            at += length
    if containers:
        raise Unreadable(f"data set ends inside {len(containers)} unterminated sequence(s)/item(s)")
    values = _decode(picked) if as_expected else None
    return None if values is None else Header(syntax, meta.get(0x0002, ""), values)
