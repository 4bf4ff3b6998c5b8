"""How a member's explanation maps are made, as one value.

    Explanation()                                   # one-pass Grad-CAM at the pooled layer, trained stride
    Explanation(stride=8, layer="backbone.blocks.5", method="layercam", smooth="flips")

A bundle stores one per member (`MemberEntry.explanation`); a request, a command or a job may
override any part of it, and every surface that explains (the CLI, the API, evaluation, batch
inference) takes the same four options. What such a request asks is typed once, at the edge
(`requested`: flags or query values -> {member: Overrides}), and passed down as it is; each member's
Explanation is its stored one with its Overrides applied (`Explanation.override`,
`skin.bundle.Bundle.explanations`). The answer never depends on it: only the maps do.

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

from dataclasses import astuple, dataclass, fields, replace
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

    def override(self, overrides: "Overrides | None" = None) -> "Explanation":
        """This explanation with what `overrides` sets (None: keep this one's)."""
        given = overrides.options() if overrides else {}
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


@dataclass(frozen=True)
class Overrides:
    """What a command, a job or a request changes of one member's stored Explanation (None: the stored
    one's). Hashable: Serve's members key the runners they derive by it."""
    stride: int | None = None
    layer: str | None = None
    method: str | None = None
    smooth: str | None = None

    @classmethod
    def of(cls, options: Mapping[str, Any] | None) -> "Overrides":
        """From {option: value} (a config file, `skin bundle cam-stride`); unknown options refused."""
        unknown = set(options or {}) - set(DEFAULTS)
        if unknown:
            raise ExplanationError(f"unknown explanation option(s) {sorted(unknown)}; "
                                   f"the options are {', '.join(DEFAULTS)}")
        return cls(**dict(options or {}))

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def __bool__(self) -> bool:
        return any(v is not None for v in astuple(self))


NO_OVERRIDES = Overrides()
# What an explanation request asks of each member, typed at the edge (`requested`) and passed down as it is
Request = Mapping[str, Overrides]


def requested(members: Sequence[str], *, stride: int | None = None, method: str | None = None,
              smooth: str | None = None, layers: Mapping[str, str] | None = None) -> dict[str, Overrides]:
    """The one place a command's flags, a job's arguments or an API request's query values become an
    explanation request: {member: Overrides} for the members it changes (stride, method and smoothing for
    every member; a layer per member, since layers are named per architecture). Unknown members, and
    values we cannot make, raise ExplanationError."""
    unknown = set(layers or {}) - set(members)
    if unknown:
        raise ExplanationError(f"explanation layer given for {sorted(unknown)}, which the bundle does not have; "
                               f"its members are {', '.join(members)}")
    Explanation(stride=stride, method=method or "gradcam", smooth=smooth or "none")  # one message per bad value
    out = {n: Overrides(stride=stride, method=method, smooth=smooth, layer=(layers or {}).get(n) or None)
           for n in members}
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
