"""How a member's explanation maps are made, as one value.

    Explanation()                                   # one-pass Grad-CAM at the pooled layer, trained stride
    Explanation(stride=8, layer="backbone.blocks.5", method="layercam", smooth="flips")

A bundle stores one per member (`MemberEntry.explanation`); a request, a command or a job may
override any part of it (`override`), and every surface that explains (the CLI, the API, evaluation,
batch inference) takes the same four options. The answer never depends on it: only the maps do.

- `stride` (8/16/32, None: the member's trained stride): input pixels per map cell. A finer stride
  takes the maps from the same weights with dilated last stages (skin.registry.restride).
- `layer` (a dotted module path, None: the layer feeding the pooling, the one-pass path): maps at
  another layer by Grad-CAM's general path (one backward per class).
- `method` ("gradcam" / "layercam"): how the gradient weighs the feature map (skin.gradcam).
- `smooth` ("none" / "flips"): each map the mean of the maps of the image's four flips, each
  normalised and flipped back (skin.gradcam.flip_smoothed); about 4x the maps' cost.

JSON leaves the defaults out (`to_json`), so a bundle written before an option existed keeps its id.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Mapping, Sequence

from .gradcam import CAM_METHODS, CAM_SMOOTHS, method_name
from .registry import OUTPUT_STRIDES

DEFAULTS = {"stride": None, "layer": None, "method": "gradcam", "smooth": "none"}
# What each option costs at 224 px on 2 CPU cores, answer + maps per image as a multiple of the answer alone,
# batch 1 (benchmarks/explanations.py frontier; docs/explanations.md has the table and the command).
COST_NOTE = ("answer + maps ÷ answer at 224 px on 2 CPU cores: the pooled layer at the trained stride 32 1.1x, "
             "at stride 16 (what bundles from jobs/train.py serve) 2.2x, at stride 8 3.9x; flips 3.8x; an earlier "
             "layer (LayerCAM, stride 8) 27x, with flips 87x (docs/explanations.md)")


class ExplanationError(ValueError):
    """An explanation option is not one we can make; the message says which values are."""


@dataclass(frozen=True)
class Explanation:
    stride: int | None = None
    layer: str | None = None
    method: str = "gradcam"
    smooth: str = "none"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "Explanation":
        """The options are ones we can make, else ExplanationError naming the valid values. (Whether
        `layer` exists in a member is checked where the member is: skin.inference.MemberRunner.)"""
        if self.stride is not None and self.stride not in OUTPUT_STRIDES:
            raise ExplanationError(f"explanation stride (cam_stride) must be one of {', '.join(map(str, OUTPUT_STRIDES))}, "
                                   f"got {self.stride!r}")
        if self.layer is not None and (not isinstance(self.layer, str) or not self.layer.strip()):
            raise ExplanationError(f"explanation layer (cam_layer) must be a dotted module path such as backbone.layer1, "
                                   f"got {self.layer!r}")
        if self.method not in CAM_METHODS:
            raise ExplanationError(f"explanation method (cam_method) must be one of {', '.join(CAM_METHODS)}, got {self.method!r}")
        if self.smooth not in CAM_SMOOTHS:
            raise ExplanationError(f"explanation smoothing (cam_smooth) must be one of {', '.join(CAM_SMOOTHS)}, "
                                   f"got {self.smooth!r}")
        return self

    def override(self, **request: Any) -> "Explanation":
        """This explanation with the options a request sets (None: keep this one's)."""
        unknown = set(request) - set(DEFAULTS)
        if unknown:
            raise ExplanationError(f"unknown explanation option(s) {sorted(unknown)}; "
                                   f"the options are {', '.join(DEFAULTS)}")
        given = {k: v for k, v in request.items() if v is not None}
        return replace(self, **given) if given else self

    def at_layer(self, default_layer: str) -> "Explanation":
        """The same, with the member's default layer written as None (one spelling per explanation)."""
        return replace(self, layer=None) if self.layer == default_layer else self

    def to_json(self) -> dict:
        """The options that differ from the defaults: {"stride": 8, "method": "layercam", ...}."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != DEFAULTS[f.name]}

    @classmethod
    def from_json(cls, d: Mapping[str, Any] | None) -> "Explanation":
        d = dict(d or {})
        unknown = set(d) - set(DEFAULTS)
        if unknown:
            raise ExplanationError(f"unknown explanation option(s) {sorted(unknown)}; "
                                   f"the options are {', '.join(DEFAULTS)}")
        return cls(**{k: (int(v) if k == "stride" and v is not None else v) for k, v in d.items()})

    def describe(self, trained_stride: int, default_layer: str) -> dict:
        """Every option resolved for one member, for people and /v1/info."""
        return {"stride": self.stride or trained_stride, "layer": self.layer or default_layer,
                "method": self.method, "smooth": self.smooth, "name": method_name(self.method, self.smooth)}

    def summary(self, trained_stride: int) -> str:
        """One line: 'LayerCAM (flip-averaged) stride 8 at backbone.blocks.5'."""
        return (f"{method_name(self.method, self.smooth)} stride {self.stride or trained_stride}"
                + (f" at {self.layer}" if self.layer else ""))


def requested(members: Sequence[str], *, stride: int | None = None, method: str | None = None,
              smooth: str | None = None, layers: Mapping[str, str] | None = None) -> dict[str, dict]:
    """What a command or request asks of each member's Explanation: {member: options}, for
    `Explanation.override` (stride, method and smoothing for every member; a layer per member, since
    layers are named per architecture). Unknown members, and values we cannot make, raise ExplanationError."""
    unknown = set(layers or {}) - set(members)
    if unknown:
        raise ExplanationError(f"explanation layer given for {sorted(unknown)}, which the bundle does not have; "
                               f"its members are {', '.join(members)}")
    Explanation(stride=stride, method=method or "gradcam", smooth=smooth or "none")  # one message per bad value
    common = {k: v for k, v in {"stride": stride, "method": method, "smooth": smooth}.items() if v is not None}
    out = {n: dict(common) | ({"layer": (layers or {})[n]} if (layers or {}).get(n) else {}) for n in members}
    return {n: o for n, o in out.items() if o}


def parse_layers(items: Sequence[str] | None) -> dict[str, str]:
    """NAME=LAYER items (CLI flags, API query values) -> {member: layer}, else ExplanationError."""
    out = {}
    for item in items or []:
        name, _, layer = str(item).partition("=")
        if not name or not layer:
            raise ExplanationError(f"an explanation layer is given as MEMBER=LAYER, such as "
                                   f"resnet50=backbone.layer1; got {item!r}")
        out[name] = layer
    return out
