"""Serve latency, throughput, cold start and memory, against the in-process floor, in one run.

On this machine (random-weight bundle at 224 px, Grad-CAM on, JPEG 512x384 uploads over
loopback HTTP):
  floor            three members' forward passes in one process, 2 torch threads, batch 1, with no
                   Ray process alive (measured before and after the Serve runs; the mean is used)
  p50 / floor      at concurrency 1                                   (target <= 1.25)
  thr16 / batch8   images/s at concurrency 16 / in-process batch-8 images/s (target >= 0.8)
  cold start       serve.run() to the first 200 from /v1/predict       (target <= 20 s)
  memory           PSS of the app's processes: replicas + Serve proxy/controller (target <= 3.6 GB)

    python benchmarks/serve_latency.py [--requests 40] [--config cluster/serve_config.yaml]
    python benchmarks/serve_latency.py --variants baseline throughput_optimized direct_ingress ...

--variants measures Ray Serve's switches (environment variables read when Serve starts), each on a
fresh local Ray, in the order given, against the same floor: p50 at concurrency 1 and throughput at
16, cold start, errors, memory. `throughput_optimized` is RAY_SERVE_THROUGHPUT_OPTIMIZED=1, which in
Ray 2.60 turns on the other switches listed (each also measured alone).

The app runs with the member options of --config (the shipped Serve config; its bundle is
replaced by the random-weight one). The floor is the members' forwards at the precision the app
serves them (`amp: bf16` members in bf16 where the CPU has it natively), so the ratios measure the
serving overhead, not the precision gain; the ratios against fp32 forwards are printed beside them.
"""
from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
import torch

from _harness import local_ray, random_bundle, serve_pss_gb, start_serve


def upload() -> bytes:
    from skin.synth import make_sample
    buf = io.BytesIO()
    make_sample(5, 1, 1, 384).image.resize((512, 384)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def floor(bundle_dir: str, data: bytes, amp: dict[str, str] | None = None) -> tuple[float, float]:
    """Median ms of the three forwards at batch 1; images/s of the three forwards at batch 8.
    amp: per-member precision (skin.device's rule) for the served-precision floor; default fp32."""
    from skin.bundle import Bundle
    from skin.device import autocast, configure_device
    from skin.images import load_image
    from skin.presets import to_batch
    torch.set_num_threads(2)
    b = Bundle.load(bundle_dir)
    members = b.load_members()
    bf16 = {n: configure_device(torch.device("cpu"), (amp or {}).get(n, "off")) for n in members}
    img = load_image(data)
    x1 = {n: to_batch([img], m.data_config) for n, m in members.items()}
    x8 = {n: x.repeat(8, 1, 1, 1) for n, x in x1.items()}

    def run(xs):
        with torch.inference_mode():
            for n, m in members.items():
                with autocast(torch.device("cpu"), bf16[n]):
                    m(xs[n])
    run(x1)
    t1 = []
    for _ in range(15):
        t0 = time.perf_counter()
        run(x1)
        t1.append(time.perf_counter() - t0)
    run(x8)
    t0 = time.perf_counter()
    for _ in range(4):
        run(x8)
    return statistics.median(t1) * 1e3, 32 / (time.perf_counter() - t0)


def load(url: str, data: bytes, concurrency: int, n: int) -> tuple[list[float], float, int, dict]:
    def one(_):
        t0 = time.perf_counter()
        r = requests.post(url + "/v1/predict", files={"file": ("x.jpg", data, "image/jpeg")}, timeout=120)
        timings = r.json().get("timings_ms", {}) if r.status_code == 200 else {}
        return time.perf_counter() - t0, r.status_code, timings
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        out = list(pool.map(one, range(n)))
    wall = time.perf_counter() - t0
    parts = {k: float(np.median([o[2][k] for o in out if k in o[2]])) for k in (out[0][2] or {})}
    return [o[0] * 1e3 for o in out], n / wall, sum(o[1] != 200 for o in out), parts


VARIANTS = {
    "baseline": {},
    "throughput_optimized": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
    "direct_ingress": {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"},
    "grpc": {"RAY_SERVE_USE_GRPC_BY_DEFAULT": "1"},
    "user_code_on_main_loop": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"},
    "router_on_main_loop": {"RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"},
    "gc_freeze": {"RAY_SERVE_FREEZE_GC_ON_STARTUP": "1"},
}


def app_args(config: str, bundle: Path) -> dict:
    """The first application's args in a Serve config file, with our bundle."""
    import yaml
    args = yaml.safe_load(Path(config).read_text())["applications"][0].get("args", {})
    return {**args, "bundle": str(bundle)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=40, help="requests per concurrency level (x concurrency/4 for 16)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "cluster/serve_config.yaml"))
    ap.add_argument("--variants", nargs="+", default=["baseline"], choices=list(VARIANTS),
                    help="Serve switches to measure, each on a fresh Ray (the first gets the full report)")
    a = ap.parse_args()
    from serve_app import AppArgs

    tmp = tempfile.TemporaryDirectory()
    bundle = random_bundle(Path(tmp.name, "b"), a.size)
    data = upload()
    args = AppArgs.model_validate(app_args(a.config, bundle))
    amp = {n: o.amp for n, o in args.members.items()}
    mixed = any(v != "off" for v in amp.values())
    # The floor is measured with no Ray process alive, before and after (this machine's speed drifts)
    floor_before = floor(str(bundle), data)
    same_before = floor(str(bundle), data, amp) if mixed else floor_before
    results = {}
    for i, v in enumerate(a.variants):
        try:
            results[v] = serve_run(args, data, a.requests, VARIANTS[v], full=(i == 0))
        except (Exception, SystemExit) as e:  # noqa: BLE001 - a switch that breaks the app is a result too
            if i == 0:
                raise
            results[v] = {"error": f"{type(e).__name__}: {e}"}
            print(f"variant {v}: failed: {results[v]['error']}", flush=True)
    rows, cold, mem, breakdown = (results[a.variants[0]][k] for k in ("rows", "cold", "mem", "breakdown"))
    floor_after = floor(str(bundle), data)
    same_after = floor(str(bundle), data, amp) if mixed else floor_after
    tmp.cleanup()
    floor_ms = (floor_before[0] + floor_after[0]) / 2
    batch8 = (floor_before[1] + floor_after[1]) / 2
    print("members: " + ", ".join(f"{n} {o.replicas} x {o.threads or 'auto'} thread(s)/{o.num_cpus} CPU, amp {o.amp}"
                                  for n, o in args.members.items()))
    print(f"in-process floor: three forwards {floor_ms:.1f} ms at batch 1 (2 threads); batch-8 {batch8:.1f} images/s "
          f"(mean of before/after the Serve runs: {floor_before[0]:.1f}/{floor_after[0]:.1f} ms, "
          f"{floor_before[1]:.1f}/{floor_after[1]:.1f} images/s)")
    print(f"{'concurrency':>11}{'p50 ms':>9}{'p99 ms':>9}{'images/s':>10}{'errors':>8}")
    for c, (p50, p99, thr, err) in rows.items():
        print(f"{c:>11}{p50:>9.1f}{p99:>9.1f}{thr:>10.2f}{err:>8}")
    print("server-side medians at concurrency 1: " + ", ".join(f"{k} {v:.1f} ms" for k, v in breakdown.items()))
    slowest = max(v for k, v in breakdown.items() if k.endswith("_compute"))
    print(f"where the p50 goes at concurrency 1: slowest member's compute {slowest:.1f} ms, fan-out round trip beyond "
          f"it {breakdown['members'] - slowest:.1f} ms, decode + Grad-CAM + response "
          f"{breakdown['decode'] + breakdown['gradcam_and_response']:.1f} ms, outside the ingress (client, HTTP, "
          f"proxy) {rows[1][0] - breakdown['total']:.1f} ms")
    # Headline ratios against forwards at the precision the app serves (a bf16 member against an fp32
    # floor would pass the precision gain off as low serving overhead); the fp32 ones beside them.
    same_ms, same8 = (same_before[0] + same_after[0]) / 2, (same_before[1] + same_after[1]) / 2
    if mixed:
        print(f"in-process floor at the served precision ({', '.join(f'{n} {v}' for n, v in amp.items() if v != 'off')}"
              f"; fp32 where the CPU has no native bf16): {same_ms:.1f} ms at batch 1; batch-8 {same8:.1f} images/s")
    print(f"p50 / floor at concurrency 1: {rows[1][0] / same_ms:.2f} (target <= 1.25, Grad-CAM on)"
          + (f"; against the fp32 floor {rows[1][0] / floor_ms:.2f}" if mixed else ""))
    print(f"throughput at 16 / in-process batch 8: {rows[16][2] / same8:.2f} (target >= 0.8)"
          + (f"; against the fp32 floor {rows[16][2] / batch8:.2f}" if mixed else ""))
    print(f"cold start to first 200: {cold:.1f} s (target <= 20)")
    print(f"memory of the app's processes (PSS): {mem:.2f} GB (target <= 3.6)")
    if len(a.variants) > 1:
        print(f"\nServe switches, each on a fresh local Ray (order as run), against the same floor:")
        print(f"{'variant':<24}{'p50@1 ms':>9}{'p50/floor':>10}{'img/s@16':>9}{'/batch8':>8}{'errors':>7}{'cold s':>7}{'PSS GB':>7}")
        for v, r in results.items():
            if "error" in r:
                print(f"{v:<24}failed: {r['error']}")
                continue
            p50, thr = r["rows"][1][0], r["rows"][16][2]
            errs = sum(x[3] for x in r["rows"].values())
            print(f"{v:<24}{p50:>9.1f}{p50 / same_ms:>10.2f}{thr:>9.2f}{thr / same8:>8.2f}{errs:>7}{r['cold']:>7.1f}"
                  f"{r['mem']:>7.2f}")


def serve_run(args, data: bytes, requests_n: int, env: dict, full: bool = True) -> dict:
    """One Serve app on a fresh local Ray with `env` set (Serve reads its switches at start-up)."""
    import os
    from ray import serve
    from serve_app import build_app
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with local_ray(2):
            url = start_serve()
            t0 = time.perf_counter()
            serve.run(build_app(args), name="skinray", route_prefix="/", blocking=False)
            while True:
                if time.perf_counter() - t0 > 300:
                    raise SystemExit("the app gave no 200 from /v1/predict within 300 s: see the replica logs "
                                     "under /tmp/ray/session_latest/logs/serve")
                try:
                    if requests.post(url + "/v1/predict", files={"file": ("x.jpg", data, "image/jpeg")},
                                     timeout=30).status_code == 200:
                        break
                except requests.RequestException:
                    pass
                time.sleep(0.2)
            cold = time.perf_counter() - t0
            load(url, data, 4, 8)  # warm-up
            rows, breakdown = {}, {}
            for c in ((1, 4, 16) if full else (1, 16)):
                n = requests_n if c < 16 else requests_n * 2
                lat, thr, errors, parts = load(url, data, c, n)
                rows[c] = (np.percentile(lat, 50), np.percentile(lat, 99), thr, errors)
                if c == 1:
                    breakdown = parts
            mem = serve_pss_gb(("ray::ServeReplica:skinray", "ray::ProxyActor", "ray::ServeController"))
            serve.shutdown()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return {"rows": rows, "cold": cold, "mem": mem, "breakdown": breakdown}


if __name__ == "__main__":
    main()
