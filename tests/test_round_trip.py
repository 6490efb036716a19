"""End to end with real peers: storescu (modality) -> node -> Orthanc (PACS), over DICOM."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    Comprehensive3DSRStorage,
    CTImageStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)
from sqlalchemy import select

from dicom_node.analyze import analyze_paths
from dicom_node.node import Node
from inference.detector import DEFAULT_WEIGHTS
from storage.models import AuditEvent, Delivery, Job
from tests.dicom_factory import SeriesSpec, ct_datasets, phantom, write_series
from tests.peers import NodeProcess, Orthanc, free_port, node_config, storescu, wait_for

SC_CLASSES = {SecondaryCaptureImageStorage, MultiFrameTrueColorSecondaryCaptureImageStorage}


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    pacs = Orthanc(tmp_path / "pacs").start()
    yield pacs
    pacs.stop()


def _result_instances(pacs: Orthanc, study_uid: str) -> dict[str, list[dict[str, Any]]]:
    by_class: dict[str, list[dict[str, Any]]] = {}
    for instance in pacs.instances_of_study(study_uid):
        sop_class = pacs.get(f"/instances/{instance['ID']}/metadata/SopClassUid").decode()
        by_class.setdefault(sop_class, []).append(instance)
    return by_class


def _points_mm(sr: Dataset) -> list[np.ndarray]:
    """The 3D centre points (SCOORD3D POINT) of the SR's nodules, in document order."""
    found: list[np.ndarray] = []

    def walk(items: Any) -> None:
        for item in items:
            if item.get("ValueType") == "SCOORD3D" and item.GraphicType == "POINT":
                found.append(np.array(item.GraphicData, dtype=float))
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    return found


@pytest.mark.slow
def test_lidc_case_round_trip_from_storescu_to_orthanc(
    tmp_path: Path, orthanc: Orthanc, lidc_root: Path
) -> None:
    case = lidc_root / "LIDC-IDRI-0001"
    port = free_port()
    config = node_config(
        tmp_path / "node",
        port,
        destinations=[
            {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}
        ],
    )
    node = NodeProcess(config).start(port)
    try:
        sent = storescu(port, [case])
        assert sent.returncode == 0, sent.stderr
        study_uid = str(
            pydicom.dcmread(next(case.rglob("*.dcm")), stop_before_pixels=True).StudyInstanceUID
        )

        def arrived() -> dict[str, list[dict[str, Any]]] | None:
            found = _result_instances(orthanc, study_uid)
            wanted = Comprehensive3DSRStorage in found and SegmentationStorage in found
            return found if wanted and SC_CLASSES & set(found) else None

        # Each result is sent as a job of its own: the node stays up until all three are in.
        results = wait_for(arrived, 180, "SR, SEG and key images in Orthanc", interval=1.0)
    finally:
        exit_code = node.stop()
    assert exit_code == 0, node.log.read_text()[-2000:]
    # No PHI in the log at the default level: UIDs and counts, not names, IDs or birth dates.
    header = pydicom.dcmread(next(case.rglob("*.dcm")), stop_before_pixels=True)
    log_text = node.log.read_text()
    assert "analyzed" in log_text
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber"):
        value = str(header.get(keyword, "") or "").strip()
        if len(value) >= 4:
            assert value not in log_text, f"{keyword} appears in the node's log"
    (sr_instance,) = results[Comprehensive3DSRStorage]
    sr = pydicom.dcmread(io.BytesIO(orthanc.get(f"/instances/{sr_instance['ID']}/file")))
    assert sr.StudyInstanceUID == study_uid

    # The same series through `dicom-node analyze` gives the same findings.
    out = tmp_path / "analyze"
    assert analyze_paths([case], out, DEFAULT_WEIGHTS, "cpu", None) == 0
    (series,) = json.loads((out / "findings.json").read_text())["series"]
    expected = [np.array(f["center_mm"]) for f in series["findings"]]
    got = _points_mm(sr)
    assert len(got) == len(expected) >= 1
    for a, b in zip(got, expected, strict=True):
        assert np.linalg.norm(a - b) < 0.5


def _with_destination(start_node: Any, destination: dict[str, Any], **sender: Any) -> Node:
    """A node sending to one destination, retrying fast (0.5 s doubling to 2 s)."""
    node: Node = start_node(
        destinations=[{"name": "pacs", "host": "127.0.0.1", **destination}],
        sender={"backoff_seconds": 0.5, "max_backoff_seconds": 2, **sender},
    )
    return node


def _send_phantom(node: Node, folder: Path) -> str:
    spec = SeriesSpec()
    datasets = ct_datasets(spec, phantom(spec, (-40.0, 10.0, -90.0)))
    assert storescu(node.config.node.port, write_series(folder, datasets)).returncode == 0
    return str(datasets[0].StudyInstanceUID)


def _deliver_jobs(node: Node) -> list[Job]:
    with node.db() as session:
        return list(session.scalars(select(Job).where(Job.kind == "deliver")))


@pytest.mark.slow
def test_results_reach_a_destination_that_comes_up_late_exactly_once(
    tmp_path: Path, start_node: Any
) -> None:
    pacs = Orthanc(tmp_path / "pacs")  # ports chosen, not yet listening
    try:
        node = _with_destination(start_node, {"ae_title": "ORTHANC", "port": pacs.dicom_port})
        study_uid = _send_phantom(node, tmp_path / "ct")
        wait_for(
            lambda: any(j.last_error for j in _deliver_jobs(node)), 120, "a failed delivery attempt"
        )
        pacs.start()
        wait_for(
            lambda: [j.state for j in _deliver_jobs(node)] == ["done"], 60, "delivery after start"
        )
        sent = _result_instances(pacs, study_uid)
        assert set(sent) >= {Comprehensive3DSRStorage, SegmentationStorage}
        assert all(
            len(v) == 1
            for k, v in sent.items()
            if k in {Comprehensive3DSRStorage, SegmentationStorage}
        )
        sop_uids = [i["MainDicomTags"]["SOPInstanceUID"] for v in sent.values() for i in v]
        assert len(sop_uids) == len(set(sop_uids))
        with node.db() as session:
            deliveries = [
                (e.outcome, e.called_ae, e.study_uid)
                for e in session.scalars(select(AuditEvent).where(AuditEvent.event == "delivery"))
            ]
        assert deliveries[0][0] == "failed" and deliveries[-1] == ("success", "ORTHANC", study_uid)
    finally:
        pacs.stop()


@pytest.mark.slow
def test_a_refusing_destination_is_dead_lettered_with_the_reason(
    tmp_path: Path, orthanc: Orthanc, start_node: Any
) -> None:
    node = _with_destination(
        start_node, {"ae_title": "NOTORTHANC", "port": orthanc.dicom_port}, max_attempts=2
    )
    _send_phantom(node, tmp_path / "ct")
    wait_for(lambda: [j.state for j in _deliver_jobs(node)] == ["failed"], 120, "the dead letter")
    (job,) = _deliver_jobs(node)
    assert job.attempts == 2 and "rejected the association" in job.last_error
    config = str(tmp_path / "node0" / "config.yaml")
    listed = subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", "jobs", "--state", "failed", "--config", config],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "rejected the association" in listed.stdout
    retried = subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", "retry", str(job.id), "--config", config],
        capture_output=True,
        text=True,
        check=False,
    )
    assert retried.returncode == 0
    wait_for(lambda: _deliver_jobs(node)[0].attempts >= 1, 30, "the retried job running again")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", *args], capture_output=True, text=True, check=False
    )


@pytest.mark.slow
def test_return_to_sender_then_an_operator_resend_keeps_one_copy(
    tmp_path: Path, orthanc: Orthanc, start_node: Any
) -> None:
    # The "scanner" here is Orthanc's AE title on this host: results go back where they came
    # from, and only the object types this destination asks for.
    node = _with_destination(
        start_node, {"return_to_sender": True, "port": orthanc.dicom_port, "objects": ["sr", "seg"]}
    )
    spec = SeriesSpec()
    datasets = ct_datasets(spec, phantom(spec, (-40.0, 10.0, -90.0)))
    files = write_series(tmp_path / "ct", datasets)
    assert storescu(node.config.node.port, files, calling="ORTHANC").returncode == 0
    study_uid = str(datasets[0].StudyInstanceUID)
    wait_for(lambda: [j.state for j in _deliver_jobs(node)] == ["done"], 120, "delivery")
    before = _result_instances(orthanc, study_uid)
    assert (
        Comprehensive3DSRStorage in before
        and SegmentationStorage in before
        and not SC_CLASSES & set(before)
    )

    config = str(tmp_path / "node0" / "config.yaml")
    resent = _cli("resend", str(datasets[0].SeriesInstanceUID), "--config", config)
    assert resent.returncode == 0, resent.stderr
    sent_instances = sum(len(v) for k, v in before.items() if k != CTImageStorage)
    wait_for(
        lambda: (
            [j.state for j in _deliver_jobs(node)] == ["done", "done"]
            and _delivered(node) == sent_instances
        ),
        60,
        "the resend",
    )
    after = _result_instances(orthanc, study_uid)
    assert {k: len(v) for k, v in after.items()} == {k: len(v) for k, v in before.items()}

    status = _cli("status", "--config", config)
    assert status.returncode == 0 and "1 analyzed" in status.stdout
    unknown = _cli("resend", "1.2.3.4", "--config", config)
    assert unknown.returncode == 2 and "no series 1.2.3.4" in unknown.stderr


def _delivered(node: Node) -> int:
    with node.db() as session:
        return len(session.scalars(select(Delivery)).all())
