"""Finding a patient's prior CT on the configured PACS and fetching it.

Only the peers in ``priors.peers`` are asked, in order, and every query and retrieve is
audited (who asked whom, for which study, with what outcome). The whole search is bounded by
``priors.timeout_seconds``: a PACS that is down makes the report a baseline reading that
says so, never a late one.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

from dicom_node.config import NodeConfig, PriorPeer
from dicom_node.fetch.query_retrieve import (
    PeerUnavailable,
    RemoteSeries,
    RemoteStudy,
    find_series,
    find_studies,
    get_series,
    move_series,
)
from dicom_node.observe.audit import AuditRecord, AuditTrail
from dicom_node.pipeline.priors import parse_da

#: Seconds kept aside from ``priors.timeout_seconds`` for ending an association that timed out.
TEARDOWN_S = 1.0


@dataclass(frozen=True)
class FetchedPrior:
    """A prior series fetched from ``peer``, ``days`` before the current one: by C-GET into
    ``folder``, or by C-MOVE into the node's own store (``moved``)."""

    folder: Path
    study_uid: str
    series_uid: str
    days: int
    peer: PriorPeer

    @property
    def moved(self) -> bool:
        return self.peer.retrieve == "move"


def choose_series(
    candidates: Sequence[RemoteSeries], patterns: Sequence[str]
) -> RemoteSeries | None:
    """The series selection would analyze, as far as a query tells: CT, a lung kernel (by its
    description) before others, then the most images (the thinnest reconstruction)."""
    ct = [s for s in candidates if s.modality == "CT" and s.instances >= 16]
    if not ct:
        return None

    def lung(series: RemoteSeries) -> bool:
        return any(re.search(p, series.description, re.IGNORECASE) for p in patterns)

    return max(ct, key=lambda s: (lung(s), s.instances))


def most_recent_dated(
    studies: Sequence[RemoteStudy], earliest: date, latest: date
) -> tuple[RemoteStudy, date] | None:
    """The most recent study whose Study Date is a date within [earliest, latest]. A PACS
    that ignores the date range, or holds a study with no or a malformed date, answers with
    studies that cannot be compared: they are passed over, never taken as the newest."""
    dated = [(s, parse_da(s.study_date)) for s in studies]
    eligible = [(s, d) for s, d in dated if d is not None and earliest <= d <= latest]
    return max(eligible, key=lambda pair: pair[1], default=None)


def fetch_prior(
    config: NodeConfig,
    patient_id: str,
    issuer: str,
    today: date,
    folder: Path,
    audit: AuditTrail | None,
    expect: Callable[[str, str, str], None],
) -> tuple[FetchedPrior | None, str]:
    """The most recent eligible prior CT found on the peers, fetched into ``folder`` (C-GET)
    or into the node's store (C-MOVE, announced first by ``expect(series_uid, study_uid,
    peer_ae)``); or None and the reason (each peer's)."""
    rules = config.priors
    latest = today - timedelta(days=rules.min_interval_days)
    earliest = today - timedelta(days=rules.max_age_days)
    date_range = f"{earliest:%Y%m%d}-{latest:%Y%m%d}"
    # Each call's network timeout leaves TEARDOWN_S for giving up on an association (the
    # abort and its threads' exit), so that the whole search stays within the setting.
    deadline = time.monotonic() + rules.timeout_seconds - TEARDOWN_S
    calling = config.node.ae_title
    reasons: list[str] = []
    for peer in rules.peers:
        remaining = deadline - time.monotonic()
        if remaining <= TEARDOWN_S:
            reasons.append(f"{peer.name}: not asked, priors.timeout_seconds spent")
            continue
        study_uid = ""
        try:
            studies = find_studies(calling, peer, patient_id, issuer, date_range, remaining)
            _audit(audit, calling, peer, "query", "success", "", f"{len(studies)} study(ies)")
            newest = most_recent_dated(studies, earliest, latest)
            if newest is None:
                reasons.append(f"{peer.name}: no CT of this patient dated {date_range}")
                continue
            study_uid, when = newest[0].study_uid, newest[1]
            remaining = max(deadline - time.monotonic(), TEARDOWN_S)
            chosen = choose_series(
                find_series(calling, peer, study_uid, remaining),
                config.selection.lung_kernel_patterns,
            )
            if chosen is None:
                reasons.append(f"{peer.name}: study {study_uid} has no CT series to compare")
                continue
            remaining = max(deadline - time.monotonic(), TEARDOWN_S)
            if peer.retrieve == "move":
                expect(chosen.series_uid, study_uid, peer.ae_title)
                count = move_series(calling, peer, study_uid, chosen.series_uid, remaining)
            else:
                count = get_series(calling, peer, study_uid, chosen.series_uid, folder, remaining)
            _audit(
                audit,
                calling,
                peer,
                "retrieve",
                "success",
                study_uid,
                f"C-{peer.retrieve.upper()}, {count} instance(s)",
            )
        except PeerUnavailable as exc:
            _audit(audit, calling, peer, "query", "failed", study_uid, str(exc))
            reasons.append(str(exc))
            continue
        return FetchedPrior(folder, study_uid, chosen.series_uid, (today - when).days, peer), ""
    return None, "; ".join(reasons) or "no query/retrieve peer is configured (priors.peers)"


def _audit(
    audit: AuditTrail | None,
    calling: str,
    peer: PriorPeer,
    event: str,
    outcome: str,
    study_uid: str,
    detail: str,
) -> None:
    if audit is not None:
        audit.record(
            AuditRecord(
                f"prior_{event}",
                outcome,
                calling_ae=calling,
                called_ae=peer.ae_title,
                host=peer.host,
                study_uid=study_uid,
                detail=f"{peer.name}: {detail}",
            )
        )
