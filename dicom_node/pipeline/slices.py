"""What completion, selection and the series reader all ask of a stack of slices: which
images are localizers (scouts), and the step between slice positions."""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Iterable

#: Image Type (0008,0008) value 3 of a scout/topogram (PS3.3 C.8.2.1.1.1): never a slice.
LOCALIZER = "LOCALIZER"
#: Positions closer than this along the slice normal are the same position.
SAME_POSITION_MM = 1e-3


def is_localizer(image_type: str | Iterable[str]) -> bool:
    """``image_type`` as stored in the index (values joined by backslashes) or as read."""
    values = image_type.split("\\") if isinstance(image_type, str) else image_type
    return any(str(v).strip().upper() == LOCALIZER for v in values)


def slice_steps(positions: Iterable[float]) -> list[float]:
    """Distances between neighbouring distinct positions, in ascending order of position."""
    ordered = sorted(positions)
    return [b - a for a, b in itertools.pairwise(ordered) if b - a > SAME_POSITION_MM]


def median_step(positions: Iterable[float]) -> float | None:
    """The regular step of a stack (the median of its steps); None for fewer than two."""
    steps = slice_steps(positions)
    return statistics.median(steps) if steps else None
