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
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader

from .cache import ManifestDataset, cache_side, skip_none_collate
from .checkpoint import atomic_write_json, load_tensors, save_member, save_tensors
from .classes import ClassMap
from .data import LESION_FREE, DatasetError, load_classes, load_lesion_free, load_manifest, training_split
from .inference import calibrated, member_logits
from .metrics import compute_metrics
from .device import check_amp, configure_device, default_device
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
    # Outlier exposure (Hendrycks et al., ICLR 2019): when the data has lesion_free_train.csv
    # (`skin data scan --lesion-free`), those images join the training set with the uniform
    # distribution as target, weighted this much per image relative to a lesion; 0: not used
    lesion_free_weight: float = 1.0
    dropout: float | list[float] | None = None
    pretrained: str = "imagenet"  # "imagenet", a weights file/folder, or "none"
    init_from: str | None = None  # a bundle: start from its member's weights, head included (fine-tuning)
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
    # torch.compile the training forward/backward (inductor): the plain loop under torch.compile is the
    # reference to beat on a GPU (benchmarks/train_gpu.py measures our step both ways); off by default:
    # every worker compiles for a minute or more before its first step, and nothing measures a gain on a CPU
    compile: bool = False

    def validate(self) -> None:
        get_spec(self.backbone)
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be at least 1")
        if self.lesion_free_weight < 0:
            raise ValueError(f"lesion_free_weight must be 0 or more, got {self.lesion_free_weight}")
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
    copies_checkpoints: bool  # latest_checkpoint() hands over a copy of its own, which `restore` removes


class SingleWorker:
    """The Runtime methods of a run that is its one and only worker (no DDP, nothing to gather)."""
    device: torch.device
    copies_checkpoints = False

    def prepare_model(self, model):
        return model.to(self.device)

    def prepare_loader(self, loader):
        return loader

    def sync_buffers(self, model):
        pass

    def gather(self, obj):
        return [obj]


@dataclass
class LocalRuntime(SingleWorker):
    """No Ray: one process; checkpoints kept under `out` (latest and best by val macro-F1)."""

    out: str
    device: torch.device = field(default_factory=lambda: default_device())
    cpus: float = float(os.cpu_count() or 1)
    world_size: int = 1
    rank: int = 0
    node: str = "local"
    history: list = field(default_factory=list)

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


class OutlierExposureLoss(nn.Module):
    """Cross-entropy (with label smoothing) on lesion rows; on lesion-free rows (label -1) the
    cross-entropy to the uniform distribution times `weight` (outlier exposure): plain skin is
    evidence of no class, so a class cannot rest on it. The mean over the batch's rows; with no
    lesion-free row it is nn.CrossEntropyLoss."""

    def __init__(self, label_smoothing: float = 0.0, weight: float = 1.0) -> None:
        super().__init__()
        self.label_smoothing, self.weight = label_smoothing, weight

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        known = y >= 0
        loss = nn.functional.cross_entropy(logits[known], y[known], label_smoothing=self.label_smoothing,
                                           reduction="sum")
        if not bool(known.all()):
            loss = loss - self.weight * nn.functional.log_softmax(logits[~known], 1).mean(1).sum()
        return loss / len(y)


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


def loaders(cfg: TrainConfig, member: Member, classes: ClassMap, runtime: Runtime):
    data_dir = cfg.data_dir
    tr_split = training_split(data_dir)
    train_df = load_manifest(data_dir, tr_split, classes)
    val_df = load_manifest(data_dir, "val", classes)
    missing = [c for k, c in enumerate(classes) if not (train_df["label_index"] == k).any()]
    if missing and not cfg.init_from:  # fine-tuning may see only the classes reviewers corrected
        raise DatasetError(f"classes with zero training images: {missing}")
    side = cache_side(member.data_config.input_size) if cfg.use_cache else None
    preset = train_preset(member.data_config, cfg.augment)
    # On a GPU the per-pixel half of the augmentation runs batched on the device (the loader
    # sends uint8); on a CPU the whole preset stays in the loader, beside the training process.
    on_device = runtime.device.type == "cuda"
    interp = member.data_config.interpolation  # the cache resizes as the member's presets do
    train_ds = ManifestDataset(train_df, preset.sample if on_device else preset, data_dir, tr_split, side, interp)
    cached = train_ds.cached
    free_df = load_lesion_free(data_dir, "train") if cfg.lesion_free_weight > 0 else None
    if free_df is not None:  # outlier exposure: the same augmentation, label -1
        free_ds = ManifestDataset(free_df, train_ds.transform, data_dir, f"{LESION_FREE}_train", side, interp)
        train_ds, cached = ConcatDataset([train_ds, free_ds]), cached and free_ds.cached
    # Validation is split by rank into contiguous blocks without padding (Ray's prepare_data_loader
    # would pad the last shard with repeated rows) and concatenated back in `validate`: every val
    # row scored exactly once, in manifest order (unreadable rows dropped, as in one process).
    block = np.array_split(np.arange(len(val_df)), runtime.world_size)[runtime.rank]
    val_df = val_df.iloc[block]
    val_ds = ManifestDataset(val_df, eval_preset(member.data_config), data_dir, "val", side, interp)
    # Worker processes only pay off beside a GPU or with CPUs to spare; a GPU eats far more images.
    cap = 8 if runtime.device.type == "cuda" else 4
    workers = cfg.num_workers if cfg.num_workers >= 0 else (0 if runtime.cpus <= 2 else min(cap, int(runtime.cpus) - 1))
    common = dict(num_workers=workers, collate_fn=skip_none_collate,
                  pin_memory=runtime.device.type == "cuda", persistent_workers=workers > 0)
    g = torch.Generator().manual_seed(cfg.seed)
    train = DataLoader(train_ds, cfg.batch_size, shuffle=True, drop_last=len(train_ds) > cfg.batch_size,
                       generator=g, **common)
    val = DataLoader(val_ds, cfg.batch_size * 2, shuffle=False, **common)
    return (runtime.prepare_loader(train), val, cached, (preset.batch if on_device else None),
            0 if free_df is None else len(free_df))


@torch.no_grad()
def score_loader(member: Member, loader, device, amp: bool) -> tuple[np.ndarray, np.ndarray, float]:
    """Probabilities (T = 1), labels and summed cross-entropy of every readable row of `loader`,
    through skin.inference's member path (the one prediction and serving run)."""
    member.eval()
    probs, ys, loss_sum = [], [], 0.0
    for x, y, _ in loader:
        if x is None:
            continue
        x, y = x.to(device, non_blocking=True), y.to(device)
        logits = member_logits(member, x, amp)
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        probs.append(calibrated(logits).cpu().numpy())
        ys.append(y.cpu().numpy())
    n = len(probs[0][0]) if probs else 0
    return (np.concatenate(probs) if probs else np.zeros((0, n), np.float32),
            np.concatenate(ys) if ys else np.zeros(0, np.int64), loss_sum)


def val_metrics(probs: np.ndarray, labels: np.ndarray, loss_sum: float, classes: ClassMap) -> dict:
    m = compute_metrics(labels, probs, classes)
    return {"val_loss": loss_sum / max(len(labels), 1), "val_accuracy": m["accuracy"],
            "val_balanced_accuracy": m["balanced_accuracy"], SCORE: m["f1_macro"]}


def evaluate_loader(member: Member, loader, device, classes: ClassMap, amp: bool) -> tuple[dict, np.ndarray, np.ndarray]:
    """One process: metrics, probabilities and labels of a whole loader."""
    p, y, loss = score_loader(member, loader, device, amp)
    return val_metrics(p, y, loss, classes), p, y


def validate(member: Member, loader, runtime: Runtime, classes: ClassMap, amp: bool) -> tuple[dict, np.ndarray, np.ndarray]:
    """Every rank scores its block of val rows with rank 0's weights and buffers, and the blocks
    are concatenated in rank order: the metrics and probabilities of the whole val split, equal
    to one process evaluating rank 0's checkpoint."""
    runtime.sync_buffers(member)  # BN running stats drift per rank in the last step; rank 0's are saved
    parts = runtime.gather(score_loader(member, loader, runtime.device, amp))
    probs = np.concatenate([p for p, _, _ in parts if len(p)] or [parts[0][0]])
    labels = np.concatenate([y for _, y, _ in parts])
    if len(labels) == 0:
        raise DatasetError("none of the validation images could be read (moved or deleted since `skin data "
                           "scan`?); re-run `skin data scan` on the dataset where it now lies")
    return val_metrics(probs, labels, sum(loss for _, _, loss in parts), classes), probs, labels


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


# A hook called after every optimisation step with (epoch, step within the epoch): progress bars,
# profilers, or a test that kills the worker mid-epoch to rehearse a restart.
StepHook = Callable[[int, int], None]


@dataclass
class _Run:
    """What one worker trains with, built once by `_setup`."""
    member: Member
    model: nn.Module  # the member, wrapped by the runtime (DDP across workers)
    opt: torch.optim.Optimizer
    criterion: nn.Module
    train_loader: DataLoader
    val_loader: DataLoader
    batch_augment: Callable[[torch.Tensor], torch.Tensor] | None
    classes: ClassMap
    amp: bool
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def make_optimizer(member: Member, cfg: TrainConfig, random_init: bool) -> torch.optim.AdamW:
    """AdamW with the head at the peak LR and the backbone at `backbone_lr_mult` of it (1.0 from
    scratch, 0.1 from pretrained weights); each group keeps its `base_lr` for the schedule."""
    head_lr = cfg.lr or member.spec.lr
    mult = cfg.backbone_lr_mult if cfg.backbone_lr_mult is not None else (1.0 if random_init else 0.1)
    return torch.optim.AdamW([
        {"params": list(member.backbone.parameters()), "lr": head_lr * mult, "base_lr": head_lr * mult},
        {"params": list(member.head.parameters()), "lr": head_lr, "base_lr": head_lr},
    ], weight_decay=cfg.weight_decay, fused=fused_adamw(member))


def fused_adamw(model: nn.Module) -> bool:
    """PyTorch's fused AdamW (one kernel for every parameter's update) where it runs: float parameters on
    the CPU or a CUDA GPU. On 2 CPU cores it takes ResNet50's optimizer step from 13% of a 64 px training
    step to 7% (`python benchmarks/train_step.py`); the update is AdamW's, rounded in another order."""
    return all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in model.parameters())


def _setup(cfg: TrainConfig, runtime: Runtime, log: Callable[[str], None]) -> _Run:
    """Threads, seed, model, loaders, precision and optimizer of one worker."""
    threads = cfg.threads or max(1, int(round(runtime.cpus)))
    torch.set_num_threads(threads)  # Ray sets 1 thread in fractional-CPU workers
    torch.manual_seed(cfg.seed + runtime.rank)
    classes = load_classes(cfg.data_dir)
    random_init = is_random_init(cfg.pretrained) and not cfg.init_from
    member = create_model(cfg.backbone, len(classes), pretrained="none" if cfg.init_from else cfg.pretrained,
                          dropout=cfg.dropout, input_size=cfg.image_size,
                          normalize="per_image" if cfg.per_image_norm else None, output_stride=cfg.output_stride)
    if cfg.init_from:
        init_from_bundle(member, cfg.init_from, cfg.backbone, classes)
        log(f"[{cfg.backbone}] starting from bundle {cfg.init_from}'s weights (head included)")
    train_loader, val_loader, cached, batch_augment, n_free = loaders(cfg, member, classes, runtime)
    amp = configure_device(runtime.device, cfg.amp)
    if cfg.amp == "bf16" and not amp:
        log(f"[{cfg.backbone}] amp=bf16 asked for, but this CPU has no native bf16: training in fp32")
    if cfg.channels_last:
        member = member.to(memory_format=torch.channels_last)
    model = runtime.prepare_model(member)
    if cfg.compile:
        model = torch.compile(model)  # weights shared with `member`, which validation and checkpoints use
    steps = len(train_loader) if cfg.max_steps_per_epoch is None else min(len(train_loader), cfg.max_steps_per_epoch)
    if runtime.world_size > 1:
        log(f"[{member.spec.name}] rank {runtime.rank}/{runtime.world_size} on node {runtime.node}")
    free = f" (+{n_free} lesion-free, weight {cfg.lesion_free_weight:g})" if n_free else ""
    log(f"[{member.spec.name}] {len(train_loader.dataset) - n_free} train{free} / {len(val_loader.dataset)} val images, "
        f"{member.data_config.input_size}px, {threads} threads, device {runtime.device}{', bf16' if amp else ''}, "
        f"cache {'on' if cached else 'off'}")
    return _Run(member, model, make_optimizer(member, cfg, random_init),
                OutlierExposureLoss(cfg.label_smoothing, cfg.lesion_free_weight), train_loader, val_loader, batch_augment,
                classes, amp, steps, steps * cfg.epochs, max(1, int(cfg.warmup_epochs * steps)))


def restore(run: _Run, runtime: Runtime, log: Callable[[str], None]) -> tuple[int, dict]:
    """Resume from the runtime's latest checkpoint (weights + optimizer): (first epoch to run, what
    the reports carry to show the resume)."""
    ckpt = runtime.latest_checkpoint()
    if not ckpt:
        return 0, {}
    try:
        state = json.loads(Path(ckpt, "state.json").read_text())
        run.member.load_state_dict(load_tensors(Path(ckpt, "model.safetensors")))
        _load_optimizer(run.opt, load_tensors(Path(ckpt, "optimizer.safetensors")))
    finally:
        if runtime.copies_checkpoints:  # a copy made for this resume (skin.distributed.local_copy)
            import shutil
            shutil.rmtree(ckpt, ignore_errors=True)
    log(f"[{run.member.spec.name}] resumed from epoch {state['epoch']} ({ckpt})")
    return state["epoch"], {"resumed_from_epoch": state["epoch"],
                            "resumed_weights_digest": state_digest(run.member.state_dict())}


def train_epoch(run: _Run, cfg: TrainConfig, epoch: int, on_step: StepHook | None = None) -> tuple[float, int, int]:
    """One epoch of optimisation: (mean train loss, images seen, unreadable images skipped)."""
    frozen = epoch < cfg.freeze_epochs
    for p in run.member.backbone.parameters():
        p.requires_grad_(not frozen)
    run.model.train()
    sampler = getattr(run.train_loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    loss_sum, seen, skipped = torch.zeros((), device=next(run.member.parameters()).device), 0, 0
    step = epoch * run.steps_per_epoch
    for i, (x, y, n_skip) in enumerate(run.train_loader):
        if i >= run.steps_per_epoch:
            break
        skipped += n_skip
        if x is None:
            continue
        for g in run.opt.param_groups:
            g["lr"] = g["base_lr"] * lr_factor(step, run.total_steps, run.warmup_steps)
        loss_sum += train_step(run.model, run.opt, run.criterion, x, y, run.amp, cfg.channels_last,
                               run.batch_augment) * len(y)
        if on_step is not None:
            on_step(epoch, i)
        seen += len(y)
        step += 1
    return loss_sum.item() / max(seen, 1), seen, skipped  # .item(): the one host sync of the epoch


def save_checkpoint(run: _Run, cfg: TrainConfig, runtime: Runtime, epoch: int, val: dict, probs: np.ndarray,
                    labels: np.ndarray, metrics: dict) -> None:
    """Report the epoch's metrics with a checkpoint written by rank 0: weights + member metadata,
    optimizer state, the val probabilities (for temperature and weight fitting) and the config."""
    with tempfile.TemporaryDirectory() as tmp:
        if runtime.rank == 0:
            save_member(run.member, tmp, extra={"classes": list(run.classes), "epoch": epoch + 1, "metrics": dict(val)})
            save_tensors(Path(tmp, "optimizer.safetensors"), _optimizer_tensors(run.opt))
            save_tensors(Path(tmp, "val_probs.safetensors"),
                         {"probs": torch.from_numpy(probs), "labels": torch.from_numpy(labels)})
            atomic_write_json(Path(tmp, "state.json"), {"epoch": epoch + 1, "config": asdict(cfg)})
        runtime.report(metrics, tmp if runtime.rank == 0 else None)


def init_bundle(bundle_dir: str, classes, names):
    """The bundle a run fine-tunes from (--init-from), checked against the run: the same class map
    (ClassMapError) and every member `names` present (CheckpointError); the job checks it before Ray
    starts, each worker again where it loads its member."""
    from .bundle import Bundle
    from .checkpoint import CheckpointError
    bundle = Bundle.load(bundle_dir)
    bundle.classes.check_same(classes, f"class maps of --init-from {bundle_dir} and the dataset")
    missing = sorted(set(names) - set(bundle.member_names))
    if missing:
        raise CheckpointError(f"--init-from {bundle_dir} has no member(s) {missing} (it has {bundle.member_names}); "
                              "give --members among them, or start from ImageNet weights without --init-from")
    return bundle


def init_from_bundle(member, bundle_dir: str, name: str, classes) -> None:
    """Load a bundle's member `name` (backbone and head) into `member` (fine-tuning the next bundle from the
    one that answered): the same class map, the same architecture; otherwise an error saying which."""
    from .checkpoint import CheckpointError
    src = init_bundle(bundle_dir, classes, [name]).load_member(name)
    shape = lambda m: (m.head_config.hidden, m.head_config.batchnorm, m.data_config.normalize)  # noqa: E731
    if shape(src) != shape(member):
        raise CheckpointError(f"--init-from {bundle_dir}: its {name} has another head or normalisation "
                              f"{shape(src)} than this run's {shape(member)}; train with the same head and "
                              "normalisation settings (dropout may differ)")
    missing = member.load_state_dict(src.state_dict(), strict=False)
    if missing.missing_keys or missing.unexpected_keys:
        raise CheckpointError(f"--init-from {bundle_dir}: {name}'s weights do not fit this run's model "
                              f"({len(missing.missing_keys)} missing, {len(missing.unexpected_keys)} unexpected keys)")


def train_member(cfg: TrainConfig, runtime: Runtime, log: Callable[[str], None] = print,
                 on_step: StepHook | None = None) -> dict:
    """Train one member; returns the last epoch's metrics."""
    run_start = time.time()  # this worker's run began (before the model, data and first epoch)
    cfg.validate()
    run = _setup(cfg, runtime, log)
    start_epoch, resumed = restore(run, runtime, log)
    name = run.member.spec.name
    metrics: dict = {}
    train_start = None  # this run's first epoch began (set-up excluded); every report carries it
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.time()
        train_start = train_start or t0
        train_loss, seen, skipped = train_epoch(run, cfg, epoch, on_step)
        train_s = time.time() - t0
        val, probs, labels = validate(run.member, run.val_loader, runtime, run.classes, run.amp)
        metrics = {"epoch": epoch + 1, "member": name, "train_loss": train_loss,
                   **val, "skipped_images": skipped, "epoch_start": t0, "epoch_end": time.time(),
                   "epoch_s": time.time() - t0, "train_images_per_s": seen / max(train_s, 1e-9),
                   "lr": run.opt.param_groups[1]["lr"], "frozen_backbone": epoch < cfg.freeze_epochs,
                   "run_start": run_start, "train_start": train_start, **resumed}
        log(f"[{name}] epoch {epoch + 1}/{cfg.epochs} train_loss {train_loss:.4f} "
            f"val_loss {val['val_loss']:.4f} val_acc {val['val_accuracy']:.4f} "
            f"val_f1 {val[SCORE]:.4f} ({metrics['epoch_s']:.1f}s, {metrics['train_images_per_s']:.0f} img/s"
            f"{', skipped ' + str(skipped) if skipped else ''})")
        save_checkpoint(run, cfg, runtime, epoch, val, probs, labels, metrics)
    return metrics
