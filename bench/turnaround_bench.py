"""Turnaround: from the last slice acknowledged to the SR stored in Orthanc.

Usage: python bench/turnaround_bench.py [CASE_ARCHIVE_OR_FOLDER] [--repeat 3] [--device cpu]
                                        [--prior none|pacs|held|unreachable]

Each run starts a fresh Orthanc (the PACS) and a fresh ``dicom-node serve`` (model loaded
before the clock starts, as in a running node), sends the case with DCMTK's storescu over one
association, and times from storescu's exit (its last C-STORE acknowledged and the association
released) until Orthanc's REST API lists the SR in the study. The node completes the series on
release (no quiet period), so the figure is completion + analysis + writing + delivery.

With ``--prior`` the node compares with a prior made from the case (re-sliced after a rigid
move, a year earlier, same patient: ``dicom_node.lab.priors``): ``pacs``, the prior only in
Orthanc, found by C-FIND and fetched by C-MOVE; ``held``, the prior sent to the node and
analyzed before the clock starts; ``unreachable``, a query/retrieve peer that accepts the
connection and never answers (``priors.timeout_seconds`` 10).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom
from pydicom.uid import Comprehensive3DSRStorage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.analyze_bench import DEFAULT_CASE
from dicom_node.lab.priors import write_series_like
from dicom_node.pipeline.series import read_series, unpacked
from inference.lab.experiments import seeded
from inference.lab.priors import repositioned
from tests.peers import NodeProcess, Orthanc, free_port, node_config, storescu, wait_for


def sr_in(pacs: Orthanc, study_uid: str) -> bool:
    for instance in pacs.instances_of_study(study_uid):
        if (
            pacs.get(f"/instances/{instance['ID']}/metadata/SopClassUid").decode()
            == Comprehensive3DSRStorage
        ):
            return True
    return False


UNREACHABLE_TIMEOUT_S = 10


def run_once(
    case: Path, work: Path, device: str, prior: str = "none", prior_files: Path | None = None
) -> tuple[float, float]:
    """(seconds to send, seconds from the last acknowledgement to the SR in Orthanc)."""
    study_uid = str(
        pydicom.dcmread(next(case.rglob("*.dcm")), stop_before_pixels=True).StudyInstanceUID
    )
    port = free_port()
    modalities = {"DicomModalities": {"node": ["RESMTNET", "127.0.0.1", port]}}
    pacs = Orthanc(work / "pacs", extra=modalities).start()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    priors: dict[str, object] = {"enabled": prior != "none"}
    if prior == "pacs":
        assert prior_files is not None
        if storescu(pacs.dicom_port, [prior_files], called="ORTHANC").returncode != 0:
            raise RuntimeError("the prior could not be stored in Orthanc")
        peer = {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs.dicom_port}
        priors["peers"] = [peer]
    elif prior == "unreachable":
        peer = {
            "name": "down",
            "ae_title": "DOWN",
            "host": "127.0.0.1",
            "port": silent.getsockname()[1],
        }
        priors.update(peers=[peer], timeout_seconds=UNREACHABLE_TIMEOUT_S)
    config = node_config(
        work / "node",
        port,
        workers={"device": device},
        priors=priors,
        destinations=[
            {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs.dicom_port}
        ],
    )
    node = NodeProcess(config).start(port)
    try:
        if prior == "held":
            assert prior_files is not None
            if storescu(port, [prior_files]).returncode != 0:
                raise RuntimeError("the prior could not be sent to the node")
            prior_study = str(
                pydicom.dcmread(
                    next(prior_files.glob("*.dcm")), stop_before_pixels=True
                ).StudyInstanceUID
            )
            wait_for(lambda: sr_in(pacs, prior_study), 300, "the prior analyzed", interval=0.2)
        started = time.perf_counter()
        sent = storescu(port, [case])
        acknowledged = time.perf_counter()
        if sent.returncode != 0:
            raise RuntimeError(sent.stderr[-500:])
        wait_for(lambda: sr_in(pacs, study_uid), 300, "the SR in Orthanc", interval=0.05)
        turnaround = time.perf_counter() - acknowledged
        if prior != "none":
            compared = _compared_with(config, case)
            if compared != (prior != "unreachable"):
                raise RuntimeError(f"--prior {prior}: the report was compared: {compared}")
        return acknowledged - started, turnaround
    finally:
        node.stop()
        pacs.stop()
        silent.close()


def _compared_with(config: Path, case: Path) -> bool:
    """Whether the node's report of ``case`` was compared with a prior (else a baseline)."""
    series_uid = str(
        pydicom.dcmread(next(case.rglob("*.dcm")), stop_before_pixels=True).SeriesInstanceUID
    )
    shown = subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", "findings", series_uid, "--config", str(config)],
        capture_output=True,
        text=True,
        check=True,
    )
    return "study_instance_uid" in (json.loads(shown.stdout).get("prior") or {})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case", nargs="?", type=Path, default=DEFAULT_CASE)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prior", choices=["none", "pacs", "held", "unreachable"], default="none")
    args = parser.parse_args()
    with unpacked([args.case]) as folders, tempfile.TemporaryDirectory() as tmp:
        (case,) = folders
        prior_files = None
        if args.prior in ("pacs", "held"):
            (current,), _, _ = read_series([case])
            moved, _ = repositioned(current.volume, seeded(1, "turnaround prior"))
            prior_files = Path(tmp) / "prior"
            write_series_like(current, moved, prior_files, earlier_by_days=365)
        print(
            f"{platform.node()}, {os.cpu_count()} CPUs, device {args.device}; {args.case.name}; "
            f"prior: {args.prior}\n"
        )
        print("| run | send s | last ack -> SR in Orthanc s |")
        print("|---|---|---|")
        turnarounds = []
        for run in range(1, args.repeat + 1):
            send_s, turnaround_s = run_once(
                case, Path(tmp) / f"run{run}", args.device, args.prior, prior_files
            )
            turnarounds.append(turnaround_s)
            print(f"| {run} | {send_s:.1f} | {turnaround_s:.1f} |", flush=True)
        print(f"\nmedian turnaround {statistics.median(turnarounds):.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
