"""Ensemble-weight search speed: candidates scored on 35,000 cached probability rows (synthetic:
three members of different quality, six classes), through Ray Tune on a local 2-CPU Ray, plus
the raw vectorised scoring rate. Target: >= 1,000 candidates within 60 s on 2 cores.

    python benchmarks/weight_search.py [--rows 35000] [--candidates 2000]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from skin.calibration import dirichlet_candidates, score_candidates  # noqa: E402


def member_probs(y: np.ndarray, accuracy: float, rng: np.random.Generator, c: int = 6) -> np.ndarray:
    n = len(y)
    top = np.where(rng.random(n) < accuracy, y, (y + rng.integers(1, c, n)) % c)
    logits = rng.normal(0, 1, (n, c))
    logits[np.arange(n), top] += 2.5
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=35_000)
    ap.add_argument("--candidates", type=int, default=2000)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    y = rng.integers(0, 6, a.rows)
    probs = np.stack([member_probs(y, acc, rng) for acc in (0.70, 0.68, 0.72)])

    cands = dirichlet_candidates(3, 500, 0)
    t0 = time.perf_counter()
    score_candidates(cands, probs, y)
    raw = len(cands) / (time.perf_counter() - t0)

    import ray
    from jobs.tune import search_weights
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        weights, best, df = search_weights(probs, y, candidates=a.candidates, storage=tmp)
        secs = time.perf_counter() - t0
    ray.shutdown()
    n = int(df["candidates"].sum())
    print(f"{a.rows:,} rows x 3 members x 6 classes")
    print(f"raw scoring: {raw:.0f} candidates/s on one core")
    print(f"Ray Tune search: {n} candidates in {secs:.1f} s on 2 CPUs -> {n / secs:.0f} candidates/s "
          f"(target >= 1,000 within 60 s); best macro-F1 {best['score']:.4f} at weights {np.round(weights, 3)}")


if __name__ == "__main__":
    main()
