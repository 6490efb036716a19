"""Turnaround: from the last slice acknowledged to the SR stored in Orthanc.

Usage: python bench/turnaround_bench.py [CASE_ARCHIVE_OR_FOLDER] [--repeat 3] [--device cpu]

Each run starts a fresh Orthanc (the PACS) and a fresh ``dicom-node serve`` (model loaded
before the clock starts, as in a running node), sends the case with DCMTK's storescu over one
association, and times from storescu's exit (its last C-STORE acknowledged and the association
released) until Orthanc's REST API lists the SR in the study. The node completes the series on
release (no quiet period), so the figure is completion + analysis + writing + delivery.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pydicom
from pydicom.uid import Comprehensive3DSRStorage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.analyze_bench import DEFAULT_CASE
from dicom_node.pipeline.series import unpacked
from tests.peers import NodeProcess, Orthanc, free_port, node_config, storescu, wait_for


def sr_in(pacs: Orthanc, study_uid: str) -> bool:
    for instance in pacs.instances_of_study(study_uid):
        if (
            pacs.get(f"/instances/{instance['ID']}/metadata/SopClassUid").decode()
            == Comprehensive3DSRStorage
        ):
            return True
    return False


def run_once(case: Path, work: Path, device: str) -> tuple[float, float]:
    """(seconds to send, seconds from the last acknowledgement to the SR in Orthanc)."""
    study_uid = str(
        pydicom.dcmread(next(case.rglob("*.dcm")), stop_before_pixels=True).StudyInstanceUID
    )
    pacs = Orthanc(work / "pacs").start()
    port = free_port()
    config = node_config(
        work / "node",
        port,
        workers={"device": device},
        destinations=[
            {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs.dicom_port}
        ],
    )
    node = NodeProcess(config).start(port)
    try:
        started = time.perf_counter()
        sent = storescu(port, [case])
        acknowledged = time.perf_counter()
        if sent.returncode != 0:
            raise RuntimeError(sent.stderr[-500:])
        wait_for(lambda: sr_in(pacs, study_uid), 300, "the SR in Orthanc", interval=0.05)
        return acknowledged - started, time.perf_counter() - acknowledged
    finally:
        node.stop()
        pacs.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case", nargs="?", type=Path, default=DEFAULT_CASE)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    with unpacked([args.case]) as folders, tempfile.TemporaryDirectory() as tmp:
        (case,) = folders
        print(f"{platform.node()}, {os.cpu_count()} CPUs, device {args.device}; {args.case.name}\n")
        print("| run | send s | last ack -> SR in Orthanc s |")
        print("|---|---|---|")
        turnarounds = []
        for run in range(1, args.repeat + 1):
            send_s, turnaround_s = run_once(case, Path(tmp) / f"run{run}", args.device)
            turnarounds.append(turnaround_s)
            print(f"| {run} | {send_s:.1f} | {turnaround_s:.1f} |", flush=True)
        print(f"\nmedian turnaround {statistics.median(turnarounds):.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
