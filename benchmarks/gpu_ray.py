"""The real jobs under Ray on a GPU machine, each against its in-process floor in the same run
(issue #28, item 3); benchmarks/gpu.py runs it after its in-process rows.

  train     jobs/train.py on the synthetic set (--size px, random init), the three members at once on
            0.33 GPU each, against the same three loops without Ray (skin.train.train_member with
            LocalRuntime, three processes started together, with the job's own resolved configs and
            CPU share). Each member's training images/s is its own per-epoch log line (the same code
            prints it in both), the median over the epochs after the first; summed over the members.
            Ratio Ray / plain (target >= 0.95)
  serve     the Serve app with GPU members (num_gpus 0.33 each, graphs auto), 800x600 JPEG uploads with
            Grad-CAM: p50 at concurrency 1 / the in-process decode + answer + Grad-CAM + overlay PNG
            (target <= 1.5); images/s at concurrency 32 / the same in-process at batch 8 (target >= 0.8)
  predict   jobs/predict.py (Ray Data; --workers actors sharing the GPU) images/s / the members' batched
            forward on ready device tensors (benchmarks/batch_predict.py's floor and job runner)
            (target >= 0.8)
  evaluate  jobs/evaluate.py on the synthetic test split: exit code and wall time

    python benchmarks/gpu_ray.py [--phases train serve predict evaluate] [--size 224]
    python benchmarks/gpu_ray.py --size 64 --per-class 12 --epochs 2 --requests 8 --images 64
                                  # a dry run on a CPU (no GPU asked for anywhere)

Every phase prints its rows as it ends ("name: value" lines; benchmarks/gpu.py collects them).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import ROOT, local_ray, random_bundle, start_serve  # noqa: E402

PY = sys.executable
EPOCH_LINE = re.compile(r"\[(\w+)\] epoch (\d+)/\d+ .*?, (\d+) img/s")
CUDA = torch.cuda.is_available()


def row(name: str, value, note: str = "") -> None:
    v = f"{value:.4g}" if isinstance(value, float) else str(value)
    print(f"{name}: {v}{'  (' + note + ')' if note else ''}", flush=True)


def member_rates(text: str) -> dict[str, float]:
    """Each member's median training images/s over the epochs after the first, from its log lines."""
    seen: dict[str, dict[int, float]] = {}
    for m in EPOCH_LINE.finditer(text):
        seen.setdefault(m.group(1), {})[int(m.group(2))] = float(m.group(3))
    return {n: statistics.median([r for e, r in eps.items() if e > 1] or list(eps.values())) for n, eps in seen.items()}


def dataset(tmp: Path, per_class: int) -> Path:
    from skin.data import ScanOptions, balance, scan
    from skin.synth import write_dataset
    write_dataset(tmp / "synth", per_class=per_class, size=256, seed=0, progress=False)
    scan(tmp / "synth", tmp / "data", ScanOptions(), progress=False)
    balance(tmp / "data", per_class=per_class, seed=0)
    return tmp / "data"


def plain_loop(config: str, cpus: float, out: str) -> None:
    """One member's loop without Ray (the train phase's floor); prints the same epoch lines."""
    from skin.train import LocalRuntime, TrainConfig, train_member
    train_member(TrainConfig.from_dict(json.loads(config)), LocalRuntime(out, cpus=cpus),
                 log=lambda s: print(s, flush=True))


def train_phase(a, tmp: Path, data: Path) -> None:
    out = tmp / "train"
    cmd = [PY, str(ROOT / "jobs" / "train.py"), "--data", str(data), "--out", str(out), "--name", "gpu-ray",
           "--epochs", str(a.epochs), "--image-size", str(a.size), "--batch-size", str(a.batch),
           "--pretrained", "none"] + (["--gpus-per-worker", "0.33"] if CUDA else ["--num-cpus", str(a.cpus)])
    t0 = time.perf_counter()
    job = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if job.returncode:
        raise SystemExit(f"jobs/train.py failed ({job.returncode}): {job.stderr.strip()[-1500:]}")
    row("train: jobs/train.py wall s", time.perf_counter() - t0)
    ray_rates = member_rates(job.stdout + job.stderr)
    resolved = json.loads((out / "train_config.json").read_text())
    cpus = resolved["scaling"]["cpus_per_worker"]
    procs = {m: subprocess.Popen([PY, __file__, "_plain", json.dumps(c), str(cpus), str(tmp / f"plain-{m}")],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
             for m, c in resolved["member_configs"].items()}
    logs = {m: p.communicate()[0] for m, p in procs.items()}
    for m, p in procs.items():
        if p.returncode:
            raise SystemExit(f"the plain loop of {m} failed ({p.returncode}): {logs[m].strip()[-1500:]}")
    plain_rates = member_rates("".join(logs.values()))
    if set(ray_rates) != set(plain_rates) or not ray_rates:
        raise SystemExit(f"epoch lines missing: Ray job {sorted(ray_rates)}, plain loops {sorted(plain_rates)}")
    for m in ray_rates:
        row(f"train: {m} images/s, Ray / plain", f"{ray_rates[m]:.0f} / {plain_rates[m]:.0f}")
    row("train: epoch images/s, Ray / plain (three members at once)",
        sum(ray_rates.values()) / sum(plain_rates.values()), "target >= 0.95")


def upload_bytes(size=(800, 600)) -> bytes:
    from skin.synth import make_sample
    buf = io.BytesIO()
    make_sample(3, 1, 0, max(size)).image.resize(size).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def serve_phase(a, bundle: Path) -> None:
    from ray import serve
    from serve_app import AppArgs, build_app
    from serve_latency import load
    from skin.bundle import Bundle
    from skin.ensemble import Predictor
    from skin.images import load_image
    from skin.render import overlay, png_bytes
    data = upload_bytes()
    device = "cuda" if CUDA else "cpu"
    p = Predictor(Bundle.load(bundle), device=device, graphs="auto")
    for run in p.runners.values():
        run.warm_up(8)

    def answered(n: int) -> None:
        imgs = [load_image(data) for _ in range(n)]
        for img, ans in zip(imgs, p.answers(imgs, cam=True)):
            png_bytes(overlay(img, ans["gradcam"]["map"], 0.4))
    ms = []
    for i in range(a.requests + 3):
        t0 = time.perf_counter()
        answered(1)
        ms.append((time.perf_counter() - t0) * 1e3)
    one = statistics.median(ms[3:])
    t0 = time.perf_counter()
    for _ in range(max(2, a.requests // 8)):
        answered(8)
    batched = 8 * max(2, a.requests // 8) / (time.perf_counter() - t0)
    del p
    if CUDA:
        torch.cuda.empty_cache()
    # every replica (members and ingress) an equal share of the machine's CPUs but one (Serve's proxy and
    # controller), so that all of them are placed: an app with a replica left unplaced never answers
    names = Bundle.load(bundle).member_names
    gpu = 0.33 if CUDA else 0.0
    replicas = a.ingress_replicas if CUDA else 1
    cpus = max(0.25, ((os.cpu_count() or 2) - 1) // (len(names) + replicas)) if CUDA else 0.4
    args = AppArgs(bundle=str(bundle), ingress_replicas=replicas, ingress_cpus=cpus,
                   members={n: {"num_gpus": gpu, "num_cpus": cpus, "max_batch_size": 8} for n in names})
    with local_ray(os.cpu_count() if CUDA else a.cpus):
        url = start_serve()
        t0 = time.perf_counter()
        serve.run(build_app(args), name="skinray", route_prefix="/", blocking=False)
        import requests
        while requests.post(url + "/v1/predict", files={"file": ("x.jpg", data, "image/jpeg")},
                            timeout=300).status_code != 200:
            if time.perf_counter() - t0 > 400:
                raise SystemExit("the Serve app gave no 200 within 400 s")
            time.sleep(0.5)
        row("serve: deploy to first 200 s (members compile and capture at start-up)", time.perf_counter() - t0)
        load(url, data, 4, 16)  # warm-up
        lat, _, err1, _ = load(url, data, 1, a.requests)
        _, thr, err32, _ = load(url, data, 32, a.requests * 8)
        serve.shutdown()
    row("serve: app", f"{replicas} ingress x {cpus:g} CPU, members {gpu:g} GPU + {cpus:g} CPU, batch 8")
    row("serve: p50 at concurrency 1 ms / in-process answer+cam+overlay ms", f"{np.median(lat):.1f} / {one:.1f}")
    row("serve: p50 at 1 / in-process", float(np.median(lat)) / one, "target <= 1.5")
    row("serve: images/s at 32 / in-process batch 8", f"{thr:.1f} / {batched:.1f}")
    row("serve: throughput at 32 / in-process batched", thr / batched, "target >= 0.8")
    row("serve: errors at 1 / 32", f"{err1} / {err32}")


def predict_phase(a, tmp: Path, bundle: Path) -> None:
    from batch_predict import floor, run_job, write_images
    write_images(tmp / "photos", a.images)
    cpus = max(1, ((os.cpu_count() or 2) - 2) // a.workers) if CUDA else a.cpus  # two CPUs left to Ray Data
    gpus = round(1 / a.workers, 3) if CUDA else 0.0
    device, graphs = ("cuda", "auto") if CUDA else ("cpu", "off")
    for cam in (False, True):
        f = floor(bundle, a.floor_images, a.batch, cpus, cam, device=device, graphs=graphs)
        j = run_job(bundle, tmp / "photos", tmp / f"predict-{cam}", cpus, a.batch, cam, workers=a.workers, gpus=gpus,
                    total_cpus=os.cpu_count() if CUDA else a.cpus)
        tag = "with --cam" if cam else "answers"
        row(f"predict {tag}: job images/s / floor images/s", f"{j['images_per_s']:.1f} / {f:.1f}",
            f"{a.workers} actor(s) x {gpus:g} GPU + {cpus:g} CPU, batch {a.batch}, start-up {j['startup_s']:.0f} s")
        row(f"predict {tag}: job / in-process batched", j["images_per_s"] / f, "target >= 0.8")


def evaluate_phase(a, tmp: Path, data: Path, bundle: Path) -> None:
    cmd = [PY, str(ROOT / "jobs" / "evaluate.py"), "--bundle", str(bundle), "--data", str(data), "--split", "test",
           "--out", str(tmp / "eval"), "--perturb", "6", "--no-store", "--masks", str(tmp / "synth" / "manifest.csv")]
    cmd += ["--gpus-per-actor", "1", "--cpus-per-actor", str(max(1, (os.cpu_count() or 2) // 2))] if CUDA else \
        ["--num-cpus", str(a.cpus)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    row("evaluate: jobs/evaluate.py exit code, wall s", f"{r.returncode}, {time.perf_counter() - t0:.0f}")
    if r.returncode:
        print(r.stderr.strip()[-1500:], flush=True)
    else:
        metrics = json.loads((tmp / "eval" / "metrics.json").read_text())
        row("evaluate: images scored, ensemble accuracy (random weights)",
            f"{metrics['ensemble']['n']}, {metrics['ensemble']['accuracy']:.3f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phases", nargs="+", default=["train", "serve", "predict", "evaluate"],
                    choices=["train", "serve", "predict", "evaluate"])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--per-class", type=int, default=100, help="synthetic training images per class")
    ap.add_argument("--epochs", type=int, default=4, help="training epochs (the first is not counted)")
    ap.add_argument("--batch", type=int, default=64, help="training batch; predict/evaluate use 16")
    ap.add_argument("--requests", type=int, default=40, help="requests at concurrency 1 (x8 at 32)")
    ap.add_argument("--ingress-replicas", type=int, default=2)
    ap.add_argument("--images", type=int, default=800, help="photographs for jobs/predict.py")
    ap.add_argument("--floor-images", type=int, default=320)
    ap.add_argument("--workers", type=int, default=2, help="jobs/predict.py actors (sharing the GPU)")
    ap.add_argument("--cpus", type=int, default=2, help="without a GPU: the local Ray's CPUs")
    a = ap.parse_args(argv)
    print(f"device: {torch.cuda.get_device_name() if CUDA else 'CPU (no GPU: a dry run)'}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, {a.size} px", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        needs_data = {"train", "evaluate"} & set(a.phases)
        data = dataset(tmp, a.per_class) if needs_data else None
        bundle = random_bundle(tmp / "bundle", a.size)
        for phase in a.phases:
            t0 = time.perf_counter()
            if phase == "train":
                train_phase(a, tmp, data)
            elif phase == "serve":
                serve_phase(a, bundle)
            elif phase == "predict":
                predict_phase(a.__class__(**{**vars(a), "batch": 16}), tmp, bundle)
            else:
                evaluate_phase(a, tmp, data, bundle)
            row(f"{phase}: phase wall s", time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_plain":
        plain_loop(sys.argv[2], float(sys.argv[3]), sys.argv[4])
        sys.exit(0)
    sys.exit(main())
