"""Evaluate a bundle on a manifest split with Ray Data batch inference.

    python jobs/evaluate.py --bundle OUT/bundle --data DIR [--split test] [--out OUT/eval]
    ray job submit --working-dir . -- python jobs/evaluate.py --bundle ... --data ...

Images are read and scored by `map_batches` over a pool of scorer actors (each loads the bundle
once), so 35k images spread over the cluster's GPUs. Per member and for the ensemble: accuracy,
balanced accuracy, P/R/F1 macro and weighted, per-class report, confusion matrix (counts and
row-normalised, in the class map's order), one-vs-rest ROC AUC, reliability diagram with ECE.
On --perturb images (any labelled split, real or synthetic): how faithful the explanation is without
masks (deletion, insertion, ROAD; skin.faithfulness), beside a random map and untrained members.
With --masks (lesion masks, e.g. the synthetic set's), also the Grad-CAM pointing game and energy
in the mask, per class. When the data has lesion-free skin images for the split (`skin data scan
--lesion-free`), also what the ensemble calls them and how many the API would flag uncertain.
Writes metrics.json, PNG plots and report.md, and stores the metrics in
the bundle (where /v1/info and the page show them).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

from skin.args import at_least, explanation_request
from skin.bundle import Bundle
from skin.cluster import add_cluster_arguments
from skin.data import load_classes, load_lesion_free, load_manifest
from skin.evaluation import (BatchScorer, attach_masks, lesion_free_summary, perturb_rows, reviewed_summary,
                             store_in_bundle, summarize, to_frame)
from skin.progress import elapsed, quiet_ray_data
from skin.report import write_report


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True, help="bundle folder")
    p.add_argument("--data", required=True, help="a `skin data scan` output folder")
    p.add_argument("--split", default="test", help="manifest to evaluate on (default test)")
    p.add_argument("--out", help="report folder (default: <bundle>/../eval-<split>)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--reviewed", metavar="MANIFEST", help="`skin records export`'s manifest.csv: the report states "
                   "how this bundle does on the reviewed cases among the rows scored, against the bundle that "
                   "answered them")
    p.add_argument("--actors", type=int, default=1, help="scorer actors (default 1; one per GPU on a cluster)")
    p.add_argument("--cpus-per-actor", type=float, help="CPUs (and torch threads) per scorer actor (default: the "
                   "largest share of the free CPUs with which every actor starts at once)")
    p.add_argument("--gpus-per-actor", type=float, default=0.0)
    from skin.device import AMP_CHOICES
    p.add_argument("--amp", choices=AMP_CHOICES, default="off", help="backbone precision of the scorers, as "
                   "`skin predict --amp` and a Serve member's amp (default off = fp32)")
    p.add_argument("--perturb", type=at_least(0), default=60, metavar="N",
                   help="score the explanation without masks on N images spread over the classes: deletion, "
                   "insertion (RISE) and ROAD, per member and for the ensemble, beside a random map and untrained "
                   "members (default 60; 0 = off; each image costs some hundred forward passes: about 1 s at "
                   "64 px and 30 s at 224 px on 2 CPU cores)")
    p.add_argument("--masks", metavar="CSV", help="lesion masks (path,mask; the `skin data synth` manifest): also "
                   "measure how well the ensemble's Grad-CAM points at the lesion, stored with the metrics")
    from skin.args import add_explanation_arguments
    add_explanation_arguments(p)
    p.add_argument("--no-store", action="store_true", help="do not write the metrics into bundle.json")
    add_cluster_arguments(p, "print the resource plan of the scorer actors and exit (0 when each fits a node or a "
                          "node type the autoscaler can start, 2 when not)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        bundle = Bundle.load(a.bundle)
        explain = explanation_request(a, bundle.member_names)
        classes = load_classes(a.data)
        bundle.classes.check_same(classes, "class maps of the bundle and the dataset")
        df = load_manifest(a.data, a.split, classes)
        if a.masks:
            df = attach_masks(df, a.masks)
            if not (df["mask"] != "").any():
                raise ValueError(f"no image of the {a.split} split has a mask in {a.masks}")
    except (ValueError, FileNotFoundError) as e:
        print(f"evaluate.py: {e}", file=sys.stderr)
        return 2
    out = Path(a.out) if a.out else Path(a.bundle).resolve().parent / f"eval-{a.split}"

    import ray
    from skin.cluster import start_job
    from skin.plan import Group
    plan = start_job("evaluate.py", a, [Group("scorer", a.actors, a.cpus_per_actor, a.gpus_per_actor)])
    if isinstance(plan, int):
        return plan
    cpus = plan.groups[0].cpus
    t0 = time.time()

    if not a.verbose:
        quiet_ray_data()  # ours below, one line a batch

    def score(rows, what: str):
        # one block per batch, so the progress below moves a batch at a time
        blocks = [rows.iloc[i:i + a.batch_size] for i in range(0, len(rows), a.batch_size)] or [rows]
        scored = ray.data.from_pandas(blocks).map_batches(
            BatchScorer, batch_size=a.batch_size, batch_format="numpy",
            fn_constructor_kwargs={"bundle_dir": str(Path(a.bundle).resolve()),
                                   "threads": max(1, int(cpus)), "amp": a.amp,
                                   "explain": explain},
            compute=ray.data.ActorPoolStrategy(size=a.actors), num_cpus=cpus, num_gpus=a.gpus_per_actor or None)

        def batches():
            done = 0
            for b in scored.iter_batches(batch_size=None, batch_format="numpy"):
                done += len(b["path"])
                print(f"  [{elapsed(t0)}] {what}: {done}/{len(rows)} images scored", flush=True)
                yield b
        return to_frame(batches(), bundle.member_names)

    df = df.assign(perturb=perturb_rows(df, a.perturb))
    rows = df[["path", "label_index", "perturb"] + (["mask"] if a.masks else [])]
    # the split's lesion-free photographs (outlier exposure's check) go through the same scorers, in one pass
    free = load_lesion_free(a.data, a.split)
    if free is not None:
        rows = pd.concat([rows, free[["path", "label_index"]].assign(perturb=False, **({"mask": ""} if a.masks else {}))],
                         ignore_index=True)
    scored = score(rows, a.split if free is None else f"{a.split} (+ {len(free)} lesion-free)")
    on_skin = scored["path"].isin(set(free["path"]) if free is not None else ())
    frame = scored[~on_skin].reset_index(drop=True)
    metrics = summarize(frame, bundle, explain)
    if a.reviewed:
        from skin.records import RecordError
        try:
            reviewed = reviewed_summary(frame, bundle, a.reviewed)
        except RecordError as e:
            print(f"evaluate.py: {e}", file=sys.stderr)
            return 2
        if reviewed:
            metrics["reviewed"] = reviewed
            print(f"On {reviewed['images']} reviewed case(s): this bundle {reviewed['accuracy']:.3f}, the answering "
                  f"bundle {reviewed['answered_accuracy']:.3f} (fixed {reviewed['fixed']}, broke {reviewed['broken']})")
        else:
            print(f"--reviewed {a.reviewed}: none of its photographs is among the {a.split} rows scored")
    free = lesion_free_summary(scored[on_skin].reset_index(drop=True), bundle) if free is not None else None
    if free:
        metrics["lesion_free"] = free
    report = write_report(metrics, bundle, frame, out, a.split)
    if not a.no_store:
        store_in_bundle(bundle, metrics, a.split)
    print(f"\n{'model':<16}{'accuracy':>10}{'bal acc':>10}{'macro-F1':>10}{'ECE':>8}")
    for name, m in [("ensemble", metrics["ensemble"])] + list(metrics["members"].items()):
        print(f"{name:<16}{m['accuracy']:>10.4f}{m['balanced_accuracy']:>10.4f}{m['f1_macro']:>10.4f}{m['ece']:>8.4f}")
    cal = metrics.get("calibration")
    if cal:
        lo, hi = cal["difference_interval"]
        print(f"ECE ensemble minus its best-calibrated member ({cal['best_member']}): {cal['difference']:+.4f} "
              f"({cal['level']:.0%} bootstrap interval {lo:+.4f} to {hi:+.4f})")
    f = metrics.get("faithfulness")
    if f:
        print(f"{f['method']} of the ensemble: pointing game {f['pointing']:.3f}, energy in the mask {f['energy']:.3f} "
              f"({f['images']} images with masks); maps that know less: centre {f['baseline']['centre_pointing']:.3f}, "
              f"colour contrast (no model) {f['baseline']['contrast_pointing']:.3f}, untrained members "
              f"{f['baseline']['untrained_pointing']:.3f} ({f['baseline'].get('untrained_images', f['images'])} "
              f"images); a flat map's energy {f['baseline']['flat_energy']:.3f}")
    pert = metrics.get("perturbation")
    if pert:
        e = pert["ensemble"]
        print(f"{pert['method']} of the ensemble without masks ({pert['images']} images; map / random / untrained "
              "members): " + "; ".join(f"{m} {e[m]['map']:.3f} / {e[m]['random']:.3f} / {e[m]['untrained']:.3f} "
                                       f"({pert['better'][m]} is better)" for m in ("deletion", "insertion", "road")))
        print(f"Verdict on the map: {pert['verdict']['sentence']}")
    if free:
        print(f"Skin without a lesion ({free['images']} images): flagged uncertain {free['uncertain']:.3f}, mean "
              f"confidence {free['mean_confidence']:.3f}; called " + ", ".join(
                  f"{c} {v:.2f}" for c, v in free["called"].items() if v))
    print(f"\n{len(frame)} images in {time.time() - t0:.0f}s ({metrics['n_skipped']} unreadable skipped); "
          f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
