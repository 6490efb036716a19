"""``dicom-node evaluate``: FROC/CPM, hit tables, diameter error and malignancy AUC, written
as markdown with a FROC plot, on held-out synthetic scans and on annotated real scans."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from inference.detector import NoduleDetector
from inference.lab.evaluation import LUNA_FP_RATES, ScanOutcome, auc, froc
from inference.lab.experiments import Case, nodule_row, score_scan, synthetic_outcomes


def _summary(
    outcomes: list[ScanOutcome], rows: list[dict[str, object]], threshold: float
) -> dict[str, object]:
    fps, sens, cpm = froc(outcomes)
    at_rates = {
        str(rate): float(sens[fps <= rate].max()) if np.any(fps <= rate) else 0.0
        for rate in LUNA_FP_RATES
    }
    errors = [abs(float(r["diameter_error_mm"])) for r in rows if r.get("found")]  # type: ignore[arg-type]
    labelled = [r for r in rows if r.get("found") and r.get("malignant") is not None]
    malignancy_auc = auc(
        np.array([float(r["malignancy_probability"]) for r in labelled]),  # type: ignore[arg-type]
        np.array([bool(r["malignant"]) for r in labelled], dtype=bool),
    )
    return {
        "scans": len(outcomes),
        "targets": sum(o.targets() for o in outcomes),
        "cpm": round(cpm, 4),
        "sensitivity_at_fp_rates": at_rates,
        "operating_point": {
            "threshold": threshold,
            "sensitivity": sum(len(o.found(threshold)) for o in outcomes)
            / max(sum(o.targets() for o in outcomes), 1),
            "false_positives_per_scan": sum(o.false_positives(threshold) for o in outcomes)
            / max(len(outcomes), 1),
        },
        "diameter_abs_error_mm": {
            "median": round(float(np.median(errors)), 2) if errors else None,
            "mean": round(float(np.mean(errors)), 2) if errors else None,
            "n": len(errors),
        },
        "malignancy_auc": round(malignancy_auc, 3) if malignancy_auc is not None else None,
        "curve": {"fp_per_scan": fps.tolist(), "sensitivity": sens.tolist()},
    }


def evaluate_and_report(
    detector: NoduleDetector, cases: list[Case], out: Path, seed: int, synthetic_scans: int
) -> dict[str, object]:
    out.mkdir(parents=True, exist_ok=True)
    threshold = detector.operating_point.threshold
    synthetic, synthetic_rows = synthetic_outcomes(
        detector, cases, seed, synthetic_scans, 4, "held-out"
    )
    real, real_rows = [], []
    for case in cases:
        outcome, findings = score_scan(detector, case.volume, list(case.references), case.name)
        real.append(outcome)
        for ref in case.annotated or case.references:
            row = nodule_row(ref, findings, case.name)
            row["false_positives_in_scan"] = outcome.false_positives(threshold)
            real_rows.append(row)
    report: dict[str, object] = {
        "model": detector.info.__dict__,
        "synthetic": _summary(synthetic, synthetic_rows, threshold),
        "real": _summary(real, real_rows, threshold),
        "synthetic_nodules": synthetic_rows,
        "real_nodules": real_rows,
    }
    (out / "evaluation.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    _plot(report, out / "froc.png")
    (out / "evaluation.md").write_text(_markdown(report))
    return report


def _plot(report: dict[str, object], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for key, label in (("synthetic", "held-out synthetic"), ("real", "real (LIDC)")):
        summary = report[key]
        assert isinstance(summary, dict)
        curve = summary["curve"]
        ax.step(
            curve["fp_per_scan"],
            curve["sensitivity"],
            where="post",
            label=f"{label}, CPM {summary['cpm']:.3f}",
        )
    ax.set_xscale("log", base=2)
    ax.set_xlim(0.125, 8)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positives per scan")
    ax.set_ylabel("sensitivity")
    ax.set_title("Res-MTNet FROC (LUNA16 scoring)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _markdown(report: dict[str, object]) -> str:
    lines = [
        "# Res-MTNet evaluation",
        "",
        f"Model: `{report['model']}`",
        "",
        "![FROC](froc.png)",
        "",
    ]
    for key, title in (
        ("synthetic", "Held-out synthetic scans"),
        ("real", "Real scans (LIDC-IDRI)"),
    ):
        s = report[key]
        assert isinstance(s, dict)
        op = s["operating_point"]
        lines += [
            f"## {title}",
            "",
            f"- scans: {s['scans']}, reference nodules: {s['targets']}",
            f"- CPM: **{s['cpm']:.3f}**; sensitivity at "
            + ", ".join(f"{k} FP/scan: {v:.2f}" for k, v in s["sensitivity_at_fp_rates"].items()),
            f"- operating point (score >= {op['threshold']:.3f}): sensitivity {op['sensitivity']:.2f}, "
            f"{op['false_positives_per_scan']:.2f} false positives per scan",
            f"- diameter absolute error: median {s['diameter_abs_error_mm']['median']} mm, "
            f"mean {s['diameter_abs_error_mm']['mean']} mm (n = {s['diameter_abs_error_mm']['n']})",
            f"- malignancy AUC: {s['malignancy_auc'] if s['malignancy_auc'] is not None else 'n/a (one class only)'}",
            "",
        ]
    lines += ["## Per-nodule hit table (real scans)", ""]
    lines += _table(report["real_nodules"])  # type: ignore[arg-type]
    lines += ["", "## Per-nodule hit table (held-out synthetic)", ""]
    lines += _table(report["synthetic_nodules"])  # type: ignore[arg-type]
    return "\n".join(lines) + "\n"


def _table(rows: list[dict[str, object]]) -> list[str]:
    cols = [
        "scan",
        "reference",
        "reference_diameter_mm",
        "composition",
        "found",
        "score",
        "diameter_mm",
        "diameter_error_mm",
        "predicted_composition",
        "malignancy_probability",
        "lung_rads",
    ]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return out
