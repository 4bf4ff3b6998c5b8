"""Batch inference: images/s of jobs/predict.py (Ray Data, actor pool) against the in-process
floor, on synthetic photographs, with and without --cam, and the job's peak memory.

    python benchmarks/batch_predict.py [--images 2000] [--size 224] [--batch-size 16] [--cpus 2]

Floor = the three members' batched forward on already-decoded, already-preset tensors at the same
batch size and threads, in this process (`skin.inference.MemberRunner`, what each actor runs): no
decode, no resize, no I/O, no Ray. The job pays for all of those on top; the goal is
job ÷ floor >= 0.80. With --cam the floor is the same members' forward + all-class Grad-CAM
(`cam=True`), and the job also blends and writes an overlay PNG per image. Each job runs in its
own process with its own local Ray of --cpus CPUs, one actor of all of them, and its wall time
counts from the first file scored to the last (Ray's start-up and the actor's model loading are
reported apart). Peak memory = the highest sum of RSS over the job's process tree (driver, Ray's
daemons, the actor), sampled every 0.2 s.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import ROOT, random_bundle  # noqa: E402


def write_images(folder: Path, n: int) -> None:
    """n synthetic 256 px JPEGs in subfolders of 500 (the job reads the tree recursively)."""
    from skin.parallel import map_progress
    for d in range((n + 499) // 500):
        (folder / f"{d:02d}").mkdir(parents=True, exist_ok=True)
    map_progress(_save, [(folder, i) for i in range(n)], 2, "images", "written", 500)


def _save(args) -> None:
    from skin.synth import make_sample
    folder, i = args
    make_sample(i % 6, 11, i, 256).image.save(folder / f"{i // 500:02d}" / f"img_{i:05d}.jpg", quality=90)


def floor(bundle: Path, n: int, batch: int, threads: int, cam: bool, device: str = "cpu", graphs: str = "off") -> float:
    """Images/s of the members' batched forward on prepared tensors (the actor's compute alone), on
    `device` (tensors already there), compiled as `graphs` says (skin.graphs)."""
    from skin.bundle import Bundle
    from skin.inference import MemberRunner
    torch.set_num_threads(threads)
    b = Bundle.load(bundle)
    runners = [MemberRunner(m.eval().to(device), b.entry(k).temperature, graphs=graphs)
               for k, m in b.load_members().items()]
    x = {id(r): torch.randn(batch, 3, r.member.data_config.input_size, r.member.data_config.input_size, device=device)
         for r in runners}
    for r in runners:  # warm-up (compile and capture, when compiled)
        r.warm_up(batch, cam=cam, sizes=[batch])
        r(x[id(r)], cam=cam)
    t0 = time.perf_counter()
    done = 0
    while done < n:
        for r in runners:
            r(x[id(r)], cam=cam)
        done += batch
    return done / (time.perf_counter() - t0)


def run_job(bundle: Path, images: Path, out: Path, cpus: int, batch: int, cam: bool, workers: int = 1,
            gpus: float = 0.0, total_cpus: int | None = None) -> dict:
    """jobs/predict.py on its own local Ray of `total_cpus` (default `cpus`): `workers` actors of `cpus`
    CPUs (+ `gpus` GPU) each."""
    cmd = [sys.executable, str(ROOT / "jobs" / "predict.py"), "--bundle", str(bundle), "--input", str(images),
           "--out", str(out), "--num-cpus", str(total_cpus or cpus), "--cpus-per-worker", str(cpus),
           "--workers", str(workers), "--batch-size", str(batch), "--progress-every", str(batch)]
    cmd += (["--cam"] if cam else []) + (["--gpus-per-worker", str(gpus)] if gpus else [])
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    peak, stop = [0], threading.Event()

    def sample() -> None:
        root = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                procs = [root] + root.children(recursive=True)
                rss = 0
                for p in procs:
                    try:
                        rss += p.memory_info().rss
                    except psutil.Error:
                        pass
                peak[0] = max(peak[0], rss)
            except psutil.Error:
                pass
            time.sleep(0.2)
    threading.Thread(target=sample, daemon=True).start()
    first = last = None
    done_first = 0
    total = 0
    for line in proc.stdout:
        m = re.match(r"predict: (\d+)/(\d+) files", line)
        if m:
            now = time.perf_counter()
            if first is None:
                first, done_first = now, int(m.group(1))
            last, total = now, int(m.group(1))
    rc = proc.wait()
    stop.set()
    if rc != 0:
        raise SystemExit(f"jobs/predict.py failed with exit {rc}")
    return {"images_per_s": (total - done_first) / (last - first), "startup_s": first - t0,
            "wall_s": time.perf_counter() - t0, "peak_rss_gb": peak[0] / 1e9, "images": total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--size", type=int, default=224, help="members' input size (default 224, the weights' own)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--floor-images", type=int, default=320, help="images timed for each floor (a rate)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bundle = random_bundle(tmp / "bundle", a.size)
        write_images(tmp / "photos", a.images)
        print(f"{a.images} synthetic 256 px JPEGs, random-weight bundle at {a.size} px, batch {a.batch_size}, "
              f"{a.cpus} CPUs ({torch.get_num_threads()} threads here)", flush=True)
        rows = []
        for cam in (False, True):  # floor and job alternated
            f = floor(bundle, a.floor_images, a.batch_size, a.cpus, cam)
            j = run_job(bundle, tmp / "photos", tmp / f"out-{cam}", a.cpus, a.batch_size, cam)
            rows.append((cam, f, j))
            print(f"{'--cam' if cam else 'plain':<6} floor {f:6.2f} img/s | job {j['images_per_s']:6.2f} img/s "
                  f"-> ratio {j['images_per_s'] / f:.2f} (goal >= 0.80) | start-up {j['startup_s']:.0f}s, "
                  f"wall {j['wall_s']:.0f}s, peak RSS {j['peak_rss_gb']:.2f} GB", flush=True)


if __name__ == "__main__":
    main()
