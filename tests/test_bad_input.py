"""Malformed and adversarial input over the network: each gets its status or its quarantine
reason, while another sender's series goes through at the same time, and nothing else is lost."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]
from sqlalchemy import select

from dicom_node.receive.scp import TRANSFER_SYNTAXES
from storage.models import Instance, Series
from tests.adversarial import MAX_INSTANCE_BYTES, SMALL, Case, cases, files_of, series
from tests.conftest import SHARED_DATA
from tests.peers import storescu, wait_for


def _send_raw(port: int, files: list[Path]) -> list[int]:
    """Send files as they are (file meta read, data set bytes streamed unparsed)."""
    ae = AE(ae_title="FUZZER")
    for syntax in TRANSFER_SYNTAXES:  # one context each: the node accepts one per context
        ae.add_requested_context(CTImageStorage, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="RESMTNET")
    assert assoc.is_established
    codes = []
    for path in files:
        answer = assoc.send_c_store(path)
        codes.append(int(answer.Status) if answer else -1)
    assoc.release()
    return codes


def _series_uid(files: list[Path]) -> str:
    return str(pydicom.dcmread(files[0], stop_before_pixels=True, force=True).SeriesInstanceUID)


def _state(node: Any, series_uid: str) -> tuple[str, str] | None:
    with node.db() as session:
        row = session.scalars(select(Series).where(Series.series_uid == series_uid)).first()
        return (row.state, row.reason) if row else None


@pytest.mark.slow
def test_adversarial_inputs_get_their_status_or_quarantine_while_others_are_served(
    start_node: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    robustness = SHARED_DATA / "robustness"
    corpus = cases(robustness if robustness.exists() else None)
    assert len(corpus) >= 30
    node = start_node(
        completion={"quiet_seconds": 3},
        security={"max_instance_bytes": MAX_INSTANCE_BYTES},
        eligibility={"min_coverage_mm": 50.0},
    )
    port = node.config.node.port

    # Another sender's good series, sent while the corpus goes in.
    good = [files_of(series())(tmp_path / f"good{n}") for n in range(3)]
    sent_good: list[int] = []
    sender = threading.Thread(
        target=lambda: sent_good.extend(storescu(port, files).returncode for files in good)
    )
    sender.start()
    outcomes: dict[str, tuple[list[Path], list[int]]] = {}
    for number, case in enumerate(corpus):
        files = case.build(tmp_path / f"case{number}")
        outcomes[case.name] = (files, _send_raw(port, files))
    sender.join()
    assert sent_good == [0, 0, 0]

    wrong = {
        name: codes
        for name, (files, codes) in outcomes.items()
        if codes != next(c for c in corpus if c.name == name).statuses
    }
    assert not wrong, f"unexpected statuses: {wrong}"

    def settled(case: Case) -> bool:
        state = _state(node, _series_uid(outcomes[case.name][0]))
        return state is not None and state[0] not in {"receiving", "queued", "running"}

    stored_cases = [c for c in corpus if c.state is not None]
    wait_for(lambda: all(settled(c) for c in stored_cases), 300, "every stored case settled")
    mismatched = {}
    for case in stored_cases:
        state, reason = _state(node, _series_uid(outcomes[case.name][0])) or ("", "")
        if state != case.state or case.reason.lower() not in reason.lower():
            mismatched[case.name] = (state, reason)
    assert not mismatched, f"unexpected series outcomes: {mismatched}"

    # Nothing refused was kept; everything acknowledged was.
    with node.db() as session:
        indexed = {i.sop_uid for i in session.scalars(select(Instance))}
    refused = [
        files[n] for files, codes in outcomes.values() for n, code in enumerate(codes) if code != 0
    ]
    for path in refused:
        uid = read_file_meta_info(path).get("MediaStorageSOPInstanceUID")
        assert uid not in indexed, f"{path.parent.name}/{path.name} was refused yet indexed"
    good_uids = [_series_uid(files) for files in good]
    wait_for(
        lambda: all((_state(node, uid) or ("",))[0] == "analyzed" for uid in good_uids),
        300,
        "the other sender's series analyzed",
    )
    assert len(indexed) >= 3 * SMALL.slices
