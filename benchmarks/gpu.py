"""The GPU figures in one command: in-process serving against its CUDA-graph floor, then the
training check (benchmarks/train_gpu.py), one table of ratios, results under benchmarks/results/.

    python benchmarks/gpu.py [--size 224] [--repeats 50] [--skip-train] [--out benchmarks/results/gpu_h200.txt]
    python benchmarks/gpu.py --device cpu --size 64 --repeats 2 --batch 2 --backend eager --skip-train
                                    # a dry run of the script on a CPU (inductor's CPU compile takes minutes)

Serving (random-weight bundle of the three default members, 800x600 JPEG-decoded uploads, batch 1
unless said; each figure the median of --repeats timed calls after warm-up, CUDA synchronised):
  floor            each member's bare forward (no head maths, no preprocessing) under
                   torch.compile(mode="reduce-overhead") (CUDA graphs), summed over the members;
                   the same eager beside it
  preprocess       the eval preset of one upload for every member (PIL resize + normalise)
  answer           skin.ensemble.Predictor.answers(cam=False), graphs off (eager) and on (skin.graphs)
  answer+cam       answers(cam=True) with the bundle's default Grad-CAM, plus the overlay PNG
  batch 16         per image: the answer, and the answer with Grad-CAM (--batch)
  equal            largest |difference| of probabilities and maps between graphs on and off

Ratios (the targets of issue #28): answer(graphs) / (floor + preprocess) <= 1.5;
answer+cam / answer <= 2. The training rows are train_gpu.py's (its own table).
"""
from __future__ import annotations

import argparse
import io
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._harness import random_bundle  # noqa: E402
from skin.bundle import Bundle  # noqa: E402
from skin.ensemble import Predictor  # noqa: E402
import skin.graphs as graphs  # noqa: E402
from skin.presets import to_batch  # noqa: E402
from skin.render import overlay, png_bytes  # noqa: E402


def timed(fn, repeats: int, device: torch.device, warmup: int = 3) -> float:
    """Median ms of fn() over `repeats` calls after `warmup` (synchronised on CUDA)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append((time.perf_counter() - t) * 1e3)
    return statistics.median(out)


def upload(size: tuple[int, int] = (800, 600)):
    from PIL import Image
    from skin.synth import jpeg_bytes, make_sample
    big = make_sample(3, 1, 0, max(size))
    data = jpeg_bytes(big, 0, 0)
    return Image.open(io.BytesIO(data)).convert("RGB").resize(size)


def serving(a, device: torch.device, bundle_dir: Path) -> dict:
    bundle = Bundle.load(bundle_dir)
    img = upload()
    eager = Predictor(bundle, device=str(device), graphs="off")
    fast = Predictor(bundle, device=str(device), graphs="on")
    t = time.perf_counter()
    for run in fast.runners.values():
        run.warm_up(a.batch)
    r: dict = {f"warm-up s (compile, sizes 1..{a.batch})": time.perf_counter() - t}

    # the floor: bare forwards under CUDA graphs (and eager), summed over the members
    floor_graphs = floor_eager = 0.0
    for name, run in eager.runners.items():
        m, s = run.member, run.member.data_config.input_size
        x = torch.randn(1, 3, s, s, device=device)
        bare = torch.compile(lambda v, m=m: m(v), backend=a.backend,
                             mode="reduce-overhead" if device.type == "cuda" and a.backend == "inductor" else None)

        def graphed(bare=bare, x=x):
            if device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()
            with torch.inference_mode():
                bare(x)

        def plain(m=m, x=x):
            with torch.inference_mode():
                m(x)
        floor_graphs += timed(graphed, a.repeats, device, warmup=5)
        floor_eager += timed(plain, a.repeats, device)
    r["floor: members under CUDA graphs (ms)"] = floor_graphs
    r["members eager (ms)"] = floor_eager
    r["preprocess (ms)"] = timed(lambda: [to_batch([img], run.member.data_config) for run in eager.runners.values()],
                                 a.repeats, device)
    for label, p in (("eager", eager), ("graphs", fast)):
        r[f"answer b1, {label} (ms)"] = timed(lambda p=p: p.answers([img]), a.repeats, device)

        def explained(p=p):
            g = p.answers([img], cam=True)[0]["gradcam"]
            png_bytes(overlay(img, g["map"], 0.4))
        r[f"answer+cam+overlay b1, {label} (ms)"] = timed(explained, a.repeats, device)
        imgs, b = [img] * a.batch, a.batch
        r[f"b{b} per image answer, {label} (ms)"] = timed(lambda p=p: p.answers(imgs), max(3, a.repeats // 5), device) / b
        r[f"b{b} per image answer+cam, {label} (ms)"] = timed(lambda p=p: p.answers(imgs, cam=True),
                                                             max(3, a.repeats // 5), device) / b
    # equal: graphs on vs off
    imgs = [img] * 3
    pe, pf = eager.member_outputs(imgs, cam=True), fast.member_outputs(imgs, cam=True)
    r["max |dprob| graphs vs eager"] = max(float(np.abs(pe[n][0] - pf[n][0]).max()) for n in pe)
    r["max |dmap| graphs vs eager"] = max(float((pe[n][1] - pf[n][1]).abs().max()) for n in pe)
    r["answer(graphs) / (floor + preprocess)"] = r["answer b1, graphs (ms)"] / (floor_graphs + r["preprocess (ms)"])
    r["answer+cam+overlay / answer (graphs)"] = r["answer+cam+overlay b1, graphs (ms)"] / r["answer b1, graphs (ms)"]
    r["answer eager / answer graphs"] = r["answer b1, eager (ms)"] / r["answer b1, graphs (ms)"]
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else None)
    ap.add_argument("--size", type=int, default=224, help="members' input size")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--batch", type=int, default=16, help="the batched rows' size; sizes up to it are captured")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend (inductor: CUDA graphs on a GPU; "
                    "eager: a quick dry run of this script)")
    ap.add_argument("--skip-train", action="store_true", help="serving only")
    ap.add_argument("--out", help="write the table here (default benchmarks/results/gpu_<device>.txt)")
    a = ap.parse_args(argv)
    if a.device is None:
        print("gpu.py: no GPU here; --device cpu runs the same measurements on the CPU (a dry run)", file=sys.stderr)
        return 2
    device = torch.device(a.device)
    graphs.COMPILE["backend"] = a.backend
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    lines = [f"device: {name}, torch {torch.__version__}, {a.size} px, random weights",
             f"command: python benchmarks/gpu.py {' '.join(argv if argv is not None else sys.argv[1:])}", ""]
    with tempfile.TemporaryDirectory() as tmp:
        r = serving(a, device, random_bundle(Path(tmp, "bundle"), size=a.size))
    lines += [f"{k:<44}{v:>10.4g}" for k, v in r.items()]
    print("\n".join(lines), flush=True)
    if not a.skip_train and device.type == "cuda":
        t = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_gpu.py"), "--size", str(a.size),
                            "--epochs", "2", "--per-class", "200"], capture_output=True, text=True, cwd=ROOT)
        lines += ["", "training (benchmarks/train_gpu.py --epochs 2 --per-class 200):", t.stdout.strip(),
                  t.stderr.strip()[-2000:] if t.returncode else ""]
        print("\n".join(lines[-4:]), flush=True)
    tag = "h200" if "H200" in name else "h100" if "H100" in name else device.type
    out = Path(a.out or ROOT / "benchmarks" / "results" / f"gpu_{tag}.txt")
    out.write_text("\n".join(lines).rstrip() + "\n")
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
