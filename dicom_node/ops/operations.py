"""What an operator asks of a running node's database: status, jobs, retry, resend, findings.

These read and write the same database the node uses, so they work from any machine that
reaches it, whether or not the node is running.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import NodeConfig
from dicom_node.pipeline.results import ResultRecord
from storage import index, queue
from storage.audit import recent_events
from storage.models import Series
from storage.states import JobKind, JobState


def status_lines(db: sessionmaker[Session]) -> list[str]:
    with db() as session:
        totals = index.totals(session)
        states = index.series_states(session)
        jobs = queue.counts(session)
    lines = ["stored: " + ", ".join(f"{n} {name}" for name, n in totals.items())]
    lines.append(
        "series: " + (", ".join(f"{n} {state}" for state, n in sorted(states.items())) or "none")
    )
    for kind in JobKind:
        by_state = {state: n for (k, state), n in jobs.items() if k == kind}
        shown = ", ".join(f"{by_state.get(state, 0)} {state}" for state in JobState)
        lines.append(f"{kind} jobs: {shown}")
    return lines


def job_lines(db: sessionmaker[Session], state: JobState | None, limit: int) -> list[str]:
    with db() as session:
        jobs = queue.recent(session, limit=limit, state=state)
        uids = dict(
            session.execute(
                select(Series.id, Series.series_uid).where(
                    Series.id.in_({job.series_id for job in jobs})
                )
            ).all()
        )
    lines = [
        f"{'id':>6} {'kind':<8} {'state':<8} {'tries':>5} {'updated':<19} series -> destination"
    ]
    for job in jobs:
        target = f" -> {job.destination}" if job.destination else ""
        lines.append(
            f"{job.id:>6} {job.kind:<8} {job.state:<8} {job.attempts:>2}/{job.max_attempts:<2} "
            f"{job.updated:%Y-%m-%d %H:%M:%S} {uids.get(job.series_id, '?')}{target}"
        )
        if job.last_error:
            lines.append(f"{'':>6} last error: {job.last_error}")
    return lines


def audit_lines(db: sessionmaker[Session], limit: int) -> list[str]:
    with db() as session:
        events = recent_events(session, limit)
    lines = [
        f"{'at (UTC)':<19} {'event':<16} {'outcome':<8} calling -> called @ host  study  detail"
    ]
    for e in events:
        study = f" {e.study_uid}" if e.study_uid else ""
        lines.append(
            f"{e.at:%Y-%m-%d %H:%M:%S} {e.event:<16} {e.outcome:<8} "
            f"{e.calling_ae or '-'} -> {e.called_ae or '-'} @ {e.host or '-'}{study}  {e.detail}"
        )
    return lines


def retry_job(db: sessionmaker[Session], job_id: int) -> bool:
    with db.begin() as session:
        return queue.retry(session, job_id)


def resend_series(db: sessionmaker[Session], config: NodeConfig, series_uid: str) -> int:
    """Send the series' current results again to every destination (same SOP instances).
    Returns the number of delivery jobs queued; raises KeyError for an unknown series."""
    with db.begin() as session:
        series = index.series_by_uid(session, series_uid)
        if series is None:
            raise KeyError(f"no series {series_uid} in the index")
        if index.current_result(session, series.id) is None:
            raise KeyError(f"series {series_uid} has no results to send (state {series.state})")
        index.forget_deliveries(session, series.id)
        for destination in config.destinations:
            queue.enqueue(
                session,
                JobKind.DELIVER,
                series.id,
                destination=destination.name,
                max_attempts=config.sender.max_attempts,
                priority=1,
            )
        return len(config.destinations)


def series_findings(db: sessionmaker[Session], series_uid: str) -> dict[str, object]:
    """The series' entry as ``analyze`` writes it in findings.json, from its current result.
    Raises KeyError with the reason when there is none."""
    with db() as session:
        series = index.series_by_uid(session, series_uid)
        if series is None:
            raise KeyError(f"series {series_uid} is not held by this node")
        stored = index.current_findings_json(session, series.id)
        if stored is None:
            raise KeyError(f"series {series_uid} has no result ({series.state}: {series.reason})")
        study_uid = index.study_uid_of(session, series.id)
    record = ResultRecord.from_json(stored)
    return {
        "series_instance_uid": series_uid,
        "study_instance_uid": study_uid,
        "status": "analyzed",
        "timings_s": record.timings_s,
        "candidates": record.candidates,
        **record.findings_entry(),
    }
