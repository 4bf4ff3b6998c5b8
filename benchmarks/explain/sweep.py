"""How fine must the Grad-CAM map be for the pointing game? The demo recipe (jobs/configs/
demo.yaml, the demo's synthetic data) trained without Ray at several input sizes and output
strides; for each: map size, ensemble test macro-F1 (weights 0.30/0.30/0.40, no tuning),
pointing game and energy in the mask (benchmarks/explanations.py faithfulness).

    python benchmarks/explanations.py sweep [--variants 64:32 64:16 128:32] [--out DIR]

Each variant trains three members: minutes on a GPU, far longer on 2 CPU cores.
"""
from __future__ import annotations

PROG = "benchmarks/explanations.py sweep"

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from explain.faithfulness import measure  # noqa: E402

from skin.bundle import Bundle, write_bundle  # noqa: E402
from skin.cache import build_cache, cache_side  # noqa: E402
from skin.checkpoint import load_member  # noqa: E402
from skin.data import ScanOptions, balance, load_classes, load_manifest, scan  # noqa: E402
from skin.ensemble import Predictor  # noqa: E402
from skin.images import load_image  # noqa: E402
from skin.metrics import compute_metrics  # noqa: E402
from skin.synth import write_dataset  # noqa: E402
from skin.train import LocalRuntime, TrainConfig, train_member  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_macro_f1(bundle: Bundle, data: Path) -> float:
    df = load_manifest(data, "test")
    probs, predictor = [], Predictor(bundle)
    for start in range(0, len(df), 64):
        images = [load_image(p) for p in df.path.iloc[start:start + 64]]
        probs += [r["probabilities"] for r in predictor.predict(images)]
    p = np.array([[d[c] for c in bundle.classes] for d in probs])
    return compute_metrics(df.label_index.to_numpy(), p, bundle.classes)["f1_macro"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=["64:32", "64:16", "128:32"], help="SIZE:STRIDE pairs")
    ap.add_argument("--config", default=str(ROOT / "jobs/configs/demo.yaml"))
    ap.add_argument("--out", help="keep the data and bundles here (default: a temporary folder)")
    a = ap.parse_args(argv)
    cfg = yaml.safe_load(Path(a.config).read_text())
    per_member = cfg.pop("members")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.out or tmp)
        synth, data = root / "synth", root / "data"
        if not (synth / "manifest.csv").is_file():  # the demo's data: cluster/demo.sh steps 2-3
            write_dataset(synth, 200, 160, seed=0, workers=8, progress=False)
            scan(synth, data, ScanOptions(workers=8), progress=False)
            balance(data, per_class=140, seed=0)
        classes = load_classes(data)
        print(f"{'variant':<10}{'map':>6}{'train s':>9}{'test F1':>9}{'pointing':>10}{'energy':>8}  members' val F1")
        for v in a.variants:
            size, stride = (int(x) for x in v.split(":"))
            for split in ("train_balanced", "val"):
                build_cache(data, split, load_manifest(data, split), cache_side(size), progress=False)
            t0, members, val = time.time(), {}, {}
            for name, over in per_member.items():
                tc = TrainConfig.from_dict({**cfg, **over, "backbone": name, "data_dir": str(data),
                                            "image_size": size, "output_stride": stride})
                rt = LocalRuntime(str(root / f"run-{size}-{stride}" / name))
                train_member(tc, rt, log=lambda s: None)
                members[name], meta = load_member(Path(rt.out) / "best")
                val[name] = round(meta["metrics"]["val_f1_macro"], 3)
            train_s = time.time() - t0
            bundle = write_bundle(root / f"bundle-{size}-{stride}", classes, members)
            f1 = test_macro_f1(bundle, data)
            r = measure(bundle, data, synth)
            side = size // stride
            print(f"{v:<10}{f'{side}x{side}':>6}{train_s:>9.0f}{f1:>9.3f}{r['pointing']:>10.3f}{r['energy']:>8.3f}  {val}",
                  flush=True)
            print(json.dumps({"variant": v, "per_class": r["per_class"]}), flush=True)

