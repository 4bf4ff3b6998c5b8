"""How faithful an explanation map is to the model, without lesion masks: perturb the image in the
map's order and watch the explained class's probability.

- **Deletion / insertion** (Petsiuk et al. 2018, RISE, sec. 4.1): remove the most salient pixels
  first (replaced by a constant: the ImageNet mean colour, "zero" after normalisation) and take the
  area under the class-probability curve (lower: the map found what the answer rests on); or reveal
  them first onto a blurred copy of the image (higher is better). `steps` fractions from 0 to 1;
  the curve's ends do not depend on the map (the image itself, all grey, all blurred).
- **ROAD** (Rong et al. 2022, ICML): remove a share of pixels, most relevant first (MoRF) or least
  relevant first (LeRF), filling them by noisy linear imputation from their neighbours (so the
  removal itself leaks no shape); the score is the mean over shares of (LeRF drop − MoRF drop) / 2,
  i.e. pytorch-grad-cam's `ROADCombined` (tested equal with the noise off). Higher is better.

Every function takes `probs_of`: a batch of images (N, 3, H, W) in [0, 1] -> probabilities (N, C),
so the same code scores one member (its own preset inside) or the ensemble (skin.ensemble's
weighted average), on the CPU or a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

ProbsOf = Callable[[torch.Tensor], torch.Tensor]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
ROAD_SHARES = (20, 50, 80)  # percent of pixels removed; pytorch-grad-cam's default is 10..90 by 10
METRICS = ("deletion", "insertion", "road")
BETTER = {"deletion": "lower", "insertion": "higher", "road": "higher"}


@dataclass(frozen=True)
class PerturbationConfig:
    steps: int = 8  # deletion / insertion: fractions 0, 1/steps, ..., 1
    road_shares: tuple[int, ...] = ROAD_SHARES
    road_noise: float = 0.01  # absolute noise of the imputation, on [0, 1] pixels (ROAD's 0.01)
    blur_sigma: float = 5.0 / 224  # insertion's canvas: Gaussian blur, sigma as a share of the side (RISE: 5 px at 224)
    batch: int = 32  # perturbed images per forward call at 224 px (bounds memory); more at a smaller size


def auc(curve: torch.Tensor) -> torch.Tensor:
    """Trapezoid area under curves sampled at evenly spaced fractions of [0, 1] (last dim)."""
    return (curve.sum(-1) - (curve[..., 0] + curve[..., -1]) / 2) / (curve.shape[-1] - 1)


def _class_probs(probs_of: ProbsOf, images: torch.Tensor, classes: torch.Tensor, batch: int) -> torch.Tensor:
    """probs_of over `images` in chunks of `batch`, each image's probability of its class in `classes`."""
    out = []
    for s in range(0, len(images), batch):
        with torch.inference_mode():
            p = probs_of(images[s:s + batch])
        out.append(p.gather(1, classes[s:s + batch].view(-1, 1).to(p.device))[:, 0].float().cpu())
    return torch.cat(out)


def blurred(x: torch.Tensor, sigma_share: float) -> torch.Tensor:
    """Gaussian blur of (N, 3, H, W), sigma = sigma_share x the shorter side (reflect padding)."""
    sigma = max(sigma_share * min(x.shape[-2:]), 0.5)
    k = int(2 * round(3 * sigma) + 1)
    t = torch.arange(k, dtype=x.dtype, device=x.device) - k // 2
    g = torch.exp(-t ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    c = x.shape[1]
    pad = k // 2
    y = F.pad(x, (pad, pad, 0, 0), mode="reflect" if pad < x.shape[-1] else "replicate")
    y = F.conv2d(y, g.view(1, 1, 1, k).repeat(c, 1, 1, 1), groups=c)
    y = F.pad(y, (0, 0, pad, pad), mode="reflect" if pad < x.shape[-2] else "replicate")
    return F.conv2d(y, g.view(1, 1, k, 1).repeat(c, 1, 1, 1), groups=c)


def _ranks(saliency: torch.Tensor) -> torch.Tensor:
    """(N, H, W) -> each pixel's rank, 0 = most salient (ties broken by position, stably)."""
    flat = saliency.flatten(1)
    order = torch.argsort(-flat, dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1]).expand_as(order))
    return ranks.view_as(saliency)


def deletion_insertion(probs_of: ProbsOf, x: torch.Tensor, saliency: torch.Tensor, classes: torch.Tensor,
                       cfg: PerturbationConfig = PerturbationConfig()) -> dict[str, torch.Tensor]:
    """Deletion and insertion AUCs (N,) of maps `saliency` (N, H, W) for images `x` (N, 3, H, W) in
    [0, 1] and the explained `classes` (N,); also their curves (N, steps + 1)."""
    n, _, h, w = x.shape
    saliency = _resized(saliency, (h, w))
    ranks = _ranks(saliency).unsqueeze(1)  # (N, 1, H, W)
    grey = torch.tensor(IMAGENET_MEAN, dtype=x.dtype).view(1, 3, 1, 1).expand_as(x)
    canvas = blurred(x, cfg.blur_sigma)
    fractions = [k / cfg.steps for k in range(cfg.steps + 1)]
    inner = fractions[1:-1]  # the ends do not depend on the map
    views = []
    for f in inner:
        top = ranks < round(f * h * w)  # the most salient share f
        views.append(torch.where(top, grey, x))  # deletion: those removed
        views.append(torch.where(top, x, canvas))  # insertion: those revealed
    cls = classes.long()
    ends = _class_probs(probs_of, torch.cat([x, grey[:1].expand_as(x), canvas]), cls.repeat(3), cfg.batch).view(3, n)
    if views:
        stacked = torch.stack(views, 1).flatten(0, 1)  # image-major: (N * 2 * len(inner), 3, H, W)
        mid = _class_probs(probs_of, stacked, cls.repeat_interleave(2 * len(inner)), cfg.batch)
        mid = mid.view(n, len(inner), 2)
    else:
        mid = torch.zeros(n, 0, 2)
    deletion = torch.cat([ends[0][:, None], mid[..., 0], ends[1][:, None]], 1)
    insertion = torch.cat([ends[2][:, None], mid[..., 1], ends[0][:, None]], 1)
    return {"deletion": auc(deletion), "insertion": auc(insertion),
            "deletion_curve": deletion, "insertion_curve": insertion}


def _resized(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    maps = maps.float()
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


# --------------------------------------------------------------------------- ROAD
_NEIGHBOURS = (((1, 1), 1 / 12), ((0, 1), 1 / 6), ((-1, 1), 1 / 12), ((1, -1), 1 / 12),
               ((0, -1), 1 / 6), ((-1, -1), 1 / 12), ((1, 0), 1 / 6), ((-1, 0), 1 / 6))  # ROAD's weights


def impute(x: torch.Tensor, keep: torch.Tensor, noise: float = 0.01,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """ROAD's noisy linear imputation of one image (3, H, W): every pixel where `keep` (H, W) is
    False becomes the weighted mean of its 8 neighbours (1/6 edge, 1/12 corner; the weights of
    neighbours outside the image dropped), solved jointly for all removed pixels as one sparse linear
    system, plus N(0, noise) noise."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.linalg import spsolve
    c, h, w = x.shape
    keep_flat = keep.reshape(-1).cpu().numpy().astype(bool)
    missing = np.flatnonzero(~keep_flat)
    if len(missing) == 0:
        return x.clone()
    img = x.reshape(c, -1).double().cpu().numpy()
    var = np.full(h * w, -1)
    var[missing] = np.arange(len(missing))
    yy, xx = missing // w, missing % w
    rows, cols, vals = [np.arange(len(missing))], [np.arange(len(missing))], []
    diag = np.zeros(len(missing))
    rhs = np.zeros((len(missing), c))
    for (dy, dx), weight in _NEIGHBOURS:
        ny, nx = yy + dy, xx + dx
        inside = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
        diag[inside] += weight  # weights of neighbours outside the image are dropped
        idx = np.flatnonzero(inside)
        nb = ny[idx] * w + nx[idx]
        known = keep_flat[nb]
        rhs[idx[known]] -= weight * img[:, nb[known]].T
        rows.append(idx[~known])
        cols.append(var[nb[~known]])
        vals.append(np.full(int((~known).sum()), weight))
    vals = [-diag] + vals
    a = coo_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                   shape=(len(missing), len(missing))).tocsc()
    solved = torch.from_numpy(np.asarray(spsolve(a, rhs)).reshape(len(missing), c)).to(x.dtype)
    out = x.reshape(c, -1).clone().cpu()
    fill = solved.T
    if noise:
        fill = fill + noise * torch.randn(fill.shape, generator=generator, dtype=fill.dtype)
    out[:, torch.from_numpy(missing)] = fill
    return out.reshape(c, h, w).to(x.device)


def road(probs_of: ProbsOf, x: torch.Tensor, saliency: torch.Tensor, classes: torch.Tensor,
         cfg: PerturbationConfig = PerturbationConfig(), seed: int = 0) -> dict[str, torch.Tensor]:
    """ROAD (N,): mean over `cfg.road_shares` of (LeRF - MoRF) / 2, each the change of the explained
    class's probability when that share of pixels is imputed, least / most relevant first; also the
    per-share changes "morf" and "lerf" (N, shares). Thresholds as pytorch-grad-cam's: MoRF at share
    s removes the pixels at or above the (100 - s)-th percentile of the map, LeRF those at or below
    the s-th."""
    n, _, h, w = x.shape
    saliency = _resized(saliency, (h, w)).cpu().numpy()
    gen = torch.Generator().manual_seed(seed)
    views = []
    for i in range(n):
        m = saliency[i]
        for s in cfg.road_shares:
            keep_morf = m < np.percentile(m, 100 - s)  # keep all but the most relevant s %
            keep_lerf = (1 - m) < np.percentile(1 - m, 100 - s)  # keep all but the least relevant s %
            views.append(impute(x[i], torch.from_numpy(keep_morf), cfg.road_noise, gen))
            views.append(impute(x[i], torch.from_numpy(keep_lerf), cfg.road_noise, gen))
    cls = classes.long()
    base = _class_probs(probs_of, x, cls, cfg.batch)
    k = len(cfg.road_shares)
    after = _class_probs(probs_of, torch.stack(views), cls.repeat_interleave(2 * k), cfg.batch).view(n, k, 2)
    morf, lerf = after[..., 0] - base[:, None], after[..., 1] - base[:, None]
    return {"road": ((lerf - morf) / 2).mean(1), "morf": morf, "lerf": lerf}


def scores(probs_of: ProbsOf, x: torch.Tensor, saliency: torch.Tensor, classes: torch.Tensor,
           cfg: PerturbationConfig = PerturbationConfig(), seed: int = 0) -> dict[str, torch.Tensor]:
    """{"deletion", "insertion", "road"}: (N,) each, for maps `saliency` of images `x` in [0, 1]."""
    di = deletion_insertion(probs_of, x, saliency, classes, cfg)
    return {"deletion": di["deletion"], "insertion": di["insertion"],
            "road": road(probs_of, x, saliency, classes, cfg, seed)["road"]}


def random_maps(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Maps that know nothing: uniform noise of the given (N, h, w) shape, seeded."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- many maps, shared forwards
ENSEMBLE = "ensemble"  # the target that is the ensemble's weighted answer (skin.ensemble.combine)


def score_maps(member_probs_of: dict[str, ProbsOf], combine: Callable[[dict[str, torch.Tensor]], torch.Tensor],
               x: torch.Tensor, maps: dict[str, tuple[torch.Tensor, tuple[str, ...]]], classes: torch.Tensor,
               cfg: PerturbationConfig = PerturbationConfig(), seed: int = 0
               ) -> dict[tuple[str, str], dict[str, torch.Tensor]]:
    """Deletion, insertion and ROAD of many maps of the same images `x` (N, 3, H, W) in [0, 1], each for the
    targets that use it: the ensemble (ENSEMBLE: `combine` of every member's probabilities) or a member by
    name (`member_probs_of[name]`). `maps`: {name: (saliency (N, h, w), targets)}. Returns {(map name,
    target): {"deletion", "insertion", "road": (N,)}}, equal to `scores` of each pair.

    The forwards are shared: the unperturbed ends (the image, all grey, all blurred) are computed once for
    all maps and targets; a map's perturbed views (its deletion and insertion steps and ROAD's imputations)
    once, run through only the members its targets need (all of them for the ensemble), and every target of
    that map reads its probabilities from the same member outputs. A map that knows no model (random,
    centre, colour contrast) serves the ensemble and every member with one set of forwards."""
    n, _, h, w = x.shape
    members = list(member_probs_of)
    cls = classes.long()
    grey = torch.tensor(IMAGENET_MEAN, dtype=x.dtype).view(1, 3, 1, 1).expand_as(x)
    canvas = blurred(x, cfg.blur_sigma)
    ends = {m: _member_probs(member_probs_of[m], torch.cat([x, grey, canvas]), cfg.batch) for m in members}
    inner = [k / cfg.steps for k in range(1, cfg.steps)]
    k = len(cfg.road_shares)
    out: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for name, (saliency, targets) in maps.items():
        saliency = _resized(saliency, (h, w))
        ranks = _ranks(saliency).unsqueeze(1)
        views = []
        for f in inner:
            top = ranks < round(f * h * w)
            views.append(torch.where(top, grey, x))  # deletion: the most salient share f removed
            views.append(torch.where(top, x, canvas))  # insertion: revealed on the blurred copy
        gen = torch.Generator().manual_seed(seed)
        road_views = []
        sal = saliency.cpu().numpy()
        for i in range(n):
            for s in cfg.road_shares:
                road_views.append(impute(x[i], torch.from_numpy(sal[i] < np.percentile(sal[i], 100 - s)),
                                         cfg.road_noise, gen))
                road_views.append(impute(x[i], torch.from_numpy((1 - sal[i]) < np.percentile(1 - sal[i], 100 - s)),
                                         cfg.road_noise, gen))
        di = torch.stack(views, 1).flatten(0, 1) if views else x[:0]  # image-major: (N * 2 * len(inner), ...)
        batch = torch.cat([di, torch.stack(road_views)])
        needed = members if ENSEMBLE in targets else [m for m in members if m in targets]
        probs = {m: _member_probs(member_probs_of[m], batch, cfg.batch) for m in needed}
        for target in targets:
            if target == ENSEMBLE:
                p_end, p_all = combine(ends), combine(probs)
            else:
                p_end, p_all = ends[target], probs[target]
            end = p_end.gather(1, cls.repeat(3).view(-1, 1))[:, 0].view(3, n)
            per = len(inner) * 2
            mid = p_all[:n * per].gather(1, cls.repeat_interleave(per).view(-1, 1))[:, 0].view(n, len(inner), 2)
            after = p_all[n * per:].gather(1, cls.repeat_interleave(2 * k).view(-1, 1))[:, 0].view(n, k, 2)
            deletion = torch.cat([end[0][:, None], mid[..., 0], end[1][:, None]], 1)
            insertion = torch.cat([end[2][:, None], mid[..., 1], end[0][:, None]], 1)
            morf, lerf = after[..., 0] - end[0][:, None], after[..., 1] - end[0][:, None]
            out[(name, target)] = {"deletion": auc(deletion), "insertion": auc(insertion),
                                   "road": ((lerf - morf) / 2).mean(1)}
    return out


def _member_probs(probs_of: ProbsOf, images: torch.Tensor, batch: int) -> torch.Tensor:
    """A member's probabilities (N, C) of `images`, in chunks of `batch` at 224 px (proportionally more for
    smaller images: the same memory), on the CPU in float."""
    batch = max(batch, int(batch * 224 * 224 / (images.shape[-1] * images.shape[-2])))
    parts = []
    for s in range(0, len(images), batch):
        with torch.inference_mode():
            parts.append(probs_of(images[s:s + batch]).float().cpu())
    return torch.cat(parts)


def centre_maps(n: int, size: tuple[int, int]) -> torch.Tensor:
    """Maps that know no model and no image: highest at the image centre, falling off with the distance
    from it (what a photographer's framing alone predicts), (n, H, W) in [0, 1]."""
    h, w = size
    yy = (torch.arange(h, dtype=torch.float32) + 0.5) / h - 0.5
    xx = (torch.arange(w, dtype=torch.float32) + 0.5) / w - 0.5
    r = torch.sqrt(yy[:, None] ** 2 + xx[None, :] ** 2)
    return (1 - r / r.max()).expand(n, h, w).clone()
