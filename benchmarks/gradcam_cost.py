"""Cost of all-class Grad-CAM against a plain forward pass, and against pytorch-grad-cam.

For each member (random weights, 224 px, 2 torch threads or --device cuda) at batch 1 and 8:
  ours / forward     all six classes' maps from one pass  (target <= 1.15)
  pgc(6) / ours      pytorch-grad-cam's GradCAM, one forward + backward per class, six classes

    python benchmarks/gradcam_cost.py [--size 224] [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from skin.gradcam import GradCAM
from skin.registry import DEFAULT_MEMBERS, create_model


def timed(fn, repeats: int, device: torch.device = torch.device("cpu")) -> float:
    def run():
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    run()  # warm-up
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-reference", action="store_true", help="skip pytorch-grad-cam")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    print(f"{'member':<16}{'batch':>6}{'forward ms':>12}{'ours ms':>10}{'ours/fwd':>10}{'pgc(6) ms':>11}{'pgc/ours':>10}")
    for name in DEFAULT_MEMBERS:
        torch.manual_seed(0)
        m = create_model(name, 6, pretrained="none", input_size=a.size).eval().to(device)
        for batch in (1, 8):
            x = torch.randn(batch, 3, a.size, a.size, device=device)

            def forward():
                with torch.inference_mode():
                    m(x)

            def ours():
                with GradCAM(m) as cam:
                    cam(x)

            t_fwd, t_ours = timed(forward, a.repeats, device), timed(ours, a.repeats, device)
            t_ref = float("nan")
            if not a.no_reference:
                from pytorch_grad_cam import GradCAM as Reference
                from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
                ref = Reference(model=m, target_layers=[m.get_submodule(m.spec.cam_layer)])

                def reference():
                    for k in range(6):
                        ref(input_tensor=x, targets=[ClassifierOutputTarget(k)] * batch)

                t_ref = timed(reference, max(1, a.repeats // 2), device)
                ref.activations_and_grads.release()
            print(f"{name:<16}{batch:>6}{t_fwd * 1e3:>12.1f}{t_ours * 1e3:>10.1f}{t_ours / t_fwd:>10.2f}"
                  f"{t_ref * 1e3:>11.1f}{t_ref / t_ours:>10.1f}")


if __name__ == "__main__":
    main()
