"""The operators' dashboard, /metrics, /healthz and /readyz, over HTTP on a running node."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from storage import queue
from storage.models import Series
from storage.states import JobKind
from tests.dicom_factory import SeriesSpec, ct_datasets, phantom, write_series
from tests.peers import (
    DASHBOARD_TOKEN,
    REPO,
    Orthanc,
    dashboard_client,
    dashboard_url,
    free_port,
    log_in,
    node_config,
    run_browser_script,
    storescu,
    wait_for,
)


def test_health_ready_and_login_required(start_node: Any) -> None:
    node = start_node(workers={"count": 0}, dashboard={"token": DASHBOARD_TOKEN})
    client = dashboard_client(node)
    assert client.get("/healthz").text == "ok\n"
    assert client.get("/readyz").text == "ready\n"
    assert client.get("/").status_code == 303  # to the login page
    assert client.post("/retry", data={"job": "1"}).status_code == 303
    refused = log_in(client, "wrong")
    assert refused.status_code == 401 and "not this node's" in refused.text
    page = log_in(client, DASHBOARD_TOKEN)
    assert page.status_code == 200 and "Nothing received yet" in page.text
    # A form without the token derived from the login is refused even with the cookie.
    assert client.post("/retry", data={"job": "1"}).status_code == 403


def test_without_a_token_one_is_generated_owner_only(start_node: Any) -> None:
    node = start_node(workers={"count": 0})
    client = dashboard_client(node)
    token_file = Path(node.config.storage.path) / "dashboard-token"
    assert token_file.stat().st_mode & 0o077 == 0
    assert log_in(client, token_file.read_text().strip()).status_code == 200


@pytest.fixture
def delivered_series(start_node: Any, tmp_path: Path) -> Iterator[tuple[Any, httpx.Client, str]]:
    """A node that analyzed a phantom series and delivered it to Orthanc; a logged-in client;
    the series' UID."""
    pacs = Orthanc(tmp_path / "pacs").start()
    try:
        node = start_node(
            dashboard={"token": DASHBOARD_TOKEN, "refresh_seconds": 60},
            destinations=[{"name": "pacs", "ae_title": "ORTHANC", "port": pacs.dicom_port}],
        )
        spec = SeriesSpec()
        datasets = ct_datasets(spec, phantom(spec, (-40.0, 10.0, -90.0)))
        files = write_series(tmp_path / "ct", datasets)
        assert storescu(node.config.node.port, files).returncode == 0
        client = dashboard_client(node)
        log_in(client, DASHBOARD_TOKEN)
        wait_for(lambda: "1 done" in client.get("/").text, 120, "the delivery", interval=1.0)
        yield node, client, str(datasets[0].SeriesInstanceUID)
    finally:
        pacs.stop()


@pytest.mark.slow
def test_a_processed_series_its_key_images_metrics_and_resend(
    delivered_series: tuple[Any, httpx.Client, str],
) -> None:
    _, client, series_uid = delivered_series
    page = client.get("/").text
    assert series_uid in page and "analyzed" in page and "1 finding(s)" in page
    assert re.search(r">\s*up\s*<", page), "the destination's C-ECHO state"
    (thumbnail,) = re.findall(r'src="(/thumbnails/\d+\.png)"', page)
    image = client.get(thumbnail)
    assert image.headers["content-type"] == "image/png" and image.content[:4] == b"\x89PNG"

    metrics = client.get("/metrics").text
    assert re.search(r"^dicom_node_instances_received_total \d+", metrics, re.M)
    assert 'dicom_node_series{state="analyzed"} 1.0' in metrics
    assert 'dicom_node_jobs{kind="deliver",state="done"} 1.0' in metrics
    assert "dicom_node_model_latency_seconds_count" in metrics
    assert "dicom_node_storage_free_bytes" in metrics
    assert re.search(
        r'^dicom_node_series_completed_total\{why="association released"\} \d', metrics, re.M
    )
    assert re.search(
        r'^dicom_node_deliveries_total\{destination="pacs",outcome="success"\} \d', metrics, re.M
    )
    assert re.search(
        r'^dicom_node_job_duration_seconds_count\{kind="analyze",outcome="success"\}', metrics, re.M
    )

    form_token = re.search(r'name="form_token" value="([0-9a-f]+)"', page)
    assert form_token is not None
    answer = client.post(
        "/resend",
        data={"form_token": form_token.group(1), "series": series_uid},
        follow_redirects=True,
    )
    assert f"series {series_uid}: 1 delivery job(s) queued" in answer.text
    wait_for(lambda: "2 done" in client.get("/").text, 120, "the resend delivered", interval=1.0)


@pytest.mark.slow
def test_an_operator_logs_in_sees_the_series_presses_resend_in_chromium(
    delivered_series: tuple[Any, httpx.Client, str],
) -> None:
    node, _, series_uid = delivered_series
    shots = REPO / "out" / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    report = run_browser_script(
        "dashboard.mjs", dashboard_url(node), DASHBOARD_TOKEN, series_uid, str(shots), timeout=300
    )
    assert report["loginShown"]
    assert "analyzed" in report["row"] and "1 finding(s)" in report["row"]
    assert report["thumbnailWidth"] > 0, "the key image thumbnail did not load"
    assert "1 done" in report["destinationsBefore"]
    assert report["message"] == f"series {series_uid}: 1 delivery job(s) queued"
    assert "2 done" in report["destinationsAfter"]
    assert (shots / "dashboard.png").stat().st_size > 10_000


def test_the_queue_shows_what_a_running_job_is_doing(start_node: Any, tmp_path: Path) -> None:
    node = start_node(workers={"count": 0}, dashboard={"token": DASHBOARD_TOKEN})
    spec = SeriesSpec(slices=3)
    files = write_series(tmp_path / "ct", ct_datasets(spec, phantom(spec, None)))
    assert storescu(node.config.node.port, files).returncode == 0
    with node.db.begin() as session:
        (series,) = session.scalars(select(Series))
        queue.enqueue(session, JobKind.ANALYZE, series.id, max_attempts=3)
    with node.db.begin() as session:
        job = queue.claim(session, JobKind.ANALYZE, "test-worker", 60)
        assert job is not None
        queue.set_stage(session, job, "detecting nodules")
    client = dashboard_client(node)
    page = log_in(client, DASHBOARD_TOKEN).text
    assert "running: detecting nodules" in page


def test_operators_find_a_series_by_accession_and_open_its_page(
    start_node: Any, tmp_path: Path
) -> None:
    node = start_node(workers={"count": 0}, dashboard={"token": DASHBOARD_TOKEN})
    spec = SeriesSpec(slices=3)
    uids = []
    for accession, description in (("ACC-CHEST", "CT THORAX"), ("ACC-OTHER", "CT ABDOMEN")):
        datasets = ct_datasets(spec, phantom(spec, None))
        for ds in datasets:
            ds.AccessionNumber, ds.StudyDescription = accession, description
            ds.SeriesDescription = f"{description} 1.0 B60f"
        uids.append(str(datasets[0].SeriesInstanceUID))
        files = write_series(tmp_path / accession, datasets)
        assert storescu(node.config.node.port, files).returncode == 0
    client = dashboard_client(node)
    log_in(client, DASHBOARD_TOKEN)
    found = client.get("/", params={"accession": "ACC-CHEST"}).text
    assert uids[0] in found and uids[1] not in found
    assert "CT THORAX" in found and "2026-01-01" in found
    assert "No series with accession number NOPE" in client.get("/?accession=NOPE").text
    page = client.get(f"/series/{uids[0]}")
    assert page.status_code == 200
    for shown in ("ACC-CHEST", "CT THORAX 1.0 B60f", "SCANNER", "Not analyzed yet", "analyze"):
        assert shown in page.text
    assert "Test^Phantom" not in page.text and "PHANTOM1" not in page.text  # no PHI
    assert client.get("/series/1.2.3.4").status_code == 404


def test_a_study_uid_of_another_patient_is_shown_as_refused(
    start_node: Any, tmp_path: Path
) -> None:
    node = start_node(workers={"count": 0}, dashboard={"token": DASHBOARD_TOKEN})
    spec = SeriesSpec(slices=1)
    (first,) = ct_datasets(spec, phantom(spec, None))
    (second,) = ct_datasets(spec, phantom(spec, None))
    second.StudyInstanceUID, second.PatientID = first.StudyInstanceUID, "OTHER-7"
    codes = [
        storescu(node.config.node.port, write_series(tmp_path / f"s{n}", [ds])).returncode
        for n, ds in enumerate((first, second))
    ]
    assert codes[0] == 0 and codes[1] != 0  # the second refused
    client = dashboard_client(node)
    log_in(client, DASHBOARD_TOKEN)
    page = client.get("/").text  # audited before the refusal was answered
    assert f"StudyInstanceUID already held for another patient: {first.StudyInstanceUID}" in page
    assert "OTHER-7" not in page


def test_readyz_says_what_is_not_ready(start_node: Any) -> None:
    node = start_node(workers={"count": 0}, storage={"min_free_mb": 10**9})
    answer = dashboard_client(node).get("/readyz")
    assert answer.status_code == 503
    assert answer.text == "not ready: storage below its free-space watermark\n"


def test_bad_logins_cookies_and_form_values_get_a_sentence_not_a_500(start_node: Any) -> None:
    node = start_node(workers={"count": 0}, dashboard={"token": DASHBOARD_TOKEN})
    client = dashboard_client(node)
    assert log_in(client, "jeton-été-✓").status_code == 401
    cookie = "dicom_node_session=sesión-ü".encode()
    assert client.get("/", headers={"Cookie": cookie}).status_code == 303  # to the login page
    page = log_in(client, DASHBOARD_TOKEN).text
    form_token = re.search(r'name="form_token" value="([0-9a-f]+)"', page)
    assert form_token is not None
    for job in ("abc", "1.5", "٣", ""):
        answer = client.post("/retry", data={"form_token": form_token.group(1), "job": job})
        assert answer.status_code == 400 and "job must be a whole number" in answer.text
    unicode_form = client.post("/retry", data={"form_token": "ﬁ" * 10, "job": "1"})
    assert unicode_form.status_code == 403


def test_failed_logins_are_throttled_per_client(start_node: Any) -> None:
    node = start_node(workers={"count": 0}, dashboard={"token": DASHBOARD_TOKEN})
    client = dashboard_client(node)
    assert [log_in(client, f"guess-{n}").status_code for n in range(5)] == [401] * 5
    answer = log_in(client, DASHBOARD_TOKEN)  # even the right token waits out the minute
    assert answer.status_code == 429 and "wait a minute" in answer.text


def test_each_login_gets_its_own_session_and_logging_out_ends_it(start_node: Any) -> None:
    node = start_node(workers={"count": 0}, dashboard={"token": DASHBOARD_TOKEN})
    first, second = dashboard_client(node), dashboard_client(node)
    page, _ = log_in(first, DASHBOARD_TOKEN).text, log_in(second, DASHBOARD_TOKEN)
    cookie = first.cookies["dicom_node_session"]
    assert cookie != second.cookies["dicom_node_session"] and DASHBOARD_TOKEN not in cookie
    form_token = re.search(r'name="form_token" value="([0-9a-f]+)"', page)
    assert form_token is not None
    assert first.post("/logout", data={"form_token": form_token.group(1)}).status_code == 303
    stolen = httpx.Client(base_url=dashboard_url(node), cookies={"dicom_node_session": cookie})
    assert stolen.get("/").status_code == 303  # the ended session no longer opens the page
    assert second.get("/").status_code == 200


def test_every_page_forbids_framing_sniffing_and_foreign_content(start_node: Any) -> None:
    node = start_node(workers={"count": 0}, dashboard={"token": DASHBOARD_TOKEN})
    client = dashboard_client(node)
    for path in ("/healthz", "/login", "/", "/no-such-page"):
        headers = client.get(path).headers
        assert headers["x-frame-options"] == "DENY", path
        assert headers["x-content-type-options"] == "nosniff", path
        assert "frame-ancestors 'none'" in headers["content-security-policy"], path


def test_health_answers_at_once_while_a_destination_does_not(start_node: Any) -> None:
    silent = socket.create_server(("127.0.0.1", 0))  # accepts connections, never answers
    try:
        port = silent.getsockname()[1]
        node = start_node(
            workers={"count": 0},
            dashboard={"token": DASHBOARD_TOKEN},
            destinations=[{"name": "silent", "ae_title": "SILENT", "port": port}],
        )
        client = dashboard_client(node)
        page = log_in(
            client, DASHBOARD_TOKEN
        ).text  # starts the C-ECHO, which waits 3 s for an answer
        assert re.search(r">\s*checking\s*<", page)
        started = time.monotonic()
        assert client.get("/healthz").text == "ok\n" and client.get("/").status_code == 200
        assert time.monotonic() - started < 2.0  # neither waited for the C-ECHO
        wait_for(lambda: "unreachable" in client.get("/").text, 30, "the C-ECHO's outcome")
    finally:
        silent.close()


def test_a_dashboard_port_already_taken_stops_the_start_with_one_line(tmp_path: Path) -> None:
    taken = socket.create_server(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    try:
        config = node_config(
            tmp_path / "node", free_port(), workers={"count": 0}, dashboard={"port": port}
        )
        done = subprocess.run(
            [sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        taken.close()
    assert done.returncode != 0 and "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"dicom-node serve: dashboard cannot listen on 127.0.0.1:{port}")
