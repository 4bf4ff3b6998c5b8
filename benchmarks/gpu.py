"""The GPU figures in one command (issue #28): in-process serving against its CUDA-graph floor, the
real jobs under Ray against their in-process floors (benchmarks/gpu_ray.py), the training check
(benchmarks/train_gpu.py); one table of ratios, written as each phase ends.

    python benchmarks/gpu.py [--budget-s 480] [--phases serve ray train serve-cudagraphs] [--out FILE]
    python benchmarks/gpu.py --device cpu --size 64 --repeats 2 --batch 2 --backends eager --phases serve
                                    # a dry run of the serving rows on a CPU (inductor's CPU compile takes minutes)

Phases run in the order given while --budget-s lasts (a phase that would start with less than a
minute left is listed as not run; subprocess phases get the time left as their timeout), so one
call on a lent GPU always comes back with what it had. The table file is rewritten after each phase.

Serving (random-weight bundle of the three default members, an 800x600 JPEG-decoded upload, batch 1
unless said; each figure the median of --repeats timed calls after warm-up, CUDA synchronised), for
each compile backend (skin.graphs; "serve" is the default backend, "serve-cudagraphs" torch's
cudagraphs backend: CUDA graphs of torch's own kernels, no code generation):
  warm-up          compiling and capturing the sizes measured (1, 4, --batch) for answer and maps
  floor            each member's compiled answer pass alone on a ready device tensor (no
                   preprocessing, no answer assembly), summed over the members; eager beside it
  preprocess       the eval preset of one upload for every member: PIL on the CPU (skin.presets.to_batch)
                   and on the device from the uint8 upload (skin.presets.eval_batches, what Predictor runs)
  answer           skin.ensemble.Predictor.answers(cam=False), graphs off (eager) and on
  answer+cam       answers(cam=True) with the bundle's default Grad-CAM, plus the overlay PNG
  batch N          per image: the answer, and the answer with Grad-CAM (--batch)
  equal            largest |difference| of probabilities and maps between graphs on and off, and of the
                   preset on the device against PIL's on the CPU

Ratios (the targets of issue #28): answer(graphs) / (floor + preprocess on the device) <= 1.5;
answer+cam / answer <= 2; the Ray rows' own targets (gpu_ray.py); training: ours / best plain
loop >= 1, loop / ours >= 0.9 (train_gpu.py's table).
"""
from __future__ import annotations

import argparse
import os
import signal
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
sys.path.insert(0, str(ROOT / "benchmarks"))
from benchmarks._harness import random_bundle  # noqa: E402
from skin.bundle import Bundle  # noqa: E402
from skin.ensemble import Predictor  # noqa: E402
import skin.graphs as graphs  # noqa: E402
from skin.presets import eval_batches, to_batch  # noqa: E402
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


def upload():
    """The 800x600 JPEG upload of benchmarks/gpu_ray.py, decoded as the API decodes it."""
    from gpu_ray import upload_bytes
    from skin.images import load_image
    return load_image(upload_bytes())


def serving(a, device: torch.device, bundle_dir: Path, backend: str) -> dict:
    graphs.COMPILE["backend"] = backend
    torch._dynamo.reset()  # a fresh compile for each backend
    bundle = Bundle.load(bundle_dir)
    img = upload()
    eager = Predictor(bundle, device=str(device), graphs="off")
    fast = Predictor(bundle, device=str(device), graphs="on")
    sizes = sorted({1, 4, a.batch})
    t = time.perf_counter()
    for run in fast.runners.values():
        run.warm_up(a.batch, sizes=sizes)
    r: dict = {f"warm-up s (compile, sizes {sizes})": time.perf_counter() - t}

    # the floor: each member's compiled answer pass alone on a ready tensor (and the eager forward)
    floor_graphs = floor_eager = 0.0
    for name, run in fast.runners.items():
        s = run.member.data_config.input_size
        x = torch.randn(1, 3, s, s, device=device)
        floor_graphs += timed(lambda run=run, x=x: run._logits(x), a.repeats, device, warmup=5)
        floor_eager += timed(lambda run=eager.runners[name], x=x: run._logits(x), a.repeats, device)
    r["floor: compiled answer passes (ms)"] = floor_graphs
    r["members eager (ms)"] = floor_eager
    cfgs = [run.member.data_config for run in eager.runners.values()]
    r["preprocess, PIL on the CPU (ms)"] = timed(lambda: [to_batch([img], c) for c in cfgs], a.repeats, device)
    r["preprocess on the device (ms)"] = timed(lambda: eval_batches([img], cfgs, device), a.repeats, device)
    on_device = eval_batches([img], cfgs, device)
    r["max |dx| preset on device vs PIL"] = max(float((on_device[c].cpu() - to_batch([img], c)).abs().max()) for c in cfgs)
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
    imgs = [img] * 3  # padded to 4
    pe, pf = eager.member_outputs(imgs, cam=True), fast.member_outputs(imgs, cam=True)
    r["max |dprob| graphs vs eager"] = max(float(np.abs(pe[n][0] - pf[n][0]).max()) for n in pe)
    r["max |dmap| graphs vs eager"] = max(float((pe[n][1] - pf[n][1]).abs().max()) for n in pe)
    r["answer(graphs) / (floor + preprocess on device)"] = r["answer b1, graphs (ms)"] / (
        floor_graphs + r["preprocess on the device (ms)"])
    r["answer+cam+overlay / answer (graphs)"] = r["answer+cam+overlay b1, graphs (ms)"] / r["answer b1, graphs (ms)"]
    r["answer eager / answer graphs"] = r["answer b1, eager (ms)"] / r["answer b1, graphs (ms)"]
    return r


def subprocess_rows(cmd: list[str], timeout: float) -> tuple[list[str], str]:
    """Run a benchmark script in its own process group; (its stdout lines, a failure note or ""). At the
    timeout the whole group goes (its Ray, its jobs), so the next phase has the GPU to itself."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                         start_new_session=True)
    try:
        stdout, stderr = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        stdout, stderr = p.communicate()
        return stdout.strip().splitlines(), f"stopped at the budget ({timeout:.0f} s)"
    note = f"exit {p.returncode}: {stderr.strip()[-1500:]}" if p.returncode else ""
    return stdout.strip().splitlines(), note


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else None)
    ap.add_argument("--size", type=int, default=224, help="members' input size")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--batch", type=int, default=16, help="the batched rows' size")
    ap.add_argument("--phases", nargs="+", default=["serve", "ray", "train", "serve-cudagraphs"],
                    choices=["serve", "serve-cudagraphs", "ray", "train"])
    ap.add_argument("--backends", nargs="+", help="compile backend of the serve phase (default: skin.graphs' "
                    "default; eager: a quick dry run of this script)")
    ap.add_argument("--budget-s", type=float, default=480, help="start no phase after this (default 8 min)")
    ap.add_argument("--out", help="write the table here (default benchmarks/results/gpu_<device>.txt)")
    a = ap.parse_args(argv)
    if a.device is None:
        print("gpu.py: no GPU here; --device cpu runs the serving rows on the CPU (a dry run)", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    device = torch.device(a.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    tag = "h200" if "H200" in name else "h100" if "H100" in name else device.type
    out = Path(a.out or ROOT / "benchmarks" / "results" / f"gpu_{tag}.txt")
    lines = [f"device: {name}, torch {torch.__version__}, {os.cpu_count()} CPUs, {a.size} px, random weights",
             f"command: python benchmarks/gpu.py {' '.join(argv if argv is not None else sys.argv[1:])}"]

    def flush(title: str, rows: list[str]) -> None:
        lines.extend(["", title] + rows)
        print("\n".join(["", title] + rows), flush=True)
        out.write_text("\n".join(lines).rstrip() + "\n")

    with tempfile.TemporaryDirectory() as tmp:
        bundle = random_bundle(Path(tmp, "bundle"), size=a.size)
        for phase in a.phases:
            left = a.budget_s - (time.perf_counter() - t_start)
            if left < 60:
                flush(f"{phase}: not run ({left:.0f} s of the budget left)", [])
                continue
            t0 = time.perf_counter()
            if phase.startswith("serve"):
                for backend in (a.backends or [phase.partition("-")[2] or graphs.COMPILE["backend"]]):
                    r = serving(a, device, bundle, backend)
                    flush(f"serving in-process, compile backend {backend}:",
                          [f"{k:<52}{v:>10.4g}" for k, v in r.items()])
            elif phase == "ray":
                rows, note = subprocess_rows([sys.executable, str(ROOT / "benchmarks" / "gpu_ray.py"),
                                              "--size", str(a.size)], left)
                flush("the real jobs under Ray (benchmarks/gpu_ray.py):", rows + ([note] if note else []))
            else:
                rows, note = subprocess_rows([sys.executable, str(ROOT / "benchmarks" / "train_gpu.py"), "--size",
                                              str(a.size), "--epochs", "2", "--per-class", "200"], left)
                flush("training (benchmarks/train_gpu.py --epochs 2 --per-class 200):", rows + ([note] if note else []))
            lines.append(f"({phase}: {time.perf_counter() - t0:.0f} s)")
    out.write_text("\n".join(lines).rstrip() + "\n")
    print(f"written: {out} ({time.perf_counter() - t_start:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
