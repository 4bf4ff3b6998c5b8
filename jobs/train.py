"""Fine-tune the ensemble members concurrently with Ray Train, then assemble the bundle.

    python jobs/train.py --data DIR --out OUT [--smoke]
    ray job submit --working-dir . -- python jobs/train.py --data DIR --out OUT

DIR is a `skin data scan` output (train_balanced.csv is used when present). Each member is its
own TorchTrainer with its own ScalingConfig; all run at once. Outputs:

    OUT/bundle/               the bundle from each member's best checkpoint (by val macro-F1)
    OUT/val_probs.safetensors each member's validation probabilities + labels (for jobs/tune.py)
    OUT/train_config.json     the resolved configuration
    OUT/summary.json          per-member best metrics
    <storage>/<name>-<member> Ray Train runs (checkpoints); re-run with the same --name to resume

Settings come from defaults, then --config YAML, then flags. Per-member values go in the YAML:
    members: {resnet50: {epochs: 10, lr: 1e-3}, mobilenetv2: {epochs: 15}}
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import yaml

from skin.bundle import write_bundle
from skin.checkpoint import atomic_write_json, load_member, load_tensors, save_tensors
from skin.args import worker_range
from skin.cluster import add_cluster_arguments
from skin.explanation import Explanation
from skin.data import DatasetError, load_classes, load_manifest, training_split
from skin.registry import DEFAULT_MEMBERS, DEFAULT_WEIGHTS, OUTPUT_STRIDES, list_backbones
from skin.train import SCORE, TrainConfig

SMOKE = {"epochs": 2, "image_size": 32, "batch_size": 16, "max_steps_per_epoch": 3,
         "pretrained": "none", "warmup_epochs": 0.5}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a `skin data scan` output folder")
    p.add_argument("--out", required=True, help="where the bundle, val probabilities and config go")
    p.add_argument("--config", help="YAML file of defaults (flags override it)")
    p.add_argument("--smoke", action="store_true", help="tiny images, 2 epochs of 3 steps, random init: seconds on a CPU")
    p.add_argument("--members", nargs="+", choices=list_backbones(), help=f"default: {' '.join(DEFAULT_MEMBERS)}")
    p.add_argument("--weights", type=float, nargs="+", help="ensemble weights in --members order (default 0.30 0.30 0.40)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="head peak learning rate (default: each backbone's own)")
    p.add_argument("--image-size", type=int, help="input size of every member (default: the weights' own, 224)")
    p.add_argument("--pretrained", help="imagenet (default), a weights file/folder, or none (random init)")
    p.add_argument("--init-from", metavar="BUNDLE", help="fine-tune from this bundle's members (backbone and head; "
                   "the same class map): e.g. the bundle that answered the cases `skin records export` wrote")
    p.add_argument("--output-stride", type=int, choices=OUTPUT_STRIDES,
                   help="feature-map stride of every member (default 32); 16 or 8 give finer Grad-CAM maps at more compute")
    p.add_argument("--per-image-norm", action="store_true", default=None, help="random init only: standardise each image by itself")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile each member's training "
                   "step (inductor; worth it on GPUs: benchmarks/train_gpu.py; each worker compiles for minutes first)")
    p.add_argument("--freeze-epochs", type=int, help="train only the head for the first N epochs")
    p.add_argument("--workers", type=worker_range, help="Ray Train workers per member (DDP when > 1; default 1); "
                   "MIN-MAX, e.g. 1-2, trains elastically: it starts with what fits, goes on with fewer when a node "
                   "is lost (from the last checkpoint) and grows again when nodes return")
    p.add_argument("--cpus-per-worker", type=float, help="default: the largest share of the free CPUs (of the nodes that "
                   "have the GPUs asked for) with which every worker of every member starts at once")
    p.add_argument("--gpus-per-worker", type=float, help="fractional allowed, e.g. 0.33 so three members share one GPU")
    p.add_argument("--max-failures", type=int, help="worker failures tolerated per member (default 2)")
    p.add_argument("--storage-path", help="Ray Train storage: a local folder (default OUT/ray_results) or "
                   "shared storage (s3://..., NFS) on multi-node clusters")
    p.add_argument("--name", help="run name; re-running with the same name and storage resumes (default skinray-train)")
    p.add_argument("--seed", type=int)
    add_cluster_arguments(p, "print the resource plan for the connected cluster and exit: 0 when every worker fits "
                          "a node (or a node type the autoscaler can start), 2 when not")
    return p.parse_args(argv)


def resolve(a: argparse.Namespace) -> dict:
    """defaults < YAML < flags; per-member overrides from the YAML's `members` mapping."""
    cfg = {"members": list(DEFAULT_MEMBERS), "weights": None, "workers": 1, "cpus_per_worker": None,
           "gpus_per_worker": 0.0, "max_failures": 2, "storage_path": None, "name": "skinray-train",
           "train": {}, "per_member": {}}
    if a.config:
        y = yaml.safe_load(Path(a.config).read_text()) or {}
        per_member = y.pop("members", {}) or {}
        if isinstance(per_member, list):
            cfg["members"], per_member = per_member, {}
        elif per_member:
            cfg["members"] = list(per_member)
        cfg["per_member"] = per_member
        for k in list(y):
            if k in cfg:
                cfg[k] = y.pop(k)
        cfg["train"].update(y)
    if a.smoke:
        cfg["train"].update(SMOKE)
    flags = {"epochs": a.epochs, "batch_size": a.batch_size, "lr": a.lr, "image_size": a.image_size,
             "pretrained": a.pretrained, "per_image_norm": a.per_image_norm, "output_stride": a.output_stride,
             "freeze_epochs": a.freeze_epochs, "seed": a.seed, "compile": a.compile,
             "init_from": str(Path(a.init_from).resolve()) if a.init_from else None}
    cfg["train"].update({k: v for k, v in flags.items() if v is not None})
    for k in ("members", "weights", "workers", "cpus_per_worker", "gpus_per_worker", "max_failures",
              "storage_path", "name"):
        if getattr(a, k) is not None:
            cfg[k] = getattr(a, k)
    unknown = set(cfg["train"]) - set(TrainConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown setting(s) {sorted(unknown)}; valid: {sorted(TrainConfig.__dataclass_fields__)}")
    return cfg


def check_data(data_dir: str, fine_tuning: bool = False) -> None:
    """Fail before any training starts: classes, manifests, every class present in training (fine-tuning
    from a bundle: a warning instead, as reviewed cases may cover only some classes)."""
    classes = load_classes(data_dir)
    train = load_manifest(data_dir, training_split(data_dir), classes)
    load_manifest(data_dir, "val", classes)
    empty = [c for k, c in enumerate(classes) if not (train["label_index"] == k).any()]
    if empty and fine_tuning:
        print(f"train.py: warning: classes with zero training images: {empty}; fine-tuning from --init-from "
              "keeps what the bundle knew of them but teaches nothing new, and may erode it: mix the reviewed "
              "cases with the original training data where you can", file=sys.stderr)
    elif empty:
        raise DatasetError(f"classes with zero training images: {empty}; add images or drop the class")


def check_resume(storage: str, run: str, classes) -> None:
    """A re-run with the same name resumes: refuse it when the class map has changed since."""
    folder = Path(storage) / run
    if "://" in storage or not folder.is_dir():
        return
    for meta in sorted(folder.glob("checkpoint_*/member.json")):
        saved = json.loads(meta.read_text()).get("classes")
        if saved and list(saved) != list(classes):
            raise ValueError(f"run {run} in {storage} was started with class map {saved}, the "
                             f"data now has {list(classes)}; use a new --name (or --storage-path) to start over")


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        cfg = resolve(a)
        cfg["workers"] = list(worker_range(cfg["workers"]))  # [min, max]; from a flag, a YAML int or "1-2"
    except (OSError, yaml.YAMLError, ValueError, AttributeError, argparse.ArgumentTypeError) as e:
        print(f"train.py: --config {a.config}: {str(e).splitlines()[0]}" if a.config else f"train.py: {e}",
              file=sys.stderr)
        return 2
    data_dir, out = str(Path(a.data).resolve()), Path(a.out).resolve()
    try:
        if not a.dry_run:  # a dry run plans resources only: its --data may live on the cluster's storage
            check_data(data_dir, fine_tuning=bool(a.init_from))
    except (ValueError, FileNotFoundError) as e:
        print(f"train.py: {e}", file=sys.stderr)
        return 2
    members = cfg["members"]
    weights = cfg["weights"] or (list(DEFAULT_WEIGHTS) if members == list(DEFAULT_MEMBERS) else [1 / len(members)] * len(members))
    if len(weights) != len(members):
        print(f"train.py: {len(weights)} weights for {len(members)} members", file=sys.stderr)
        return 2
    if cfg["train"].get("init_from") and not a.dry_run:
        from skin.checkpoint import CheckpointError
        from skin.classes import ClassMapError
        from skin.train import init_bundle
        try:
            init_bundle(cfg["train"]["init_from"], load_classes(data_dir), members)
        except (CheckpointError, ClassMapError, OSError) as e:
            print(f"train.py: {str(e).splitlines()[0]}", file=sys.stderr)
            return 2
    configs = {}
    try:
        for m in members:
            tc = TrainConfig.from_dict({**cfg["train"], **(cfg["per_member"].get(m) or {}), "backbone": m,
                                        "data_dir": data_dir})
            tc.validate()
            configs[m] = tc
    except (ValueError, TypeError) as e:
        print(f"train.py: {e}", file=sys.stderr)
        return 2

    from skin.cluster import release_nodes, start_job
    from skin.distributed import Scaling
    from skin.plan import Group
    gpus = float(cfg["gpus_per_worker"] or 0)
    plan = start_job("train.py", a, [Group(m, cfg["workers"][1], cfg["cpus_per_worker"], gpus) for m in members])
    if isinstance(plan, int):
        return plan
    scaling = Scaling(cfg["workers"][1], plan.groups[0].cpus, gpus, min_workers=cfg["workers"][0])
    try:
        return _train(cfg, members, weights, configs, scaling, data_dir, out, a.verbose)
    finally:
        if plan.new_nodes:
            release_nodes()


def _train(cfg, members, weights, configs, scaling, data_dir, out, verbose: bool = False) -> int:
    from skin.distributed import best_checkpoint_dir, fit_concurrently, make_trainer
    from skin.progress import ProgressBoard
    storage = cfg["storage_path"] or str(out / "ray_results")
    classes = load_classes(data_dir)
    try:
        for m in members:
            check_resume(storage, f"{cfg['name']}-{m}", classes)
    except ValueError as e:
        print(f"train.py: {e}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    resolved = {**cfg, "weights": weights, "data": data_dir, "out": str(out), "storage_path": storage,
                "scaling": dataclasses.asdict(scaling),
                "member_configs": {m: dataclasses.asdict(c) for m, c in configs.items()}}
    atomic_write_json(out / "train_config.json", resolved)
    count = f"{scaling.min_workers}-{scaling.workers} (elastic)" if scaling.elastic else str(scaling.workers)
    print(f"training {', '.join(members)} concurrently: {count} worker(s) x {scaling.cpus_per_worker:g} CPU"
          f"{f' + {scaling.gpus_per_worker:g} GPU' if scaling.gpus_per_worker else ''} each; storage {storage}")
    t0 = time.time()
    board = None if verbose else ProgressBoard.start()  # one line per member and epoch, as they come
    extra = {"_say": board.sender()} if board else None
    trainers = {m: make_trainer(configs[m], scaling, f"{cfg['name']}-{m}", storage, cfg["max_failures"],
                                extra_config=extra) for m in members}
    try:
        results = fit_concurrently(trainers)
    finally:
        if board:
            board.stop()

    loaded, summary, val_tensors = {}, {}, {}
    for m in members:
        with best_checkpoint_dir(results[m]) as (ckpt, stored_at):
            member, meta = load_member(ckpt)
            vp = load_tensors(ckpt / "val_probs.safetensors")
        classes.check_same(type(classes)(tuple(meta["classes"])), f"class maps of the data and member {m}")
        loaded[m] = member
        val_tensors[f"{m}.probs"], val_tensors["labels"] = vp["probs"], vp["labels"]
        summary[m] = {"best_epoch": meta["epoch"], **meta["metrics"], "checkpoint": stored_at}
    save_tensors(out / "val_probs.safetensors", val_tensors, metadata={"members": json.dumps(members)})
    pretrained = {m: configs[m].pretrained for m in members}
    # what the bundle serves unless told otherwise: Grad-CAM at stride 16 where the members were trained at 32
    # (2.2x the answer at 224 px on 2 CPU cores, 1.8 GB at batch 16: the frontier's best within the budget of
    # 3x and 4 GB; docs/explanations.md); members trained at a finer stride keep theirs
    explain = {m: Explanation(stride=16) for m, member in loaded.items() if member.output_stride == 32}
    bundle = write_bundle(out / "bundle", classes, loaded, weights, explanations=explain, provenance={
        "dataset_manifest_sha256": _manifest_sha(data_dir), "data_dir": data_dir,
        "train_config": resolved["member_configs"], "pretrained": pretrained,
        "ray_runs": {m: str(results[m].path) for m in members}})
    atomic_write_json(out / "summary.json", summary)
    print(f"\n{'member':<16}{'best epoch':>11}{'val acc':>9}{'val bal acc':>12}{'val macro-F1':>13}")
    for m, s in summary.items():
        print(f"{m:<16}{s['best_epoch']:>11}{s['val_accuracy']:>9.4f}{s['val_balanced_accuracy']:>12.4f}{s[SCORE]:>13.4f}")
    print(f"\nbundle {bundle.id}: {out / 'bundle'}  ({time.time() - t0:.0f}s)")
    print(f"validation probabilities: {out / 'val_probs.safetensors'}; config: {out / 'train_config.json'}")
    return 0


def _manifest_sha(data_dir: str) -> str | None:
    report = Path(data_dir) / "report.json"
    return json.loads(report.read_text()).get("manifest_sha256") if report.is_file() else None


if __name__ == "__main__":
    sys.exit(main())
