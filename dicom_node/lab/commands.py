"""``dicom-node train``, ``calibrate`` and ``evaluate``: annotated cases in, weights or a
report out.

A user's mistake (no annotated case where one was named) raises ``ValueError`` with the
sentence the command line prints; progress goes to the terminal.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from dicom_node import __version__
from dicom_node.lab.cases import load_cases
from dicom_node.lab.nodule_report import nodule_report, write_predictions
from dicom_node.lab.protocol_report import write_protocol_report
from dicom_node.lab.report import evaluate_and_report
from inference.detector import (
    MODEL_NAME,
    NoduleDetector,
    OperatingPoint,
    pick_device,
    sha256_of,
)
from inference.findings import ModelInfo
from inference.lab.characterize import characterize
from inference.lab.evaluation import ScanOutcome
from inference.lab.experiments import Case, calibration_outcomes, choose_threshold
from inference.lab.nodule_folder import NoduleSplit, NoduleVOI, read_nodule_folder
from inference.lab.protocol import Run, cross_case
from inference.lab.training import TrainingConfig, make_background, save_weights, train_model
from inference.network import ResMTNet


def train(
    data: list[Path],
    out: Path,
    config: TrainingConfig,
    nodules: Path | None,
    split: NoduleSplit,
    fp_per_scan: float,
    min_diameter_mm: float,
    device_name: str,
    flips: bool = False,
    scan_relative: bool = False,
) -> None:
    """Train on every case under ``data`` and the training patients of the nodule folder;
    the operating point is chosen on fresh scans of those cases holding synthetic nodules and
    the calibration patients' real ones, for ``fp_per_scan`` false positives per scan, and
    stored with the weights. The folder's validation patients are never used."""
    device = pick_device(device_name)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cases = load_cases(data)
    if not cases:
        raise ValueError(f"no annotated cases found under {', '.join(map(str, data))}")
    vois = read_nodule_folder(nodules) if nodules is not None else []
    learn, calibrate = split.select(vois, "train"), split.select(vois, "calibration")
    print(
        f"training on {len(cases)} scan(s) + phantoms and {len(learn)} real nodule(s), "
        f"device {device}"
    )
    backgrounds = [make_background(c.volume, c.avoid_mm, config.network) for c in cases]
    trained = train_model(backgrounds, config, device, learn)
    model, record, temperature = trained.model, trained.record, trained.temperature
    detector = NoduleDetector(
        model,
        OperatingPoint(
            threshold=0.0, temperature=temperature, flips=flips, scan_relative=scan_relative
        ),
        ModelInfo(MODEL_NAME, __version__, "unsaved"),
        device,
    )
    operating_point = choose_operating_point(
        detector, cases, calibrate, config.seed, fp_per_scan, min_diameter_mm
    )
    record["operating_point"] = {**operating_point, "chosen_for_fp_per_scan": fp_per_scan}
    record["nodule_split"] = {
        "folder": str(nodules) if nodules is not None else None,
        **asdict(split),
        "patients": {
            part: len({v.patient_id for v in split.select(vois, part)})
            for part in ("train", "calibration", "validation")
        },
    }
    _write_weights(out, model, record, operating_point)


def choose_operating_point(
    detector: NoduleDetector,
    cases: list[Case],
    calibrate: list[NoduleVOI],
    seed: int,
    fp_per_scan: float,
    min_diameter_mm: float,
) -> dict[str, float | bool]:
    """The threshold for ``fp_per_scan`` false positives per scan on fresh scans of
    ``cases`` holding synthetic nodules and the ``calibrate`` patients' real ones, with
    ``detector``'s way of scoring: what is stored with the weights."""
    outcomes = calibration_outcomes(detector, cases, seed + 1, calibrate)
    point = detector.operating_point
    return {
        "threshold": choose_threshold(outcomes, fp_per_scan, min_diameter_mm),
        "temperature": point.temperature,
        "max_findings": point.max_findings,
        "min_diameter_mm": min_diameter_mm,
        "flips": point.flips,
        "scan_relative": point.scan_relative,
    }


def _write_weights(
    out: Path, model: ResMTNet, record: dict[str, Any], operating_point: dict[str, float | bool]
) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(save_weights(model, record, operating_point, __version__))
    record["weights_sha256"] = sha256_of(out)
    out.with_suffix(".json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    threshold = operating_point["threshold"]
    print(f"weights: {out} (sha256 {record['weights_sha256']}), threshold {threshold:.4f}")


def calibrate(
    data: list[Path],
    weights: Path,
    out: Path,
    nodules: Path | None,
    split: NoduleSplit,
    fp_per_scan: float,
    min_diameter_mm: float,
    device_name: str,
    flips: bool | None = None,
    scan_relative: bool | None = None,
) -> None:
    """Choose trained weights' operating point again, for another way of scoring or another
    budget, by the procedure ``train`` ends with (same calibration scans: the training seed
    is read from the weights); the network is left as it is. ``flips`` and
    ``scan_relative`` left at None keep what the weights hold."""
    detector = NoduleDetector.from_weights(weights, device_name)
    stored = detector.operating_point
    flips = stored.flips if flips is None else flips
    scan_relative = stored.scan_relative if scan_relative is None else scan_relative
    record = torch.load(weights, map_location="cpu", weights_only=False)["training"]
    cases = load_cases(data)
    if not cases:
        raise ValueError(f"no annotated cases found under {', '.join(map(str, data))}")
    calibrating = split.select(read_nodule_folder(nodules), "calibration") if nodules else []
    detector.operating_point = replace(
        detector.operating_point, threshold=0.0, flips=flips, scan_relative=scan_relative
    )
    seed = int(record["config"]["seed"])
    print(f"calibrating {weights} on {len(cases)} scan(s) and {len(calibrating)} real nodule(s)")
    operating_point = choose_operating_point(
        detector, cases, calibrating, seed, fp_per_scan, min_diameter_mm
    )
    record["operating_point"] = {
        **operating_point,
        "chosen_for_fp_per_scan": fp_per_scan,
        "chosen_by": f"dicom-node calibrate {__version__}",
    }
    _write_weights(out, detector.model, record, operating_point)


def evaluate(
    data: list[Path],
    out: Path,
    weights: Path,
    luna_csv: Path | None,
    seed: int,
    synthetic_scans: int,
    device_name: str,
) -> None:
    """FROC/CPM and per-nodule tables on held-out synthetic scans and the annotated cases."""
    detector = NoduleDetector.from_weights(weights, device_name)
    cases = load_cases(data, luna_csv)
    if not cases:
        where = ", ".join(map(str, data))
        raise ValueError(f"no annotated cases (a LIDC XML beside a CT series) under {where}")
    evaluate_and_report(detector, cases, out, seed, synthetic_scans)
    print(f"report: {out / 'evaluation.md'}")


def evaluate_nodules(
    folder: Path,
    out: Path,
    weights: Path,
    device_name: str,
    split: NoduleSplit,
    part: str | None,
) -> None:
    """Ratings of every nodule of ``folder`` (laid out like lidc-nodules), or of one ``part``
    of its patients by ``split``, into ``out/nodule_predictions.csv``; against the readers'
    where the folder has their ratings."""
    detector = NoduleDetector.from_weights(weights, device_name)
    vois = read_nodule_folder(folder)
    if part is not None:
        vois = split.select(vois, part)
    if not vois:
        raise ValueError(f"{folder / 'metadata.csv'} lists no nodule")
    out.mkdir(parents=True, exist_ok=True)
    predictions = characterize(detector, vois)
    write_predictions(predictions, out / "nodule_predictions.csv")
    print(f"predictions: {out / 'nodule_predictions.csv'} ({len(predictions)} nodules)")
    if any(v.ratings.malignancy is not None or v.ratings.texture is not None for v in vois):
        nodule_report(vois, predictions, out)
        print(f"report: {out / 'nodule_report.md'}")


def evaluate_cross_case(
    data: list[Path],
    luna_csv: Path | None,
    nodules: Path,
    out: Path,
    config: TrainingConfig,
    split: NoduleSplit,
    seeds: list[int],
    fp_per_scan: float,
    device_name: str,
    transplant_scans: int,
    synthetic_scans: int,
    min_diameter_mm: float,
    held_out: list[str],
    flips: bool = False,
    scan_relative: bool = False,
) -> None:
    """The cross-case protocol (:mod:`inference.lab.protocol`) on the annotated cases under
    ``data``: one model per held-out case and seed, each trained and calibrated without it;
    only the ``held_out`` cases are held out where named."""
    cases = load_cases(data, luna_csv)
    if len(cases) < 2:
        raise ValueError(f"the cross-case protocol needs two annotated cases; found {len(cases)}")
    unknown = sorted(set(held_out) - {c.name for c in cases})
    if unknown:
        raise ValueError(
            f"--held-out {', '.join(unknown)}: not among the annotated cases "
            f"({', '.join(sorted(c.name for c in cases))})"
        )
    vois = read_nodule_folder(nodules)
    settings = {
        "cases": [c.name for c in cases],
        "seeds": seeds,
        "fp_per_scan": fp_per_scan,
        "transplant_scans": transplant_scans,
        "synthetic_scans": synthetic_scans,
        "nodules": str(nodules),
        "split": asdict(split),
        "training": {
            **{k: v for k, v in asdict(config).items() if k not in ("seed", "network")},
            "slice_mm": config.network.slice_mm,
        },
        "held_out": held_out or "all",
        "detection_flips": flips,
        "scan_relative": scan_relative,
    }

    def report(runs: list[Run]) -> None:
        path = write_protocol_report(runs, out, settings, min_diameter_mm)
        print(f"report ({len(runs)} run(s) so far): {path}")

    def keep_scores(
        run: Run, detector: NoduleDetector, scans: dict[str, list[ScanOutcome]]
    ) -> None:
        """Each run's scored detections and its model, to try operating-point rules and
        detection-time changes afterwards without training again."""
        name = f"{run.held_out}-seed{run.seed}"
        groups = {group: [o.to_json() for o in outcomes] for group, outcomes in scans.items()}
        (out / f"scores-{name}.json").write_text(json.dumps(groups))
        operating_point = {
            **asdict(detector.operating_point),
            "threshold": run.at(min_diameter_mm).threshold,
            "min_diameter_mm": min_diameter_mm,
        }
        record: dict[str, object] = {
            "cross_case": {"held_out": run.held_out, "seed": run.seed, **settings}
        }
        weights = save_weights(detector.model, record, operating_point, __version__)
        (out / f"model-{name}.pt").write_bytes(weights)

    cross_case(
        cases,
        vois,
        split,
        config,
        seeds,
        fp_per_scan,
        pick_device(device_name),
        transplant_scans,
        synthetic_scans,
        report,
        held_out,
        keep_scores,
        flips,
        scan_relative,
    )
