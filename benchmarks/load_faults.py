"""Full-size load and fault run against a local Serve app (loopback only, bounded), deployed with a latency
budget that admits every request (`latency_budget` 1000: a deployment that queues for throughput), so that
every request reaches the members; overload at the shipped defaults is benchmarks/admission.py's.

  load    2,000 requests at concurrency 16 with Grad-CAM on: errors, p50/p99, and PSS of the
          Serve replica processes before and after (growth must stay < 10%: no hook leaks)
  fault   during a second load run, kill resnet50's replica actor: in-flight requests must end
          (200 or 503) within their timeout, Serve restarts the replica, and within 30 s every
          request succeeds again; prints the error count, the slowest request, when the first
          request started after the kill succeeded, and from when on every request succeeded

    python benchmarks/load_faults.py [--requests 2000] [--concurrency 16] [--size 224]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests

from _harness import local_ray, random_bundle, serve_pss_gb, start_serve


def run_load(url: str, data: bytes, n: int, concurrency: int, timeout: float = 60.0):
    def one(_):
        t0 = time.perf_counter()
        try:
            code = requests.post(url + "/v1/predict", files={"file": ("x.jpg", data, "image/jpeg")},
                                 timeout=timeout).status_code
        except requests.RequestException:
            code = -1
        return (time.perf_counter() - t0) * 1e3, code, time.time()
    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, range(n)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--size", type=int, default=224)
    a = ap.parse_args()
    from ray import serve
    from serve_app import AppArgs, build_app
    from skin.synth import jpeg_bytes, make_sample

    with tempfile.TemporaryDirectory() as tmp, local_ray(2) as ray:
        bundle = random_bundle(Path(tmp, "b"), a.size)
        data = jpeg_bytes(make_sample(3, 0, 0, 384), 0, 0)
        url = start_serve()
        serve.run(build_app(AppArgs(bundle=str(bundle), latency_budget=1000)), name="skinray", route_prefix="/")
        run_load(url, data, 32, a.concurrency)
        before = serve_pss_gb()
        t0 = time.perf_counter()
        out = run_load(url, data, a.requests, a.concurrency)
        wall = time.perf_counter() - t0
        after = serve_pss_gb()
        lat = np.array([t for t, _, _ in out])
        errors = sum(c != 200 for _, c, _ in out)
        print(f"load: {a.requests} requests at concurrency {a.concurrency}, Grad-CAM on: {errors} errors, "
              f"p50 {np.percentile(lat, 50):.0f} ms, p99 {np.percentile(lat, 99):.0f} ms, "
              f"{a.requests / wall:.1f} requests/s")
        print(f"memory (PSS of replicas): {before:.2f} GB before, {after:.2f} GB after "
              f"({(after - before) / before:+.1%}; must stay < 10%)")

        names = [x for x in ray.util.list_named_actors(all_namespaces=True)
                 if "resnet50" in x["name"] and "REPLICA" in x["name"].upper()]
        victim = ray.get_actor(names[0]["name"], namespace=names[0]["namespace"])
        with ThreadPoolExecutor(1) as bg:
            fut = bg.submit(run_load, url, data, 200, a.concurrency, 45.0)
            time.sleep(2)
            killed = time.time()
            ray.kill(victim, no_restart=True)
            during = fut.result()
        codes = [c for _, c, _ in during]
        # (start, end, code) of every request, from its end time and latency
        reqs = sorted((end - t / 1e3, end, c) for t, c, end in during)
        first_ok = next((end for start, end, c in reqs if c == 200 and start > killed), None)
        last_fail = max((end for _, end, c in reqs if c != 200), default=None)
        # whole again: the start of the first request after which every request (by start) answered 200
        whole = next((start for k, (start, _, _) in enumerate(reqs) if all(c == 200 for _, _, c in reqs[k:])), None)
        after = run_load(url, data, 16, 4, 30.0)
        print(f"fault: killed resnet50's replica during 200 requests: {codes.count(200)} x 200, "
              f"{codes.count(503)} x 503, {sum(c not in (200, 503) for c in codes)} other; slowest "
              f"{max(t for t, _, _ in during) / 1e3:.1f} s (timeout 45 s)")
        print("recovery after the kill: first request started after it to succeed ended "
              + (f"{first_ok - killed:.1f} s" if first_ok else "never") + " after; the last failure ended "
              + (f"{last_fail - killed:.1f} s" if last_fail else "- (none)") + " after; every request started "
              + (f"{whole - killed:+.1f} s" if whole else "never") + " after the kill or later succeeded "
              f"(target <= 30 s); {sum(c == 200 for _, c, _ in after)}/16 succeed right after the run")
        serve.shutdown()


if __name__ == "__main__":
    main()
