"""The training loop: one worker function for Ray Train and for a plain local run.

`train_member(config, runtime)` builds the member from the registry, reads the manifests with
the train/eval presets, and trains with AdamW (separate backbone and head learning rates),
linear warm-up then cosine decay, optional frozen-backbone warm-up epochs, label smoothing, and
bf16 autocast + channels_last on GPU. Each epoch it reports train loss, val loss, accuracy,
balanced accuracy and macro-F1 with a checkpoint (safetensors + member metadata + optimizer
state) through `runtime.report`. The runtime decides where that goes: `LocalRuntime` below, or
Ray Train's (`skin.distributed.RayRuntime`).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from .cache import ManifestDataset, cache_side, skip_none_collate
from .checkpoint import atomic_write_json, load_tensors, save_member, save_tensors
from .classes import ClassMap
from .data import DatasetError, load_classes, load_manifest, training_split
from .metrics import compute_metrics
from .device import check_amp, configure_device
from .presets import eval_preset, train_preset
from .registry import Member, check_output_stride, create_model, get_spec, is_random_init

# Score that selects the best checkpoint of a member.
SCORE = "val_f1_macro"


@dataclass
class TrainConfig:
    backbone: str
    data_dir: str
    epochs: int = 10
    batch_size: int = 32
    lr: float | None = None  # head peak LR; None: the spec's default
    backbone_lr_mult: float | None = None  # None: 1.0 from scratch, 0.1 for pretrained weights
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    freeze_epochs: int = 0  # train only the head for the first N epochs
    label_smoothing: float = 0.1
    dropout: float | list[float] | None = None
    pretrained: str = "imagenet"  # "imagenet", a weights file/folder, or "none"
    image_size: int | None = None
    output_stride: int = 32  # 16 / 8: finer Grad-CAM maps (dilated last stages), more compute
    per_image_norm: bool = False
    augment: str = "standard"  # or "light": mild crop + flips (small from-scratch runs)
    num_workers: int = -1  # DataLoader workers; -1: from the CPUs this worker was given
    threads: int | None = None  # torch threads; None: from the CPUs this worker was given
    seed: int = 0
    max_steps_per_epoch: int | None = None  # smoke runs
    use_cache: bool = True
    channels_last: bool = True  # NHWC convs: 1.7x faster for EfficientNet-B1 on CPU here, the usual win on GPU
    # bf16 autocast: "auto" = on a GPU only; "bf16" = also on a CPU with native bf16 (avx512_bf16 /
    # AMX: ResNet50 trains 1.7x faster here, depthwise-conv members slower); "off" = fp32
    amp: str = "auto"
    kill_after_epoch: int | None = None  # fault injection for tests: SIGKILL self once, in the next epoch
    kill_marker: str | None = None

    def validate(self) -> None:
        get_spec(self.backbone)
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be at least 1")
        if self.freeze_epochs >= self.epochs:
            raise ValueError(f"freeze_epochs ({self.freeze_epochs}) must be less than epochs ({self.epochs})")
        check_amp(self.amp)
        check_output_stride(self.output_stride)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


class Runtime(Protocol):
    world_size: int
    rank: int
    device: torch.device
    cpus: float
    node: str  # where this worker runs (logged, so a multi-node run shows its placement)

    def prepare_model(self, model: nn.Module) -> nn.Module: ...
    def prepare_loader(self, loader: DataLoader) -> DataLoader: ...
    def sync_buffers(self, model: nn.Module) -> None: ...
    def gather(self, obj: object) -> list: ...
    def report(self, metrics: dict, checkpoint_dir: str | None) -> None: ...
    def latest_checkpoint(self) -> str | None: ...


@dataclass
class LocalRuntime:
    """No Ray: one process; checkpoints kept under `out` (latest and best by val macro-F1)."""

    out: str
    device: torch.device = field(default_factory=lambda: torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    cpus: float = float(os.cpu_count() or 1)
    world_size: int = 1
    rank: int = 0
    node: str = "local"
    history: list = field(default_factory=list)

    def prepare_model(self, model):
        return model.to(self.device)

    def prepare_loader(self, loader):
        return loader

    def sync_buffers(self, model):
        pass

    def gather(self, obj):
        return [obj]

    def report(self, metrics, checkpoint_dir):
        import shutil
        self.history.append(metrics)
        out = Path(self.out)
        out.mkdir(parents=True, exist_ok=True)
        if checkpoint_dir:
            best = max(self.history, key=lambda m: m[SCORE])
            targets = ["latest"] + (["best"] if best is metrics else [])
            for t in targets:
                tmp = out / f".{t}.tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.copytree(checkpoint_dir, tmp)
                from .checkpoint import replace_dir
                replace_dir(tmp, out / t)
        atomic_write_json(out / "history.json", self.history)

    def latest_checkpoint(self):
        p = Path(self.out) / "latest"
        return str(p) if (p / "state.json").is_file() else None


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1, then cosine to 0 (Loshchilov & Hutter 2017, without restarts)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """A hash of tensor contents, to prove a resumed model holds the checkpoint's weights."""
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    flat = {}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            flat[f"{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return flat


def _load_optimizer(opt: torch.optim.Optimizer, flat: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict] = {}
    for key, v in flat.items():
        i, k = key.split(".", 1)
        state.setdefault(int(i), {})[k] = v
    sd = opt.state_dict()
    opt.load_state_dict({"state": state, "param_groups": sd["param_groups"]})


def _unwrap(model: nn.Module) -> Member:
    return model.module if hasattr(model, "module") else model


def _loaders(cfg: TrainConfig, member: Member, classes: ClassMap, runtime: Runtime):
    data_dir = cfg.data_dir
    tr_split = training_split(data_dir)
    train_df = load_manifest(data_dir, tr_split, classes)
    val_df = load_manifest(data_dir, "val", classes)
    missing = [c for k, c in enumerate(classes) if not (train_df["label_index"] == k).any()]
    if missing:
        raise DatasetError(f"classes with zero training images: {missing}")
    side = cache_side(member.data_config.input_size) if cfg.use_cache else None
    preset = train_preset(member.data_config, cfg.augment)
    # On a GPU the per-pixel half of the augmentation runs batched on the device (the loader
    # sends uint8); on a CPU the whole preset stays in the loader, beside the training process.
    on_device = runtime.device.type == "cuda"
    train_ds = ManifestDataset(train_df, preset.sample if on_device else preset, data_dir, tr_split, side)
    # Validation is split by rank into contiguous blocks without padding (Ray's prepare_data_loader
    # would pad the last shard with repeated rows) and concatenated back in `validate`: every val
    # row scored exactly once, in manifest order (unreadable rows dropped, as in one process).
    block = np.array_split(np.arange(len(val_df)), runtime.world_size)[runtime.rank]
    val_df = val_df.iloc[block]
    val_ds = ManifestDataset(val_df, eval_preset(member.data_config), data_dir, "val", side)
    # Worker processes only pay off beside a GPU or with CPUs to spare; a GPU eats far more images.
    cap = 8 if runtime.device.type == "cuda" else 4
    workers = cfg.num_workers if cfg.num_workers >= 0 else (0 if runtime.cpus <= 2 else min(cap, int(runtime.cpus) - 1))
    common = dict(num_workers=workers, collate_fn=skip_none_collate,
                  pin_memory=runtime.device.type == "cuda", persistent_workers=workers > 0)
    g = torch.Generator().manual_seed(cfg.seed)
    train = DataLoader(train_ds, cfg.batch_size, shuffle=True, drop_last=len(train_ds) > cfg.batch_size,
                       generator=g, **common)
    val = DataLoader(val_ds, cfg.batch_size * 2, shuffle=False, **common)
    return runtime.prepare_loader(train), val, train_ds.cached, (preset.batch if on_device else None)


@torch.no_grad()
def score_loader(model: nn.Module, loader, device, amp: bool) -> tuple[np.ndarray, np.ndarray, float]:
    """Probabilities, labels and summed cross-entropy of every readable row of `loader`."""
    model.eval()
    probs, ys, loss_sum = [], [], 0.0
    for x, y, _ in loader:
        if x is None:
            continue
        x, y = x.to(device, non_blocking=True), y.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
        logits = logits.float()
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        probs.append(torch.softmax(logits, 1).cpu().numpy())
        ys.append(y.cpu().numpy())
    n = len(probs[0][0]) if probs else 0
    return (np.concatenate(probs) if probs else np.zeros((0, n), np.float32),
            np.concatenate(ys) if ys else np.zeros(0, np.int64), loss_sum)


def val_metrics(probs: np.ndarray, labels: np.ndarray, loss_sum: float, classes: ClassMap) -> dict:
    m = compute_metrics(labels, probs, classes)
    return {"val_loss": loss_sum / max(len(labels), 1), "val_accuracy": m["accuracy"],
            "val_balanced_accuracy": m["balanced_accuracy"], SCORE: m["f1_macro"]}


def evaluate_loader(model: nn.Module, loader, device, classes: ClassMap, amp: bool) -> tuple[dict, np.ndarray, np.ndarray]:
    """One process: metrics, probabilities and labels of a whole loader."""
    p, y, loss = score_loader(model, loader, device, amp)
    return val_metrics(p, y, loss, classes), p, y


def validate(member: Member, loader, runtime: Runtime, classes: ClassMap, amp: bool) -> tuple[dict, np.ndarray, np.ndarray]:
    """Every rank scores its block of val rows with rank 0's weights and buffers, and the blocks
    are concatenated in rank order: the metrics and probabilities of the whole val split, equal
    to one process evaluating rank 0's checkpoint."""
    runtime.sync_buffers(member)  # BN running stats drift per rank in the last step; rank 0's are saved
    parts = runtime.gather(score_loader(member, loader, runtime.device, amp))
    probs = np.concatenate([p for p, _, _ in parts if len(p)] or [parts[0][0]])
    labels = np.concatenate([y for _, y, _ in parts])
    return val_metrics(probs, labels, sum(loss for _, _, loss in parts), classes), probs, labels


def _maybe_kill(cfg: TrainConfig, epoch: int, log: Callable[[str], None]) -> None:
    """Fault injection for tests: SIGKILL this worker once, mid-way through the epoch after
    `kill_after_epoch` (after that epoch's checkpoint was reported and registered)."""
    if cfg.kill_after_epoch is None or epoch != cfg.kill_after_epoch or not cfg.kill_marker:
        return
    if Path(cfg.kill_marker).exists():
        return
    time.sleep(2.0)  # let the controller collect the previous report before the crash
    Path(cfg.kill_marker).write_text(str(os.getpid()))
    log(f"fault injection: killing worker process {os.getpid()} during epoch {epoch + 1}")
    os.kill(os.getpid(), signal.SIGKILL)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, criterion: nn.Module, x: torch.Tensor,
               y: torch.Tensor, amp: bool, channels_last: bool,
               augment: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """One optimisation step; `augment` (the preset's BatchAugment) runs on the device after the
    transfer. Returns the detached loss (no host sync: the caller decides when to read it, so a
    GPU is never stalled once per step)."""
    device = next(model.parameters()).device
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    if augment is not None:
        x = augment(x)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        loss = criterion(model(x).float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def train_member(cfg: TrainConfig, runtime: Runtime, log: Callable[[str], None] = print) -> dict:
    """Train one member; returns the last epoch's metrics."""
    run_start = time.time()  # this worker's run began (before the model, data and first epoch)
    cfg.validate()
    threads = cfg.threads or max(1, int(round(runtime.cpus)))
    torch.set_num_threads(threads)  # Ray sets 1 thread in fractional-CPU workers
    torch.manual_seed(cfg.seed + runtime.rank)
    classes = load_classes(cfg.data_dir)
    random_init = is_random_init(cfg.pretrained)
    member = create_model(cfg.backbone, len(classes), pretrained=cfg.pretrained, dropout=cfg.dropout,
                          input_size=cfg.image_size, normalize="per_image" if cfg.per_image_norm else None,
                          output_stride=cfg.output_stride)
    train_loader, val_loader, cached, batch_augment = _loaders(cfg, member, classes, runtime)
    device = runtime.device
    amp = configure_device(device, cfg.amp)
    if cfg.amp == "bf16" and not amp:
        log(f"[{cfg.backbone}] amp=bf16 asked for, but this CPU has no native bf16: training in fp32")
    if cfg.channels_last:
        member = member.to(memory_format=torch.channels_last)
    model = runtime.prepare_model(member)
    spec = member.spec
    head_lr = cfg.lr or spec.lr
    mult = cfg.backbone_lr_mult if cfg.backbone_lr_mult is not None else (1.0 if random_init else 0.1)
    opt = torch.optim.AdamW([
        {"params": list(member.backbone.parameters()), "lr": head_lr * mult, "base_lr": head_lr * mult},
        {"params": list(member.head.parameters()), "lr": head_lr, "base_lr": head_lr},
    ], weight_decay=cfg.weight_decay)
    steps_per_epoch = len(train_loader) if cfg.max_steps_per_epoch is None else min(len(train_loader), cfg.max_steps_per_epoch)
    total, warmup = steps_per_epoch * cfg.epochs, max(1, int(cfg.warmup_epochs * steps_per_epoch))
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    start_epoch, resumed = 0, {}
    ckpt = runtime.latest_checkpoint()
    if ckpt:
        state = json.loads(Path(ckpt, "state.json").read_text())
        weights = load_tensors(Path(ckpt, "model.safetensors"))
        member.load_state_dict(weights)
        _load_optimizer(opt, load_tensors(Path(ckpt, "optimizer.safetensors")))
        start_epoch = state["epoch"]
        resumed = {"resumed_from_epoch": start_epoch, "resumed_weights_digest": state_digest(member.state_dict())}
        log(f"[{spec.name}] resumed from epoch {start_epoch} ({ckpt})")

    if runtime.world_size > 1:
        log(f"[{spec.name}] rank {runtime.rank}/{runtime.world_size} on node {runtime.node}")
    log(f"[{spec.name}] {len(train_loader.dataset)} train / {len(val_loader.dataset)} val images, "
        f"{member.data_config.input_size}px, {threads} threads, device {device}{', bf16' if amp else ''}, "
        f"cache {'on' if cached else 'off'}")
    metrics: dict = {}
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.time()
        frozen = epoch < cfg.freeze_epochs
        for p in member.backbone.parameters():
            p.requires_grad_(not frozen)
        model.train()
        if hasattr(train_loader, "sampler") and hasattr(train_loader.sampler, "set_epoch"):
            train_loader.sampler.set_epoch(epoch)
        loss_sum, seen, skipped, step = torch.zeros((), device=device), 0, 0, epoch * steps_per_epoch
        for i, (x, y, n_skip) in enumerate(train_loader):
            if i >= steps_per_epoch:
                break
            skipped += n_skip
            if x is None:
                continue
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * lr_factor(step, total, warmup)
            loss_sum += train_step(model, opt, criterion, x, y, amp, cfg.channels_last,
                                   batch_augment) * len(y)
            _maybe_kill(cfg, epoch, log)
            seen += len(y)
            step += 1
        loss_sum = loss_sum.item()  # the one host sync of the training phase
        train_s = time.time() - t0
        val, probs, ys = validate(member, val_loader, runtime, classes, amp)
        metrics = {"epoch": epoch + 1, "member": spec.name, "train_loss": loss_sum / max(seen, 1),
                   **val, "skipped_images": skipped, "epoch_start": t0, "epoch_end": time.time(),
                   "epoch_s": time.time() - t0, "train_images_per_s": seen / max(train_s, 1e-9),
                   "lr": opt.param_groups[1]["lr"], "frozen_backbone": frozen, "run_start": run_start, **resumed}
        log(f"[{spec.name}] epoch {epoch + 1}/{cfg.epochs} train_loss {metrics['train_loss']:.4f} "
            f"val_loss {val['val_loss']:.4f} val_acc {val['val_accuracy']:.4f} "
            f"val_f1 {val[SCORE]:.4f} ({metrics['epoch_s']:.1f}s, {metrics['train_images_per_s']:.0f} img/s"
            f"{', skipped ' + str(skipped) if skipped else ''})")
        with tempfile.TemporaryDirectory() as tmp:
            if runtime.rank == 0:
                save_member(member, tmp, extra={"classes": list(classes), "epoch": epoch + 1,
                                                "metrics": {k: v for k, v in val.items()}})
                save_tensors(Path(tmp, "optimizer.safetensors"), _optimizer_tensors(opt))
                save_tensors(Path(tmp, "val_probs.safetensors"),
                             {"probs": torch.from_numpy(probs), "labels": torch.from_numpy(ys)})
                atomic_write_json(Path(tmp, "state.json"), {"epoch": epoch + 1, "config": asdict(cfg)})
            runtime.report(metrics, tmp if runtime.rank == 0 else None)
    return metrics
