"""Command-line arguments shared by `skin` and the jobs: argparse types whose messages say what
is expected, precision, and the explanation options (one set, on every command that explains)."""
from __future__ import annotations

import argparse


def zero_or_at_least(low: int):
    """argparse type: 0 (off) or an integer >= low."""
    check = at_least(0)

    def parse(text: str) -> int:
        v = check(text)
        if 0 < v < low:
            raise argparse.ArgumentTypeError(f"must be 0 (none) or at least {low}, got {text}")
        return v
    return parse


def split_arg(text: str) -> tuple[float, float, float]:
    try:
        parts = [float(p) for p in text.replace(",", "/").split("/")]
    except ValueError:
        parts = []
    if len(parts) != 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise argparse.ArgumentTypeError(f"expected TRAIN/VAL/TEST such as 70/15/15, got {text!r}")
    total = sum(parts)
    return tuple(p / total for p in parts)  # type: ignore[return-value]


def worker_range(text) -> tuple[int, int]:
    """N or MIN-MAX Ray Train workers (MIN-MAX: elastic, starts with what fits, resizes on loss and
    return); an int from YAML too. Returns (min, max)."""
    if isinstance(text, (tuple, list)) and len(text) == 2:  # already parsed
        text = f"{text[0]}-{text[1]}"
    lo, sep, hi = str(text).partition("-")
    try:
        low, high = int(lo), int(hi if sep else lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN-MAX workers such as 2 or 1-2, got {text!r}") from None
    if not 1 <= low <= high:
        raise argparse.ArgumentTypeError(f"workers must be N >= 1 or MIN-MAX with 1 <= MIN <= MAX, got {text!r}")
    return low, high


def at_least(low: int):
    """argparse type: an integer >= low, with a message that says so."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {text}" if low != 1 else
                                             f"must be a positive integer, got {text}")
        return v
    return parse



def fraction(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}") from None
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return v


def add_amp_argument(parser: argparse.ArgumentParser) -> None:
    from .device import AMP_CHOICES
    parser.add_argument("--amp", choices=AMP_CHOICES, default="off",
                        help="backbone precision: off = fp32 (default); auto = bf16 on a GPU; bf16 = also on "
                        "a CPU with native bf16 (AVX512-BF16/AMX), as a server member with amp: bf16 runs")
    from .graphs import GRAPHS_CHOICES
    parser.add_argument("--graphs", choices=GRAPHS_CHOICES, default="auto",
                        help="members' passes compiled and replayed as CUDA graphs: auto = on a GPU (default), "
                        "on = on any device (a compile at start on a CPU), off = eager")


def add_explanation_arguments(parser: argparse.ArgumentParser, occlusion: bool = False) -> None:
    """--cam-stride, --cam-layer, --cam-method, --cam-smooth: how the maps are made (skin.explanation),
    overriding the bundle's stored Explanation of each member; the answer never changes. With `occlusion`,
    --cam-method also takes `occlusion`: the ensemble's occlusion sensitivity (skin.occlusion) instead."""
    from .explanation import COST_NOTE
    from .gradcam import CAM_METHODS, CAM_SMOOTHS
    from .registry import OUTPUT_STRIDES
    g = parser.add_argument_group("explanation", "how the Grad-CAM maps are made (default: the bundle's, per "
                                  f"member); the answer does not change. Cost: {COST_NOTE}")
    g.add_argument("--cam-stride", type=int, choices=OUTPUT_STRIDES, default=None,
                   help="input pixels per map cell, every member: a finer stride comes from the same weights "
                   "with dilated last stages")
    g.add_argument("--cam-layer", action="append", metavar="MEMBER=LAYER",
                   help="maps at this layer of one member, by Grad-CAM's general path, e.g. "
                   "resnet50=backbone.layer1 (repeatable)")
    from .occlusion import OCCLUSION, cost
    g.add_argument("--cam-method", choices=CAM_METHODS + ((OCCLUSION,) if occlusion else ()), default=None,
                   help="gradcam (a weight per channel) or layercam (per position; for layers before the last)"
                   + (f"; or {OCCLUSION}: the ensemble's own drop in probability as each patch is greyed "
                      f"({cost()} forwards of every member per image, against about two; the costlier map for a "
                      "reviewer where the bundle's is not shown to follow the model)" if occlusion else ""))
    g.add_argument("--cam-smooth", choices=CAM_SMOOTHS, default=None,
                   help="flips: each map averaged over the image's four flips (about 4x the maps' cost)")


def explanation_request(a: argparse.Namespace, members) -> dict[str, dict]:
    """{member: options} from the explanation arguments (skin.explanation.requested)."""
    from .explanation import ExplanationError, parse_layers, requested
    from .occlusion import OCCLUSION
    if a.cam_method == OCCLUSION:
        if a.cam_stride or a.cam_layer or a.cam_smooth:
            raise ExplanationError("--cam-method occlusion makes its map from the ensemble's answers: "
                                   "--cam-stride, --cam-layer and --cam-smooth do not apply; drop them")
        return {}
    return requested(list(members), stride=a.cam_stride, method=a.cam_method, smooth=a.cam_smooth,
                     layers=parse_layers(a.cam_layer))
