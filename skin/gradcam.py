"""Grad-CAM (Selvaraju et al. 2017) for every class from one forward pass.

Grad-CAM weighs the channels of a feature map A (K x h x w) by the spatial mean of the class
score's gradient, alpha_k^c = mean_ij dy^c/dA_kij (eq. 1), and keeps ReLU(sum_k alpha_k^c A_k)
(eq. 2). When A is followed directly by global average pooling z = mean_ij A and a head y = f(z),
dy^c/dA_kij = (1/hw) df^c/dz_k for every (i, j): the gradient is spatially constant, so
alpha^c = (1/hw) J_f(z)[c], the Jacobian of the head at the pooled vector. All classes then cost
one forward pass plus a Jacobian of the small head: no backward pass through the backbone.

`GradCAM` implements that fast path and the general autograd path (any layer, one backward per
class) and picks the fast one where the member's spec says the structure allows it.

`method="layercam"` is LayerCAM (Jiang et al. 2021, IEEE TIP 30:5875): each position's channels
weighed by that position's positive gradient, ReLU(sum_k ReLU(dy^c/dA_kij) A_kij), instead of one
spatial mean per channel. At the layer feeding the pooling the gradient is spatially constant, so
LayerCAM is Grad-CAM with ReLU'd weights and keeps the one-pass path; at a shallower layer (where
Grad-CAM's spatial mean mixes the gradient of the lesion with that of the skin around it) the two
differ, and LayerCAM is the variant its authors built for such layers.

`smooth="flips"` (`flip_smoothed`) averages a member's maps over the four flips of the image
(none, left-right, up-down, both), each map min-max normalised and flipped back: test-time
augmentation of the explanation (pytorch-grad-cam's `aug_smooth`, here with the flips our members
are trained to ignore). The answer is never taken from a flipped view. The map
maths of the ensemble (upsample, normalise, weighted average) lives here too; pictures for
people are `skin.render`'s, and how well maps point at lesions is `skin.metrics`'.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .registry import Member

CAM_METHODS = ("gradcam", "layercam")
CAM_SMOOTHS = ("none", "flips")
FLIPS = ((), (-1,), (-2,), (-2, -1))  # the image's dims each view flips: none, left-right, up-down, both
_METHOD_NAMES = {"gradcam": "Grad-CAM", "layercam": "LayerCAM"}


def check_cam_method(method: str) -> str:
    """`method` is one of CAM_METHODS, else ValueError saying which ones are."""
    if method not in CAM_METHODS:
        raise ValueError(f"explanation method must be one of {', '.join(CAM_METHODS)}, got {method!r}")
    return method


def flip_smoothed(maps_of: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                  maps: torch.Tensor) -> torch.Tensor:
    """The mean over the four flips of x of each class's map, each min-max normalised and flipped
    back onto x. `maps` (B, C, h, w) are x's own; `maps_of` gives the maps of a batch (the flipped
    views go through it as one batch of 3B). Equal to pytorch-grad-cam's aug_smooth with
    ttach's HorizontalFlip + VerticalFlip, at the maps' resolution (tested)."""
    b, views = len(x), maps_of(torch.cat([x.flip(d) for d in FLIPS[1:]]))
    out = normalize(maps)
    for k, dims in enumerate(FLIPS[1:]):
        out += normalize(views[k * b:(k + 1) * b].flip(dims))
    return out / len(FLIPS)


def method_name(methods, smooths=None) -> str:
    """What the maps are, for people: Grad-CAM, LayerCAM, or both (members may differ), "(flip-averaged)"
    when `smooths` (one value or the members') is "flips" for every member, "(partly flip-averaged)" for some."""
    name = " / ".join(_METHOD_NAMES.get(m, m) for m in sorted({methods} if isinstance(methods, str) else set(methods)))
    flips = [s == "flips" for s in ([smooths] if smooths is None or isinstance(smooths, str) else list(smooths))]
    return name + (" (flip-averaged)" if all(flips) else " (partly flip-averaged)" if any(flips) else "")


class GradCAM:
    """Grad-CAM maps of all classes at feature resolution, as a context manager whose hooks are
    always released. The member must be in eval mode (dropout and BatchNorm in the head would
    otherwise make the maps random); we never switch modes behind the caller's back.

        with GradCAM(member) as cam:
            logits, maps = cam(x)          # (B, C), (B, C, h, w)
    """

    def __init__(self, member: Member, layer: str | None = None, fast: bool | None = None,
                 dense: Member | None = None, method: str = "gradcam",
                 features: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 dense_features: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.member, self.method = member, check_cam_method(method)
        # the one-pass path's feature passes, when the caller runs them otherwise (skin.graphs: compiled)
        self.features = features or member.forward_features
        # `dense`: the same weights at a finer output stride (skin.registry.restride). The logits and
        # the channel weights alpha (the head's Jacobian) stay the trained member's; eq. 2 is applied
        # to the dense feature map: a higher-resolution view of the same decision.
        self.dense = dense if dense is not None and dense is not member else None
        self.dense_features = None if self.dense is None else (dense_features or self.dense.forward_features)
        self.layer_name = layer or member.spec.cam_layer
        structure_allows = member.spec.cam_fast_path and self.layer_name == member.spec.cam_layer
        if fast and not structure_allows:
            raise ValueError(f"the one-pass path needs the layer feeding global average pooling "
                             f"({member.spec.cam_layer}); {self.layer_name} is not it")
        self.fast = structure_allows if fast is None else fast
        if self.dense is not None and not self.fast:
            raise ValueError("a dense explanation map needs the one-pass path (the layer feeding global average pooling)")
        self.layer = member.get_submodule(self.layer_name)  # fails loudly on a wrong path
        self._handles: list = []
        self._activation: torch.Tensor | None = None

    def __enter__(self) -> "GradCAM":
        if not self.fast:
            self._handles.append(self.layer.register_forward_hook(self._keep))
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._activation = None

    def _keep(self, module, inputs, output) -> None:
        self._activation = output

    def __call__(self, x: torch.Tensor, classes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, C), maps (B, C, h, w)); with `classes` (B,), each image's map of its class only,
        (B, 1, h, w): one backward on the general path instead of C."""
        if self.member.training:
            raise RuntimeError("GradCAM needs the member in eval mode: call member.eval() first")
        if self.fast:
            logits, maps = self._fast(x)
            if classes is not None:
                maps = maps.gather(1, classes.view(-1, 1, 1, 1).to(maps.device).expand(-1, 1, *maps.shape[-2:]))
            return logits, maps
        return self._general(x, classes)

    def _fast(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            feats = self.features(x).float()  # bf16 maps are cast to float
            cam_feats = feats if self.dense is None else self.dense_features(x).float()
        h, w = feats.shape[-2:]
        with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):  # the small head in fp32
            z = self.member.pool(feats).detach().requires_grad_(True)
            logits = self.member.forward_head(z)
            c = logits.shape[1]
            eye = torch.eye(c, device=x.device, dtype=logits.dtype)[:, None, :].expand(c, *logits.shape)
            (jac,) = torch.autograd.grad(logits, z, grad_outputs=eye, is_grads_batched=True)  # (C, B, K)
            weights = jac.permute(1, 0, 2) / (h * w)  # (B, C, K): alpha of eq. 1
            if self.method == "layercam":  # the same gradient at every position: ReLU(grad) = ReLU(alpha)
                weights = torch.relu(weights)
            maps = torch.relu(torch.einsum("bck,bkhw->bchw", weights, cam_feats))
        return logits.detach(), maps.detach()

    def _general(self, x: torch.Tensor, classes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._handles:
            raise RuntimeError("use the general path inside `with GradCAM(...) as cam:`")
        with torch.enable_grad():
            logits = self.member(x)
            act = self._activation
            maps = []
            # one backward per class, or one in all when each image asks for one class: an image's score
            # depends on its own activations only (eval mode), so the gradient of the sum is each one's
            targets = [logits[:, c] for c in range(logits.shape[1])] if classes is None else \
                [logits.gather(1, classes.view(-1, 1).to(logits.device))[:, 0]]
            for target in targets:
                (grad,) = torch.autograd.grad(target.sum(), act, retain_graph=True)
                maps.append(weigh(act, grad, self.method))
        self._activation = None
        return logits.detach(), torch.stack(maps, 1).detach()


def weigh(activation: torch.Tensor, grad: torch.Tensor, method: str = "gradcam") -> torch.Tensor:
    """(B, K, h, w) feature map and the class score's gradient at it -> (B, h, w) map: Grad-CAM
    weighs each channel by its gradient's spatial mean (eq. 1-2), LayerCAM each position by its
    positive gradient."""
    grad = grad.float()
    alpha = torch.relu(grad) if method == "layercam" else grad.mean(dim=(2, 3), keepdim=True)
    return torch.relu((alpha * activation.float()).sum(1))


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (..., h, w) maps to size = (H, W)."""
    lead = maps.shape[:-2]
    out = F.interpolate(maps.reshape(-1, 1, *maps.shape[-2:]).float(), size=size, mode="bilinear",
                        align_corners=False)
    return out.reshape(*lead, *size)


def normalize(maps: torch.Tensor, rel: float = 1e-6) -> torch.Tensor:
    """Min-max each map to [0, 1]; one whose span is within float noise of its values (`rel` of its
    largest magnitude) is flat and becomes zeros. Independent of the map's scale: an absolute
    epsilon (pytorch-grad-cam's 1e-7) squeezes a map whose values are all small (an untrained
    member's: spans of 1e-8 are usual) below 1, which weighed it down in an ensemble map."""
    flat = maps.flatten(-2).float()
    lo = flat.min(-1, keepdim=True).values
    hi = flat.max(-1, keepdim=True).values
    span = hi - lo
    flat_map = span <= rel * torch.maximum(hi.abs(), lo.abs())
    out = (flat - lo) / torch.where(flat_map, torch.ones_like(span), span)
    return out.masked_fill(flat_map, 0.0).reshape(maps.shape)


def ensemble_map(member_maps: Mapping[str, torch.Tensor], weights: Mapping[str, float],
                 size: tuple[int, int], work: tuple[int, int] | None = None) -> np.ndarray:
    """Each member's (h, w) map for the ensemble's class, upsampled to `work` (the members' input
    size; default `size`), normalised per member, averaged with the ensemble weights
    (renormalised over the members given), then resized once to `size` (the image)."""
    work = tuple(work or size)
    total = sum(weights[n] for n in member_maps)
    acc = torch.zeros(work)
    for name, m in member_maps.items():
        acc += weights[name] / total * normalize(upsample(m[None], work)[0])
    if work != tuple(size):
        acc = upsample(acc[None], size)[0]
    return acc.clamp(0, 1).numpy()


def input_size(members: Mapping[str, "Member"] | Sequence[int]) -> tuple[int, int]:
    """The work size of the ensemble map: the largest member input size, square (the eval
    preset resizes the whole image to a square, so this grid covers the whole photograph)."""
    sizes = [m.data_config.input_size for m in members.values()] if isinstance(members, Mapping) else list(members)
    return (max(sizes), max(sizes))
