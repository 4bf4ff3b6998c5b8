"""Hosts on one machine that talk over a network: Linux network namespaces joined by a bridge.

Each host is a network namespace with its own address on a private /24 (veth pairs to a bridge that
lives in a namespace of its own, so no traffic touches the machine's other interfaces); a Ray head
runs in host A with token auth, workers join from the others with their declared CPUs, and host D
can be a client. Everything is torn down on exit, on failure too; names carry a random suffix so
two runs never clash. Needs root (`ip netns`); `available()` says why not where it is not.

    python -m cluster.hosts up --hosts 3          # prints the hosts and a shell line for each; Ctrl-C tears down
    with Hosts(4) as hosts:                         # in code, tests and benchmarks/hosts.py
        head = hosts.ray_head(0, token_path); hosts.ray_worker(1, head, token_path, num_cpus=1)
        hosts.submit(3, token_path, ["jobs/train.py", ...])    # from D to A's Jobs API
        hosts.deploy(3, head, token_path, bundle, members)     # the Serve app: ingress on A, members elsewhere
        hosts.link(1, up=False); hosts.counters(1)             # faults and traffic
"""
from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

IP = shutil.which("ip") or "/usr/sbin/ip"
RAY_PORT, DASHBOARD_PORT, SERVE_PORT = 6379, 8265, 8000
ROOT = Path(__file__).resolve().parents[1]

# a driver in a client host: the alive actors' hosts by class name (Ray's state API)
ACTORS = """
import json, sys, ray
from ray.util.state import list_actors
ray.init(address=sys.argv[1], log_to_driver=False)
ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
out = {}
# the head's dashboard named: the hosts share this machine's /tmp, where another Ray may also be running
dashboard = "http://" + sys.argv[1].split(":")[0] + ":" + sys.argv[2]
for a in list_actors(address=dashboard, filters=[("state", "=", "ALIVE")], limit=1000):
    out.setdefault(a.class_name, []).append(ips.get(a.node_id, "?"))
print(json.dumps(out))
"""

# a driver in a client host: Serve's proxy on the head only, bound to the head's address; the ingress
# pinned to the head (resource host_a), each member on a worker host (resource member_host)
DEPLOY = """
import json, sys, ray
from ray import serve
from serve_app import AppArgs, build_app
head, host_a, port, bundle, key, members = sys.argv[1:7]
ray.init(address=head, log_to_driver=False)
serve.start(proxy_location="HeadOnly", http_options={"host": host_a, "port": int(port)})
args = AppArgs(bundle=bundle, api_key=key or None, ingress_resources={"host_a": 0.01}, member_timeout_s=10,
               members={m: {"num_cpus": 0.5, "resources": {"member_host": 0.5}} for m in json.loads(members)})
serve.run(build_app(args), name="skinray", route_prefix="/", blocking=False)
print("deployed", flush=True)
"""


def available() -> str | None:
    """None when namespaces can be made here, else the reason (for a clear skip)."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    if not Path(IP).exists():
        return "iproute2's ip is not installed"
    name = f"skr-probe-{secrets.token_hex(3)}"
    r = subprocess.run([IP, "netns", "add", name], capture_output=True, text=True)
    if r.returncode != 0:
        return f"ip netns add is not permitted here: {r.stderr.strip()}"
    subprocess.run([IP, "netns", "del", name], capture_output=True)
    return None


class Hosts:
    """N network namespaces on 10.231.<k>.0/24 (k random), host i at .(i + 1), joined by a bridge."""

    def __init__(self, n: int, tag: str | None = None) -> None:
        self.n = n
        self.tag = tag or secrets.token_hex(3)
        self.subnet = f"10.231.{random.randint(2, 250)}"
        self.names = [f"skr-{self.tag}-h{i}" for i in range(n)]
        self.switch = f"skr-{self.tag}-sw"
        self.addresses = [f"{self.subnet}.{i + 1}" for i in range(n)]
        self.state = Path(tempfile.mkdtemp(prefix=f"skr-{self.tag}-"))
        self.procs: list[subprocess.Popen] = []

    def _ip(self, *args: str, ns: str | None = None) -> None:
        cmd = [IP] + (["-n", ns] if ns else []) + list(args)
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")

    def __enter__(self) -> "Hosts":
        try:
            self._ip("netns", "add", self.switch)
            self._ip("link", "set", "lo", "up", ns=self.switch)
            self._ip("link", "add", "br0", "type", "bridge", ns=self.switch)
            self._ip("link", "set", "br0", "up", ns=self.switch)
            for i, (name, addr) in enumerate(zip(self.names, self.addresses)):
                self._ip("netns", "add", name)
                self._ip("link", "set", "lo", "up", ns=name)
                # a veth pair made inside the host, its peer moved to the switch and put on the bridge
                self._ip("link", "add", "eth0", "type", "veth", "peer", "name", f"p{i}", ns=name)
                self._ip("link", "set", f"p{i}", "netns", self.switch, ns=name)
                self._ip("link", "set", f"p{i}", "master", "br0", ns=self.switch)
                self._ip("link", "set", f"p{i}", "up", ns=self.switch)
                self._ip("addr", "add", f"{addr}/24", "dev", "eth0", ns=name)
                self._ip("link", "set", "eth0", "up", ns=name)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop what runs in the hosts and remove every namespace and link made (idempotent)."""
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for i, name in enumerate(self.names):
            if Path(f"/run/netns/{name}").exists():
                self.kill_all(i)  # every process left in the namespace (Ray's daemons) ends before it goes
                subprocess.run([IP, "netns", "del", name], capture_output=True)
        if Path(f"/run/netns/{self.switch}").exists():
            subprocess.run([IP, "netns", "del", self.switch], capture_output=True)
        shutil.rmtree(self.state, ignore_errors=True)

    def env(self, token_path: str | None) -> dict:
        # this interpreter's bin first and this checkout importable: Ray's daemons, a job's `python` and
        # Serve's replicas run our code, as a host's image would have it installed
        # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1: these hosts form a real multi-node cluster over their network,
        # whatever single-machine mode the caller runs its own Ray in (the tests' is loopback-only)
        env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token", HF_HUB_OFFLINE="1",
                   RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1",
                   PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
                   PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
        env.pop("RAY_ADDRESS", None)
        if token_path:
            env["RAY_AUTH_TOKEN_PATH"] = token_path
        else:
            env.pop("RAY_AUTH_TOKEN_PATH", None)
            env.pop("RAY_AUTH_TOKEN", None)
        return env

    def run(self, i: int, cmd: list[str], env: dict | None = None, timeout: float = 120,
            check: bool = True) -> subprocess.CompletedProcess:
        """Run `cmd` in host i and wait for it."""
        r = subprocess.run([IP, "netns", "exec", self.names[i]] + cmd, capture_output=True, text=True,
                           env=env, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"host {i}: {' '.join(cmd)} exited {r.returncode}: {r.stderr.strip()[-800:]}")
        return r

    def link(self, i: int, up: bool) -> None:
        """Take host i's network link down or bring it back (`ip link set eth0 down|up` in the host):
        its processes keep running, nothing reaches them or leaves."""
        self._ip("link", "set", "eth0", "up" if up else "down", ns=self.names[i])

    def counters(self, i: int) -> tuple[int, int]:
        """Bytes host i has received and sent on its link (its /sys/class/net/eth0/statistics)."""
        r = self.run(i, ["cat", "/sys/class/net/eth0/statistics/rx_bytes", "/sys/class/net/eth0/statistics/tx_bytes"],
                     timeout=20)
        rx, tx = (int(v) for v in r.stdout.split())
        return rx, tx

    def kill_all(self, i: int) -> int:
        """End every process of host i (its Ray daemons and workers); how many there were. Not `ray stop`:
        the hosts share this machine's process table, and `ray stop` would end every host's Ray."""
        pids = subprocess.run([IP, "netns", "pids", self.names[i]], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), 9)
            except (ProcessLookupError, ValueError):
                pass
        return len(pids)

    def ray(self) -> str:
        return str(Path(sys.executable).with_name("ray"))

    def ray_head(self, i: int, token_path: str, num_cpus: int = 0, resources: str | None = None) -> str:
        """`ray start --head` in host i (token auth on, its own temp dir); the GCS address."""
        a = self.addresses[i]
        self.run(i, [self.ray(), "start", "--head", "--node-ip-address", a, "--port", str(RAY_PORT),
                     "--dashboard-host", a, "--dashboard-port", str(DASHBOARD_PORT), "--num-cpus", str(num_cpus),
                     "--temp-dir", str(self.state / f"ray{i}"), "--disable-usage-stats"]
                 + (["--resources", resources] if resources else []),
                 env=self.env(token_path), timeout=180)
        return f"{a}:{RAY_PORT}"

    def ray_worker(self, i: int, head: str, token_path: str, num_cpus: int = 1, resources: str | None = None) -> None:
        """`ray start` in host i joining `head`, with its declared CPUs (and custom resources as JSON)."""
        cmd = [self.ray(), "start", "--address", head, "--node-ip-address", self.addresses[i],
               "--num-cpus", str(num_cpus), "--disable-usage-stats"]
        if resources:
            cmd += ["--resources", resources]
        self.run(i, cmd, env=self.env(token_path), timeout=180)


    def submit(self, client: int, token_path: str, args: list[str], head: int = 0) -> subprocess.Popen:
        """`ray job submit` of `python jobs/train.py ARGS` (this checkout as the working dir) from host
        `client` to host `head`'s Jobs API; the running submit (its output merged into stdout)."""
        cmd = [IP, "netns", "exec", self.names[client], self.ray(), "job", "submit", "--address",
               f"http://{self.addresses[head]}:{DASHBOARD_PORT}", "--working-dir", str(ROOT),
               "--runtime-env", str(ROOT / "cluster" / "runtime_env.yaml"), "--", "python", *args]
        return subprocess.Popen(cmd, env=self.env(token_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, cwd=ROOT)

    def actors(self, client: int, head: str, token_path: str) -> dict[str, list[str]]:
        """{actor class: [host address of each alive one]}, asked from host `client`."""
        r = self.run(client, [sys.executable, "-c", ACTORS, head, str(DASHBOARD_PORT)], env=self.env(token_path), timeout=120)
        return json.loads(r.stdout.strip().splitlines()[-1])

    def deploy(self, client: int, head: str, token_path: str, bundle: str, members: list[str],
               api_key: str = "") -> str:
        """Deploy the app from host `client`: proxy and ingress on the head's host (it must declare the
        resource host_a), members where `member_host` is declared; the app's URL."""
        url_host = head.split(":")[0]
        self.run(client, [sys.executable, "-c", DEPLOY, head, url_host, str(SERVE_PORT), bundle, api_key,
                          json.dumps(members)], env=self.env(token_path), timeout=300)
        return f"http://{url_host}:{SERVE_PORT}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cluster.hosts", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="make the hosts and keep them until Ctrl-C")
    up.add_argument("--hosts", type=int, default=3)
    a = ap.parse_args(argv)
    why = available()
    if why:
        print(f"hosts: {why}", file=sys.stderr)
        return 2
    with Hosts(a.hosts) as hosts:
        for name, addr in zip(hosts.names, hosts.addresses):
            print(f"{addr}  ip netns exec {name} bash")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("tearing down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
