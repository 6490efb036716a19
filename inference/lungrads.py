"""Lung-RADS v2022 category of a nodule at a baseline screening CT, from size, composition and
benign calcification.

With a prior study, :func:`lung_rads_with_prior` applies the rules for new, growing and stable
nodules. Category 4X needs features this engine does not assess (it is never given).
"""

from __future__ import annotations

from dataclasses import dataclass

INF = float("inf")


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


@dataclass(frozen=True)
class FollowUpRule:
    """One row of the Lung-RADS v2022 table that needs a prior: a nodule of this composition
    and status whose mean diameter and solid part fall in [low, high) gets ``category``."""

    composition: str
    status: str
    category: str
    wording: str
    diameter_mm: tuple[float, float] = (0.0, INF)
    solid_part_mm: tuple[float, float] = (0.0, INF)

    def applies(self, composition: str, status: str, diameter: float, solid: float) -> bool:
        return (
            composition == self.composition
            and status == self.status
            and self.diameter_mm[0] <= diameter < self.diameter_mm[1]
            and self.solid_part_mm[0] <= solid < self.solid_part_mm[1]
        )


#: ACR Lung-RADS v2022 assessment categories for new, growing and slowly growing nodules
#: (the first row that applies wins). Stable and shrinking nodules are handled in
#: :func:`lung_rads_with_prior`: the table has no row of their own.
FOLLOW_UP_RULES = (
    FollowUpRule("solid", "new", "2", "new solid nodule < 4 mm", diameter_mm=(0.0, 4.0)),
    FollowUpRule("solid", "new", "3", "new solid nodule 4 to < 6 mm", diameter_mm=(4.0, 6.0)),
    FollowUpRule("solid", "new", "4A", "new solid nodule 6 to < 8 mm", diameter_mm=(6.0, 8.0)),
    FollowUpRule("solid", "new", "4B", "new solid nodule >= 8 mm", diameter_mm=(8.0, INF)),
    FollowUpRule("solid", "growing", "4A", "growing solid nodule < 8 mm", diameter_mm=(0.0, 8.0)),
    FollowUpRule("solid", "growing", "4B", "growing solid nodule >= 8 mm", diameter_mm=(8.0, INF)),
    FollowUpRule(
        "solid", "slowly growing", "4B", "solid nodule growing slowly over several screenings"
    ),
    FollowUpRule("part-solid", "new", "3", "new part-solid nodule < 6 mm", diameter_mm=(0.0, 6.0)),
    FollowUpRule(
        "part-solid",
        "new",
        "4A",
        "part-solid nodule >= 6 mm with a new solid component < 4 mm",
        diameter_mm=(6.0, INF),
        solid_part_mm=(0.0, 4.0),
    ),
    FollowUpRule(
        "part-solid",
        "new",
        "4B",
        "part-solid nodule with a new solid component >= 4 mm",
        diameter_mm=(6.0, INF),
        solid_part_mm=(4.0, INF),
    ),
    FollowUpRule(
        "part-solid",
        "growing",
        "4A",
        "part-solid nodule >= 6 mm with a growing solid component < 4 mm",
        diameter_mm=(6.0, INF),
        solid_part_mm=(0.0, 4.0),
    ),
    FollowUpRule(
        "part-solid",
        "growing",
        "4B",
        "part-solid nodule with a growing solid component >= 4 mm",
        diameter_mm=(6.0, INF),
        solid_part_mm=(4.0, INF),
    ),
    FollowUpRule(
        "part-solid",
        "slowly growing",
        "4B",
        "part-solid nodule growing slowly over several screenings",
        diameter_mm=(6.0, INF),
    ),
    FollowUpRule(
        "ground-glass", "new", "3", "new ground-glass nodule >= 30 mm", diameter_mm=(30.0, INF)
    ),
    FollowUpRule(
        "ground-glass",
        "slowly growing",
        "2",
        "ground-glass nodule >= 30 mm growing slowly",
        diameter_mm=(30.0, INF),
    ),
)
#: Lung-RADS v2022: a category 3 or 4 nodule unchanged for 3 months or more is category 2.
STABLE_FOR_DAYS = 90
#: Growth "within 12 months": over a longer interval, a nodule growing no faster than this
#: per year is growing slowly.
GROWTH_MM = 1.5
YEAR_DAYS = 365


def lung_rads_with_prior(
    composition: str,
    diameter_mm: float,
    solid_part_mm: float,
    calcified: bool,
    status: str,
    interval_days: int,
    diameter_change_mm: float = 0.0,
) -> tuple[str, str]:
    """Category and the rule that gave it, for a nodule compared with a prior scan.

    ``status`` is new, growing, stable or shrinking. Where the v2022 table has no rule for
    the case (a new ground-glass nodule under 30 mm, a shrinking nodule, stable for less
    than 3 months), the baseline size table applies, and the wording says so.
    """
    baseline = lung_rads_category(composition, diameter_mm, solid_part_mm, calcified)
    if calcified:
        return baseline, "benign calcification"
    if status == "growing" and interval_days > YEAR_DAYS:
        per_year = diameter_change_mm * YEAR_DAYS / interval_days
        if per_year <= GROWTH_MM:
            status = "slowly growing"
    d, solid = round(diameter_mm, 1), round(solid_part_mm, 1)
    for rule in FOLLOW_UP_RULES:
        if rule.applies(composition, status, d, solid):
            return rule.category, rule.wording
    if status == "stable" and baseline != "2":
        if interval_days >= STABLE_FOR_DAYS:
            return "2", f"category {baseline} nodule unchanged for 3 months or more"
        return baseline, f"baseline size table (unchanged, but over {interval_days} days only)"
    return baseline, f"baseline size table ({status} {composition} nodule)"
