"""The receiver's path from bytes to a durable, indexed instance, on SQLite and PostgreSQL."""

from __future__ import annotations

import copy
import hashlib
import io
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select

from dicom_node.config import SecuritySettings
from dicom_node.dimse import StoreStatus
from dicom_node.receive.header import file_meta
from dicom_node.receive.ingest import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION,
    IdentityConflict,
    InstanceRefused,
    Receiver,
    file_meta_header,
)
from storage.database import open_database
from storage.files import FileStore, FreeSpace
from storage.models import Instance, Patient, Series, Study, utcnow
from storage.states import SeriesState
from tests.dicom_factory import SeriesSpec, ct_datasets, phantom


@pytest.mark.parametrize("ae", ["SCANNER", "ODD_AE", ""])
def test_file_meta_header_is_what_pydicom_writes(ae: str) -> None:
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\0\1"
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = "1.2.3.45"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    if ae:
        meta.SourceApplicationEntityTitle = ae
    buffer = io.BytesIO()
    write_file_meta_info(pydicom.filebase.DicomFileLike(buffer), meta)
    ours = file_meta_header(CTImageStorage, "1.2.3.45", ExplicitVRLittleEndian, ae)
    if ae:
        assert ours == b"\0" * 128 + b"DICM" + buffer.getvalue()
    parsed = pydicom.dcmread(io.BytesIO(ours + b""), force=True)
    assert parsed.file_meta.MediaStorageSOPInstanceUID == "1.2.3.45"


def _encoded(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.fixture
def receiver(database_url: str, tmp_path: Path) -> Iterator[Receiver]:
    db = open_database(database_url)
    limits = SecuritySettings()
    store = FileStore(tmp_path / "store", spares=2)
    receiver = Receiver(
        store,
        db,
        limits.max_instances_per_series,
        FreeSpace(store.root, 0),
        limits.max_instance_bytes,
    )
    yield receiver
    receiver.close()
    db.kw["bind"].dispose()


def test_instances_are_stored_indexed_and_counted_once(receiver: Receiver) -> None:
    spec = SeriesSpec(slices=4)
    datasets = ct_datasets(spec, phantom(spec, None))
    first = [receiver.ingest(_encoded(ds), "SCANNER", "127.0.0.1") for ds in datasets]
    again = receiver.ingest(_encoded(datasets[0]), "SCANNER", "127.0.0.1")
    assert [r.new for r in first] == [True] * 4 and not again.new
    with receiver.db() as session:
        series = session.scalars(select(Series)).one()
        rows = session.scalars(select(Instance)).all()
    assert series.version == 4 and len(rows) == 4
    # Written through the driver on SQLite: read back through the ORM as the types they are.
    assert series.state == SeriesState.RECEIVING and series.reason == ""
    assert timedelta(0) <= utcnow() - series.last_received < timedelta(minutes=1)
    assert sorted(r.instance_number for r in rows) == sorted(
        int(d.InstanceNumber) for d in datasets
    )
    for row in rows:
        stored = Path(row.path).read_bytes()
        assert pydicom.dcmread(io.BytesIO(stored)).SOPInstanceUID == row.sop_uid
        assert len(stored) == row.size and row.sha256 == hashlib.sha256(stored).hexdigest()
        assert series.first_received <= row.received <= series.last_received


def test_slices_of_a_new_series_arriving_at_once_land_in_one_series(receiver: Receiver) -> None:
    """Their index rows may share one transaction: the first creates the series, the others
    find it there."""
    spec = SeriesSpec(slices=8)
    encoded = [_encoded(ds) for ds in ct_datasets(spec, phantom(spec, None))]
    with ThreadPoolExecutor(len(encoded)) as pool:
        done = list(pool.map(lambda e: receiver.ingest(e, "SCANNER", "127.0.0.1"), encoded))
    assert all(d.new for d in done) and len({d.series_id for d in done}) == 1
    with receiver.db() as session:
        series = session.scalars(select(Series)).one()
        assert series.version == 8
        assert len(session.scalars(select(Instance)).all()) == 8
        assert len(session.scalars(select(Patient)).all()) == 1


def test_a_refused_instance_leaves_no_file(receiver: Receiver, tmp_path: Path) -> None:
    spec = SeriesSpec(slices=1)
    (ds,) = ct_datasets(spec, phantom(spec, None))
    ds.SeriesInstanceUID = "1.2.3.x"
    with pytest.raises(InstanceRefused) as refused:
        receiver.ingest(_encoded(ds), "SCANNER", "127.0.0.1")
    assert refused.value.status == StoreStatus.CANNOT_UNDERSTAND
    assert "SeriesInstanceUID '1.2.3.x' is not a valid DICOM UID" in str(refused.value)
    time.sleep(0.2)  # the refused bytes were being written; their file is dropped when done
    store = tmp_path / "store"
    leftovers = [
        p for p in store.rglob("*") if p.is_file() and ".spare" not in p.relative_to(store).parts
    ]
    assert leftovers == []


def test_a_mismatched_sop_instance_uid_is_refused(receiver: Receiver) -> None:
    spec = SeriesSpec(slices=1)
    (ds,) = ct_datasets(spec, phantom(spec, None))
    with pytest.raises(InstanceRefused, match="differs from the request") as refused:
        receiver.ingest(_encoded(ds), "SCANNER", "127.0.0.1", expected_sop_uid="1.2.3")
    assert refused.value.status == StoreStatus.MISSING_ATTRIBUTE


def test_a_resend_restores_a_file_the_index_names_but_the_disk_lost(receiver: Receiver) -> None:
    spec = SeriesSpec(slices=1)
    (ds,) = ct_datasets(spec, phantom(spec, None))
    receiver.ingest(_encoded(ds), "SCANNER", "127.0.0.1")
    with receiver.db() as session:
        row = session.scalars(select(Instance)).one()
    Path(row.path).unlink()  # a power cut between the commit and the folder's fsync
    again = receiver.ingest(_encoded(ds), "SCANNER", "127.0.0.1")
    assert not again.new and Path(row.path).exists()
    with receiver.db() as session:
        series = session.scalars(select(Series)).one()
    assert series.version == 2  # it completes again, and its analysis sees the slice


def test_a_resend_with_another_data_set_keeps_the_first_and_says_so(receiver: Receiver) -> None:
    spec = SeriesSpec(slices=1)
    (ds,) = ct_datasets(spec, phantom(spec, None))
    first = _encoded(ds)
    receiver.ingest(first, "SCANNER", "127.0.0.1")
    # The same data set relayed by another sender: its file meta differs, the instance not.
    body = first[file_meta(first)[1] :]
    relayed = file_meta_header(ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian, "PACS")
    assert not receiver.ingest(relayed + body, "PACS", "127.0.0.2").changed
    edited = copy.deepcopy(ds)
    edited.WindowCenter = 40  # same UIDs, another data set
    again = receiver.ingest(_encoded(edited), "SCANNER", "127.0.0.1")
    assert again.changed and not again.new
    with receiver.db() as session:
        row = session.scalars(select(Instance)).one()
    assert Path(row.path).read_bytes() == first


def _other_patient(ds: Dataset, *, study: bool = True, series: bool = True) -> Dataset:
    """A copy of ``ds`` for another patient: with a new study and series UID unless told."""
    other = copy.deepcopy(ds)
    other.PatientID, other.PatientName = "OTHER-42", "Other^Patient"
    if study:
        other.StudyInstanceUID = generate_uid()
    if series:
        other.SeriesInstanceUID = generate_uid()
    return other


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({}, "SOPInstanceUID already held in another series"),
        ({"study": False}, "StudyInstanceUID already held for another patient"),
        ({"study": False, "series": False}, "StudyInstanceUID already held for another patient"),
    ],
)
def test_a_uid_held_for_another_patient_is_refused_and_leaves_the_first_alone(
    receiver: Receiver, tmp_path: Path, change: dict[str, bool], reason: str
) -> None:
    spec = SeriesSpec(slices=2)
    first = ct_datasets(spec, phantom(spec, None))
    for ds in first:
        receiver.ingest(_encoded(ds), "SCANNER", "127.0.0.1")
    with pytest.raises(IdentityConflict, match=reason) as refused:
        receiver.ingest(_encoded(_other_patient(first[0], **change)), "SCANNER", "127.0.0.1")
    assert refused.value.status == StoreStatus.DUPLICATE_INSTANCE
    with receiver.db() as session:
        series = session.scalars(select(Series)).one()
        assert series.version == 2  # not counted again, so not analyzed again
        assert len(session.scalars(select(Instance)).all()) == 2
        assert session.scalars(select(Patient)).one().patient_id == first[0].PatientID
    held = {Path(p) for p in (tmp_path / "store").rglob("*.dcm") if p.parent.name != ".spare"}
    assert len(held) == 2 and all(first[0].SeriesInstanceUID in str(p) for p in held)


def test_a_series_uid_held_in_another_study_is_refused(receiver: Receiver) -> None:
    spec = SeriesSpec(slices=1)
    (ds,) = ct_datasets(spec, phantom(spec, None))
    receiver.ingest(_encoded(ds), "SCANNER", "127.0.0.1")
    moved = copy.deepcopy(ds)
    moved.StudyInstanceUID, moved.SOPInstanceUID = generate_uid(), generate_uid()
    with pytest.raises(IdentityConflict, match="SeriesInstanceUID already held in another study"):
        receiver.ingest(_encoded(moved), "SCANNER", "127.0.0.1")
    with receiver.db() as session:
        assert len(session.scalars(select(Study)).all()) == 1
