"""Comparison with a prior scan: registration, matching, change, VDT, Lung-RADS follow-up."""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import time
from dataclasses import replace
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from sqlalchemy import select

from dicom_node.cli import main
from dicom_node.config import PriorsSettings
from dicom_node.fetch.priors import most_recent_dated
from dicom_node.fetch.query_retrieve import RemoteStudy
from dicom_node.lab.priors import write_series_like
from dicom_node.pipeline.priors import choose_prior
from dicom_node.pipeline.results import ResultRecord
from dicom_node.pipeline.series import CTSeries, read_series
from inference.comparison import Status, compare, volume_doubling_time_days
from inference.detector import DEFAULT_WEIGHTS, NoduleDetector
from inference.findings import FindingSummary
from inference.lab.experiments import seeded
from inference.lab.priors import make_pair, repositioned
from inference.lab.synthesis import chest_phantom
from inference.lungrads import lung_rads_with_prior
from inference.prior_reading import read_with_prior
from inference.registration import Registration, RegistrationFailed, register_prior
from inference.volume import Volume
from storage import index
from storage.models import AuditEvent, Result, Series
from tests.dicom_factory import SeriesSpec, ct_datasets, phantom, write_series
from tests.peers import (
    DASHBOARD_TOKEN,
    Orthanc,
    dashboard_client,
    free_port,
    log_in,
    storescu,
    wait_for,
)

IDENTITY = Registration(np.eye(4), 0.0)
PHANTOM_NODULE = (-40.0, 10.0, -90.0)  # in the factory phantom's right lung
RESOLVED_NODULE = (40.0, -15.0, -60.0)  # in its left lung, in the prior only


def _phantom() -> Volume:
    image = chest_phantom(np.random.default_rng(3), shape=(90, 128, 150), spacing_mm=2.5)
    return Volume(image, (-187.0, -160.0, -110.0), (2.5, 2.5, 2.5), np.eye(3))


def _nodule(id: int, centre: tuple[float, float, float], diameter: float) -> FindingSummary:
    volume = math.pi * diameter**3 / 6.0
    return FindingSummary(
        id=id,
        center_mm=centre,
        diameter_mm=diameter,
        long_axis_mm=diameter,
        short_axis_mm=diameter,
        volume_mm3=volume,
        mean_hu=20.0,
        laterality="left",
        composition="solid",
        malignancy_probability=0.2,
        lung_rads="3",
        score=0.99,
        solid_part_mm=diameter,
    )


def test_registration_recovers_a_known_repositioning() -> None:
    current = _phantom()
    prior, truth = repositioned(current, seeded(1, "registration"))
    found = register_prior(current, prior)
    points = current.index_to_world(np.array([[40, 50, 30], [110, 70, 45], [75, 90, 60]]))
    expected = points @ truth[:3, :3].T + truth[:3, 3]
    assert np.linalg.norm(found.to_prior(points) - expected, axis=1).max() < 2.0
    assert np.allclose(found.to_current(found.to_prior(points)), points)
    assert found.residual_mm < 3.0


def test_registration_refuses_a_scan_without_lungs() -> None:
    current = _phantom()
    body = current.with_array(np.full(current.array.shape, 40.0, dtype=np.float32))
    with pytest.raises(RegistrationFailed, match="no lungs"):
        register_prior(current, body)


def test_each_status_follows_from_matched_sizes() -> None:
    moved = Registration(
        np.array([[1, 0, 0, 10], [0, 1, 0, -5], [0, 0, 1, 20], [0, 0, 0, 1.0]]), 1.0
    )
    current = [
        _nodule(1, (0.0, 0.0, 0.0), 9.0),  # was 6 mm: growing
        _nodule(2, (50.0, 0.0, 0.0), 7.0),  # was 11 mm: shrinking
        _nodule(3, (0.0, 50.0, 0.0), 8.0),  # was 8.5 mm: stable
        _nodule(4, (0.0, 0.0, 60.0), 7.0),  # nothing there before: new
    ]
    # The prior's coordinates: each current point moved by the registration (plus 2 mm).
    prior = [
        _nodule(1, (62.0, -5.0, 20.0), 11.0),
        _nodule(2, (12.0, -5.0, 20.0), 6.0),
        _nodule(3, (10.0, 45.0, 22.0), 8.5),
        _nodule(4, (-60.0, 0.0, 0.0), 5.0),  # nowhere now: resolved
    ]
    result = compare(current, prior, moved, interval_days=365)
    assert [c.status for c in result.changes] == [
        Status.GROWING,
        Status.SHRINKING,
        Status.STABLE,
        Status.NEW,
    ]
    assert [c.prior_id for c in result.changes] == [2, 1, 3, None]
    assert [f.id for f in result.resolved] == [4]
    growing = result.changes[0]
    assert growing.diameter_change_mm == 3.0
    assert growing.vdt_days == pytest.approx(365 * math.log(2) / math.log((9 / 6) ** 3), abs=1)
    assert result.changes[1].vdt_days is None  # shrinking: no doubling time


def test_matching_is_one_to_one_at_least_total_distance() -> None:
    """Two current nodules near one prior nodule: only the nearer one is that nodule."""
    current = [_nodule(1, (0.0, 0.0, 0.0), 6.0), _nodule(2, (6.0, 0.0, 0.0), 6.0)]
    prior = [_nodule(1, (5.0, 0.0, 0.0), 6.0)]
    result = compare(current, prior, IDENTITY, interval_days=200)
    assert [c.status for c in result.changes] == [Status.NEW, Status.STABLE]
    assert result.resolved == ()


def test_volume_doubling_time_on_known_volumes() -> None:
    assert volume_doubling_time_days(100.0, 200.0, 120) == pytest.approx(120.0)
    assert volume_doubling_time_days(100.0, 400.0, 120) == pytest.approx(60.0)
    assert volume_doubling_time_days(100.0, 90.0, 120) is None
    assert volume_doubling_time_days(0.0, 90.0, 120) is None


@pytest.mark.parametrize(
    ("composition", "diameter", "solid", "status", "days", "change", "category", "wording"),
    [
        ("solid", 3.5, 3.5, "new", 365, 0.0, "2", "new solid nodule < 4 mm"),
        ("solid", 5.0, 5.0, "new", 365, 0.0, "3", "new solid nodule 4 to < 6 mm"),
        ("solid", 7.0, 7.0, "new", 365, 0.0, "4A", "new solid nodule 6 to < 8 mm"),
        ("solid", 8.0, 8.0, "new", 365, 0.0, "4B", "new solid nodule >= 8 mm"),
        ("solid", 7.0, 7.0, "growing", 365, 2.0, "4A", "growing solid nodule < 8 mm"),
        ("solid", 9.0, 9.0, "growing", 300, 3.0, "4B", "growing solid nodule >= 8 mm"),
        # 2 mm over two years is slow growth: 4B whatever the size.
        ("solid", 7.0, 7.0, "growing", 730, 2.0, "4B", "growing slowly"),
        ("solid", 10.0, 10.0, "stable", 120, 0.0, "2", "unchanged for 3 months"),
        ("solid", 10.0, 10.0, "stable", 60, 0.0, "4A", "over 60 days only"),
        ("solid", 5.0, 5.0, "stable", 365, 0.0, "2", "baseline size table"),
        ("solid", 7.0, 7.0, "shrinking", 365, -3.0, "3", "baseline size table"),
        ("part-solid", 5.0, 2.0, "new", 365, 0.0, "3", "new part-solid nodule < 6 mm"),
        ("part-solid", 9.0, 3.0, "new", 365, 0.0, "4A", "new solid component < 4 mm"),
        ("part-solid", 9.0, 5.0, "growing", 365, 2.0, "4B", "growing solid component >= 4 mm"),
        ("ground-glass", 12.0, 0.0, "new", 365, 0.0, "2", "baseline size table"),
        ("ground-glass", 32.0, 0.0, "new", 365, 0.0, "3", "new ground-glass nodule >= 30 mm"),
        ("ground-glass", 32.0, 0.0, "stable", 365, 0.0, "2", "unchanged for 3 months"),
    ],
)
def test_lung_rads_follow_up_rules(
    composition: str,
    diameter: float,
    solid: float,
    status: str,
    days: int,
    change: float,
    category: str,
    wording: str,
) -> None:
    got, rule = lung_rads_with_prior(composition, diameter, solid, False, status, days, change)
    assert (got, wording in rule) == (category, True), rule


def test_benign_calcification_stays_category_1_when_new() -> None:
    assert lung_rads_with_prior("solid", 12.0, 12.0, True, "new", 365) == (
        "1",
        "benign calcification",
    )


def test_generated_pair_keeps_each_nodule_where_the_truth_says() -> None:
    """The pair's truth (where a planted nodule lies in the prior) holds in the voxels."""
    current = _phantom()
    lungs = np.argwhere(current.array < -700)[::50]
    points = current.index_to_world(lungs[:, ::-1].astype(float))
    pair = make_pair(current, points, np.zeros((0, 3)), seeded(2, "pair"))
    assert {n.expected for n in pair.nodules} >= {Status.GROWING, Status.NEW, Status.RESOLVED}
    for nodule in pair.nodules:
        for volume, centre, present in (
            (pair.current, nodule.current_mm, nodule.current_volume_mm3 > 0),
            (pair.prior, nodule.prior_mm, nodule.prior_volume_mm3 > 0),
        ):
            k, j, i = np.round(volume.world_to_index(np.asarray(centre))[::-1]).astype(int)
            assert (volume.array[k, j, i] > -300) == present, (nodule.expected, present)


def _phantom_study(
    folder: Path,
    nodule_mm: float,
    study_date: str,
    patient_id: str = "PHANTOM1",
    extra: tuple[float, float, float] | None = None,
) -> Path:
    """The factory's small chest with one solid nodule (and an ``extra`` 9 mm one), as a CT
    study of its own."""
    spec = SeriesSpec()
    hu = phantom(spec, PHANTOM_NODULE, nodule_mm)
    if extra is not None:
        hu = np.maximum(hu, phantom(spec, extra, 9.0))
    datasets = ct_datasets(spec, hu)
    for ds in datasets:
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date
        ds.PatientID = patient_id
    return write_series(folder, datasets)[0].parent


@pytest.mark.skipif(not DEFAULT_WEIGHTS.exists(), reason="shipped weights missing")
def test_analyze_with_prior_reports_growth_vdt_and_follow_up_category(tmp_path: Path) -> None:
    current = _phantom_study(tmp_path / "now", 12.0, "20260601")
    prior = _phantom_study(tmp_path / "before", 8.0, "20250601")
    other = _phantom_study(tmp_path / "other", 8.0, "20250901", patient_id="SOMEONE-ELSE")
    code = main(
        ["analyze", str(current), "--prior", str(prior), str(other), "--out", str(tmp_path / "o")]
    )
    assert code == 0
    (series,) = json.loads((tmp_path / "o" / "findings.json").read_text())["series"]
    before = pydicom.dcmread(next((prior).iterdir()))
    assert series["prior"]["study_instance_uid"] == before.StudyInstanceUID  # not the other's
    assert series["prior"]["interval_days"] == 365
    assert series["prior"]["registration_residual_mm"] < 3.0
    matrix = np.array(series["prior"]["registration_current_to_prior"])
    assert matrix.shape == (4, 4) and np.allclose(matrix[3], [0, 0, 0, 1])
    assert np.allclose(matrix[:3, :3], np.eye(3), atol=0.05)  # the same phantom, not moved
    (nodule,) = [
        f
        for f in series["findings"]
        if np.linalg.norm(np.subtract(f["center_mm"], PHANTOM_NODULE)) < 5
    ]
    change = nodule["change"]
    assert change["status"] == "growing"
    assert change["diameter_change_mm"] > 2.0
    expected_vdt = 365 * math.log(2) / math.log(nodule["volume_mm3"] / change["prior_volume_mm3"])
    assert change["vdt_days"] == pytest.approx(expected_vdt, abs=1)
    assert nodule["lung_rads"] == change["lung_rads"] == "4B"
    assert change["lung_rads_rule"] == "growing solid nodule >= 8 mm"


@pytest.mark.skipif(not DEFAULT_WEIGHTS.exists(), reason="shipped weights missing")
def test_analyze_never_compares_with_another_patient(tmp_path: Path) -> None:
    current = _phantom_study(tmp_path / "now", 12.0, "20260601")
    other = _phantom_study(tmp_path / "other", 8.0, "20250601", patient_id="SOMEONE-ELSE")
    main(["analyze", str(current), "--prior", str(other), "--out", str(tmp_path / "o")])
    (series,) = json.loads((tmp_path / "o" / "findings.json").read_text())["series"]
    assert "another patient (Patient ID/issuer)" in series["prior"]["reason"]
    assert all("change" not in f for f in series["findings"])


def _series(folder: Path) -> CTSeries:
    (series,), _, _ = read_series([folder])
    return series


def test_prior_chosen_is_the_most_recent_eligible_study(tmp_path: Path) -> None:
    current = _series(_phantom_study(tmp_path / "now", 12.0, "20260601"))
    dated = {
        date: _series(_phantom_study(tmp_path / date, 8.0, date))
        for date in ("20260520", "20250601", "20251201", "20200101")
    }
    choice = choose_prior(current, list(dated.values()), PriorsSettings())
    # 12 days is too recent to show growth, 2020 too old: the December study wins.
    assert choice.prior is dated["20251201"]
    assert choice.interval_days == 182
    none = choose_prior(current, [dated["20260520"], dated["20200101"]], PriorsSettings())
    assert none.prior is None
    assert "12 days earlier, outside 30-1500" in none.reason
    assert "2343 days earlier" in none.reason


def test_a_peer_study_without_a_date_in_range_is_never_taken_as_the_newest() -> None:
    """A PACS that ignores the date range, or holds a study with a malformed or no date:
    such studies are passed over, and the newest properly dated one is taken."""
    answered = [
        RemoteStudy("1.2.3", "2025"),  # malformed: would sort above every real date
        RemoteStudy("1.2.4", ""),
        RemoteStudy("1.2.5", "20250601"),
        RemoteStudy("1.2.6", "20260530"),  # too recent: the PACS ignored the range
        RemoteStudy("1.2.7", "20251201"),
    ]
    earliest, latest = date(2022, 4, 28), date(2026, 5, 2)
    assert most_recent_dated(answered, earliest, latest) == (answered[4], date(2025, 12, 1))
    assert most_recent_dated(answered[:2], earliest, latest) is None


@pytest.mark.skipif(not DEFAULT_WEIGHTS.exists(), reason="shipped weights missing")
def test_a_nodule_under_the_threshold_is_found_again_where_the_prior_has_it(
    tmp_path: Path,
) -> None:
    """Without the second look, a nodule the current scan scores just under the threshold
    would read as resolved in the prior and be missing from the report."""
    current = _series(_phantom_study(tmp_path / "now", 12.0, "20260601"))
    prior = _series(_phantom_study(tmp_path / "before", 8.0, "20250601"))
    detector = NoduleDetector.from_weights(DEFAULT_WEIGHTS, "cpu")
    strict = replace(detector.operating_point, threshold=1.01)  # nothing passes
    blind = NoduleDetector(detector.model, strict, detector.info, detector.device)
    unseen = blind.detect(current.volume)
    assert unseen.findings == []
    reading = read_with_prior(detector, current.volume, prior.volume, 365, unseen)
    (found,) = [
        f for f in reading.findings if np.linalg.norm(np.subtract(f.center_mm, PHANTOM_NODULE)) < 5
    ]
    (change,) = [
        c for f, c in zip(reading.findings, reading.comparison.changes, strict=True) if f is found
    ]
    assert change.status is Status.GROWING
    assert reading.comparison.resolved == ()


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:  # type: ignore[type-arg]
    """``analyze --prior`` on the phantom: one nodule grew, one resolved."""
    root = tmp_path_factory.mktemp("compared")
    current = _phantom_study(root / "now", 12.0, "20260601")
    prior = _phantom_study(root / "before", 8.0, "20250601", extra=RESOLVED_NODULE)
    main(["analyze", str(current), "--prior", str(prior), "--out", str(root / "o")])
    (series,) = json.loads((root / "o" / "findings.json").read_text())["series"]
    return root, series


@pytest.mark.skipif(not DEFAULT_WEIGHTS.exists(), reason="shipped weights missing")
def test_resolved_prior_nodule_is_listed(compared) -> None:  # type: ignore[no-untyped-def]
    _, series = compared
    (gone,) = series["resolved"]
    assert np.linalg.norm(np.subtract(gone["center_mm"], RESOLVED_NODULE)) < 5


@pytest.mark.skipif(not DEFAULT_WEIGHTS.exists(), reason="shipped weights missing")
def test_sr_with_a_prior_is_valid_and_says_the_comparison(compared) -> None:  # type: ignore[no-untyped-def]
    root, series = compared
    sr_path = next(Path(f) for f in series["files"] if f.endswith("SR.dcm"))
    for tool in ("dciodvfy", "dsrdump"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (.ci/run installs it)")
    run = subprocess.run(["dciodvfy", str(sr_path)], capture_output=True, text=True, check=False)
    errors = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]
    assert errors == []
    text = subprocess.run(
        ["dsrdump", "+Pl", str(sr_path)], capture_output=True, text=True, check=True
    ).stdout
    assert "Follow-up, compared with the prior study of 2025-06-01" in text
    assert '"Change since prior study")=(growing,99RESMTNET' in text
    assert '"Change since prior study")=(resolved,99RESMTNET' in text
    assert '"Volume doubling time")="' in text
    assert '(lungrads22-4B-pr,99RESMTNET,"Lung-RADS v2022 4B (compared with prior)")' in text
    sr = pydicom.dcmread(sr_path)
    (other,) = sr.PertinentOtherEvidenceSequence
    prior_study = pydicom.dcmread(next((root / "before").iterdir())).StudyInstanceUID
    assert other.StudyInstanceUID == prior_study != sr.StudyInstanceUID


@pytest.mark.skipif(not DEFAULT_WEIGHTS.exists(), reason="shipped weights missing")
def test_sr_without_a_prior_says_baseline_and_why(tmp_path: Path) -> None:
    current = _phantom_study(tmp_path / "now", 12.0, "20260601")
    main(["analyze", str(current), "--out", str(tmp_path / "o")])
    (series,) = json.loads((tmp_path / "o" / "findings.json").read_text())["series"]
    sr = pydicom.dcmread(next(Path(f) for f in series["files"] if f.endswith("SR.dcm")))
    texts = [
        item.get("TextValue", "")
        for item in _walk(sr.ContentSequence)
        if item.ConceptNameCodeSequence[0].CodeMeaning == "Time Point"
    ]
    assert texts and set(texts) == {"Baseline: no earlier CT was given (--prior)"}


def _walk(items):  # type: ignore[no-untyped-def]
    for item in items:
        yield item
        yield from _walk(item.get("ContentSequence", []))


@pytest.mark.slow
@pytest.mark.skipif(not DEFAULT_WEIGHTS.exists(), reason="shipped weights missing")
def test_node_compares_with_the_prior_it_holds(
    start_node: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A patient's CT of last year arrives and is analyzed; this year's arrives: the node
    compares with the one it holds, and ``dicom-node findings`` shows it."""
    node = start_node(
        workers={"count": 1}, priors={"enabled": True}, dashboard={"token": DASHBOARD_TOKEN}
    )
    port = node.config.node.port
    before = _phantom_study(tmp_path / "before", 8.0, "20250601")
    now = _phantom_study(tmp_path / "now", 12.0, "20260601")
    current_uid = pydicom.dcmread(next(now.iterdir())).SeriesInstanceUID
    prior_uid = pydicom.dcmread(next(before.iterdir())).StudyInstanceUID

    def analyzed() -> int:
        with node.db() as session:
            return sum(s.state == "analyzed" for s in session.scalars(select(Series)))

    assert storescu(port, sorted(before.iterdir())).returncode == 0
    wait_for(lambda: analyzed() == 1, 120, "the prior's analysis")
    assert storescu(port, sorted(now.iterdir())).returncode == 0
    wait_for(lambda: analyzed() == 2, 120, "the current analysis")
    config = tmp_path / "node0" / "config.yaml"
    capsys.readouterr()
    assert main(["findings", current_uid, "--config", str(config)]) == 0
    entry = json.loads(capsys.readouterr().out)
    assert entry["prior"]["study_instance_uid"] == prior_uid
    assert entry["prior"]["interval_days"] == 365
    (nodule,) = [
        f
        for f in entry["findings"]
        if np.linalg.norm(np.subtract(f["center_mm"], PHANTOM_NODULE)) < 5
    ]
    assert nodule["change"]["status"] == "growing"
    assert nodule["change"]["vdt_days"] > 0
    assert main(["findings", "1.2.3.4", "--config", str(config)]) == 2
    assert "series 1.2.3.4 is not held by this node" in capsys.readouterr().err
    dashboard = dashboard_client(node)
    log_in(dashboard, DASHBOARD_TOKEN)
    page = dashboard.get(f"/series/{current_uid}").text
    assert f"compared with the prior study of 2025-06-01 ({prior_uid})" in page
    assert "growing since 2025-06-01: " in page and "VDT " in page


@pytest.mark.skipif(not DEFAULT_WEIGHTS.exists(), reason="shipped weights missing")
def test_key_image_shows_the_prior_beside_the_current_slice(compared) -> None:  # type: ignore[no-untyped-def]
    """Now on the left, the same place in the prior on the right: the phantom's nodule is
    in both panels (8 mm then, 12 mm now), so both are dense at its centre, the prior's
    over a smaller area."""
    _, series = compared
    keys = [pydicom.dcmread(f) for f in series["files"] if "KEY_" in f]
    (key,) = [k for k in keys if "growing since 2025-06-01" in k.ImageComments]
    assert key.Columns == 2 * SeriesSpec().columns
    assert "prior study of 2025-06-01" in key.DerivationDescription
    grey = key.pixel_array.mean(axis=2)
    spec = SeriesSpec()
    column = round((PHANTOM_NODULE[0] - spec.origin[0]) / spec.pixel_mm)
    row = round((PHANTOM_NODULE[1] - spec.origin[1]) / spec.pixel_mm)
    now, before = grey[:, : spec.columns], grey[:, spec.columns :]
    assert now[row, column] > 200 and before[row, column] > 200  # lung window: nodule white
    bright_now = (now[row - 12 : row + 13, column - 12 : column + 13] > 200).sum()
    bright_before = (before[row - 12 : row + 13, column - 12 : column + 13] > 200).sum()
    assert bright_before < bright_now


def _audit_events(node: Any) -> list[AuditEvent]:
    with node.db() as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.event.like("prior_%"))))


@pytest.mark.slow
@pytest.mark.skipif(not DEFAULT_WEIGHTS.exists(), reason="shipped weights missing")
@pytest.mark.parametrize("retrieve", ["get", "move"])
def test_node_fetches_the_prior_from_pacs(
    start_node: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str], retrieve: str
) -> None:
    """The prior is only in the PACS (Orthanc): the node finds it by C-FIND, fetches it by
    C-GET or C-MOVE, compares, audits both; a C-GET prior leaves nothing in the index, a
    C-MOVE prior is held but never analyzed or reported on its own."""
    port = free_port()
    pacs = Orthanc(
        tmp_path / "pacs", extra={"DicomModalities": {"node": ["RESMTNET", "127.0.0.1", port]}}
    ).start()
    try:
        before = _phantom_study(tmp_path / "before", 8.0, "20250601")
        assert storescu(pacs.dicom_port, sorted(before.iterdir()), called="ORTHANC").returncode == 0
        peer = {
            "name": "pacs",
            "ae_title": "ORTHANC",
            "host": "127.0.0.1",
            "port": pacs.dicom_port,
            "retrieve": retrieve,
        }
        node = start_node(
            node={"port": port},
            workers={"count": 1},
            priors={"enabled": True, "peers": [peer], "timeout_seconds": 30},
        )
        now = _phantom_study(tmp_path / "now", 12.0, "20260601")
        assert storescu(port, sorted(now.iterdir())).returncode == 0
        current_uid = pydicom.dcmread(next(now.iterdir())).SeriesInstanceUID
        wait_for(lambda: _state_of(node, current_uid) == "analyzed", 120, "the analysis")
        capsys.readouterr()
        main(["findings", current_uid, "--config", str(tmp_path / "node0" / "config.yaml")])
        entry = json.loads(capsys.readouterr().out)
        prior = pydicom.dcmread(next(before.iterdir()))
        assert entry["prior"]["study_instance_uid"] == prior.StudyInstanceUID
        (nodule,) = [
            f
            for f in entry["findings"]
            if np.linalg.norm(np.subtract(f["center_mm"], PHANTOM_NODULE)) < 5
        ]
        assert nodule["change"]["status"] == "growing"
        events = {(e.event, e.outcome, e.called_ae) for e in _audit_events(node)}
        assert events == {
            ("prior_query", "success", "ORTHANC"),
            ("prior_retrieve", "success", "ORTHANC"),
        }
        held = _state_of(node, prior.SeriesInstanceUID)
        if retrieve == "get":  # nothing of it kept
            assert held == ""
            assert not list(Path(node.config.storage.path).glob(".prior-*"))
        else:  # held, sent by the PACS, never analyzed: nothing goes into the old study
            wait_for(
                lambda: _state_of(node, prior.SeriesInstanceUID) == "not_selected", 30, "selection"
            )
            with node.db() as session:
                row = index.series_by_uid(session, prior.SeriesInstanceUID)
                assert row is not None and row.calling_ae == "ORTHANC"
                assert "fetched from a PACS as a prior" in row.reason
                assert index.current_result(session, row.id) is None
                # What was found in it is kept: the next comparison reuses it, unfetched.
                current = index.series_by_uid(session, current_uid)
                assert current is not None
                (held_prior,) = index.earlier_analyzed_series(session, current.id)
                assert held_prior.series_uid == prior.SeriesInstanceUID
                kept = ResultRecord.from_json(held_prior.findings_json).findings
                assert any(
                    np.linalg.norm(np.subtract(f.center_mm, PHANTOM_NODULE)) < 5 for f in kept
                )
    finally:
        pacs.stop()


@pytest.mark.skipif(not DEFAULT_WEIGHTS.exists(), reason="shipped weights missing")
def test_an_unreachable_pacs_gives_a_baseline_reading_in_time(
    start_node: Any, tmp_path: Path
) -> None:
    silent = socket.socket()  # listens, never answers: the worst a PACS can do
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    try:
        peer = {
            "name": "pacs",
            "ae_title": "PACS",
            "host": "127.0.0.1",
            "port": silent.getsockname()[1],
        }
        node = start_node(
            workers={"count": 1}, priors={"enabled": True, "peers": [peer], "timeout_seconds": 3}
        )
        now = _phantom_study(tmp_path / "now", 12.0, "20260601")
        started = time.monotonic()
        assert storescu(node.config.node.port, sorted(now.iterdir())).returncode == 0
        current_uid = pydicom.dcmread(next(now.iterdir())).SeriesInstanceUID
        wait_for(lambda: _state_of(node, current_uid) == "analyzed", 120, "the analysis")
        assert time.monotonic() - started < 60
        with node.db() as session:
            record = ResultRecord.from_json(session.scalars(select(Result)).one().findings_json)
        assert record.prior is not None
        assert "pacs (PACS@127.0.0.1" in str(record.prior["reason"])
        assert "did not answer" in str(record.prior["reason"])
        ((event, outcome),) = {(e.event, e.outcome) for e in _audit_events(node)}
        assert (event, outcome) == ("prior_query", "failed")
    finally:
        silent.close()


def _state_of(node: Any, series_uid: str) -> str:
    with node.db() as session:
        row = session.scalars(select(Series).where(Series.series_uid == series_uid)).one_or_none()
        return str(row.state) if row is not None else ""


def test_a_generated_prior_is_written_as_an_earlier_study_of_the_same_patient(
    tmp_path: Path,
) -> None:
    current = _series(_phantom_study(tmp_path / "now", 12.0, "20260601"))
    prior, _ = repositioned(current.volume, seeded(4, "written"))
    write_series_like(current, prior, tmp_path / "prior", earlier_by_days=365)
    back = _series(tmp_path / "prior")
    assert str(back.slices[0].StudyDate) == "20250601"
    assert back.slices[0].PatientID == current.slices[0].PatientID
    assert back.study_instance_uid != current.study_instance_uid
    assert np.allclose(back.volume.origin, prior.origin)
    assert np.abs(back.volume.array - prior.array).max() <= 1.0  # stored as integers
