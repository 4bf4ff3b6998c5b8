"""What the costlier, more faithful map costs at 224 px: the ensemble's occlusion sensitivity
(`skin explain --cam-method occlusion`, `/v1/predict?cam_method=occlusion`) against the answer with the
bundle's own Grad-CAM map, both in-process through skin.ensemble.Predictor as `skin explain` runs them.

A random-weight bundle of the three default members at --size (the cost does not depend on the weights),
one photograph-sized synthetic lesion, 2 torch threads; the two paths run interleaved --repeats times
(so the machine's drift hits both alike); the ratio is the median of the per-round ratios.

    python benchmarks/occlusion_cost.py [--size 224] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from _harness import random_bundle
from skin.bundle import Bundle
from skin.ensemble import Predictor
from skin.occlusion import Grid, cost
from skin.synth import make_sample


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Bundle.load(random_bundle(Path(tmp), a.size))
        p = Predictor(bundle)
        img = make_sample(4, 0, 0, 512).image  # a photograph larger than the members' input, as users send
        runs = {"answer + Grad-CAM (bundle's map)": lambda: p.answers([img], cam=True),
                "answer + occlusion (cam_method=occlusion)": lambda: p.occlusion([img])}
        for fn in runs.values():
            fn()  # warm-up
        times = {k: [] for k in runs}
        for _ in range(a.repeats):
            for k, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
    gc, occ = times.values()
    ratios = sorted(o / g for o, g in zip(occ, gc))
    print(f"members {', '.join(bundle.member_names)} at {a.size} px, random weights, {a.threads} torch threads; "
          f"occlusion grid {Grid()} = {cost(Grid(), a.size)} forwards of every member")
    for k, t in times.items():
        print(f"  {k:<44} median {statistics.median(t):7.2f} s  (min {min(t):.2f}, max {max(t):.2f})")
    print(f"  occlusion / Grad-CAM: {statistics.median(ratios):.1f}x (min {ratios[0]:.1f}, max {ratios[-1]:.1f})")


if __name__ == "__main__":
    main()
