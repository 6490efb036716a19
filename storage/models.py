"""The index: what was received, what was asked of the model, what it produced, where that went.

Patients -> studies -> series -> instances mirror the DICOM information model. A series is
analyzed by a job; one run of the model is a result; its SR, SEG and key images are result
instances; each of those sent to a destination is a delivery. Schema changes go through the
Alembic migrations in ``storage/migrations`` (never ``create_all`` on a live database).
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from storage.states import JobKind, JobState, SeriesState

UID = String(64)


def _states(enum: type[StrEnum]) -> Enum:
    """A state column: the enum's values in a VARCHAR(16), as the migrations create it (no
    database enum type, no CHECK constraint: a new state needs no schema change)."""
    return Enum(
        enum,
        native_enum=False,
        create_constraint=False,
        length=16,
        values_callable=lambda members: [m.value for m in members],
    )


def utcnow() -> datetime:
    """Naive UTC: stored the same way by SQLite and PostgreSQL, compared without surprises."""
    return datetime.now(UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Patient(Base):
    __tablename__ = "patients"
    __table_args__ = (UniqueConstraint("patient_id", "issuer", name="uq_patient"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64))
    issuer: Mapped[str] = mapped_column(String(64), default="")
    name: Mapped[str] = mapped_column(String(324), default="")


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(UID, unique=True)
    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id"))
    accession_number: Mapped[str] = mapped_column(String(16), default="", index=True)
    study_date: Mapped[str] = mapped_column(String(8), default="")
    description: Mapped[str] = mapped_column(String(64), default="")


class Series(Base):
    """One received series. ``version`` counts instances received; the job that analyzes it
    records the version it saw, so an instance arriving later asks for a fresh analysis."""

    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_uid: Mapped[str] = mapped_column(UID, unique=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    modality: Mapped[str] = mapped_column(String(16), default="")
    description: Mapped[str] = mapped_column(String(64), default="")
    convolution_kernel: Mapped[str] = mapped_column(String(64), default="")
    #: Who sent it and from where (for selection rules and "return to sender").
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    peer_host: Mapped[str] = mapped_column(String(64), default="")
    version: Mapped[int] = mapped_column(Integer, default=0)
    first_received: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    last_received: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    state: Mapped[SeriesState] = mapped_column(
        _states(SeriesState), default=SeriesState.RECEIVING, index=True
    )
    #: The version the state refers to; behind ``version`` when new instances arrived since.
    state_version: Mapped[int] = mapped_column(Integer, default=0)
    reason: Mapped[str] = mapped_column(Text, default="")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_uid: Mapped[str] = mapped_column(UID, unique=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax: Mapped[str] = mapped_column(UID, default="")
    instance_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    #: Position along the slice normal (mm), for the "complete, regular volume" check.
    position_mm: Mapped[float | None] = mapped_column(Float, nullable=True)
    slice_thickness_mm: Mapped[float | None] = mapped_column(Float, nullable=True)
    images_in_acquisition: Mapped[int | None] = mapped_column(Integer, nullable=True)
    image_type: Mapped[str] = mapped_column(String(128), default="")
    frames: Mapped[int] = mapped_column(Integer, default=1)
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    received: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Job(Base):
    """A unit of queued work: ``analyze`` a series, or ``deliver`` its results to one
    destination. Owned by ``storage.queue``, which holds every statement that touches it."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_claim", "kind", "state", "run_after"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[JobKind] = mapped_column(_states(JobKind))
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64), default="")
    state: Mapped[JobState] = mapped_column(_states(JobState), default=JobState.QUEUED)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    run_after: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    lease_expires: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    worker: Mapped[str] = mapped_column(String(128), default="")
    series_version: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str] = mapped_column(Text, default="")
    #: What a running job is doing now (reading, detecting, ...), for the dashboard.
    stage: Mapped[str] = mapped_column(String(32), default="")
    created: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Result(Base):
    """One run of the model on a series. Only the newest is ``current``; an amended run
    reuses the output series and tracking UIDs of the one it replaces."""

    __tablename__ = "results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), nullable=True)
    series_version: Mapped[int] = mapped_column(Integer)
    current: Mapped[bool] = mapped_column(Boolean, default=True)
    nodules: Mapped[int] = mapped_column(Integer)
    #: The findings as ``findings.json`` writes them, plus the tracking UIDs and output series.
    findings_json: Mapped[str] = mapped_column(Text)
    model_sha256: Mapped[str] = mapped_column(String(64))
    created: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class FetchedPrior(Base):
    """A series the node asked a PACS to send by C-MOVE as a prior for comparison: when it
    arrives it is read by the comparison that asked for it, never analyzed or reported on
    its own (its results would land in the old study)."""

    __tablename__ = "fetched_priors"

    series_uid: Mapped[str] = mapped_column(UID, primary_key=True)
    study_uid: Mapped[str] = mapped_column(UID)
    #: The AE title the instances must come from (the peer asked).
    peer_ae: Mapped[str] = mapped_column(String(16))
    requested: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    #: What the comparison found in it (a result record without result objects), so that a
    #: later comparison with the same prior reuses it instead of fetching and reading again.
    findings_json: Mapped[str | None] = mapped_column(Text, nullable=True)


class ResultInstance(Base):
    __tablename__ = "result_instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id"), index=True)
    sop_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    #: sr, seg or key_images: what a destination's ``objects`` selects.
    kind: Mapped[str] = mapped_column(String(16))
    path: Mapped[str] = mapped_column(Text)


class Delivery(Base):
    """A result instance acknowledged by a destination. Written only after the peer's
    success status, so a resend after a crash sends the same instance again, never a new one."""

    __tablename__ = "deliveries"
    __table_args__ = (UniqueConstraint("result_instance_id", "destination", name="uq_delivery"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_instance_id: Mapped[int] = mapped_column(ForeignKey("result_instances.id"))
    destination: Mapped[str] = mapped_column(String(64))
    status: Mapped[int] = mapped_column(Integer)
    delivered: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class AuditEvent(Base):
    """Who did what with patient data, in the IHE ATNA spirit: every association (accepted or
    not), what each one stored, every delivery. UIDs and counts only, never names or IDs."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    #: association, connection, instances-stored, identity-conflict, delivery, prior_query,
    #: prior_retrieve.
    event: Mapped[str] = mapped_column(String(32), index=True)
    #: success, refused, failed; first-kept (an instance received again with another data set).
    outcome: Mapped[str] = mapped_column(String(16))
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    called_ae: Mapped[str] = mapped_column(String(16), default="")
    host: Mapped[str] = mapped_column(String(64), default="")
    study_uid: Mapped[str] = mapped_column(UID, default="")
    detail: Mapped[str] = mapped_column(Text, default="")
