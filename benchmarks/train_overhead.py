"""Ray Train overhead and input-pipeline headroom, on the same data and model.

  ray / plain    epoch time through Ray Train (1 worker) / epoch time of the same loop without
                 Ray (skin.train with LocalRuntime); epochs after the first, wall clock between
                 epoch starts, so checkpoint reporting is included (target <= 1.10)
  loader / model data-loader images/s (cache on: read + the whole train preset as the CPU path
                 runs it in the loader: crop/flip, rotation, colour jitter; + collate, no model) /
                 model training images/s (forward + backward + step on the loaded batches)
                 (target >= 3)

Plain and Ray Train runs alternate (plain, Ray, plain, Ray, ... --repeats pairs) against one
Ray started before the first, so neither order nor drift favours one; the ratio is the median of
the per-pair ratios, each run's epoch time printed.

    python benchmarks/train_overhead.py [--backbone mobilenetv2] [--size 64] [--epochs 4]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from skin.cache import ManifestDataset, build_cache, cache_side, skip_none_collate
from skin.data import ScanOptions, balance, load_manifest, scan
from skin.presets import train_preset
from skin.registry import create_model
from skin.synth import write_dataset
from skin.train import LocalRuntime, TrainConfig, train_member


def epoch_gaps(history: list[dict]) -> float:
    starts = [h["epoch_start"] for h in sorted(history, key=lambda h: h["epoch"])]
    return statistics.median([b - a for a, b in zip(starts[1:], starts[2:])] or [starts[-1] - starts[-2]])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="mobilenetv2")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--per-class", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="plain/Ray pairs (default 2)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        write_dataset(Path(tmp, "s"), a.per_class, 128, seed=0, progress=False)
        data = Path(tmp, "d")
        scan(Path(tmp, "s"), data, ScanOptions(), progress=False)
        balance(data, per_class=a.per_class, seed=0)
        df = load_manifest(data, "train_balanced")
        side = cache_side(a.size)
        build_cache(data, "train_balanced", df, side, progress=False)
        build_cache(data, "val", load_manifest(data, "val"), side, progress=False)
        cfg = TrainConfig(backbone=a.backbone, data_dir=str(data), epochs=a.epochs, image_size=a.size,
                          pretrained="none", per_image_norm=True, threads=a.threads, num_workers=0,
                          batch_size=32)

        # loader vs model throughput
        torch.set_num_threads(a.threads)
        member = create_model(a.backbone, 6, pretrained="none", input_size=a.size, normalize="per_image")
        preset = train_preset(member.data_config)
        ds = ManifestDataset(df, preset, data, "train_balanced", side)  # the CPU path: whole preset in the loader
        loader = torch.utils.data.DataLoader(ds, 32, shuffle=True, collate_fn=skip_none_collate)
        t0, n = time.perf_counter(), 0
        batches = []
        for x, y, _ in loader:
            n += len(y)
            batches.append((x, y))
        loader_rate = n / (time.perf_counter() - t0)
        opt = torch.optim.AdamW(member.parameters(), 1e-3)
        member.train()
        t0, n = time.perf_counter(), 0
        for x, y in batches:
            loss = torch.nn.functional.cross_entropy(member(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            n += len(y)
        model_rate = n / (time.perf_counter() - t0)

        import ray
        from ray.train import Result
        from skin.distributed import Scaling, fit_concurrently, make_trainer
        ray.init(address="local", num_cpus=a.threads, include_dashboard=False, log_to_driver=False)
        plain, on_ray = [], []
        for r in range(a.repeats):  # alternated: plain, Ray, plain, Ray, ...
            rt = LocalRuntime(str(Path(tmp, f"plain{r}")), cpus=a.threads)
            train_member(cfg, rt, log=lambda s: None)
            plain.append(epoch_gaps(rt.history))
            trainer = make_trainer(cfg, Scaling(1, float(a.threads)), f"overhead{r}", str(Path(tmp, "ray")), keep=None)
            result: Result = fit_concurrently({"m": trainer})["m"]
            on_ray.append(epoch_gaps([m for _, m in result.best_checkpoints]))
        ray.shutdown()
    print(f"{a.backbone} at {a.size}px, {len(df)} training images, {a.threads} threads")
    ratios = [r / p for r, p in zip(on_ray, plain)]
    print(f"epoch time: plain {', '.join(f'{v:.2f}' for v in plain)} s, Ray Train {', '.join(f'{v:.2f}' for v in on_ray)} s "
          f"-> ray/plain median {statistics.median(ratios):.3f} (pairs {', '.join(f'{v:.3f}' for v in ratios)}; "
          "target <= 1.10)")
    print(f"throughput: loader {loader_rate:.0f} images/s (cache on), model {model_rate:.0f} images/s "
          f"-> loader/model {loader_rate / model_rate:.1f} (target >= 3)")


if __name__ == "__main__":
    main()
