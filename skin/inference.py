"""The one member-inference path: a prepared batch -> a member's logits, its temperature-scaled
probabilities and, on request, every class's Grad-CAM map.

Prediction (`skin.ensemble.Predictor`), explanation, evaluation (`skin.evaluation.BatchScorer`),
batch inference (`skin.batch`), training's validation (`skin.train.score_loader`, T = 1) and the
Serve member all call it, so a member answers the same wherever it runs. The backbone runs in
bf16 where the member's `amp` says so (`skin.device`); the pooled features, the head and the
maps always run in fp32.
"""
from __future__ import annotations

import numpy as np
import torch

from .device import autocast, configure_device
from .gradcam import GradCAM, check_cam_method, check_cam_smooth, flip_smoothed
from .registry import Member, restride


def member_logits(member: Member, x: torch.Tensor, bf16: bool = False) -> torch.Tensor:
    """Logits (fp32) of a prepared batch: the backbone under bf16 autocast when asked, the head in fp32."""
    with autocast(x.device, bf16):
        feats = member.forward_features(x)
    return member.forward_head(member.pool(feats.float()))


def calibrated(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Temperature-scaled softmax (Guo et al. 2017): the member's probabilities as the bundle serves them."""
    return torch.softmax(logits.float() / temperature, dim=-1)


class MemberRunner:
    """One member ready to answer: in eval mode on its device, with its temperature and precision.

        run = MemberRunner(member, temperature=1.3, amp="off", cam_stride=8)
        probs, maps = run(x, cam=True)      # (B, C) numpy, (B, C, h, w) tensor on the CPU

    `cam_stride` (8/16/32; default: the member's trained stride) sets the resolution of the maps
    only: they come from the same weights with dilated last stages (skin.registry.restride),
    weighted by the trained member's gradients, while the probabilities stay the trained stride's.
    `cam_layer` (default: the layer feeding the pooling, the one-pass path) takes the maps at another
    layer of that model instead, by Grad-CAM's general path (its own gradients, one backward per
    class): for members whose last stage gathers the evidence away from where it lies.
    `cam_method`: "gradcam" (default) or "layercam" (skin.gradcam): how the gradient weighs the
    feature map; the answer never depends on it.
    `cam_smooth`: "none" (default) or "flips": each map is the mean of the maps of the image's four
    flips, each normalised and flipped back (skin.gradcam.flip_smoothed); the answer is the
    unflipped image's, exactly.
    """

    def __init__(self, member: Member, temperature: float = 1.0, amp: str = "off",
                 cam_stride: int | None = None, cam_layer: str | None = None, cam_method: str = "gradcam",
                 cam_smooth: str = "none") -> None:
        check_cam_method(cam_method)
        self.cam_smooth = check_cam_smooth(cam_smooth)
        if member.training:
            raise RuntimeError(f"member {member.spec.name} is in training mode; call .eval() first")
        self.member = member
        self.cam_member = restride(member, cam_stride) if cam_stride else member
        self.cam_layer = cam_layer if cam_layer and cam_layer != member.spec.cam_layer else None
        if self.cam_layer:
            self.cam_member.get_submodule(self.cam_layer)  # fails here, not at the first request
        self.cam_method = cam_method
        self.temperature = float(temperature)
        self.device = next(member.parameters()).device
        self.bf16 = configure_device(self.device, amp)  # False where the device lacks native bf16

    @classmethod
    def from_bundle(cls, bundle, name: str, device: str | torch.device = "cpu", amp: str = "off",
                    cam_stride: int | None = None, member: Member | None = None,
                    cam_smooth: str | None = None) -> "MemberRunner":
        """A bundle's member (loaded, unless given) with its temperature; maps at `cam_stride`, else
        at the bundle's stored explanation stride for it, else at its trained stride; smoothed by
        `cam_smooth`, else by the bundle's stored smoothing for it."""
        member = (member if member is not None else bundle.load_member(name)).to(device).eval()
        e = bundle.entry(name)
        return cls(member, e.temperature, amp, cam_stride or e.cam_stride, e.cam_layer, e.cam_method or "gradcam",
                   cam_smooth or e.cam_smooth or "none")

    @property
    def cam_stride(self) -> int:
        return self.cam_member.output_stride

    def __call__(self, x: torch.Tensor, cam: bool = False) -> tuple[np.ndarray, torch.Tensor | None]:
        x = x.to(self.device)
        if cam:
            logits, maps = self._maps(x, answer=True)
            if self.cam_smooth == "flips":  # the flipped views give maps only, never the answer
                maps = flip_smoothed(lambda v: self._maps(v, answer=False)[1], x, maps)
            maps = maps.cpu()
        else:
            with torch.inference_mode():
                logits, maps = member_logits(self.member, x, self.bf16), None
        return calibrated(logits, self.temperature).cpu().numpy(), maps

    def class_maps(self, x: torch.Tensor, classes) -> torch.Tensor:
        """Each image's map of one class, (B, h, w) on the CPU: `self(x, cam=True)[1][i, classes[i]]`,
        at one backward on the general path instead of one per class (what scoring a map needs)."""
        x, classes = x.to(self.device), torch.as_tensor(np.asarray(classes), device=self.device).long()
        maps = self._maps(x, answer=False, classes=classes)[1]
        if self.cam_smooth == "flips":
            maps = flip_smoothed(lambda v: self._maps(v, answer=False, classes=classes.repeat(len(v) // len(x)))[1],
                                 x, maps)
        return maps[:, 0].cpu()

    def _maps(self, x: torch.Tensor, answer: bool, classes: torch.Tensor | None = None
              ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(logits of the trained member, or None unless `answer`; every class's maps, or with `classes`
        (B,) each image's map of its class, (B, 1, h, w))."""
        if self.cam_layer:  # the answer from the trained member, the maps by the general path
            logits = None
            if answer:
                with torch.inference_mode():
                    logits = member_logits(self.member, x, self.bf16)
            with GradCAM(self.cam_member, layer=self.cam_layer, fast=False, method=self.cam_method) as g, autocast(x.device, self.bf16):
                return logits, g(x, classes)[1]
        # one pass (+ the dense pass at a finer cam_stride) and the head's Jacobian: all classes' maps
        with GradCAM(self.member, dense=self.cam_member, method=self.cam_method) as g, autocast(x.device, self.bf16):
            return g(x, classes)
