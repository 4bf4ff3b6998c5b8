"""Ensemble inference in-process (no Ray): members' temperature-scaled softmax probabilities,
averaged with the bundle's weights, in the JSON shape the HTTP API returns."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from .bundle import Bundle
from .device import autocast, configure_device
from .presets import to_batch
from .registry import Member

UNCERTAIN_BELOW = 0.5  # ensemble confidence under this is flagged for a second look


def softmax(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return torch.softmax(logits.float() / temperature, dim=-1)


def combine(member_probs: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> np.ndarray:
    """Weighted average of member probabilities; weights are renormalised over the members given
    (so a degraded answer from fewer members is still a distribution)."""
    total = sum(weights[n] for n in member_probs)
    if total <= 0:
        raise ValueError("the members given carry no ensemble weight")
    return sum(weights[n] / total * np.asarray(p, dtype=np.float64) for n, p in member_probs.items())


def describe(probs: np.ndarray, member_probs: Mapping[str, np.ndarray], weights: Mapping[str, float],
             classes: Sequence[str], uncertain_below: float = UNCERTAIN_BELOW) -> dict:
    """One image's answer: class, confidence, all probabilities, each member's view, uncertainty."""
    k = int(np.argmax(probs))
    tops = {n: int(np.argmax(p)) for n, p in member_probs.items()}
    reasons = []
    if probs[k] < uncertain_below:
        reasons.append(f"confidence {probs[k]:.2f} is below {uncertain_below:.2f}")
    if len(set(tops.values())) > 1:
        reasons.append("members disagree on the top class: " +
                       ", ".join(f"{n}={classes[t]}" for n, t in tops.items()))
    return {
        "class": classes[k], "class_index": k, "confidence": float(probs[k]),
        "probabilities": {c: float(p) for c, p in zip(classes, probs)},
        "members": {n: {"probabilities": {c: float(v) for c, v in zip(classes, p)},
                        "top_class": classes[tops[n]], "weight": float(weights[n])}
                    for n, p in member_probs.items()},
        "uncertain": bool(reasons), "uncertain_reasons": reasons,
    }


class Predictor:
    """Load a bundle once; answer lists of RGB images."""

    def __init__(self, bundle: Bundle, members: Mapping[str, Member] | None = None,
                 device: str = "cpu", uncertain_below: float = UNCERTAIN_BELOW, amp: str = "off") -> None:
        self.bundle = bundle
        self.device = torch.device(device)
        self.bf16 = configure_device(self.device, amp)  # skin.device's rule; "off" = fp32
        self.members = {n: m.to(self.device).eval() for n, m in (members or bundle.load_members()).items()}
        self.weights = {n: bundle.weight_of(n) for n in self.members}
        self.uncertain_below = uncertain_below

    @torch.inference_mode()
    def member_probs(self, images: list[Image.Image]) -> dict[str, np.ndarray]:
        out = {}
        for name, m in self.members.items():
            x = to_batch(images, m.data_config).to(self.device)
            with autocast(self.device, self.bf16):  # the backbone; the head in fp32, as skin.gradcam runs it
                feats = m.forward_features(x)
            logits = m.forward_head(m.pool(feats.float()))
            out[name] = softmax(logits, self.bundle.entry(name).temperature).cpu().numpy()
        return out

    def predict(self, images: list[Image.Image]) -> list[dict]:
        mp = self.member_probs(images)
        probs = combine(mp, self.weights)
        return [describe(probs[i], {n: p[i] for n, p in mp.items()}, self.weights,
                         self.bundle.classes.names, self.uncertain_below) | {"bundle": self.bundle.id}
                for i in range(len(images))]
