"""The index's fields read from a received instance's bytes are the ones pydicom reads."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicom_node.receive.header import MAX_SEQUENCE_DEPTH, Header, Unreadable, scan
from dicom_node.receive.ingest import file_meta_header, read_record
from storage.index import InstanceRecord
from tests.adversarial import ITEM, ITEM_END, SEQUENCE, SEQUENCE_END, body
from tests.conftest import SHARED_DATA
from tests.dicom_factory import SeriesSpec, ct_datasets, multiframe_ct, phantom


def received(ds: Dataset, syntax: str = ExplicitVRLittleEndian) -> bytes:
    """The bytes the C-STORE handler hands to the receiver: its file meta, then the data set."""
    return file_meta_header(ds.SOPClassUID, ds.SOPInstanceUID, syntax, "SCANNER") + body(ds, syntax)


def by_pydicom(encoded: bytes) -> InstanceRecord:
    ds = pydicom.dcmread(io.BytesIO(encoded), stop_before_pixels=True)
    return read_record(ds, str(ds.file_meta.TransferSyntaxUID))


def slice_() -> Dataset:
    spec = SeriesSpec(slices=1)
    return ct_datasets(spec, phantom(spec, None))[0]


def variants() -> dict[str, tuple[Dataset, str]]:
    plain = slice_()
    several = slice_()
    several.ConvolutionKernel = ["Br40d", "3"]
    several.ImageType = "ORIGINAL"
    several.PatientName = "Müller^Jürgen"
    several.SpecificCharacterSet = "ISO_IR 100"
    several.StudyDescription = "Thorax  "
    utf8 = slice_()
    utf8.SpecificCharacterSet = "ISO_IR 192"
    utf8.PatientName = "Ødegård^Åse=オーデゴール"
    utf8.SeriesDescription = "Lunge 1,0 mm\\axial"
    empty = slice_()
    empty.SliceThickness = None
    empty.InstanceNumber = None
    empty.AccessionNumber = ""
    del empty.ImageOrientationPatient
    odd = slice_()
    odd.ImagePositionPatient = ["-1.5e2", " 20 ", "+3"]
    odd.ImagesInAcquisition = "12 "
    return {
        "plain explicit": (plain, ExplicitVRLittleEndian),
        "plain implicit": (plain, ImplicitVRLittleEndian),
        "multi-valued, Latin-1": (several, ExplicitVRLittleEndian),
        "UTF-8": (utf8, ImplicitVRLittleEndian),
        "empty and missing": (empty, ExplicitVRLittleEndian),
        "numbers as written": (odd, ExplicitVRLittleEndian),
    }


@pytest.mark.parametrize("name", list(variants()))
def test_the_fields_read_from_bytes_are_pydicoms(name: str) -> None:
    ds, syntax = variants()[name]
    encoded = received(ds, syntax)
    header = scan(encoded)
    assert isinstance(header, Header), "read here, not left to pydicom"
    assert read_record(header, header.transfer_syntax) == by_pydicom(encoded)
    assert header.requested_sop_class == ds.SOPClassUID


def test_headers_this_reading_is_not_sure_of_are_left_to_pydicom() -> None:
    japanese = slice_()
    japanese.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    japanese.PatientName = "Yamada^Tarou=山田^太郎"
    spec = SeriesSpec(slices=2)
    enhanced = multiframe_ct(ct_datasets(spec, phantom(spec, None)))
    for ds in (japanese, enhanced):
        assert scan(received(ds)) is None


def test_a_data_set_cut_short_is_unreadable_with_where() -> None:
    encoded = received(slice_())
    with pytest.raises(Unreadable, match="truncated: \\(7FE0,0010\\) declares"):
        scan(encoded[:-10])


def test_sequences_nest_as_deep_as_the_limit_and_no_deeper() -> None:
    ds = slice_()
    del ds.PixelData
    prefix = received(ds)

    def nested(depth: int) -> bytes:
        opened = (SEQUENCE + ITEM) * (depth - 1) + SEQUENCE + SEQUENCE_END
        return prefix + opened + (ITEM_END + SEQUENCE_END) * (depth - 1)

    assert scan(nested(MAX_SEQUENCE_DEPTH)) is not None
    with pytest.raises(Unreadable, match=f"nested more than {MAX_SEQUENCE_DEPTH} deep"):
        scan(nested(MAX_SEQUENCE_DEPTH + 1))


def test_defined_length_sequences_are_walked_and_their_overruns_refused() -> None:
    """pydicom writes sequences and items with their lengths: what is inside them is checked
    as everything else is."""
    ds = slice_()
    del ds.PixelData
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator = "XYZ1", "99TEST"
    ds.ProcedureCodeSequence = [code]
    encoded = received(ds)
    assert scan(encoded) is not None
    value_length = encoded.index(b"XYZ1") - 2  # CodeValue's 2-byte length, before its value
    overrun = bytearray(encoded)
    overrun[value_length : value_length + 2] = (200).to_bytes(2, "little")
    with pytest.raises(Unreadable, match="\\(0008,0100\\) declares 200 bytes"):
        scan(bytes(overrun))


def test_defined_length_nesting_is_bounded_too() -> None:
    ds = slice_()
    del ds.PixelData
    inner = Dataset()
    inner.CodeValue = "1"
    for _ in range(MAX_SEQUENCE_DEPTH + 1):
        outer = Dataset()
        outer.ContentSequence = [inner]
        inner = outer
    ds.ContentSequence = inner.ContentSequence
    with pytest.raises(Unreadable, match="nested more than"):
        scan(received(ds))


def shared_instances() -> list[Path]:
    folders = [SHARED_DATA / "interop", SHARED_DATA / "robustness"]
    return sorted(p for f in folders if f.is_dir() for p in f.rglob("*") if p.is_file())


def test_instances_written_by_other_tools_read_as_pydicom_reads_them() -> None:
    """SRs, SEGs, enhanced and JPEG 2000 CT from other writers, as a peer would send them."""
    compared = 0
    for path in shared_instances():
        try:
            ds = pydicom.dcmread(path)
        except pydicom.errors.InvalidDicomError:
            continue  # a licence or a README
        syntax = str(ds.file_meta.TransferSyntaxUID)
        encoded = (
            file_meta_header(
                str(ds.get("SOPClassUID", "")), str(ds.get("SOPInstanceUID", "")), syntax, "PEER"
            )
            + path.read_bytes()[_data_set_offset(path) :]
        )
        header = scan(encoded)
        if header is not None:
            try:
                expected = by_pydicom(encoded)
            except Exception as exc:  # refused either way, with the same reason
                with pytest.raises(type(exc), match=str(exc)[:20]):
                    read_record(header, header.transfer_syntax)
            else:
                assert read_record(header, header.transfer_syntax) == expected, path.name
            compared += 1
    if not shared_instances():
        pytest.skip(f"shared test data not found at {SHARED_DATA} (set LUNGNODE_SHARED_DATA)")
    assert compared >= 10


def _data_set_offset(path: Path) -> int:
    with path.open("rb") as handle:
        pydicom.filereader.read_preamble(handle, force=False)
        pydicom.filereader._read_file_meta_info(handle)
        return handle.tell()
