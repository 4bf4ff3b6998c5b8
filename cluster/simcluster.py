"""A multi-node Ray cluster on one machine, and the drills that run on it.

Real raylets (`ray.cluster_utils.Cluster`): a head with no CPUs (the driver and Train's
controllers run there) and worker nodes with declared shapes, token auth on. Used by
tests/test_multinode.py and benchmarks/multinode.py; run it directly to try a plan:

    python -m cluster.simcluster plan --node 8:1 --node 8:1 --node 8:1 --args "--data D --out O --gpus-per-worker 1"
    python -m cluster.simcluster drill --data SCANNED --out OUT --json result.json

`drill` trains one member with 2 DDP workers on two nodes, kills a node holding a worker after
the first checkpoint, and reports what happened (resume, seconds from the kill to the resumed
epoch, the nodes each rank ran on) as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def token_env() -> dict:
    """Token auth on, with a token file of our own unless one is given (never switched off)."""
    env = {"RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    if not os.environ.get("RAY_AUTH_TOKEN_PATH") and not os.environ.get("RAY_AUTH_TOKEN"):
        path = Path(tempfile.mkdtemp(prefix="skinray-token-")) / "token"
        path.write_text(secrets.token_hex(32))
        path.chmod(0o600)
        env["RAY_AUTH_TOKEN_PATH"] = str(path)
    return env


def parse_node(text: str) -> dict:
    """'CPUS[:GPUS]' -> add_node kwargs."""
    cpus, _, gpus = text.partition(":")
    return {"num_cpus": float(cpus) if "." in cpus else int(cpus), "num_gpus": int(gpus or 0)}


@contextmanager
def simulated_cluster(nodes: list[dict], head_cpus: int = 0, dashboard: bool = False,
                      head_resources: dict | None = None):
    """Start the head and the worker nodes; yields (cluster, {node_id: Node}). The caller's
    environment must already hold the auth settings (see token_env). `dashboard`: the head also
    runs the dashboard (Ray's state API: which node holds which actor) on a free port."""
    import socket
    from ray.cluster_utils import Cluster
    head = {"num_cpus": head_cpus, "include_dashboard": dashboard, "resources": head_resources or {}}
    if dashboard:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            head |= {"dashboard_host": "127.0.0.1", "dashboard_port": s.getsockname()[1]}
    cluster = Cluster(initialize_head=True, connect=False, head_node_args=head)
    workers = {}
    try:
        for spec in nodes:
            n = cluster.add_node(**spec)
            workers[n.node_id] = n
        cluster.wait_for_nodes()
        yield cluster, workers
    finally:
        cluster.shutdown()


class LineLog:
    """A child's merged output, kept with the time each line arrived."""

    def __init__(self, proc: subprocess.Popen, echo: bool = False) -> None:
        self.lines: list[tuple[float, str]] = []
        self.echo = echo
        self.thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self.thread.start()

    def _read(self, proc):
        for line in proc.stdout:
            self.lines.append((time.time(), line.rstrip("\n")))
            if self.echo:
                print(line, end="", flush=True)

    def first(self, pattern: str, after: float = 0.0):
        rx = re.compile(pattern)
        return next(((t, s) for t, s in self.lines if t >= after and rx.search(s)), None)

    def text(self) -> str:
        return "\n".join(s for _, s in self.lines)


def _checkpointed(storage: Path, run: str) -> bool:
    snap = storage / run / "checkpoint_manager_snapshot.json"  # what Train V2 restores from
    try:
        return snap.is_file() and "checkpoint_" in snap.read_text()
    except OSError:
        return False


def _busy_nodes(workers: dict) -> list[str]:
    """Ids of the simulated worker nodes whose CPUs are all taken now (Ray's state API: the head runs the
    dashboard)."""
    import ray
    from skin.cluster import free_per_node
    if not ray.is_initialized():
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False, configure_logging=False)
    free = free_per_node()
    return [nid for nid in workers if free.get(nid, {}).get("CPU", 0) < 1e-6]


def _rank_nodes(log: LineLog) -> dict[int, list[str]]:
    """rank -> the nodes it ran on, in order (from the workers' 'rank r/w on node N' lines)."""
    ranks: dict[int, list[str]] = {}
    for _, line in list(log.lines):
        m = re.search(r"rank (\d+)/(\d+) on node ([0-9a-f]+)", line)
        if m:
            ranks.setdefault(int(m.group(1)), []).append(m.group(3))
    return ranks


def drill(data: str, out: str, epochs: int = 5, image_size: int = 32, kill: bool = True,
          echo: bool = False, timeout_s: float = 600) -> dict:
    """2 DDP workers (1 CPU each) of one member on a cluster of a 0-CPU head and three 1-CPU
    nodes; after the first registered checkpoint the node of one worker is killed, and Train
    restarts the group on the two nodes left, from that checkpoint."""
    os.environ.update(token_env())
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    report: dict = {"killed": None}
    with simulated_cluster([{"num_cpus": 1}] * 3, dashboard=True) as (cluster, workers):
        os.environ["RAY_ADDRESS"] = cluster.address
        env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_DEDUP_LOGS="0")
        cmd = [sys.executable, str(ROOT / "jobs" / "train.py"), "--data", data, "--out", out, "--smoke",
               "--members", "mobilenetv2", "--workers", "2", "--cpus-per-worker", "1", "--epochs", str(epochs),
               "--image-size", str(image_size), "--name", "drill", "--max-failures", "3",
               "--verbose"]  # the workers' own lines, as they print them: the drill reads ranks and resumes there
        t0 = time.time()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        log = LineLog(proc, echo)
        storage = Path(out) / "ray_results"
        try:
            if kill:
                while not _checkpointed(storage, "drill-mobilenetv2"):
                    if proc.poll() is not None or time.time() - t0 > timeout_s:
                        raise RuntimeError("training ended or stalled before its first checkpoint:\n"
                                           + log.text()[-4000:])
                    time.sleep(0.3)
                held = _busy_nodes(workers)  # 1-CPU nodes whose CPU a Train worker holds
                report["worker_nodes_before"] = len(held)
                if not held:
                    raise RuntimeError("no worker node holds a Train worker:\n" + log.text()[-3000:])
                victim = held[0]
                t_kill = time.time()
                cluster.remove_node(workers.pop(victim), allow_graceful=False)
                report["killed"] = {"node": victim, "at_s": t_kill - t0}
                while proc.poll() is None and not log.first(r"resumed from epoch", t_kill):
                    assert time.time() - t0 < timeout_s, "no resume within the time limit"
                    time.sleep(0.2)
                report["worker_nodes_after"] = len(_busy_nodes(workers))
            rc = proc.wait(timeout=max(1, timeout_s - (time.time() - t0)))
        finally:
            if proc.poll() is None:
                proc.kill()
            log.thread.join(timeout=5)
            import ray
            if ray.is_initialized():
                ray.shutdown()
        report |= {"returncode": rc, "seconds": time.time() - t0, "log_tail": log.text()[-3000:]}
        report["rank_nodes"] = _rank_nodes(log)
        if kill:
            resumed = log.first(r"resumed from epoch", t_kill)
            report["resumed"] = resumed is not None
            if resumed:
                report["kill_to_resumed_s"] = resumed[0] - t_kill
                report["resumed_line"] = resumed[1]
        report["epoch_s"] = [float(m.group(1)) for _, s in log.lines
                             if (m := re.search(r"epoch \d+/\d+ .*\((\d+\.\d+)s,", s))]
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pl = sub.add_parser("plan", help="jobs/train.py --dry-run on a simulated cluster of the given node shapes")
    pl.add_argument("--head-cpus", type=int, default=4)
    pl.add_argument("--node", action="append", default=[], help="CPUS[:GPUS], once per worker node")
    pl.add_argument("--args", action="append", required=True, help="jobs/train.py arguments, one quoted string "
                    "per dry run (repeat for several runs on the same cluster)")
    pl.add_argument("--hold", metavar="CPUS[:GPUS]", help="before the dry runs, an actor holds these on one node "
                    "(the plans must count only what is free)")
    d = sub.add_parser("drill", help="kill a node under 2-worker DDP training and report the resume")
    d.add_argument("--data", required=True)
    d.add_argument("--out", required=True)
    d.add_argument("--epochs", type=int, default=5)
    d.add_argument("--image-size", type=int, default=32)
    d.add_argument("--json", help="write the report here")
    a = p.parse_args(argv)
    if a.cmd == "plan":
        import shlex
        os.environ.update(token_env())
        worst = 0
        with simulated_cluster([parse_node(n) for n in a.node], a.head_cpus, dashboard=bool(a.hold)) as (cluster, _):
            env = dict(os.environ, RAY_ADDRESS=cluster.address)
            if a.hold:  # an actor (in a child, detached) holding CPUS[:GPUS] on some node, as another job would
                hold = parse_node(a.hold)
                code = ("import ray, sys; ray.init(log_to_driver=False)\n"
                        f"@ray.remote(num_cpus={hold['num_cpus']}, num_gpus={hold['num_gpus']})\n"
                        "class Hold:\n    def ok(self): return 1\n"
                        "h = Hold.options(name='hold', lifetime='detached').remote(); ray.get(h.ok.remote())\n")
                subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
            for k, args in enumerate(a.args):
                r = subprocess.run([sys.executable, str(ROOT / "jobs" / "train.py"), *shlex.split(args), "--dry-run"],
                                   env=env, cwd=ROOT, capture_output=True, text=True)
                print(f"### run {k} rc={r.returncode}\n{r.stdout}### stderr\n{r.stderr}", flush=True)
                worst = max(worst, r.returncode)
        return worst
    report = drill(a.data, a.out, a.epochs, a.image_size, echo=True)
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "log_tail"}, indent=2))
    return 0 if report["returncode"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
