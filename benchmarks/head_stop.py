"""How long `bash cluster/local.sh stop` takes after a Ray Train job ran on the head.

  default / shipped   seconds from `stop` until the head's processes are gone, with Ray's own
                      RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S (30) / with local.sh's (0); the ratio
                      is the median of the pairs' ratios (each pair: one head per setting, in turn);
                      local.sh sends SIGKILL 30 s after SIGTERM, so Ray's default reads about 30 s

Each head is started by local.sh on free ports, runs one submitted Ray Train job (one worker,
two reports: what leaves a lease behind that a drain waits for), then is stopped by local.sh.

    python benchmarks/head_stop.py [--pairs 2]
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JOB = textwrap.dedent("""
    import tempfile
    from ray import train
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    def loop(cfg):
        for i in range(2):
            train.report({"i": i})
    TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(storage_path=tempfile.mkdtemp(), name="x")).fit()
""")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one(drain: str | None) -> float:
    state = Path(tempfile.mkdtemp(prefix="skr-stop-"))
    (state / "job").mkdir()
    (state / "job" / "job.py").write_text(JOB)
    dash = _port()
    env = dict(os.environ, RAY_PORT=str(_port()), RAY_DASHBOARD_PORT=str(dash), RAY_CLIENT_PORT=str(_port()),
               RAY_DASHBOARD_AGENT_PORT=str(_port()), RAY_NUM_CPUS="2",
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    env.pop("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", None)
    if drain is not None:
        env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = drain
    local = ["bash", str(ROOT / "cluster" / "local.sh")]
    subprocess.run(local + ["start", str(state)], env=env, check=True, capture_output=True, timeout=180)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(state / "ray_token"), RAY_ADDRESS=f"http://127.0.0.1:{dash}")
    subprocess.run(["ray", "job", "submit", "--working-dir", str(state / "job"), "--", "python", "job.py"],
                   env=env, check=True, capture_output=True, timeout=300)
    temp = (state / "ray-temp-dir").read_text().strip()
    t0 = time.perf_counter()
    subprocess.run(local + ["stop", str(state)], env=env, check=True, capture_output=True, timeout=120)
    took = time.perf_counter() - t0
    for _ in range(50):  # what local.sh killed may take a moment to be reaped
        left = subprocess.run(["pgrep", "-f", temp], capture_output=True, text=True).stdout.split()
        if not left:
            return took
        time.sleep(0.2)
    raise SystemExit(f"processes of the head in {temp} still run after local.sh stop: {left}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=2)
    args = ap.parse_args()
    ray_default, shipped = [], []
    for _ in range(args.pairs):
        ray_default.append(one("30"))
        shipped.append(one(None))
    print("local.sh stop after a Ray Train job, seconds (each run):")
    print(f"  Ray's drain (30 s):   {', '.join(f'{t:.1f}' for t in ray_default)}")
    print(f"  shipped (no drain):   {', '.join(f'{t:.1f}' for t in shipped)}")
    ratio = statistics.median(a / b for a, b in zip(ray_default, shipped))
    print(f"  Ray's drain / shipped: {ratio:.1f}x (median of {args.pairs} pairs)")


if __name__ == "__main__":
    main()
