"""GPU check of the training loop (no Ray): skin's loop at 224 px with bf16 autocast and
channels_last, images/s per backbone, against a plain reference loop.

For each backbone (random weights, the same Member model everywhere, AdamW, batch --batch):
  ref fp32       plain PyTorch loop on ready GPU tensors, fp32, NCHW, PyTorch's own defaults (TF32
                 on for cuDNN convolutions, off for matmuls; no cudnn.benchmark): what a notebook
                 does (the baseline)
  ref bf16+CL    the same plain loop with bf16 autocast and channels_last
  ref compiled   that loop with the model under torch.compile (inductor; its warm-up steps compile)
  skin step      skin.train.train_step on a uint8 batch of the same shape: the preset's batch half
                 (rotation, colour jitter, normalisation) on the GPU, then bf16 + channels_last
                 with cudnn.benchmark
  skin compiled  the same step with the model under torch.compile (TrainConfig.compile / --compile)
  skin loop      skin.train.train_member (LocalRuntime on the GPU) over the cached synthetic
                 dataset: DataLoader workers, pinned memory, augmentation; training-phase
                 images/s of the epochs after the first, with the faster of the two steps
  loader         the same DataLoader alone (no model; cache read, crop, flips, collate), images/s,
                 with the loop's worker count (up to 8 beside a GPU) and, printed after, with every CPU but one

    python benchmarks/train_gpu.py [--size 224] [--batch 128] [--steps 30] [--epochs 3]

On a machine without a GPU it says so and exits 2 (use benchmarks/train_overhead.py there).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from skin.cache import ManifestDataset, build_cache, cache_side, skip_none_collate
from skin.data import ScanOptions, balance, load_manifest, scan
from skin.presets import train_preset
from skin.registry import DEFAULT_MEMBERS, create_model
from skin.synth import write_dataset
from skin.train import LocalRuntime, TrainConfig, configure_device, fused_adamw, train_member, train_step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def rate(step, batch: int, steps: int, warmup: int, device: torch.device) -> float:
    """images/s of `step()` over `steps` calls after `warmup` calls (kernel selection, caches)."""
    for _ in range(warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return batch * steps / (time.perf_counter() - t0)


def model_bound(name: str, a, device: torch.device) -> dict[str, float]:
    out = {}
    x = torch.randn(a.batch, 3, a.size, a.size, device=device)
    y = torch.randint(0, 6, (a.batch,), device=device)

    # plain reference: PyTorch's defaults, restored (skin's configure_device changed them for the
    # previous backbone): cudnn.benchmark off, TF32 ON for cuDNN convolutions, off for matmuls; fp32, NCHW
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    model = create_model(name, 6, pretrained="none", input_size=a.size).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), 1e-3)

    def ref_fp32():
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    out["ref fp32"] = rate(ref_fp32, a.batch, a.steps, a.warmup, device)

    model = model.to(memory_format=torch.channels_last)
    xcl = x.contiguous(memory_format=torch.channels_last)

    def ref_bf16(net):
        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(net(xcl), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return step
    out["ref bf16+CL"] = rate(ref_bf16(model), a.batch, a.steps, a.warmup, device)
    # the same plain loop with the model under torch.compile (inductor; its warm-up steps compile)
    out["ref compiled"] = rate(ref_bf16(torch.compile(model)), a.batch, a.steps, a.warmup, device)

    amp = configure_device(device)  # what skin's loop sets
    crit = nn.CrossEntropyLoss(label_smoothing=0.1)
    # skin's step also does the preset's batch half (rotation, colour jitter, normalisation) on
    # the device, from the uint8 batch the loader sends: more work than the reference loops do
    augment = train_preset(model.data_config, "standard").batch
    x8 = torch.randint(0, 256, x.shape, dtype=torch.uint8, device=device)
    # and skin's optimizer: fused AdamW (make_optimizer), where the references keep PyTorch's default
    fused = torch.optim.AdamW(model.parameters(), 1e-3, fused=fused_adamw(model))
    out["skin step"] = rate(lambda: train_step(model, fused, crit, x8, y, amp, True, augment), a.batch,
                            a.steps, a.warmup, device)
    compiled = torch.compile(model)  # TrainConfig(compile=True): the same step, the model under torch.compile
    out["skin compiled"] = rate(lambda: train_step(compiled, fused, crit, x8, y, amp, True, augment), a.batch,
                                a.steps, a.warmup, device)
    return out


def loader_rate(data: Path, name: str, a, workers: int) -> float:
    df = load_manifest(data, "train_balanced")
    member = create_model(name, 6, pretrained="none", input_size=a.size)
    ds = ManifestDataset(df, train_preset(member.data_config).sample, data, "train_balanced", cache_side(a.size))
    loader = torch.utils.data.DataLoader(ds, a.batch, shuffle=True, num_workers=workers, pin_memory=True,
                                         collate_fn=skip_none_collate, persistent_workers=False)
    it = iter(loader)
    next(it)  # worker start-up
    t0, n = time.perf_counter(), 0
    for x, y, _ in it:
        n += len(y)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30, help="timed steps of the model-bound loops")
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=3, help="epochs of the full loop (the first is not counted)")
    ap.add_argument("--per-class", type=int, default=400, help="balanced training images per class")
    ap.add_argument("--members", nargs="+", default=list(DEFAULT_MEMBERS))
    ap.add_argument("--allow-cpu", action="store_true", help="run on the CPU anyway (a dry run of this script)")
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not a.allow_cpu:
        raise SystemExit("no GPU here: this is the GPU check (benchmarks/train_overhead.py measures the CPU loop)")
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, {os.cpu_count()} CPUs")
    cpus = os.cpu_count() or 1

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        src_per_class = max(6, a.per_class // 2)  # balanced set samples with replacement beyond this
        write_dataset(Path(tmp, "s"), src_per_class, 256, seed=0, workers=min(cpus, 16), progress=False)
        data = Path(tmp, "d")
        scan(Path(tmp, "s"), data, ScanOptions(workers=min(cpus, 16)), progress=False)
        balance(data, per_class=a.per_class, seed=0)
        side = cache_side(a.size)
        build_cache(data, "train_balanced", load_manifest(data, "train_balanced"), side, progress=False)
        build_cache(data, "val", load_manifest(data, "val"), side, progress=False)
        n_train = len(load_manifest(data, "train_balanced"))
        print(f"data: {n_train} balanced training images at {a.size}px (cache side {side}), "
              f"prepared in {time.perf_counter() - t0:.0f} s")

        rows = []
        for name in a.members:
            r = model_bound(name, a, device)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            rt = LocalRuntime(str(Path(tmp, "run", name)), device=device, cpus=float(cpus))
            best = "skin compiled" if r["skin compiled"] > r["skin step"] else "skin step"
            cfg = TrainConfig(backbone=name, data_dir=str(data), epochs=a.epochs, batch_size=a.batch,
                              pretrained="none", image_size=a.size, augment="standard",
                              compile=best == "skin compiled")  # the full loop with the faster step
            train_member(cfg, rt, log=lambda s: None)
            r["skin loop"] = statistics.median(h["train_images_per_s"] for h in rt.history[1:])
            # the loop's own worker count (skin.train.loaders: up to 8 beside a GPU), and more where the CPUs allow
            workers = min(8 if device.type == "cuda" else 4, cpus - 1) if cpus > 2 else 0
            r["loader"] = loader_rate(data, name, a, workers)
            if cpus - 1 > workers:
                r[f"loader x{cpus - 1}"] = loader_rate(data, name, a, cpus - 1)
            rows.append((name, r))
            print(f"{name}: " + ", ".join(f"{k} {v:.0f}" for k, v in r.items()), flush=True)

    cols = ["ref fp32", "ref bf16+CL", "ref compiled", "skin step", "skin compiled", "skin loop", "loader"]
    print(f"\nimages/s at {a.size}px, batch {a.batch}; ours = the faster of skin step / skin compiled "
          "(the loop runs with it)")
    print(f"{'backbone':<16}" + "".join(f"{c:>14}" for c in cols)
          + f"{'ours/ref32':>12}{'ours/best':>11}{'loop/ours':>11}")
    for name, r in rows:
        ours = max(r["skin step"], r["skin compiled"])
        print(f"{name:<16}" + "".join(f"{r[c]:>14.0f}" for c in cols)
              + f"{ours / r['ref fp32']:>12.2f}"
              f"{ours / max(r['ref bf16+CL'], r['ref compiled']):>11.2f}"
              f"{r['skin loop'] / ours:>11.2f}")


if __name__ == "__main__":
    main()
