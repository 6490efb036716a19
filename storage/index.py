"""The index's reads and writes: instances in, series state, results and deliveries out.

Every function takes the caller's session, so that what belongs together (an instance and
its series' counters; a result, its instances and the delivery jobs it starts) commits
together. The receiver fills :class:`InstanceRecord` from the header; nothing here reads DICOM.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Dialect, Select, bindparam, delete, func, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError, NoResultFound
from sqlalchemy.orm import Session

from storage.models import (
    Delivery,
    FetchedPrior,
    Instance,
    Patient,
    Result,
    ResultInstance,
    Series,
    Study,
    utcnow,
)
from storage.states import SETTLED, SeriesState


@dataclass(frozen=True)
class InstanceRecord:
    """What the index keeps of one received instance's header."""

    patient_id: str
    issuer: str
    patient_name: str
    study_uid: str
    accession_number: str
    study_date: str
    study_description: str
    series_uid: str
    modality: str
    series_description: str
    convolution_kernel: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax: str
    instance_number: int | None
    position_mm: float | None
    slice_thickness_mm: float | None
    images_in_acquisition: int | None
    image_type: str
    frames: int


@dataclass(frozen=True)
class Recorded:
    series_id: int
    new: bool  # False when the SOP instance was already indexed (a resend)
    #: The series' arrivals so far, this one included (its version): 0 for a resend.
    arrivals: int = 0


def _get_or_create(session: Session, model: Any, where: dict[str, Any], **values: Any) -> Any:
    """Concurrent receivers may create the same study at once: the loser of the race
    rolls back to a savepoint and reads the winner's row."""
    found = session.execute(select(model).filter_by(**where)).scalar_one_or_none()
    if found is not None:
        return found
    try:
        with session.begin_nested():
            row = model(**where, **values)
            session.add(row)
        return row
    except IntegrityError:
        return session.execute(select(model).filter_by(**where)).scalar_one()


@functools.cache
def _insert_instance(dialect: str) -> Any:
    """INSERT ... ON CONFLICT DO NOTHING, built once per dialect (building it per instance
    costs more than executing it)."""
    insert = sqlite_insert if dialect == "sqlite" else postgresql_insert
    return (
        insert(Instance)
        .on_conflict_do_nothing(index_elements=["sop_uid"])
        # RETURNING rather than rowcount: PostgreSQL drivers report -1 for an INSERT that
        # SQLAlchemy gives an implicit RETURNING.
        .returning(Instance.id)
    )


_COUNT_INSTANCE = (
    update(Series)
    .where(Series.id == bindparam("series"))
    .values(
        version=Series.version + 1,
        last_received=bindparam("now"),
        state=SeriesState.RECEIVING,
        reason="",
    )
    .returning(Series.version)
)


class UIDConflict(Exception):
    """A UID the index already holds for another patient, study or series. Filing the
    instance under it would put one patient's images into another's series (and analyze
    that series again), so the receiver refuses it; the message says which UID, reason first
    (a DIMSE Error Comment keeps 64 characters)."""


@dataclass(frozen=True)
class SeriesPlace:
    """A series' row and whose it is: every later instance of the series must agree."""

    series_id: int
    study_uid: str
    patient: tuple[str, str]  # (Patient ID, Issuer of Patient ID)

    def holds(self, record: InstanceRecord) -> bool:
        return (
            record.study_uid == self.study_uid
            and (record.patient_id, record.issuer) == self.patient
        )


def series_for(
    session: Session, record: InstanceRecord, calling_ae: str, peer_host: str
) -> SeriesPlace:
    """The series' row, creating patient, study and series rows on first sight; raises
    :class:`UIDConflict` (nothing created) when the study is held for another patient or the
    series in another study. Checked after the rows are found or created, so that two
    receivers racing to create them are judged on the row that won."""
    patient = _get_or_create(
        session,
        Patient,
        {"patient_id": record.patient_id, "issuer": record.issuer},
        name=record.patient_name,
    )
    study = _get_or_create(
        session,
        Study,
        {"study_uid": record.study_uid},
        patient_id=patient.id,
        accession_number=record.accession_number,
        study_date=record.study_date,
        description=record.study_description,
    )
    if study.patient_id != patient.id:
        raise UIDConflict(f"StudyInstanceUID already held for another patient: {record.study_uid}")
    now = utcnow()
    series = _get_or_create(
        session,
        Series,
        {"series_uid": record.series_uid},
        study_id=study.id,
        modality=record.modality,
        description=record.series_description,
        convolution_kernel=record.convolution_kernel,
        calling_ae=calling_ae,
        peer_host=peer_host,
        first_received=now,
        last_received=now,
    )
    if series.study_id != study.id:
        raise UIDConflict(f"SeriesInstanceUID already held in another study: {record.series_uid}")
    return SeriesPlace(int(series.id), record.study_uid, (record.patient_id, record.issuer))


def record_instance(
    connection: Connection,
    record: InstanceRecord,
    path: Path,
    size: int,
    sha256: str,
    series_id: int,
) -> Recorded:
    """Index one instance of the series ``series_id`` (from :func:`series_for`) stored at
    ``path``. The caller commits only once the file is durable. An instance already indexed
    is a resend, unless it is indexed in another series: :class:`UIDConflict`."""
    now = utcnow()
    values = {
        "sop_uid": record.sop_uid,
        "series_id": series_id,
        "sop_class_uid": record.sop_class_uid,
        "transfer_syntax": record.transfer_syntax,
        "instance_number": record.instance_number,
        "position_mm": record.position_mm,
        "slice_thickness_mm": record.slice_thickness_mm,
        "images_in_acquisition": record.images_in_acquisition,
        "image_type": record.image_type,
        "frames": record.frames,
        "path": str(path),
        "size": size,
        "sha256": sha256,
        "received": now,
    }
    # One statement, no read first: the same instance may arrive on two associations at once.
    inserted = _first_row(connection, _insert_instance(connection.dialect.name), values)
    if inserted is None:
        existing = connection.execute(
            select(Instance.series_id).where(Instance.sop_uid == record.sop_uid)
        ).scalar_one()
        if existing != series_id:
            raise UIDConflict(f"SOPInstanceUID already held in another series: {record.sop_uid}")
        return Recorded(int(existing), new=False)
    return Recorded(series_id, new=True, arrivals=count_arrival(connection, series_id))


def count_arrival(connection: Connection, series_id: int) -> int:
    """The series received something new: it is receiving again and will complete anew.
    Returns its arrivals so far."""
    row = _first_row(connection, _COUNT_INSTANCE, {"series": series_id, "now": utcnow()})
    if row is None:
        raise NoResultFound(f"series {series_id} is not in the index")
    return int(row[0])


@dataclass(frozen=True)
class _DriverStatement:
    """A statement compiled once, with the bind processors SQLAlchemy would apply to each
    value (dates, states), in the order of its positional parameters."""

    sql: str
    names: tuple[str, ...]
    processors: tuple[Callable[[Any], Any] | None, ...]
    constants: dict[str, Any]


@functools.cache
def _for_driver(statement: Any, keys: tuple[str, ...], dialect: Dialect) -> _DriverStatement:
    compiled = statement.compile(dialect=dialect, column_keys=list(keys))
    names = tuple(compiled.positiontup or ())
    binds = [compiled.binds[name] for name in names]
    return _DriverStatement(
        compiled.string,
        names,
        tuple(bind.type.bind_processor(dialect) for bind in binds),
        {
            name: bind.effective_value
            for name, bind in zip(names, binds, strict=True)
            if not bind.required
        },
    )


def _first_row(connection: Connection, statement: Any, values: dict[str, Any]) -> Any:
    """The first row of a statement an instance's arrival runs. On SQLite it runs on the
    driver's cursor, in the connection's transaction: SQLAlchemy's execution path took about
    0.1 ms of interpreter time per statement there, several times the statement's own, on the
    receiver's critical path. Elsewhere (PostgreSQL's named parameters) the usual path."""
    if connection.dialect.paramstyle != "qmark":
        return connection.execute(statement, values).first()
    driver = _for_driver(statement, tuple(values), connection.dialect)
    given = {**driver.constants, **values}
    cursor = connection.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.execute(
            driver.sql,
            [
                given[name] if process is None else process(given[name])
                for name, process in zip(driver.names, driver.processors, strict=True)
            ],
        )
        return cursor.fetchone()
    finally:
        cursor.close()


# --- completion and selection --------------------------------------------------------------


def series_awaiting_completion(
    session: Session, quiet_before: datetime | None = None, ids: Iterable[int] = ()
) -> list[Series]:
    """Series with instances not yet looked at: quiet since ``quiet_before``, or in ``ids``."""
    ids = list(ids)
    pending = select(Series).where(Series.version > Series.state_version)
    if quiet_before is None:
        if not ids:
            return []
        pending = pending.where(Series.id.in_(ids))
    elif ids:
        pending = pending.where((Series.last_received < quiet_before) | Series.id.in_(ids))
    else:
        pending = pending.where(Series.last_received < quiet_before)
    # Row locks, skipping rows another process holds: receivers on several machines may sweep
    # at once, and each series must complete (and be queued) once (PostgreSQL; SQLite's
    # transactions are serial anyway).
    return list(
        session.scalars(pending.order_by(Series.id).with_for_update(skip_locked=True, of=Series))
    )


def instances_of(session: Session, series_id: int) -> list[Instance]:
    return list(
        session.scalars(
            select(Instance).where(Instance.series_id == series_id).order_by(Instance.id)
        )
    )


def forget_instances(session: Session, series_id: int, paths: Iterable[Path]) -> int:
    """Remove the rows of instances of ``series_id`` whose files are not in the store.

    The receiver commits a row while its file is still being made durable; a crash in between
    leaves a row for an instance never acknowledged, which its sender resends or never does."""
    names = [str(p) for p in paths]
    if not names:
        return 0
    removed = session.execute(
        delete(Instance).where(Instance.series_id == series_id, Instance.path.in_(names))
    )
    return int(removed.rowcount)  # type: ignore[attr-defined]


def study_series(session: Session, study_id: int) -> list[Series]:
    return list(session.scalars(select(Series).where(Series.study_id == study_id)))


def set_series_state(
    session: Session,
    series_id: int,
    state: SeriesState,
    reason: str = "",
    *,
    version: int | None = None,
) -> None:
    """Record a decision about the series as it was at ``version`` (default: as it is now)."""
    values: dict[str, Any] = {"state": state, "reason": reason[:4000]}
    if version is not None:
        values["state_version"] = version
    session.execute(update(Series).where(Series.id == series_id).values(**values))


def settle_analysis(
    session: Session, series_id: int, version: int, state: SeriesState, reason: str
) -> None:
    """The outcome of an analysis of ``version``, unless newer instances arrived meanwhile
    (then the series is receiving again and a newer analysis will settle it)."""
    session.execute(
        update(Series)
        .where(
            Series.id == series_id,
            Series.state_version == version,
            Series.state == SeriesState.QUEUED,
        )
        .values(state=state, reason=reason[:4000])
    )


def series_by_uid(session: Session, series_uid: str) -> Series | None:
    return session.execute(
        select(Series).where(Series.series_uid == series_uid)
    ).scalar_one_or_none()


# --- results and deliveries ----------------------------------------------------------------


@dataclass(frozen=True)
class ResultFile:
    sop_uid: str
    sop_class_uid: str
    kind: str
    path: Path


def current_result(session: Session, series_id: int) -> Result | None:
    return session.execute(
        select(Result).where(Result.series_id == series_id, Result.current.is_(True))
    ).scalar_one_or_none()


def save_result(
    session: Session,
    series_id: int,
    job_id: int | None,
    series_version: int,
    record_json: str,
    nodules: int,
    model_sha256: str,
    files: Sequence[ResultFile],
) -> int:
    """A new current result for the series; the one it supersedes stays, marked not current.
    ``record_json`` is the pipeline's record of the run, kept as it is given."""
    session.execute(update(Result).where(Result.series_id == series_id).values(current=False))
    result = Result(
        series_id=series_id,
        job_id=job_id,
        series_version=series_version,
        current=True,
        nodules=nodules,
        findings_json=record_json,
        model_sha256=model_sha256,
        created=utcnow(),
    )
    session.add(result)
    session.flush()
    session.add_all(
        ResultInstance(
            result_id=result.id,
            sop_uid=f.sop_uid,
            sop_class_uid=f.sop_class_uid,
            kind=f.kind,
            path=str(f.path),
        )
        for f in files
    )
    return result.id


def result_files(session: Session, result_id: int, kind: str) -> list[ResultFile]:
    """The result's instances of ``kind`` (sr, seg, key_images), in the order written."""
    rows = session.scalars(
        select(ResultInstance)
        .where(ResultInstance.result_id == result_id, ResultInstance.kind == kind)
        .order_by(ResultInstance.id)
    )
    return [ResultFile(r.sop_uid, r.sop_class_uid, r.kind, Path(r.path)) for r in rows]


def undelivered(
    session: Session, series_id: int, destination: str, kinds: Sequence[str]
) -> list[ResultInstance]:
    """The current result's instances of ``kinds`` that ``destination`` has not acknowledged."""
    delivered = select(Delivery.result_instance_id).where(Delivery.destination == destination)
    return list(
        session.scalars(
            select(ResultInstance)
            .join(Result, Result.id == ResultInstance.result_id)
            .where(
                Result.series_id == series_id,
                Result.current.is_(True),
                ResultInstance.kind.in_(list(kinds)),
                ResultInstance.id.not_in(delivered),
            )
            .order_by(ResultInstance.id)
        )
    )


def record_delivery(
    session: Session, result_instance_id: int, destination: str, status: int
) -> None:
    session.add(
        Delivery(
            result_instance_id=result_instance_id,
            destination=destination,
            status=status,
            delivered=utcnow(),
        )
    )


def forget_deliveries(session: Session, series_id: int) -> int:
    """Make the current result's instances due again everywhere (an operator's resend: the
    same SOP instances go out again, so a PACS that has them keeps one copy)."""
    ids = (
        select(ResultInstance.id)
        .join(Result)
        .where(Result.series_id == series_id, Result.current.is_(True))
    )
    result = session.execute(delete(Delivery).where(Delivery.result_instance_id.in_(ids)))
    return int(result.rowcount)  # type: ignore[attr-defined]


def totals(session: Session) -> dict[str, int]:
    """Counts for ``dicom-node status``."""
    count = func.count()
    return {
        "patients": session.execute(select(count).select_from(Patient)).scalar_one(),
        "studies": session.execute(select(count).select_from(Study)).scalar_one(),
        "series": session.execute(select(count).select_from(Series)).scalar_one(),
        "instances": session.execute(select(count).select_from(Instance)).scalar_one(),
        "results": session.execute(select(count).select_from(Result)).scalar_one(),
        "deliveries": session.execute(select(count).select_from(Delivery)).scalar_one(),
    }


def series_states(session: Session) -> dict[SeriesState, int]:
    rows = session.execute(select(Series.state, func.count()).group_by(Series.state))
    return {state: int(n) for state, n in rows}


# --- retention ------------------------------------------------------------------------------


def purgeable_series(
    session: Session, received_before: datetime, busy: Select[int], limit: int = 20
) -> list[int]:
    """Series whose images may go: settled, quiet since ``received_before``, nothing received
    since their state was set, and not among ``busy`` (series ids with work still owed, from
    the queue)."""
    rows = session.scalars(
        select(Series.id)
        .where(
            Series.state.in_(SETTLED),
            Series.last_received < received_before,
            Series.version == Series.state_version,
            Series.id.not_in(busy),
        )
        .order_by(Series.id)
        .limit(limit)
    )
    return [int(r) for r in rows]


def purge_series_images(session: Session, series_id: int) -> list[Path]:
    """Mark the series ``purged`` and drop its instance rows; return the files to delete (the
    caller deletes them after the commit: a crash between leaves files, never dangling rows)."""
    paths = [
        Path(p)
        for p in session.scalars(select(Instance.path).where(Instance.series_id == series_id))
    ]
    session.execute(delete(Instance).where(Instance.series_id == series_id))
    session.execute(
        update(Series)
        .where(Series.id == series_id)
        .values(state=SeriesState.PURGED, reason="images deleted after retention")
    )
    return paths


# --- the operators' dashboard ----------------------------------------------------------------


@dataclass(frozen=True)
class SeriesSummary:
    """A series as operators look for it in PACS: accession number, study date and
    description, series description and sender, besides its UID. The patient's name and ID
    stay out of it (the dashboard is reachable by more people than the PACS)."""

    id: int
    series_uid: str
    accession_number: str
    study_date: str
    study_description: str
    description: str
    calling_ae: str
    peer_host: str
    instances: int
    last_received: datetime
    state: SeriesState
    reason: str
    nodules: int | None
    #: (result instance id, SOP Instance UID) of the current key images.
    key_images: tuple[tuple[int, str], ...]


def recent_series(session: Session, limit: int = 30, accession: str = "") -> list[SeriesSummary]:
    """The series received last; with ``accession``, only those of studies with that
    Accession Number."""
    query = select(Series, Study).join(Study, Series.study_id == Study.id)
    if accession:
        query = query.where(Study.accession_number == accession)
    rows = session.execute(query.order_by(Series.last_received.desc()).limit(limit))
    return _summaries(session, [(series, study) for series, study in rows])


def series_summary(session: Session, series_uid: str) -> SeriesSummary | None:
    row = session.execute(
        select(Series, Study)
        .join(Study, Series.study_id == Study.id)
        .where(Series.series_uid == series_uid)
    ).one_or_none()
    return _summaries(session, [(row[0], row[1])])[0] if row is not None else None


@dataclass(frozen=True)
class EarlierSeries:
    """An analyzed series of an earlier study of the same patient (same Patient ID and
    issuer): a prior the node already holds, with the result it made of it."""

    series_id: int
    series_uid: str
    study_uid: str
    study_date: str  # YYYYMMDD
    findings_json: str


def earlier_analyzed_series(session: Session, series_id: int) -> list[EarlierSeries]:
    """Series of the patient's other studies dated before this series' study that the node
    has read: analyzed ones (their current result), and priors fetched by C-MOVE from the
    peer asked (what the comparison found in them); most recent first. Whether one is old
    enough or too old is the caller's rule."""
    series = session.get_one(Series, series_id)
    study = session.get_one(Study, series.study_id)
    if not study.study_date:
        return []
    earlier = (
        Study.patient_id == study.patient_id,
        Study.id != study.id,
        Study.study_date != "",
        Study.study_date < study.study_date,
    )
    analyzed = session.execute(
        select(Series, Study, Result.findings_json)
        .join(Study, Series.study_id == Study.id)
        .join(Result, (Result.series_id == Series.id) & Result.current.is_(True))
        .where(*earlier, Series.state == SeriesState.ANALYZED)
    )
    fetched = session.execute(
        select(Series, Study, FetchedPrior.findings_json)
        .join(Study, Series.study_id == Study.id)
        .join(FetchedPrior, FetchedPrior.series_uid == Series.series_uid)
        .where(
            *earlier,
            FetchedPrior.findings_json.is_not(None),
            Series.calling_ae == FetchedPrior.peer_ae,
        )
    )
    rows = sorted(
        [*analyzed, *fetched], key=lambda row: (row[1].study_date, -row[0].id), reverse=True
    )
    return [
        EarlierSeries(int(s.id), s.series_uid, st.study_uid, st.study_date, str(findings))
        for s, st, findings in rows
    ]


def study_uid_of(session: Session, series_id: int) -> str:
    return session.execute(
        select(Study.study_uid)
        .join(Series, Series.study_id == Study.id)
        .where(Series.id == series_id)
    ).scalar_one()


def expect_prior(session: Session, series_uid: str, study_uid: str, peer_ae: str) -> None:
    """Record that ``series_uid`` is being fetched from ``peer_ae`` as a prior (before the
    C-MOVE, so that its arrival is never taken for a series to report on)."""
    if session.get(FetchedPrior, series_uid) is None:
        session.add(FetchedPrior(series_uid=series_uid, study_uid=study_uid, peer_ae=peer_ae))


def remember_prior_findings(session: Session, series_uid: str, findings_json: str) -> None:
    """Keep what a comparison found in a fetched prior, for the next comparison with it."""
    row = session.get(FetchedPrior, series_uid)
    if row is not None:
        row.findings_json = findings_json


def fetched_prior(session: Session, series_uid: str) -> FetchedPrior | None:
    return session.get(FetchedPrior, series_uid)


def current_findings_json(session: Session, series_id: int) -> str | None:
    """The current result's ``findings_json``, None before any analysis."""
    return session.scalar(
        select(Result.findings_json).where(Result.series_id == series_id, Result.current)
    )


def _summaries(session: Session, rows: list[tuple[Series, Study]]) -> list[SeriesSummary]:
    ids = [s.id for s, _ in rows]
    counts = {
        series_id: n
        for series_id, n in session.execute(
            select(Instance.series_id, func.count())
            .where(Instance.series_id.in_(ids))
            .group_by(Instance.series_id)
        )
    }
    current = {
        r.series_id: r
        for r in session.scalars(select(Result).where(Result.series_id.in_(ids), Result.current))
    }
    images: dict[int, list[tuple[int, str]]] = {}
    for result_id, instance_id, sop_uid in session.execute(
        select(ResultInstance.result_id, ResultInstance.id, ResultInstance.sop_uid)
        .where(
            ResultInstance.result_id.in_([r.id for r in current.values()]),
            ResultInstance.kind == "key_images",
        )
        .order_by(ResultInstance.id)
    ):
        images.setdefault(result_id, []).append((instance_id, sop_uid))
    return [
        SeriesSummary(
            s.id,
            s.series_uid,
            study.accession_number,
            study.study_date,
            study.description,
            s.description,
            s.calling_ae,
            s.peer_host,
            int(counts.get(s.id, 0)),
            s.last_received,
            s.state,
            s.reason,
            current[s.id].nodules if s.id in current else None,
            tuple(images.get(current[s.id].id, ())) if s.id in current else (),
        )
        for s, study in rows
    ]


def result_instance_path(session: Session, result_instance_id: int) -> Path | None:
    path = session.scalar(
        select(ResultInstance.path).where(ResultInstance.id == result_instance_id)
    )
    return Path(path) if path else None


def stored_bytes(session: Session) -> int:
    return int(session.scalar(select(func.coalesce(func.sum(Instance.size), 0))) or 0)
