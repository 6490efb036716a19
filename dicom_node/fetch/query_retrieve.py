"""Query/retrieve SCU: find a patient's studies and series on a PACS, and fetch one series.

Study Root information model (PS3.4 C.6.2): C-FIND at STUDY then SERIES level; then one
series either by C-GET, the PACS sending its instances back as C-STORE sub-operations on the
same association (the node takes the SCP role for the CT storage classes only), or by C-MOVE
to the node's own AE title, the PACS opening an association to the node's storage SCP. Every
call has the peer's timeout on connecting and on each answer; a peer that does not answer
raises :class:`PeerUnavailable` with the reason, never hangs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from dicom_node.config import PriorPeer
from dicom_node.sop_classes import CT_STORAGE_CLASSES

#: C-FIND statuses (PS3.4 C.4.1.1.4): pending with a match, or pending with optional keys
#: unsupported.
PENDING = (0xFF00, 0xFF01)
SUCCESS = 0x0000
#: C-GET and C-MOVE final statuses that delivered what they could (PS3.4 C.4.2.1.5,
#: C.4.3.1.4: success; warning, sub-operations complete with failures).
GET_DONE = (0x0000, 0xB000)


class PeerUnavailable(Exception):
    """The peer could not be asked or did not answer; the message says which and why."""


@dataclass(frozen=True)
class RemoteStudy:
    study_uid: str
    study_date: str  # YYYYMMDD


@dataclass(frozen=True)
class RemoteSeries:
    series_uid: str
    modality: str
    description: str
    instances: int


@contextmanager
def _association(
    calling_ae: str,
    peer: PriorPeer,
    timeout: float,
    get_into: Path | None = None,
    move: bool = False,
) -> Iterator[Association]:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    syntaxes = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind, syntaxes)
    if move:
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove, syntaxes)
    roles: list[Any] = []  # pynetdicom's own annotations want its union types here
    handlers: list[Any] = []
    if get_into is not None:
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet, syntaxes)
        for sop_class in sorted(CT_STORAGE_CLASSES):
            ae.add_requested_context(sop_class, syntaxes)
            roles.append(build_role(sop_class, scp_role=True))
        handlers.append((evt.EVT_C_STORE, _store_into, [get_into]))
    assoc = ae.associate(
        peer.host, peer.port, ae_title=peer.ae_title, ext_neg=roles, evt_handlers=handlers
    )
    if not assoc.is_established:
        what = "rejected the association" if assoc.is_rejected else "did not answer"
        raise PeerUnavailable(f"{peer.name} ({peer.ae_title}@{peer.host}:{peer.port}) {what}")
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def _store_into(event: evt.Event, folder: Path) -> int:
    """A C-STORE sub-operation of our C-GET: written under the SOP Instance UID."""
    ds = event.dataset
    ds.file_meta = event.file_meta
    name = str(ds.SOPInstanceUID)
    if not name.replace(".", "").isdigit():  # a UID, never a path
        return 0xA900
    ds.save_as(folder / f"{name}.dcm", enforce_file_format=True)
    return SUCCESS


def _find(assoc: Association, query: Dataset, peer: PriorPeer) -> list[Dataset]:
    matches = []
    for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
        code = int(status.get("Status", -1)) if status else -1
        if code in PENDING and identifier is not None:
            matches.append(identifier)
        elif code != SUCCESS:
            reason = "no answer (timeout or abort)" if code < 0 else f"status 0x{code:04X}"
            raise PeerUnavailable(f"{peer.name}: C-FIND failed: {reason}")
    return matches


def find_studies(
    calling_ae: str,
    peer: PriorPeer,
    patient_id: str,
    issuer: str,
    date_range: str,
    timeout: float,
) -> list[RemoteStudy]:
    """The patient's CT studies the peer dates within ``date_range`` (DICOM range
    'YYYYMMDD-YYYYMMDD'), in the peer's order. Issuer of Patient ID is matched too, so that
    another hospital's patient with the same ID is not taken."""
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.PatientID = patient_id
    query.IssuerOfPatientID = issuer
    query.StudyDate = date_range
    query.ModalitiesInStudy = "CT"
    query.StudyInstanceUID = ""
    with _association(calling_ae, peer, timeout) as assoc:
        found = _find(assoc, query, peer)
    return [
        RemoteStudy(str(m.StudyInstanceUID), str(m.get("StudyDate", "") or ""))
        for m in found
        if m.get("StudyInstanceUID")
        # A PACS that does not match on the issuer returns it: checked here as well.
        and str(m.get("PatientID", patient_id)) == patient_id
        and str(m.get("IssuerOfPatientID", issuer) or issuer) == issuer
    ]


def find_series(
    calling_ae: str, peer: PriorPeer, study_uid: str, timeout: float
) -> list[RemoteSeries]:
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = study_uid
    query.SeriesInstanceUID = ""
    query.Modality = ""
    query.SeriesDescription = ""
    query.NumberOfSeriesRelatedInstances = ""
    with _association(calling_ae, peer, timeout) as assoc:
        found = _find(assoc, query, peer)
    return [
        RemoteSeries(
            str(m.SeriesInstanceUID),
            str(m.get("Modality", "") or ""),
            str(m.get("SeriesDescription", "") or ""),
            int(m.get("NumberOfSeriesRelatedInstances", 0) or 0),
        )
        for m in found
        if m.get("SeriesInstanceUID")
    ]


def get_series(
    calling_ae: str, peer: PriorPeer, study_uid: str, series_uid: str, folder: Path, timeout: float
) -> int:
    """Fetch one series by C-GET into ``folder``; the number of files written."""
    folder.mkdir(parents=True, exist_ok=True)
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = study_uid
    query.SeriesInstanceUID = series_uid
    with _association(calling_ae, peer, timeout, get_into=folder) as assoc:
        _final(assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet), peer, "C-GET")
    return len(list(folder.glob("*.dcm")))


def move_series(
    calling_ae: str, peer: PriorPeer, study_uid: str, series_uid: str, timeout: float
) -> int:
    """Have ``peer`` send one series by C-MOVE to this node (``calling_ae``, which the PACS
    must know with its address); returns when the PACS says all sub-operations are done,
    so every instance it sent has been acknowledged, that is stored and indexed. The number
    of instances the PACS reports sent."""
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = study_uid
    query.SeriesInstanceUID = series_uid
    with _association(calling_ae, peer, timeout, move=True) as assoc:
        status = _final(
            assoc.send_c_move(query, calling_ae, StudyRootQueryRetrieveInformationModelMove),
            peer,
            "C-MOVE",
        )
    return int(status.get("NumberOfCompletedSuboperations", 0) or 0)


def _final(
    responses: Iterator[tuple[Dataset, Dataset | None]], peer: PriorPeer, what: str
) -> Dataset:
    """The last status of a C-GET or C-MOVE; raises unless it says the retrieve is done."""
    status, code = Dataset(), -1
    for status, _ in responses:
        code = int(status.get("Status", -1)) if status else -1
    if code not in GET_DONE:
        reason = "no answer (timeout or abort)" if code < 0 else f"status 0x{code:04X}"
        raise PeerUnavailable(f"{peer.name}: {what} failed: {reason}")
    return status
