"""Serving on a simulated multi-node cluster (real raylets on this machine, token auth on).

    python benchmarks/serve_multinode.py [--size 64] [--concurrency 8]

The head holds the ingress (and Serve's controller and proxy); two 2-CPU worker nodes hold the
members (custom resources `head` / `member_node` pin them: AppArgs `ingress_resources` and each
member's `resources`).
ResNet50 (the slowest member) has Serve autoscaling (min 1, max 3, target 2 ongoing requests).

1. Scale: idle p50/p99 at concurrency 1, then load at --concurrency: ResNet50's replicas over
   time and how they spread over the nodes (from each node's used CPUs: a member replica holds
   0.5), p50/p99 before and after the scale-up, errors; then idle until it shrinks.
2. Node loss: under load, kill the worker node holding the most member replicas: requests in
   flight fail with 503 (none hangs past member_timeout_s), and the seconds until answers are
   whole again once Serve has restarted the replicas on the node left.
Every request loop is bounded in count and time and targets 127.0.0.1 only.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._harness import random_bundle  # noqa: E402
from cluster.simcluster import simulated_cluster, token_env  # noqa: E402


def image_bytes() -> bytes:
    from skin.synth import jpeg_bytes, make_sample
    return jpeg_bytes(make_sample(1, 0, 0, 96), 0, 0)


class Load:
    """`concurrency` threads posting one image each until stopped; every request recorded."""

    def __init__(self, url: str, data: bytes, concurrency: int, timeout_s: float = 60) -> None:
        self.url, self.data, self.timeout = url, data, timeout_s
        self.records: list[tuple[float, float, int]] = []  # (start, seconds, status; 0 = no answer)
        self.stop = threading.Event()
        self.pool = ThreadPoolExecutor(concurrency)
        self.futures = [self.pool.submit(self._loop) for _ in range(concurrency)]

    def _loop(self):
        s = requests.Session()
        for _ in range(100_000):  # bounded; stopped long before
            if self.stop.is_set():
                return
            t0 = time.time()
            try:
                status = s.post(self.url + "/v1/predict?cam=true", files={"file": ("x.jpg", self.data, "image/jpeg")},
                                timeout=self.timeout).status_code
            except requests.RequestException:
                status = 0
            self.records.append((t0, time.time() - t0, status))

    def close(self):
        self.stop.set()
        for f in self.futures:
            f.result()
        self.pool.shutdown()


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def replicas(app="skinray") -> dict:
    from ray import serve
    st = serve.status().applications[app].deployments
    return {name: sum(d.replica_states.values()) for name, d in st.items()}


def placement() -> dict:
    """deployment -> {node id prefix: live replicas} (Ray's state API)."""
    from ray.util.state import list_actors
    out: dict = {}
    for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000):
        if a.class_name.startswith("ServeReplica:skinray:"):
            dep = a.class_name.rsplit(":", 1)[1]
            out.setdefault(dep, {}).setdefault(a.node_id[:8], 0)
            out[dep][a.node_id[:8]] += 1
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=64, help="members' input size (random weights)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--load-s", type=float, default=60, help="seconds of load in the scale phase")
    p.add_argument("--idle-s", type=float, default=90, help="longest wait for the scale-down")
    p.add_argument("--json", help="also write the figures here")
    a = p.parse_args(argv)
    os.environ.update(token_env())
    os.environ["PYTHONPATH"] = os.pathsep.join(x for x in (str(ROOT), os.environ.get("PYTHONPATH", "")) if x)
    import ray
    from ray import serve
    from serve_app import AppArgs, build_app
    tmp = Path(tempfile.mkdtemp(prefix="skinray-serve-mn-"))
    bundle = random_bundle(tmp / "bundle", a.size)
    out: dict = {}
    nodes = [{"num_cpus": 2, "resources": {"member_node": 100}}] * 2
    with simulated_cluster(nodes, head_cpus=1, dashboard=True, head_resources={"head": 1}) as (cluster, workers):
        ray.init(address=cluster.address, log_to_driver=False)
        port = 18000 + os.getpid() % 1000
        serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
        member = {"num_cpus": 0.5, "threads": 1, "resources": {"member_node": 0.01}}  # members on the worker nodes
        args = AppArgs(bundle=str(bundle), ingress_cpus=1.0, ingress_resources={"head": 0.01}, member_timeout_s=10,
                       members={
            "mobilenetv2": member, "efficientnet_b1": member,
            "resnet50": {**member, "autoscaling": {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 2,
                                                   "upscale_delay_s": 2, "downscale_delay_s": 10}}})
        t_deploy = time.time()
        serve.run(build_app(args), name="skinray", route_prefix="/", blocking=False)
        url, data = f"http://127.0.0.1:{port}", image_bytes()
        for _ in range(300):
            try:
                if requests.post(url + "/v1/predict", files={"file": ("x.jpg", data, "image/jpeg")}, timeout=30).ok:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.5)
        head_id = next(n["NodeID"] for n in ray.nodes() if n["NodeID"] not in workers)
        print(f"app up in {time.time() - t_deploy:.1f}s; head {head_id[:8]}, workers {[w[:8] for w in workers]}; "
              f"replicas by node {placement()}", flush=True)

        # ---- 1. idle, load, scale-up, idle, scale-down
        lat = []
        for _ in range(20):
            t0 = time.time()
            requests.post(url + "/v1/predict", files={"file": ("x.jpg", data, "image/jpeg")}, timeout=30)
            lat.append(time.time() - t0)
        out["idle_c1"] = {"p50_ms": pct(lat, 0.5) * 1e3, "p99_ms": pct(lat, 0.99) * 1e3}
        load = Load(url, data, a.concurrency)
        t_load, timeline = time.time(), []
        while time.time() - t_load < a.load_s:
            time.sleep(5)
            timeline.append((round(time.time() - t_load), replicas()["resnet50"], placement().get("resnet50", {})))
            print(f"  t={timeline[-1][0]:>3}s under load: resnet50 replicas {timeline[-1][1]} by node {timeline[-1][2]}",
                  flush=True)
        load.close()
        recs = load.records
        grown = next((t for t, n, _ in timeline if n > 1), None)
        first = [d for s, d, st in recs if st == 200 and s - t_load < 10]
        last = [d for s, d, st in recs if st == 200 and s - t_load > a.load_s - 20]
        out["scale"] = {"timeline": timeline, "requests": len(recs), "errors": sum(st != 200 for _, _, st in recs),
                        "first_10s_p50_ms": pct(first, 0.5) * 1e3, "first_10s_p99_ms": pct(first, 0.99) * 1e3,
                        "last_20s_p50_ms": pct(last, 0.5) * 1e3, "last_20s_p99_ms": pct(last, 0.99) * 1e3,
                        "scaled_up_at_s": grown}
        t_idle = time.time()
        while replicas()["resnet50"] > 1 and time.time() - t_idle < a.idle_s:
            time.sleep(2)
        out["scale"]["shrunk_after_idle_s"] = time.time() - t_idle if replicas()["resnet50"] == 1 else None
        print(json.dumps(out, indent=1), flush=True)

        # ---- 2. kill the node holding the most member replicas, under load
        where = placement()
        per_node = {nid[:8]: sum(v.get(nid[:8], 0) for d, v in where.items() if d != "Ensemble") for nid in workers}
        victim = max(workers, key=lambda nid: per_node[nid[:8]])
        load = Load(url, data, a.concurrency, timeout_s=60)
        time.sleep(5)
        t_kill = time.time()
        cluster.remove_node(workers.pop(victim), allow_graceful=False)
        time.sleep(45)  # Serve restarts the lost replicas on the node left
        load.close()
        after = sorted((r for r in load.records if r[0] + r[1] > t_kill))
        bad = [(s, d, st) for s, d, st in after if st != 200]
        first_ok = next((s for s, d, st in after if st == 200 and s > t_kill), None)
        last_bad_end = max((s + d for s, d, st in bad), default=t_kill)
        # whole again: the start of the first request after which every request answered 200
        whole = next((s for k, (s, d, st) in enumerate(after) if all(x[2] == 200 for x in after[k:])), None)
        out["node_loss"] = {"killed_node_member_replicas": per_node.get(victim[:8]), "requests_after_kill": len(after),
                            "non_200": len(bad), "statuses": sorted({st for _, _, st in bad}),
                            "slowest_s": max((d for _, d, _ in after), default=None),
                            "first_200_started_after_kill_s": (first_ok - t_kill) if first_ok else None,
                            "last_failure_ended_after_kill_s": last_bad_end - t_kill,
                            "whole_again_after_kill_s": (whole - t_kill) if whole else None,
                            "replicas_after": replicas(), "replicas_by_node_before": where,
                            "replicas_by_node_after": placement()}
        print(json.dumps(out["node_loss"], indent=1), flush=True)
        serve.shutdown()
        ray.shutdown()
    (tmp / "serve_multinode.json").write_text(json.dumps(out, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
    print(f"raw: {tmp / 'serve_multinode.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
