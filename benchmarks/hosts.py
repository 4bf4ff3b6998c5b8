"""Ray across a network on this machine (cluster/hosts.py: network namespaces on a private /24).

    python benchmarks/hosts.py [train] [train-fault] [serve] [serve-fault]     (root; default: all four)

Host A runs the Ray head (token auth, Jobs API, Serve's proxy and ingress), B and C are 1-CPU
(training) or 2-CPU (serving) workers, D is a client that submits jobs and sends requests. Only the
namespaces' own bridge carries traffic; each phase makes its hosts and removes them.

train        jobs/train.py --workers 2 (DDP over gloo, one worker on B, one on C), submitted from D
             to A's Jobs API. Per epoch: the bytes B and C moved over their links (their
             /sys/class/net/eth0/statistics, sampled every 0.1 s and read at each epoch's start and
             end) beside the bytes DDP's all-reduce must move (gradient bytes x steps), and the idle
             cluster's traffic over as long; every val row scored once.
train-fault  --workers 1-2 (elastic). After the 2nd checkpoint the link of the worker host that does
             not hold Train's controller goes down: seconds until the node is marked dead, until
             training goes on with the worker left (its first epoch after the cut), from which
             epoch, and whether the run completes. Once it has gone on (≤ 300 s) the link comes
             back: seconds until the host's node is alive again (its old raylet, marked dead,
             exits; its Ray is started again, as a supervisor would) and until the group is 2 again.
serve        The app with its ingress on A and the members on B and C (custom resources), deployed
             from D; its answers to D beside the same bundle's in-process answers.
serve-fault  Under load from D, the link of the worker host holding the most member replicas goes
             down for 60 s: the statuses (only 200 and 503 allowed), seconds until every request is
             answered again, the slowest request; then the host's node back as above.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from cluster.hosts import Hosts, available  # noqa: E402
from cluster.simcluster import LineLog  # noqa: E402

MEMBER = "mobilenetv2"
LINK_DOWN_S = 90.0  # serving
TRAIN_CUT_MAX_S = 300.0
PHASES = ("train", "train-fault", "serve", "serve-fault")


# --------------------------------------------------------------------------- helpers
class Counters:
    """Hosts' link byte counters sampled every `period` s in a thread: (time, {host: rx + tx})."""

    def __init__(self, hosts: Hosts, which: list[int], period: float = 0.1) -> None:
        self.hosts, self.which, self.samples = hosts, which, []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(period,), daemon=True)
        self.thread.start()

    def _run(self, period):
        while not self.stop.is_set():
            t = time.time()
            self.samples.append((t, {i: sum(self.hosts.counters(i)) for i in self.which}))
            time.sleep(max(0.0, period - (time.time() - t)))

    def at(self, t: float) -> dict:
        """The last sample at or before t (else the first)."""
        best = self.samples[0]
        for s in self.samples:
            if s[0] <= t:
                best = s
        return best[1]

    def close(self):
        self.stop.set()
        self.thread.join(5)


NODES = """
import json, sys, time, ray
ray.init(address=sys.argv[1], log_to_driver=False)
for _ in range(int(sys.argv[2])):
    print(json.dumps([[n["NodeManagerAddress"], n["Alive"]] for n in ray.nodes()]), flush=True)
    time.sleep(0.5)
"""


class NodeWatch:
    """A driver in host `client` that prints which nodes are alive every 0.5 s (bounded)."""

    def __init__(self, hosts: Hosts, client: int, head: str, env: dict, seconds: float = 900) -> None:
        cmd = ["ip", "netns", "exec", hosts.names[client], sys.executable, "-c", NODES, head, str(int(seconds * 2))]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.log = LineLog(self.proc)

    def alive(self, after: float = 0.0) -> list[tuple[float, set]]:
        return [(t, {a for a, ok in json.loads(s) if ok}) for t, s in list(self.log.lines)
                if t >= after and s.startswith("[")]

    def first(self, pred, after: float) -> float | None:
        return next((t for t, alive in self.alive(after) if pred(alive)), None)

    def close(self):
        self.proc.kill()


def start_cluster(hosts: Hosts, token: str, worker_cpus: int, head_cpus: int = 0,
                  resources: dict | None = None) -> str:
    head = hosts.ray_head(0, token, num_cpus=head_cpus, resources=json.dumps({"host_a": 1}))
    for i in (1, 2):
        hosts.ray_worker(i, head, token, num_cpus=worker_cpus,
                         resources=json.dumps(resources) if resources else None)
    return head


def raylet_running(hosts: Hosts, i: int) -> bool:
    for pid in subprocess.run(["ip", "netns", "pids", hosts.names[i]], capture_output=True, text=True).stdout.split():
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "raylet":
                return True
        except OSError:
            pass
    return False


def rejoin(hosts: Hosts, i: int, head: str, token: str, watch: NodeWatch, t_cut: float, up_at: float,
           worker_cpus: int, resources: dict | None) -> dict:
    """After host i's link is back: if the cluster marked its node dead, wait (≤ 30 s) for the old raylet
    to exit, start its Ray again (as a supervisor would) and time until its address is alive again."""
    address = hosts.addresses[i]
    dead = watch.first(lambda alive: address not in alive, t_cut)
    if dead is None:
        return {"marked_dead": False}
    report: dict = {"marked_dead": True, "cut_to_node_dead_s": dead - t_cut}
    deadline = time.time() + 30
    while time.time() < deadline:
        if not raylet_running(hosts, i):
            report["old_raylet_exited_after_link_up_s"] = time.time() - up_at
            break
        time.sleep(0.5)
    hosts.kill_all(i)
    t = time.time()
    hosts.ray_worker(i, head, token, num_cpus=worker_cpus, resources=json.dumps(resources) if resources else None)
    deadline = time.time() + 120
    while (back := watch.first(lambda alive: address in alive, t)) is None and time.time() < deadline:
        time.sleep(0.5)
    report["restart_to_alive_s"] = None if back is None else back - t
    report["link_up_to_alive_s"] = None if back is None else back - up_at
    return report


def reports(storage: Path) -> dict | None:
    """The latest reported epoch's metrics of the member's run (Train V2's checkpoint snapshot)."""
    snap = storage / f"hosts-{MEMBER}" / "checkpoint_manager_snapshot.json"
    try:
        return json.loads(snap.read_text())["latest_checkpoint_result"]["metrics"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def make_data(root: Path, per_class: int) -> Path:
    from skin.data import ScanOptions, scan
    from skin.synth import write_dataset
    synth = write_dataset(root / "synth", per_class=per_class, size=96, seed=3, progress=False)
    scan(synth, root / "data", ScanOptions(workers=2), progress=False)
    return root / "data"


def gradient_bytes() -> int:
    from skin.registry import create_model
    m = create_model(MEMBER, 6, pretrained="none", input_size=64)
    return sum(p.numel() * p.element_size() for p in m.parameters() if p.requires_grad)


def train_args(data: Path, out: Path, workers: str, epochs: int, batch: int) -> list[str]:
    return ["--data", str(data), "--out", str(out), "--members", MEMBER, "--workers", workers, "--cpus-per-worker",
            "1", "--epochs", str(epochs), "--image-size", "64", "--batch-size", str(batch), "--pretrained", "none",
            "--name", "hosts", "--storage-path", str(out / "store"), "--max-failures", "3"]


# --------------------------------------------------------------------------- phases
def phase_train(tmp: Path, token: str, data: Path, epochs: int, batch: int) -> dict:
    from skin.data import load_classes, load_manifest, training_split
    classes = load_classes(data)
    n_train = len(load_manifest(data, training_split(data), classes))
    n_val = len(load_manifest(data, "val", classes))
    steps = (-(-n_train // 2)) // batch  # per rank: its half of the rows (padded), whole batches
    out = tmp / "train"
    with Hosts(4) as hosts:
        head = start_cluster(hosts, token, worker_cpus=1)
        idle = Counters(hosts, [1, 2])
        time.sleep(10)
        idle.close()
        idle_rate = {i: (idle.samples[-1][1][i] - idle.samples[0][1][i]) / (idle.samples[-1][0] - idle.samples[0][0])
                     for i in (1, 2)}
        counters = Counters(hosts, [1, 2])
        proc = hosts.submit(3, token, ["jobs/train.py", *train_args(data, out, "2", epochs, batch)])
        log = LineLog(proc)
        epochs_seen: dict[int, dict] = {}
        while proc.poll() is None:
            m = reports(out / "store")
            if m and m["epoch"] not in epochs_seen:
                epochs_seen[m["epoch"]] = m
            time.sleep(0.1)
        m = reports(out / "store")
        if m:
            epochs_seen.setdefault(m["epoch"], m)
        time.sleep(0.3)
        counters.close()
        log.thread.join(5)
        if proc.returncode != 0:
            raise RuntimeError("training across hosts failed:\n" + log.text()[-4000:])
    per_epoch = []
    for e, m in sorted(epochs_seen.items()):
        a, b = counters.at(m["epoch_start"]), counters.at(m["epoch_end"])
        seconds = m["epoch_end"] - m["epoch_start"]
        per_epoch.append({"epoch": e, "seconds": seconds, **{f"host_{'BC'[i - 1]}_MB": (b[i] - a[i]) / 1e6 for i in (1, 2)},
                          "idle_MB_over_as_long": sum(idle_rate.values()) * seconds / 1e6})
    from skin.checkpoint import load_tensors
    vp = load_tensors(out / "val_probs.safetensors")
    grad = gradient_bytes()
    # ring all-reduce over 2 ranks: each rank sends (n-1)/n of the gradient twice = the gradient once, and
    # receives as much; rx + tx per host = 2 x gradient bytes per step
    expected = 2 * grad * steps / 1e6
    ranks = sorted(set(re.findall(r"world_rank=(\d), local_rank=0, node_rank=\d", log.text())))
    nodes = sorted(set(re.findall(r"\(ip=([\d.]+), pid=\d+\) world_rank", log.text())))
    return {"epochs": per_epoch, "gradient_MB": grad / 1e6, "steps_per_epoch_per_rank": steps,
            "expected_allreduce_MB_per_host_per_epoch": expected, "idle_MB_per_s": sum(idle_rate.values()) / 1e6,
            "val_rows": n_val, "val_rows_scored": int(vp["labels"].shape[0]), "ranks": ranks, "rank_hosts": nodes}


def phase_train_fault(tmp: Path, token: str, data: Path, epochs: int, batch: int) -> dict:
    out = tmp / "fault"
    os.environ["RAY_DEDUP_LOGS"] = "0"  # every line of every process, to see where the controller runs
    report: dict = {}
    with Hosts(4) as hosts:
        head = start_cluster(hosts, token, worker_cpus=1)
        watch = NodeWatch(hosts, 3, head, hosts.env(token))
        t0 = time.time()
        proc = hosts.submit(3, token, ["jobs/train.py", *train_args(data, out, "1-2", epochs, batch)])
        log = LineLog(proc)
        while (m := reports(out / "store")) is None or m["epoch"] < 2:
            if proc.poll() is not None or time.time() - t0 > 600:
                raise RuntimeError("the run ended or stalled before its 2nd checkpoint:\n" + log.text()[-4000:])
            time.sleep(0.1)
        actors = hosts.actors(3, head, token)
        ctrl = actors.get("TrainController", [])
        victim = next(i for i in (2, 1) if hosts.addresses[i] not in ctrl)
        report["controller_host"] = ctrl
        report["train_worker_hosts"] = actors.get("RayTrainWorker", [])
        report["cut_host"] = hosts.addresses[victim]
        report["cut_after_epoch"] = m["epoch"]
        t_cut = time.time()
        hosts.link(victim, up=False)
        # the link stays down until training goes on without the host (a resumed epoch), at most TRAIN_CUT_MAX_S
        while proc.poll() is None and time.time() - t_cut < TRAIN_CUT_MAX_S:
            resumed = log.first(r"resumed from epoch", t_cut)
            if resumed and log.first(r"epoch \d+/\d+ train_loss", resumed[0]):
                break
            time.sleep(0.2)
        report["link_down_s"] = time.time() - t_cut
        hosts.link(victim, up=True)
        up_at = time.time()
        back = rejoin(hosts, victim, head, token, watch, t_cut, up_at, 1, None)
        proc.wait(timeout=max(1, 900 - (time.time() - t0)))
        log.thread.join(5)
        report["returncode"] = proc.returncode
        resumed = log.first(r"resumed from epoch", t_cut)
        report["resumed_line"] = resumed[1].split("] ", 1)[-1][:120] if resumed else None
        report["cut_to_resumed_s"] = None if resumed is None else resumed[0] - t_cut
        after = log.first(r"epoch \d+/\d+ train_loss", resumed[0] if resumed else t_cut)
        report["cut_to_next_epoch_s"] = None if after is None else after[0] - t_cut
        report["worker_group_sizes"] = [int(s) for s in re.findall(r"Started training worker group of size (\d+)",
                                                                   "\n".join(s for _, s in log.lines if "pid=" in s
                                                                             and ", ip=" not in s))]
        report |= back
        grew = log.first(r"Started training worker group of size 2", up_at)
        report["link_up_to_group_of_2_s"] = None if grew is None else grew[0] - up_at
        (tmp / "train-fault.log").write_text("\n".join(f"{t - t_cut:8.1f} {s}" for t, s in log.lines))
        report["nodes_alive_at_end"] = sorted(watch.alive()[-1][1]) if watch.alive() else []
        watch.close()
        if proc.returncode != 0:
            report["log_tail"] = log.text()[-3000:]
    return report


LOAD = """
import json, sys, threading, time, requests
from concurrent.futures import ThreadPoolExecutor
lock = threading.Lock()
url, seconds, conc, path, key = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
data = open(path, "rb").read()
end = time.time() + seconds
def loop(_):
    s = requests.Session()
    for _ in range(100000):
        if time.time() > end:
            return
        t = time.time()
        try:
            r = s.post(url + "/v1/predict", files={"file": ("x.jpg", data, "image/jpeg")},
                       headers={"X-API-Key": key}, timeout=60)
            status = r.status_code
        except requests.RequestException:
            status = 0
        with lock:
            sys.stdout.write(json.dumps([t, time.time() - t, status]) + "\\n")
            sys.stdout.flush()
with ThreadPoolExecutor(conc) as pool:
    list(pool.map(loop, range(conc)))
"""

PREDICT = """
import json, sys, requests
url, path, key = sys.argv[1:4]
for _ in range(60):
    try:
        if requests.get(url + "/healthz", timeout=2).status_code == 200:
            break
    except requests.RequestException:
        pass
    import time; time.sleep(1)
r = requests.post(url + "/v1/predict", files={"file": ("x.jpg", open(path, "rb").read(), "image/jpeg")},
                  headers={"X-API-Key": key} if key else {}, timeout=60)
nokey = requests.post(url + "/v1/predict", files={"file": ("x.jpg", open(path, "rb").read(), "image/jpeg")},
                      timeout=60).status_code
print(json.dumps({"status": r.status_code, "body": r.json(), "no_key_status": nokey}))
"""


def serve_cluster(hosts: Hosts, token: str, bundle: Path, key: str) -> tuple[str, str]:
    """Head in A (1 CPU, host_a), B and C with 2 CPUs and member_host 2 each; the app deployed from D."""
    from skin.registry import DEFAULT_MEMBERS
    head = hosts.ray_head(0, token, num_cpus=1, resources=json.dumps({"host_a": 1}))
    for i in (1, 2):
        hosts.ray_worker(i, head, token, num_cpus=2, resources=json.dumps({"member_host": 2}))
    return head, hosts.deploy(3, head, token, str(bundle), list(DEFAULT_MEMBERS), key)


def replicas(hosts: Hosts, head: str, token: str) -> dict[str, list[str]]:
    """{host address: [the Serve deployments with a replica there]}."""
    out: dict[str, list[str]] = {}
    for cls, ips in hosts.actors(3, head, token).items():
        if cls.startswith("ServeReplica:"):
            for ip in ips:
                out.setdefault(ip, []).append(cls.split(":", 2)[-1])
    return out


def phase_serve(tmp: Path, token: str, bundle: Path, image: Path) -> dict:
    from skin.bundle import Bundle
    from skin.ensemble import Predictor
    key = secrets.token_hex(8)
    with Hosts(4) as hosts:
        head, url = serve_cluster(hosts, token, bundle, key)
        r = hosts.run(3, [sys.executable, "-c", PREDICT, url, str(image), key], env=hosts.env(None), timeout=200)
        got = json.loads(r.stdout.strip().splitlines()[-1])
        placed = replicas(hosts, head, token)
    from PIL import Image
    local = Predictor(Bundle.load(bundle)).predict([Image.open(image).convert("RGB")])[0]["probabilities"]
    remote = got["body"]["probabilities"]
    diff = max(abs(remote[c] - local[c]) for c in local)
    return {"status": got["status"], "no_key_status": got["no_key_status"], "max_abs_diff_vs_in_process": diff,
            "replicas_by_host": placed}


def phase_serve_fault(tmp: Path, token: str, bundle: Path, image: Path, concurrency: int) -> dict:
    key = secrets.token_hex(8)
    report: dict = {}
    with Hosts(4) as hosts:
        head, url = serve_cluster(hosts, token, bundle, key)
        hosts.run(3, [sys.executable, "-c", PREDICT, url, str(image), key], env=hosts.env(None), timeout=200)
        placed = replicas(hosts, head, token)
        report["replicas_before"] = placed
        victim = max((1, 2), key=lambda i: len(placed.get(hosts.addresses[i], [])))
        watch = NodeWatch(hosts, 3, head, hosts.env(token))
        seconds = 30 + LINK_DOWN_S + 60
        cmd = ["ip", "netns", "exec", hosts.names[3], sys.executable, "-c", LOAD, url, str(seconds), str(concurrency),
               str(image), key]
        load = subprocess.Popen(cmd, env=hosts.env(None), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = LineLog(load)
        time.sleep(30)
        t_cut = time.time()
        hosts.link(victim, up=False)
        time.sleep(LINK_DOWN_S)
        hosts.link(victim, up=True)
        up_at = time.time()
        load.wait(timeout=seconds + 120)
        lines.thread.join(5)
        report |= rejoin(hosts, victim, head, token, watch, t_cut, up_at, 2, {"member_host": 2})
        report["cut_host"] = hosts.addresses[victim]
        report["replicas_after"] = replicas(hosts, head, token)
        watch.close()
    recs = [json.loads(s) for _, s in lines.lines if s.startswith("[")]
    if not any(r[0] < t_cut and r[2] == 200 for r in recs):
        raise RuntimeError("the load answered nothing before the cut:\n" + "\n".join(s for _, s in lines.lines[-30:]))
    before = [r for r in recs if r[0] < t_cut]
    after = [r for r in recs if r[0] >= t_cut]
    statuses: dict = {}
    for r in after:
        statuses[str(r[2])] = statuses.get(str(r[2]), 0) + 1
    bad = [r for r in after if r[2] != 200]
    last_bad_end = max((r[0] + r[1] for r in bad), default=t_cut)
    report |= {"requests_before_cut": len(before), "statuses_before_cut": sorted({r[2] for r in before}),
               "p50_before_s": statistics.median([r[1] for r in before if r[2] == 200]) if before else None,
               "statuses_after_cut": statuses, "slowest_after_cut_s": max((r[1] for r in after), default=None),
               "cut_to_answers_whole_s": last_bad_end - t_cut if bad else 0.0,
               "p50_after_recovery_s": statistics.median([r[1] for r in after if r[0] > last_bad_end and r[2] == 200]
                                                         or [float("nan")])}
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phases", nargs="*", metavar="PHASE", help=f"any of {', '.join(PHASES)} (default: all)")
    p.add_argument("--per-class", type=int, default=40)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--fault-epochs", type=int, default=40, help="train-fault's epochs: enough to go on after the "
                   "cut and to grow back after the link returns")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--health-check", metavar="PERIOD_MS,TIMEOUT_MS,FAILURES",
                   help="the GCS's node health check (RAY_health_check_period_ms, _timeout_ms, _failure_threshold); "
                   "default: Ray's own (3000,10000,5)")
    p.add_argument("--group-start-timeout", type=float, help="RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (Ray's "
                   "default 60): how long Train waits for a worker group of the size it chose before it tries again")
    p.add_argument("--json", help="write the figures here")
    a = p.parse_args(argv)
    a.phases = a.phases or list(PHASES)
    if set(a.phases) - set(PHASES):
        p.error(f"unknown phase(s) {sorted(set(a.phases) - set(PHASES))}: choose from {', '.join(PHASES)}")
    if a.health_check:
        period, timeout, failures = a.health_check.split(",")
        os.environ.update(RAY_health_check_period_ms=period, RAY_health_check_timeout_ms=timeout,
                          RAY_health_check_failure_threshold=failures)
    why = available()
    if why:
        print(f"hosts: {why}", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="skinray-hosts-"))
    token = tmp / "token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["PYTHONPATH"] = os.pathsep.join(x for x in (str(ROOT), os.environ.get("PYTHONPATH", "")) if x)
    if a.group_start_timeout:
        os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(a.group_start_timeout)
    results: dict = {"health_check": a.health_check or "ray default (3000,10000,5)",
                     "group_start_timeout_s": a.group_start_timeout or "ray default (60)"}
    if {"train", "train-fault"} & set(a.phases):
        data = make_data(tmp, a.per_class)
    if {"serve", "serve-fault"} & set(a.phases):
        from benchmarks._harness import random_bundle
        from skin.synth import jpeg_bytes, make_sample
        bundle = random_bundle(tmp / "bundle", size=64)
        image = tmp / "x.jpg"
        image.write_bytes(jpeg_bytes(make_sample(1, 0, 0, 96), 0, 0))
    for phase in a.phases:
        t = time.time()
        if phase == "train":
            r = phase_train(tmp, str(token), data, a.epochs, a.batch_size)
        elif phase == "train-fault":
            r = phase_train_fault(tmp, str(token), data, a.fault_epochs, a.batch_size)
        elif phase == "serve":
            r = phase_serve(tmp, str(token), bundle, image)
        else:
            r = phase_serve_fault(tmp, str(token), bundle, image, a.concurrency)
        results[phase] = r
        print(f"\n== {phase} ({time.time() - t:.0f}s)\n{json.dumps(r, indent=1)}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
