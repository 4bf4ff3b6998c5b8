"""Synthetic dermoscopy-like lesions in the six default classes, each with its lesion mask.

The class is carried by shape, border, texture, colour pattern and multiplicity, not by mean
colour: every class draws its lesion colour from the same palette and its size from overlapping
ranges, and nuisances (skin tone, lighting gradient, hairs, blur, position, scale, rotation,
JPEG quality) vary independently. A logistic regression on mean RGB stays below 0.6 macro-F1
(tested), so a CNN and its Grad-CAM have spatial evidence to find.

    Enfeksiyonel  annular ring with a scaly raised border, clearer centre, satellite pustules
    Ekzama        ill-defined patchy plaque with fine scale speckle
    Akne          many small papules, some with a pale pustular centre
    Pigment       flat, homogeneous, smooth-bordered macule(s)
    Benign        round symmetric nevus, regular border, regular globules
    Malign        asymmetric irregular border, multicoloured blotches, irregular dots
"""
from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .classes import DEFAULT_CLASSES
from .parallel import map_progress

SPLITS = (("train", 0.70), ("val", 0.15), ("test", 0.15))
# Shared lesion palette (RGB): pink-red through brown to dark brown, for every class.
_PALETTE = np.array([[178, 74, 72], [160, 92, 70], [132, 84, 58], [110, 70, 48], [88, 58, 44]],
                    dtype=np.float32)


@dataclass(frozen=True)
class Sample:
    image: Image.Image
    mask: Image.Image  # "L", 255 inside the lesion
    label: int


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Value noise in [0, 1]: a cells x cells random grid upsampled bicubically."""
    g = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8), "L")
    return np.asarray(g.resize((size, size), Image.Resampling.BICUBIC), np.float32) / 255.0


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    return y, x


def _polar(size: int, cx: float, cy: float, angle: float, aspect: float):
    y, x = _grid(size)
    dx, dy = x - cx, y - cy
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, (-s * dx + c * dy) * aspect
    return np.hypot(u, v), np.arctan2(v, u)


def _radial_border(theta: np.ndarray, rng: np.random.Generator, amp: float, harmonics: int):
    """1 + a sum of random harmonics: amp ~0.03 is a regular border, ~0.25 an irregular one.
    Evaluated on 1024 angle bins and looked up, which is far cheaper than per pixel."""
    bins = np.linspace(-np.pi, np.pi, 1025, dtype=np.float32)
    r = np.ones_like(bins)
    for k in range(2, 2 + harmonics):
        r += (amp / k**0.5) * rng.normal() * np.cos(k * bins + rng.uniform(0, 2 * np.pi))
    idx = ((theta + np.pi) * (1024 / (2 * np.pi))).astype(np.int32)
    return r[idx]


def lesion_colour(rng: np.random.Generator) -> np.ndarray:
    i = rng.uniform(0, len(_PALETTE) - 1)
    lo = int(i)
    return _PALETTE[lo] + (i - lo) * (_PALETTE[min(lo + 1, len(_PALETTE) - 1)] - _PALETTE[lo])


def _skin(rng: np.random.Generator, size: int) -> np.ndarray:
    t = rng.uniform(0, 1)
    base = (1 - t) * np.array([238, 204, 180]) + t * np.array([128, 88, 64])
    base = base + rng.normal(0, 6, 3)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.arange(size, dtype=np.float32) / size - 0.5
    k = rng.uniform(0.05, 0.2) * 2
    light = 1.0 + k * (np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None])
    tex = 1.0 + 0.04 * (_smooth_noise(rng, size, 24) - 0.5)
    # channel-planar (3, H, W) float32 throughout: per-channel blends are ~7x faster than HWC
    return base.astype(np.float32)[:, None, None] * (light * tex).astype(np.float32)[None]


def _blend(img: np.ndarray, alpha: np.ndarray, colour) -> None:
    a = np.clip(alpha, 0, 1, dtype=np.float32)
    for ch in range(3):
        plane = img[ch]
        plane += a * (np.float32(colour[ch]) - plane)


def _disc(size, cx, cy, r, rng, amp=0.03, aspect=1.0):
    d, th = _polar(size, cx, cy, rng.uniform(0, np.pi), aspect)
    return d / (r * _radial_border(th, rng, amp, 4))


def _spot(img, mask, rng, px, py, pr, colour, reach=1.0, core=None):
    """A small round spot blended in a window around (px, py) rather than over the whole image.
    reach: alpha = clip(reach - d/pr); core: optional (colour, gain) for a pale centre."""
    s = img.shape[-1]
    x0, x1 = int(max(px - 2 * pr, 0)), int(min(px + 2 * pr + 1, s))
    y0, y1 = int(max(py - 2 * pr, 0)), int(min(py + 2 * pr + 1, s))
    if x0 >= x1 or y0 >= y1:
        return
    y, x = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dd = np.hypot(x - px, y - py) / (pr * (1 + 0.05 * rng.normal()))
    win = img[:, y0:y1, x0:x1]
    _blend(win, np.clip(reach - dd, 0, 1) ** 0.5, colour)
    if core is not None:
        _blend(win, np.clip(1 - dd * core[1], 0, 1), core[0])
    if mask is not None:  # wherever the spot is visibly painted
        mask[y0:y1, x0:x1] |= dd < reach


def _enfeksiyonel(img, rng, s, cx, cy, r, col):
    rel = _disc(s, cx, cy, r * 1.1, rng, amp=0.06, aspect=rng.uniform(1.0, 1.3))
    width = rng.uniform(0.22, 0.35)
    ring = np.clip(1 - np.abs(rel - (1 - width / 2)) / (width / 2), 0, 1) ** 0.7
    scale = _smooth_noise(rng, s, 48)
    _blend(img, ring * (0.75 + 0.25 * scale), col)
    _blend(img, (rel < 1 - width) * 0.18, col)  # faint tinted centre
    mask = (ring > 0.25) | (rel < 1)
    for _ in range(rng.integers(2, 6)):  # satellite pustules just outside the ring: part of the lesion
        a = rng.uniform(0, 2 * np.pi)
        px, py = cx + np.cos(a) * r * 1.35, cy + np.sin(a) * r * 1.35
        _spot(img, mask, rng, px, py, s * rng.uniform(0.02, 0.03), (236, 226, 180), reach=1.5)
    return mask


def _ekzama(img, rng, s, cx, cy, r, col):
    rel = _disc(s, cx, cy, r * 1.25, rng, amp=0.12, aspect=rng.uniform(1.0, 1.6))
    patches = _smooth_noise(rng, s, 7)
    alpha = np.clip((patches - 0.35) * 3, 0, 1) * np.clip(1.6 - rel, 0, 1)
    speckle = (_smooth_noise(rng, s, 40) > 0.6).astype(np.float32)  # coarse scale flakes
    _blend(img, alpha * 0.85, col)
    _blend(img, alpha * speckle * 0.7, (240, 228, 214))  # white scale
    return alpha > 0.1


def _akne(img, rng, s, cx, cy, r, col):
    mask = np.zeros((s, s), bool)
    for _ in range(rng.integers(6, 16)):
        a, rad = rng.uniform(0, 2 * np.pi), r * 1.5 * np.sqrt(rng.uniform(0, 1))
        px, py = cx + np.cos(a) * rad, cy + np.sin(a) * rad
        pustule = ((240, 232, 190), 3.5) if rng.random() < 0.3 else None
        _spot(img, mask, rng, px, py, s * rng.uniform(0.03, 0.055), col, core=pustule)
    return mask


def _pigment(img, rng, s, cx, cy, r, col):
    mask = np.zeros((s, s), bool)
    for k in range(rng.integers(2, 4)):  # several flat, elongated patches
        ox, oy = (0, 0) if k == 0 else rng.uniform(-1.4, 1.4, 2) * r
        rel = _disc(s, cx + ox, cy + oy, r * rng.uniform(0.5, 0.9), rng, amp=0.05,
                    aspect=rng.uniform(1.4, 2.2))
        _blend(img, np.clip((1 - rel) * 8, 0, 1) * 0.9, col)
        mask |= rel < 1
    return mask


def _benign(img, rng, s, cx, cy, r, col):
    rel = _disc(s, cx, cy, r, rng, amp=0.02, aspect=rng.uniform(1.0, 1.1))
    inside = np.clip((1 - rel) * 10, 0, 1)
    _blend(img, inside * (0.55 + 0.35 * np.clip(1 - rel, 0, 1)), col)
    _blend(img, np.clip((0.35 - rel) * 12, 0, 1) * 0.8, col * 0.45)  # dark symmetric centre
    step = s * rng.uniform(0.08, 0.11)  # regular globules on a grid, visible at 64 px
    y, x = _grid(s)
    glob = (np.cos(2 * np.pi * (x - cx) / step) * np.cos(2 * np.pi * (y - cy) / step)) > 0.6
    _blend(img, glob * inside * 0.7, col * 0.5)
    return rel < 1


def _malign(img, rng, s, cx, cy, r, col):
    rel = _disc(s, cx, cy, r * 1.05, rng, amp=0.28, aspect=rng.uniform(1.0, 1.5))
    rel = rel * (0.85 + 0.3 * _smooth_noise(rng, s, 10))
    inside = np.clip((1 - rel) * 6, 0, 1)
    _blend(img, inside * 0.9, col)
    blotch = _smooth_noise(rng, s, 9)
    for colour, lo, hi in (((45, 30, 30), 0.0, 0.3), ((90, 100, 130), 0.55, 0.7), ((170, 60, 60), 0.8, 1.0)):
        _blend(img, inside * ((blotch >= lo) & (blotch < hi)) * 0.8, colour)
    mask = rel < 1
    for _ in range(rng.integers(4, 12)):  # irregular peripheral dots: part of the lesion
        a = rng.uniform(0, 2 * np.pi)
        px, py = cx + np.cos(a) * r * rng.uniform(0.8, 1.3), cy + np.sin(a) * r * rng.uniform(0.8, 1.3)
        _spot(img, mask, rng, px, py, s * rng.uniform(0.015, 0.03), (40, 30, 35), reach=1.5)
    return mask


PAINTERS = (_enfeksiyonel, _ekzama, _akne, _pigment, _benign, _malign)


def _hairs(pil: Image.Image, rng: np.random.Generator) -> None:
    draw, s = ImageDraw.Draw(pil), pil.size[0]
    for _ in range(rng.integers(0, 6)):
        x, y, a = rng.uniform(0, s), rng.uniform(0, s), rng.uniform(0, np.pi)
        pts = []
        for _ in range(6):
            pts.append((x, y))
            a += rng.normal(0, 0.15)
            x, y = x + np.cos(a) * s / 8, y + np.sin(a) * s / 8
        shade = int(rng.uniform(20, 70))
        draw.line(pts, fill=(shade, shade - 5, shade - 10), width=int(rng.integers(1, 3)))


# Class-independent artefacts of dermoscopy photographs: surgical-marker ink and immersion-gel bubbles.
_INK = np.array([[70, 50, 120], [40, 60, 110], [90, 40, 90]], dtype=np.float32)


def _artefacts(img: np.ndarray, rng: np.random.Generator, s: int, lesion: np.ndarray, most: int) -> None:
    """1..`most` artefacts away from the lesion (never in its mask): ink blots (dark, saturated,
    stand out from the skin more than many lesions do) and gel bubbles (a bright rim with a
    highlight). They carry no class, so a faithful explanation should not point at them, while a
    map of what merely stands out from the skin will."""
    y, x = _grid(s)
    keep_out = np.asarray(Image.fromarray(lesion.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(9))) > 0
    for _ in range(rng.integers(1, most + 1)):
        ink = rng.random() < 0.6
        rad = s * (rng.uniform(0.035, 0.06) if ink else rng.uniform(0.05, 0.09))
        for _ in range(50):  # a place clear of the lesion
            px, py = rng.uniform(rad, s - rad, 2)
            d = np.hypot(x - px, y - py)
            if not (keep_out & (d < 1.5 * rad + 2)).any():
                break
        else:
            continue
        if ink:
            rel = d / (rad * _radial_border(np.arctan2(y - py, x - px), rng, 0.15, 3))
            _blend(img, np.clip((1 - rel) * 4, 0, 1) * 0.9, _INK[rng.integers(len(_INK))])
        else:
            _blend(img, np.clip(1 - np.abs(d - rad) / 1.2, 0, 1) * 0.6, (250, 250, 250))
            _blend(img, np.clip(1 - np.hypot(x - px + rad / 3, y - py + rad / 3) / (rad / 4), 0, 1), (255, 255, 255))


def _photograph(img: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """What the camera adds to the painted skin: sensor noise, hairs, sometimes blur."""
    size = img.shape[-1]
    img *= 1 + 0.03 * rng.standard_normal((1, size, size), dtype=np.float32)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8).transpose(1, 2, 0).copy(), "RGB")
    _hairs(pil, rng)
    blur = rng.uniform(0, 1.2)
    if blur > 0.6:
        pil = pil.filter(ImageFilter.GaussianBlur(blur))
    return pil


def make_sample(label: int, seed: int, index: int, size: int = 256, artefacts: int = 0) -> Sample:
    """One deterministic sample: the same (label, seed, index, size) gives the same pixels.
    `artefacts` > 0 adds 1..artefacts ink blots / gel bubbles away from the lesion, from their own
    random stream: the lesion, the skin and the mask are those of the same sample without them."""
    rng = np.random.default_rng([seed, label, index, size])
    img = _skin(rng, size)
    r = size * rng.uniform(0.13, 0.24)
    # anywhere the main disc fits: a map that always points at the image centre must not score
    # well on the pointing game (it hit 65% of lesions when they sat within 15% of the centre)
    cx, cy = size * 0.5 + rng.uniform(-1, 1, 2) * (size * 0.5 - 1.4 * r)
    mask = PAINTERS[label](img, rng, size, cx, cy, r, lesion_colour(rng))
    if artefacts:
        _artefacts(img, np.random.default_rng([seed, label, index, size, 1]), size, mask, artefacts)
    return Sample(_photograph(img, rng), Image.fromarray((mask * 255).astype(np.uint8), "L"), label)


# The random stream of lesion-free image `index` is [seed, LESION_FREE, index, size]: no class label
# takes this value, so these images never repeat a lesion image's skin.
LESION_FREE = 1000


def make_lesion_free(seed: int, index: int, size: int = 256, artefacts: int = 0) -> Image.Image:
    """Skin with every nuisance of `make_sample` (tone, lighting, texture, noise, hairs, blur and,
    when asked, ink blots / gel bubbles) and no lesion: evidence of no class."""
    rng = np.random.default_rng([seed, LESION_FREE, index, size])
    img = _skin(rng, size)
    if artefacts:
        _artefacts(img, np.random.default_rng([seed, LESION_FREE, index, size, 1]), size,
                   np.zeros((size, size), bool), artefacts)
    return _photograph(img, rng)


def jpeg_bytes(sample: Sample, seed: int, index: int) -> bytes:
    quality = int(np.random.default_rng([seed, sample.label, index, 7]).integers(70, 96))
    buf = io.BytesIO()
    sample.image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _split_of(i: int, n: int) -> str:
    edge = 0.0
    for name, frac in SPLITS:
        edge += frac
        if i < round(edge * n):
            return name
    return SPLITS[-1][0]


def _write_one(job: tuple) -> dict:
    out, label, name, i, per_class, size, seed, artefacts = job
    if label == LESION_FREE:
        split = _split_of(i, per_class)
        path = Path(out, LESION_FREE_DIR, split, f"skin_{i:05d}.jpg")
        quality = int(np.random.default_rng([seed, LESION_FREE, i, 7]).integers(70, 96))
        make_lesion_free(seed, i, size, artefacts).save(path, "JPEG", quality=quality)
        return {}
    split = _split_of(i, per_class)
    folder = f"{label + 1}. {name}"
    sample = make_sample(label, seed, i, size, artefacts)
    img_path = Path(out, split, folder, f"{name.lower()}_{i:05d}.jpg")
    mask_path = Path(out, "masks", split, folder, f"{name.lower()}_{i:05d}.png")
    img_path.write_bytes(jpeg_bytes(sample, seed, i))
    sample.mask.save(mask_path)
    return {"path": str(img_path.relative_to(out)), "label": name, "split": split,
            "mask": str(mask_path.relative_to(out))}


LESION_FREE_DIR = "lesion-free"


def write_dataset(out: str | Path, per_class: int = 200, size: int = 256, seed: int = 0,
                  workers: int = 1, progress: bool = True, artefacts: int = 0, lesion_free: int = 0) -> Path:
    """Write layout (a): out/{train,val,test}/N. Name/*.jpg, masks under out/masks, manifest.csv;
    with `lesion_free` > 0 also that many lesion-free skin images under out/lesion-free/{split}/
    (not in manifest.csv: `skin data scan --lesion-free` takes them)."""
    out = Path(out)
    if per_class < 3:
        raise ValueError("--per-class must be at least 3 (one image per split)")
    if lesion_free and lesion_free < 3:
        raise ValueError("--lesion-free must be 0 or at least 3 (one image per split)")
    for split, _ in SPLITS:
        for k, name in enumerate(DEFAULT_CLASSES):
            (out / split / f"{k + 1}. {name}").mkdir(parents=True, exist_ok=True)
            (out / "masks" / split / f"{k + 1}. {name}").mkdir(parents=True, exist_ok=True)
        if lesion_free:
            (out / LESION_FREE_DIR / split).mkdir(parents=True, exist_ok=True)
    jobs = [(str(out), k, name, i, per_class, size, seed, artefacts)
            for k, name in enumerate(DEFAULT_CLASSES) for i in range(per_class)]
    jobs += [(str(out), LESION_FREE, "", i, lesion_free, size, seed, artefacts) for i in range(lesion_free)]
    rows = [r for r in map_progress(_write_one, jobs, workers, "synth", "images", 200, progress) if r]
    with open(out / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "label", "split", "mask"])
        w.writeheader()
        w.writerows(rows)
    return out


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))
