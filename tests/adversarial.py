"""Malformed and adversarial input, built by the tests themselves, with what the node must do.

Each case writes the files one association sends (DICOM file format: a valid file meta group,
then whatever bytes the case needs) and says the outcome: the C-STORE statuses, and for what
is stored, the state its series must end in and words of the logged reason.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLosslessSV1,
    MRImageStorage,
    generate_uid,
)

from dicom_node.dimse import StoreStatus
from dicom_node.receive.ingest import file_meta_header
from tests.dicom_factory import SeriesSpec, ct_datasets, phantom

OK, REFUSED_SOP, MISSING, UNREADABLE, NO_ROOM = (
    StoreStatus.SUCCESS,
    0x0122,  # pynetdicom's own answer: Refused: SOP Class Not Supported (PS3.7 C)
    StoreStatus.MISSING_ATTRIBUTE,
    StoreStatus.CANNOT_UNDERSTAND,
    StoreStatus.OUT_OF_RESOURCES,
)
#: A small series the engine would read: 40 slices of 2.5 mm (100 mm), 64 x 64.
SMALL = SeriesSpec(slices=40, rows=64, columns=64, pixel_mm=4.0, slice_mm=2.5)
#: The node under test refuses instances that inflate past this (security.max_instance_bytes).
MAX_INSTANCE_BYTES = 32 * 2**20


@dataclass
class Case:
    name: str
    build: Callable[[Path], list[Path]]
    #: Expected C-STORE status per file, in order.
    statuses: list[int]
    #: State the series must reach, or None when nothing of the case is stored.
    state: str | None = None
    reason: str = ""
    sop_classes: list[str] = field(default_factory=list)


def body(ds: Dataset, syntax: str = ExplicitVRLittleEndian) -> bytes:
    """The data set's bytes as they follow the file meta group on the wire."""
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, syntax == ImplicitVRLittleEndian
    write_dataset(out, ds)
    return out.getvalue()


def write(
    folder: Path,
    name: str,
    data: bytes,
    sop_class: str,
    sop_uid: str,
    syntax: str = ExplicitVRLittleEndian,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(file_meta_header(sop_class, sop_uid, syntax, "FUZZ") + data)
    return path


def series(spec: SeriesSpec = SMALL) -> list[Dataset]:
    return ct_datasets(spec, phantom(spec, None))


def files_of(
    datasets: list[Dataset], syntax: str = ExplicitVRLittleEndian
) -> Callable[[Path], list[Path]]:
    def build(folder: Path) -> list[Path]:
        return [
            write(
                folder,
                f"{n:03d}.dcm",
                body(ds, syntax),
                str(ds.SOPClassUID),
                str(ds.SOPInstanceUID),
                syntax,
            )
            for n, ds in enumerate(datasets)
        ]

    return build


def _one(change: Callable[[Dataset], bytes | None]) -> Callable[[Path], list[Path]]:
    """One slice of a fresh series, changed; ``change`` may return the raw body to send."""

    def build(folder: Path) -> list[Path]:
        ds = series(SeriesSpec(slices=1, rows=16, columns=16))[0]
        sop_class, sop_uid = str(ds.SOPClassUID), str(ds.SOPInstanceUID)
        raw = change(ds)
        return [write(folder, "one.dcm", raw if raw is not None else body(ds), sop_class, sop_uid)]

    return build


def _series_with(change: Callable[[list[Dataset]], None]) -> Callable[[Path], list[Path]]:
    def build(folder: Path) -> list[Path]:
        datasets = series()
        change(datasets)
        return files_of(datasets)(folder)

    return build


def _series_raw(change: Callable[[bytes], bytes]) -> Callable[[Path], list[Path]]:
    """A series whose every file's data set bytes are changed by ``change``."""

    def build(folder: Path) -> list[Path]:
        return [
            write(
                folder,
                f"{n:03d}.dcm",
                change(body(ds)),
                str(ds.SOPClassUID),
                str(ds.SOPInstanceUID),
            )
            for n, ds in enumerate(series())
        ]

    return build


def _set(keyword: str, value: object) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        setattr(ds, keyword, value)

    return change


def _delete(keyword: str) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        delattr(ds, keyword)

    return change


def _truncated(fraction: float) -> Callable[[Dataset], bytes]:
    def change(ds: Dataset) -> bytes:
        del ds.PixelData
        raw = body(ds)
        return raw[: int(len(raw) * fraction)]

    return change


#: Raw pieces of undefined-length sequences: (0040,A730) SQ, item, item and sequence ends.
SEQUENCE = b"\x40\x00\x30\xa7SQ\x00\x00\xff\xff\xff\xff"
ITEM = b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
ITEM_END = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
SEQUENCE_END = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"


def _nested(depth: int) -> Callable[[Dataset], bytes]:
    """Sequences inside sequences, ``depth`` deep (written by hand: pydicom's own writer
    overflows the stack on it)."""

    def change(ds: Dataset) -> bytes:
        del ds.PixelData
        nesting = (SEQUENCE + ITEM) * depth + SEQUENCE + SEQUENCE_END
        return body(ds) + nesting + (ITEM_END + SEQUENCE_END) * depth

    return change


def _unterminated_sequence(ds: Dataset) -> bytes:
    """An undefined-length sequence whose item never ends."""
    del ds.PixelData
    return body(ds) + SEQUENCE + ITEM + b"\x08\x00\x50\x11UI\x04\x001.2\x00"


def _implicit_declared_explicit(ds: Dataset) -> bytes:
    return body(ds, ImplicitVRLittleEndian)


def _bad_vr(ds: Dataset) -> bytes:
    raw = body(ds)
    at = raw.index(b"\x20\x00\x13\x00IS")  # InstanceNumber
    return raw[:at] + b"\x20\x00\x13\x00ZZ" + raw[at + 6 :]


def _text_in_is(raw: bytes) -> bytes:
    """InstanceNumber (IS) holding words, which pydicom will not write itself."""
    at = raw.index(b"\x20\x00\x13\x00IS")
    length = int.from_bytes(raw[at + 6 : at + 8], "little")
    return raw[: at + 6] + b"\x06\x00twelve" + raw[at + 8 + length :]


def _garbage(ds: Dataset) -> bytes:
    return np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes()


def _huge_dimensions(datasets: list[Dataset]) -> None:
    for ds in datasets:
        ds.Rows = ds.Columns = 65535


def _short_pixels(datasets: list[Dataset]) -> None:
    for ds in datasets:
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]


def _no_pixels(datasets: list[Dataset]) -> None:
    for ds in datasets:
        del ds.PixelData


def _tilt(datasets: list[Dataset]) -> None:
    for n, ds in enumerate(datasets):
        x, y, z = ds.ImagePositionPatient
        ds.ImagePositionPatient = [x, y + n * 2.5 * np.tan(np.radians(15)), z]


def _duplicate(datasets: list[Dataset]) -> None:
    datasets[5].ImagePositionPatient = datasets[4].ImagePositionPatient


def _gap(datasets: list[Dataset]) -> None:
    del datasets[20]


def _spacing(datasets: list[Dataset]) -> None:
    datasets[7].PixelSpacing = [3.0, 3.0]


def _orientation(datasets: list[Dataset]) -> None:
    datasets[9].ImageOrientationPatient = [1, 0, 0, 0, 0.9, 0.43589]


def _coronal(datasets: list[Dataset]) -> None:
    for ds in datasets:
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]


def _nan_position(datasets: list[Dataset]) -> None:
    datasets[3].ImagePositionPatient = ["nan", "0", "0"]


def _bits(datasets: list[Dataset]) -> None:
    for ds in datasets:
        ds.BitsAllocated = 12


def _few(datasets: list[Dataset]) -> None:
    del datasets[3:]


def _localizers(datasets: list[Dataset]) -> None:
    for ds in datasets:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]


def _mixed_modality(datasets: list[Dataset]) -> None:
    for ds in datasets[::2]:
        ds.Modality = "MR"


def _rgb(datasets: list[Dataset]) -> None:
    for ds in datasets:
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 3, "RGB"


def _zero_spacing(datasets: list[Dataset]) -> None:
    for ds in datasets:
        ds.PixelSpacing = [0, 0]


def _names(value: str, charset: str | None = None) -> Callable[[list[Dataset]], None]:
    def change(datasets: list[Dataset]) -> None:
        for ds in datasets:
            if charset:
                ds.SpecificCharacterSet = charset
            ds.PatientName = value

    return change


def _declared_jpeg(folder: Path) -> list[Path]:
    """Native pixels sent under a JPEG Lossless transfer syntax: encapsulation is missing."""
    datasets = series()
    return [
        write(
            folder,
            f"{n:03d}.dcm",
            body(ds),
            str(ds.SOPClassUID),
            str(ds.SOPInstanceUID),
            JPEGLosslessSV1,
        )
        for n, ds in enumerate(datasets)
    ]


def _deflate_bomb(folder: Path) -> list[Path]:
    """A valid header, then private OB data of zeros: 2 MB on the wire, 64 MB inflated."""
    ds = series(SeriesSpec(slices=1, rows=16, columns=16))[0]
    del ds.PixelData
    raw = body(ds)
    zeros = 64 * 2**20
    element = b"\x09\x00\x10\x10OB\x00\x00" + zeros.to_bytes(4, "little")
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    chunk = bytes(2**20)
    stream = deflater.compress(raw + element)
    for _ in range(zeros // len(chunk)):
        stream += deflater.compress(chunk)
    stream += deflater.flush()
    return [
        write(
            folder,
            "bomb.dcm",
            stream,
            str(ds.SOPClassUID),
            str(ds.SOPInstanceUID),
            DeflatedExplicitVRLittleEndian,
        )
    ]


def _mr_on_ct(ds: Dataset) -> None:
    ds.SOPClassUID = MRImageStorage


def _mismatched_uid(ds: Dataset) -> None:
    ds.SOPInstanceUID = generate_uid()


def _real_j2k(folder: Path) -> Callable[[Path], list[Path]]:
    """The shared real Siemens JPEG 2000 series whose Study, Series and SOP Class UIDs were
    blanked: sent as they are, read from the shared data, never copied."""
    return lambda _: sorted(folder.iterdir())


def cases(robustness: Path | None = None) -> list[Case]:
    """The corpus; ``robustness`` is the shared data's ``robustness`` folder, if present."""
    rejected = "rejected"
    real = []
    if robustness is not None:
        folder = robustness / "siemens-j2k-blank-uids"
        real.append(Case("real JPEG 2000 CT with blanked UIDs", _real_j2k(folder), [MISSING] * 20))
    corpus = [
        Case("truncated header", _one(_truncated(0.6)), [UNREADABLE]),
        Case("truncated in its first element", _one(_truncated(0.01)), [UNREADABLE]),
        Case("empty data set", _one(lambda ds: b""), [MISSING]),
        Case("random bytes", _one(_garbage), [UNREADABLE]),
        Case("invalid SOP Instance UID", _one(_set("SOPInstanceUID", "1.2.3.abc")), [UNREADABLE]),
        Case(
            "UID of 70 characters", _one(_set("SeriesInstanceUID", "1." + "2" * 68)), [UNREADABLE]
        ),
        Case("UID with a path", _one(_set("StudyInstanceUID", "../../etc/passwd")), [UNREADABLE]),
        Case("no Study Instance UID", _one(_delete("StudyInstanceUID")), [MISSING]),
        Case("no SOP Class UID", _one(_delete("SOPClassUID")), [MISSING]),
        Case("SOP Instance UID unlike the request's", _one(_mismatched_uid), [MISSING]),
        Case("unknown VR ZZ", _one(_bad_vr), [UNREADABLE]),
        Case("implicit VR sent as explicit", _one(_implicit_declared_explicit), [UNREADABLE]),
        Case("sequences nested 5000 deep", _one(_nested(5000)), [UNREADABLE]),
        Case("sequence never terminated", _one(_unterminated_sequence), [UNREADABLE]),
        Case(
            "text in InstanceNumber (IS), not needed for analysis",
            _series_raw(_text_in_is),
            [OK] * SMALL.slices,
            "analyzed",
        ),
        Case("deflate bomb", _deflate_bomb, [NO_ROOM]),
        Case("MR data set on a CT context", _one(_mr_on_ct), [MISSING]),
        Case(
            "huge declared dimensions",
            _series_with(_huge_dimensions),
            [OK] * SMALL.slices,
            rejected,
            "65535 x 65535",
        ),
        Case(
            "pixel data shorter than Rows x Columns",
            _series_with(_short_pixels),
            [OK] * SMALL.slices,
            rejected,
            "pixel data",
        ),
        Case(
            "no pixel data",
            _series_with(_no_pixels),
            [OK] * SMALL.slices,
            rejected,
            "PixelData (7FE0,0010) is missing",
        ),
        Case("gantry tilt", _series_with(_tilt), [OK] * SMALL.slices, rejected, "gantry tilt"),
        Case(
            "duplicate slice",
            _series_with(_duplicate),
            [OK] * SMALL.slices,
            rejected,
            "duplicate slice position",
        ),
        Case(
            "missing slice",
            _series_with(_gap),
            [OK] * (SMALL.slices - 1),
            rejected,
            "irregular slice spacing",
        ),
        Case(
            "pixel spacing differs",
            _series_with(_spacing),
            [OK] * SMALL.slices,
            rejected,
            "PixelSpacing (0028,0030) differs",
        ),
        Case(
            "orientation differs",
            _series_with(_orientation),
            [OK] * SMALL.slices,
            rejected,
            "ImageOrientationPatient (0020,0037) differs",
        ),
        Case("coronal", _series_with(_coronal), [OK] * SMALL.slices, rejected, "is not axial"),
        Case(
            "NaN in a position",
            _series_with(_nan_position),
            [OK] * SMALL.slices,
            rejected,
            "ImagePositionPatient",
        ),
        Case(
            "BitsAllocated 12",
            _series_with(_bits),
            [OK] * SMALL.slices,
            rejected,
            "pixel data cannot be decoded",
        ),
        Case("three slices", _series_with(_few), [OK] * 3, rejected, "at least 16 are needed"),
        Case(
            "localizers only",
            _series_with(_localizers),
            [OK] * SMALL.slices,
            "not_selected",
            "only localizer images",
        ),
        Case(
            "CT and MR in one series",
            _series_with(_mixed_modality),
            [OK] * SMALL.slices,
            "not_selected",
            "modality",
        ),
        Case(
            "RGB pixels",
            _series_with(_rgb),
            [OK] * SMALL.slices,
            rejected,
            "pixel data",
        ),
        Case(
            "zero pixel spacing",
            _series_with(_zero_spacing),
            [OK] * SMALL.slices,
            rejected,
            "PixelSpacing",
        ),
        Case(
            "native pixels declared JPEG Lossless",
            _declared_jpeg,
            [OK] * SMALL.slices,
            rejected,
            "cannot be decoded",
        ),
        Case(
            "non-ASCII patient name",
            _series_with(_names("Müller^Jürgen=山田^太郎", "ISO_IR 192")),
            [OK] * SMALL.slices,
            "analyzed",
        ),
        Case(
            "overlong patient name",
            _series_with(_names("X" * 500 + "^" + "Y" * 500)),
            [OK] * SMALL.slices,
            "analyzed",
        ),
    ]
    return real + corpus


# Raw PDUs, for peers that misbehave below DIMSE (PS3.8 9.3).
def _pdu_item(item_type: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(payload)) + payload


def associate_rq(called: str, calling: str, context_id: int = 1) -> bytes:
    """An A-ASSOCIATE-RQ proposing Verification in one presentation context of that ID."""
    body = struct.pack(">HH", 1, 0) + called.ljust(16).encode() + calling.ljust(16).encode()
    body += bytes(32) + _pdu_item(0x10, b"1.2.840.10008.3.1.1.1")
    abstract = _pdu_item(0x30, b"1.2.840.10008.1.1")
    transfer = _pdu_item(0x40, ImplicitVRLittleEndian.encode())
    body += _pdu_item(0x20, bytes([context_id, 0, 0, 0]) + abstract + transfer)
    user = _pdu_item(0x51, struct.pack(">I", 16384)) + _pdu_item(0x52, b"1.2.3.4")
    body += _pdu_item(0x50, user)
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def stalled_pdu(called: str, calling: str) -> bytes:
    """The first half of an A-ASSOCIATE-RQ: a peer that sends this and then nothing."""
    whole = associate_rq(called, calling)
    return whole[: len(whole) // 2]
