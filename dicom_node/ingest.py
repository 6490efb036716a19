"""One received instance: check its header, store it durably, index it, then say so.

The order is the contract with the sender: file fsynced and renamed, index committed, and only
then a success status. A crash anywhere before leaves nothing acknowledged; the sender resends
and the same SOP Instance UID lands on the same file and index row (stored once).
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import status
from storage import index
from storage.files import FileStore, InvalidUID, check_uid

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


def ingest(
    encoded: bytes,
    files: FileStore,
    db: sessionmaker[Session],
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
    syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
    record = read_record(ds, syntax)
    if expected_sop_uid and record.sop_uid != expected_sop_uid:
        raise InstanceRefused(
            status.MISSING_ATTRIBUTE,
            f"SOPInstanceUID {record.sop_uid} differs from the request's {expected_sop_uid}",
        )
    try:
        stored = files.store(record.study_uid, record.series_uid, record.sop_uid, encoded)
    except OSError as exc:
        log.error("cannot write instance %s: %s", record.sop_uid, exc)
        raise InstanceRefused(
            status.OUT_OF_RESOURCES, f"storage write failed ({exc.strerror})"
        ) from exc
    if stored.already_present and stored.size != len(encoded):
        log.warning(
            "instance %s received again with different content; the first copy is kept",
            record.sop_uid,
        )
    for attempt in (1, 2):
        try:
            with db.begin() as session:
                recorded = index.record_instance(session, record, stored, calling_ae, peer_host)
            return Ingested(recorded.series_id, recorded.new)
        except IntegrityError:
            if attempt == 2:  # a concurrent receiver won the race twice: report it, not a crash
                raise InstanceRefused(status.OUT_OF_RESOURCES, "index conflict; retry") from None
        except OperationalError as exc:
            log.error("cannot index instance %s: %s", record.sop_uid, exc.__class__.__name__)
            raise InstanceRefused(status.OUT_OF_RESOURCES, "index database unavailable") from exc
    raise AssertionError("unreachable")
