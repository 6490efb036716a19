"""Crash safety under fault injection: SIGKILL the node's processes at random points during
ingest, analysis and delivery, restart them, and check that nothing acknowledged was lost.

Usage: python scripts/fault_injection.py [--cycles 20] [--series-size 40] [--seed 1]

A modality (pynetdicom, one association per series, instance by instance) keeps sending
small CT series; the node runs as three processes, receiver, worker and sender, on one SQLite
database and one storage folder, delivering to a real Orthanc. Each cycle waits a random time,
kills one of the three (or all) with SIGKILL and starts it again; the modality resends what
was not acknowledged, as a real one would. At the end the node is left to finish, then:

- every instance acknowledged with success is on disk and indexed, with the file's SHA-256
  equal to the index's and its pixel data equal to what was sent (lost otherwise);
- every series the modality completed has one current result whose SR is in Orthanc, and
  every SR and SEG Orthanc holds for its study is one the index knows (resends of the same SOP
  instances are allowed; an amendment, when a kill split a series, is a known result; an
  object under an unknown UID is a duplicate);
- no job is left queued, running or failed.

Prints the counts and exits 1 on any loss, duplicate or stuck job. ``tests/test_crash_safety``
runs a bounded version in CI.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import yaml
from pydicom.dataset import Dataset
from pydicom.uid import Comprehensive3DSRStorage, SegmentationStorage
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]
from sqlalchemy import create_engine, select
from sqlalchemy.orm import sessionmaker

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from storage.models import Instance, Job, Result, ResultInstance, Series
from tests.dicom_factory import SeriesSpec, ct_datasets, phantom
from tests.peers import NodeProcess, Orthanc, free_port, node_config, wait_for

ROLES = ("receiver", "worker", "sender")


@dataclass(frozen=True)
class ResultRow:
    series_id: int
    sop_uid: str
    kind: str
    current: bool


@dataclass
class Modality:
    """Sends series one association each; remembers what was acknowledged with success."""

    port: int
    size: int
    acknowledged: dict[str, Dataset] = field(default_factory=dict)
    #: Series sent in full: Series Instance UID -> Study Instance UID.
    completed: dict[str, str] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        spec = SeriesSpec(slices=self.size, rows=64, columns=64, pixel_mm=4.0, slice_mm=2.5)
        while not self.stop.is_set():
            datasets = ct_datasets(spec, phantom(spec, (-20.0, 10.0, -110.0)))
            pending = list(datasets)
            while pending and not self.stop.is_set():
                pending = self._send(pending)
                if pending:
                    time.sleep(0.5)  # the node is down: retry, as a modality does
            if not pending:
                first = datasets[0]
                self.completed[str(first.SeriesInstanceUID)] = str(first.StudyInstanceUID)

    def _send(self, datasets: list[Dataset]) -> list[Dataset]:
        """Send; return what still has to be sent (everything not acknowledged)."""
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(CTImageStorage)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        try:
            assoc = ae.associate("127.0.0.1", self.port, ae_title="RESMTNET")
        except Exception:
            return datasets
        if not assoc.is_established:
            return datasets
        left = []
        for ds in datasets:
            try:
                answer = assoc.send_c_store(ds) if assoc.is_established else None
            except Exception:
                answer = None
            if answer is not None and int(answer.get("Status", -1)) == 0:
                self.acknowledged[str(ds.SOPInstanceUID)] = ds
            else:
                left.append(ds)
        if assoc.is_established:
            assoc.release()
        return left


def _check(db: sessionmaker, modality: Modality, pacs: Orthanc) -> tuple[dict[str, int], list[str]]:
    problems = []
    with db() as session:
        indexed = {i.sop_uid: i for i in session.scalars(select(Instance))}
        series = {s.series_uid: s for s in session.scalars(select(Series))}
        result_instances = [
            ResultRow(result.series_id, instance.sop_uid, instance.kind, result.current)
            for instance, result in session.execute(
                select(ResultInstance, Result).join(Result, ResultInstance.result_id == Result.id)
            )
        ]
        jobs = list(session.scalars(select(Job)))
    lost = 0
    for uid, sent in modality.acknowledged.items():
        row = indexed.get(uid)
        path = Path(row.path) if row else None
        if row is None or path is None or not path.exists():
            lost += 1
            problems.append(
                f"instance {uid} acknowledged but {'not indexed' if row is None else 'not on disk'}"
            )
            continue
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != row.sha256:
            lost += 1
            problems.append(f"instance {uid}: file checksum differs from the index's")
        elif pydicom.dcmread(path).PixelData != sent.PixelData:
            lost += 1
            problems.append(f"instance {uid}: stored pixel data differ from what was sent")
    ours = {(r.series_id, r.sop_uid) for r in result_instances}
    current_srs = {r.series_id: r.sop_uid for r in result_instances if r.current and r.kind == "sr"}
    delivered = duplicated = 0
    for uid, study in modality.completed.items():
        row = series.get(uid)
        if row is None or row.id not in current_srs:
            problems.append(f"series {uid} sent in full but has no current result")
            continue
        in_pacs = [
            (
                i["MainDicomTags"]["SOPInstanceUID"],
                pacs.get(f"/instances/{i['ID']}/metadata/SopClassUid").decode(),
            )
            for i in pacs.instances_of_study(study)
        ]
        results_in_pacs = [
            (sop, cls)
            for sop, cls in in_pacs
            if cls in (Comprehensive3DSRStorage, SegmentationStorage)
        ]
        strangers = [sop for sop, _ in results_in_pacs if (row.id, sop) not in ours]
        if strangers:
            # A result object the index does not know: a duplicate under another UID.
            duplicated += 1
            problems.append(f"series {uid}: {len(strangers)} unknown result object(s) in the PACS")
        elif current_srs[row.id] in {sop for sop, _ in results_in_pacs}:
            delivered += 1
        else:
            problems.append(f"series {uid}: its current SR is not in the PACS")
    stuck = [j for j in jobs if j.state in ("queued", "running", "failed")]
    problems += [f"job {j.id} ({j.kind}) left {j.state}: {j.last_error}" for j in stuck]
    counts = {
        "acknowledged": len(modality.acknowledged),
        "stored": len(modality.acknowledged) - lost,
        "lost": lost,
        "series": len(modality.completed),
        "delivered": delivered,
        "duplicated": duplicated,
        "stuck jobs": len(stuck),
    }
    return counts, problems


def run(cycles: int, size: int, seed: int, work: Path) -> int:
    rng = random.Random(seed)
    pacs = Orthanc(work / "pacs").start()
    port = free_port()
    config = node_config(
        work / "node",
        port,
        workers={"count": 1, "device": "cpu", "lease_seconds": 6},
        # Long enough that a series cut by a kill is mostly finished by the resend before the
        # quiet period completes it; short enough that one whose release was lost completes.
        completion={"quiet_seconds": 20},
        sender={"backoff_seconds": 0.5, "max_backoff_seconds": 2},
        destinations=[
            {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs.dicom_port}
        ],
    )
    processes = {role: NodeProcess(config.with_name(f"{role}.yaml")) for role in ROLES}
    for role, node in processes.items():
        # One machine, one process per role: each serves its dashboard on its own port (a
        # port already taken stops a node's start).
        settings = yaml.safe_load(config.read_text())
        settings["dashboard"]["port"] = free_port()
        node.config.write_text(yaml.safe_dump(settings))
        node.log = config.with_name(f"{role}.log")

    def start(role: str) -> None:
        processes[role].start(port if role == "receiver" else None, roles=role)

    for role in ROLES:
        start(role)
    modality = Modality(port, size)
    sending = threading.Thread(target=modality.run, daemon=True)
    sending.start()
    db = sessionmaker(create_engine(f"sqlite:///{work / 'node' / 'node.db'}"))
    try:
        for cycle in range(cycles):
            time.sleep(rng.uniform(0.5, 6.0))
            victims = list(ROLES) if rng.random() < 0.25 else [rng.choice(ROLES)]
            for role in victims:
                process = processes[role].process
                assert process is not None
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
                processes[role].process = None
            print(f"cycle {cycle + 1}/{cycles}: killed {', '.join(victims)}", flush=True)
            for role in victims:
                start(role)
        modality.stop.set()
        sending.join(timeout=120)

        def settled() -> bool:
            with db() as session:
                jobs = list(session.scalars(select(Job)))
                receiving = [s for s in session.scalars(select(Series)) if s.state == "receiving"]
            done = all(j.state in ("done", "cancelled", "failed") for j in jobs)
            completed = {s.series_uid for s in receiving} & set(modality.completed)
            return done and not completed

        wait_for(settled, 600, "the node to finish its work", interval=1.0)
        counts, problems = _check(db, modality, pacs)
    finally:
        modality.stop.set()
        for node in processes.values():
            if node.process is not None:
                node.stop()
        pacs.stop()
    print(", ".join(f"{name} {value}" for name, value in counts.items()))
    for problem in problems:
        print(f"PROBLEM: {problem}")
    return 1 if problems else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--series-size", type=int, default=40)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        return run(args.cycles, args.series_size, args.seed, Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
