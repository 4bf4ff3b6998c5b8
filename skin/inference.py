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
from .explanation import Explanation, ExplanationError, Overrides
from .gradcam import FLIPS, GradCAM, flip_smoothed
from .graphs import Compiled, use_graphs
from .registry import Member, restride


# Images explained at once (skin.inference.MemberRunner.map_chunk), divided by 4 with flips (each image
# brings three flipped views): at 224 px the one-pass maps of 16 images peak near 1.6 GB; the general path
# holds every activation for its backward (16 images with flips, 64 views of a stride-8 copy, grew past
# 20 GB), so it goes 8 at a time, 2 with flips. benchmarks/explanations.py frontier measures the peaks.
# Memory goes with the pixels: a smaller input takes proportionally more at once (64 px: 12x as many),
# which keeps the CPU's batches from shrinking to a few images (the demo's evaluation spent half its
# time in chunks of two).
MAP_CHUNKS = {"one_pass": 16, "general": 8}
MAP_CHUNK_SIDE = 224  # the input side MAP_CHUNKS are measured at


def member_logits(member: Member, x: torch.Tensor, bf16: bool = False) -> torch.Tensor:
    """Logits (fp32) of a prepared batch: the backbone under bf16 autocast when asked, the head in fp32."""
    with autocast(x.device, bf16):
        feats = member.forward_features(x)
    return member.forward_head(member.pool(feats.float()))


def calibrated(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Temperature-scaled softmax (Guo et al. 2017): the member's probabilities as the bundle serves them."""
    return torch.softmax(logits.float() / temperature, dim=-1)


class MemberRunner:
    """One member ready to answer: in eval mode on its device, with its temperature, precision and
    Explanation (skin.explanation: how its maps are made; the answer never depends on it).

        run = MemberRunner(member, temperature=1.3, explanation=Explanation(stride=8))
        probs, maps = run(x, cam=True)      # (B, C) numpy, (B, C, h, w) tensor on the CPU

    A finer `explanation.stride` takes the maps from the same weights with dilated last stages
    (skin.registry.restride), weighted by the trained member's gradients, while the probabilities
    stay the trained stride's. Another `explanation.layer` takes them by Grad-CAM's general path
    (one backward per class); the layer feeding the pooling keeps the one-pass path. With
    `smooth="flips"` the answer is the unflipped image's, exactly.

    `graphs` ("auto": on CUDA devices; "on"; "off"; skin.graphs) runs the answer pass and the
    one-pass maps' feature passes compiled, replayed as CUDA graphs on a GPU, with the same answers
    (to float rounding: tested to 1e-4); the general path (another layer) stays eager. `warm_up`
    captures the batch sizes a server will see before its first request.
    """

    def __init__(self, member: Member, temperature: float = 1.0, amp: str = "off",
                 explanation: Explanation = Explanation(), graphs: str = "off",
                 _compiled: dict | None = None) -> None:
        if member.training:
            raise RuntimeError(f"member {member.spec.name} is in training mode; call .eval() first")
        self.member = member
        self.explanation = explanation.at_layer(member.spec.cam_layer)
        self.cam_member = restride(member, explanation.stride) if explanation.stride else member
        if self.explanation.layer:
            try:
                self.cam_member.get_submodule(self.explanation.layer)  # fails here, not at the first request
            except AttributeError:
                raise ExplanationError(f"{member.spec.name} has no layer {self.explanation.layer!r}; give a "
                                       f"dotted path such as {member.spec.cam_layer}") from None
        self.temperature, self.amp = float(temperature), amp
        self.device = next(member.parameters()).device
        self.bf16 = configure_device(self.device, amp)  # False where the device lacks native bf16
        self.graphs = graphs
        # the compiled passes, shared by the runners `with_explanation` derives (keyed by the dense copy's stride)
        self._compiled = _compiled if _compiled is not None else {}
        if use_graphs(self.device, graphs) and not self._compiled:
            m, bf16 = member, self.bf16
            self._compiled["answer"] = Compiled(lambda x: member_logits(m, x, bf16), self.device)
            self._compiled["features"] = Compiled(lambda x: m.forward_features(x), self.device)
        if self._compiled and self.cam_member is not member and self.cam_stride not in self._compiled:
            dense = self.cam_member
            self._compiled[self.cam_stride] = Compiled(lambda x: dense.forward_features(x), self.device)

    @classmethod
    def from_bundle(cls, bundle, name: str, device: str | torch.device = "cpu", amp: str = "off",
                    member: Member | None = None, graphs: str = "off",
                    overrides: Overrides | None = None) -> "MemberRunner":
        """A bundle's member (loaded, unless given) with its temperature and its stored Explanation with
        `overrides` applied."""
        member = (member if member is not None else bundle.load_member(name)).to(device).eval()
        e = bundle.entry(name)
        return cls(member, e.temperature, amp, e.explanation.override(overrides), graphs)

    def with_explanation(self, overrides: Overrides | None = None, **options: object) -> "MemberRunner":
        """The same member (weights shared) with its Explanation overridden (`overrides`, or the same as
        keywords: stride=, layer=, method=, smooth=); itself when nothing changes."""
        x = self.explanation.override(overrides or Overrides.of(options))
        return self if x == self.explanation else MemberRunner(self.member, self.temperature, self.amp, x,
                                                                self.graphs, self._compiled)

    @property
    def compiled(self) -> bool:
        return bool(self._compiled)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """The answer pass's logits, under inference mode (compiled when `graphs` says so)."""
        with torch.inference_mode():
            if self._compiled:
                return self._compiled["answer"](x)
            return member_logits(self.member, x, self.bf16)

    def warm_up(self, max_batch: int, cam: bool = True, sizes: list[int] | None = None) -> list[int]:
        """Compile (capture, on CUDA) every batch size up to `max_batch` (padded to powers of two), or
        just those of `sizes`, of the answer pass and, with `cam` on the one-pass path, of the maps'
        feature passes; the sizes captured ([] when this runner runs eagerly)."""
        if not self._compiled:
            return []
        size = self.member.data_config.input_size
        shape = (3, size, size)
        captured = self._compiled["answer"].warm_up(shape, max_batch, sizes=sizes)
        if cam and not self.explanation.layer:
            with autocast(self.device, self.bf16):
                self._compiled["features"].warm_up(shape, max_batch, grad="no_grad", sizes=sizes)
                if self.cam_stride in self._compiled:
                    self._compiled[self.cam_stride].warm_up(shape, max_batch, grad="no_grad", sizes=sizes)
        return captured

    @property
    def cam_stride(self) -> int:
        return self.cam_member.output_stride

    @property
    def map_chunk(self) -> int:
        """Images whose maps are computed at once: memory for maps grows with the batch (the general
        path keeps every activation for its backward; flips add three views an image), so a batch is
        explained in chunks of this many, whatever its size (`MAP_CHUNKS`)."""
        e = self.explanation
        chunk = MAP_CHUNKS["one_pass"] if not e.layer else MAP_CHUNKS["general"]
        side = self.member.data_config.input_size
        chunk = max(chunk, int(chunk * (MAP_CHUNK_SIDE / side) ** 2))
        return max(1, chunk // (len(FLIPS) if e.smooth == "flips" else 1))

    def __call__(self, x: torch.Tensor, cam: bool = False) -> tuple[np.ndarray, torch.Tensor | None]:
        x = x.to(self.device)
        if not cam:
            return calibrated(self._logits(x), self.temperature).cpu().numpy(), None
        if len(x) <= self.map_chunk:  # the answer from the maps' own pass (one pass on the default path)
            logits, maps = self._maps(x, answer=True)
            return calibrated(logits, self.temperature).cpu().numpy(), self._smoothed(x, maps).cpu()
        logits = self._logits(x)  # the answer from the whole batch, exactly as without maps
        maps = [self._smoothed(part, self._maps(part, answer=False)[1]).cpu() for part in x.split(self.map_chunk)]
        return calibrated(logits, self.temperature).cpu().numpy(), torch.cat(maps)

    def _smoothed(self, x: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """x's maps, averaged over its flips when the explanation asks (the flipped views give maps only)."""
        if self.explanation.smooth != "flips":
            return maps
        return flip_smoothed(lambda v: self._maps(v, answer=False)[1], x, maps)

    def class_maps(self, x: torch.Tensor, classes) -> torch.Tensor:
        """Each image's map of one class, (B, h, w) on the CPU: `self(x, cam=True)[1][i, classes[i]]`,
        at one backward on the general path instead of one per class (what scoring a map needs)."""
        classes = torch.as_tensor(np.asarray(classes)).long()
        out = []
        for part, cls in zip(x.split(self.map_chunk), classes.split(self.map_chunk)):
            part, cls = part.to(self.device), cls.to(self.device)
            maps = self._maps(part, answer=False, classes=cls)[1]
            if self.explanation.smooth == "flips":
                maps = flip_smoothed(lambda v, c=cls, n=len(part): self._maps(
                    v, answer=False, classes=c.repeat(len(v) // n))[1], part, maps)
            out.append(maps[:, 0].cpu())
        return torch.cat(out)

    def _maps(self, x: torch.Tensor, answer: bool, classes: torch.Tensor | None = None
              ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(logits of the trained member, or None unless `answer`; every class's maps, or with `classes`
        (B,) each image's map of its class, (B, 1, h, w))."""
        layer, method = self.explanation.layer, self.explanation.method
        if layer:  # the answer from the trained member, the maps by the general path
            logits = self._logits(x) if answer else None
            with GradCAM(self.cam_member, layer=layer, fast=False, method=method) as g, autocast(x.device, self.bf16):
                return logits, g(x, classes)[1]
        # one pass (+ the dense pass at a finer cam_stride) and the head's Jacobian: all classes' maps
        c = self._compiled
        with GradCAM(self.member, dense=self.cam_member, method=method, features=c.get("features"),
                     dense_features=c.get(self.cam_stride)) as g, autocast(x.device, self.bf16):
            return g(x, classes)
