"""Scan throughput (validation + hashing of 640x480 JPEGs, all cores) and synth throughput
(256 px, one core). Targets: scan >= 150 images/s on 2 cores, synth >= 100 images/s on one core.

    python benchmarks/data_throughput.py [--images 600]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from skin.data import ScanOptions, scan
from skin.synth import make_sample


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=600, help="images for the scan benchmark")
    ap.add_argument("--synth", type=int, default=300, help="images for the synth benchmark")
    a = ap.parse_args()

    t0 = time.perf_counter()
    for i in range(a.synth):
        make_sample(i % 6, 0, i, 256)
    synth_rate = a.synth / (time.perf_counter() - t0)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp, "src")
        per_class = a.images // 6
        for k in range(6):
            (root / f"{k + 1}. C{k}").mkdir(parents=True)
            for i in range(per_class):  # 640x480 like a phone crop
                make_sample(k, 1, i, 480).image.resize((640, 480)).save(
                    root / f"{k + 1}. C{k}" / f"{i}.jpg", quality=90)
        n = per_class * 6
        t0 = time.perf_counter()
        scan(root, Path(tmp, "out"), ScanOptions(workers=os.cpu_count() or 1), progress=False)
        scan_s = time.perf_counter() - t0
    print(f"synth: {synth_rate:.0f} images/s at 256 px on one core (target >= 100)")
    print(f"scan:  {n / scan_s:.0f} images/s on {os.cpu_count()} cores, 640x480 JPEG, "
          f"validation + sha256 + dHash + split + leak check, {n} images in {scan_s:.1f} s (target >= 150)")


if __name__ == "__main__":
    main()
