"""Cost of all-class Grad-CAM against a plain forward pass, against our own general path and
against pytorch-grad-cam.

For each member (random weights, 224 px, 2 torch threads or --device cuda) at batch 1 and 8, the
three paths run interleaved (forward, one-pass CAM, general CAM, forward, ...) --repeats times,
so drift of the machine hits them alike; each ratio is the median of the per-round ratios, with
its min-max spread:
  ours / forward     all six classes' maps from one pass (inference-mode forward + the head's
                     Jacobian; must be >= 1: it is strictly more work) (target <= 1.15)
  @16, @8 / forward  the same with maps at a finer explanation stride (--cam-strides): the trained
                     stride's pass for the answer and the gradient, plus a pass of the same weights
                     with dilated last stages for the map (skin.registry.restride)
  layer / forward    what a bundle with a `cam_layer` serves (skin.inference.MemberRunner): the
                     trained pass for the answer, then the general path at that layer of the
                     model at that explanation stride, by --cam-method (default the demo bundle's
                     choice: LayerCAM at MobileNetV2 blocks.5, EfficientNet-B1 blocks.2, ResNet50
                     layer1, all of the stride-8 copies)
  flips / forward    the same maps averaged over the image's four flips (cam_smooth="flips", what
                     the demo bundle serves): the trained pass for the answer, the maps of the
                     image and of its three flips (one batch of 3)
  1 class / forward  what evaluation computes (MemberRunner.class_maps): the flip-averaged map of one
                     class per image (one backward per view instead of one per class)
  general / ours     skin.gradcam's general path: one forward with autograd, six backwards
  pgc(6) / ours      pytorch-grad-cam's GradCAM, one forward + backward per class, six classes

    python benchmarks/gradcam_cost.py [--size 224] [--repeats 7]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from skin.gradcam import CAM_METHODS, GradCAM
from skin.explanation import Explanation
from skin.inference import MemberRunner
from skin.registry import DEFAULT_MEMBERS, create_model, restride


def interleaved(fns: dict, repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds of each function per round, the functions run one after another in every round."""
    def run(fn) -> float:
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0
    for fn in fns.values():  # warm-up
        run(fn)
    out = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            out[k].append(run(fn))
    return out


def ratio(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Median, min and max of the per-round ratios a/b."""
    r = [x / y for x, y in zip(a, b)]
    return statistics.median(r), min(r), max(r)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-reference", action="store_true", help="skip pytorch-grad-cam")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--cam-strides", type=int, nargs="*", default=[16, 8], help="finer explanation strides to time")
    ap.add_argument("--cam-layers", nargs="*", metavar="NAME=LAYER",
                    default=["mobilenetv2=backbone.blocks.5", "efficientnet_b1=backbone.blocks.2",
                             "resnet50=backbone.layer1"],
                    help="members' explanation layers to time (the general path), NAME=LAYER[@STRIDE], "
                         "stride 8 unless given; default: the demo bundle's choice")
    ap.add_argument("--cam-method", choices=CAM_METHODS, default="layercam",
                    help="the method at those layers (the cost is the same: one backward per class)")
    a = ap.parse_args()
    from skin.explanation import parse_layers
    layers = {name: (spec.partition("@")[0], int(spec.partition("@")[2] or 8))  # MEMBER=LAYER[@STRIDE]
              for name, spec in parse_layers(a.cam_layers).items()}
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    print(f"{'member':<16}{'batch':>6}{'forward ms':>11}{'ours ms':>9}{'ours/fwd (min-max)':>22}"
          + "".join(f"{f'@{s}/fwd':>9}" for s in a.cam_strides) + f"{'layer/fwd':>12}{'flips/fwd':>10}{'1 class/fwd':>12}{'general/ours':>13}{'pgc(6)/ours':>12}")
    for name in DEFAULT_MEMBERS:
        torch.manual_seed(0)
        m = create_model(name, 6, pretrained="none", input_size=a.size).eval().to(device)
        for batch in (1, 8):
            x = torch.randn(batch, 3, a.size, a.size, device=device)

            def forward():
                with torch.inference_mode():
                    m(x)

            def ours():
                with GradCAM(m, fast=True) as cam:
                    cam(x)

            def general():
                with GradCAM(m, fast=False) as cam:
                    cam(x)
            fns = {"forward": forward, "ours": ours, "general": general}
            for stride in a.cam_strides:
                def dense_cam(d=restride(m, stride)):
                    with GradCAM(m, dense=d) as cam:
                        cam(x)
                fns[f"@{stride}"] = dense_cam
            if name in layers:
                def layer_cam(run=MemberRunner(m, explanation=Explanation(stride=layers[name][1], layer=layers[name][0],
                                                    method=a.cam_method))):
                    run(x, cam=True)
                fns["layer"] = layer_cam

                def flips_cam(run=MemberRunner(m, explanation=Explanation(stride=layers[name][1], layer=layers[name][0],
                                                    method=a.cam_method, smooth="flips"))):
                    run(x, cam=True)
                fns["flips"] = flips_cam

                def class_cam(run=MemberRunner(m, explanation=Explanation(stride=layers[name][1], layer=layers[name][0],
                                                    method=a.cam_method, smooth="flips"))):
                    run.class_maps(x, torch.zeros(len(x), dtype=torch.long))
                fns["class"] = class_cam
            ref = None
            if not a.no_reference:
                from pytorch_grad_cam import GradCAM as Reference
                from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
                ref = Reference(model=m, target_layers=[m.get_submodule(m.spec.cam_layer)])

                def reference():
                    for k in range(6):
                        ref(input_tensor=x, targets=[ClassifierOutputTarget(k)] * batch)
                fns["pgc"] = reference
            t = interleaved(fns, a.repeats, device)
            if ref is not None:
                ref.activations_and_grads.release()
            med, lo, hi = ratio(t["ours"], t["forward"])
            pgc = f"{ratio(t['pgc'], t['ours'])[0]:>12.1f}" if "pgc" in t else f"{'-':>12}"
            print(f"{name:<16}{batch:>6}{statistics.median(t['forward']) * 1e3:>11.1f}"
                  f"{statistics.median(t['ours']) * 1e3:>9.1f}{f'{med:.2f} ({lo:.2f}-{hi:.2f})':>22}"
                  + "".join(f"{ratio(t[f'@{s}'], t['forward'])[0]:>9.2f}" for s in a.cam_strides)
                  + (f"{ratio(t['layer'], t['forward'])[0]:>12.2f}{ratio(t['flips'], t['forward'])[0]:>10.2f}"
                     f"{ratio(t['class'], t['forward'])[0]:>12.2f}" if "layer" in t else f"{'-':>12}{'-':>10}{'-':>12}")
                  + f"{ratio(t['general'], t['ours'])[0]:>13.1f}{pgc}", flush=True)


if __name__ == "__main__":
    main()
