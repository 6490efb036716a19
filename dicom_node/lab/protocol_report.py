"""``dicom-node evaluate --cross-case``: the protocol's runs as ``cross_case.json`` and, per
held-out case, a table per seed at the chosen smallest size, the spread across seeds, and how
each smallest reported size would have done."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from inference.lab.protocol import MIN_DIAMETERS_MM, AtSize, Detection, Run


def _detection(d: Detection) -> str:
    low, high = d.sensitivity_interval
    return (
        f"{d.found}/{d.targets} = {d.sensitivity:.2f} ({low:.2f}-{high:.2f}), "
        f"{d.false_positives_per_scan:.2f} FP/scan; at 1 FP/scan {d.sensitivity_at_1_fp:.2f}; "
        f"CPM {d.cpm:.3f}"
    )


def _real(at: AtSize) -> str:
    parts = []
    for n in at.real:
        what = "found" if n.found else "missed"
        score = f"score {n.score:.4f}, rank {n.rank}" if n.score is not None else "no candidate"
        kind = "" if n.target else " (not a LUNA16 target)"
        parts.append(f"{n.name}{kind}, {n.diameter_mm:.1f} mm: {what} ({score})")
    return "; ".join(parts) or "none marked"


def _spread(values: list[float]) -> str:
    values = [v for v in values if not np.isnan(v)]
    if not values:
        return "-"
    return f"{np.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def _morphologies(detections: list[Detection]) -> str:
    totals: dict[str, list[int]] = {}
    for d in detections:
        for morphology, (found, targets) in d.by_morphology.items():
            counts = totals.setdefault(morphology, [0, 0])
            counts[0] += found
            counts[1] += targets
    return ", ".join(f"{m} {f}/{t}" for m, (f, t) in sorted(totals.items())) or "-"


def write_protocol_report(
    runs: list[Run], out: Path, settings: dict[str, object], chosen_mm: float
) -> Path:
    """``chosen_mm``: the smallest reported size the per-seed tables show."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "cross_case.json").write_text(
        json.dumps({"settings": settings, "runs": [asdict(r) for r in runs]}, indent=1) + "\n"
    )
    lines = [
        "# Cross-case protocol",
        "",
        "Each model trained without the held-out case (positives only in the other cases' lungs "
        "and phantoms, in the patient-right half of their lungs; real nodules of the training "
        "patients), its operating point chosen on calibration scans of the other cases, in the "
        "half of their lungs that never trained, then scored on the held-out case: its "
        "reader-marked nodules and false positives, validation patients' real nodules pasted "
        "into its lungs, and synthetic nodules there. Sensitivities with 95 % Wilson intervals; "
        "across seeds, the median (range).",
        "",
        f"Settings: `{json.dumps(settings)}`",
        "",
    ]
    for held_out in sorted({r.held_out for r in runs}):
        mine = [r for r in runs if r.held_out == held_out]
        chosen = [r.at(chosen_mm) for r in mine]
        lines += [
            f"## Held out: {held_out} (trained on {', '.join(mine[0].trained_on)})",
            "",
            f"Smallest reported size {chosen_mm:g} mm.",
            "",
            "| seed | threshold | reader-marked nodules at the operating point | false positives "
            "on the scan | pasted real nodules (validation patients) | synthetic nodules |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {r.seed} | {a.threshold:.4f} | {_real(a)} | {a.real_false_positives} | "
            f"{_detection(a.transplanted)} | {_detection(a.synthetic)} |"
            for r, a in zip(mine, chosen, strict=True)
        ]
        lines += [
            "",
            "Synthetic nodules found at the operating point, by morphology (all seeds): "
            + _morphologies([a.synthetic for a in chosen])
            + ".",
            "",
            "By smallest reported size (each with its own threshold from the calibration scans):",
            "",
            "| smallest size (mm) | false positives on the scan | reader-marked nodules found "
            "| pasted: sensitivity | pasted: FP/scan | pasted: sensitivity at 1 FP/scan "
            "| synthetic: sensitivity |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for size in MIN_DIAMETERS_MM:
            at = [r.at(size) for r in mine]
            lines.append(
                f"| {size:g} | {_spread([float(a.real_false_positives) for a in at])} | "
                f"{_spread([float(sum(n.found for n in a.real)) for a in at])} | "
                f"{_spread([a.transplanted.sensitivity for a in at])} | "
                f"{_spread([a.transplanted.false_positives_per_scan for a in at])} | "
                f"{_spread([a.transplanted.sensitivity_at_1_fp for a in at])} | "
                f"{_spread([a.synthetic.sensitivity for a in at])} |"
            )
        lines.append("")
    path = out / "cross_case.md"
    path.write_text("\n".join(lines))
    return path
