"""Scoring detection as LUNA16 does (FROC, CPM) on synthetic and annotated scans.

A finding hits a reference nodule when its centre lies within the nodule's radius; several
findings on one nodule count once; findings on an excluded region (a smaller or less agreed
lesion) count neither way; everything else is a false positive.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from inference.lab.nodule_folder import NoduleVOI
from inference.lab.synthesis import MORPHOLOGIES, insert_nodule, random_spec
from inference.lab.transplant import Placement, paste_nodule
from inference.measure import measure
from inference.volume import Volume

LUNA_FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
#: LUNA16 excluded findings with unknown size are given this diameter.
EXCLUDED_DEFAULT_DIAMETER_MM = 10.0


@dataclass(frozen=True)
class Reference:
    """A nodule a detector should find, or (``excluded``) a region where it may."""

    center_mm: tuple[float, float, float]
    diameter_mm: float
    composition: str | None = None
    malignant: bool | None = None
    excluded: bool = False
    name: str = ""
    #: What kind of nodule it is: a synthetic morphology, or "real" for a pasted one.
    morphology: str | None = None


@dataclass
class ScanOutcome:
    """All scored detections of one scan, matched against its references."""

    name: str
    references: list[Reference]
    scores: np.ndarray
    points_mm: np.ndarray
    #: The diameter head's estimate per detection (empty: not known, never filtered).
    diameters_mm: np.ndarray = field(default_factory=lambda: np.zeros(0))
    hit: np.ndarray = field(init=False)  # reference index per detection, -1 none, -2 excluded

    def __post_init__(self) -> None:
        self.hit = np.full(len(self.scores), -1, dtype=int)
        for n, point in enumerate(self.points_mm):
            best = None
            for r, ref in enumerate(self.references):
                radius = (
                    ref.diameter_mm if ref.diameter_mm > 0 else EXCLUDED_DEFAULT_DIAMETER_MM
                ) / 2.0
                if np.linalg.norm(point - np.asarray(ref.center_mm)) <= radius and (
                    best is None or not ref.excluded
                ):
                    best = r
            if best is not None:
                self.hit[n] = -2 if self.references[best].excluded else best

    def at_least(self, min_diameter_mm: float) -> ScanOutcome:
        """The same scan with only the detections of at least ``min_diameter_mm``."""
        return self.where(self.diameters_mm >= min_diameter_mm)

    def where(self, keep: np.ndarray) -> ScanOutcome:
        """The same scan with only the detections ``keep`` marks."""
        return ScanOutcome(
            self.name,
            self.references,
            self.scores[keep],
            self.points_mm[keep],
            self.diameters_mm[keep],
        )

    def targets(self) -> int:
        return sum(not r.excluded for r in self.references)

    def to_json(self) -> dict[str, object]:
        """Every scored detection with what it hit, so that operating-point rules can be
        compared afterwards without training again."""
        return {
            "name": self.name,
            "targets": self.targets(),
            "scores": [round(float(s), 6) for s in self.scores],
            "diameters_mm": [round(float(d), 2) for d in self.diameters_mm],
            "hit": [int(h) for h in self.hit],
        }

    def found(self, threshold: float) -> set[int]:
        return {
            int(h) for h, s in zip(self.hit, self.scores, strict=True) if h >= 0 and s >= threshold
        }

    def false_positives(self, threshold: float) -> int:
        return int(np.sum((self.hit == -1) & (self.scores >= threshold)))


def froc(outcomes: list[ScanOutcome]) -> tuple[np.ndarray, np.ndarray, float]:
    """FP-per-scan and sensitivity along the score, and the CPM over LUNA's seven FP rates."""
    total = sum(o.targets() for o in outcomes)
    thresholds = np.unique(np.concatenate([o.scores for o in outcomes] + [np.array([np.inf])]))[
        ::-1
    ]
    fps, sens = [], []
    for t in thresholds:
        fps.append(sum(o.false_positives(t) for o in outcomes) / max(len(outcomes), 1))
        sens.append(sum(len(o.found(t)) for o in outcomes) / max(total, 1))
    fp_arr, sens_arr = np.array(fps), np.array(sens)
    at = [
        float(sens_arr[fp_arr <= rate].max()) if np.any(fp_arr <= rate) else 0.0
        for rate in LUNA_FP_RATES
    ]
    return fp_arr, sens_arr, float(np.mean(at))


def threshold_for_fp_rate(outcomes: list[ScanOutcome], fp_per_scan: float) -> float:
    """The lowest score threshold whose false positives per scan stay within the budget."""
    fp_scores = np.sort(np.concatenate([o.scores[o.hit == -1] for o in outcomes]))[::-1]
    allowed = int(np.floor(fp_per_scan * len(outcomes)))
    if len(fp_scores) <= allowed:
        return 0.05
    return float(np.nextafter(fp_scores[allowed], np.inf))


def synthetic_scan(
    volume: Volume,
    lung_points_mm: np.ndarray,
    avoid_mm: np.ndarray,
    rng: np.random.Generator,
    count: int,
    min_separation_mm: float = 40.0,
    real: Sequence[NoduleVOI] = (),
    real_fraction: float = 0.5,
) -> tuple[Volume, list[Reference]]:
    """A copy of ``volume`` with ``count`` nodules at lung points: a ``real_fraction`` of
    them real ones from ``real`` pasted in (when given), the others synthetic. Their truth is
    measured on the scan's own grid exactly as the engine measures its findings."""
    image = volume.array.copy()
    spacing_kji = np.asarray(volume.spacing[::-1])
    chosen: list[np.ndarray] = []
    references = []
    for _ in range(count * 50):
        if len(chosen) == count:
            break
        point = lung_points_mm[rng.integers(len(lung_points_mm))]
        others = [*avoid_mm, *chosen]
        if (
            others
            and np.min(np.linalg.norm(np.asarray(others) - point, axis=1)) < min_separation_mm
        ):
            continue
        centre_kji = volume.world_to_index(point)[::-1]
        if real and rng.random() < real_fraction:
            voi = real[int(rng.integers(len(real)))]
            placement = Placement.random(centre_kji, rng)
            mask = paste_nodule(image, spacing_kji, voi, placement, rng)
            composition, malignant = voi.ratings.composition, voi.ratings.malignant
            name, morphology = f"real {voi.key}", "real"
        else:
            # Every morphology equally often, so each one's sensitivity can be read.
            spec = random_spec(rng, min_mm=4.0, morphology=str(rng.choice(MORPHOLOGIES)))
            mask = insert_nodule(image, spec, centre_kji, spacing_kji, rng)
            composition, malignant = spec.composition, None
            name, morphology = f"synthetic {spec.morphology} {spec.composition}", spec.morphology
        if not mask.any():
            continue
        m = measure(mask, image, tuple(spacing_kji))
        centre = volume.index_to_world(np.argwhere(mask).mean(axis=0)[::-1])
        references.append(
            Reference(
                (float(centre[0]), float(centre[1]), float(centre[2])),
                m.diameter_mm,
                composition,
                malignant,
                name=f"{name} {m.diameter_mm:.1f} mm",
                morphology=morphology,
            )
        )
        chosen.append(point)
    return volume.with_array(image), references


def auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Area under the ROC curve (Mann-Whitney); None when only one class is present."""
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return None
    greater = (pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()
    return float(greater / (len(pos) * len(neg)))
