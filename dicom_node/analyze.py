"""``dicom-node analyze``: series on disk -> findings -> SR, SEG, key images and findings.json."""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import UTC, datetime
from pathlib import Path

from pydicom.dataset import Dataset

from dicom_node import __version__
from dicom_node.cli import EXIT_NONE_ANALYZED, EXIT_OK, EXIT_SOME_REJECTED
from dicom_node.config import load_config
from dicom_node.pipeline.priors import (
    PriorChoice,
    PriorOutcome,
    choose_prior,
    read_against_prior,
)
from dicom_node.pipeline.results import ResultRecord, build_results, count_findings
from dicom_node.pipeline.series import CTSeries, read_series, unpacked
from dicom_node.writers.common import TimePoint
from inference.detector import NoduleDetector
from inference.findings import NoduleFinding

log = logging.getLogger(__name__)


def write_atomically(ds: Dataset, path: Path) -> None:
    """Temporary file, fsync, rename: a crash leaves the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    ds.save_as(tmp, enforce_file_format=True)
    with tmp.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def analyze_paths(
    paths: list[Path],
    out: Path,
    weights: Path,
    device: str,
    config: Path | None,
    priors: list[Path] | None = None,
) -> int:
    """Analyze every series under ``paths`` (folders, files, .tar.xz archives); with
    ``priors``, compare each with the same patient's most recent eligible earlier CT there.

    Returns the command's exit status: every series analyzed, some rejected or files
    unreadable, or nothing analyzed.
    """
    settings = load_config(config)
    rules = settings.eligibility
    started = time.perf_counter()
    with unpacked(paths) as folders:
        series_list, rejected, unreadable = read_series(folders, rules)
    earlier: list[CTSeries] = []
    if priors:
        with unpacked(priors) as folders:
            earlier, prior_rejected, prior_unreadable = read_series(folders, rules)
        for uid, reason in prior_rejected.items():
            print(f"prior series {uid}: not usable: {reason}")
        unreadable += prior_unreadable
    read_s = time.perf_counter() - started
    for bad in unreadable:
        print(f"skipped {bad.path}: {bad.reason}")
    if not series_list and not rejected:
        print("no DICOM series found")
        return EXIT_NONE_ANALYZED
    detector = (
        NoduleDetector.from_weights(weights, device, settings.detection.min_diameter_mm)
        if series_list
        else None
    )
    out.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, object]] = []
    for uid, reason in rejected.items():
        print(f"series {uid}: rejected: {reason}")
        records.append({"series_instance_uid": uid, "status": "rejected", "reason": reason})
    for series in series_list:
        assert detector is not None
        try:
            choice = (
                choose_prior(series, earlier, settings.priors)
                if priors
                else PriorChoice(None, "no earlier CT was given (--prior)")
            )
            records.append(
                _analyze_one(series, detector, out, read_s / max(len(series_list), 1), choice)
            )
        except Exception as exc:  # one series' failure must not cost the others their results
            log.debug("series %s failed", series.series_instance_uid, exc_info=True)
            reason = (
                f"internal error while analyzing ({exc.__class__.__name__}: {exc}); see the log"
            )
            print(f"series {series.series_instance_uid}: failed: {reason}")
            records.append(
                {
                    "series_instance_uid": series.series_instance_uid,
                    "status": "failed",
                    "reason": reason,
                }
            )
    model = detector.info if detector else None
    report = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "software": {"name": "dicom-node", "version": __version__},
        "not_for_diagnostic_use": True,
        "model": model.__dict__ if model else None,
        "series": records,
        "unreadable_files": [{"path": str(b.path), "reason": b.reason} for b in unreadable],
    }
    (out / "findings.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"findings: {out / 'findings.json'}")
    analyzed = sum(r["status"] == "analyzed" for r in records)
    if analyzed == 0:
        return EXIT_NONE_ANALYZED
    return EXIT_SOME_REJECTED if analyzed < len(records) or unreadable else EXIT_OK


def _analyze_one(
    series: CTSeries, detector: NoduleDetector, out: Path, read_s: float, choice: PriorChoice
) -> dict[str, object]:
    result = detector.detect(series.volume)
    compared = time.perf_counter()
    outcome = (
        read_against_prior(detector, series, result, choice.prior, choice.interval_days)
        if choice.prior is not None
        else PriorOutcome.baseline(result.findings, choice.reason)
    )
    findings, time_point = outcome.findings, outcome.time_point
    prior_s = time.perf_counter() - compared
    started = time.perf_counter()
    objects = build_results(series, findings, detector.info, time_point=time_point)
    folder = out / series.series_instance_uid
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    names = ["SR.dcm"] + (["SEG.dcm"] if objects.seg is not None else [])
    names += [f"KEY_{n:03d}.dcm" for n in range(1, len(objects.key_images) + 1)]
    for name, ds in zip(names, objects.all(), strict=True):
        write_atomically(ds, folder / name)
        files.append(str(folder / name))
    timings = {
        "read": round(read_s, 3),
        **result.timings_s,
        **({"prior": round(prior_s, 3)} if time_point.follow_up else {}),
        "write": round(time.perf_counter() - started, 3),
    }
    _print_table(series, findings, folder, time_point)
    record = ResultRecord.of(
        findings,
        objects,
        result.candidates,
        timings,
        time_point,
        outcome.prior,
    )
    return {
        "series_instance_uid": series.series_instance_uid,
        "study_instance_uid": series.study_instance_uid,
        "status": "analyzed",
        "model": detector.info.__dict__,
        "timings_s": timings,
        "candidates": result.candidates,
        **record.findings_entry(),
        "files": files,
    }


def _print_table(
    series: CTSeries, findings: list[NoduleFinding], folder: Path, time_point: TimePoint
) -> None:
    found = count_findings(f.kind for f in findings)
    print(f"series {series.series_instance_uid}: {found} -> {folder}")
    if not time_point.follow_up:
        print(f"  baseline reading: {time_point.baseline_reason}")
    if findings:
        print(
            f"  {'id':>3} {'score':>5} {'diam mm':>7} {'vol mm3':>8} {'composition':<12} {'malig':>5} {'L-RADS':<6} centre (LPS mm)"
        )
    for n, f in enumerate(findings):
        centre = ", ".join(f"{c:.1f}" for c in f.center_mm)
        print(
            f"  {f.id:>3} {f.score:>5.2f} {f.diameter_mm:>7.1f} {f.volume_mm3:>8.0f} {f.composition:<12} "
            f"{f.malignancy_probability:>5.2f} {f.lung_rads:<6} ({centre})"
        )
        if time_point.follow_up:
            print(f"      {time_point.describe(time_point.change(n))}")
    for gone in time_point.resolved:
        print(f"  prior {gone.finding} {gone.id} ({gone.diameter_mm:.1f} mm): resolved")
