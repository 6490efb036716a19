"""One received instance: check its header, store it durably, index it, then say so.

The contract with the sender: a success status only once the file is fsynced, renamed and its
name fsynced, and the index row committed and its log flushed (the two proceed side by side).
A crash anywhere before leaves nothing acknowledged; the sender resends and the same SOP
Instance UID lands on the same file and index row (stored once).
"""

from __future__ import annotations

import hashlib
import io
import logging
import struct
import threading
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    DeflatedExplicitVRLittleEndian,
)
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import __version__
from dicom_node.dimse import StoreStatus
from dicom_node.receive.header import Header, Unreadable, file_meta, scan
from storage import index
from storage.database import flushed_later
from storage.files import FileStore, FreeSpace, InvalidUID, StoredFile, check_uid
from storage.group_commit import GroupCommit

log = logging.getLogger(__name__)


#: The node's implementation identity in the File Meta Information of what it stores.
IMPLEMENTATION_CLASS_UID = PYDICOM_IMPLEMENTATION_UID
IMPLEMENTATION_VERSION = f"RESMTNET_{__version__}"[:16]


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    padding = b"\0" if vr == b"UI" else b" "
    if len(value) % 2:
        value += padding
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def file_meta_header(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, source_ae: str
) -> bytes:
    """Preamble, "DICM" and the File Meta Information group (PS3.10 7.1) for a received
    dataset, encoded directly: pydicom's general writer costs more than a fast network
    stream can spare per instance, and these seven elements never change shape."""
    body = b"".join(
        (
            struct.pack("<HH2s2sI", 0x0002, 0x0001, b"OB", b"\0\0", 2) + b"\0\1",
            _meta_element(0x0002, b"UI", sop_class_uid.encode("ascii", "replace")),
            _meta_element(0x0003, b"UI", sop_instance_uid.encode("ascii", "replace")),
            _meta_element(0x0010, b"UI", transfer_syntax.encode("ascii", "replace")),
            _meta_element(0x0012, b"UI", IMPLEMENTATION_CLASS_UID.encode("ascii")),
            _meta_element(0x0013, b"SH", IMPLEMENTATION_VERSION.encode("ascii")),
            _meta_element(0x0016, b"AE", source_ae.encode("ascii", "replace")[:16]),
        )
    )
    group_length = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body))
    return b"\0" * 128 + b"DICM" + group_length + body


class InstanceRefused(Exception):
    """The instance is not stored; ``status`` is the DIMSE status to answer with and the
    message the one-line reason (sent as Error Comment and logged)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class IdentityConflict(InstanceRefused):
    """Refused because one of its UIDs is held for another patient, study or series: a
    sender's error that could mix two patients, so it is audited, not only logged."""


@dataclass(frozen=True)
class Ingested:
    series_id: int
    new: bool
    study_uid: str
    #: A resend whose data set differs from the copy kept (edited under the same SOP
    #: Instance UID, or encoded again in another transfer syntax): the first copy stays.
    changed: bool = False


def same_data_set(stored: bytes, received: bytes) -> bool:
    """Whether two DICOM files hold the same data set bytes: their file meta may differ
    (the Source AE Title names whoever sent each) without the instance differing."""
    return stored[file_meta(stored)[1] :] == received[file_meta(received)[1] :]


def _text(ds: Dataset | Header, keyword: str, limit: int = 64) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value)[:limit]


def _number(ds: Dataset | Header, keyword: str) -> float | None:
    try:
        value = ds.get(keyword)
        return None if value in (None, "") else float(value)
    except (TypeError, ValueError):
        return None


def _values(ds: Dataset | Header, keyword: str) -> list[Any]:
    """A multi-valued element's values: one value reads as itself, not as a sequence."""
    value = ds.get(keyword)
    if value is None or value == "":
        return []
    return (
        [value] if isinstance(value, str | bytes) or not hasattr(value, "__len__") else list(value)
    )


def _position_mm(ds: Dataset | Header) -> float | None:
    """Distance of the slice along its normal: what "contiguous" and "regular" are judged on.
    Plain arithmetic on six and three numbers: numpy's call overhead would dominate."""
    try:
        rx, ry, rz, cx, cy, cz = (float(v) for v in _values(ds, "ImageOrientationPatient"))
        px, py, pz = (float(v) for v in _values(ds, "ImagePositionPatient"))
    except (TypeError, ValueError):
        return None
    return px * (ry * cz - rz * cy) + py * (rz * cx - rx * cz) + pz * (rx * cy - ry * cx)


def _shared_thickness(ds: Dataset | Header) -> float | None:
    """A multi-frame CT keeps its slice thickness in the shared functional groups."""
    try:
        groups = ds.get("SharedFunctionalGroupsSequence")
        return _number(groups[0].PixelMeasuresSequence[0], "SliceThickness")
    except (AttributeError, IndexError, TypeError):
        return None


def read_record(ds: Dataset | Header, transfer_syntax: str) -> index.InstanceRecord:
    """The index's view of a header; refuses what cannot be placed in the information model."""
    uids = {}
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        value = _text(ds, keyword, 1000).strip("\0 ")
        if not value:
            raise InstanceRefused(StoreStatus.MISSING_ATTRIBUTE, f"{keyword} is missing or empty")
        try:
            uids[keyword] = check_uid(keyword, value)
        except InvalidUID as exc:
            raise InstanceRefused(StoreStatus.CANNOT_UNDERSTAND, str(exc)) from exc
    images = _number(ds, "ImagesInAcquisition")
    number = _number(ds, "InstanceNumber")
    return index.InstanceRecord(
        patient_id=_text(ds, "PatientID"),
        issuer=_text(ds, "IssuerOfPatientID"),
        patient_name=_text(ds, "PatientName", 324),
        study_uid=uids["StudyInstanceUID"],
        accession_number=_text(ds, "AccessionNumber", 16),
        study_date=_text(ds, "StudyDate", 8),
        study_description=_text(ds, "StudyDescription"),
        series_uid=uids["SeriesInstanceUID"],
        modality=_text(ds, "Modality", 16),
        series_description=_text(ds, "SeriesDescription"),
        convolution_kernel=_text(ds, "ConvolutionKernel"),
        sop_uid=uids["SOPInstanceUID"],
        sop_class_uid=uids["SOPClassUID"],
        transfer_syntax=transfer_syntax,
        instance_number=int(number) if number is not None else None,
        position_mm=_position_mm(ds),
        slice_thickness_mm=_number(ds, "SliceThickness") or _shared_thickness(ds),
        images_in_acquisition=int(images) if images is not None else None,
        image_type="\\".join(str(v) for v in _values(ds, "ImageType"))[:128],
        frames=int(_number(ds, "NumberOfFrames") or 1),
    )


#: Deflated Explicit VR Little Endian (PS3.5 A.5) is a raw deflate stream after the file
#: meta, which pydicom inflates whole before parsing anything: inflated here in chunks first.
INFLATE_CHUNK = 1 << 24


def check_inflated_size(encoded: bytes, limit: int) -> None:
    """Refuse a deflated data set that inflates past ``limit`` (a deflate bomb: a few MB that
    become many GB), counting in bounded chunks before pydicom inflates it in one piece."""
    meta, body_at = file_meta(encoded)
    if meta.get(0x0010) != DeflatedExplicitVRLittleEndian:
        return
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    pending, total = encoded[body_at:], 0
    try:
        while pending and total <= limit:
            total += len(inflater.decompress(pending, INFLATE_CHUNK))
            pending = inflater.unconsumed_tail
    except zlib.error as exc:
        raise InstanceRefused(
            StoreStatus.CANNOT_UNDERSTAND, f"deflated data set is corrupt ({exc})"
        ) from None
    if total > limit:
        raise InstanceRefused(
            StoreStatus.OUT_OF_RESOURCES,
            f"deflated data set inflates to more than {limit} bytes (security.max_instance_bytes)",
        )


class _SeriesFull(Exception):
    """Rolls back the index row of an instance past ``security.max_instances_per_series``."""


class Receiver:
    """Stores and indexes instances for the SCP; one per node, shared by its associations.

    Series rows are looked up once and their ids kept, so an instance costs one INSERT and
    one UPDATE in a single commit: the ingest rate is bound by fsync, not by the ORM.
    """

    def __init__(
        self,
        files: FileStore,
        db: sessionmaker[Session],
        max_instances_per_series: int,
        free_space: FreeSpace,
        max_inflated_bytes: int,
    ) -> None:
        self.files = files
        self.max_inflated_bytes = max_inflated_bytes
        self.free_space = free_space
        self.max_instances_per_series = max_instances_per_series
        self.db = db
        self.engine: Engine = db.kw["bind"]
        # Index rows are flushed after their commit, outside SQLite's write lock, which the
        # other associations and receiving processes then take without waiting out an fsync.
        self._index_engine, flush = flushed_later(self.engine)
        self.index_writes = GroupCommit(self._index_engine, flush)
        self._series: dict[str, index.SeriesPlace] = {}
        self._lock = threading.Lock()
        self._writer = ThreadPoolExecutor(max_workers=16, thread_name_prefix="store")

    def close(self) -> None:
        """Let writes in flight end (a refused instance's file is dropped by its writer),
        then let go of the index's own connections."""
        self._writer.shutdown(wait=True)
        if self._index_engine is not self.engine:
            self._index_engine.dispose()

    def ingest(
        self,
        encoded: bytes,
        calling_ae: str,
        peer_host: str,
        expected_sop_uid: str | None = None,
    ) -> Ingested:
        """Store and index one instance (DICOM file format bytes, file meta included).

        The bytes go to disk (write, fsync) on a writer thread from the start, while this
        thread parses the header and hashes; then the file is renamed into place, and
        the index row committed while the new name is fsynced. Success is answered after all
        of it."""
        if not self.free_space.room_for(len(encoded)):
            raise InstanceRefused(
                StoreStatus.OUT_OF_RESOURCES, "storage below its free-space watermark; retry later"
            )
        check_inflated_size(encoded, self.max_inflated_bytes)
        # One writer thread writes and fsyncs the bytes while this thread reads the header,
        # then renames the file into place by the name this thread hands it and fsyncs that
        # name, while this thread hashes and commits the index row; success waits for both.
        naming: Future[index.InstanceRecord] = Future()
        placing = self._writer.submit(self._write_and_place, encoded, naming)
        try:
            record = self._header(encoded, expected_sop_uid)
        except BaseException as exc:
            naming.set_exception(exc)  # refused: the writer drops what it wrote
            raise
        naming.set_result(record)
        # Parsing and hashing together take less than the write and its fsync: hashing here
        # costs no time on the critical path, and no hand-over between threads.
        digest = hashlib.sha256(encoded).hexdigest()
        for attempt in (1, 2):
            try:
                return self._index(record, encoded, digest, placing, calling_ae, peer_host)
            except OSError as exc:
                log.error("cannot write instance %s: %s", record.sop_uid, exc)
                raise InstanceRefused(
                    StoreStatus.OUT_OF_RESOURCES, f"storage write failed ({exc.strerror})"
                ) from exc
            except IntegrityError:
                # A concurrent receiver created the same series, or the cached series row is
                # gone: look it up afresh once, then report rather than crash.
                with self._lock:
                    self._series.pop(record.series_uid, None)
                if attempt == 2:
                    raise InstanceRefused(
                        StoreStatus.OUT_OF_RESOURCES, "index conflict; retry"
                    ) from None
            except OperationalError as exc:
                log.error("cannot index instance %s: %s", record.sop_uid, exc.__class__.__name__)
                raise InstanceRefused(
                    StoreStatus.OUT_OF_RESOURCES, "index database unavailable"
                ) from exc
        raise AssertionError("unreachable")

    @staticmethod
    def _same_as_kept(path: Path, encoded: bytes) -> bool:
        try:
            return same_data_set(path.read_bytes(), encoded)
        except OSError as exc:  # deleted by retention meanwhile, or unreadable: not compared
            log.warning("cannot compare a resend of %s with the copy kept: %s", path.name, exc)
            return True

    def _write_and_place(self, encoded: bytes, naming: Future[index.InstanceRecord]) -> StoredFile:
        temporary = self.files.write_temporary(encoded)
        try:
            record = naming.result()
        except BaseException:  # the instance was refused: nothing of it is kept
            self.files.discard(temporary)
            raise
        return self.files.place(temporary, record.study_uid, record.series_uid, record.sop_uid)

    def _header(self, encoded: bytes, expected_sop_uid: str | None) -> index.InstanceRecord:
        try:
            header = scan(encoded)
        except Unreadable as exc:
            raise InstanceRefused(StoreStatus.CANNOT_UNDERSTAND, str(exc)) from None
        try:
            if header is None:
                ds = pydicom.dcmread(io.BytesIO(encoded), stop_before_pixels=True, force=False)
                requested_class = str(ds.file_meta.get("MediaStorageSOPClassUID", ""))
                record = read_record(ds, str(ds.file_meta.get("TransferSyntaxUID", "")))
            else:
                requested_class = header.requested_sop_class
                record = read_record(header, header.transfer_syntax)
        except InstanceRefused:
            raise
        except Exception as exc:  # pydicom raises many types on malformed input
            raise InstanceRefused(
                StoreStatus.CANNOT_UNDERSTAND,
                f"dataset cannot be parsed ({exc.__class__.__name__})",
            ) from exc
        if expected_sop_uid and record.sop_uid != expected_sop_uid:
            raise InstanceRefused(
                StoreStatus.MISSING_ATTRIBUTE,
                f"SOPInstanceUID {record.sop_uid} differs from the request's {expected_sop_uid}",
            )
        if requested_class and record.sop_class_uid != requested_class:
            # The file meta carries the request's Affected SOP Class UID (the context's).
            raise InstanceRefused(
                StoreStatus.MISSING_ATTRIBUTE,
                f"SOPClassUID {record.sop_class_uid} differs from the request's {requested_class}",
            )
        return record

    def _index(
        self,
        record: index.InstanceRecord,
        encoded: bytes,
        digest: str,
        placing: Future[StoredFile],
        calling_ae: str,
        peer_host: str,
    ) -> Ingested:
        path = self.files.path_for(record.study_uid, record.series_uid, record.sop_uid)
        known = self._series.get(record.series_uid)

        # A bare connection: an ORM session per instance costs more than its statements. The
        # row is committed while the file is still being made durable and named: a crash
        # before both are done can leave a row naming a file that is not there, for an
        # instance never acknowledged; its resend restores the file, and the analysis worker
        # drops the rows of instances that never came back (index.forget_instances).
        def write(connection: Connection) -> tuple[index.SeriesPlace, index.Recorded]:
            place = known
            if place is None or not place.holds(record):
                # First sight of the series in this process, or an instance that disagrees
                # with it: the ORM finds or creates its rows in the same transaction, so
                # that a refused instance leaves no patient, study or series behind.
                with self.db(bind=connection) as session:
                    place = index.series_for(session, record, calling_ae, peer_host)
                    session.flush()
            recorded = index.record_instance(
                connection, record, path, len(encoded), digest, place.series_id
            )
            if recorded.arrivals > self.max_instances_per_series:
                raise _SeriesFull
            return place, recorded

        try:
            place, recorded = self.index_writes.run(write)
        except (_SeriesFull, index.UIDConflict) as exc:
            if not placing.result().already_present:
                self.files.discard(path)
            if isinstance(exc, index.UIDConflict):
                raise IdentityConflict(StoreStatus.DUPLICATE_INSTANCE, str(exc)) from None
            raise InstanceRefused(
                StoreStatus.OUT_OF_RESOURCES,
                f"series holds {self.max_instances_per_series} instances, the node's limit",
            ) from None
        stored = placing.result()
        if not recorded.new and not stored.already_present:
            # Indexed, yet its file was missing: a crash as above. The resend restored it;
            # the series completes again so that its analysis sees the slice.
            with self.engine.begin() as connection:
                index.count_arrival(connection, recorded.series_id)
        changed = stored.already_present and not self._same_as_kept(stored.path, encoded)
        if changed:
            log.warning(
                "instance %s received again with another data set; the first copy is kept",
                record.sop_uid,
            )
        with self._lock:
            self._series[record.series_uid] = place
            if len(self._series) > 10_000:  # a long-running node sees many series
                self._series.pop(next(iter(self._series)))
        return Ingested(recorded.series_id, recorded.new, record.study_uid, changed)
