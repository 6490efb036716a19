"""Training Res-MTNet on real and synthetic nodules in real lungs, reproducibly, with
progress bars.

Positives come from three sources: synthetic nodules blended into the lungs of the given scans
and of synthetic chest phantoms (exact masks, every size and composition); real nodules of a
nodule folder pasted into those lungs (real textures at new places); and the same real nodules
as their own VOI shows them (what ``evaluate --nodules`` sees). Nothing is placed within
``AVOID_MM`` of a scan's annotated nodules, so that a case's own nodules never become training
positives or negatives. Negatives are the candidates the blob search finds in the same lungs:
vessels and their junctions, airway walls, pleura, fissures, scars. With ``hard_negatives``,
the second half of training also sees, each epoch, the candidates the model then scores
highest: on an unseen scan its false positives are the vessels it ranks among nodules, and a
random draw of candidates holds few of those. With ``voi_negatives``, real lung of other
patients joins them: views of the nodule folder's VOIs centred away from the nodule, mostly on
a vessel or the pleura, since two scans' lungs are all the negatives the shared cases hold.

The patient-left half of each real scan's lungs never trains (:class:`LungHalves`): the
operating point is chosen there, among vessels and pleura the network was never told are not
nodules, as in a new patient's scan. Chosen among its own training negatives, which it has
learnt by heart, the threshold fell far too low for any other scan.

Each head learns only where its label is known: malignancy, calcification and the LIDC
characteristics from the radiologists' ratings of real nodules, composition and size from
both sources, detection and the mask from all.
"""

from __future__ import annotations

import functools
import io
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from tqdm import tqdm

from inference.candidates import find_candidates
from inference.detector import MODEL_NAME, prepare
from inference.lab.nodule_folder import NoduleVOI, Ratings
from inference.lab.synthesis import chest_phantom, insert_nodule, random_spec
from inference.lab.transplant import (
    Placement,
    paste_nodule,
    placement_showing,
    voi_input,
    voi_mask_patch,
)
from inference.network import CHARACTERISTICS, COMPOSITIONS, NetworkConfig, ResMTNet, build_model
from inference.patches import crop_cube, network_input, patch_geometric_centre
from inference.transforms import ThickenSlices
from inference.volume import Volume

#: Patches for training are cut this far from any annotated nodule (a 40 mm patch's corner
#: still holds the rim of a nodule 30 mm away).
AVOID_MM = 45.0
LOSS_WEIGHTS = {
    "detection": 1.0,
    "malignancy": 1.0,
    "composition": 0.5,
    "calcification": 0.5,
    "characteristics": 0.5,
    "diameter": 1.0,
    "offset": 1.0,
    "mask": 1.0,
}


@dataclass(frozen=True)
class TrainingConfig:
    seed: int = 20261126
    #: Positive patches of each source, and negative patches.
    synthetic: int = 2000
    transplanted: int = 2000
    voi_views: int = 1500
    negatives: int = 4000
    #: Negative patches cut from the real nodules' VOIs away from the nodule (0: none).
    voi_negatives: int = 0
    #: Candidates added to each epoch of the second half of training: those the model then
    #: scores highest among every candidate of the backgrounds (0: none).
    hard_negatives: int = 0
    #: Share of training patches turned to a random orientation in each batch (0: flips
    #: and transposes only).
    rotations: float = 0.0
    phantoms: int = 2
    epochs: int = 10
    batch_size: int = 32
    learning_rate: float = 2e-3
    validation_fraction: float = 0.1
    network: NetworkConfig = field(default_factory=lambda: NetworkConfig(rating_heads=True))


@dataclass(frozen=True)
class LungHalves:
    """The lungs cut by a sagittal plane through their median voxel: the patient's right
    half trains, the left half (half of the lungs' voxels) calibrates."""

    split_x_mm: float  # LPS x of the plane; patient left lies above it
    #: Training patches are centred at least this far right of the plane: half a patch, so
    #: that none reaches into the calibrating half.
    margin_mm: float

    @classmethod
    def of(cls, work: Volume, lungs: np.ndarray, patch_mm: float) -> LungHalves:
        voxels = np.argwhere(lungs[::2, ::2, ::2]) * 2
        x_mm = work.index_to_world(voxels[:, ::-1].astype(float))[:, 0]
        return cls(float(np.median(x_mm)), patch_mm / 2.0)

    def trains(self, points_mm: np.ndarray) -> np.ndarray:
        return np.asarray(points_mm)[:, 0] < self.split_x_mm - self.margin_mm

    def calibrates(self, points_mm: np.ndarray) -> np.ndarray:
        return np.asarray(points_mm)[:, 0] >= self.split_x_mm


#: The share of each scan's lungs that calibrates: a false-positive budget per scan is this
#: much per calibrating half.
CALIBRATING_SHARE = 0.5


@dataclass
class Background:
    """A scan to insert nodules into, on the network's grid, with its lung mask; a real
    scan's ``halves`` say where training patches may lie (phantoms: anywhere)."""

    work: Volume
    lungs: np.ndarray
    avoid_kji: np.ndarray  # (n, 3) voxels of annotated nodules
    halves: LungHalves | None = None

    @functools.cached_property
    def pleural_band(self) -> np.ndarray:
        """(n, 3) aerated voxels within :data:`PLEURAL_BAND_MM` of the lungs' edge: where a
        nodule placed touches the pleura or a fissure broadly."""
        spacing = np.asarray(self.work.spacing[::-1])
        depth = ndimage.distance_transform_edt(self.lungs[::2, ::2, ::2], sampling=2 * spacing)
        band = (depth > 0) & (depth <= PLEURAL_BAND_MM)
        voxels = np.argwhere(band) * 2
        return voxels[self.work.array[tuple(voxels.T)] < AERATED_HU]

    def allowed(self, points_kji: np.ndarray) -> np.ndarray:
        """Where a training patch may be centred: in the training half, away from the
        scan's own nodules."""
        allowed = np.ones(len(points_kji), dtype=bool)
        if self.halves is not None and len(points_kji):
            points_mm = self.work.index_to_world(np.asarray(points_kji)[:, ::-1].astype(float))
            allowed &= self.halves.trains(points_mm)
        if len(self.avoid_kji) == 0:
            return allowed
        spacing = np.asarray(self.work.spacing[::-1])
        d = np.linalg.norm((points_kji[:, None] - self.avoid_kji[None]) * spacing, axis=2)
        return allowed & (d.min(axis=1) > AVOID_MM)


#: Nodules this close to the lungs' edge touch the pleura; a share of them is placed there.
PLEURAL_BAND_MM = 6.0
PLEURAL_SHARE = 0.25

#: A nodule centre must lie in aerated lung: the lung mask also holds vessels, hila and the
#: mediastinal recesses its closing fills in, where a solid nodule would be invisible.
AERATED_HU = -600.0


def aerated_lung(image: np.ndarray, lungs: np.ndarray, step: int = 1) -> np.ndarray:
    """(n, 3) voxels, every ``step``-th per axis, inside the lungs and filled with air."""
    sub = (slice(None, None, step),) * 3
    return np.argwhere(lungs[sub] & (image[sub] < AERATED_HU)) * step


def make_background(volume: Volume, avoid_mm: np.ndarray, config: NetworkConfig) -> Background:
    """A real scan as a background: only its lungs' training half trains."""
    work, lungs = prepare(volume, config)
    avoid = (
        work.world_to_index(np.asarray(avoid_mm).reshape(-1, 3))[:, ::-1]
        if len(avoid_mm)
        else np.zeros((0, 3))
    )
    halves = LungHalves.of(work, lungs, config.patch_voxels * config.spacing_mm)
    return Background(work, lungs, avoid, halves)


def phantom_background(rng: np.random.Generator, config: NetworkConfig) -> Background:
    """A synthetic chest: never calibrated on, so all of it trains."""
    s = config.spacing_mm
    image = chest_phantom(rng, spacing_mm=s)
    volume = Volume(image, (0.0, 0.0, 0.0), (s, s, s), np.eye(3))
    work, lungs = prepare(volume, config)
    return Background(work, lungs, np.zeros((0, 3)))


UNKNOWN = float("nan")


@dataclass(frozen=True)
class Labels:
    """What one positive patch teaches; NaN (composition -1) where its source does not say."""

    offset_mm: np.ndarray  # nodule centre minus the patch's geometric centre, (k, j, i)
    diameter_mm: float  # volume-equivalent sphere diameter
    composition: int = -1
    malignancy: float = UNKNOWN  # 0..1: LIDC rating (1-5) mapped to (r - 1) / 4
    calcified: float = UNKNOWN
    characteristics: tuple[float, ...] = (UNKNOWN,) * len(CHARACTERISTICS)


def rated_labels(ratings: Ratings, offset_mm: np.ndarray, mask_diameter_mm: float) -> Labels:
    """Labels from readers' ratings; the diameter from theirs where given, else the mask's."""

    def scaled(value: int | None) -> float:
        return UNKNOWN if value is None else (value - 1) / 4.0

    return Labels(
        offset_mm=offset_mm,
        diameter_mm=ratings.diameter_mm if ratings.diameter_mm else mask_diameter_mm,
        composition=COMPOSITIONS.index(ratings.composition) if ratings.composition else -1,
        malignancy=scaled(ratings.malignancy),
        calcified=UNKNOWN if ratings.calcified is None else float(ratings.calcified),
        characteristics=tuple(scaled(getattr(ratings, name)) for name in CHARACTERISTICS),
    )


def equivalent_diameter_mm(mask: np.ndarray, spacing_kji: np.ndarray) -> float:
    """The diameter of the sphere of the mask's volume: what LIDC's diameters follow."""
    volume = float(mask.sum()) * float(np.prod(spacing_kji))
    return float((6.0 * volume / np.pi) ** (1.0 / 3.0))


@dataclass
class PatchSet:
    """Training patches and their labels, in memory (float16 halves the footprint)."""

    patches: np.ndarray  # (N, C, P, P, P) float16 in [0, 1]
    masks: np.ndarray  # (N, P, P, P) bool
    nodule: np.ndarray  # (N,)
    malignancy: np.ndarray  # NaN where unknown
    composition: np.ndarray  # int index into COMPOSITIONS, -1 where unknown
    calcified: np.ndarray  # NaN where unknown
    diameter_mm: np.ndarray  # NaN for negatives
    offset_mm: np.ndarray  # (N, 3), NaN for negatives
    characteristics: np.ndarray  # (N, len(CHARACTERISTICS)), NaN where unknown

    @classmethod
    def empty(cls, count: int, size: int, channels: int = 1) -> PatchSet:
        nan = np.float32("nan")
        return cls(
            patches=np.zeros((count, channels, size, size, size), dtype=np.float16),
            masks=np.zeros((count, size, size, size), dtype=bool),
            nodule=np.zeros(count, dtype=np.float32),
            malignancy=np.full(count, nan, dtype=np.float32),
            composition=np.full(count, -1, dtype=np.int64),
            calcified=np.full(count, nan, dtype=np.float32),
            diameter_mm=np.full(count, nan, dtype=np.float32),
            offset_mm=np.full((count, 3), nan, dtype=np.float32),
            characteristics=np.full((count, len(CHARACTERISTICS)), nan, dtype=np.float32),
        )

    def put(
        self, n: int, patch: np.ndarray, mask: np.ndarray | None, labels: Labels | None
    ) -> None:
        """Row ``n``: a positive with its labels, or (``labels`` None) a negative."""
        self.patches[n] = patch
        if labels is None:
            return
        assert mask is not None
        self.masks[n] = mask
        self.nodule[n] = 1.0
        self.malignancy[n] = labels.malignancy
        self.composition[n] = labels.composition
        self.calcified[n] = labels.calcified
        self.diameter_mm[n] = labels.diameter_mm
        self.offset_mm[n] = labels.offset_mm
        self.characteristics[n] = labels.characteristics

    def put_negatives(
        self,
        start: int,
        backgrounds: list[Background],
        sites: list[tuple[int, np.ndarray]],
        context: int,
    ) -> None:
        """Rows from ``start`` on: the patch around each (background, voxel) site."""
        size = self.patches.shape[2]
        for n, (b, centre) in enumerate(sites):
            patch = network_input(backgrounds[b].work.array, centre[None], size, context)[0]
            self.put(start + n, patch, None, None)

    def subset(self, index: np.ndarray) -> PatchSet:
        return PatchSet(**{k: v[index] for k, v in self.__dict__.items()})

    def extended(self, rows: int) -> PatchSet:
        """A copy with ``rows`` empty rows (negatives) appended."""
        more = PatchSet.empty(rows, self.patches.shape[2], self.patches.shape[1])
        return PatchSet(
            **{k: np.concatenate([v, more.__dict__[k]]) for k, v in self.__dict__.items()}
        )

    def replace_rows(self, start: int, other: PatchSet) -> None:
        """Rows from ``start`` on become ``other``'s."""
        for k, v in other.__dict__.items():
            self.__dict__[k][start : start + len(v)] = v


def _nodule_site(background: Background, rng: np.random.Generator) -> np.ndarray:
    """A random voxel of aerated lung away from the scan's own nodules; one time in four
    against the pleura."""
    lung_voxels = aerated_lung(background.work.array, background.lungs, step=2)
    if rng.random() < PLEURAL_SHARE and len(background.pleural_band):
        lung_voxels = background.pleural_band
    while True:
        centre = lung_voxels[rng.integers(len(lung_voxels))]
        if background.allowed(centre[None])[0]:
            return centre


def _cut(
    crop: np.ndarray,
    mask: np.ndarray,
    nodule_centre: np.ndarray,
    radius_mm: float,
    spacing: np.ndarray,
    rng: np.random.Generator,
    size: int,
    context: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The training patch around a nodule placed in ``crop``: centred off the nodule as a
    candidate would be; returns the patch, its mask, and the offset label."""
    patch_centre = np.round(nodule_centre + _jitter(radius_mm, rng) / spacing).astype(int)
    patch = network_input(crop, patch_centre[None], size, context)[0]
    half = size // 2
    box = tuple(slice(c - half, c + half) for c in patch_centre)
    centroid = np.argwhere(mask).mean(axis=0)
    offset = (centroid - patch_geometric_centre(patch_centre)) * spacing
    return patch, mask[box], offset


def _site_crop(
    background: Background, rng: np.random.Generator, size: int, context: int
) -> tuple[np.ndarray, float]:
    """A copy of the background around a random nodule site, wide enough for the patch and
    its context wherever the jitter puts it; and where the site lies in it, per axis."""
    half = size * (context + 1) // 2
    centre = _nodule_site(background, rng)
    return crop_cube(background.work.array, centre - half, 2 * half), float(half)


def transplanted_patch(
    background: Background, voi: NoduleVOI, rng: np.random.Generator, size: int, context: int = 1
) -> tuple[np.ndarray, np.ndarray, Labels]:
    """A real nodule pasted into aerated lung of ``background``, turned and flipped."""
    spacing = np.asarray(background.work.spacing[::-1])
    crop, site = _site_crop(background, rng, size, context)
    placement = Placement.random(np.full(3, site) + rng.uniform(-0.5, 0.5, 3), rng)
    mask = paste_nodule(crop, spacing, voi, placement, rng)
    diameter = equivalent_diameter_mm(mask, spacing)
    patch, patch_mask, offset = _cut(
        crop, mask, placement.centre_kji, diameter / 2, spacing, rng, size, context
    )
    return patch, patch_mask, rated_labels(voi.ratings, offset, diameter)


def voi_view_patch(
    voi: NoduleVOI, rng: np.random.Generator, size: int, spacing_mm: float, context: int = 1
) -> tuple[np.ndarray, np.ndarray, Labels]:
    """A real nodule as its VOI alone shows it, off-centre, turned and flipped."""
    spacing = np.full(3, spacing_mm)
    middle = patch_geometric_centre(np.full(3, size // 2))
    radius = equivalent_diameter_mm(voi.mask, np.asarray(voi.image.spacing[::-1])) / 2
    placement = Placement.random(middle - _jitter(radius, rng) / spacing, rng)
    patch = voi_input(voi, spacing_mm, size, placement, context)
    mask = voi_mask_patch(voi, spacing_mm, size, placement)
    offset = (placement.centre_kji - middle) * spacing
    return patch, mask, rated_labels(voi.ratings, offset, equivalent_diameter_mm(mask, spacing))


#: A VOI's negative view is centred at least this far from the nodule's mask: farther than
#: any positive view's centre lies from it (:data:`MAX_JITTER_MM`), so no centre is both.
VOI_NEGATIVE_CLEARANCE_MM = 10.0
#: Denser than aerated lung: vessels, airway walls, pleura, scars, what an unseen lung's false
#: positives are made of. Most VOI negatives are centred on such a voxel.
DENSE_HU = -600.0
DENSE_SHARE = 0.75


def voi_negative_centres(voi: NoduleVOI) -> tuple[np.ndarray, np.ndarray]:
    """The VOI's voxels (k, j, i) far enough from its nodule to centre a negative view on,
    all of them and the dense ones; empty where the VOI is mostly nodule. Small integers:
    a training run keeps them for every VOI."""
    spacing = np.asarray(voi.image.spacing[::-1])
    far = ndimage.distance_transform_edt(~voi.mask, sampling=spacing) >= VOI_NEGATIVE_CLEARANCE_MM
    dense = far & (voi.image.array > DENSE_HU)
    return np.argwhere(far).astype(np.int16), np.argwhere(dense).astype(np.int16)


def voi_negative_patch(
    voi: NoduleVOI,
    centres: tuple[np.ndarray, np.ndarray],
    rng: np.random.Generator,
    size: int,
    spacing_mm: float,
    context: int = 1,
) -> np.ndarray:
    """A view of a real nodule's VOI centred away from the nodule, mostly on a vessel or the
    pleura, turned and flipped: real lung of another patient, seen the way the VOI's positive
    views see it (nothing above or below its slices), so that what tells the two apart is
    what lies at the centre, not the VOI's edges. ``centres``: the VOI's
    :func:`voi_negative_centres`, at least one."""
    anywhere, dense = centres
    among = dense if len(dense) and rng.random() < DENSE_SHARE else anywhere
    point = among[rng.integers(len(among))]
    middle = patch_geometric_centre(np.full(3, size // 2))
    return voi_input(
        voi, spacing_mm, size, placement_showing(voi, point, middle, spacing_mm, rng), context
    )


def positive_patch(
    background: Background,
    rng: np.random.Generator,
    size: int,
    context: int = 1,
    slice_mm: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, Labels]:
    """A synthetic nodule blended into aerated lung of ``background``: exact mask, known
    size and composition; no malignancy label (only readers' ratings teach that). Smeared
    along the slice axis by a random amount and, where the network reads scans as
    ``slice_mm`` slices, by what :class:`ThickenSlices` did to the background's grid: a
    nodule sharper than the lung around it would be a clue no real scan gives."""
    spacing = np.asarray(background.work.spacing[::-1])
    crop, site = _site_crop(background, rng, size, context)
    spec = random_spec(rng)
    nodule_centre = np.full(3, site) + rng.uniform(-0.5, 0.5, 3)
    blur_mm = math.hypot(rng.uniform(0, 1.5), ThickenSlices(slice_mm).sigma_mm(spacing[0]))
    mask = insert_nodule(crop, spec, nodule_centre, spacing, rng, slice_blur_mm=blur_mm)
    patch, patch_mask, offset = _cut(
        crop, mask, nodule_centre, spec.diameter_mm / 2, spacing, rng, size, context
    )
    labels = Labels(
        offset_mm=offset,
        diameter_mm=equivalent_diameter_mm(mask, spacing),
        composition=COMPOSITIONS.index(spec.composition),
        calcified=float(spec.calcified),
        # Benign calcification patterns teach the malignancy head "low"; nothing else
        # synthetic says anything about malignancy.
        malignancy=0.0 if spec.calcified else UNKNOWN,
    )
    return patch, patch_mask, labels


#: Candidates land off a nodule's centre, by up to its radius for large ones: the network
#: sees positives as far off as that, and learns the offset back to the centre.
MAX_JITTER_MM = 8.0


def _jitter(radius_mm: float, rng: np.random.Generator) -> np.ndarray:
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    return direction * rng.uniform(0.0, float(np.clip(radius_mm, 2.5, MAX_JITTER_MM)))


def build_patch_set(
    backgrounds: list[Background],
    nodules: list[NoduleVOI],
    config: TrainingConfig,
    rng: np.random.Generator,
) -> tuple[PatchSet, list[tuple[int, np.ndarray]]]:
    """Every training patch, positives of the three sources first, then negatives drawn from
    the :func:`negative_sites`, which come back too. Without real nodules the real sources
    are left out."""
    size, context = config.network.patch_voxels, config.network.context
    real = config.transplanted + config.voi_views if nodules else 0
    n_pos = config.synthetic + real
    voi_negatives = config.voi_negatives if nodules else 0
    rows = n_pos + voi_negatives + config.negatives
    data = PatchSet.empty(rows, size, config.network.channels)
    for n in tqdm(range(config.synthetic), desc="synthetic nodules", unit="patch"):
        background = backgrounds[n % len(backgrounds)]
        data.put(n, *positive_patch(background, rng, size, context, config.network.slice_mm))
    if nodules:
        start = config.synthetic
        order = rng.permutation(config.transplanted) % len(nodules)
        for n, v in enumerate(tqdm(order, desc="transplanted real nodules", unit="patch")):
            background = backgrounds[n % len(backgrounds)]
            data.put(start + n, *transplanted_patch(background, nodules[v], rng, size, context))
        start += config.transplanted
        order = rng.permutation(config.voi_views) % len(nodules)
        for n, v in enumerate(tqdm(order, desc="real nodules as VOIs", unit="patch")):
            spacing_mm = config.network.spacing_mm
            data.put(start + n, *voi_view_patch(nodules[v], rng, size, spacing_mm, context))
    if voi_negatives:
        around = [(v, voi_negative_centres(v)) for v in nodules]
        offering = [(v, centres) for v, centres in around if len(centres[0])]
        order = rng.permutation(voi_negatives) % len(offering)
        for n, v in enumerate(tqdm(order, desc="real lung around VOIs", unit="patch")):
            voi, centres = offering[v]
            spacing_mm = config.network.spacing_mm
            patch = voi_negative_patch(voi, centres, rng, size, spacing_mm, context)
            data.put(n_pos + n, patch, None, None)
    sites = negative_sites(backgrounds, rng)
    pick = rng.choice(len(sites), size=config.negatives, replace=len(sites) < config.negatives)
    data.put_negatives(n_pos + voi_negatives, backgrounds, [sites[idx] for idx in pick], context)
    return data, sites


def negative_sites(
    backgrounds: list[Background], rng: np.random.Generator
) -> list[tuple[int, np.ndarray]]:
    """(background, voxel) of every candidate the blob search finds where training may look,
    and of random lung voxels there."""
    sites: list[tuple[int, np.ndarray]] = []
    for b, background in enumerate(tqdm(backgrounds, desc="hard negatives", unit="scan")):
        cands = np.array(
            [c.kji for c in find_candidates(background.work, background.lungs, per_scale=400)]
        )
        cands = cands[background.allowed(cands)] if len(cands) else cands
        lung = np.argwhere(background.lungs[::4, ::4, ::4]) * 4
        lung = lung[rng.choice(len(lung), size=min(len(lung), 200), replace=False)]
        lung = lung[background.allowed(lung)]
        sites += [(b, c) for c in cands] + [(b, c) for c in lung]
    return sites


def negative_pool(
    backgrounds: list[Background], sites: list[tuple[int, np.ndarray]], config: NetworkConfig
) -> PatchSet:
    """Each site's patch once: what hard negatives are mined from."""
    pool = PatchSet.empty(len(sites), config.patch_voxels, config.channels)
    pool.put_negatives(0, backgrounds, sites, config.context)
    return pool


def hardest(logits: np.ndarray, count: int) -> np.ndarray:
    """Indices of the ``count`` highest ``logits``, highest first."""
    return np.argsort(-logits, kind="stable")[:count]


def augment(
    batch: dict[str, torch.Tensor], rng: random.Random, rotations: float = 0.0
) -> dict[str, torch.Tensor]:
    """Random flips of each axis and an in-plane transpose, and for a ``rotations`` share
    of the patches a random turn in 3D (:func:`rotate`); offsets follow the image. With no
    rotations, :func:`rotate` is not called at all, so that its draws leave the generator as
    it was and a seed trains the same weights it trained before rotations existed."""
    if rotations > 0:
        batch = rotate(batch, rng, rotations)
    x, m, off = batch["patches"], batch["masks"], batch["offset_mm"].clone()
    for axis in range(3):
        if rng.random() < 0.5:
            x, m = x.flip(2 + axis), m.flip(2 + axis)
            off[:, axis] = -off[:, axis]
    if rng.random() < 0.5:
        x, m = x.transpose(3, 4), m.transpose(3, 4)
        off = off[:, [0, 2, 1]]
    return {**batch, "patches": x, "masks": m, "offset_mm": off}


def random_rotation(rng: random.Random) -> torch.Tensor:
    """A rotation matrix drawn uniformly over all orientations (a normalised Gaussian
    quaternion)."""
    w, x, y, z = (rng.gauss(0.0, 1.0) for _ in range(4))
    norm = math.sqrt(w * w + x * x + y * y + z * z) or 1.0
    w, x, y, z = w / norm, x / norm, y / norm, z / norm
    return torch.tensor(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def rotate(
    batch: dict[str, torch.Tensor], rng: random.Random, share: float
) -> dict[str, torch.Tensor]:
    """Each patch, with probability ``share``, turned about its centre to a random
    orientation (trilinear; corners that come from outside the patch mirror its inside).

    Flips give a vessel eight looks; the training half of one background patient's lungs
    offers about 450-530 candidate and lung sites for its 4000 negative patches, and a model
    that learns each site by its eight looks meets a new patient's vessels in orientations
    it never saw. Sizes and labels do not change with the turn; the offset to the nodule's
    centre and the mask turn with the image.
    """
    picked = [n for n in range(len(batch["patches"])) if rng.random() < share]
    if not picked:
        return batch
    index = torch.tensor(picked)
    x, m = batch["patches"], batch["masks"]
    # Each output voxel at p (normalised x, y, z = i, j, k; cubic isotropic patches) reads
    # the input at R p, so what sat at q in the input now sits at R^T q.
    turns = torch.stack([random_rotation(rng) for _ in picked]).to(x)
    theta = torch.cat([turns, torch.zeros(len(picked), 3, 1, dtype=x.dtype)], dim=2)
    both = torch.cat([x[index], m[index].to(x.dtype)], dim=1)  # one pass for image and mask
    grid = F.affine_grid(theta, list(both.shape), align_corners=False)
    turned = F.grid_sample(
        both, grid, mode="bilinear", padding_mode="reflection", align_corners=False
    )
    x, m, off = x.clone(), m.clone(), batch["offset_mm"].clone()
    x[index] = turned[:, : x.shape[1]]
    m[index] = turned[:, x.shape[1] :] >= 0.5
    xyz = off[index][:, [2, 1, 0]]
    off[index] = torch.einsum("nab,na->nb", turns, xyz)[:, [2, 1, 0]]
    return {**batch, "patches": x, "masks": m, "offset_mm": off}


def _known_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
    known = torch.isfinite(target)
    if not known.any():
        return None
    return F.binary_cross_entropy_with_logits(logits[known], target[known])


def multitask_loss(
    model: ResMTNet,
    batch: dict[str, torch.Tensor],
    composition_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The heads' losses, each on the patches whose label for it is known (absent keys:
    unknown everywhere). ``composition_weights`` balances the three compositions (solid
    nodules outnumber the others many times over among real ones)."""
    out = model(batch["patches"])
    pos = batch["nodule"] > 0.5
    terms = {"detection": F.binary_cross_entropy_with_logits(out.nodule_logit, batch["nodule"])}
    candidates: dict[str, torch.Tensor | None] = {}
    if pos.any():
        candidates["malignancy"] = _known_bce(out.malignancy_logit[pos], batch["malignancy"][pos])
        composition = batch["composition"][pos]
        known = composition >= 0
        if known.any():
            candidates["composition"] = F.cross_entropy(
                out.composition_logits[pos][known], composition[known], weight=composition_weights
            )
        diameter = batch["diameter_mm"][pos]
        known = torch.isfinite(diameter)
        if known.any():
            candidates["diameter"] = F.smooth_l1_loss(
                out.diameter_mm[pos][known] / 10.0, diameter[known] / 10.0
            )
        offset = batch["offset_mm"][pos]
        known = torch.isfinite(offset).all(dim=1)
        if known.any():
            candidates["offset"] = F.smooth_l1_loss(
                out.offset_mm[pos][known] / 5.0, offset[known] / 5.0
            )
        if out.calcification_logit is not None and "calcified" in batch:
            candidates["calcification"] = _known_bce(
                out.calcification_logit[pos], batch["calcified"][pos]
            )
        if out.characteristics is not None and "characteristics" in batch:
            candidates["characteristics"] = _known_bce(
                out.characteristics[pos], batch["characteristics"][pos]
            )
    terms.update({k: v for k, v in candidates.items() if v is not None})
    assert out.mask_logits is not None
    target = batch["masks"].float()
    probs = torch.sigmoid(out.mask_logits)
    dice = 1.0 - (2 * (probs * target).sum((1, 2, 3, 4)) + 1.0) / (
        probs.sum((1, 2, 3, 4)) + target.sum((1, 2, 3, 4)) + 1.0
    )
    terms["mask"] = (
        F.binary_cross_entropy_with_logits(out.mask_logits, target) + dice[pos].mean()
        if pos.any()
        else F.binary_cross_entropy_with_logits(out.mask_logits, target)
    )
    total = sum(LOSS_WEIGHTS[k] * v for k, v in terms.items())
    return total, {k: float(v.detach()) for k, v in terms.items()}  # type: ignore[return-value]


def to_batch(data: PatchSet, index: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
    return {
        "patches": torch.from_numpy(data.patches[index].astype(np.float32)).to(device),
        "masks": torch.from_numpy(data.masks[index])[:, None].to(device),
        "nodule": torch.from_numpy(data.nodule[index]).to(device),
        "malignancy": torch.from_numpy(data.malignancy[index]).to(device),
        "composition": torch.from_numpy(data.composition[index]).to(device),
        "calcified": torch.from_numpy(data.calcified[index]).to(device),
        "diameter_mm": torch.from_numpy(data.diameter_mm[index]).to(device),
        "offset_mm": torch.from_numpy(data.offset_mm[index]).to(device),
        "characteristics": torch.from_numpy(data.characteristics[index]).to(device),
    }


def composition_weights(composition: np.ndarray) -> torch.Tensor:
    """Inverse-frequency weights of the known compositions, normalised to mean 1 (a class
    absent from the patches weighs as the rarest present)."""
    counts = np.array([np.sum(composition == k) for k in range(len(COMPOSITIONS))], float)
    counts = np.where(counts > 0, counts, counts[counts > 0].min() if np.any(counts) else 1.0)
    weights = 1.0 / counts
    return torch.tensor(weights / weights.mean(), dtype=torch.float32)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature scaling on held-out patches: scores that mean the same on every scan."""
    best = (math.inf, 1.0)
    for t in np.exp(np.linspace(np.log(0.25), np.log(8.0), 61)):
        p = np.clip(1 / (1 + np.exp(-logits / t)), 1e-7, 1 - 1e-7)
        nll = -np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p))
        best = min(best, (float(nll), float(t)))
    return best[1]


@dataclass
class TrainedModel:
    model: ResMTNet
    temperature: float
    record: dict[str, object]  # what the model card reports: config, losses, history


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def train_model(
    backgrounds: list[Background],
    config: TrainingConfig,
    device: torch.device,
    nodules: Sequence[NoduleVOI] = (),
    log: Callable[[str], None] = print,
) -> TrainedModel:
    """Train from scratch on ``backgrounds`` (plus phantoms) and the real ``nodules``;
    returns the model, its score temperature and a record of how."""
    seed_everything(config.seed)
    rng = np.random.default_rng(config.seed)
    nodules = [voi.thickened(config.network.slice_mm) for voi in nodules]
    phantoms = [phantom_background(rng, config.network) for _ in range(config.phantoms)]
    everywhere = backgrounds + phantoms
    data, sites = build_patch_set(everywhere, list(nodules), config, rng)
    order = rng.permutation(len(data.nodule))
    n_val = int(len(order) * config.validation_fraction)
    val, trn = data.subset(order[:n_val]), data.subset(order[n_val:])
    hard = min(config.hard_negatives, len(sites))
    plain = len(trn.nodule)
    trn = trn.extended(hard)
    mine_from = config.epochs // 2
    pool = negative_pool(everywhere, sites, config.network) if hard else None
    model = build_model(config.network).to(device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=1e-4)
    steps = sum(
        math.ceil((plain + (hard if epoch >= mine_from else 0)) / config.batch_size)
        for epoch in range(config.epochs)
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, config.learning_rate, total_steps=steps
    )
    aug_rng = random.Random(config.seed)
    weights = composition_weights(trn.composition).to(device)
    history = []
    for epoch in range(config.epochs):
        rows = plain
        if pool is not None and epoch >= mine_from:
            logits = predict_logits(model, pool, device, config.batch_size)
            trn.replace_rows(plain, pool.subset(hardest(logits, hard)))
            rows += hard
        model.train()
        perm = rng.permutation(rows)
        bar = tqdm(
            range(0, len(perm), config.batch_size),
            desc=f"epoch {epoch + 1}/{config.epochs}",
            unit="batch",
        )
        running = 0.0
        for n, start in enumerate(bar, start=1):
            batch = augment(
                to_batch(trn, perm[start : start + config.batch_size], device),
                aug_rng,
                config.rotations,
            )
            loss, _ = multitask_loss(model, batch, weights)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            running += float(loss.detach())
            bar.set_postfix(loss=f"{running / n:.3f}")
        val_loss = evaluate_loss(model, val, device, config.batch_size)
        history.append({"epoch": epoch + 1, "train_loss": running / max(n, 1), **val_loss})
        log(f"epoch {epoch + 1}: train loss {running / max(n, 1):.4f}, validation {val_loss}")
    logits = predict_logits(model, val, device, config.batch_size)
    temperature = fit_temperature(logits, val.nodule)
    record = {
        "config": {**asdict(config), "network": config.network.to_dict()},
        "loss_weights": LOSS_WEIGHTS,
        "history": history,
        "temperature": temperature,
        "training_patches": {
            "synthetic": config.synthetic,
            "transplanted": config.transplanted if nodules else 0,
            "voi_views": config.voi_views if nodules else 0,
            "negatives": config.negatives,
            "voi_negatives": config.voi_negatives if nodules else 0,
            "hard_negatives_per_epoch": hard,
            "negative_sites": len(sites),
        },
        "real_nodules": {"nodules": len(nodules), "patients": len({v.patient_id for v in nodules})},
        "backgrounds": len(backgrounds),
        "model": MODEL_NAME,
    }
    return TrainedModel(model, temperature, record)


@torch.inference_mode()
def predict_logits(
    model: ResMTNet, data: PatchSet, device: torch.device, batch_size: int
) -> np.ndarray:
    model.eval()
    out = []
    for start in range(0, len(data.nodule), batch_size):
        batch = to_batch(data, np.arange(start, min(start + batch_size, len(data.nodule))), device)
        out.append(model(batch["patches"], with_mask=False).nodule_logit.cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


@torch.inference_mode()
def evaluate_loss(
    model: ResMTNet, data: PatchSet, device: torch.device, batch_size: int
) -> dict[str, float]:
    model.eval()
    sums: dict[str, float] = {}
    count = 0
    for start in range(0, len(data.nodule), batch_size):
        batch = to_batch(data, np.arange(start, min(start + batch_size, len(data.nodule))), device)
        _, terms = multitask_loss(model, batch)
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v
        count += 1
    return {f"val_{k}": round(v / max(count, 1), 4) for k, v in sums.items()}


def save_weights(
    model: ResMTNet, record: dict[str, object], operating_point: dict[str, float], version: str
) -> bytes:
    """The checkpoint as bytes: state dict, architecture, operating point and provenance."""
    buffer = io.BytesIO()
    torch.save(
        {
            "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
            "config": model.config.to_dict(),
            "operating_point": operating_point,
            "version": version,
            "training": record,
        },
        buffer,
    )
    return buffer.getvalue()
