"""The audit trail's rows: written once, never updated, read by operators and auditors."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.models import AuditEvent


def record_event(
    session: Session,
    event: str,
    outcome: str,
    calling_ae: str = "",
    called_ae: str = "",
    host: str = "",
    study_uid: str = "",
    detail: str = "",
) -> None:
    session.add(
        AuditEvent(
            event=event,
            outcome=outcome,
            calling_ae=calling_ae[:16],
            called_ae=called_ae[:16],
            host=host[:64],
            study_uid=study_uid[:64],
            detail=detail,
        )
    )


def recent_events(session: Session, limit: int = 50, event: str = "") -> list[AuditEvent]:
    """The newest events first; with ``event``, only events of that kind."""
    query = select(AuditEvent)
    if event:
        query = query.where(AuditEvent.event == event)
    return list(session.scalars(query.order_by(AuditEvent.id.desc()).limit(limit)))
