"""Grad-CAM faithfulness on the synthetic lesions, whose masks are known.

For every test image: the ensemble map of the predicted class (skin.ensemble.Predictor, the
same path as `skin explain` and the server); pointing game = its peak lies inside the lesion
mask (target >= 0.80 of test images with the demo bundle); energy share = the map's mass inside
the mask, reported per class.

    python benchmarks/gradcam_faithfulness.py --bundle demo/train/bundle --data demo/data --synth demo/synth
"""
from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from skin.bundle import Bundle
from skin.data import load_manifest
from skin.ensemble import Predictor
from skin.images import load_image
from skin.metrics import energy_inside, pointing_hit


def faithfulness(bundle: Bundle, data: str | Path, synth: str | Path, split: str = "test",
                 batch: int = 16) -> dict:
    """Per class and overall: pointing game, energy in the mask, mask area; plus accuracy."""
    synth = Path(synth).resolve()
    masks = {str((synth / p).resolve()): synth / m for p, m in
             pd.read_csv(synth / "manifest.csv")[["path", "mask"]].itertuples(index=False)}
    df = load_manifest(data, split)
    hits, energy, area, correct = defaultdict(list), defaultdict(list), defaultdict(list), []
    rows = list(df.itertuples())
    predictor = Predictor(bundle)
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        images = [load_image(r.path) for r in chunk]
        for r, res in zip(chunk, predictor.answers(images, cam=True)):
            mask = np.asarray(Image.open(masks[str(Path(r.path).resolve())])) > 127
            cam = res["gradcam"]["map"]
            hits[r.label].append(pointing_hit(cam, mask))
            energy[r.label].append(energy_inside(cam, mask))
            area[r.label].append(float(mask.mean()))
            correct.append(res["class"] == r.label)
    per_class = {c: {"pointing": float(np.mean(hits[c])), "energy": float(np.mean(energy[c])),
                     "mask_area": float(np.mean(area[c]))} for c in bundle.classes if c in hits}
    return {"per_class": per_class, "images": len(correct), "accuracy": float(np.mean(correct)),
            "pointing": float(np.mean([h for v in hits.values() for h in v])),
            "energy": float(np.mean([e for v in energy.values() for e in v]))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default="demo/train/bundle")
    ap.add_argument("--data", default="demo/data", help="`skin data scan` output of the synthetic set")
    ap.add_argument("--synth", default="demo/synth", help="the `skin data synth` folder (masks + manifest.csv)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--batch", type=int, default=16)
    a = ap.parse_args()
    bundle = Bundle.load(a.bundle)
    r = faithfulness(bundle, a.data, a.synth, a.split, a.batch)
    strides = sorted({e.output_stride for e in bundle.members})
    print(f"bundle {bundle.id}{' (UNTRAINED)' if bundle.untrained else ''}, {r['images']} {a.split} images, "
          f"output stride {'/'.join(map(str, strides))}, accuracy {r['accuracy']:.3f}")
    print(f"{'class':<14}{'pointing game':>14}{'energy in mask':>16}{'mask area':>11}")
    for c, v in r["per_class"].items():
        print(f"{c:<14}{v['pointing']:>14.3f}{v['energy']:>16.3f}{v['mask_area']:>11.3f}")
    print(f"{'all':<14}{r['pointing']:>14.3f}{r['energy']:>16.3f}   (pointing-game target >= 0.80)")


if __name__ == "__main__":
    main()
