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

from dicom_node.cases import unpacked

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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("case", nargs="?", type=Path, default=DEFAULT_CASE)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="cpu")
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
    median = statistics.median(r["wall"] for r in runs)
    print(
        f"\nmedian wall {median:.1f} s; target 15 s on 2 CPU cores -> ratio {median / 15:.2f}; "
        f"MONAI lung_nodule_ct_detection reports 36 s per CT (fp32, A100) -> ratio {median / 36:.2f}"
    )


if __name__ == "__main__":
    main()
