"""``dicom-node evaluate --cross-case``: the protocol's runs as ``cross_case.json`` and a
markdown table per held-out case, one row per seed, with the spread across seeds."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from inference.lab.protocol import Detection, Run


def _detection(d: Detection | None) -> str:
    if d is None:
        return "-"
    low, high = d.sensitivity_interval
    return (
        f"{d.found}/{d.targets} = {d.sensitivity:.2f} ({low:.2f}-{high:.2f}), "
        f"{d.false_positives_per_scan:.2f} FP/scan; at 1 FP/scan {d.sensitivity_at_1_fp:.2f}; "
        f"CPM {d.cpm:.3f}"
    )


def _real(run: Run) -> str:
    parts = []
    for n in run.real:
        what = "found" if n.found else "missed"
        score = f"score {n.score:.4f}, rank {n.rank}" if n.score is not None else "no candidate"
        kind = "" if n.target else " (not a LUNA16 target)"
        parts.append(f"{n.name}{kind}, {n.diameter_mm:.1f} mm: {what} ({score})")
    return "; ".join(parts) or "none marked"


def _morphologies(detections: list[Detection]) -> str:
    totals: dict[str, list[int]] = {}
    for d in detections:
        for morphology, (found, targets) in d.by_morphology.items():
            counts = totals.setdefault(morphology, [0, 0])
            counts[0] += found
            counts[1] += targets
    return ", ".join(f"{m} {f}/{t}" for m, (f, t) in sorted(totals.items())) or "-"


def _spread(values: list[float]) -> str:
    values = [v for v in values if not np.isnan(v)]
    if not values:
        return "-"
    return f"median {np.median(values):.3f} (range {min(values):.3f}-{max(values):.3f})"


def write_protocol_report(runs: list[Run], out: Path, settings: dict[str, object]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "cross_case.json").write_text(
        json.dumps({"settings": settings, "runs": [asdict(r) for r in runs]}, indent=1) + "\n"
    )
    lines = [
        "# Cross-case protocol",
        "",
        "Each model trained without the held-out case (positives only in the other cases' lungs "
        "and phantoms; real nodules of the training patients), its operating point chosen on "
        "calibration scans of the other cases, then scored on the held-out case: its "
        "reader-marked nodules and false positives, validation patients' real nodules pasted "
        "into its lungs, and synthetic nodules there. Sensitivities with 95 % Wilson intervals.",
        "",
        f"Settings: `{json.dumps(settings)}`",
        "",
    ]
    for held_out in sorted({r.held_out for r in runs}):
        mine = [r for r in runs if r.held_out == held_out]
        lines += [
            f"## Held out: {held_out} (trained on {', '.join(mine[0].trained_on)})",
            "",
            "| seed | threshold | reader-marked nodules at the operating point | false positives "
            "on the scan | pasted real nodules (validation patients) | synthetic nodules |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {r.seed} | {r.threshold:.4f} | {_real(r)} | {r.real_false_positives} | "
            f"{_detection(r.transplanted)} | {_detection(r.synthetic)} |"
            for r in mine
        ]
        lines += [
            "",
            "Across seeds: false positives on the scan "
            + _spread([float(r.real_false_positives) for r in mine])
            + "; pasted real nodules, sensitivity at the operating point "
            + _spread([r.transplanted.sensitivity for r in mine if r.transplanted])
            + ", at 1 FP/scan "
            + _spread([r.transplanted.sensitivity_at_1_fp for r in mine if r.transplanted])
            + "; synthetic CPM "
            + _spread([r.synthetic.cpm for r in mine if r.synthetic])
            + ".",
            "",
            "Synthetic nodules found at the operating point, by morphology (all seeds): "
            + _morphologies([r.synthetic for r in mine if r.synthetic])
            + ".",
            "",
        ]
    path = out / "cross_case.md"
    path.write_text("\n".join(lines))
    return path
