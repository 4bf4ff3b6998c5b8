"""What does the ensemble answer when the lesion is painted out? Which classes rest on the lesion.

For every synthetic test image (lesion masks known): the lesion (its mask, dilated by 3 px) is
painted with the median colour of the rest of the image, leaving plain skin, hairs and lighting.
Per class: the ensemble's probability of the true class before and after, the share still given
the true class, and what the lesion-free images are called. A class that keeps its probability
without its lesion is told from the skin or from what the image lacks, and a Grad-CAM map of it has
no lesion to point at: read its pointing game (benchmarks/explanations.py faithfulness) with that in mind.

    python benchmarks/explanations.py lesion-removed --bundle demo/train/bundle-tuned --data demo/data --synth demo/synth
"""
from __future__ import annotations

PROG = "benchmarks/explanations.py lesion-removed"

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from _harness import synthetic_split_args
from skin.bundle import Bundle
from skin.data import load_manifest
from skin.ensemble import Predictor
from skin.evaluation import attach_masks
from skin.images import DATASET_LIMITS, load_image


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    synthetic_split_args(ap)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    bundle = Bundle.load(a.bundle)
    df = attach_masks(load_manifest(a.data, a.split), Path(a.synth) / "manifest.csv")
    df = df[df["mask"] != ""]
    predictor = Predictor(bundle)  # the ensemble as every answer makes it

    def ensemble(images: list[Image.Image]) -> np.ndarray:
        return np.concatenate([predictor.combine(predictor.member_probs(images[s:s + 32]))
                               for s in range(0, len(images), 32)])

    images = [load_image(p, DATASET_LIMITS) for p in df["path"]]
    painted = []
    for img, mask_path in zip(images, df["mask"]):
        pixels = np.asarray(img).copy()
        mask = np.asarray(Image.open(mask_path).convert("L").resize(img.size, Image.Resampling.NEAREST)) > 127
        mask = ndimage.binary_dilation(mask, iterations=3)
        pixels[mask] = np.median(pixels[~mask], 0)
        painted.append(Image.fromarray(pixels))
    before, after = ensemble(images), ensemble(painted)
    y = df["label_index"].to_numpy(int)
    names = bundle.classes.names
    print(f"bundle {bundle.id}, {len(y)} {a.split} images, lesion painted out (mask dilated 3 px, median skin colour)")
    print(f"{'class':<14}{'p(true)':>8}{'painted':>9}{'still true':>11}   lesion-free images called")
    for k, name in enumerate(names):
        s = y == k
        called = np.bincount(after[s].argmax(1), minlength=len(names))
        print(f"{name:<14}{before[s, k].mean():>8.3f}{after[s, k].mean():>9.3f}{np.mean(after[s].argmax(1) == k):>11.2f}   "
              + ", ".join(f"{names[j]} {c}" for j, c in enumerate(called) if c))
    called = np.bincount(after.argmax(1), minlength=len(names)) / len(y)
    print("all lesion-free images: " + ", ".join(f"{n} {c:.2f}" for n, c in zip(names, called) if c))

