"""Does the Grad-CAM follow the model, or merely what stands out from the skin? Distractors decide.

On the demo's synthetic lesions the lesion is the only thing that stands out from the skin, so a
map with no model (skin.metrics.contrast_map) points at it about as often as ours. Here the same
test images (same seed: the same lesions and masks) are written again with 1..N class-independent
artefacts away from the lesion (`skin data synth --artefacts N`: surgical-marker ink blots, gel
bubbles) and both are scored with the same bundle, in one run: accuracy, the ensemble map's
pointing game, and what the maps that know less score (centre, colour contrast, the same Grad-CAM
of untrained members). A map that follows the model should keep pointing at the lesion where the
model ignores the artefacts; the contrast map should not.

    python benchmarks/explanations.py distractors --bundle demo/train/bundle-tuned [--artefacts 3] [--also B2 ...]

--also scores more bundles (e.g. the same members with other explanation layers or methods) on the
same images in the same run.
"""
from __future__ import annotations

PROG = "benchmarks/explanations.py distractors"

import argparse
import tempfile
from pathlib import Path

from _harness import synthetic_split_args
from explain.faithfulness import measure
from skin.bundle import Bundle
from skin.data import ScanOptions, scan
from skin.synth import write_dataset


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    synthetic_split_args(ap)
    ap.add_argument("--artefacts", type=int, default=3, help="at most this many artefacts per image (at least 1)")
    ap.add_argument("--per-class", type=int, default=200, help="as the demo's `skin data synth` (same seed 0)")
    ap.add_argument("--size", type=int, default=160, help="as the demo's `skin data synth`")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--also", nargs="*", default=[], metavar="BUNDLE", help="more bundles scored on the same images")
    a = ap.parse_args(argv)
    bundles = [Bundle.load(b) for b in [a.bundle, *a.also]]
    with tempfile.TemporaryDirectory(prefix="skinray-distractors-") as tmp:
        tmp = Path(tmp)
        write_dataset(tmp / "synth", a.per_class, a.size, seed=0, workers=a.workers, progress=False,
                      artefacts=a.artefacts)
        scan(tmp / "synth", tmp / "data", ScanOptions(workers=a.workers), progress=False)
        for bundle in bundles:
            rows = {"plain": measure(bundle, a.data, a.synth, a.split),
                    f"1..{a.artefacts} artefacts": measure(bundle, tmp / "data", tmp / "synth", a.split)}
            report(bundle, rows, a.split)


def report(bundle: Bundle, rows: dict, split: str) -> None:
    methods = sorted({e.explanation.method for e in bundle.members})
    print(f"bundle {bundle.id}, {split} split, maps ({'/'.join(methods)}) at { {n: e['stride'] for n, e in rows['plain']['explanations'].items()} }, layers "
          + ", ".join(e.explanation.layer or "pooled" for e in bundle.members))
    print(f"{'images':<16}{'n':>5}{'accuracy':>10}{'pointing':>10}{'energy':>8} | {'centre':>7}{'contrast':>9}{'untrained':>10}")
    for name, r in rows.items():
        b = r["baseline"]
        print(f"{name:<16}{r['images']:>5}{r['accuracy']:>10.3f}{r['pointing']:>10.3f}{r['energy']:>8.3f} | "
              f"{b['centre_pointing']:>7.3f}{b['contrast_pointing']:>9.3f}{b['untrained_pointing']:>10.3f}")
    for name, r in rows.items():
        print(f"{name}: per class pointing " + ", ".join(f"{c} {v['pointing']:.2f}" for c, v in r["per_class"].items())
              + "; contrast map " + ", ".join(f"{v['contrast_pointing']:.2f}" for v in r["per_class"].values()))
    for name, r in rows.items():
        print(f"{name}: members' own maps " + ", ".join(f"{m} {p:.2f}" for m, p in r["members_pointing"].items()),
              flush=True)

