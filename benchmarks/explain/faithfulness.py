"""Grad-CAM faithfulness on the synthetic lesions, whose masks are known.

For every test image: the ensemble map of the predicted class (skin.evaluation.BatchScorer, the
scorer jobs/evaluate.py --masks runs; maps through skin.ensemble.assemble, as `skin explain` and
the server build them); pointing game = its peak lies inside the lesion mask (target >= 0.80 of
test images with the demo bundle); energy share = the map's mass inside the mask, per class. Beside
them, what maps that know less score on the same rows: one peaking at the image centre (pointing),
a flat one (energy = the lesion's share of the image), the colour that stands out from the skin
(no model: skin.metrics.contrast_map) and the same Grad-CAM of freshly initialised members
(the model-randomisation check of Adebayo et al. 2018).

    python benchmarks/explanations.py faithfulness --bundle demo/train/bundle --data demo/data --synth demo/synth

The demo's test split has 30 images a class (one standard error of the pointing game: about 0.03).
For a tighter figure, score the same bundle on a fresh synthetic set from another seed, which no
member and no choice of layer has seen, all of its splits at once:

    skin data synth --out /tmp/fresh/synth --per-class 200 --size 160 --seed 1 --workers 2
    skin data scan /tmp/fresh/synth --out /tmp/fresh/data
    python benchmarks/explanations.py faithfulness --bundle demo/train/bundle-tuned \
        --data /tmp/fresh/data --synth /tmp/fresh/synth --split all
"""
from __future__ import annotations

PROG = "benchmarks/explanations.py faithfulness"

import argparse
from pathlib import Path

import numpy as np

from _harness import load_splits, synthetic_split_args
from skin.bundle import Bundle
from skin.ensemble import Predictor
from skin.evaluation import attach_masks, faithfulness, score_locally


def measure(bundle: Bundle, data: str | Path, synth: str | Path, split: str = "test", batch: int = 16,
            cam_stride: int | None = None) -> dict:
    """Per class, per member and overall: pointing game and energy in the mask; plus accuracy and time."""
    import time
    df = attach_masks(load_splits(data, split), Path(synth) / "manifest.csv")
    t0 = time.perf_counter()
    from skin.explanation import Overrides
    explain = dict.fromkeys(bundle.member_names, Overrides(stride=cam_stride)) if cam_stride else None
    scored = score_locally(str(bundle.root), df, batch, explain=explain)
    seconds = time.perf_counter() - t0
    good = scored[scored["ok"].astype(bool)]
    probs = Predictor.remote(bundle).combine({m: np.stack(good[m].to_list()) for m in bundle.member_names})
    return faithfulness(good, bundle, explain) | {
        "accuracy": float((probs.argmax(1) == good["label_index"].to_numpy()).mean()), "seconds": seconds}


def flip_agreement(bundle: Bundle, data: str | Path, split: str = "test") -> dict:
    """How far the ensemble's answer ignores the image's flips (the premise of cam_smooth="flips"): the
    share of images whose class is the same for all four flips, and the mean of the largest change of a
    class probability between an image and its flips."""
    from skin.gradcam import FLIPS
    from skin.images import DATASET_LIMITS, load_image
    from skin.presets import to_batch
    images = [load_image(p, DATASET_LIMITS) for p in load_splits(data, split)["path"]]
    predictor = Predictor(bundle)  # the ensemble as every answer makes it
    runners = predictor.runners
    x = {n: to_batch(images, r.member.data_config) for n, r in runners.items()}
    probs = [predictor.combine({n: r(x[n].flip(d) if d else x[n])[0] for n, r in runners.items()}) for d in FLIPS]
    classes = np.stack([p.argmax(1) for p in probs])
    shift = np.stack([np.abs(p - probs[0]).max(1) for p in probs[1:]]).max(0)
    return {"same_class": float((classes == classes[0]).all(0).mean()), "mean_max_shift": float(shift.mean()),
            "images": len(images)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    synthetic_split_args(ap, "demo/train/bundle")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--cam-strides", type=int, nargs="+", default=[0], help="explanation strides to measure "
                    "(0: the bundle's own); e.g. 32 16 8 to choose one per member")
    ap.add_argument("--cam-layers", nargs="+", default=[], metavar="NAME=LAYER",
                    help="measure with these members' maps at another layer (a temporary derived bundle), "
                         "e.g. mobilenetv2=backbone.blocks.3")
    ap.add_argument("--flips", action="store_true", help="also: how far the answers ignore the image's flips")
    a = ap.parse_args(argv)
    bundle = Bundle.load(a.bundle)
    if a.flips:
        f = flip_agreement(bundle, a.data, a.split)
        print(f"answers under the image's four flips ({f['images']} {a.split} images): the same class for "
              f"{f['same_class']:.3f} of them; largest change of a class probability {f['mean_max_shift']:.3f} on average")
    if a.cam_layers:
        import tempfile
        from skin.bundle import derive_bundle
        from skin.explanation import parse_layers
        layers = parse_layers(a.cam_layers)
        derived = tempfile.TemporaryDirectory(prefix="skinray-cam-layers-")  # removed when main returns
        bundle = derive_bundle(bundle, Path(derived.name) / "bundle",
                               explanations={n: {"layer": v} for n, v in layers.items()})
        print(f"maps at layers {layers} (derived bundle {bundle.id})")
    strides = sorted({e.output_stride for e in bundle.members})
    for cs in a.cam_strides:
        r = measure(bundle, a.data, a.synth, a.split, a.batch, cs or None)
        print(f"bundle {bundle.id}{' (UNTRAINED)' if bundle.untrained else ''}, {r['images']} {a.split} images, "
              f"output stride {'/'.join(map(str, strides))}, maps at { {n: e['stride'] for n, e in r['explanations'].items()} }, accuracy {r['accuracy']:.3f}, "
              f"{r['seconds']:.0f} s for every image's answer and maps")
        print(f"{'class':<14}{'pointing':>9}{'energy':>8} | {'centre':>7}{'flat: energy':>13}{'contrast':>9}{'untrained':>10}")
        for c, v in list(r["per_class"].items()) + [("all", r | r["baseline"])]:
            print(f"{c:<14}{v['pointing']:>9.3f}{v['energy']:>8.3f} | {v['centre_pointing']:>7.3f}{v['flat_energy']:>13.3f}"
                  f"{v['contrast_pointing']:>9.3f}{v['untrained_pointing']:>10.3f}")
        print("(pointing-game target >= 0.80; right of |, maps that know less: one fixed on the centre, a flat one, "
              "the colour that stands out from the skin with no model, the same Grad-CAM of untrained members)")
        se = float(np.sqrt(r["pointing"] * (1 - r["pointing"]) / r["images"]))
        print(f"pointing game {r['pointing']:.3f} +- {se:.3f} (one standard error, {r['images']} images)")
        print("members' own maps, trained / untrained: " + ", ".join(
            f"{m} {p:.3f} / {r['members_untrained_pointing'][m]:.3f}" for m, p in r["members_pointing"].items()), flush=True)

