"""Overload at the shipped defaults, driven by a stock load generator (Debian's `hey`).

The service is what `make demo` deploys: a local head from cluster/local.sh, `serve deploy` of
cluster/serve_config.yaml with only the bundle path changed (a random-weight bundle of the three members
at 224 px with the explanation trained bundles serve: Grad-CAM at stride 16). Nothing else is set.

For each kind of request (`cheap`: the answer with the default maps; `costly`: maps at stride 8 averaged
over the four flips, about 4x the maps' work) it measures:

- unloaded: 20 requests one at a time (p50: what the budget is relative to);
- capacity, with nothing refused (the same service with `latency_budget` raised out of the way, clients at
  concurrency 1, 2, 3, 4, 6, 8): `at budget`, the most answers per second at a concurrency whose p95 stays
  within 2x the unloaded p50 (what admission can keep at best), and `any latency`, the most at any
  concurrency (the members' batches amortise, answers take longer);
- then, at the shipped defaults, open loads of 1x, 4x and 16x the capacity at budget for `--seconds` each
  (evenly spaced: several one-worker hey processes started in turn): the status codes, the refusals' latency (p50 / max), the answered
  requests' p95 against 2x the unloaded p50, their throughput against both capacities, the replicas'
  memory before and after, and five answers right after.

    python benchmarks/admission.py [--seconds 30] [--size 224] [--kinds cheap,costly]

Loopback only; every run is bounded by `--seconds` and hey's own time-out. Needs `hey` on the PATH
(`apt-get install hey`).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
import yaml

from _harness import ROOT, random_bundle, serve_pss_gb

KINDS = {"cheap": "", "costly": "cam_stride=8&cam_smooth=flips"}


def multipart(image: bytes, folder: Path) -> tuple[Path, str]:
    """A multipart/form-data body with the image in field `file`, as a browser or curl -F sends it."""
    boundary = "skinraybenchmarkboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"lesion.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()
    path = folder / "body.bin"
    path.write_bytes(body)
    return path, f"multipart/form-data; boundary={boundary}"


def hey(url: str, body: Path, ctype: str, *, workers: int, rate: float | None = None, n: int | None = None,
        seconds: float | None = None, timeout: int = 60) -> list[tuple[float, int, float]]:
    """hey's per-request rows: (seconds taken, status, offset from the start)."""
    cmd = ["hey", "-m", "POST", "-D", str(body), "-T", ctype, "-c", str(workers), "-t", str(timeout), "-o", "csv"]
    if rate:
        cmd += ["-q", f"{rate:.3f}"]
    cmd += ["-z", f"{seconds}s"] if seconds else ["-n", str(n)]
    out = subprocess.run(cmd + [url], capture_output=True, text=True, timeout=(seconds or 600) + timeout + 30).stdout
    rows = []
    for r in csv.DictReader(io.StringIO(out)):
        rows.append((float(r["response-time"]), int(r["status-code"]), float(r["offset"])))
    return rows


def open_load(url: str, body: Path, ctype: str, rate: float, seconds: float, longest_s: float,
              timeout: int = 60) -> list[tuple[float, int, float]]:
    """An open load of `rate` requests per second, evenly spaced, for `seconds`: several hey processes of one
    worker each at `rate / n` per second, started `1 / rate` apart (one hey with many workers ticks them all
    at once: bursts of n requests). Enough processes that a slow answer (up to `longest_s`) does not delay a
    process's next request. Rows as `hey` returns them, offsets from the first start."""
    import concurrent.futures
    n = min(48, max(4, math.ceil(rate * longest_s)))
    gap = 1 / rate

    def one(i: int):
        time.sleep(i * gap)
        return [(t, c, o + i * gap) for t, c, o in hey(url, body, ctype, workers=1, rate=rate / n, seconds=seconds,
                                                        timeout=timeout)]
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        return [r for rows in pool.map(one, range(n)) for r in rows]


def pct(xs, q):
    return float(np.percentile(xs, q)) if len(xs) else float("nan")


def deploy(env: dict, dash: str, config: dict, folder: Path) -> None:
    path = folder / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    subprocess.run([str(Path(sys.executable).parent / "serve"), "deploy", str(path), "-a", dash], env=env,
                   check=True, capture_output=True, timeout=120)


def wait_budget(api: str, budget: float, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if requests.get(api + "/v1/info", timeout=5).json()["admission"]["budget"] == budget:
                return
        except (requests.RequestException, ValueError, KeyError):
            pass
        time.sleep(1)
    raise SystemExit(f"the app at {api} did not come up with latency budget {budget}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=30, help="each loaded run")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--kinds", default="cheap,costly")
    ap.add_argument("--out", help="also write the figures as JSON here")
    a = ap.parse_args()
    if not shutil.which("hey"):
        raise SystemExit("admission.py: needs Debian's `hey` load generator: apt-get install hey")
    from skin.synth import jpeg_bytes, make_sample
    figures: dict = {}
    with tempfile.TemporaryDirectory(prefix="skinray-admission-") as tmp:
        tmp = Path(tmp)
        bundle = random_bundle(tmp / "bundle", a.size)
        state = tmp / "state"
        env = dict(os.environ, PYTHONPATH=str(ROOT), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
        subprocess.run(["bash", str(ROOT / "cluster" / "local.sh"), "start", str(state)], env=env, check=True,
                       timeout=180, capture_output=True)
        env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(state / "ray_token")}
        dash = f"http://127.0.0.1:{os.environ.get('RAY_DASHBOARD_PORT', '8265')}"
        try:
            shipped = yaml.safe_load((ROOT / "cluster" / "serve_config.yaml").read_text())
            shipped["applications"][0]["args"]["bundle"] = str(bundle)
            port = shipped["http_options"]["port"]
            api = f"http://127.0.0.1:{port}"
            image = jpeg_bytes(make_sample(3, 0, 0, 640), 0, 0)  # a 640 px photograph, resized by the service
            body, ctype = multipart(image, tmp)
            wide = json.loads(json.dumps(shipped))  # the same service with the budget out of the way
            ingress = next((d for d in wide["applications"][0].get("deployments", []) if d["name"] == "Ensemble"),
                           None)
            if ingress is None:
                ingress = {"name": "Ensemble"}
                wide["applications"][0].setdefault("deployments", []).append(ingress)
            ingress.setdefault("user_config", {})["latency_budget"] = 1000.0
            for kind in a.kinds.split(","):
                url = f"{api}/v1/predict" + (f"?{KINDS[kind]}" if KINDS[kind] else "")
                deploy(env, dash, wide, tmp)
                wait_budget(api, 1000.0)
                hey(url, body, ctype, workers=1, n=5)  # warm-up
                alone = [t for t, c, _ in hey(url, body, ctype, workers=1, n=20) if c == 200]
                budget_s = 2 * pct(alone, 50)
                curve = []
                for c in (1, 2, 3, 4, 6, 8):
                    rows = hey(url, body, ctype, workers=c, seconds=max(10.0, a.seconds / 2))
                    ok = [r[0] for r in rows if r[1] == 200]
                    rate = len(ok) / max(r[2] + r[0] for r in rows) if ok else 0.0
                    curve.append((c, rate, pct(ok, 95)))
                capacity_any = max(rate for _, rate, _ in curve)
                within = [(rate, c) for c, rate, p95 in curve if p95 <= budget_s] or [(curve[0][1], 1)]
                capacity, best_c = max(within)
                print(f"{kind}: unloaded p50 {pct(alone, 50) * 1e3:.0f} ms (20 one at a time); capacity at budget "
                      f"{capacity:.2f} answers/s (concurrency {best_c}), at any latency {capacity_any:.2f}/s; "
                      "closed loop with nothing refused, concurrency: answers/s, p95 ms: "
                      + ", ".join(f"{c}: {r:.2f}, {p * 1e3:.0f}" for c, r, p in curve), flush=True)
                deploy(env, dash, shipped, tmp)
                wait_budget(api, 2.0)
                hey(url, body, ctype, workers=1, n=3)
                runs = []
                for load in (1, 4, 16):
                    offered = load * capacity
                    before = serve_pss_gb()
                    rows = open_load(url, body, ctype, offered, a.seconds, longest_s=2 * budget_s)
                    after = serve_pss_gb()
                    codes = [c for _, c, _ in rows]
                    ok = [t for t, c, _ in rows if c == 200]
                    shed = [t for t, c, _ in rows if c in (503, 429)]
                    span = max(o + t for t, _, o in rows) if rows else a.seconds
                    normal = hey(url, body, ctype, workers=1, n=5)
                    run = {"load": load, "offered_per_s": offered, "requests": len(rows),
                           "codes": {str(c): codes.count(c) for c in sorted(set(codes))},
                           "refused_p50_ms": pct(shed, 50) * 1e3, "refused_max_ms": max(shed, default=float("nan")) * 1e3,
                           "answered_p95_ms": pct(ok, 95) * 1e3, "budget_ms": 2 * pct(alone, 50) * 1e3,
                           "answered_per_s": len(ok) / span, "capacity_per_s": capacity,
                           "capacity_any_latency_per_s": capacity_any,
                           "pss_gb": [before, after], "after": [c for _, c, _ in normal]}
                    runs.append(run)
                    others = sum(v for k, v in run["codes"].items() if k not in ("200", "503", "429"))
                    print(f"  {load:>2}x ({offered:.1f}/s offered, evenly spaced): {run['codes']} "
                          f"({others} other); refused p50 {run['refused_p50_ms']:.0f} ms, max "
                          f"{run['refused_max_ms']:.0f} ms; answered p95 {run['answered_p95_ms']:.0f} ms "
                          f"(2x unloaded p50 = {run['budget_ms']:.0f} ms; ratio "
                          f"{run['answered_p95_ms'] / run['budget_ms']:.2f}); answered "
                          f"{run['answered_per_s']:.2f}/s = {run['answered_per_s'] / capacity:.2f}x capacity at budget "
                          f"({run['answered_per_s'] / capacity_any:.2f}x at any latency); "
                          f"PSS {before:.2f} -> {after:.2f} GB ({(after - before) / before:+.1%}); right after: "
                          f"{sum(c == 200 for c in run['after'])}/5 answered", flush=True)
                figures[kind] = {"unloaded_p50_ms": pct(alone, 50) * 1e3, "capacity_per_s": capacity,
                                 "capacity_concurrency": best_c, "capacity_any_latency_per_s": capacity_any,
                                 "curve": curve, "runs": runs}
        finally:
            subprocess.run(["bash", str(ROOT / "cluster" / "local.sh"), "stop", str(state)], env=env,
                           capture_output=True, timeout=120)
    if a.out:
        Path(a.out).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
