"""The cross-case protocol: each held-out case is scored by models that never saw its lungs,
with an operating point chosen without it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import inference.lab.protocol as protocol
from dicom_node.lab.cases import load_cases
from dicom_node.lab.protocol_report import write_protocol_report
from inference.detector import OperatingPoint
from inference.lab.evaluation import ScanOutcome
from inference.lab.nodule_folder import NoduleSplit, read_nodule_folder
from inference.lab.training import TrainingConfig
from tests.test_transplant import small_folder


@pytest.mark.slow
def test_a_held_out_case_never_trains_its_own_model(
    lidc_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cases = load_cases([lidc_root])
    nodules = read_nodule_folder(small_folder(tmp_path, rows=12))
    used: list[int] = []
    real_background = protocol.make_background
    monkeypatch.setattr(
        protocol,
        "make_background",
        lambda volume, *rest: used.append(id(volume)) or real_background(volume, *rest),
    )
    tiny = TrainingConfig(
        synthetic=16, transplanted=8, voi_views=8, negatives=16, phantoms=1, epochs=1, batch_size=8
    )
    split = NoduleSplit(seed=5, validation_fraction=0.4, calibration_fraction=0.3)
    runs = protocol.cross_case(cases, nodules, split, tiny, [7], 1.0, torch.device("cpu"), 1, 1)
    by_name = {c.name: c for c in cases}
    assert [r.held_out for r in runs] == sorted(by_name)
    for run, backgrounds in zip(runs, (used[:1], used[1:]), strict=True):
        # The held-out case's volume never became a training background of its runs.
        assert backgrounds == [id(by_name[n].volume) for n in run.trained_on]
        assert run.held_out not in run.trained_on
        marked = by_name[run.held_out].annotated or by_name[run.held_out].references
        thresholds = [a.threshold for a in run.sizes]
        assert [a.min_diameter_mm for a in run.sizes] == list(protocol.MIN_DIAMETERS_MM)
        assert all(np.isfinite(thresholds))
        for at in run.sizes:
            assert [n.name for n in at.real] == [r.name for r in marked]
            assert at.transplanted.targets > 0 and at.synthetic.scans == 1
    report = write_protocol_report(runs, tmp_path / "out", {"seeds": [7]}, 4.0).read_text()
    for name in by_name:
        assert f"## Held out: {name}" in report


@pytest.mark.slow
def test_held_out_names_run_only_that_direction(lidc_root: Path, tmp_path: Path) -> None:
    cases = load_cases([lidc_root])
    nodules = read_nodule_folder(small_folder(tmp_path, rows=12))
    tiny = TrainingConfig(
        synthetic=8, transplanted=4, voi_views=4, negatives=8, phantoms=1, epochs=1, batch_size=8
    )
    split = NoduleSplit(seed=5, validation_fraction=0.4, calibration_fraction=0.3)
    second = sorted(c.name for c in cases)[1]
    kept: dict[str, list[dict[str, Any]]] = {}
    scoring: list[OperatingPoint] = []

    def keep(run: protocol.Run, detector: Any, scans: dict[str, list[ScanOutcome]]) -> None:
        kept.update({group: [o.to_json() for o in outcomes] for group, outcomes in scans.items()})
        scoring.append(detector.operating_point)

    runs = protocol.cross_case(
        cases,
        nodules,
        split,
        tiny,
        [7],
        1.0,
        torch.device("cpu"),
        1,
        1,
        held_out_names=[second],
        on_scores=keep,
        flips=True,
        scan_relative=True,
    )
    # The run's model is calibrated and scored the way it was asked to score.
    assert [(p.flips, p.scan_relative) for p in scoring] == [(True, True)]
    assert [(r.held_out, r.trained_on) for r in runs] == [
        (second, tuple(c.name for c in sorted(cases, key=lambda c: c.name) if c.name != second))
    ]
    # Every scored detection is kept, so operating-point rules can be compared afterwards.
    assert sorted(kept) == ["calibration", "held_out", "synthetic", "transplanted"]
    (scan,) = kept["held_out"]
    assert scan["name"] == second
    assert len(scan["scores"]) == len(scan["hit"]) == len(scan["diameters_mm"]) > 0


def test_an_unknown_held_out_case_is_named(
    lidc_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dicom_node.cli import EXIT_USAGE, main

    folder = small_folder(tmp_path, rows=4)
    args = ["evaluate", str(lidc_root), "--cross-case", "--nodules", str(folder)]
    code = main([*args, "--held-out", "LIDC-IDRI-9999", "--out", str(tmp_path / "o")])
    assert code == EXIT_USAGE
    err = capsys.readouterr().err
    assert "--held-out LIDC-IDRI-9999: not among the annotated cases" in err
    assert "LIDC-IDRI-0001, LIDC-IDRI-0002" in err
