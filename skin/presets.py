"""Transforms, defined once: a train preset and an eval preset, both resolved from a member's
DataConfig. Training, evaluation, serving and tests all import these; nothing else types a
mean, a std or a size."""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from PIL import Image
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

from .registry import DataConfig

_INTERP = {
    "bicubic": T.InterpolationMode.BICUBIC,
    "bilinear": T.InterpolationMode.BILINEAR,
    "nearest": T.InterpolationMode.NEAREST,
}


class PerImageStandardize(torch.nn.Module):
    """Standardise each image by its own per-channel mean and std (random-init option)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(-2, -1), keepdim=True)
        std = x.std(dim=(-2, -1), keepdim=True).clamp_min(1e-3)
        return (x - mean) / std


def _normalize(cfg: DataConfig) -> torch.nn.Module:
    if cfg.normalize == "per_image":
        return PerImageStandardize()
    return T.Normalize(mean=list(cfg.mean), std=list(cfg.std))


def _interp(cfg: DataConfig) -> T.InterpolationMode:
    return _INTERP.get(cfg.interpolation, T.InterpolationMode.BICUBIC)


class BatchAugment(torch.nn.Module):
    """The per-pixel half of the train preset, run on whole batches on the training device:
    uint8 -> float, then (standard strength) a random rotation and colour jitter per image,
    then normalisation. Done per sample in DataLoader workers, rotation and hue jitter cost
    7.5 of 7.9 ms per 224-px image, which starved an H200 (about 880 images/s from 8 workers
    against 2,200-4,400 images/s of model throughput); here they are a few batched kernels, and
    the host sends uint8, a quarter of the bytes.

    Colour jitter follows torchvision's ColorJitter formulas (brightness, contrast, saturation,
    HSV hue shift, in that order), with its own random factors for each image."""

    def __init__(self, cfg: DataConfig, strength: str = "standard") -> None:
        super().__init__()
        self.strength = strength
        self.normalize = _normalize(cfg)
        self.degrees = 20.0 if strength == "standard" else 0.0
        self.jitter = (0.2, 0.2, 0.15, 0.02) if strength == "standard" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        n = x.shape[0]
        if self.degrees:
            angles = torch.empty(n, device=x.device).uniform_(-self.degrees, self.degrees)
            x = rotate(x, angles)
        if self.jitter:
            b, c, s, h = self.jitter
            u = torch.rand(n, 4, device=x.device)
            x = color_jitter(x, 1 - b + 2 * b * u[:, 0], 1 - c + 2 * c * u[:, 1],
                             1 - s + 2 * s * u[:, 2], -h + 2 * h * u[:, 3])
        return self.normalize(x)


def rotate(x: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate each image of (B, 3, H, W) about its centre (bilinear, zero fill, like
    torchvision's RandomRotation)."""
    t = torch.deg2rad(degrees)
    cos, sin, zero = torch.cos(t), torch.sin(t), torch.zeros_like(t)
    h, w = x.shape[-2:]
    theta = torch.stack([torch.stack([cos, -sin * h / w, zero], 1),
                         torch.stack([sin * w / h, cos, zero], 1)], 1)
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


_GREY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def color_jitter(x: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor,
                 saturation: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """Per-image factors (B,) on float images in [0, 1]; 1, 1, 1, 0 is the identity."""
    def per(v):
        return v.view(-1, 1, 1, 1)

    def grey(img):
        r, g, b = img.unbind(1)
        return (_GREY[0] * r + _GREY[1] * g + _GREY[2] * b).unsqueeze(1)

    x = (x * per(brightness)).clamp_(0, 1)
    mean = grey(x).mean(dim=(-3, -2, -1), keepdim=True)
    x = (per(contrast) * x + (1 - per(contrast)) * mean).clamp_(0, 1)
    x = (per(saturation) * x + (1 - per(saturation)) * grey(x)).clamp_(0, 1)
    return shift_hue(x, hue)


def shift_hue(x: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """Add `hue` (B,) (fraction of a turn) to each image's HSV hue; torchvision's adjust_hue,
    with one factor per image."""
    maxc, argmax = x.max(dim=1)
    minc = x.min(dim=1).values
    delta = maxc - minc
    d = delta.clamp_min(1e-12)
    r, g, b = x.unbind(1)
    h = torch.where(argmax == 0, torch.remainder((g - b) / d, 6.0),
                    torch.where(argmax == 1, (b - r) / d + 2.0, (r - g) / d + 4.0))
    h = torch.where(delta > 0, h, torch.zeros_like(h))
    h = torch.remainder(h + 6.0 * hue.view(-1, 1, 1), 6.0)  # in sixths of a turn
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    # HSV -> RGB: channel n is v - v*s*clamp(min(k, 4 - k), 0, 1), k = (n + h) mod 6, n = 5, 3, 1
    n = x.new_tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1)
    k = torch.remainder(n + h.unsqueeze(1), 6.0)
    w = torch.minimum(k, 4.0 - k).clamp(0, 1)
    return (maxc.unsqueeze(1) * (1 - s.unsqueeze(1) * w)).clamp_(0, 1)


class TrainPreset:
    """The train preset in two halves: `sample` (geometry on uint8, per image, in DataLoader
    workers) and `batch` (a BatchAugment, on the training device). Calling it on one image runs
    both, for inspection and tests."""

    def __init__(self, sample: T.Compose, batch: BatchAugment) -> None:
        self.sample, self.batch = sample, batch

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.batch(self.sample(img)[None])[0]


def train_preset(cfg: DataConfig, strength: str = "standard") -> TrainPreset:
    """The usual dermatology augmentations: lesions have no canonical orientation, so flips and
    rotations are label-preserving; colour jitter stands in for camera and lighting shifts.
    "light" (mild crop + flips) suits small from-scratch runs, where the standard set slowed
    learning here (macro-F1 0.50 vs 0.70 after 8 epochs of MobileNetV2 at 64 px)."""
    if strength not in ("standard", "light"):
        raise ValueError(f"augmentation strength must be 'standard' or 'light', got {strength!r}")
    scale, ratio = ((0.85, 1.0), (0.9, 1.1)) if strength == "light" else ((0.6, 1.0), (0.8, 1.25))
    sample = T.Compose([
        T.ToImage(),
        T.RandomResizedCrop(cfg.input_size, scale=scale, ratio=ratio, interpolation=_interp(cfg), antialias=True),
        T.RandomHorizontalFlip(), T.RandomVerticalFlip(),
    ])
    return TrainPreset(sample, BatchAugment(cfg, strength))


def eval_preset(cfg: DataConfig) -> T.Compose:
    """Resize the whole image to input_size x input_size (no crop: a lesion near the border must
    stay in view, and a CAM over the full frame maps back onto the original photograph).
    It is `eval_geometry` (uint8 out) then `eval_pixels`; the server runs the first half where it
    decodes the upload and ships uint8 to the members, a quarter of the bytes."""
    return T.Compose([eval_geometry(cfg), eval_pixels(cfg)])


def eval_geometry(cfg: DataConfig) -> T.Compose:
    """PIL image -> uint8 (3, S, S): the resize half of the eval preset."""
    return T.Compose([
        T.ToImage(),
        T.Resize((cfg.input_size, cfg.input_size), interpolation=_interp(cfg), antialias=True),
    ])


def eval_pixels(cfg: DataConfig) -> T.Compose:
    """uint8 (..., 3, S, S) -> normalised float32: the per-pixel half of the eval preset."""
    return T.Compose([T.ToDtype(torch.float32, scale=True), _normalize(cfg)])


def to_batch(images: list[Image.Image], cfg: DataConfig) -> torch.Tensor:
    """Eval-preset a list of RGB images into one (B, 3, S, S) tensor."""
    t = eval_preset(cfg)
    return torch.stack([t(im) for im in images])


def eval_batches(images: Sequence[Image.Image], cfgs: Iterable[DataConfig],
                 device: torch.device | str = "cpu") -> dict[DataConfig, torch.Tensor]:
    """Each distinct config's eval-preset batch of `images`, made on `device`: every image goes up
    once as uint8 (3, H, W), a quarter of a float copy's bytes, and is resized and normalised there
    by the eval preset's own torchvision ops, once per distinct config whatever the members. On a
    CPU the tensors equal `to_batch`'s (tested); on a GPU the resize runs as a few kernels
    instead of PIL-side work on the host (benchmarks/gpu.py measures both)."""
    device = torch.device(device)
    up = [TF.pil_to_tensor(im).to(device, non_blocking=True) for im in images]
    out: dict[DataConfig, torch.Tensor] = {}
    for cfg in cfgs:
        if cfg not in out:
            size = [cfg.input_size, cfg.input_size]
            out[cfg] = eval_pixels(cfg)(torch.stack([
                TF.resize(u, size, interpolation=_interp(cfg), antialias=True) for u in up]))
    return out
