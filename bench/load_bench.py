"""Load: 8 senders at once, each sending a 300-slice CT, three rounds, delivering to Orthanc.

Usage: python bench/load_bench.py [--senders 8] [--rounds 3] [--slices 300] [--workers 1]

The node runs as three processes, as it would across machines (receiver, worker, sender; one
SQLite database, one storage folder); each round, ``--senders`` DCMTK storescu processes send
their own CT (512 x 512, 16 bit, a chest-like phantom, new UIDs each) over one association
each, at the same time. The round ends when Orthanc holds an SR for every study. Reported per
round: failed stores (storescu's exit status and the node's refusals), the ingest rate of all
senders together, the time until every SR is in the PACS; at the end, each process's peak
resident memory (VmHWM). Exits 1 if a store failed or a series was not delivered.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import Comprehensive3DSRStorage, generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.dicom_factory import SeriesSpec, ct_datasets, phantom
from tests.peers import DCMTK_ENV, NodeProcess, Orthanc, free_port, node_config, wait_for

ROLES = ("receiver", "worker", "sender")


def template(slices: int) -> list[Dataset]:
    """One 512 x 512 chest phantom with a 12 mm nodule; each sender gets it with new UIDs."""
    spec = SeriesSpec(
        slices=slices,
        rows=512,
        columns=512,
        pixel_mm=0.7,
        slice_mm=1.25,
        origin=(-179.0, -179.0, -200.0),
    )
    return ct_datasets(spec, phantom(spec, (-45.0, 10.0, -20.0)))


def write_copy(datasets: list[Dataset], folder: Path) -> tuple[str, list[Path]]:
    folder.mkdir(parents=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    paths = []
    for n, ds in enumerate(datasets):
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = folder / f"{n:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return study, paths


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def sr_count(pacs: Orthanc, studies: list[str]) -> int:
    found = 0
    for study in studies:
        classes = [
            pacs.get(f"/instances/{i['ID']}/metadata/SopClassUid").decode()
            for i in pacs.instances_of_study(study)
        ]
        found += Comprehensive3DSRStorage in classes
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--senders", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    datasets = template(args.slices)
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pacs = Orthanc(work / "pacs").start()
        port = free_port()
        config = node_config(
            work / "node",
            port,
            workers={"count": args.workers, "device": "cpu"},
            completion={"quiet_seconds": 30},
            destinations=[
                {
                    "name": "pacs",
                    "ae_title": "ORTHANC",
                    "host": "127.0.0.1",
                    "port": pacs.dicom_port,
                }
            ],
        )
        processes = {role: NodeProcess(config) for role in ROLES}
        for role, process in processes.items():
            process.log = config.with_name(f"{role}.log")
            process.start(port if role == "receiver" else None, roles=role)
        print(
            f"{platform.node()}, {os.cpu_count()} CPUs; {args.senders} senders x "
            f"{args.slices} slices x {args.rounds} rounds\n"
        )
        print(
            "| round | failed stores | ingest, all senders: instances/s | last ack -> all SRs in PACS s | series/min end to end |"
        )
        print("|---|---|---|---|---|")
        try:
            for number in range(1, args.rounds + 1):
                copies = [
                    write_copy(datasets, work / f"round{number}" / f"sender{n}")
                    for n in range(args.senders)
                ]
                os.sync()
                started = time.perf_counter()
                senders = [
                    subprocess.Popen(
                        [
                            "storescu",
                            "-aet",
                            f"CT{n}",
                            "-aec",
                            "RESMTNET",
                            "127.0.0.1",
                            str(port),
                            *map(str, paths),
                        ],
                        env=DCMTK_ENV,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE,
                    )
                    for n, (_, paths) in enumerate(copies)
                ]
                failed = sum(1 for s in senders if s.wait() != 0)
                sent = time.perf_counter()
                studies = [study for study, _ in copies]
                wait_for(
                    lambda studies=studies: sr_count(pacs, studies) == len(studies),
                    1800,
                    "every SR in the PACS",
                    interval=2.0,
                )
                done = time.perf_counter()
                refused = config.with_name("receiver.log").read_text().count("refused with 0x")
                failures += failed + refused
                instances = args.senders * args.slices
                print(
                    f"| {number} | {failed} senders, {refused} instances | "
                    f"{instances / (sent - started):.0f} | {done - sent:.0f} | "
                    f"{len(studies) / (done - started) * 60:.1f} |",
                    flush=True,
                )
            peaks = {role: peak_rss_mb(p.process.pid) for role, p in processes.items() if p.process}
        finally:
            for process in processes.values():
                if process.process is not None:
                    process.stop()
            pacs.stop()
    print(
        "\nPeak resident memory per process (VmHWM): "
        + ", ".join(f"{role} {mb:.0f} MB" for role, mb in peaks.items())
    )
    print(f"\n{'FAILED' if failures else 'OK'}: {failures} failed store(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
