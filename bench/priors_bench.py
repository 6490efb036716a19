"""Comparison with a prior on generated pairs: statuses, registration, VDT, Lung-RADS.

Usage: python bench/priors_bench.py [CASE.tar.xz ...] [--pairs 20] [--seed 1]

Each pair is one shared LIDC scan and a "prior" made from it (inference.lab.priors: rigid
repositioning, re-slicing, fresh noise, synthetic nodules that grow, shrink, stay, appear
and disappear). Both scans go through the shipped detector, the prior is registered to the
current scan, and the comparison is scored against the pair's truth. Prints the figures for
bench/README.md and, per pair, what was missed.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from dicom_node.lab.cases import load_cases
from inference.comparison import Status
from inference.detector import DEFAULT_WEIGHTS, NoduleDetector
from inference.lab.experiments import lung_points_mm, seeded
from inference.lab.priors import PlantedNodule, ScanPair, make_pair
from inference.lungrads import lung_rads_with_prior
from inference.prior_reading import read_with_prior

SHARED = Path(
    os.environ.get("LUNGNODE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)
VDT_TOLERANCE = 0.10
#: A finding is the planted nodule when its centre lies this close (LUNA16: within the radius).
HIT_MM = 5.0


def _nearest(
    points: list[tuple[float, float, float]], target: tuple[float, float, float]
) -> int | None:
    if not points:
        return None
    distance = np.linalg.norm(np.asarray(points) - np.asarray(target), axis=1)
    best = int(np.argmin(distance))
    return best if distance[best] <= HIT_MM else None


def score_pair(detector: NoduleDetector, pair: ScanPair) -> dict[str, list]:
    reading = read_with_prior(detector, pair.current, pair.prior, pair.interval_days)
    registration, comparison = reading.registration, reading.comparison
    now = reading.findings
    out: dict[str, list] = {
        "status": [],
        "registration_mm": [],
        "vdt": [],
        "lung_rads": [],
        "misses": [],
    }
    for nodule in pair.nodules:
        out["registration_mm"].append(
            float(
                np.linalg.norm(
                    registration.to_prior(np.asarray(nodule.current_mm)) - nodule.prior_mm
                )
            )
        )
        in_prior = _nearest([f.center_mm for f in reading.prior_findings], nodule.prior_mm)
        if nodule.expected is Status.RESOLVED:
            hit = _nearest([f.center_mm for f in comparison.resolved], nodule.prior_mm)
            out["status"].append((hit is not None, in_prior is not None))
            if hit is None:
                out["misses"].append(
                    f"resolved {nodule.prior_diameter_mm:.1f} mm not reported resolved"
                )
            continue
        hit = _nearest([f.center_mm for f in now], nodule.current_mm)
        change = comparison.changes[hit] if hit is not None else None
        got = change.status if change else None
        # Found: detected in each scan that holds it (a miss there is the detector's, not
        # the comparison's; both are counted, apart).
        found = hit is not None and (nodule.prior_volume_mm3 == 0 or in_prior is not None)
        out["status"].append((got is nodule.expected, found))
        if got is not nodule.expected:
            out["misses"].append(
                f"{nodule.expected} {nodule.prior_diameter_mm:.1f}->{nodule.current_diameter_mm:.1f} mm: got {got}"
            )
        out["lung_rads"].append(
            (
                change is not None
                and change.lung_rads == _expected_category(nodule, pair.interval_days),
                found,
            )
        )
        expected_vdt = nodule.expected_vdt_days(pair.interval_days)
        if expected_vdt and nodule.current_diameter_mm >= 6.0:
            vdt = change.vdt_days if change else None
            error = abs(vdt - expected_vdt) / expected_vdt if vdt else 1.0
            out["vdt"].append((error <= VDT_TOLERANCE, found, error))
    return out


def _expected_category(nodule: PlantedNodule, interval_days: int) -> str:
    """The category of the truth: what the readers' measurement of the planted sizes gives."""
    return lung_rads_with_prior(
        "solid",
        nodule.current_diameter_mm,
        nodule.current_diameter_mm,
        False,
        str(nodule.expected),
        interval_days,
        nodule.current_diameter_mm - nodule.prior_diameter_mm,
    )[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "cases", nargs="*", type=Path, default=sorted((SHARED / "lidc").glob("*.tar.xz"))
    )
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    detector = NoduleDetector.from_weights(DEFAULT_WEIGHTS, "cpu")
    cases = sorted(load_cases(args.cases), key=lambda c: c.name)  # not the temp folders order
    points = {
        c.name: lung_points_mm(c.volume, 2.0, seeded(args.seed, c.name, "points")) for c in cases
    }
    totals: dict[str, list] = {"status": [], "registration_mm": [], "vdt": [], "lung_rads": []}
    started = time.perf_counter()
    for n in range(args.pairs):
        case = cases[n % len(cases)]
        rng = seeded(args.seed, case.name, "pair", n)
        pair = make_pair(case.volume, points[case.name], case.avoid_mm, rng)
        scored = score_pair(detector, pair)
        for key in totals:
            totals[key] += scored[key]
        print(
            f"pair {n} ({case.name}): {sum(r for r, _ in scored['status'])}/{len(scored['status'])} statuses right; "
            f"registration {statistics.median(scored['registration_mm']):.2f} mm; {'; '.join(scored['misses']) or 'no miss'}",
            flush=True,
        )
    reg = totals["registration_mm"]
    print(
        f"\n{time.strftime('%Y-%m-%d')}, {platform.node()}, {os.cpu_count()} CPUs, {args.pairs} pairs, seed {args.seed}, "
        f"{time.perf_counter() - started:.0f} s"
    )
    print(
        "| figure | every planted nodule | nodules the detector found in each scan holding them |"
    )
    print("| --- | --- | --- |")
    print(f"| status right | {_share(totals['status'])} |")
    print(
        f"| registration error at nodule centres | median {statistics.median(reg):.2f} mm "
        f"(max {max(reg):.2f}) | |"
    )
    if totals["vdt"]:
        errors = [e for _, found, e in totals["vdt"] if found]
        print(
            f"| VDT within 10 %, growing >= 6 mm | {_share([v[:2] for v in totals['vdt']])}; "
            f"median error {100 * statistics.median(errors):.1f} % |"
        )
    print(f"| Lung-RADS with prior right | {_share(totals['lung_rads'])} |")


def _share(rows: list[tuple[bool, bool]]) -> str:
    """'right/all = share | right/found = share' over (right, found) rows."""
    right = sum(r for r, _ in rows)
    found = [r for r, f in rows if f]
    return (
        f"{right}/{len(rows)} = {right / len(rows):.3f} | "
        f"{sum(found)}/{len(found)} = {sum(found) / max(len(found), 1):.3f}"
    )


if __name__ == "__main__":
    main()
