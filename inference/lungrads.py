"""Lung-RADS v2022 category of a nodule at a baseline screening CT, from size, composition and
benign calcification.

Category 4X and the rules for new or growing nodules need a prior study and features this
engine does not assess, so they are out of scope here and the report says "baseline".
"""

from __future__ import annotations


def lung_rads_category(
    composition: str, diameter_mm: float, solid_part_mm: float = 0.0, calcified: bool = False
) -> str:
    """'1' for a benign calcification pattern, else '2', '3', '4A' or '4B' by the v2022
    baseline size table.

    Sizes are compared after rounding to one decimal place, as Lung-RADS reports them.
    """
    if composition not in ("solid", "part-solid", "ground-glass"):
        raise ValueError(
            f"composition must be solid, part-solid or ground-glass, got {composition!r}"
        )
    if calcified:
        return "1"
    d = round(diameter_mm, 1)
    solid = round(solid_part_mm, 1)
    if composition == "solid":
        if d < 6.0:
            return "2"
        if d < 8.0:
            return "3"
        if d < 15.0:
            return "4A"
        return "4B"
    if composition == "part-solid":
        if d < 6.0:
            return "2"
        if solid < 6.0:
            return "3"
        if solid < 8.0:
            return "4A"
        return "4B"
    if composition == "ground-glass":
        return "2" if d < 30.0 else "3"
    raise ValueError(f"composition must be solid, part-solid or ground-glass, got {composition!r}")
