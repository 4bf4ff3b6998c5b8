"""Why do some members' Grad-CAM maps peak at the image border? Map artefact or real use?

For each member of a bundle, on the synthetic test images (lesion masks known):
  peaks at border   share of the member's map peaks (its predicted class, at --cam-stride) that lie
                    in the outer --band of the image on any side
  drop: border      mean drop of the member's probability of its predicted class when the border
                    band, less any lesion in it, is painted with the image's mean colour (what the
                    member reads there)
  drop: lesion      the same when the lesion (its mask) is painted with the mean colour of the skin
                    around it
A member whose maps peak at the border but whose answer does not move when the border is painted
over (and does move when the lesion is) is not using the border: the peak is an artefact of the
map. One whose answer moves with the border reads it, and the map is honest about that.

    python benchmarks/explanations.py border --bundle demo/train/bundle-tuned --data demo/data --synth demo/synth
"""
from __future__ import annotations

PROG = "benchmarks/explanations.py border"

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from _harness import synthetic_split_args
from skin.bundle import Bundle
from skin.explanation import Overrides
from skin.data import load_manifest
from skin.evaluation import attach_masks
from skin.gradcam import normalize, upsample
from skin.images import load_image
from skin.inference import MemberRunner
from skin.presets import to_batch


def paint(img: np.ndarray, region: np.ndarray, colour: np.ndarray) -> Image.Image:
    out = img.copy()
    out[region] = colour
    return Image.fromarray(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    synthetic_split_args(ap)
    ap.add_argument("--cam-stride", type=int, default=8)
    ap.add_argument("--band", type=float, default=0.1, help="border band, as a share of each side")
    a = ap.parse_args(argv)
    bundle = Bundle.load(a.bundle)
    df = attach_masks(load_manifest(a.data, a.split), Path(a.synth) / "manifest.csv")
    images = [np.asarray(load_image(p)) for p in df["path"]]
    masks = [np.asarray(Image.open(m).convert("L").resize((im.shape[1], im.shape[0]))) > 127
             for m, im in zip(df["mask"], images)]
    print(f"bundle {bundle.id}, {len(images)} {a.split} images, maps at stride {a.cam_stride}, border band {a.band:.0%}")
    print(f"{'member':<16}{'peaks at border':>16}{'drop: border':>14}{'drop: lesion':>14}{'pointing':>10}")
    for name in bundle.member_names:
        run = MemberRunner.from_bundle(bundle, name, overrides=Overrides(stride=a.cam_stride))
        cfg = run.member.data_config
        border_peaks, d_border, d_lesion, hits = [], [], [], []
        for img, mask in zip(images, masks):
            h, w = mask.shape
            bh, bw = max(1, int(a.band * h)), max(1, int(a.band * w))
            band = np.zeros_like(mask)
            band[:bh], band[-bh:], band[:, :bw], band[:, -bw:] = True, True, True, True
            ring = ~mask & ~band
            probs, maps = run(to_batch([Image.fromarray(img)], cfg), cam=True)
            k = int(probs[0].argmax())
            m = normalize(upsample(maps[0, k][None], (h, w))[0]).numpy()
            i, j = np.unravel_index(int(m.argmax()), m.shape)
            border_peaks.append(bool(band[i, j]))
            hits.append(bool(mask[i, j]))
            variants = [paint(img, band & ~mask, img.reshape(-1, 3).mean(0)),  # the skin of the band only
                        paint(img, mask, img[ring].mean(0) if ring.any() else img.reshape(-1, 3).mean(0))]
            p = run(torch.cat([to_batch([v], cfg) for v in variants]))[0][:, k]
            d_border.append(probs[0, k] - p[0])
            d_lesion.append(probs[0, k] - p[1])
        print(f"{name:<16}{np.mean(border_peaks):>16.2f}{np.mean(d_border):>14.3f}{np.mean(d_lesion):>14.3f}"
              f"{np.mean(hits):>10.3f}", flush=True)

