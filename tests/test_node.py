"""The node in one process against DCMTK's storescu: store, statuses, completion, re-analysis."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, MRImageStorage  # type: ignore[attr-defined]
from sqlalchemy import select

from dicom_node.dimse import StoreStatus
from dicom_node.jobs import JobRunner
from dicom_node.node import Node
from dicom_node.pipeline.worker import AnalysisWorker
from dicom_node.receive.handlers import receive_exactly
from inference.detector import DEFAULT_WEIGHTS, NoduleDetector
from storage import index, queue
from storage.models import Instance, Result, Series
from tests.dicom_factory import SeriesSpec, ct_datasets, multiframe_ct, phantom, write_series
from tests.peers import storescu, wait_for


def _series(folder: Path, spec: SeriesSpec | None = None) -> list[Path]:
    spec = spec or SeriesSpec()
    return write_series(folder, ct_datasets(spec, phantom(spec, (-40.0, 10.0, -90.0))))


def _rows(node: Node, model: Any) -> list[Any]:
    with node.db() as session:
        return list(session.scalars(select(model)))


def _state(node: Node) -> str:
    (series,) = _rows(node, Series)
    return str(series.state)


def test_store_is_durable_indexed_and_once_per_sop_instance(
    start_node: Any, tmp_path: Path
) -> None:
    node = start_node(workers={"count": 0}, completion={"quiet_seconds": 600})
    files = _series(tmp_path / "ct")
    port = node.config.node.port
    first = storescu(port, files)
    again = storescu(port, files[:10])
    assert first.returncode == 0 and again.returncode == 0, first.stderr + again.stderr
    instances = _rows(node, Instance)
    assert len(instances) == len(files)
    on_disk = sorted(Path(node.config.storage.path, "instances").rglob("*.dcm"))
    assert len(on_disk) == len(files)
    sent = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files}
    assert {i.sop_uid for i in instances} == sent
    assert all(Path(i.path).stat().st_mode & 0o077 == 0 for i in instances)
    (series,) = _rows(node, Series)
    assert series.version == len(files) and series.calling_ae == "SCANNER"


def _send(port: int, datasets: list[Dataset], sop_class: str = CTImageStorage) -> list[int]:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(sop_class)
    assoc = ae.associate("127.0.0.1", port, ae_title="RESMTNET")
    assert assoc.is_established
    codes = []
    for ds in datasets:
        answer = assoc.send_c_store(ds)
        codes.append(int(answer.Status) if answer else -1)
    assoc.release()
    return codes


def test_bad_instances_get_a_specific_status_and_the_node_keeps_serving(start_node: Any) -> None:
    node = start_node(workers={"count": 0}, completion={"quiet_seconds": 600})
    spec = SeriesSpec(slices=3)
    good, bad_uid, no_study = ct_datasets(spec, phantom(spec, None))
    bad_uid.SOPInstanceUID = "1.2.3.abc"
    del no_study.StudyInstanceUID
    codes = _send(node.config.node.port, [bad_uid, no_study, good])
    assert codes == [
        StoreStatus.CANNOT_UNDERSTAND,
        StoreStatus.MISSING_ATTRIBUTE,
        StoreStatus.SUCCESS,
    ]
    assert [i.sop_uid for i in _rows(node, Instance)] == [good.SOPInstanceUID]


def test_other_sop_classes_are_refused_by_default(start_node: Any) -> None:
    node = start_node(workers={"count": 0})
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(MRImageStorage)
    assoc = ae.associate("127.0.0.1", node.config.node.port, ae_title="RESMTNET")
    try:
        assert not assoc.accepted_contexts  # nothing to send MR on
    finally:
        if assoc.is_established:
            assoc.release()


def test_a_wrong_called_ae_title_is_rejected(start_node: Any) -> None:
    node = start_node(workers={"count": 0})
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.config.node.port, ae_title="SOMEONEELSE")
    assert assoc.is_rejected


def test_complete_series_is_queued_on_release(start_node: Any, tmp_path: Path) -> None:
    node = start_node(workers={"count": 0}, completion={"quiet_seconds": 600})
    assert storescu(node.config.node.port, _series(tmp_path / "ct")).returncode == 0
    wait_for(lambda: _state(node) == "queued", 10, "completion on release")
    with node.db() as session:
        assert queue.counts(session) == {("analyze", "queued"): 1}


def test_a_release_reported_after_its_connection_closed_still_completes_the_series(
    start_node: Any, tmp_path: Path
) -> None:
    """pynetdicom reports the connection's close (on the transport's thread) and the release
    (on the association's) in either order; here the release waits until the close is told."""
    node = start_node(workers={"count": 0}, completion={"quiet_seconds": 600})
    closed = threading.Event()
    released = node.handlers.on_released

    def after_the_close(event: Any) -> None:
        assert closed.wait(10)
        released(event)

    node.server.unbind(evt.EVT_RELEASED, released)
    node.server.bind(evt.EVT_RELEASED, after_the_close)
    node.server.bind(evt.EVT_CONN_CLOSE, lambda event: closed.set())
    assert storescu(node.config.node.port, _series(tmp_path / "ct")).returncode == 0
    wait_for(lambda: _state(node) == "queued", 10, "completion on release")


def test_series_with_a_missing_slice_waits_for_the_quiet_period(
    start_node: Any, tmp_path: Path
) -> None:
    node = start_node(workers={"count": 0}, completion={"quiet_seconds": 3})
    files = sorted(
        _series(tmp_path / "ct"), key=lambda p: pydicom.dcmread(p).ImagePositionPatient[2]
    )
    del files[40]
    assert storescu(node.config.node.port, files).returncode == 0
    assert _state(node) == "receiving"  # released, but a 2.5 mm gap: not early
    wait_for(lambda: _state(node) == "queued", 15, "completion after the quiet period")


def test_selection_queues_the_thin_lung_series_not_the_thick_one(
    start_node: Any, tmp_path: Path
) -> None:
    node = start_node(workers={"count": 0}, completion={"quiet_seconds": 3})
    thin = ct_datasets(SeriesSpec(), phantom(SeriesSpec(), None))
    thick_spec = SeriesSpec(slices=24, slice_mm=5.0)
    thick = ct_datasets(thick_spec, phantom(thick_spec, None))
    scout_spec = SeriesSpec(slices=1)
    (scout,) = ct_datasets(scout_spec, phantom(scout_spec, None))
    for ds in [*thick, scout]:
        ds.StudyInstanceUID = thin[0].StudyInstanceUID
    for ds, description, kernel in [
        (thin, "Chest 1.25 lung", "B70f"),
        (thick, "Chest 5.0 soft tissue", "B30f"),
        ([scout], "Topogram 0.6 T20f", "T20f"),
    ]:
        for item in ds:
            item.SeriesDescription, item.ConvolutionKernel, item.SliceThickness = (
                description,
                kernel,
                5.0 if ds is thick else 1.25,
            )
    files = write_series(tmp_path / "study", [*thin, *thick, scout])
    assert storescu(node.config.node.port, files).returncode == 0
    # The one-image scout is never "complete at release": it is decided after the quiet period.
    wait_for(lambda: all(s.state != "receiving" for s in _rows(node, Series)), 15, "selection")
    states = {s.description: (s.state, s.reason) for s in _rows(node, Series)}
    assert states["Chest 1.25 lung"][0] == "queued"
    assert states["Chest 5.0 soft tissue"][0] == "not_selected"
    assert "slice thickness 5.00 mm" in states["Chest 5.0 soft tissue"][1]
    assert "Topogram" in states["Topogram 0.6 T20f"][1]


@pytest.mark.slow
def test_a_late_slice_triggers_an_amending_analysis(start_node: Any, tmp_path: Path) -> None:
    node = start_node(workers={"count": 1}, completion={"quiet_seconds": 600})
    files = sorted(
        _series(tmp_path / "ct"), key=lambda p: pydicom.dcmread(p).ImagePositionPatient[2]
    )
    late = files.pop()  # the last slice: the volume is still regular without it
    assert storescu(node.config.node.port, files).returncode == 0
    wait_for(lambda: _state(node) == "analyzed", 120, "the first analysis")
    assert storescu(node.config.node.port, [late]).returncode == 0
    wait_for(
        lambda: len(_rows(node, Result)) == 2 and _state(node) == "analyzed", 120, "re-analysis"
    )
    first, second = sorted(_rows(node, Result), key=lambda r: r.id)
    assert not first.current and second.current
    assert second.series_version == len(files) + 1
    earlier, record = json.loads(first.findings_json), json.loads(second.findings_json)
    with node.db() as session:
        (first_sr_file,) = index.result_files(session, first.id, "sr")
    first_sr = pydicom.dcmread(first_sr_file.path)
    assert record["amends"] == first_sr.SOPInstanceUID
    assert record["output_series"] == earlier["output_series"]


def _worker(node: Node, stopping: threading.Event) -> JobRunner:
    """A worker of this test's own, on the node's database and results store."""
    detector = NoduleDetector.from_weights(DEFAULT_WEIGHTS, "cpu")
    worker = AnalysisWorker(node.db, node.config, detector, node.results, stopping)
    return JobRunner(node.db, worker, "test-worker", threading.Event())


def test_a_stopping_worker_hands_its_job_back_uncounted(start_node: Any, tmp_path: Path) -> None:
    node = start_node(workers={"count": 0}, completion={"quiet_seconds": 600})
    assert storescu(node.config.node.port, _series(tmp_path / "ct")).returncode == 0
    wait_for(lambda: _state(node) == "queued", 10, "completion on release")
    stopping = threading.Event()
    stopping.set()
    assert _worker(node, stopping).run_once()
    with node.db() as session:
        (job,) = queue.recent(session)
    assert (job.state, job.attempts, job.last_error) == ("queued", 0, "")
    assert _state(node) == "queued"


def _lung_and_soft_reconstructions() -> tuple[list[Dataset], list[Dataset]]:
    """Two 1.25 mm reconstructions of one scan, a lung (B70f) and a soft-tissue (B30f) kernel."""
    lung = ct_datasets(SeriesSpec(), phantom(SeriesSpec(), None))
    soft = ct_datasets(SeriesSpec(), phantom(SeriesSpec(), None))
    for datasets, kernel in [(lung, "B70f"), (soft, "B30f")]:
        for ds in datasets:
            ds.StudyInstanceUID, ds.FrameOfReferenceUID = (
                lung[0].StudyInstanceUID,
                lung[0].FrameOfReferenceUID,
            )
            ds.SeriesDescription, ds.ConvolutionKernel = "Thorax 1.25", kernel
    return lung, soft


def _kernel_states(node: Node) -> dict[str, tuple[str, str]]:
    return {s.convolution_kernel: (s.state, s.reason) for s in _rows(node, Series)}


def test_one_series_per_study_among_series_completed_together(
    start_node: Any, tmp_path: Path
) -> None:
    node = start_node(workers={"count": 0}, completion={"quiet_seconds": 600})
    lung, soft = _lung_and_soft_reconstructions()
    files = write_series(tmp_path / "study", [*lung, *soft])
    assert storescu(node.config.node.port, files).returncode == 0
    wait_for(lambda: all(s.state != "receiving" for s in _rows(node, Series)), 10, "selection")
    states = _kernel_states(node)
    assert states["B70f"][0] == "queued"
    assert states["B30f"][0] == "not_selected"
    assert str(lung[0].SeriesInstanceUID) in states["B30f"][1]


@pytest.mark.slow
def test_an_enhanced_ct_sent_over_dicom_is_analyzed(start_node: Any, tmp_path: Path) -> None:
    node = start_node(workers={"count": 1}, completion={"quiet_seconds": 600})
    spec = SeriesSpec()
    multiframe = multiframe_ct(ct_datasets(spec, phantom(spec, (-40.0, 10.0, -90.0))))
    multiframe.SeriesDescription, multiframe.ConvolutionKernel = "Thorax 1.25 lung", "B70f"
    (tmp_path / "ct").mkdir()
    multiframe.save_as(tmp_path / "ct" / "enhanced.dcm", enforce_file_format=True)
    sent = storescu(node.config.node.port, [tmp_path / "ct"])
    assert sent.returncode == 0, sent.stderr
    wait_for(lambda: _state(node) in {"analyzed", "rejected", "failed"}, 120, "the analysis")
    (series,) = _rows(node, Series)
    assert (series.state, series.reason) == ("analyzed", "1 nodule")
    (result,) = _rows(node, Result)
    with node.db() as session:
        (sr_file,) = index.result_files(session, result.id, "sr")
    sr = pydicom.dcmread(sr_file.path)
    assert sr.StudyInstanceUID == multiframe.StudyInstanceUID


def test_a_better_series_arriving_later_withdraws_the_queued_one(
    start_node: Any, tmp_path: Path
) -> None:
    node = start_node(workers={"count": 0}, completion={"quiet_seconds": 600})
    lung, soft = _lung_and_soft_reconstructions()
    port = node.config.node.port
    assert storescu(port, write_series(tmp_path / "soft", soft)).returncode == 0
    wait_for(lambda: _state(node) == "queued", 10, "the first series queued")
    assert storescu(port, write_series(tmp_path / "lung", lung)).returncode == 0
    wait_for(lambda: _kernel_states(node)["B70f"][0] != "receiving", 10, "the second decision")
    states = _kernel_states(node)
    assert states["B70f"][0] == "queued"
    assert (
        states["B30f"][0] == "not_selected" and str(lung[0].SeriesInstanceUID) in states["B30f"][1]
    )
    with node.db() as session:
        assert queue.counts(session) == {("analyze", "queued"): 1, ("analyze", "cancelled"): 1}


def test_socket_reads_return_the_whole_pdu_or_what_came_before_the_peer_closed() -> None:
    sender, receiver = socket.socketpair()
    payload = bytes(range(256)) * 4096  # 1 MiB: more than one socket buffer
    writer = threading.Thread(target=lambda: (sender.sendall(payload), sender.close()))
    writer.start()
    try:
        assert receive_exactly(receiver, len(payload) - 10) == payload[:-10]
        assert receive_exactly(receiver, 100) == payload[-10:]
    finally:
        writer.join()
        receiver.close()


@pytest.mark.slow
def test_an_indexed_instance_without_its_file_is_dropped_and_the_rest_analyzed(
    start_node: Any, tmp_path: Path
) -> None:
    """The receiver commits a row while the file is still being written; a crash between the
    two leaves a row for an unacknowledged instance, which must not stop the analysis."""
    node = start_node(workers={"count": 0}, completion={"quiet_seconds": 600})
    files = _series(tmp_path / "ct")
    assert storescu(node.config.node.port, files).returncode == 0
    wait_for(lambda: _state(node) == "queued", 10, "completion on release")
    last = max(_rows(node, Instance), key=lambda i: i.position_mm)
    Path(last.path).unlink()
    assert _worker(node, threading.Event()).run_once()
    assert _state(node) == "analyzed"
    assert last.sop_uid not in {i.sop_uid for i in _rows(node, Instance)}
    assert len(_rows(node, Instance)) == len(files) - 1
