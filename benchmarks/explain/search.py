"""Which layer and method should each member's explanation use? A search on the val split, its
winner read on the test split. Ties on the searched split go to fewer layers, then to the larger
lead over the untrained copies' same maps (the map that owes more to training).

For every candidate layer of each member (at --stride, from the same weights: skin.registry.restride)
and each method (Grad-CAM, LayerCAM: skin.gradcam.weigh), the map of the ensemble's predicted class
for every image with a lesion mask; then every combination of one (layer) per member is scored as
the served ensemble map (skin.gradcam.ensemble_map: per member min-max, bundle weights) by the
pointing game. Beside each: the same combination on the other split, and the same maps of
untrained copies (how much of the score the architecture gives with no training). Answers are the
bundle's, unchanged; the winner goes into a bundle with `skin bundle cam-stride --layer --method`.

--fuse mean|max also tries LayerCAM's own proposal (Jiang et al. 2021, section III-C): each member's
map fused from two of its layers (each min-max normalised, then their mean or element-wise max),
every pair of candidates of every member in every combination. The ranking is vectorised over the
images; the rows shown are scored again image by image with skin.gradcam.ensemble_map, the served
code path (the script stops if the two disagree).

--smooth flips scores every candidate's maps averaged over the image's four flips (the bundle's
cam_smooth="flips"; LayerCAM's or Grad-CAM's map of each flipped view, normalised, flipped back).

    python benchmarks/explanations.py search --bundle demo/train/bundle-tuned-t [--split val --read test] [--fuse mean] [--smooth flips]
"""
from __future__ import annotations

PROG = "benchmarks/explanations.py search"

import argparse
import itertools
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from _harness import synthetic_split_args
from skin.bundle import Bundle
from skin.data import load_manifest
from skin.ensemble import Predictor
from skin.evaluation import attach_masks
from skin.gradcam import CAM_METHODS, CAM_SMOOTHS, FLIPS, ensemble_map, input_size, normalize, upsample, weigh
from skin.images import DATASET_LIMITS, load_image
from skin.metrics import energy_inside, pointing_hit
from skin.presets import to_batch
from skin.registry import restride, untrained_copy

CANDIDATES = {"mobilenetv2": [f"backbone.blocks.{i}" for i in (2, 3, 4, 5)],
              "efficientnet_b1": [f"backbone.blocks.{i}" for i in (2, 3, 4, 5)],
              "resnet50": [f"backbone.layer{i}" for i in (1, 2, 3)]}


def split_maps(bundle: Bundle, data: str, synth: str, split: str, stride: int, batch: int = 32,
               smooth: str = "none") -> dict:
    """Masks, labels, the ensemble's answers and every candidate's map of the answered class,
    trained and untrained, upsampled to the work size and min-max normalised (the first steps of
    skin.gradcam.ensemble_map): {"norm": {(untrained, member, layer, method): (N, W, W)}, ...}.
    smooth="flips": each map the mean of the four flips' maps, each normalised and flipped back
    (skin.gradcam.flip_smoothed, as a bundle with cam_smooth="flips" serves it)."""
    df = attach_masks(load_manifest(data, split), Path(synth) / "manifest.csv")
    df = df[df["mask"] != ""]
    if df.empty:
        raise SystemExit(f"no {split} image of {data} has a mask in {synth}/manifest.csv")
    images = [load_image(p, DATASET_LIMITS) for p in df["path"]]
    masks = [np.asarray(Image.open(m).convert("L").resize(im.size, Image.Resampling.NEAREST)) > 127
             for m, im in zip(df["mask"], images)]
    predictor = Predictor(bundle)  # the ensemble as every answer makes it
    runners = predictor.runners
    x = {n: to_batch(images, r.member.data_config) for n, r in runners.items()}
    probs = {n: r(x[n])[0] for n, r in runners.items()}
    answer = predictor.combine(probs).argmax(1)
    maps = {}
    for n, run in runners.items():
        for untrained, base in ((False, run.member), (True, untrained_copy(run.member).eval())):
            model = restride(base, stride)
            for layer in CANDIDATES.get(n, []):
                kept = {}
                hook = model.get_submodule(layer).register_forward_hook(lambda m, i, o: kept.update(a=o))
                out = {k: [] for k in CAM_METHODS}
                views = FLIPS if smooth == "flips" else FLIPS[:1]
                try:
                    for s in range(0, len(images), batch):
                        acc = dict.fromkeys(CAM_METHODS, 0.0)
                        for dims in views:
                            xb = x[n][s:s + batch]
                            with torch.enable_grad():
                                logits = model(xb.flip(dims) if dims else xb)
                                target = logits.gather(1, torch.as_tensor(answer[s:s + batch])[:, None]).sum()
                                (grad,) = torch.autograd.grad(target, kept["a"])
                            for k in CAM_METHODS:
                                m = weigh(kept["a"].detach(), grad, k)
                                m = m.flip(dims) if dims else m
                                acc[k] = acc[k] + (normalize(m) if smooth == "flips" else m)
                        for k in CAM_METHODS:
                            out[k].append(acc[k] / len(views))
                finally:
                    hook.remove()
                for k in CAM_METHODS:
                    maps[(untrained, n, layer, k)] = torch.cat(out[k])
    work = input_size({n: r.member for n, r in runners.items()})
    return {"masks": masks, "labels": df["label_index"].to_numpy(), "answer": answer, "work": work,
            "norm": {key: normalize(upsample(m, work)) for key, m in maps.items()}}


def _layers(layer) -> tuple[str, ...]:
    return (layer,) if isinstance(layer, str) else tuple(layer)


def member_map(s: dict, untrained: bool, name: str, layer, method: str, rule: str, i=slice(None)) -> torch.Tensor:
    """A member's map(s) at the work size: one layer's, or several layers' fused by `rule`."""
    maps = torch.stack([s["norm"][(untrained, name, lay, method)][i] for lay in _layers(layer)])
    return maps[0] if len(maps) == 1 else normalize(maps.mean(0) if rule == "mean" else maps.amax(0))


def score(s: dict, bundle: Bundle, choice: dict, untrained: bool = False, rule: str = "mean"
          ) -> tuple[float, float, np.ndarray]:
    """Pointing game, energy in the mask and per-image hits of the ensemble map for `choice`
    {member: (layer or layers, method)}, image by image through skin.gradcam.ensemble_map."""
    hits, energy = [], []
    for i, mask in enumerate(s["masks"]):
        m = ensemble_map({n: member_map(s, untrained, n, lay, k, rule, i) for n, (lay, k) in choice.items()},
                         bundle.weights_map, mask.shape, s["work"])
        hits.append(pointing_hit(m, mask))
        energy.append(energy_inside(m, mask))
    return float(np.mean(hits)), float(np.mean(energy)), np.array(hits)


def fast_pointing(s: dict, bundle: Bundle, choice: dict, untrained: bool = False, rule: str = "mean") -> float:
    """score()'s pointing game, the images of each mask size at once (for ranking thousands of combinations)."""
    if "by_size" not in s:  # {mask shape: (image indices, flattened masks)}
        shapes = sorted({m.shape for m in s["masks"]})
        s["by_size"] = {sh: (torch.tensor([i for i, m in enumerate(s["masks"]) if m.shape == sh]),
                             torch.as_tensor(np.stack([m.reshape(-1) for m in s["masks"] if m.shape == sh])))
                        for sh in shapes}
    total = sum(bundle.weights_map[n] for n in choice)
    acc = sum(bundle.weights_map[n] / total * member_map(s, untrained, n, lay, k, rule) for n, (lay, k) in choice.items())
    hits = 0
    for shape, (idx, masks) in s["by_size"].items():
        peaks = upsample(acc[idx], shape).flatten(1).argmax(1)
        hits += int(masks.gather(1, peaks[:, None]).sum())
    return hits / len(s["masks"])


def search(splits: dict, bundle: Bundle, names: list[str], a, rule: str | None) -> None:
    """Rank every combination on a.split (one layer per member, or with `rule` also fused pairs), show the
    best a.top per method with their read on a.read and the same maps of untrained copies."""
    options = {n: [(lay,) for lay in CANDIDATES[n]] + (list(itertools.combinations(CANDIDATES[n], 2)) if rule else [])
               for n in names}
    how = rule or "mean"  # no pair is fused without a rule: single layers score the same by either
    print(f"\nensemble map, every combination of layers{f' (and of pairs fused by their {rule})' if rule else ''}, "
          f"the best {a.top} per method on {a.split}:")
    print(f"{'method':<10}{'layers':<34}{a.split:>7}{a.read:>7}{'energy':>8}{'untrained ' + a.split:>17}{a.read:>6}")
    for k in CAM_METHODS:
        def key(combo):  # ties: fewer layers first, then the larger lead over the untrained copies' same maps
            choice = dict(zip(names, ((c, k) for c in combo)))
            p = fast_pointing(splits[a.split], bundle, choice, rule=how)
            return p, -sum(map(len, combo)), p - fast_pointing(splits[a.split], bundle, choice, True, how)
        ranked = sorted(((key(combo), combo) for combo in itertools.product(*(options[n] for n in names))), reverse=True)
        for (searched, _, _), combo in ranked[:a.top]:
            choice = dict(zip(names, ((c, k) for c in combo)))
            again = score(splits[a.split], bundle, choice, rule=how)[0]
            if abs(again - searched) > 1e-9:
                raise SystemExit(f"the vectorised ranking ({searched:.4f}) and ensemble_map ({again:.4f}) disagree on {combo}")
            read, energy, hits = score(splits[a.read], bundle, choice, rule=how)
            se = float(np.sqrt(read * (1 - read) / len(hits)))
            print(f"{k:<10}{', '.join('+'.join(lay.split('.', 1)[1] for lay in c) for c in combo):<34}{searched:>7.3f}"
                  f"{read:>7.3f}{energy:>8.3f}{score(splits[a.split], bundle, choice, True, how)[0]:>17.3f}"
                  f"{score(splits[a.read], bundle, choice, True, how)[0]:>6.3f}   (+-{se:.3f})")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    synthetic_split_args(ap, "demo/train/bundle-tuned-t")
    ap.set_defaults(split="val")
    ap.add_argument("--read", default="test", help="the split the winners are read on (not searched)")
    ap.add_argument("--stride", type=int, choices=(8, 16, 32), default=8, help="explanation stride of every candidate")
    ap.add_argument("--top", type=int, default=3, help="combinations shown per method")
    ap.add_argument("--fuse", nargs="+", choices=("mean", "max"), default=[], help="also fuse pairs of a member's "
                    "layers (LayerCAM's multi-layer fusion) by the mean and/or the element-wise max of their min-max "
                    "normalised maps; each rule is its own search")
    ap.add_argument("--smooth", choices=CAM_SMOOTHS, default="none", help="flips: every candidate's maps averaged "
                    "over the image's four flips (cam_smooth='flips'; 4x the maps' cost)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    bundle = Bundle.load(a.bundle)
    t0 = time.perf_counter()
    splits = {sp: split_maps(bundle, a.data, a.synth, sp, a.stride, smooth=a.smooth) for sp in dict.fromkeys((a.split, a.read))}
    names = [n for n in bundle.member_names if n in CANDIDATES]
    print(f"bundle {bundle.id}, maps at stride {a.stride}{' averaged over the four flips' if a.smooth == 'flips' else ''}, {len(splits[a.split]['masks'])} {a.split} / "
          f"{len(splits[a.read]['masks'])} {a.read} images with masks, {time.perf_counter() - t0:.0f} s of maps")
    print(f"\neach member alone, pointing game on {a.split} (trained / untrained):")
    for n in names:
        print(f"  {n:<16}" + "  ".join(
            f"{layer.split('.', 1)[1]} " + " ".join(
                f"{k} {score(splits[a.split], bundle, {n: (layer, k)})[0]:.3f}/"
                f"{score(splits[a.split], bundle, {n: (layer, k)}, True)[0]:.3f}" for k in CAM_METHODS)
            for layer in CANDIDATES[n]))
    for rule in a.fuse or [None]:
        search(splits, bundle, names, a, rule)
    print(f"\n(pointing game: the ensemble map's peak inside the lesion mask; the {a.read} column is read, not searched; "
          "+- one standard error of the read figure)")

