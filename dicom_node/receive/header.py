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


def _sequence_in_implicit_vr(tag: int) -> bool:
    """In implicit VR only the dictionary says which elements are sequences (pydicom parses
    those; it keeps the bytes of private and unknown ones)."""
    try:
        return dictionary_VR(tag) == "SQ"
    except KeyError:
        return False


def scan(encoded: bytes) -> Header | None:
    """Walk the data set's element headers, into its sequences and items, skipping the other
    values, and refuse one that is cut short, whose sequences or items overrun or never end,
    or that is not in the transfer syntax it declares; return the picked elements, or None
    where pydicom should read them. The walk keeps its own stack, so no nesting depth can
    exhaust Python's."""
    meta, at = file_meta(encoded)
    syntax = meta.get(0x0010, "")
    if not at or syntax == DeflatedExplicitVRLittleEndian:  # not a file, or not walkable raw
        return None
    end = len(encoded)
    # The "sequence"s, "item"s and encapsulated pixel data ("fragments") the walk is inside,
    # each with whether its content is implicit VR (the data set's syntax, or implicit inside
    # a UN: PS3.5 6.2.2) and where it ends (None: undefined length, ended by a delimiter).
    containers: list[tuple[str, bool, int | None]] = []
    implicit = syntax == ImplicitVRLittleEndian
    picked: dict[str, tuple[str, bytes]] = {}
    as_expected = True
    while True:
        while containers and containers[-1][2] == at:  # a defined-length one ends here
            containers.pop()
        bound = next((e for _, _, e in reversed(containers) if e is not None), end)
        if at >= bound:
            if at > bound or containers:
                kind = containers[-1][0] if containers else "data set"
                raise Unreadable(f"data set truncated or overrun inside a {kind} ending at {bound}")
            break
        if at + 8 > bound:
            raise Unreadable(f"data set truncated: {bound - at} byte(s) where an element starts")
        group, element = struct.unpack_from("<HH", encoded, at)
        tag, where = (group << 16) | element, f"({group:04X},{element:04X})"
        inside, implicit_here, _ = containers[-1] if containers else ("", implicit, None)
        if group == 0xFFFE:
            (length,) = struct.unpack_from("<I", encoded, at + 4)
            at += 8
            undefined = length == UNDEFINED_LENGTH
            if tag == ITEM and inside in ("sequence", "fragments"):
                if not undefined and at + length > bound:
                    raise Unreadable(f"data set truncated inside an item of {length} bytes")
                if inside == "fragments" and not undefined:
                    at += length  # a fragment of encapsulated pixel data: bytes, not elements
                else:
                    ends_at = None if undefined else at + length
                    _open(containers, "item", implicit_here, ends_at, where)
            elif (tag, inside) in (
                (ITEM_END, "item"),
                (SEQUENCE_END, "sequence"),
                (SEQUENCE_END, "fragments"),
            ) and (containers[-1][2] is None):
                containers.pop()
            else:
                raise Unreadable(f"misplaced item or delimiter {where}")
            continue
        if inside in ("sequence", "fragments"):
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
                if at + 12 > bound:
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
            kind = "fragments" if vr in (b"OB", b"OW") else "sequence"  # encapsulated pixels
            _open(containers, kind, content_implicit, None, where)
        elif at + length > bound:
            raise Unreadable(
                f"data set truncated: {where} declares {length} bytes, {bound - at} remain"
            )
        elif vr == b"SQ" or (implicit_here and _sequence_in_implicit_vr(tag)):
            _open(containers, "sequence", content_implicit, at + length, where)
        else:
            at += length
    values = _decode(picked) if as_expected else None
    return None if values is None else Header(syntax, meta.get(0x0002, ""), values)


def _open(
    containers: list[tuple[str, bool, int | None]],
    kind: str,
    implicit: bool,
    ends_at: int | None,
    where: str,
) -> None:
    if len(containers) >= 2 * MAX_SEQUENCE_DEPTH:
        raise Unreadable(f"sequences nested more than {MAX_SEQUENCE_DEPTH} deep at {where}")
    containers.append((kind, implicit, ends_at))
