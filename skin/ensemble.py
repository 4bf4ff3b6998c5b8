"""Ensemble inference in-process (no Ray): members' temperature-scaled probabilities (one path:
skin.inference), averaged with the bundle's weights, and the answer in the JSON shape the HTTP
API returns, with the ensemble Grad-CAM when asked. `assemble` builds that answer from members'
outputs wherever they were computed: here, in a batch job, or in the Serve members."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from .bundle import Bundle
from .calibration import apply_temperature
from .explanation import Request
from .gradcam import ensemble_map, input_size, normalize, upsample
from .inference import MemberRunner
from .presets import eval_batches
from .registry import Member

UNCERTAIN_BELOW = 0.5  # ensemble confidence under this is flagged for a second look


def combine(member_probs: Mapping[str, np.ndarray], weights: Mapping[str, float],
            temperature: float = 1.0) -> np.ndarray:
    """Weighted average of member probabilities, then the ensemble's own temperature (the bundle's
    `ensemble_temperature`: softmax(log p / T), fitted on val after the weights). Weights are
    renormalised over the members given (a degraded answer from fewer members is still a distribution)."""
    total = sum(weights[n] for n in member_probs)
    if total <= 0:
        raise ValueError("the members given carry no ensemble weight")
    avg = sum(weights[n] / total * np.asarray(p, dtype=np.float64) for n, p in member_probs.items())
    return avg if temperature == 1.0 else apply_temperature(avg, temperature)


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


def assemble(member_probs: Mapping[str, np.ndarray], weights: Mapping[str, float], classes: Sequence[str], *,
             member_maps: Mapping[str, torch.Tensor] | None = None, size: tuple[int, int] | None = None,
             work: tuple[int, int] | None = None, class_name: str | None = None, all_classes: bool = False,
             each_member: bool = False, missing: Sequence[str] = (),
             uncertain_below: float = UNCERTAIN_BELOW, ensemble_temperature: float = 1.0) -> dict:
    """One image's answer from its members' outputs: `member_probs` {name: (C,)}, and, for an
    explanation, `member_maps` {name: (C, h, w)} with the image's `size` (H, W) and the maps' `work`
    size (skin.gradcam.ensemble_map). Members in `missing` did not answer: the answer is then marked
    degraded and uncertain. The explanation is under "gradcam": the class explained ("class", the
    predicted one unless `class_name`), its ensemble map ("map", [0, 1] at `size`), every class's map
    ("maps", with `all_classes`) and each member's own map ("members", with `each_member`)."""
    classes = list(classes)
    out = describe(combine(member_probs, weights, ensemble_temperature), member_probs, weights, classes,
                   uncertain_below)
    out |= {"degraded": bool(missing), "missing_members": list(missing)}
    if missing:
        out["uncertain"] = True
        out["uncertain_reasons"].append(f"degraded: answered without {list(missing)}")
    if member_maps is not None:
        if size is None:
            raise ValueError("an explanation needs the image's size")
        k = classes.index(class_name) if class_name else out["class_index"]

        def ens(j: int) -> np.ndarray:
            return ensemble_map({n: m[j] for n, m in member_maps.items()}, weights, size, work)
        g = {"class": classes[k], "map": ens(k)}
        if all_classes:
            g["maps"] = {c: (g["map"] if j == k else ens(j)) for j, c in enumerate(classes)}
        if each_member:
            g["members"] = {n: normalize(upsample(m[k][None], size)[0]).numpy() for n, m in member_maps.items()}
        out["gradcam"] = g
    return out


class Predictor:
    """The ensemble over a bundle, the one place its answers are put together: prediction and
    explanation (`skin predict`, `skin explain`), batch inference (skin.batch), evaluation
    (skin.evaluation) and the Serve ingress (whose members run elsewhere: `Predictor.remote`).

        p = Predictor(bundle, explain={"resnet50": Overrides(stride=8)})   # members loaded in-process
        p.answers(images, cam=True)                                   # the API's JSON, one per image
    """

    def __init__(self, bundle: Bundle, members: Mapping[str, Member] | None = None, device: str = "cpu",
                 uncertain_below: float = UNCERTAIN_BELOW, amp: str = "off",
                 explain: Request | None = None, load: bool = True,
                 graphs: str = "auto") -> None:
        """`members`: given instead of loaded (a subset answers with its weights renormalised);
        `explain`: {member: Overrides} of its stored Explanation (skin.explanation.requested);
        answers never depend on it. `load=False`: no member in this process (`Predictor.remote`).
        `graphs`: members' passes under CUDA graphs ("auto": on a GPU; skin.graphs)."""
        self.bundle = bundle
        self.device = torch.device(device)
        given = members or {}
        names = list(given or bundle.member_names)
        self.runners = {n: MemberRunner.from_bundle(bundle, n, self.device, amp, given.get(n), graphs,
                                                    (explain or {}).get(n))
                        for n in names} if load else {}
        self.weights = {n: bundle.weight_of(n) for n in names}
        # the ensemble map is built at the largest member input size (square, as the eval preset resizes)
        self.work = input_size([bundle.entry(n).data_config.input_size for n in names])
        self.uncertain_below = uncertain_below

    @classmethod
    def remote(cls, bundle: Bundle, uncertain_below: float = UNCERTAIN_BELOW) -> "Predictor":
        """The ensemble's arithmetic without its members (they answer elsewhere, e.g. Serve deployments):
        `answer` from their outputs."""
        return cls(bundle, uncertain_below=uncertain_below, load=False)

    @property
    def classes(self) -> list[str]:
        return list(self.bundle.classes.names)

    def combine(self, member_probs: Mapping[str, np.ndarray]) -> np.ndarray:
        """The ensemble's probabilities from its members' (each (..., C)), as every answer computes them."""
        return combine(member_probs, self.weights, self.bundle.ensemble_temperature)

    def answer(self, member_probs: Mapping[str, np.ndarray], **kwargs) -> dict:
        """One image's answer from its members' outputs (`assemble`'s arguments), tagged with the bundle id."""
        return assemble(member_probs, self.weights, self.classes, work=self.work, uncertain_below=self.uncertain_below,
                        ensemble_temperature=self.bundle.ensemble_temperature, **kwargs) | {"bundle": self.bundle.id}

    def member_outputs(self, images: Sequence[Image.Image], cam: bool = False
                       ) -> dict[str, tuple[np.ndarray, torch.Tensor | None]]:
        """{member: (probabilities (B, C), all-class maps (B, C, h, w) or None)}."""
        if not self.runners:
            raise RuntimeError("this Predictor has no members in process (Predictor.remote): use answer()")
        x = eval_batches(images, (r.member.data_config for r in self.runners.values()), self.device)
        return {n: r(x[r.member.data_config], cam=cam) for n, r in self.runners.items()}

    def member_probs(self, images: Sequence[Image.Image]) -> dict[str, np.ndarray]:
        return {n: p for n, (p, _) in self.member_outputs(images).items()}

    def answers(self, images: Sequence[Image.Image], cam: bool = False, class_name: str | None = None,
                all_classes: bool = False, each_member: bool = False) -> list[dict]:
        """One answer per image (with its Grad-CAM when `cam`), tagged with the bundle id."""
        outs = self.member_outputs(images, cam)
        return [self.answer({n: p[i] for n, (p, _) in outs.items()},
                            member_maps={n: m[i] for n, (_, m) in outs.items()} if cam else None,
                            size=(img.size[1], img.size[0]), class_name=class_name, all_classes=all_classes,
                            each_member=each_member)
                for i, img in enumerate(images)]

    def predict(self, images: Sequence[Image.Image]) -> list[dict]:
        return self.answers(images)

    def member_probs_of(self, name: str, x: torch.Tensor) -> np.ndarray:
        """One member's probabilities (N, C) of images `x` (N, 3, S, S): uint8 at its input size, or float in
        [0, 1] at any size (resized to its preset's); its own normalisation, as the answer computes them."""
        from .presets import eval_pixels
        run = self.runners[name]
        size = run.member.data_config.input_size
        if x.dtype != torch.uint8 and x.shape[-1] != size:
            x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                                                align_corners=False)
        return run(eval_pixels(run.member.data_config)(x.to(self.device)))[0]

    def probs_of(self, name: str | None = None):
        """images (N, 3, S, S) in [0, 1] -> probabilities (N, C) as the answer computes them: one member's or,
        with None, the ensemble's (what the mask-free scores and occlusion perturb)."""
        if name is not None:
            return lambda x: torch.from_numpy(self.member_probs_of(name, x))
        return lambda x: torch.from_numpy(self.combine({n: self.member_probs_of(n, x) for n in self.runners}))

    def occlusion(self, images: Sequence[Image.Image], class_name: str | None = None, grid=None,
                  chunk: int = 32) -> list[dict]:
        """One answer per image with the ensemble's occlusion sensitivity (skin.occlusion) as its
        explanation, under "occlusion": {"class", "map" ([0, 1] at the image's size), "forwards"}; the answer
        itself is `answers`'. Costlier than Grad-CAM (skin.occlusion.cost forwards of every member, against
        about two), and the model's own answer to "what if this part were hidden"."""
        from .gradcam import upsample
        from .occlusion import Grid, map_from_probs, member_views
        from .presets import eval_geometry
        grid = grid or Grid()
        sizes = {n: r.member.data_config.input_size for n, r in self.runners.items()}
        widest = max(self.runners, key=sizes.get)
        out = []
        for img in images:
            x = eval_geometry(self.runners[widest].member.data_config)(img)
            views = member_views(x, sizes, grid)
            with torch.inference_mode():
                probs = {n: np.concatenate([self.member_probs_of(n, v[s:s + chunk]) for s in range(0, len(v), chunk)])
                         for n, v in views.items()}
            a = self.answer({n: p[0] for n, p in probs.items()})
            k = self.classes.index(class_name) if class_name else a["class_index"]
            m = map_from_probs(torch.from_numpy(self.combine(probs)), k, tuple(x.shape[-2:]), grid)
            a["occlusion"] = {"class": self.classes[k], "forwards": len(next(iter(views.values()))),
                              "map": upsample(m[None], (img.size[1], img.size[0]))[0].numpy()}
            out.append(a)
        return out
