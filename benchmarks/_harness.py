"""Shared set-up of the benchmarks: a random-weight bundle, a private local Ray, the Serve app on a
free loopback port, the PSS of Serve's processes, and the arguments of those that read the demo's
synthetic lesions and their masks."""
from __future__ import annotations

import os
import socket
import sys
from contextlib import contextmanager
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # serve_app and jobs live at the repository root
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
# a private local Ray: Ray turns its token auth on by itself (token in ~/.ray/auth_token unless RAY_AUTH_TOKEN_PATH)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def synthetic_split_args(ap, bundle: str = "demo/train/bundle-tuned") -> None:
    """--bundle, --data, --synth, --split: a bundle and a split of `skin data synth` images with masks."""
    ap.add_argument("--bundle", default=bundle)
    ap.add_argument("--data", default="demo/data", help="`skin data scan` output of the synthetic set")
    ap.add_argument("--synth", default="demo/synth", help="the `skin data synth` folder (masks + manifest.csv)")
    ap.add_argument("--split", default="test", help="a split, several joined by commas, or `all` (train,val,test: "
                    "for a fresh synthetic set that no bundle has seen, e.g. `skin data synth --seed 1`)")


def load_splits(data: str | Path, split: str):
    """The manifest of one split, of several (`val,test`) or of `all`, as one table."""
    import pandas as pd
    from skin.data import load_manifest
    names = ["train", "val", "test"] if split == "all" else split.split(",")
    return pd.concat([load_manifest(data, s) for s in names], ignore_index=True)


def random_bundle(root: Path, size: int) -> Path:
    import torch
    from skin.bundle import write_bundle
    from skin.classes import ClassMap
    from skin.registry import DEFAULT_MEMBERS, create_model
    torch.manual_seed(0)
    write_bundle(root, ClassMap(), {n: create_model(n, 6, pretrained="none", input_size=size)
                                    for n in DEFAULT_MEMBERS}, untrained=True)
    return root


@contextmanager
def local_ray(num_cpus: int = 2):
    import ray
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def start_serve() -> str:
    """Serve's HTTP proxy on a free 127.0.0.1 port; returns its base URL."""
    from ray import serve
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return f"http://127.0.0.1:{port}"


def serve_pss_gb(prefixes: tuple[str, ...] = ("ray::ServeReplica:skinray",)) -> float:
    """PSS of this machine's processes whose command line starts with one of the prefixes
    (Ray names its worker processes after the actor they host). Measurement only."""
    total = 0
    for p in psutil.process_iter(["cmdline"]):
        if " ".join(p.info.get("cmdline") or []).startswith(prefixes):
            try:
                total += p.memory_full_info().pss
            except psutil.Error:
                pass
    return total / 1e9
