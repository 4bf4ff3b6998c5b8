"""Occlusion sensitivity (Zeiler & Fergus 2014, as Captum's `Occlusion` and MONAI's `OcclusionSensitivity`):
grey out one square patch of the image at a time, on a sliding grid, and record how much the explained
class's probability drops; each pixel's value is the mean drop of the patches that cover it.

The map is the model's own answer to "what if this part were not there", so it follows the model by
construction (where grey patches are what the model is tested with); it costs one forward of every member
per patch position (`views`: 15 x 15 = 225 at the defaults), against about two for Grad-CAM. It is the
costlier, more faithful option for a reviewer (`cam_method=occlusion`, never a default).

The views are made on the image in [0, 1] before each member's own normalisation, so members of different
input sizes see the same patches (the grid is in shares of the side).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .faithfulness import IMAGENET_MEAN

ProbsOf = Callable[[torch.Tensor], torch.Tensor]
OCCLUSION = "occlusion"  # the name a request uses (cam_method=occlusion), beside skin.gradcam's methods


@dataclass(frozen=True)
class Grid:
    """Patches of `patch` of the side, every `stride` of the side (defaults: 1/8 every 1/16: 15 x 15)."""
    patch: float = 1 / 8
    stride: float = 1 / 16

    def boxes(self, h: int, w: int) -> list[tuple[int, int, int, int]]:
        """(top, left, bottom, right) of every patch, row by row."""
        ph, pw = max(1, round(self.patch * h)), max(1, round(self.patch * w))
        sh, sw = max(1, round(self.stride * h)), max(1, round(self.stride * w))
        tops = list(range(0, max(1, h - ph + 1), sh))
        lefts = list(range(0, max(1, w - pw + 1), sw))
        return [(t, l, t + ph, l + pw) for t in tops for l in lefts]


def views(x: torch.Tensor, grid: Grid = Grid(), fill: torch.Tensor | None = None) -> torch.Tensor:
    """(V, 3, H, W): one image `x` (3, H, W) with each patch of the grid filled with `fill` (per channel,
    default the ImageNet mean colour in x's range: x in [0, 1], or x.max() > 1 for uint8)."""
    _, h, w = x.shape
    if fill is None:
        scale = 255.0 if x.dtype == torch.uint8 else 1.0
        fill = (torch.tensor(IMAGENET_MEAN) * scale).round() if x.dtype == torch.uint8 else torch.tensor(IMAGENET_MEAN)
    fill = fill.to(x.dtype).view(3, 1, 1)
    boxes = grid.boxes(h, w)
    out = x.unsqueeze(0).repeat(len(boxes), 1, 1, 1)
    for i, (t, l, b, r) in enumerate(boxes):
        out[i, :, t:b, l:r] = fill
    return out


def accumulate(drops: torch.Tensor, size: tuple[int, int], grid: Grid = Grid()) -> torch.Tensor:
    """(H, W): each pixel's mean drop over the patches that cover it (0 where none does)."""
    h, w = size
    total, count = torch.zeros(h, w), torch.zeros(h, w)
    for d, (t, l, b, r) in zip(drops.float().cpu(), grid.boxes(h, w)):
        total[t:b, l:r] += d
        count[t:b, l:r] += 1
    return total / count.clamp_min(1)


def occlusion_maps(probs_of: ProbsOf, x: torch.Tensor, classes: torch.Tensor, grid: Grid = Grid(),
                   batch: int = 32) -> torch.Tensor:
    """(N, H, W) occlusion maps of images `x` (N, 3, H, W) in [0, 1] for the explained `classes` (N,):
    the drop of each class's probability (`probs_of`: images -> probabilities, e.g. the ensemble's) when
    each patch is greyed, normalised to [0, 1] (skin.gradcam.normalize: scale-free)."""
    from .gradcam import normalize
    out = []
    for img, c in zip(x, classes.long()):
        v = views(img, grid)
        with torch.inference_mode():
            base = probs_of(img[None]).float()[0, c]
            probs = torch.cat([probs_of(v[s:s + batch]).float() for s in range(0, len(v), batch)])
        out.append(accumulate(base - probs[:, c], tuple(img.shape[-2:]), grid))
    return normalize(torch.stack(out))  # signed: a patch whose greying raises the class ranks below one that does nothing


# ---------------------------------------------------------------- one photograph through an ensemble
# The same map for a photograph, whether the members run in this process (skin.ensemble.Predictor.occlusion)
# or behind Serve deployments (service.dataplane): the views are made once, on the uint8 image at the
# ensemble's work size, and resized to each member's input size; each member turns its views into
# probabilities in its own way; the ensemble's probabilities give the drops.

def member_views(x: torch.Tensor, sizes: dict[str, int], grid: Grid = Grid()) -> dict[str, torch.Tensor]:
    """{member: (1 + V, 3, s, s) uint8}: the image `x` (3, S, S) uint8 at the work size, then its V occluded
    views, at each member's input size `s` (antialiased resize where s != S)."""
    stack = torch.cat([x[None], views(x, grid)])
    out, by_size = {}, {}
    for name, s in sizes.items():
        if s not in by_size:
            by_size[s] = stack if s == x.shape[-1] else torch.nn.functional.interpolate(
                stack.float(), size=(s, s), mode="bilinear", antialias=True, align_corners=False
            ).round().clamp(0, 255).to(torch.uint8)
        out[name] = by_size[s]
    return out


def map_from_probs(probs: torch.Tensor, class_index: int, size: tuple[int, int], grid: Grid = Grid()) -> torch.Tensor:
    """(H, W) in [0, 1]: the occlusion map from the ensemble's probabilities (1 + V, C) of the image and its
    views (member_views' order), on the grid of the work `size`."""
    from .gradcam import normalize
    p = probs.float()
    return normalize(accumulate(p[0, class_index] - p[1:, class_index], size, grid)[None])[0]


def cost(grid: Grid = Grid(), side: int = 224) -> int:
    """Forwards of each member for one photograph's occlusion map (the image and its views)."""
    return 1 + len(grid.boxes(side, side))
