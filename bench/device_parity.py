"""Findings on a GPU against the CPU for one case: the same nodules, and each device's time.

Usage: python bench/device_parity.py [CASE_ARCHIVE_OR_FOLDER] [--device cuda]

The GPU runs the lung mask's closing and the candidate search's filters in torch
(inference/filters.py) and the network; the CPU runs scipy and the network. Both must report
the same findings; their scores may differ in the last digits.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.analyze_bench import DEFAULT_CASE
from dicom_node.pipeline.series import read_series, unpacked
from inference.detector import DEFAULT_WEIGHTS, NoduleDetector


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case", nargs="?", type=Path, default=DEFAULT_CASE)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    with unpacked([args.case]) as (folder,):
        (series,), _, _ = read_series([folder])
    results = {}
    for device in ("cpu", args.device):
        detector = NoduleDetector.from_weights(DEFAULT_WEIGHTS, device)
        detector.detect(series.volume)  # warm-up: kernels, allocator, caches
        started = time.perf_counter()
        result = detector.detect(series.volume)
        results[device] = (result, time.perf_counter() - started)
        print(
            f"{device}: detect {results[device][1]:.2f} s, stages {result.timings_s}, "
            f"{result.candidates} candidates, {len(result.findings)} findings"
        )
    (cpu, _), (gpu, _) = results["cpu"], results[args.device]
    for a, b in zip(cpu.findings, gpu.findings, strict=False):
        shift = float(np.linalg.norm(np.subtract(a.center_mm, b.center_mm)))
        print(
            f"  cpu {a.score:.4f} {a.diameter_mm:5.1f} mm | {args.device} {b.score:.4f} "
            f"{b.diameter_mm:5.1f} mm | centres {shift:.2f} mm apart"
        )
    same = len(cpu.findings) == len(gpu.findings) and all(
        np.linalg.norm(np.subtract(a.center_mm, b.center_mm)) < 1.0
        for a, b in zip(cpu.findings, gpu.findings, strict=True)
    )
    print("same findings" if same else "FINDINGS DIFFER")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
