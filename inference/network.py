"""Res-MTNet in 3D: one residual trunk shared by detection, classification, regression and
segmentation heads, trained jointly (Lin et al., arXiv 2502.19692, adapted to CT patches)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from inference.blocks import make_stage

COMPOSITIONS = ("solid", "part-solid", "ground-glass")
#: LIDC-IDRI characteristics (each rated 1-5) an auxiliary head regresses, scaled to 0..1:
#: learning what readers see in a nodule's edge and shape shapes the trunk the malignancy
#: head reads from.
CHARACTERISTICS = ("margin", "spiculation", "lobulation", "sphericity", "subtlety")
#: Sizes enter the malignancy logit as log(diameter / this).
TYPICAL_DIAMETER_MM = 8.0


@dataclass(frozen=True)
class NetworkConfig:
    """What fixes the architecture; stored beside the weights so they always load right."""

    patch_voxels: int = 32
    spacing_mm: float = 1.25
    widths: tuple[int, int, int, int] = (8, 16, 32, 64)
    blocks_per_stage: int = 1
    head_hidden: int = 64
    #: Heads trained on radiologists' ratings: calcification and the characteristics above.
    #: False for weights trained before they existed.
    rating_heads: bool = False
    #: 1: the patch alone; k > 1: a second input channel showing k times its field at 1/k
    #: of its resolution (:func:`inference.patches.network_input`).
    context: int = 1
    #: Every scan and real nodule is made to look as a reconstruction of this slice thickness
    #: would (:class:`inference.transforms.ThickenSlices`) before the network sees it; 0:
    #: as scanned, which weights trained before it existed expect.
    slice_mm: float = 0.0

    @property
    def channels(self) -> int:
        return 1 if self.context == 1 else 2

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class TaskOutputs(NamedTuple):
    """Raw head outputs for a batch of N patches (logits and millimetres)."""

    nodule_logit: torch.Tensor  # (N,)
    malignancy_logit: torch.Tensor  # (N,)
    composition_logits: torch.Tensor  # (N, 3) in COMPOSITIONS order
    diameter_mm: torch.Tensor  # (N,)
    offset_mm: torch.Tensor  # (N, 3) nodule centre minus patch centre, (k, j, i) axes
    mask_logits: torch.Tensor | None  # (N, 1, P, P, P) when asked for
    calcification_logit: torch.Tensor | None  # (N,) with rating heads
    characteristics: torch.Tensor | None  # (N, 5) logits of CHARACTERISTICS / 4, rating heads


class TaskHead(nn.Module):
    """A two-layer head on the pooled shared features: each task keeps its own parameters."""

    def __init__(self, in_features: int, hidden: int, out_features: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_features)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class MaskDecoder(nn.Module):
    """Upsamples the trunk's features back to the patch, adding each level's skip features."""

    def __init__(self, widths: tuple[int, int, int, int]) -> None:
        super().__init__()
        stem, w1, w2, w3 = widths
        self.lateral = nn.ModuleList(
            [nn.Conv3d(w3, w2, 1), nn.Conv3d(w2, w1, 1), nn.Conv3d(w1, stem, 1)]
        )
        self.refine = nn.ModuleList(
            [nn.Conv3d(w2, w2, 3, padding=1), nn.Conv3d(w1, w1, 3, padding=1)]
        )
        self.out = nn.Conv3d(stem, 1, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        stem, f1, f2, f3 = features
        x = F.interpolate(self.lateral[0](f3), size=f2.shape[2:], mode="trilinear") + f2
        x = F.relu(self.refine[0](x))
        x = F.interpolate(self.lateral[1](x), size=f1.shape[2:], mode="trilinear") + f1
        x = F.relu(self.refine[1](x))
        # Full resolution gets only a 1x1x1 mix: the mask is needed for a few detections,
        # but this keeps even those cheap on a CPU.
        x = F.interpolate(self.lateral[2](x), size=stem.shape[2:], mode="trilinear") + stem
        return self.out(F.relu(x))


class ResMTNet(nn.Module):
    """Shared residual trunk -> task heads.

    Input: (N, C, P, P, P) patches (:func:`inference.patches.network_input`), HU clipped to ``NETWORK_HU_WINDOW`` and scaled to [0, 1], on an
    isotropic ``spacing_mm`` grid. Trunk: stem at P, three strided residual stages at P/2,
    P/4, P/8. Heads: on the globally pooled last stage (detection, malignancy, composition,
    diameter, centre offset) and a decoder over all levels (mask).
    """

    def __init__(self, config: NetworkConfig) -> None:
        super().__init__()
        self.config = config
        stem, w1, w2, w3 = config.widths
        self.stem = nn.Sequential(
            nn.Conv3d(config.channels, stem, 3, padding=1, bias=False),
            nn.BatchNorm3d(stem),
            nn.ReLU(True),
        )
        n = config.blocks_per_stage
        self.stages = nn.ModuleList(
            [make_stage(stem, w1, n, 2), make_stage(w1, w2, n, 2), make_stage(w2, w3, n, 2)]
        )
        hidden = config.head_hidden
        self.detection = TaskHead(w3, hidden, 1)
        self.malignancy = TaskHead(w3, hidden, 1)
        self.composition = TaskHead(w3, hidden, len(COMPOSITIONS))
        self.diameter = TaskHead(w3, hidden, 1)
        self.offset = TaskHead(w3, hidden, 3)
        self.mask = MaskDecoder(config.widths)
        self.calcification = TaskHead(w3, hidden, 1) if config.rating_heads else None
        # Regression informing classification: the malignancy logit also reads the nodule's
        # own estimated size (readers' malignancy ratings follow size closely), through one
        # learnt weight; the size estimate itself is not bent by it (detached).
        self.size_to_malignancy = nn.Parameter(torch.zeros(1)) if config.rating_heads else None
        self.characteristics = (
            TaskHead(w3, hidden, len(CHARACTERISTICS)) if config.rating_heads else None
        )

    def forward(self, patches: torch.Tensor, with_mask: bool = True) -> TaskOutputs:
        features = [self.stem(patches)]
        for stage in self.stages:
            features.append(stage(features[-1]))
        pooled = features[-1].mean(dim=(2, 3, 4))
        diameter = F.softplus(self.diameter(pooled)[:, 0]) * 10.0
        malignancy = self.malignancy(pooled)[:, 0]
        if self.size_to_malignancy is not None:
            size = torch.log(diameter.detach().clamp(min=1.0) / TYPICAL_DIAMETER_MM)
            malignancy = malignancy + self.size_to_malignancy * size
        return TaskOutputs(
            nodule_logit=self.detection(pooled)[:, 0],
            malignancy_logit=malignancy,
            composition_logits=self.composition(pooled),
            diameter_mm=diameter,
            offset_mm=self.offset(pooled) * 5.0,
            mask_logits=self.mask(features) if with_mask else None,
            calcification_logit=self.calcification(pooled)[:, 0] if self.calcification else None,
            characteristics=self.characteristics(pooled) if self.characteristics else None,
        )


def build_model(config: NetworkConfig | None = None) -> ResMTNet:
    """The one factory, so training, inference and tests build the same network."""
    return ResMTNet(config or NetworkConfig())
