"""Scale-out figures on a simulated multi-node cluster (real raylets on this machine, token auth on).

    python benchmarks/multinode.py [--per-class 50] [--repeats 2]

1. Epoch time of one member with 2 DDP workers (one per 1-CPU node) ÷ 1 worker, same data and
   settings, runs alternated and repeated; the median epoch after the first of each run.
2. The node drill (cluster/simcluster.py): 2 workers, the node of one killed after the first
   checkpoint; seconds from the kill to the resumed worker's "resumed from epoch" line.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from cluster.simcluster import LineLog, drill, simulated_cluster, token_env  # noqa: E402


def make_data(root: Path, per_class: int) -> Path:
    from skin.data import ScanOptions, balance, scan
    from skin.synth import write_dataset
    synth = write_dataset(root / "synth", per_class=per_class, size=96, seed=3, progress=False)
    scan(synth, root / "data", ScanOptions(workers=2), progress=False)
    balance(root / "data", per_class=int(per_class * 0.8), seed=0)
    return root / "data"


def epoch_times(address: str, data: Path, out: Path, workers: int, epochs: int, image_size: int) -> list[float]:
    import re
    env = dict(os.environ, RAY_ADDRESS=address, PYTHONUNBUFFERED="1", RAY_DEDUP_LOGS="0")
    cmd = [sys.executable, str(ROOT / "jobs" / "train.py"), "--data", str(data), "--out", str(out),
           "--members", "mobilenetv2", "--workers", str(workers), "--cpus-per-worker", "1", "--epochs", str(epochs),
           "--image-size", str(image_size), "--batch-size", "16", "--pretrained", "none", "--name", f"w{workers}"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    log = LineLog(proc)
    if proc.wait() != 0:
        log.thread.join(5)
        raise RuntimeError(log.text()[-3000:])
    log.thread.join(5)
    # rank 0's epoch lines (each epoch once per rank; rank 0 reports the checkpoint)
    seen, times = set(), []
    for _, s in log.lines:
        m = re.search(r"\(RayTrainWorker pid=(\d+)\).*epoch (\d+)/\d+ .*\((\d+\.\d+)s,", s)
        if m and m.group(2) not in seen:
            seen.add(m.group(2))
            times.append(float(m.group(3)))
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-class", type=int, default=50, help="synthetic images per class (80%% go to training)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--skip-drill", action="store_true")
    a = p.parse_args(argv)
    os.environ.update(token_env())
    os.environ["PYTHONPATH"] = os.pathsep.join(x for x in (str(ROOT), os.environ.get("PYTHONPATH", "")) if x)
    tmp = Path(tempfile.mkdtemp(prefix="skinray-multinode-"))
    t0 = time.time()
    data = make_data(tmp, a.per_class)
    print(f"data: {data} ({time.time() - t0:.0f}s)", flush=True)
    results: dict = {"one_worker": [], "two_workers": []}
    with simulated_cluster([{"num_cpus": 1}, {"num_cpus": 1}]) as (cluster, _):
        for r in range(a.repeats):
            for workers, key in ((1, "one_worker"), (2, "two_workers")) if r % 2 == 0 else \
                    ((2, "two_workers"), (1, "one_worker")):
                times = epoch_times(cluster.address, data, tmp / f"run{r}-{workers}", workers, a.epochs, a.image_size)
                results[key].append(statistics.median(times[1:]))
                print(f"repeat {r + 1}: {workers} worker(s): epochs {times} -> median after the first "
                      f"{results[key][-1]:.2f}s", flush=True)
    one, two = statistics.median(results["one_worker"]), statistics.median(results["two_workers"])
    results["ratio_two_over_one"] = two / one
    print(f"\nepoch time, 2 workers per member / 1 worker: {two:.2f}s / {one:.2f}s = {two / one:.2f} "
          f"(ideal 0.50; all repeats: 1w {results['one_worker']}, 2w {results['two_workers']})")
    if not a.skip_drill:
        d = drill(str(data), str(tmp / "drill"), epochs=5, image_size=32)
        results["drill"] = {k: v for k, v in d.items() if k != "log_tail"}
        if d.get("resumed"):
            print(f"node killed {d['killed']['at_s']:.1f}s into the run; resumed {d['kill_to_resumed_s']:.1f}s after "
                  f"the kill on {d['worker_nodes_after']} nodes; run finished with rc {d['returncode']}")
        else:
            print("drill: no resume seen\n" + d["log_tail"])
    (tmp / "multinode.json").write_text(json.dumps(results, indent=2))
    print(f"raw: {tmp / 'multinode.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
