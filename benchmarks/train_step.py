"""One training step of each member as `jobs/train.py` runs it, with the optimizer it ships (fused AdamW,
`skin.train.make_optimizer`) against PyTorch's default AdamW (the multi-tensor `foreach` one), alternated.

    python benchmarks/train_step.py                       # the demo's settings: 64 px, batch 32, 1 thread
    python benchmarks/train_step.py --size 224 --steps 4  # the product's input size

Each member with its config from --config (learning rate, bf16 where it asks and the CPU has it natively),
random weights, channels-last, skin's `train_step` on a uint8 batch through the preset's batch augmentation.
Per member: ms per step with each optimizer (median of --repeats alternated runs of --steps steps), the
optimizer's own share of the step, and the ratio default / fused (> 1: the shipped one is faster).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "jobs/configs/demo.yaml"))
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a demo member has 1)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--members", default="mobilenetv2,efficientnet_b1,resnet50")
    a = ap.parse_args(argv)

    import torch
    import yaml
    from skin.device import configure_device, cpu_has_native_bf16
    from skin.presets import train_preset
    from skin.registry import create_model
    from skin.train import OutlierExposureLoss, TrainConfig, fused_adamw, make_optimizer, train_step

    torch.set_num_threads(a.threads)
    raw = yaml.safe_load(Path(a.config).read_text())
    device = torch.device("cpu")
    print(f"{a.size} px, batch {a.batch}, {a.threads} thread(s), CPU native bf16: {cpu_has_native_bf16()}, "
          f"torch {torch.__version__}")
    print(f"{'member':16s} {'precision':9s} {'default ms':>10s} {'fused ms':>9s} {'opt share (default/fused)':>26s} "
          f"{'default / fused':>15s}")
    for name in a.members.split(","):
        over = (raw.get("members") or {}).get(name, {})
        cfg = TrainConfig.from_dict({**{k: v for k, v in raw.items() if k != "members"}, **over,
                                     "backbone": name, "data_dir": "-"})
        amp = configure_device(device, cfg.amp)
        torch.manual_seed(0)
        member = create_model(name, 6, pretrained="none", input_size=a.size,
                              normalize="per_image" if cfg.per_image_norm else None)
        member = member.to(memory_format=torch.channels_last).train()
        augment = train_preset(member.data_config, cfg.augment).batch
        crit = OutlierExposureLoss(cfg.label_smoothing)
        x8 = torch.randint(0, 256, (a.batch, 3, a.size, a.size), dtype=torch.uint8)
        y = torch.randint(0, 6, (a.batch,))
        assert fused_adamw(member), "the shipped optimizer is not the fused one here"
        opts = {"fused": make_optimizer(member, cfg, random_init=True)}
        groups = [{"params": g["params"], "lr": g["lr"]} for g in opts["fused"].param_groups]
        opts["default"] = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)  # PyTorch's default: foreach
        assert all(g["fused"] for g in opts["fused"].param_groups)
        assert not any(g["fused"] for g in opts["default"].param_groups)

        def run(opt, n):
            t_step = t_opt = 0.0
            for _ in range(n):
                t0 = time.perf_counter()
                train_step(member, _NoStep(opt), crit, x8, y, amp, True, augment)
                t1 = time.perf_counter()
                opt.step()
                t_step += time.perf_counter() - t0
                t_opt += time.perf_counter() - t1
            return t_step / n, t_opt / n

        for opt in opts.values():
            run(opt, 2)  # warm-up: kernels, optimizer state
        times = {k: [] for k in opts}
        for _ in range(a.repeats):
            for k, opt in opts.items():
                times[k].append(run(opt, a.steps))
        med = {k: (statistics.median(t for t, _ in v), statistics.median(o for _, o in v)) for k, v in times.items()}
        (d, do), (f, fo) = med["default"], med["fused"]
        print(f"{name:16s} {'bf16' if amp else 'fp32':9s} {d * 1e3:10.1f} {f * 1e3:9.1f} "
              f"{f'{do / d:.0%} / {fo / f:.0%}':>26s} {d / f:15.2f}")
    return 0


class _NoStep:
    """The optimizer as `train_step` sees it, with its step left to the caller (timed on its own)."""

    def __init__(self, opt):
        self.opt = opt

    def zero_grad(self, set_to_none=True):
        self.opt.zero_grad(set_to_none=set_to_none)

    def step(self):
        pass


if __name__ == "__main__":
    raise SystemExit(main())
