"""The engine: a CT volume in, measured and classified nodules out."""

from __future__ import annotations

import hashlib
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from inference.candidates import bounding_box, find_candidates
from inference.findings import CALCIUM_HU, ModelInfo, NoduleFinding
from inference.lungrads import lung_rads_category
from inference.lungs import segment_lungs
from inference.measure import SOLID_PART_HU, axial_axes, measure, measured_voxels
from inference.network import CHARACTERISTICS, COMPOSITIONS, NetworkConfig, ResMTNet, build_model
from inference.patches import network_input, patch_geometric_centre
from inference.transforms import (
    NETWORK_HU_WINDOW,
    ClipHU,
    Compose,
    ResampleToSpacing,
    ThickenSlices,
)
from inference.volume import Volume

MODEL_NAME = "Res-MTNet"
DEFAULT_WEIGHTS = Path(__file__).parent / "weights" / "resmtnet.pt"
LUNG_MASK_SPACING_MM = 2.5
#: How far under the threshold, in logits of the score, a candidate is still reported because
#: another scan of the patient has a nodule at its place (:meth:`NoduleDetector.look_again`).
#: Chosen at a threshold of 0.93, where it allows down to 0.80: nodules missed at the
#: threshold in generated pairs scored 0.81-0.99 there; 0.5 took a 0.66 shadow at a new
#: nodule's place in the prior for that nodule, calling it stable. In logits it means the
#: same for probabilities and for scan-relative scores.
LOOK_AGAIN_LOGITS = 1.19
#: Per-candidate shapes of the classification outputs, for a scan with no candidate at all.
EMPTY_OUTPUT_SHAPES = {
    "nodule_logit": (),
    "malignancy_logit": (),
    "composition_logits": (len(COMPOSITIONS),),
    "diameter_mm": (),
    "offset_mm": (3,),
    "calcification_logit": (),
    "characteristics": (len(CHARACTERISTICS),),
}


#: With ``OperatingPoint.flips``: how many candidates per scan, the best by their unflipped
#: score, are scored again under the seven other flips. The rest score far below any
#: threshold a scan is read at, and flipping all of them would cost eight times the network.
FLIPPED_CANDIDATES = 64
#: Each axis of a patch (k, j, i) flipped or not: the eight views.
FLIPS: tuple[tuple[bool, bool, bool], ...] = tuple(
    (k, j, i) for k, j, i in itertools.product((False, True), repeat=3)
)


@dataclass(frozen=True)
class OperatingPoint:
    """Stored with the weights: a calibrated score and the threshold findings must reach."""

    threshold: float = 0.5
    temperature: float = 1.0
    max_findings: int = 10
    #: Detections whose estimated diameter is below this are not reported (the size the
    #: network's diameter head gives, before the mask is measured).
    min_diameter_mm: float = 0.0
    #: The best-scoring candidates' outputs averaged over the eight flips of the patch axes
    #: (:data:`FLIPPED_CANDIDATES` per scan). The threshold is chosen with it on or off, as
    #: it will be used.
    flips: bool = False
    #: Scores relative to the scan's own candidates (:func:`relative_scores`) instead of
    #: probabilities calibrated on the training scans; the threshold is chosen on scores
    #: made the same way.
    scan_relative: bool = False


#: With ``OperatingPoint.scan_relative``: a candidate this many median absolute deviations
#: above the median candidate of its scan scores 0.5.
RELATIVE_MIDPOINT = 4.0
#: The least spread (logits) a scan's candidates are taken to have: a scan with few, alike
#: candidates would otherwise stretch small differences into large scores.
MIN_RELATIVE_SPREAD = 0.25


def relative_scores(logits: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Each logit's height above the ``reference`` candidates' median, in their median
    absolute deviations, as a score in 0..1 (:data:`RELATIVE_MIDPOINT` scores 0.5).

    Why: on a scan it never trained in, the network scores that scan's vessels, junctions
    and dots higher as a whole than those of the lungs it learnt (cross-case protocol: the
    upper tail of the candidates' logits moved up by about one logit), so a threshold on
    probabilities chosen on other scans let 11-24 false positives through. Nearly every
    candidate of a chest CT is such a structure, so their median and spread describe how the
    network sees this scan's normal anatomy, and a nodule is what stands out from it; the
    median and the median deviation are not moved by the few nodules among hundreds of
    candidates."""
    reference = reference if len(reference) else logits  # none counted: the whole scan
    if not len(reference):
        return np.zeros(0)
    median = float(np.median(reference))
    spread = float(np.median(np.abs(reference - median)))
    z = (logits - median) / max(spread, MIN_RELATIVE_SPREAD)
    return 1.0 / (1.0 + np.exp(-(z - RELATIVE_MIDPOINT)))


def sha256_of(path: Path) -> str:
    """The weights' checksum, reported with every result so each finding names its model."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class _Stopwatch:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.timings[stage] = round(now - self._last, 3)
        self._last = now


def prepare(
    volume: Volume,
    config: NetworkConfig,
    clock: _Stopwatch | None = None,
    device: torch.device | None = None,
) -> tuple[Volume, np.ndarray]:
    """The network's grid (isotropic, slices as thick as ``config`` asks, HU clipped) and
    the lung mask on it.

    The lungs are segmented on a coarser grid and brought over by nearest neighbour: the
    mask's edge matters to a few millimetres, and the coarse grid is eight times cheaper.
    """
    work = Compose(
        [
            ThickenSlices(config.slice_mm),
            ResampleToSpacing(config.spacing_mm),
            ClipHU(*NETWORK_HU_WINDOW),
        ]
    )(volume)
    if clock:
        clock.lap("resample")
    coarse = segment_lungs(ResampleToSpacing(LUNG_MASK_SPACING_MM)(volume), device)
    coarse = coarse.astype(np.float32)
    zoom = [n / m for n, m in zip(work.array.shape, coarse.shape, strict=True)]
    lungs = ndimage.zoom(coarse, zoom, order=0, grid_mode=True, mode="nearest") > 0.5
    if clock:
        clock.lap("lung_mask")
    return work, lungs


@dataclass
class ScoredCandidates:
    """Candidates after the network, in descending score order where ``keep`` lists them."""

    work: Volume
    centres_kji: np.ndarray  # refined, on the work grid
    points_mm: np.ndarray  # the same, in LPS mm
    scores: np.ndarray  # calibrated, 0..1
    diameters_mm: np.ndarray  # the diameter head's estimate
    keep: np.ndarray  # indices surviving non-maximum suppression, best first
    midline_x_mm: float  # x (LPS) halfway across the lungs: patient left lies above it


@dataclass
class DetectionResult:
    findings: list[NoduleFinding]
    scored: ScoredCandidates
    timings_s: dict[str, float] = field(default_factory=dict)

    @property
    def candidates(self) -> int:
        return len(self.scored.scores)


class NoduleDetector:
    """Holds a loaded Res-MTNet (load once, run on many series)."""

    def __init__(
        self,
        model: ResMTNet,
        operating_point: OperatingPoint,
        info: ModelInfo,
        device: torch.device | None = None,
        batch_size: int = 128,
    ) -> None:
        self.device = device or torch.device("cpu")
        self.model = model.to(self.device).eval()
        if self.device.type == "cpu":
            self.model = self.model.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
        self.operating_point = operating_point
        self.info = info
        self.batch_size = batch_size

    @classmethod
    def from_weights(
        cls,
        path: Path = DEFAULT_WEIGHTS,
        device: str = "auto",
        min_diameter_mm: float | None = None,
    ) -> NoduleDetector:
        """Load weights written by ``dicom-node train``; their config rebuilds the network.
        ``min_diameter_mm`` replaces the smallest reported size stored with them."""
        if not path.is_file():
            raise FileNotFoundError(f"weights file not found: {path}")
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
            config = NetworkConfig(
                **{**checkpoint["config"], "widths": tuple(checkpoint["config"]["widths"])}
            )
            model = build_model(config)
            model.load_state_dict(checkpoint["state_dict"])
            operating_point = OperatingPoint(**checkpoint["operating_point"])
            if min_diameter_mm is not None:
                operating_point = replace(operating_point, min_diameter_mm=min_diameter_mm)
            version = str(checkpoint["version"])
        except Exception as exc:  # torch.load and load_state_dict raise many kinds
            raise ValueError(
                f"{path} is not a Res-MTNet weights file written by `dicom-node train` "
                f"({exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
            ) from exc
        info = ModelInfo(MODEL_NAME, version, sha256_of(path))
        return cls(model, operating_point, info, pick_device(device))

    def detect(
        self, volume: Volume, population: Callable[[np.ndarray], np.ndarray] | None = None
    ) -> DetectionResult:
        """Findings at the stored operating point, measured and classified; ``population``
        as :meth:`score` takes it."""
        clock = _Stopwatch()
        scored = self.score(volume, clock, population)
        point = self.operating_point
        passing = (scored.scores[scored.keep] >= point.threshold) & (
            scored.diameters_mm[scored.keep] >= point.min_diameter_mm
        )
        keep = scored.keep[passing][: point.max_findings]
        findings = self._describe(
            volume, scored.work, scored.centres_kji[keep], scored.scores[keep], scored.midline_x_mm
        )
        clock.lap("measure")
        return DetectionResult(findings, scored, clock.timings)

    def look_again(
        self, volume: Volume, scored: ScoredCandidates, points_mm: np.ndarray, reach_mm: np.ndarray
    ) -> list[NoduleFinding]:
        """Findings under the threshold where another scan of the patient has a nodule: the
        best candidate within ``reach_mm`` of each point scoring at most
        :data:`LOOK_AGAIN_LOGITS` under the threshold. A reader comparing two scans looks at
        the same place in both; a nodule known to be there needs far less evidence than one
        anywhere."""
        picked: list[int] = []
        kept_points = scored.points_mm[scored.keep]
        threshold = min(max(self.operating_point.threshold, 1e-6), 1.0 - 1e-6)
        least = 1.0 / (1.0 + np.exp(LOOK_AGAIN_LOGITS - np.log(threshold / (1.0 - threshold))))
        for point, reach in zip(np.asarray(points_mm).reshape(-1, 3), reach_mm, strict=True):
            near = np.flatnonzero(
                (np.linalg.norm(kept_points - point, axis=1) <= reach)
                & (scored.scores[scored.keep] >= least)
                & (scored.diameters_mm[scored.keep] >= self.operating_point.min_diameter_mm)
            )
            if len(near):
                best = int(scored.keep[near[0]])  # keep is in descending score order
                if best not in picked:
                    picked.append(best)
        return self._describe(
            volume,
            scored.work,
            scored.centres_kji[picked],
            scored.scores[picked],
            scored.midline_x_mm,
        )

    def score(
        self,
        volume: Volume,
        clock: _Stopwatch | None = None,
        population: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> ScoredCandidates:
        """Every candidate scored, refined and suppressed, without a threshold: what a FROC
        curve is drawn from. ``population`` (points in LPS mm -> which of them count) limits
        the candidates that scan-relative scores are measured against; calibration uses it
        to measure a scan against the part of it no training patch saw."""
        clock = clock or _Stopwatch()
        work, lungs = prepare(volume, self.model.config, clock, self.device)
        candidates = find_candidates(work, lungs, device=self.device)
        clock.lap("candidates")
        centres = np.array([c.kji for c in candidates], dtype=int).reshape(-1, 3)
        outputs = self._run(work.array, centres, with_mask=False)
        if self.operating_point.flips:
            outputs = self._averaged_over_flips(work.array, centres, outputs)
        logits = outputs["nodule_logit"]
        scores = self._calibrate(logits)
        clock.lap("classify")
        spacing_kji = np.asarray(work.spacing[::-1])
        refined = patch_geometric_centre(centres) + outputs["offset_mm"] / spacing_kji
        keep = suppress_same_nodule(refined * spacing_kji, scores, outputs["diameter_mm"])
        points = work.index_to_world(refined[:, ::-1]) if len(refined) else np.zeros((0, 3))
        if self.operating_point.scan_relative:
            counted = keep[population(points[keep])] if population is not None else keep
            scores = relative_scores(logits, logits[counted])
        return ScoredCandidates(
            work, refined, points, scores, outputs["diameter_mm"], keep, _midline_x_mm(work, lungs)
        )

    def _averaged_over_flips(
        self, image: np.ndarray, centres: np.ndarray, plain: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """The best :data:`FLIPPED_CANDIDATES` candidates' score, offset and diameter
        averaged over the eight flips (offsets flipped back): a vessel that looks round from
        one side rarely does from all eight, a nodule does."""
        best = np.argsort(plain["nodule_logit"])[::-1][:FLIPPED_CANDIDATES]
        if not len(best):
            return plain
        views = [self._run(image, centres[best], False, flips) for flips in FLIPS[1:]]
        averaged = dict(plain)
        for name in ("nodule_logit", "offset_mm", "diameter_mm"):
            averaged[name] = plain[name].copy()
            averaged[name][best] = (plain[name][best] + sum(v[name] for v in views)) / len(FLIPS)
        return averaged

    def _run(
        self,
        image: np.ndarray,
        centres: np.ndarray,
        with_mask: bool,
        flips: tuple[bool, bool, bool] = (False, False, False),
    ) -> dict[str, np.ndarray]:
        """Outputs for patches around ``centres``, each patch flipped along the axes
        ``flips`` names; offsets come back in the unflipped patch's frame."""
        size, context = self.model.config.patch_voxels, self.model.config.context
        axes = tuple(2 + axis for axis, flipped in enumerate(flips) if flipped)
        back = np.array([-1.0 if flipped else 1.0 for flipped in flips])
        parts: dict[str, list[np.ndarray]] = {}
        for start in range(0, len(centres), self.batch_size):
            patches = network_input(image, centres[start : start + self.batch_size], size, context)
            if axes:
                patches = np.flip(patches, axis=axes)
            outputs = self.run_patches(patches, with_mask)
            if axes:
                outputs["offset_mm"] = outputs["offset_mm"] * back
            for name, value in outputs.items():
                parts.setdefault(name, []).append(value)
        if not parts:
            return {name: np.zeros((0, *shape)) for name, shape in EMPTY_OUTPUT_SHAPES.items()}
        return {name: np.concatenate(values) for name, values in parts.items()}

    @torch.inference_mode()
    def run_patches(self, patches: np.ndarray, with_mask: bool = False) -> dict[str, np.ndarray]:
        """The network's raw outputs for (N, C, P, P, P) patches already in [0, 1] (what
        :func:`~inference.patches.network_input` makes), in batches."""
        parts: dict[str, list[np.ndarray]] = {}
        for start in range(0, len(patches), self.batch_size):
            batch = torch.from_numpy(
                np.ascontiguousarray(patches[start : start + self.batch_size], np.float32)
            ).to(self.device)
            if self.device.type == "cpu":
                batch = batch.contiguous(memory_format=torch.channels_last_3d)
            out = self.model(batch, with_mask=with_mask)
            for name, value in out._asdict().items():
                if value is not None:
                    parts.setdefault(name, []).append(value.float().cpu().numpy())
        return {name: np.concatenate(values) for name, values in parts.items()}

    def _calibrate(self, logits: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-logits / self.operating_point.temperature))

    def _describe(
        self,
        source: Volume,
        work: Volume,
        centres_kji: np.ndarray,
        scores: np.ndarray,
        midline_x_mm: float,
    ) -> list[NoduleFinding]:
        """Second pass on the survivors, centred on the refined positions, with the mask head."""
        if len(centres_kji) == 0:
            return []
        centres = np.round(centres_kji).astype(int)
        out = self._run(work.array, centres, with_mask=True)
        findings = []
        for n, centre in enumerate(centres):
            probability = 1.0 / (1.0 + np.exp(-out["mask_logits"][n, 0]))
            mask, origin = self._mask_on_source(source, work, centre, probability)
            if not mask.any():
                continue
            findings.append(
                finding_from_mask(
                    source,
                    mask,
                    origin,
                    score=float(scores[n]),
                    composition=COMPOSITIONS[int(np.argmax(out["composition_logits"][n]))],
                    malignancy_probability=float(1.0 / (1.0 + np.exp(-out["malignancy_logit"][n]))),
                    midline_x_mm=midline_x_mm,
                    calcification_probability=float(
                        1.0 / (1.0 + np.exp(-out["calcification_logit"][n]))
                    )
                    if "calcification_logit" in out
                    else None,
                )
            )
        # Measured from its mask, a nodule can turn out larger than the diameter head said:
        # two survivors of the first suppression then segment one nodule. Suppressed again
        # with the measured centres and long axes, it is reported once.
        distinct = suppress_same_nodule(
            np.array([f.center_mm for f in findings]).reshape(-1, 3),
            np.array([f.score for f in findings]),
            np.array([f.long_axis_mm for f in findings]),
        )
        return [
            NoduleFinding(**{**findings[n].__dict__, "id": number})
            for number, n in enumerate(distinct, start=1)
        ]

    def _mask_on_source(
        self, source: Volume, work: Volume, centre: np.ndarray, probability: np.ndarray
    ) -> tuple[np.ndarray, tuple[int, int, int]]:
        """Resample the patch's mask probability onto the source grid, threshold at 1/2 and
        keep the component at the patch centre. Measuring on the source grid is measuring
        what the radiologist sees, and the SEG frames are the source frames."""
        size = probability.shape[0]
        corner_kji = centre - size // 2
        corners = (
            np.array(
                [[a, b, c] for a in (0, size - 1) for b in (0, size - 1) for c in (0, size - 1)]
            )
            + corner_kji
        )
        world = work.index_to_world(corners[:, ::-1].astype(float))
        src_ijk = source.world_to_index(world)
        lo = np.maximum(np.floor(src_ijk.min(axis=0)).astype(int), 0)
        hi = np.minimum(np.ceil(src_ijk.max(axis=0)).astype(int) + 1, source.array.shape[::-1])
        if np.any(hi <= lo):
            return np.zeros((0, 0, 0), dtype=bool), (0, 0, 0)
        grid = np.stack(
            np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi, strict=True)], indexing="ij"), -1
        )  # (i, j, k, 3) in source ijk
        work_ijk = work.world_to_index(source.index_to_world(grid.reshape(-1, 3)))
        patch_kji = (work_ijk[:, ::-1] - corner_kji).T
        sampled = ndimage.map_coordinates(
            probability, patch_kji, order=1, mode="constant", cval=0.0
        )
        mask_ijk = sampled.reshape(grid.shape[:3]) > 0.5
        mask = np.ascontiguousarray(mask_ijk.transpose(2, 1, 0))
        labels, count = ndimage.label(mask)
        if count > 1:
            centre_src = source.world_to_index(work.index_to_world(centre[::-1].astype(float)))
            c = np.round(centre_src[::-1] - lo[::-1]).astype(int)
            inside = np.all((c >= 0) & (c < mask.shape))
            label = labels[tuple(c)] if inside else 0
            if label == 0:
                sizes = ndimage.sum_labels(mask, labels, np.arange(1, count + 1))
                label = int(np.argmax(sizes)) + 1
            mask = labels == label
        return mask, (int(lo[2]), int(lo[1]), int(lo[0]))


def finding_from_mask(
    source: Volume,
    mask: np.ndarray,
    origin_kji: tuple[int, int, int],
    *,
    score: float,
    composition: str,
    malignancy_probability: float,
    midline_x_mm: float | None = None,
    calcification_probability: float | None = None,
) -> NoduleFinding:
    """Measure a nodule mask (a box of the source grid at ``origin_kji``) into a finding.

    Everything a radiologist reads off the result (axes, volume, HU, centre, Lung-RADS) is
    computed here from the same voxels the SEG will hold.
    """
    k0, j0, i0 = origin_kji
    box = np.s_[k0 : k0 + mask.shape[0], j0 : j0 + mask.shape[1], i0 : i0 + mask.shape[2]]
    hu = source.array[box]
    mask = measured_voxels(mask, hu, composition)
    spacing_kji = (source.spacing[2], source.spacing[1], source.spacing[0])
    m = measure(mask, hu, spacing_kji)
    solid = axial_axes(mask[m.axial_slice] & (hu[m.axial_slice] >= SOLID_PART_HU), spacing_kji[1:])
    centre_mm = source.index_to_world((np.argwhere(mask).mean(axis=0) + np.array(origin_kji))[::-1])
    calcium = 100.0 * float(np.mean(hu[mask] >= CALCIUM_HU))
    shift = np.array([i0, j0], dtype=float)
    solid_part_mm = (solid.long_axis_mm + solid.short_axis_mm) / 2.0
    finding = NoduleFinding(
        id=0,
        score=score,
        center_mm=(float(centre_mm[0]), float(centre_mm[1]), float(centre_mm[2])),
        long_axis_mm=m.long_axis_mm,
        short_axis_mm=m.short_axis_mm,
        volume_mm3=m.volume_mm3,
        mean_hu=m.mean_hu,
        composition=composition,
        malignancy_probability=malignancy_probability,
        lung_rads="",
        axial_slice=m.axial_slice + k0,
        long_axis_ij=_segment(m.axes.long_ends_ij + shift),
        short_axis_ij=_segment(m.axes.short_ends_ij + shift),
        mask=mask,
        mask_origin_kji=origin_kji,
        laterality=None
        if midline_x_mm is None
        else "left"
        if centre_mm[0] > midline_x_mm
        else "right",
        calcified_volume_percent=calcium,
        calcification_probability=calcification_probability,
        solid_part_mm=solid_part_mm,
    )
    category = lung_rads_category(
        composition, finding.diameter_mm, solid_part_mm, finding.calcified
    )
    return replace(finding, lung_rads=category)


def _midline_x_mm(work: Volume, lungs: np.ndarray) -> float:
    """Halfway between the lungs' outer edges in x; +x in LPS points to the patient's left."""
    box = bounding_box(lungs)
    ends = np.array([[s.start, s.stop - 1] for s in box[::-1]], dtype=float)  # i, j, k ranges
    corners = np.array([[i, ends[1].mean(), ends[2].mean()] for i in ends[0]])
    return float(work.index_to_world(corners)[:, 0].mean())


def _segment(ends: np.ndarray) -> tuple[tuple[float, float], tuple[float, float]]:
    return ((float(ends[0, 0]), float(ends[0, 1])), (float(ends[1, 0]), float(ends[1, 1])))


def suppress_same_nodule(
    points_mm: np.ndarray, scores: np.ndarray, diameters_mm: np.ndarray
) -> np.ndarray:
    """Indices of the detections kept, best first. Non-maximum suppression in mm: a
    lower-scored detection inside a higher one's radius (or within 5 mm) is the same nodule."""
    kept: list[int] = []
    for n in np.argsort(scores)[::-1]:
        if kept:
            d = np.linalg.norm(points_mm[kept] - points_mm[n], axis=1)
            radius = np.maximum(5.0, np.maximum(diameters_mm[kept], diameters_mm[n]) / 2.0)
            if np.any(d < radius):
                continue
        kept.append(int(n))
    return np.array(kept, dtype=int)
