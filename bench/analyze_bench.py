"""Wall time per stage and peak memory of `dicom-node analyze` on one CT series.

Usage: python bench/analyze_bench.py [ARCHIVE_OR_FOLDER] [--repeat N] [--device cpu|cuda]

Each run is a fresh process (as an operator would run it), so model loading is included.
Prints one markdown row per run and the median, ready for bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dicom_node.pipeline.series import unpacked

DEFAULT_CASE = (
    Path(
        os.environ.get(
            "LUNGNODE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"
        )
    )
    / "lidc"
    / "LIDC-IDRI-0002.tar.xz"
)
STAGES = ("read", "resample", "lung_mask", "candidates", "classify", "measure", "write")


def run_once(folder: Path, device: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        child = subprocess.run(
            [
                sys.executable,
                "-m",
                "dicom_node.cli",
                "analyze",
                str(folder),
                "--out",
                out,
                "--device",
                device,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        wall = time.perf_counter() - started
        if child.returncode != 0:
            raise SystemExit(f"analyze failed ({child.returncode}): {child.stderr or child.stdout}")
        (series,) = json.loads((Path(out) / "findings.json").read_text())["series"]
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {
        "wall": wall,
        "peak_mb": peak_mb,
        **series["timings_s"],
        "findings": len(series["findings"]),
    }


def steady_state(folder: Path, device: str, repeat: int) -> None:
    """What a running node pays per series: the model is loaded once, then each series is
    read, analyzed and written (process start and model loading excluded)."""
    from dicom_node.pipeline.results import build_results
    from dicom_node.pipeline.series import read_series
    from inference.detector import DEFAULT_WEIGHTS, NoduleDetector

    detector = NoduleDetector.from_weights(DEFAULT_WEIGHTS, device)
    times = []
    for n in range(repeat + 1):  # the first run warms up (CUDA kernels, allocator)
        started = time.perf_counter()
        (series,), _, _ = read_series([folder])
        read = time.perf_counter()
        result = detector.detect(series.volume)
        detected = time.perf_counter()
        build_results(series, result.findings, detector.info)
        done = time.perf_counter()
        if n:
            times.append((read - started, detected - read, done - detected, done - started))
    medians = [statistics.median(t[i] for t in times) for i in range(4)]
    print(
        f"\nsteady state (model loaded once, median of {repeat}): read {medians[0]:.2f} s, "
        f"detect {medians[1]:.2f} s, build SR/SEG/key images {medians[2]:.2f} s, "
        f"total {medians[3]:.2f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("case", nargs="?", type=Path, default=DEFAULT_CASE)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--steady-state", action="store_true", help="also time repeated analyses in one process"
    )
    args = parser.parse_args()
    print(
        f"# {time.strftime('%Y-%m-%d')} {platform.node()} {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, device {args.device}, case {args.case.name}"
    )
    header = ["run", "wall s", *[f"{s} s" for s in STAGES], "peak RSS MB", "findings"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    runs = []
    with unpacked([args.case]) as (folder,):
        for n in range(1, args.repeat + 1):
            r = run_once(folder, args.device)
            runs.append(r)
            cells = [
                str(n),
                f"{r['wall']:.1f}",
                *[f"{r.get(s, 0):.2f}" for s in STAGES],
                f"{r['peak_mb']:.0f}",
                str(r["findings"]),
            ]
            print("| " + " | ".join(cells) + " |", flush=True)
        if args.steady_state:
            steady_state(folder, args.device, args.repeat)
    median = statistics.median(r["wall"] for r in runs)
    print(
        f"\nmedian wall {median:.1f} s; target 15 s on 2 CPU cores -> ratio {median / 15:.2f}; "
        f"MONAI lung_nodule_ct_detection reports 36 s per CT (fp32, A100) -> ratio {median / 36:.2f}"
    )


if __name__ == "__main__":
    main()
