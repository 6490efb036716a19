"""``dicom-node evaluate --nodules``: Res-MTNet's ratings of real nodules, against the
radiologists' where the folder has them.

Writes ``nodule_predictions.csv`` always; with ratings also ``nodule_report.md`` and its ROC
plots: malignancy (>= 4 against <= 2, rating 3 left out) beside the baseline of the diameter
the project itself measures, composition (confusion matrix, balanced accuracy), calcification,
and the diameter's error. Every figure carries a 95 % interval from resampling patients
(nodules of one patient are alike, so they are drawn together).
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inference.lab.characterize import NodulePrediction
from inference.lab.evaluation import auc
from inference.lab.nodule_folder import NoduleVOI
from inference.network import COMPOSITIONS

BOOTSTRAP_ROUNDS = 1000
BOOTSTRAP_SEED = 20261203
CSV_COLUMNS = (
    "patient_id",
    "nodule_id",
    "malignancy_probability",
    "composition",
    "p_solid",
    "p_part_solid",
    "p_ground_glass",
    "calcification_probability",
    "diameter_mm",
)


def write_predictions(predictions: list[NodulePrediction], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for p in predictions:
            writer.writerow(
                [
                    p.patient_id,
                    p.nodule_id,
                    f"{p.malignancy_probability:.4f}",
                    p.composition,
                    *(f"{v:.4f}" for v in p.composition_probabilities),
                    ""
                    if p.calcification_probability is None
                    else f"{p.calcification_probability:.4f}",
                    f"{p.diameter_mm:.2f}",
                ]
            )


@dataclass(frozen=True)
class Figure:
    """A statistic on the nodules, with its 95 % patient-bootstrap interval."""

    value: float | None
    low: float | None
    high: float | None
    n: int

    def __str__(self) -> str:
        if self.value is None:
            return f"n/a (n = {self.n})"
        if self.low is None or self.high is None:
            return f"{self.value:.3f} (n = {self.n})"
        return f"{self.value:.3f} (95 % CI {self.low:.3f} to {self.high:.3f}, n = {self.n})"


def bootstrap(
    statistic: Callable[[np.ndarray], float | None],
    patients: np.ndarray,
    usable: np.ndarray,
    rounds: int = BOOTSTRAP_ROUNDS,
) -> Figure:
    """``statistic(index)`` on the usable nodules, and its 2.5th and 97.5th percentiles over
    resamples of whole patients (the index then repeats a drawn patient's nodules)."""
    value = statistic(np.flatnonzero(usable)) if usable.any() else None
    if value is None:
        return Figure(None, None, None, int(usable.sum()))
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    ids = np.unique(patients[usable])
    members = {p: np.flatnonzero(usable & (patients == p)) for p in ids}
    draws = []
    for _ in range(rounds):
        picked = rng.choice(ids, size=len(ids), replace=True)
        result = statistic(np.concatenate([members[p] for p in picked]))
        if result is not None:
            draws.append(result)
    if not draws:
        return Figure(value, None, None, int(usable.sum()))
    low, high = np.percentile(draws, [2.5, 97.5])
    return Figure(value, float(low), float(high), int(usable.sum()))


def roc_points(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-scores)
    hits = labels[order]
    tpr = np.concatenate([[0.0], np.cumsum(hits) / max(hits.sum(), 1)])
    fpr = np.concatenate([[0.0], np.cumsum(~hits) / max((~hits).sum(), 1)])
    return fpr, tpr


def balanced_accuracy(truth: np.ndarray, predicted: np.ndarray) -> float | None:
    recalls = [
        np.mean(predicted[truth == k] == k) for k in range(len(COMPOSITIONS)) if np.any(truth == k)
    ]
    return float(np.mean(recalls)) if len(recalls) == len(COMPOSITIONS) else None


def nodule_report(
    vois: list[NoduleVOI], predictions: list[NodulePrediction], out: Path
) -> dict[str, object]:
    """The figures (returned, and written as markdown with plots); needs ratings."""
    patients = np.array([v.patient_id for v in vois])
    diameter = np.array([p.diameter_mm for p in predictions])
    malignancy = np.array([p.malignancy_probability for p in predictions])
    truth_malignant = np.array([v.ratings.malignant for v in vois], dtype=object)
    rated = np.array([m is not None for m in truth_malignant])
    labels = np.array([bool(m) for m in truth_malignant])

    def auc_on(scores: np.ndarray) -> Callable[[np.ndarray], float | None]:
        return lambda i: auc(scores[i], labels[i])

    figures: dict[str, object] = {"nodules": len(vois), "patients": len(set(patients))}
    figures["malignancy_auc"] = bootstrap(auc_on(malignancy), patients, rated)
    figures["diameter_auc"] = bootstrap(auc_on(diameter), patients, rated)
    figures["malignancy_minus_diameter_auc"] = bootstrap(
        lambda i: _difference(auc_on(malignancy)(i), auc_on(diameter)(i)), patients, rated
    )
    compositions = np.array([v.ratings.composition for v in vois], dtype=object)
    known = np.array([c is not None for c in compositions])
    truth_comp = np.array([COMPOSITIONS.index(c) if c else -1 for c in compositions])
    pred_comp = np.array([COMPOSITIONS.index(p.composition) for p in predictions])
    figures["composition_balanced_accuracy"] = bootstrap(
        lambda i: balanced_accuracy(truth_comp[i], pred_comp[i]), patients, known
    )
    figures["composition_confusion"] = [
        [int(np.sum(known & (truth_comp == t) & (pred_comp == q))) for q in range(3)]
        for t in range(3)
    ]
    calcified = np.array([v.ratings.calcified for v in vois], dtype=object)
    calc_labels = np.array([bool(c) for c in calcified])
    calc_scores = np.array(
        [
            np.nan if p.calcification_probability is None else p.calcification_probability
            for p in predictions
        ]
    )
    has_calc = np.array([c is not None for c in calcified]) & ~np.isnan(calc_scores)
    figures["calcification_auc"] = bootstrap(
        lambda i: auc(calc_scores[i], calc_labels[i]), patients, has_calc
    )
    reference = np.array(
        [np.nan if v.ratings.diameter_mm is None else v.ratings.diameter_mm for v in vois]
    )
    error = diameter - reference
    has_d = ~np.isnan(reference)
    figures["diameter_abs_error_median_mm"] = bootstrap(
        lambda i: float(np.median(np.abs(error[i]))), patients, has_d
    )
    figures["diameter_bias_median_mm"] = bootstrap(
        lambda i: float(np.median(error[i])), patients, has_d
    )
    _plot_rocs(
        out / "roc.png",
        [
            ("malignancy head", malignancy[rated], labels[rated]),
            ("measured diameter", diameter[rated], labels[rated]),
            ("calcification head", calc_scores[has_calc], calc_labels[has_calc]),
        ],
    )
    (out / "nodule_report.md").write_text(_markdown(figures))
    return figures


def _difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _plot_rocs(path: Path, curves: list[tuple[str, np.ndarray, np.ndarray]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    drawn = 0
    for name, scores, labels in curves:
        value = auc(scores, labels) if len(scores) else None
        if value is None:
            continue
        fpr, tpr = roc_points(scores, labels)
        ax.plot(fpr, tpr, label=f"{name} (AUC {value:.3f})")
        drawn += 1
    ax.plot([0, 1], [0, 1], color="grey", linewidth=0.5)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title("Res-MTNet on real nodules")
    if drawn:
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _markdown(figures: dict[str, object]) -> str:
    confusion = figures["composition_confusion"]
    assert isinstance(confusion, list)
    lines = [
        "# Res-MTNet on real nodules",
        "",
        f"{figures['nodules']} nodules of {figures['patients']} patients. 95 % intervals from "
        f"{BOOTSTRAP_ROUNDS} resamples of patients.",
        "",
        "![ROC](roc.png)",
        "",
        "| figure | value |",
        "| --- | --- |",
        f"| malignancy AUC (rating >= 4 against <= 2) | {figures['malignancy_auc']} |",
        f"| AUC of the measured diameter alone (baseline) | {figures['diameter_auc']} |",
        f"| malignancy AUC minus diameter AUC | {figures['malignancy_minus_diameter_auc']} |",
        f"| composition balanced accuracy (3 classes) | {figures['composition_balanced_accuracy']} |",
        f"| calcification AUC (LIDC 1-5 against 6) | {figures['calcification_auc']} |",
        f"| diameter absolute error, median (mm) | {figures['diameter_abs_error_median_mm']} |",
        f"| diameter error, median (bias, mm) | {figures['diameter_bias_median_mm']} |",
        "",
        "Composition (rows: readers' texture 1-2 ground-glass, 3-4 part-solid, 5 solid; columns: ours):",
        "",
        "| readers \\ ours | " + " | ".join(COMPOSITIONS) + " |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {COMPOSITIONS[t]} | " + " | ".join(str(n) for n in row) + " |"
        for t, row in enumerate(confusion)
    ]
    return "\n".join(lines) + "\n"
