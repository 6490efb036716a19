"""`dicom-node analyze` end to end on a real LIDC case with the shipped weights."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_node.cli import EXIT_SOME_REJECTED, EXIT_USAGE, main
from dicom_node.pipeline.results import count_findings
from inference.detector import DEFAULT_WEIGHTS
from tests.conftest import shared

pytestmark = pytest.mark.skipif(not DEFAULT_WEIGHTS.exists(), reason="shipped weights missing")


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path, str]:
    out = tmp_path_factory.mktemp("analyze")
    garbage = out / "input" / "not-dicom.dcm"
    garbage.parent.mkdir()
    garbage.write_bytes(b"this is not DICOM" * 20)
    import io
    from contextlib import redirect_stdout

    printed = io.StringIO()
    with redirect_stdout(printed):
        code = main(
            [
                "analyze",
                str(shared("lidc/LIDC-IDRI-0001.tar.xz")),
                str(shared("robustness/siemens-j2k-blank-uids")),
                str(garbage.parent),
                "--out",
                str(out / "results"),
                "--device",
                "cpu",
            ]
        )
    return code, out / "results", printed.getvalue()


def test_exit_code_says_some_input_was_rejected(analyzed) -> None:  # type: ignore[no-untyped-def]
    code, _, printed = analyzed
    assert code == EXIT_SOME_REJECTED
    assert "rejected: " in printed and "SeriesInstanceUID (0020,000E) is empty" in printed
    assert "not-dicom.dcm: not a readable DICOM file" in printed


def test_lidc_0001_nodule_found_and_reported(analyzed) -> None:  # type: ignore[no-untyped-def]
    _, out, printed = analyzed
    report = json.loads((out / "findings.json").read_text())
    summary = json.loads(shared("lidc/nodules.json").read_text())["LIDC-IDRI-0001"]
    (series,) = [s for s in report["series"] if s["status"] == "analyzed"]
    assert series["series_instance_uid"] == Path(summary["series_dir"]).name
    assert set(series["timings_s"]) >= {
        "read",
        "resample",
        "lung_mask",
        "candidates",
        "classify",
        "measure",
        "write",
    }
    assert len(series["model"]["weights_sha256"]) == 64
    findings = series["findings"]
    assert [f["score"] for f in findings] == sorted((f["score"] for f in findings), reverse=True)
    assert len(findings) <= 3  # the nodule plus at most 2 false positives
    nodule = np.array(summary["nodules"][0]["centroid_mm"])
    distances = [np.linalg.norm(np.array(f["center_mm"]) - nodule) for f in findings]
    hit = findings[int(np.argmin(distances))]
    assert min(distances) < 10.0
    assert hit["composition"] == "solid"
    assert hit["laterality"] == ("left" if nodule[0] > 0 else "right")  # +x (LPS) is patient left
    assert hit["lung_rads"] == "4B"
    assert 0.0 <= hit["malignancy_probability"] <= 1.0
    assert hit["diameter_mm"] == pytest.approx(
        (hit["long_axis_mm"] + hit["short_axis_mm"]) / 2, abs=0.06
    )
    assert f": {count_findings(f['finding'] for f in findings)} ->" in printed


def test_written_objects_match_findings_json(analyzed) -> None:  # type: ignore[no-untyped-def]
    _, out, _ = analyzed
    (series,) = [
        s
        for s in json.loads((out / "findings.json").read_text())["series"]
        if s["status"] == "analyzed"
    ]
    folder = out / series["series_instance_uid"]
    names = sorted(p.name for p in folder.iterdir())
    n = len(series["findings"])
    assert names == sorted(["SR.dcm", "SEG.dcm", *[f"KEY_{i:03d}.dcm" for i in range(1, n + 1)]])
    seg = pydicom.dcmread(folder / "SEG.dcm")
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [
        f"{f['finding'].capitalize()} {f['id']}" for f in series["findings"]
    ]


def test_missing_path_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["analyze", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    assert code == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert err.startswith("dicom-node analyze: no such file or folder") and "\n" not in err


def test_wrong_config_key_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("eligibility:\n  min_coverage: 80\n")
    code = main(["analyze", str(tmp_path), "--out", str(tmp_path / "o"), "--config", str(config)])
    assert code == EXIT_USAGE
    assert "eligibility.min_coverage: unknown key" in capsys.readouterr().err


def test_one_failing_series_does_not_stop_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from inference.detector import NoduleDetector
    from tests.dicom_factory import SeriesSpec, ct_datasets, phantom, write_series

    spec = SeriesSpec()
    write_series(tmp_path / "a", ct_datasets(spec, phantom(spec, (-40.0, 10.0, -90.0))))
    write_series(tmp_path / "b", ct_datasets(spec, phantom(spec, None)))
    real_detect = NoduleDetector.detect
    calls: list[int] = []

    def detect_failing_first(self, volume):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("simulated fault")
        return real_detect(self, volume)

    monkeypatch.setattr(NoduleDetector, "detect", detect_failing_first)
    code = main(
        [
            "analyze",
            str(tmp_path / "a"),
            str(tmp_path / "b"),
            "--out",
            str(tmp_path / "o"),
            "--device",
            "cpu",
        ]
    )
    statuses = sorted(
        s["status"] for s in json.loads((tmp_path / "o" / "findings.json").read_text())["series"]
    )
    assert statuses == ["analyzed", "failed"]
    assert code == EXIT_SOME_REJECTED
    printed = capsys.readouterr()
    assert "failed: internal error while analyzing (RuntimeError: simulated fault)" in printed.out
    assert "Traceback" not in printed.out + printed.err


@pytest.mark.parametrize("command", ["analyze", "calibrate"])
def test_corrupt_weights_file_is_a_one_line_error(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = tmp_path / "broken.pt"
    weights.write_bytes(b"not a checkpoint")
    code = main(
        [
            command,
            str(shared("lidc/LIDC-IDRI-0002.tar.xz")),
            "--out",
            str(tmp_path / "o"),
            "--weights",
            str(weights),
        ]
    )
    assert code == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert "broken.pt is not a Res-MTNet weights file" in err and "\n" not in err


@pytest.mark.parametrize(
    ("config_text", "expected"),
    [
        ("node:\n  port: 0\n", "node.port: Input should be greater than or equal to 1"),
        (
            "storage:\n  database_url: postgresql+psycopg://nobody@127.0.0.1:1/none\n",
            "database postgresql+psycopg://nobody@127.0.0.1:1/none: cannot be used (connection failed",
        ),
    ],
)
def test_serve_refuses_a_bad_config_or_database_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], config_text: str, expected: str
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(config_text)
    assert main(["serve", "--config", str(config)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1, err


def test_json_log_lines_are_one_object_each(capsys: pytest.CaptureFixture[str]) -> None:
    from dicom_node.observe.logs import configure

    configure(logging.INFO, json_lines=True)
    try:
        logging.getLogger("dicom_node.pipeline.worker").info(
            "series %s analyzed: %d nodule(s)", "1.2.3", 2
        )
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logging.getLogger("dicom_node.deliver.sender").exception("delivery job %d failed", 7)
    finally:
        configure(logging.WARNING, json_lines=False)
    first, second = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert first["message"] == "series 1.2.3 analyzed: 2 nodule(s)"
    assert (first["level"], first["logger"]) == ("INFO", "dicom_node.pipeline.worker")
    assert (
        second["message"] == "delivery job 7 failed" and "RuntimeError: boom" in second["exception"]
    )


@pytest.mark.parametrize("verbose", [False, True])
def test_library_warnings_reach_only_the_debug_log(verbose: bool) -> None:
    script = (
        "import logging, warnings\n"
        "from dicom_node.observe.logs import configure\n"
        f"configure(logging.{'DEBUG' if verbose else 'WARNING'}, json_lines=False)\n"
        "warnings.warn('one-part patient name', UserWarning)\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    if verbose:
        assert "DEBUG py.warnings: UserWarning: one-part patient name" in run.stderr
    else:
        assert run.stderr == ""


@pytest.mark.parametrize(
    ("option", "given"),
    [
        ("--rotations", "1.5"),
        ("--rotations", "-0.1"),
        ("--rotations", "half"),
        ("--slice-mm", "-1"),
        ("--slice-mm", "25"),
        ("--slice-mm", "thick"),
    ],
)
def test_a_number_out_of_its_range_is_a_one_line_error(
    option: str, given: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["train", option, given, "--out", str(tmp_path / "w.pt")])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert option in err and given in err and "Traceback" not in err
