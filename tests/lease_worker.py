"""A worker process for the lease tests: claims the one analysis job, says so on stdout, and
works on it until it is killed (``python -m tests.lease_worker DATABASE_URL LEASE_SECONDS
[--as-node]``: with ``--as-node`` its lease is held under a node's name, ``host:pid/worker0``)."""

from __future__ import annotations

import sys
import threading

from dicom_node.config import JobSettings
from dicom_node.jobs import JobHandler, JobRunner, Lease, process_identity
from storage import queue
from storage.database import open_database
from storage.states import JobKind


class Forever(JobHandler):
    kind = JobKind.ANALYZE

    def run(self, job: queue.ClaimedJob, lease: Lease) -> None:
        print(f"claimed {job.id}", flush=True)
        threading.Event().wait()


def main(url: str, lease_seconds: float, name: str) -> None:
    db = open_database(url)
    handler = Forever(
        JobSettings(
            lease_seconds=lease_seconds, max_attempts=3, backoff_seconds=1, max_backoff_seconds=1
        )
    )
    runner = JobRunner(db, handler, name, threading.Event())
    while not runner.run_once():
        threading.Event().wait(0.05)


if __name__ == "__main__":
    as_node = sys.argv[3:] == ["--as-node"]
    main(
        sys.argv[1],
        float(sys.argv[2]),
        f"{process_identity()}/worker0" if as_node else "doomed-worker",
    )
