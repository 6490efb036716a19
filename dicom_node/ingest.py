"""One received instance: check its header, store it durably, index it, then say so.

The order is the contract with the sender: file fsynced and renamed, index committed, and only
then a success status. A crash anywhere before leaves nothing acknowledged; the sender resends
and the same SOP Instance UID lands on the same file and index row (stored once).
"""

from __future__ import annotations

import hashlib
import io
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import status
from storage import index
from storage.files import FileStore, InvalidUID, StoredFile, check_uid

log = logging.getLogger(__name__)


class InstanceRefused(Exception):
    """The instance is not stored; ``status`` is the DIMSE status to answer with and the
    message the one-line reason (sent as Error Comment and logged)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


@dataclass(frozen=True)
class Ingested:
    series_id: int
    new: bool


def _text(ds: Dataset, keyword: str, limit: int = 64) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value)[:limit]


def _number(ds: Dataset, keyword: str) -> float | None:
    try:
        value = ds.get(keyword)
        return None if value in (None, "") else float(value)
    except (TypeError, ValueError):
        return None


def _position_mm(ds: Dataset) -> float | None:
    """Distance of the slice along its normal: what "contiguous" and "regular" are judged on."""
    try:
        orientation = np.array([float(v) for v in ds.ImageOrientationPatient], dtype=float)
        position = np.array([float(v) for v in ds.ImagePositionPatient], dtype=float)
    except (AttributeError, TypeError, ValueError):
        return None
    if orientation.size != 6 or position.size != 3:
        return None
    return float(position @ np.cross(orientation[:3], orientation[3:]))


def read_record(ds: Dataset, transfer_syntax: str) -> index.InstanceRecord:
    """The index's view of a header; refuses what cannot be placed in the information model."""
    uids = {}
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        value = _text(ds, keyword, 1000).strip("\0 ")
        if not value:
            raise InstanceRefused(status.MISSING_ATTRIBUTE, f"{keyword} is missing or empty")
        try:
            uids[keyword] = check_uid(keyword, value)
        except InvalidUID as exc:
            raise InstanceRefused(status.CANNOT_UNDERSTAND, str(exc)) from exc
    images = _number(ds, "ImagesInAcquisition")
    number = _number(ds, "InstanceNumber")
    return index.InstanceRecord(
        patient_id=_text(ds, "PatientID"),
        issuer=_text(ds, "IssuerOfPatientID"),
        patient_name=_text(ds, "PatientName", 324),
        study_uid=uids["StudyInstanceUID"],
        accession_number=_text(ds, "AccessionNumber", 16),
        study_date=_text(ds, "StudyDate", 8),
        series_uid=uids["SeriesInstanceUID"],
        modality=_text(ds, "Modality", 16),
        series_description=_text(ds, "SeriesDescription"),
        convolution_kernel=_text(ds, "ConvolutionKernel"),
        sop_uid=uids["SOPInstanceUID"],
        sop_class_uid=uids["SOPClassUID"],
        transfer_syntax=transfer_syntax,
        instance_number=int(number) if number is not None else None,
        position_mm=_position_mm(ds),
        slice_thickness_mm=_number(ds, "SliceThickness"),
        images_in_acquisition=int(images) if images is not None else None,
        image_type="\\".join(str(v) for v in ds.get("ImageType", []) or [])[:128],
        frames=int(_number(ds, "NumberOfFrames") or 1),
    )


class Receiver:
    """Stores and indexes instances for the SCP; one per node, shared by its associations.

    Series rows are looked up once and their ids kept, so an instance costs one INSERT and
    one UPDATE in a single commit: the ingest rate is bound by fsync, not by the ORM.
    """

    def __init__(self, files: FileStore, db: sessionmaker[Session]) -> None:
        self.files = files
        self.db = db
        self._series_ids: dict[str, int] = {}
        self._lock = threading.Lock()
        self._writer = ThreadPoolExecutor(max_workers=16, thread_name_prefix="store")

    def ingest(
        self,
        encoded: bytes,
        calling_ae: str,
        peer_host: str,
        expected_sop_uid: str | None = None,
    ) -> Ingested:
        """Store and index one instance (DICOM file format bytes, file meta included)."""
        try:
            ds = pydicom.dcmread(io.BytesIO(encoded), stop_before_pixels=True)
        except Exception as exc:  # pydicom raises many types on malformed input
            raise InstanceRefused(
                status.CANNOT_UNDERSTAND, f"dataset cannot be parsed ({exc.__class__.__name__})"
            ) from exc
        record = read_record(ds, str(ds.file_meta.get("TransferSyntaxUID", "")))
        if expected_sop_uid and record.sop_uid != expected_sop_uid:
            raise InstanceRefused(
                status.MISSING_ATTRIBUTE,
                f"SOPInstanceUID {record.sop_uid} differs from the request's {expected_sop_uid}",
            )
        path = self.files.path_for(record.study_uid, record.series_uid, record.sop_uid)
        # The file is written and fsynced on another thread while this one hashes it and
        # prepares the index rows; the commit waits for the file, so the index never names
        # a file that is not durable.
        writing = self._writer.submit(
            self.files.store, record.study_uid, record.series_uid, record.sop_uid, encoded
        )
        digest = hashlib.sha256(encoded).hexdigest()
        for attempt in (1, 2):
            try:
                return self._index(
                    record, path, len(encoded), digest, writing, calling_ae, peer_host
                )
            except OSError as exc:
                log.error("cannot write instance %s: %s", record.sop_uid, exc)
                raise InstanceRefused(
                    status.OUT_OF_RESOURCES, f"storage write failed ({exc.strerror})"
                ) from exc
            except IntegrityError:
                # A concurrent receiver created the same series, or the cached series row is
                # gone: look it up afresh once, then report rather than crash.
                with self._lock:
                    self._series_ids.pop(record.series_uid, None)
                if attempt == 2:
                    raise InstanceRefused(
                        status.OUT_OF_RESOURCES, "index conflict; retry"
                    ) from None
            except OperationalError as exc:
                log.error("cannot index instance %s: %s", record.sop_uid, exc.__class__.__name__)
                raise InstanceRefused(
                    status.OUT_OF_RESOURCES, "index database unavailable"
                ) from exc
        raise AssertionError("unreachable")

    def _index(
        self,
        record: index.InstanceRecord,
        path: Path,
        size: int,
        digest: str,
        writing: Future[StoredFile],
        calling_ae: str,
        peer_host: str,
    ) -> Ingested:
        with self.db.begin() as session:
            series_id = self._series_ids.get(record.series_uid)
            if series_id is None:
                series_id = index.series_for(session, record, calling_ae, peer_host)
            recorded = index.record_instance(session, record, path, size, digest, series_id)
            stored = writing.result()
        if stored.already_present and stored.size != size:
            log.warning(
                "instance %s received again with different content; the first copy is kept",
                record.sop_uid,
            )
        with self._lock:
            self._series_ids[record.series_uid] = series_id
            if len(self._series_ids) > 10_000:  # a long-running node sees many series
                self._series_ids.pop(next(iter(self._series_ids)))
        return Ingested(recorded.series_id, recorded.new)
