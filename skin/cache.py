"""Training input: manifest datasets and the resized-image cache.

Decoding full-size photographs every epoch starves a GPU. `skin data cache` decodes each image
once, resizes it to a square of side round(1.15 x input size) (the train crop's head-room) with
the member's own interpolation (its DataConfig, as the eval preset resizes), and
stores all of them as one uint8 array, keyed by the manifest's content hash; training reads the
cache when it matches. A file that became unreadable since the scan is skipped and counted.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset

from .images import DATASET_LIMITS, ImageError, load_image

CACHE_SCALE = 1.15


def cache_side(input_size: int) -> int:
    return int(round(CACHE_SCALE * input_size))


def manifest_key(df: pd.DataFrame) -> str:
    h = hashlib.sha256()
    for p, s, l in zip(df["path"], df["sha256"], df["label_index"]):
        h.update(f"{p}\t{s}\t{l}\n".encode())
    return h.hexdigest()[:16]


def resampling(interpolation: str) -> Image.Resampling:
    """Pillow's filter for a DataConfig interpolation name (timm's names: bicubic, bilinear, ...)."""
    try:
        return Image.Resampling[interpolation.upper()]
    except KeyError:
        raise ValueError(f"unknown interpolation {interpolation!r}; one of "
                         f"{', '.join(r.name.lower() for r in Image.Resampling)}") from None


def cache_paths(data_dir: str | Path, split: str, df: pd.DataFrame, side: int,
                interpolation: str = "bicubic") -> tuple[Path, Path]:
    base = Path(data_dir) / "cache" / f"{split}-{manifest_key(df)}-{side}-{interpolation}"
    return base.with_suffix(".npy"), base.with_suffix(".json")


def build_cache(data_dir: str | Path, split: str, df: pd.DataFrame, side: int,
                progress: bool = True, interpolation: str = "bicubic") -> Path:
    """Write the cache for one manifest (distinct paths only); returns the .npy path."""
    resample = resampling(interpolation)
    npy, meta = cache_paths(data_dir, split, df, side, interpolation)
    if npy.is_file() and meta.is_file():
        return npy
    npy.parent.mkdir(parents=True, exist_ok=True)
    paths = list(dict.fromkeys(df["path"]))
    arr = np.lib.format.open_memmap(str(npy) + ".tmp.npy", mode="w+", dtype=np.uint8,
                                    shape=(len(paths), side, side, 3))
    ok = np.ones(len(paths), bool)
    t0 = time.perf_counter()
    for i, p in enumerate(paths):
        try:
            img = load_image(p, DATASET_LIMITS)
            arr[i] = np.asarray(img.resize((side, side), resample))
        except (ImageError, OSError):
            ok[i] = False
        if progress and ((i + 1) % 500 == 0 or i + 1 == len(paths)):
            print(f"\rcache {split}: {i + 1}/{len(paths)} ({(i + 1) / (time.perf_counter() - t0):.0f}/s)",
                  end="\n" if i + 1 == len(paths) else "", flush=True)
    arr.flush()
    del arr
    Path(str(npy) + ".tmp.npy").replace(npy)
    meta.write_text(json.dumps({"paths": paths, "ok": ok.tolist(), "side": side}))
    return npy


class ManifestDataset(Dataset):
    """(image tensor, label index) for each manifest row; reads the cache when one matches.
    An unreadable image yields None, which `skip_none_collate` drops and counts."""

    def __init__(self, df: pd.DataFrame, transform: Callable, data_dir: str | Path | None = None,
                 split: str | None = None, side: int | None = None, interpolation: str = "bicubic") -> None:
        self.paths = df["path"].tolist()
        self.labels = df["label_index"].astype(int).tolist()
        self.transform = transform
        self.cache = None
        if data_dir is not None and split is not None and side is not None:
            npy, meta = cache_paths(data_dir, split, df, side, interpolation)
            if npy.is_file() and meta.is_file():
                info = json.loads(meta.read_text())
                index = {p: i for i, p in enumerate(info["paths"])}
                self.cache = (np.load(npy, mmap_mode="r"), index, info["ok"])

    @property
    def cached(self) -> bool:
        return self.cache is not None

    def __len__(self) -> int:
        return len(self.paths)

    def _image(self, i: int) -> Image.Image | None:
        if self.cache is not None:
            arr, index, ok = self.cache
            j = index[self.paths[i]]
            return Image.fromarray(np.asarray(arr[j])) if ok[j] else None
        try:
            return load_image(self.paths[i], DATASET_LIMITS)
        except (ImageError, OSError):
            return None

    def __getitem__(self, i: int):
        img = self._image(i)
        if img is None:
            return None
        return self.transform(img), self.labels[i]


def skip_none_collate(batch):
    """Collate, dropping unreadable samples; returns (x, y, n_skipped)."""
    good = [b for b in batch if b is not None]
    skipped = len(batch) - len(good)
    if not good:
        return None, None, skipped
    x = torch.stack([b[0] for b in good])
    y = torch.tensor([b[1] for b in good], dtype=torch.long)
    return x, y, skipped


def add_cache_arguments(s) -> None:
    """`skin data cache`'s arguments, on its parser."""
    s.add_argument("dir", help="a `skin data scan` output folder")
    from .args import at_least
    s.add_argument("--image-size", type=at_least(16), default=224, help="member input size (cache side = 1.15 x this)")
    from .registry import DEFAULT_MEMBERS, list_backbones
    s.add_argument("--members", nargs="+", default=list(DEFAULT_MEMBERS), choices=list_backbones(),
                   help="members the cache is for: one cache per distinct interpolation of their weights")
    s.add_argument("--splits", nargs="+", default=["train_balanced", "train", "val", "lesion_free_train"],
                   help="manifests to cache (missing ones are skipped)")
    s.set_defaults(fn=_cmd_cache)


def _cmd_cache(a) -> int:
    from .data import LESION_FREE, load_classes, load_lesion_free, load_manifest
    from .registry import get_spec
    classes = load_classes(a.dir)
    for split in a.splits:
        if not (Path(a.dir) / f"{split}.csv").is_file():
            continue
        if split.startswith(LESION_FREE + "_"):
            df = load_lesion_free(a.dir, split[len(LESION_FREE) + 1:])
            if df is None:
                continue
        else:
            df = load_manifest(a.dir, split, classes)
        for interp in sorted({get_spec(m).data_config(a.image_size).interpolation for m in a.members}):
            npy = build_cache(a.dir, split, df, cache_side(a.image_size), interpolation=interp)
            print(f"{split}: {npy} ({npy.stat().st_size / 1e6:.1f} MB)")
    return 0
