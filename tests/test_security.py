"""Who gets in, how much they may send, and what the audit trail keeps of it."""

from __future__ import annotations

import copy
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]
from sqlalchemy import create_engine, select
from sqlalchemy.orm import sessionmaker

from dicom_node.config import AllowedCaller, ConfigError, NodeConfig, SecuritySettings
from dicom_node.dimse import StoreStatus
from dicom_node.observe.audit import AuditRecord, AuditTrail, rfc5424_line
from dicom_node.observe.metrics import REGISTRY
from dicom_node.receive.access import AccessPolicy
from storage.models import AuditEvent, Instance
from tests.adversarial import associate_rq, stalled_pdu
from tests.dicom_factory import SeriesSpec, ct_datasets, phantom, write_series
from tests.peers import (
    DASHBOARD_TOKEN,
    cpu_seconds,
    dashboard_client,
    log_in,
    storescu,
    wait_for,
)


def _associate(port: int, calling: str = "SCANNER", called: str = "RESMTNET") -> Association:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    return ae.associate("127.0.0.1", port, ae_title=called)


def _echo(port: int, calling: str = "SCANNER") -> tuple[bool, int | None]:
    """(accepted, A-ASSOCIATE-RJ result) of an association that sends one C-ECHO."""
    assoc = _associate(port, calling)
    if not assoc.is_established:
        primitive = assoc.acceptor.primitive
        return False, (primitive.result if primitive is not None else None)
    answer = assoc.send_c_echo()
    assoc.release()
    return int(answer.Status) == StoreStatus.SUCCESS, None


def _audit(node: Any) -> list[AuditEvent]:
    with node.db() as session:
        return list(session.scalars(select(AuditEvent).order_by(AuditEvent.id)))


def test_policy_binds_each_calling_ae_title_to_its_hosts() -> None:
    policy = AccessPolicy(
        SecuritySettings(
            peers=[
                AllowedCaller(ae_title="CT1", hosts=["10.1.2.3"]),
                AllowedCaller(ae_title="PACS", hosts=["10.9.0.0/16", "127.0.0.1"]),
            ]
        )
    )
    assert policy.titles_for("10.1.2.3") == ("CT1",)
    assert policy.titles_for("10.9.44.1") == ("PACS",)
    assert policy.titles_for("::ffff:10.9.44.1") == ("PACS",)
    assert policy.titles_for("10.1.2.4") == ()
    assert policy.judge("10.1.2.3").refusal("PACS") == (
        "calling AE title 'PACS' not allowed from 10.1.2.3"
    )


def test_with_no_peers_listed_only_this_machine_gets_in() -> None:
    policy = AccessPolicy(SecuritySettings())
    assert policy.titles_for("127.0.0.1") is None and policy.titles_for("::1") is None
    assert policy.titles_for("192.168.1.20") == ()


def test_association_rate_is_counted_per_host_over_a_minute() -> None:
    now = [0.0]
    policy = AccessPolicy(SecuritySettings(associations_per_minute=2), clock=lambda: now[0])
    assert [policy.judge("10.0.0.1").over_rate for _ in range(3)] == [False, False, True]
    assert not policy.judge("10.0.0.2").over_rate
    now[0] = 61.0
    assert not policy.judge("10.0.0.1").over_rate


def test_hosts_quiet_for_a_minute_are_forgotten_by_the_rate_limiter() -> None:
    now = [0.0]
    policy = AccessPolicy(SecuritySettings(associations_per_minute=2), clock=lambda: now[0])
    for n in range(13_000):  # a scan from many addresses
        policy.judge(f"10.{n // 65536}.{n // 256 % 256}.{n % 256}")
    now[0] = 61.0
    policy.judge("10.99.0.1")
    assert list(policy._recent) == ["10.99.0.1"]


def test_a_peer_host_that_is_neither_address_nor_name_stops_the_config() -> None:
    with pytest.raises(ConfigError, match=r"security\.peers\.0\.hosts: .*'10\.0\.0\.0/33'"):
        from dicom_node.config import load_config

        load_config(
            None, environ={"DICOM_NODE__SECURITY__PEERS": "[{ae_title: A, hosts: [10.0.0.0/33]}]"}
        )


def test_unknown_callers_are_rejected_at_association_and_audited(
    start_node: Any, tmp_path: Path
) -> None:
    config_path = tmp_path / "node0" / "config.yaml"
    node = start_node(
        workers={"count": 0},
        security={
            "peers": [
                {"ae_title": "SCANNER", "hosts": ["127.0.0.1"]},
                {"ae_title": "FARAWAY", "hosts": ["10.20.30.40"]},
            ]
        },
    )
    port = node.config.node.port
    assert _echo(port, "SCANNER") == (True, None)
    # Not listed at all, and listed but bound to another host: rejected-permanent (1).
    assert _echo(port, "INTRUDER") == (False, 1)
    assert _echo(port, "FARAWAY") == (False, 1)
    # The rejection is sent before its audit event is written.
    wait_for(lambda: len(_audit(node)) == 3, 10, "the audit events")
    events = [(e.event, e.outcome, e.calling_ae, e.host) for e in _audit(node)]
    assert events == [
        ("association", "success", "SCANNER", "127.0.0.1"),
        ("association", "refused", "INTRUDER", "127.0.0.1"),
        ("association", "refused", "FARAWAY", "127.0.0.1"),
    ]
    assert _audit(node)[2].detail == "calling AE title 'FARAWAY' not allowed from 127.0.0.1"
    listed = subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", "audit", "--config", str(config_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "association      refused  FARAWAY -> RESMTNET @ 127.0.0.1" in listed.stdout


def test_a_host_over_its_association_rate_is_turned_away_transiently(start_node: Any) -> None:
    node = start_node(workers={"count": 0}, security={"associations_per_minute": 2})
    port = node.config.node.port
    results = [_echo(port) for _ in range(3)]
    assert results == [(True, None), (True, None), (False, 2)]  # 2: rejected-transient
    wait_for(lambda: len(_audit(node)) == 3, 10, "the audit events")
    assert "associations per minute" in _audit(node)[-1].detail


def test_associations_past_the_limit_are_rejected_until_one_ends(start_node: Any) -> None:
    node = start_node(workers={"count": 0}, node={"max_associations": 2})
    port = node.config.node.port
    held = [_associate(port) for _ in range(2)]
    assert all(assoc.is_established for assoc in held)
    assert _echo(port) == (False, 2)  # rejected-transient: local limit exceeded
    held.pop().release()
    # The release ends the association on the node's side a moment later; only then is there room.
    wait_for(lambda: len(node.server.active_associations) == 1, 10, "the released one to end")
    assert _echo(port) == (True, None)
    held[0].release()
    refused = [e for e in _audit(node) if e.outcome == "refused"]
    assert [e.detail for e in refused] == ["too many simultaneous associations"]


def test_a_sop_instance_uid_of_another_patient_is_refused_with_a_comment_and_audited(
    start_node: Any,
) -> None:
    node = start_node(workers={"count": 0})
    spec = SeriesSpec(slices=1)
    (first,) = ct_datasets(spec, phantom(spec, None))
    second = copy.deepcopy(first)
    second.PatientID, second.StudyInstanceUID = "OTHER-42", generate_uid()
    second.SeriesInstanceUID = generate_uid()
    assoc = _associate(node.config.node.port)
    answers = [assoc.send_c_store(ds) for ds in (first, second)]
    assoc.release()
    assert [int(a.Status) for a in answers] == [StoreStatus.SUCCESS, 0x0111]
    comment = "SOPInstanceUID already held in another series: " + first.SOPInstanceUID
    assert answers[1].ErrorComment == comment[:64]  # LO: at most 64 characters
    wait_for(
        lambda: any(e.event == "identity-conflict" for e in _audit(node)), 10, "the audit event"
    )
    conflict = next(e for e in _audit(node) if e.event == "identity-conflict")
    assert conflict.outcome == "refused" and first.SOPInstanceUID in conflict.detail


def test_a_resend_with_another_data_set_is_answered_success_and_audited(
    start_node: Any,
) -> None:
    """The first copy stays (what was analyzed is what was received first); the sender is not
    failed for a resend, but the operators see that an instance changed under its UID."""
    node = start_node(workers={"count": 0}, dashboard={"token": DASHBOARD_TOKEN})
    spec = SeriesSpec(slices=1)
    (first,) = ct_datasets(spec, phantom(spec, None))
    edited = copy.deepcopy(first)
    edited.WindowCenter = 40
    assoc = _associate(node.config.node.port)
    answers = [assoc.send_c_store(ds) for ds in (first, first, edited)]
    assoc.release()
    assert [int(a.Status) for a in answers] == [StoreStatus.SUCCESS] * 3
    wait_for(
        lambda: any(e.event == "identity-conflict" for e in _audit(node)), 10, "the audit event"
    )
    (changed,) = [e for e in _audit(node) if e.event == "identity-conflict"]
    assert changed.outcome == "first-kept" and first.SOPInstanceUID in changed.detail
    assert changed.study_uid == first.StudyInstanceUID
    client = dashboard_client(node)
    log_in(client, DASHBOARD_TOKEN)
    listed = re.search(r'<table id="conflicts">.*?</table>', client.get("/").text, re.S)
    assert listed and "first kept" in listed[0] and first.SOPInstanceUID in listed[0]


def _series(folder: Path, slices: int) -> list[Path]:
    spec = SeriesSpec(slices=slices)
    return write_series(folder, ct_datasets(spec, phantom(spec, None)))


def test_a_series_past_its_instance_limit_is_refused_and_nothing_of_it_kept(
    start_node: Any, tmp_path: Path
) -> None:
    node = start_node(workers={"count": 0}, security={"max_instances_per_series": 4})
    files = _series(tmp_path / "ct", 6)
    datasets = [pydicom.dcmread(f) for f in files]
    assoc = _associate(node.config.node.port)
    codes = [int(assoc.send_c_store(ds).Status) for ds in datasets]
    assoc.release()
    assert codes == [0, 0, 0, 0, StoreStatus.OUT_OF_RESOURCES, StoreStatus.OUT_OF_RESOURCES]
    with node.db() as session:
        assert len(list(session.scalars(select(Instance)))) == 4
    assert len(list(Path(node.config.storage.path, "instances").rglob("*.dcm"))) == 4
    wait_for(lambda: len(_audit(node)) == 3, 10, "the association's audit events")
    stored, refused = _audit(node)[1:]
    assert (stored.event, stored.outcome, stored.study_uid) == (
        "instances-stored",
        "success",
        datasets[0].StudyInstanceUID,
    )
    assert stored.detail.startswith("4 instance(s) stored")
    assert refused.detail.startswith("2 instance(s) refused")


def test_an_instance_past_the_byte_limit_closes_its_association_only(
    start_node: Any, tmp_path: Path
) -> None:
    node = start_node(workers={"count": 0}, security={"max_instance_bytes": 16384})
    big = _series(tmp_path / "ct", 1)  # 128 x 128 x 2 bytes: 32 KiB of pixels
    assoc = _associate(node.config.node.port)
    answer = assoc.send_c_store(pydicom.dcmread(big[0]))
    assert not answer  # no status: the node closed the connection
    assert _echo(node.config.node.port) == (True, None)
    wait_for(lambda: any("max_instance_bytes" in e.detail for e in _audit(node)), 10, "audit")
    with node.db() as session:
        assert not list(session.scalars(select(Instance)))


def test_audit_lines_follow_rfc5424_and_reach_a_syslog_collector(
    start_node: Any, tmp_path: Path
) -> None:
    collector = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    collector.bind(("127.0.0.1", 0))
    collector.settimeout(10)
    node = start_node(
        workers={"count": 0},
        security={"audit_syslog": {"host": "127.0.0.1", "port": collector.getsockname()[1]}},
    )
    files = _series(tmp_path / "ct", 3)
    assert storescu(node.config.node.port, files).returncode == 0
    lines = [collector.recv(65536).decode() for _ in range(2)]
    collector.close()
    accepted, stored = lines
    assert accepted.startswith("<85>1 ") and " association [audit@32473 " in accepted
    assert 'outcome="success" callingAE="SCANNER" calledAE="RESMTNET" host="127.0.0.1"' in accepted
    study = pydicom.dcmread(files[0]).StudyInstanceUID
    assert f'studyUID="{study}"' in stored and stored.endswith(
        "3 instance(s) stored; association released"
    )


def test_an_audit_event_the_database_cannot_take_is_counted_as_lost(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'missing-folder' / 'audit.db'}")
    lost = {"sink": "database"}

    def count() -> float:
        return REGISTRY.get_sample_value("dicom_node_audit_events_lost_total", lost) or 0.0

    before = count()
    AuditTrail(sessionmaker(engine)).record(AuditRecord("association", "refused"))
    assert count() == before + 1


def test_structured_data_values_are_escaped() -> None:
    line = rfc5424_line(AuditRecord("association", "refused", calling_ae='A"]\\'), "node")
    assert b'callingAE="A\\"\\]\\\\"' in line and line.startswith(b"<84>1 ")


def test_the_default_config_lets_in_only_this_machine() -> None:
    assert NodeConfig().security.peers == []


def test_the_database_and_stored_files_are_owner_only(start_node: Any, tmp_path: Path) -> None:
    node = start_node(workers={"count": 0})
    assert storescu(node.config.node.port, _series(tmp_path / "ct", 3)).returncode == 0
    database = Path(node.config.storage.database_url.removeprefix("sqlite:///"))
    created = [
        *database.parent.glob(database.name + "*"),
        *Path(node.config.storage.path).rglob("*"),
    ]
    assert len(created) > 4
    loose = [p for p in created if p.stat().st_mode & 0o077]
    assert not loose, f"readable by others: {loose}"


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def test_a_connection_from_an_address_no_peer_may_use_is_closed_at_once(start_node: Any) -> None:
    node = start_node(
        workers={"count": 0}, security={"peers": [{"ae_title": "FARAWAY", "hosts": ["10.2.3.4"]}]}
    )
    with _connect(node.config.node.port) as connection:
        assert connection.recv(1) == b""  # closed by the node, no request awaited
    assert node.server.active_associations == []
    wait_for(lambda: any(e.event == "connection" for e in _audit(node)), 10, "the audit event")
    (event,) = [e for e in _audit(node) if e.event == "connection"]
    assert (event.outcome, event.host) == ("refused", "127.0.0.1")
    assert event.detail == "no peer may call from 127.0.0.1 (security.peers)"


def test_a_peer_that_stalls_in_the_middle_of_a_pdu_is_dropped_and_audited(
    start_node: Any,
) -> None:
    node = start_node(workers={"count": 0}, node={"timeout_seconds": 1})
    port = node.config.node.port
    with _connect(port) as connection:
        connection.sendall(stalled_pdu("RESMTNET", "SCANNER"))
        assert connection.recv(1) == b""
    wait_for(
        lambda: any("in the middle of a PDU" in e.detail for e in _audit(node)), 10, "the audit"
    )
    (event,) = [e for e in _audit(node) if "in the middle of a PDU" in e.detail]
    assert event.detail == "connection closed: the peer sent nothing for 1 s in the middle of a PDU"
    assert _echo(port) == (True, None)


def test_an_even_presentation_context_id_is_answered_with_an_abort(start_node: Any) -> None:
    node = start_node(workers={"count": 0})
    port = node.config.node.port
    with _connect(port) as connection:
        connection.sendall(associate_rq("RESMTNET", "SCANNER", context_id=2))
        answer = connection.recv(10)
        assert answer[:1] == b"\x07"  # A-ABORT (PS3.8 9.3.8), then the node closes
        assert connection.recv(1) == b""
    assert _echo(port) == (True, None)


def _cpu_seconds(threads: list[Any]) -> float:
    """CPU time the node's threads with these native ids have used."""
    return sum(cpu_seconds(Path(f"/proc/self/task/{thread}/stat")) for thread in threads)


def test_open_associations_wait_for_work_instead_of_polling_for_it(start_node: Any) -> None:
    """A PACS router holds its associations open between studies: polling for work, each
    association's two threads took about 5 % of a core while nothing came (pynetdicom's
    loops, sped up for throughput); waiting, they take next to nothing, and still answer."""
    node = start_node(workers={"count": 0})
    port = node.config.node.port
    peers = [_associate(port) for _ in range(4)]

    def established() -> list[Any]:
        return [a for a in node.server.active_associations if a.is_established]

    wait_for(lambda: len(established()) == 4, 10, "four established associations")
    threads = [t.native_id for a in established() for t in (a, a.dul)]
    before = _cpu_seconds(threads)
    time.sleep(2.0)
    used = _cpu_seconds(threads) - before
    assert used < 0.1, f"4 idle associations used {used:.2f} s of CPU in 2 s"
    for peer in peers:  # each still answers, and releases
        assert int(peer.send_c_echo().Status) == StoreStatus.SUCCESS
        peer.release()
        assert peer.is_released
    wait_for(lambda: not node.server.active_associations, 5, "the associations' end")


def test_a_connection_that_never_asks_is_closed_after_the_timeout_and_forgotten(
    start_node: Any,
) -> None:
    node = start_node(workers={"count": 0}, node={"timeout_seconds": 1})
    with _connect(node.config.node.port) as connection:
        assert connection.recv(1) == b""
    wait_for(lambda: not node.handlers._transfers, 10, "the connection's state to go")
