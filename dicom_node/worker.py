"""The analysis worker: claim a series, run Res-MTNet on it, store the results, queue delivery.

The model is loaded once per worker and kept. A series the engine cannot read (geometry,
modality, undecodable pixels) is a decision, not a failure: it is marked ``rejected`` with the
reason and not retried. Anything else is a failure, retried with backoff, then dead-lettered.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import metrics
from dicom_node.analyze import Amendment, ResultObjects, build_results
from dicom_node.config import NodeConfig
from dicom_node.series import CTSeries, SeriesFiles, SeriesRejected, load_series
from inference.detector import NoduleDetector
from storage import index, queue
from storage.files import FileStore
from storage.models import Result, Series

log = logging.getLogger(__name__)

ANALYSIS_BACKOFF = queue.Backoff(base_seconds=15.0, max_seconds=600.0)


def _read_stored(paths: list[Path], series_uid: str) -> tuple[SeriesFiles, list[Path]]:
    """The series' files, and the indexed paths that have no file."""
    files, missing = SeriesFiles(series_uid), []
    for path in paths:
        try:
            files.datasets.append((path, pydicom.dcmread(path, defer_size="1 KB")))
        except FileNotFoundError:
            missing.append(path)
    return files, missing


def _amendment(result: Result | None) -> Amendment | None:
    """What the series' current result must hand on to its replacement."""
    if result is None:
        return None
    record = json.loads(result.findings_json)
    sr_path = Path(record["files"]["sr"][0])
    tracked = [
        (tuple(finding["center_mm"]), uid)
        for finding, uid in zip(record["findings"], record["tracking_uids"], strict=True)
    ]
    return Amendment(
        pydicom.dcmread(sr_path),
        dict(record["output_series"]),
        tracked,
    )


def _encode(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


class AnalysisWorker:
    def __init__(
        self,
        db: sessionmaker[Session],
        config: NodeConfig,
        detector: NoduleDetector,
        results: FileStore,
        name: str,
        stopping: threading.Event,
    ) -> None:
        self.db = db
        self.config = config
        self.detector = detector
        self.results = results
        self.name = name
        self.stopping = stopping

    def run_once(self) -> bool:
        """Process one job if one is ready; return whether there was one."""
        with self.db.begin() as session:
            job = queue.claim(session, "analyze", self.name, self.config.workers.lease_seconds)
        if job is None:
            return False
        started, outcome = time.monotonic(), "failed"
        try:
            self._analyze(job)
            outcome = "success"
        except queue.HandedBack:
            outcome = "handed_back"
            with self.db.begin() as session:
                queue.hand_back(session, job)
            log.info("analysis job %d handed back: the node is stopping", job.id)
        except Exception as exc:
            log.exception("analysis job %d failed (attempt %d)", job.id, job.attempts)
            reason = f"{exc.__class__.__name__}: {exc}"
            with self.db.begin() as session:
                state = queue.fail(session, job, reason, ANALYSIS_BACKOFF)
                if state == queue.FAILED:
                    index.settle_analysis(
                        session, job.series_id, job.series_version, "failed", reason
                    )
        finally:
            metrics.JOB_SECONDS.labels("analyze", outcome).observe(time.monotonic() - started)
        return True

    def _stage(self, job: queue.ClaimedJob, stage: str) -> None:
        with self.db.begin() as session:
            queue.set_stage(session, job, stage)

    def _analyze(self, job: queue.ClaimedJob) -> None:
        self._stage(job, "reading the series")
        with self.db() as session:
            series_row = session.get_one(Series, job.series_id)
            paths = [Path(i.path) for i in index.instances_of(session, job.series_id)]
            amends = _amendment(index.current_result(session, job.series_id))
        stored, missing = _read_stored(paths, series_row.series_uid)
        if missing:
            with self.db.begin() as session:
                index.forget_instances(session, job.series_id, missing)
            log.warning(
                "series %s: %d indexed instance(s) had no file (a crash before their "
                "acknowledgement); removed from the index, analyzing the rest",
                series_row.series_uid,
                len(missing),
            )
        try:
            series = load_series(stored, self.config.eligibility)
        except SeriesRejected as exc:
            log.info("series %s rejected: %s", series_row.series_uid, exc)
            with self.db.begin() as session:
                index.settle_analysis(
                    session, job.series_id, job.series_version, "rejected", str(exc)
                )
                queue.complete(session, job)
            return
        if self.stopping.is_set():  # the analysis would outlast the stop's grace period
            raise queue.HandedBack
        self._stage(job, "detecting nodules")
        with metrics.MODEL_SECONDS.time():
            detection = self.detector.detect(series.volume)
        self._stage(job, "writing SR, SEG, key images")
        objects = build_results(series, detection.findings, self.detector.info, amends)
        files = self._store(series, objects)
        record: dict[str, Any] = {
            "findings": [f.to_json() for f in detection.findings],
            "tracking_uids": objects.tracking_uids,
            "output_series": objects.series_uids(),
            "candidates": detection.candidates,
            "timings_s": detection.timings_s,
            "amends": str(amends.previous_sr.SOPInstanceUID) if amends else None,
            "files": {
                kind: [str(f.path) for f in files if f.kind == kind]
                for kind in ("sr", "seg", "key_images")
            },
        }
        with self.db.begin() as session:
            index.save_result(
                session,
                job.series_id,
                job.id,
                job.series_version,
                record,
                self.detector.info.weights_sha256,
                files,
            )
            for destination in self.config.destinations:
                queue.enqueue(
                    session,
                    "deliver",
                    job.series_id,
                    destination=destination.name,
                    max_attempts=self.config.sender.max_attempts,
                )
            index.settle_analysis(
                session,
                job.series_id,
                job.series_version,
                "analyzed",
                f"{len(detection.findings)} nodule(s)",
            )
            if not queue.complete(session, job):
                raise RuntimeError("lease lost while analyzing; results discarded")
        log.info(
            "series %s analyzed: %d nodule(s)%s",
            series.series_instance_uid,
            len(detection.findings),
            " (amends the earlier report)" if amends else "",
        )

    def _store(self, series: CTSeries, objects: ResultObjects) -> list[index.ResultFile]:
        files = []
        for kind, ds in objects.by_kind():
            stored = self.results.store(
                series.study_instance_uid,
                str(ds.SeriesInstanceUID),
                str(ds.SOPInstanceUID),
                _encode(ds),
            )
            files.append(
                index.ResultFile(str(ds.SOPInstanceUID), str(ds.SOPClassUID), kind, stored.path)
            )
        return files
