"""Which prior a series analyzed by the node is compared with, and from where: one of the
patient's earlier series it holds and analyzed (what it found there reused), else one found
on the query/retrieve peers (``dicom_node.fetch``). A reading without one is a baseline that
says why."""

from __future__ import annotations

import tempfile
from datetime import date
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import NodeConfig
from dicom_node.fetch.priors import FetchedPrior, fetch_prior
from dicom_node.observe.audit import AuditTrail
from dicom_node.pipeline.priors import (
    PriorOutcome,
    parse_da,
    patient_of,
    read_against_prior,
    study_date,
    within_interval,
)
from dicom_node.pipeline.results import ResultRecord
from dicom_node.pipeline.series import (
    CTSeries,
    SeriesRejected,
    load_series,
    read_series,
    read_stored,
)
from inference.detector import DetectionResult, NoduleDetector
from storage import index


class PriorSearch:
    """One per analysis worker: the node's database, its rules and peers, and the detector
    that reads a fetched prior."""

    def __init__(
        self,
        db: sessionmaker[Session],
        config: NodeConfig,
        detector: NoduleDetector,
        audit: AuditTrail | None,
    ) -> None:
        self.db = db
        self.config = config
        self.detector = detector
        self.audit = audit

    def outcome(self, series_id: int, series: CTSeries, detection: DetectionResult) -> PriorOutcome:
        """Compare with the most recent eligible earlier series of the patient that this node
        holds and analyzed, reusing what it found there; a baseline reading says why not."""
        today = study_date(series)
        if today is None:
            return PriorOutcome.baseline(
                detection.findings, "the series has no valid Study Date (0008,0020)"
            )
        with self.db() as session:
            earlier = index.earlier_analyzed_series(session, series_id)
            files = {e.series_id: index.instances_of(session, e.series_id) for e in earlier}
        reasons = []
        for candidate in earlier:
            when = parse_da(candidate.study_date)
            days = (today - when).days if when else -1
            if not within_interval(days, self.config.priors):
                reasons.append(f"{candidate.study_uid}: {days} days earlier")
                continue
            stored, missing = read_stored(
                [Path(i.path) for i in files[candidate.series_id]], candidate.series_uid
            )
            if missing or not stored.datasets:
                reasons.append(f"{candidate.study_uid}: its images are no longer held")
                continue
            try:
                prior = load_series(stored, self.config.eligibility)
            except SeriesRejected as exc:
                reasons.append(f"{candidate.study_uid}: {exc}")
                continue
            found = ResultRecord.from_json(candidate.findings_json).findings
            return read_against_prior(self.detector, series, detection, prior, days, found)
        if self.config.priors.peers:
            return self._from_peers(series, detection, today, reasons)
        why = "; ".join(reasons) or "no earlier CT of this patient analyzed here"
        return PriorOutcome.baseline(detection.findings, f"no eligible prior: {why}")

    def _from_peers(
        self, series: CTSeries, detection: DetectionResult, today: date, reasons: list[str]
    ) -> PriorOutcome:
        """Ask the query/retrieve peers for a prior, fetch it into a folder of its own that
        is deleted afterwards, and read against it: its results stay here, unsent."""
        patient, issuer = patient_of(series)
        if not patient:
            return PriorOutcome.baseline(detection.findings, "the series has no Patient ID")
        root = Path(self.config.storage.path)
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".prior-", dir=root) as folder:
            fetched, why = fetch_prior(
                self.config, patient, issuer, today, Path(folder), self.audit, self._expect
            )
            if fetched is None:
                held = "; ".join(reasons) or "none held here"
                return PriorOutcome.baseline(
                    detection.findings, f"no eligible prior ({held}; peers: {why})"
                )
            prior, reason = self._moved(fetched) if fetched.moved else self._got(fetched)
            if prior is None:
                return PriorOutcome.baseline(
                    detection.findings,
                    f"the prior {fetched.series_uid} from {fetched.peer.name} cannot be read: "
                    f"{reason}",
                )
            if patient_of(prior) != (patient, issuer):
                return PriorOutcome.baseline(
                    detection.findings,
                    f"{fetched.peer.name} sent series {fetched.series_uid} of another patient: "
                    "refused",
                )
            outcome = read_against_prior(self.detector, series, detection, prior, fetched.days)
            if fetched.moved and outcome.time_point.follow_up:
                self._remember(fetched.series_uid, outcome)
            return outcome

    def _remember(self, series_uid: str, outcome: PriorOutcome) -> None:
        """Keep what was found in a moved prior (it stays held): the next comparison with it
        reuses that, as for a series the node analyzed. A prior got by C-GET is not kept."""
        record = ResultRecord(
            findings=outcome.prior_findings,
            tracking_uids=("",) * len(outcome.prior_findings),  # no result objects of its own
            output_series={},
            candidates=0,
            timings_s={},
        )
        with self.db.begin() as session:
            index.remember_prior_findings(session, series_uid, record.to_json())

    def _expect(self, series_uid: str, study_uid: str, peer_ae: str) -> None:
        with self.db.begin() as session:
            index.expect_prior(session, series_uid, study_uid, peer_ae)

    def _got(self, fetched: FetchedPrior) -> tuple[CTSeries | None, str]:
        found, rejected, _ = read_series([fetched.folder], self.config.eligibility)
        prior = next((p for p in found if p.series_instance_uid == fetched.series_uid), None)
        return prior, rejected.get(fetched.series_uid, "no readable CT series arrived")

    def _moved(self, fetched: FetchedPrior) -> tuple[CTSeries | None, str]:
        """The moved series from the node's own store; only what came from the peer asked."""
        with self.db() as session:
            row = index.series_by_uid(session, fetched.series_uid)
            if row is None:
                return None, "nothing arrived (does the PACS know this node's AE title?)"
            if row.calling_ae != fetched.peer.ae_title:
                return None, f"it was sent by {row.calling_ae!r}, not {fetched.peer.ae_title!r}"
            paths = [Path(i.path) for i in index.instances_of(session, row.id)]
        stored, missing = read_stored(paths, fetched.series_uid)
        if missing:
            return None, f"{len(missing)} of its instances have no file"
        try:
            return load_series(stored, self.config.eligibility), ""
        except SeriesRejected as exc:
            return None, str(exc)
