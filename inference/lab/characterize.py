"""What Res-MTNet says of a real nodule given as a volume of interest: malignancy, composition,
calcification and diameter, from the VOI's image and the mask's centroid only (the mask is
never an input: the detector hands over a centre, not an outline)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from inference.detector import NoduleDetector
from inference.lab.nodule_folder import NoduleVOI
from inference.lab.transplant import Placement, voi_input
from inference.network import COMPOSITIONS

#: Test-time flips: each axis flipped or not, the eight views averaged.
FLIPS = tuple((a, b, c) for a in (False, True) for b in (False, True) for c in (False, True))


@dataclass(frozen=True)
class NodulePrediction:
    patient_id: str
    nodule_id: str
    malignancy_probability: float
    composition: str
    #: In COMPOSITIONS order.
    composition_probabilities: tuple[float, float, float]
    #: None for weights trained without the calcification head.
    calcification_probability: float | None
    #: The diameter head's estimate (mm).
    diameter_mm: float


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def voi_views(
    voi: NoduleVOI, spacing_mm: float, size: int, flips: tuple = FLIPS, context: int = 1
) -> np.ndarray:
    """The network's input for one VOI: one (C, P, P, P) view per flip, centred on the
    centroid."""
    centre = np.full(3, size / 2 - 0.5)
    return np.stack(
        [voi_input(voi, spacing_mm, size, Placement(centre, 0.0, f), context) for f in flips]
    )


def characterize(
    detector: NoduleDetector, vois: list[NoduleVOI], flips: tuple = FLIPS
) -> list[NodulePrediction]:
    """One prediction per VOI, the heads' outputs averaged over the test-time views (logits
    for the classifiers, millimetres for the diameter)."""
    config = detector.model.config
    predictions = []
    for voi in vois:
        out = detector.run_patches(
            voi_views(
                voi.thickened(config.slice_mm),
                config.spacing_mm,
                config.patch_voxels,
                flips,
                config.context,
            )
        )
        composition = _softmax(out["composition_logits"].mean(axis=0))
        calcification = out.get("calcification_logit")
        predictions.append(
            NodulePrediction(
                patient_id=voi.patient_id,
                nodule_id=voi.nodule_id,
                malignancy_probability=float(_sigmoid(out["malignancy_logit"].mean())),
                composition=COMPOSITIONS[int(np.argmax(composition))],
                composition_probabilities=(
                    float(composition[0]),
                    float(composition[1]),
                    float(composition[2]),
                ),
                calcification_probability=None
                if calcification is None
                else float(_sigmoid(calcification.mean())),
                diameter_mm=float(out["diameter_mm"].mean()),
            )
        )
    return predictions
