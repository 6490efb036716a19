"""Training Res-MTNet on synthetic nodules in real lungs, reproducibly, with progress bars.

Positives are synthetic nodules blended into the lungs of the given scans (never within
``AVOID_MM`` of an annotated nodule, so that a case's own nodules never become training
positives or negatives) and of synthetic chest phantoms. Negatives are the candidates the
blob search finds in the same lungs: vessels, airway walls, pleura.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from inference.candidates import find_candidates
from inference.detector import MODEL_NAME, prepare
from inference.lab.synthesis import chest_phantom, insert_nodule, random_spec
from inference.measure import measure
from inference.network import COMPOSITIONS, NetworkConfig, ResMTNet, build_model
from inference.patches import crop_cube, extract_patches, patch_geometric_centre
from inference.volume import Volume

#: Patches for training are cut this far from any annotated nodule (a 40 mm patch's corner
#: still holds the rim of a nodule 30 mm away).
AVOID_MM = 45.0
LOSS_WEIGHTS = {
    "detection": 1.0,
    "malignancy": 0.5,
    "composition": 0.5,
    "diameter": 1.0,
    "offset": 1.0,
    "mask": 1.0,
}


@dataclass(frozen=True)
class TrainingConfig:
    seed: int = 20261126
    positives: int = 3000
    negatives: int = 3000
    phantoms: int = 2
    epochs: int = 8
    batch_size: int = 32
    learning_rate: float = 2e-3
    validation_fraction: float = 0.1
    network: NetworkConfig = field(default_factory=NetworkConfig)


@dataclass
class Background:
    """A scan to insert nodules into, on the network's grid, with its lung mask."""

    work: Volume
    lungs: np.ndarray
    avoid_kji: np.ndarray  # (n, 3) voxels of annotated nodules

    def allowed(self, points_kji: np.ndarray) -> np.ndarray:
        if len(self.avoid_kji) == 0:
            return np.ones(len(points_kji), dtype=bool)
        spacing = np.asarray(self.work.spacing[::-1])
        d = np.linalg.norm((points_kji[:, None] - self.avoid_kji[None]) * spacing, axis=2)
        return d.min(axis=1) > AVOID_MM


#: A nodule centre must lie in aerated lung: the lung mask also holds vessels, hila and the
#: mediastinal recesses its closing fills in, where a solid nodule would be invisible.
AERATED_HU = -600.0


def aerated_lung(image: np.ndarray, lungs: np.ndarray, step: int = 1) -> np.ndarray:
    """(n, 3) voxels, every ``step``-th per axis, inside the lungs and filled with air."""
    sub = (slice(None, None, step),) * 3
    return np.argwhere(lungs[sub] & (image[sub] < AERATED_HU)) * step


def make_background(volume: Volume, avoid_mm: np.ndarray, config: NetworkConfig) -> Background:
    work, lungs = prepare(volume, config.spacing_mm)
    avoid = (
        work.world_to_index(np.asarray(avoid_mm).reshape(-1, 3))[:, ::-1]
        if len(avoid_mm)
        else np.zeros((0, 3))
    )
    return Background(work, lungs, avoid)


def phantom_background(rng: np.random.Generator, config: NetworkConfig) -> Background:
    s = config.spacing_mm
    image = chest_phantom(rng, spacing_mm=s)
    volume = Volume(image, (0.0, 0.0, 0.0), (s, s, s), np.eye(3))
    return make_background(volume, np.zeros((0, 3)), config)


@dataclass
class PatchSet:
    """Training patches and their labels, in memory (float16 halves the footprint)."""

    patches: np.ndarray  # (N, P, P, P) float16 in [0, 1]
    masks: np.ndarray  # (N, P, P, P) bool
    nodule: np.ndarray  # (N,)
    malignancy: np.ndarray
    composition: np.ndarray  # int index into COMPOSITIONS
    diameter_mm: np.ndarray
    offset_mm: np.ndarray  # (N, 3)

    def subset(self, index: np.ndarray) -> PatchSet:
        return PatchSet(**{k: v[index] for k, v in self.__dict__.items()})


def positive_patch(
    background: Background, rng: np.random.Generator, size: int
) -> tuple[np.ndarray, np.ndarray, dict[str, float | int | np.ndarray]]:
    spacing = np.asarray(background.work.spacing[::-1])
    lung_voxels = aerated_lung(background.work.array, background.lungs, step=2)
    while True:
        centre = lung_voxels[rng.integers(len(lung_voxels))]
        if background.allowed(centre[None])[0]:
            break
    spec = random_spec(rng)
    margin = size
    lo = centre - margin
    crop = crop_cube(background.work.array, lo, 2 * margin)
    nodule_centre = np.full(3, float(margin)) + rng.uniform(-0.5, 0.5, 3)
    mask = insert_nodule(
        crop, spec, nodule_centre, spacing, rng, slice_blur_mm=float(rng.uniform(0, 1.5))
    )
    patch_centre = np.round(nodule_centre + _jitter(spec.diameter_mm / 2.0, rng) / spacing).astype(
        int
    )
    patch = extract_patches(crop, patch_centre[None], size)[0]
    half = size // 2
    box = tuple(slice(c - half, c + half) for c in patch_centre)
    m = measure(mask, crop, tuple(spacing))
    labels: dict[str, float | int | np.ndarray] = {
        "malignancy": spec.malignancy_probability,
        "composition": COMPOSITIONS.index(spec.composition),
        "diameter_mm": m.diameter_mm,
        "offset_mm": (nodule_centre - patch_geometric_centre(patch_centre)) * spacing,
    }
    return patch, mask[box], labels


#: Candidates land off a nodule's centre, by up to its radius for large ones: the network
#: sees positives as far off as that, and learns the offset back to the centre.
MAX_JITTER_MM = 8.0


def _jitter(radius_mm: float, rng: np.random.Generator) -> np.ndarray:
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    return direction * rng.uniform(0.0, float(np.clip(radius_mm, 2.5, MAX_JITTER_MM)))


def build_patch_set(
    backgrounds: list[Background], config: TrainingConfig, rng: np.random.Generator
) -> PatchSet:
    size = config.network.patch_voxels
    n_pos, n_neg = config.positives, config.negatives
    patches = np.zeros((n_pos + n_neg, size, size, size), dtype=np.float16)
    masks = np.zeros((n_pos + n_neg, size, size, size), dtype=bool)
    malignancy = np.zeros(n_pos + n_neg, dtype=np.float32)
    composition = np.zeros(n_pos + n_neg, dtype=np.int64)
    diameter = np.zeros(n_pos + n_neg, dtype=np.float32)
    offset = np.zeros((n_pos + n_neg, 3), dtype=np.float32)
    for n in tqdm(range(n_pos), desc="synthetic nodules", unit="patch"):
        patch, mask, labels = positive_patch(backgrounds[n % len(backgrounds)], rng, size)
        patches[n], masks[n] = patch, mask
        malignancy[n] = float(labels["malignancy"])
        composition[n] = int(labels["composition"])
        diameter[n] = float(labels["diameter_mm"])
        offset[n] = labels["offset_mm"]
    negatives: list[tuple[int, np.ndarray]] = []
    for b, background in enumerate(tqdm(backgrounds, desc="hard negatives", unit="scan")):
        cands = np.array(
            [c.kji for c in find_candidates(background.work, background.lungs, per_scale=400)]
        )
        cands = cands[background.allowed(cands)] if len(cands) else cands
        lung = np.argwhere(background.lungs[::4, ::4, ::4]) * 4
        lung = lung[rng.choice(len(lung), size=min(len(lung), 200), replace=False)]
        lung = lung[background.allowed(lung)]
        negatives += [(b, c) for c in cands] + [(b, c) for c in lung]
    pick = rng.choice(len(negatives), size=n_neg, replace=len(negatives) < n_neg)
    for n, idx in enumerate(pick):
        b, centre = negatives[idx]
        patches[n_pos + n] = extract_patches(backgrounds[b].work.array, centre[None], size)[0]
    nodule = np.concatenate([np.ones(n_pos), np.zeros(n_neg)]).astype(np.float32)
    return PatchSet(patches, masks, nodule, malignancy, composition, diameter, offset)


def augment(batch: dict[str, torch.Tensor], rng: random.Random) -> dict[str, torch.Tensor]:
    """Random flips of each axis and an in-plane transpose; offsets follow the image."""
    x, m, off = batch["patches"], batch["masks"], batch["offset_mm"].clone()
    for axis in range(3):
        if rng.random() < 0.5:
            x, m = x.flip(2 + axis), m.flip(2 + axis)
            off[:, axis] = -off[:, axis]
    if rng.random() < 0.5:
        x, m = x.transpose(3, 4), m.transpose(3, 4)
        off = off[:, [0, 2, 1]]
    return {**batch, "patches": x, "masks": m, "offset_mm": off}


def multitask_loss(
    model: ResMTNet, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, float]]:
    out = model(batch["patches"])
    pos = batch["nodule"] > 0.5
    terms = {"detection": F.binary_cross_entropy_with_logits(out.nodule_logit, batch["nodule"])}
    if pos.any():
        terms["malignancy"] = F.binary_cross_entropy_with_logits(
            out.malignancy_logit[pos], batch["malignancy"][pos]
        )
        terms["composition"] = F.cross_entropy(
            out.composition_logits[pos], batch["composition"][pos]
        )
        terms["diameter"] = F.smooth_l1_loss(
            out.diameter_mm[pos] / 10.0, batch["diameter_mm"][pos] / 10.0
        )
        terms["offset"] = F.smooth_l1_loss(out.offset_mm[pos] / 5.0, batch["offset_mm"][pos] / 5.0)
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
        "patches": torch.from_numpy(data.patches[index].astype(np.float32))[:, None].to(device),
        "masks": torch.from_numpy(data.masks[index])[:, None].to(device),
        "nodule": torch.from_numpy(data.nodule[index]).to(device),
        "malignancy": torch.from_numpy(data.malignancy[index]).to(device),
        "composition": torch.from_numpy(data.composition[index]).to(device),
        "diameter_mm": torch.from_numpy(data.diameter_mm[index]).to(device),
        "offset_mm": torch.from_numpy(data.offset_mm[index]).to(device),
    }


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
    log: Callable[[str], None] = print,
) -> TrainedModel:
    """Train from scratch; returns the model, its score temperature and a record of how."""
    seed_everything(config.seed)
    rng = np.random.default_rng(config.seed)
    phantoms = [phantom_background(rng, config.network) for _ in range(config.phantoms)]
    data = build_patch_set(backgrounds + phantoms, config, rng)
    order = rng.permutation(len(data.nodule))
    n_val = int(len(order) * config.validation_fraction)
    val, trn = data.subset(order[:n_val]), data.subset(order[n_val:])
    model = build_model(config.network).to(device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=1e-4)
    steps = config.epochs * math.ceil(len(trn.nodule) / config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, config.learning_rate, total_steps=steps
    )
    aug_rng = random.Random(config.seed)
    history = []
    for epoch in range(config.epochs):
        model.train()
        perm = rng.permutation(len(trn.nodule))
        bar = tqdm(
            range(0, len(perm), config.batch_size),
            desc=f"epoch {epoch + 1}/{config.epochs}",
            unit="batch",
        )
        running = 0.0
        for n, start in enumerate(bar, start=1):
            batch = augment(to_batch(trn, perm[start : start + config.batch_size], device), aug_rng)
            loss, _ = multitask_loss(model, batch)
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
        "training_patches": {"positives": config.positives, "negatives": config.negatives},
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
