"""The explanation frontier: for each explanation option we ship, what it costs and how faithful it is.

Cost (random weights suffice: cost does not depend on training), at --size (default 224) on this
machine, in-process through `skin.ensemble.Predictor` (what `skin explain`, batch inference and the
Serve members run), each option in a fresh process:
  ms/img b1, b16      answer + the option's maps, per image, at batch 1 (median of --rounds) and 16
  ÷ answer b1, b16    the same ÷ the answer alone at the same batch (interleaved runs)
  peak GB b16         the process's peak RSS while explaining a batch of 16 (models loaded)
  +GB b16             of which the maps need (peak RSS minus the peak of answering the same batch)

Quality, with a trained bundle (--bundle; members trained at the bundle's size, said in the output),
on the --split images of the synthetic set with masks, the class explained being the ensemble's answer:
  pointing            the ensemble map's peak inside the lesion (skin.evaluation, as evaluate.py --masks)
  deletion, insertion, ROAD   skin.faithfulness on --perturb images (lower / higher / higher is better),
                      each beside a random map (the line "random map")
  ÷ answer b1 @bundle the cost ratio at batch 1 at the bundle's own size
  ÷ request           with --service URL: a request with the map ÷ one without (cam=false) on that service

Target (issue #27): the default a bundle serves keeps maps ≤ 3× the answer's cost at 224 px on the CPU
and peak memory at batch 16 ≤ 4 GB; the demo's option keeps the pointing game ≥ 0.80 and, where one
does, a request with the map ≤ 4× one without.

    python benchmarks/explanations.py frontier --size 224 --skip-quality
    python benchmarks/explanations.py frontier --bundle demo/train/bundle-tuned-t --data demo/data --synth demo/synth
"""
from __future__ import annotations

PROG = "benchmarks/explanations.py frontier"

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _harness import synthetic_split_args

DEMO_LAYERS = {"mobilenetv2": "backbone.blocks.5", "efficientnet_b1": "backbone.blocks.2", "resnet50": "backbone.layer1"}
# name -> (options for every member, per-member layers)
G32 = {"stride": 32, "method": "gradcam", "smooth": "none"}  # every option names all it sets: a bundle's own
OPTIONS = {                                                 # stored explanation never leaks into a row
    "gradcam@32": (G32, {}),
    "gradcam@16 (default)": (G32 | {"stride": 16}, {}),
    "gradcam@8": (G32 | {"stride": 8}, {}),
    "gradcam@32+flips": (G32 | {"smooth": "flips"}, {}),
    "gradcam@8+flips": (G32 | {"stride": 8, "smooth": "flips"}, {}),
    "layercam@8": (G32 | {"stride": 8, "method": "layercam"}, {}),
    "layercam@8 layers": (G32 | {"stride": 8, "method": "layercam"}, DEMO_LAYERS),
    "layercam@32 layers+flips": (G32 | {"method": "layercam", "smooth": "flips"}, DEMO_LAYERS),
    "layercam@8 layers+flips": (G32 | {"stride": 8, "method": "layercam", "smooth": "flips"}, DEMO_LAYERS),
}


def explain_of(name: str, members, pooled: dict | None = None) -> dict:
    """{member: Overrides}; members without a layer in the option get their pooled layer (`pooled`:
    {member: its spec's cam_layer}), so a bundle's stored layer never leaks in either."""
    from skin.explanation import Overrides
    common, layers = OPTIONS[name]
    return {m: Overrides.of(dict(common) | ({"layer": layers.get(m) or (pooled or {}).get(m)}
                                            if m in layers or pooled else {}))
            for m in members}


def _cost_worker(a) -> None:
    """One option's cost in this fresh process; prints one JSON line."""
    import resource
    import torch
    from skin.bundle import Bundle, write_bundle
    from skin.classes import ClassMap
    from skin.ensemble import Predictor
    from skin.registry import DEFAULT_MEMBERS, create_model
    from skin.synth import make_sample
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    root = Path(a.tmp) / f"random-{a.size}"
    if not (root / "bundle.json").is_file():
        write_bundle(root, ClassMap(), {n: create_model(n, 6, pretrained="none", input_size=a.size)
                                        for n in DEFAULT_MEMBERS}, untrained=True)
    bundle = Bundle.load(root)
    pred = Predictor(bundle, explain=explain_of(a.worker, bundle.member_names), device=a.device)  # random: stores none
    images = [make_sample(k % 6, 0, k, a.size).image for k in range(16)]

    def ms(batch, cam) -> float:
        t0 = time.perf_counter()
        pred.answers(batch, cam=cam)
        if a.device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e3 / len(batch)
    ms(images[:1], True)  # warm-up: the first call builds the dilated copies' kernels
    plain1, cam1 = [], []
    for r in range(a.rounds):
        plain1.append(ms(images[r % 16:r % 16 + 1], False))
        cam1.append(ms(images[r % 16:r % 16 + 1], True))
    plain16 = ms(images, False)
    rss_answer = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # GB (Linux: KiB)
    cam16 = ms(images, True)
    rss_maps = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(json.dumps({"option": a.worker, "ms_b1": statistics.median(cam1), "plain_b1": statistics.median(plain1),
                      "ratio_b1": statistics.median(c / p for c, p in zip(cam1, plain1)), "ms_b16": cam16,
                      "plain_b16": plain16, "ratio_b16": cam16 / plain16, "peak_gb_b16": rss_maps,
                      "maps_gb_b16": max(0.0, rss_maps - rss_answer)}), flush=True)


def cost(a, names: list[str]) -> dict:
    out = {}
    with tempfile.TemporaryDirectory(prefix="skinray-frontier-") as tmp:
        for name in names:
            cmd = [sys.executable, __file__.replace("explain/frontier.py", "explanations.py"), "frontier",
                   "--worker", name, "--tmp", tmp, "--size", str(a.size), "--threads", str(a.threads),
                   "--rounds", str(a.rounds), "--device", a.device]
            r = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"PYTHONUNBUFFERED": "1"})
            if r.returncode != 0:
                out[name] = {"error": (r.stderr.strip().splitlines() or ["failed"])[-1]}
            else:
                out[name] = json.loads(r.stdout.strip().splitlines()[-1])
            print(f"  cost measured: {name}", file=sys.stderr, flush=True)
    return out


def quality(a, names: list[str]) -> dict:
    import numpy as np
    import torch
    from _harness import load_splits
    from skin.bundle import Bundle
    from skin.ensemble import Predictor
    from skin.evaluation import attach_masks, faithfulness, perturbation_summary, score_locally
    from skin.images import load_image
    torch.set_num_threads(a.threads)
    bundle = Bundle.load(a.bundle)
    df = attach_masks(load_splits(a.data, a.split), Path(a.synth) / "manifest.csv")
    sample = [load_image(p) for p in df["path"].iloc[:a.rounds]]
    out = {}
    from skin.registry import get_spec
    pooled = {e.name: get_spec(e.backbone).cam_layer for e in bundle.members}
    for name in names:
        explain = explain_of(name, bundle.member_names, pooled)
        scored = score_locally(str(bundle.root), df, 16, explain=explain, perturb=a.perturb)
        good = scored[scored["ok"].astype(bool)]
        f = faithfulness(good, bundle, explain) or {}
        p = perturbation_summary(good, bundle, explain) or {}
        pred = Predictor(bundle, explain=explain)
        ratios = []
        for img in sample:  # the cost ratio at the bundle's size, batch 1
            t0 = time.perf_counter()
            pred.answers([img], cam=False)
            t1 = time.perf_counter()
            pred.answers([img], cam=True)
            ratios.append((time.perf_counter() - t1) / (t1 - t0))
        out[name] = {"pointing": f.get("pointing", float("nan")), "images": f.get("images", 0),
                     "untrained": (f.get("baseline") or {}).get("untrained_pointing", float("nan")),
                     "perturbation": p.get("ensemble", {}), "perturb_images": p.get("images", 0),
                     "ratio_b1": float(np.median(ratios))}
        print(f"  quality measured: {name}", file=sys.stderr, flush=True)
    out["_bundle"] = {"id": bundle.id, "size": bundle.members[0].data_config.input_size,
                      "contrast": (f.get("baseline") or {}).get("contrast_pointing", float("nan")),
                      "centre": (f.get("baseline") or {}).get("centre_pointing", float("nan"))}
    return out


def service(a, names: list[str]) -> dict:
    """On a running service (--service URL): a request with the option's map ÷ one without (cam=false),
    client-side latency, median of --rounds alternated pairs, one image of the split."""
    import requests
    from _harness import load_splits
    info = requests.get(a.service + "/v1/info", timeout=30).json()
    from skin.registry import get_spec
    pooled = {m["name"]: get_spec(m["backbone"]).cam_layer for m in info["members"]}
    path = load_splits(a.data, a.split)["path"].iloc[0]
    data = Path(path).read_bytes()

    def post(params) -> float:
        t0 = time.perf_counter()
        r = requests.post(a.service + "/v1/predict", files={"file": ("x.jpg", data, "image/jpeg")}, params=params,
                          timeout=300)
        r.raise_for_status()
        return time.perf_counter() - t0
    out = {}
    for name in names:
        common, layers = OPTIONS[name]
        params = {"cam_stride": common["stride"], "cam_method": common["method"], "cam_smooth": common["smooth"],
                  "cam_layer": [f"{m}={layers.get(m, pooled[m])}" for m in pooled]}
        post(params)  # the member builds this option's runner once
        ratios = [post(params) / post({"cam": "false"}) for _ in range(a.rounds)]
        out[name] = statistics.median(ratios)
        print(f"  service measured: {name}", file=sys.stderr, flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    synthetic_split_args(ap, bundle="demo/train/bundle-tuned-t")
    ap.add_argument("--size", type=int, default=224, help="image size of the cost measurement (default 224)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--rounds", type=int, default=5, help="batch-1 runs per option (median)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (cost)")
    ap.add_argument("--options", nargs="+", choices=list(OPTIONS), default=list(OPTIONS), metavar="OPTION",
                    help=f"options to measure (default all: {', '.join(OPTIONS)})")
    ap.add_argument("--perturb", type=int, default=30, help="images scored by deletion / insertion / ROAD (default 30)")
    ap.add_argument("--skip-quality", action="store_true", help="cost only (no trained bundle needed)")
    ap.add_argument("--skip-cost", action="store_true", help="quality only")
    ap.add_argument("--service", metavar="URL", help="also: on this running service (e.g. the demo's, "
                    "http://127.0.0.1:8000), a request with each option's map ÷ one without")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return _cost_worker(a)
    import torch
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, {a.threads} torch threads, torch {torch.__version__}"
          + (f", {torch.cuda.get_device_name()}" if a.device == "cuda" else ""), flush=True)
    costs = {} if a.skip_cost else cost(a, a.options)
    served = service(a, a.options) if a.service else {}
    qual = {} if a.skip_quality else quality(a, a.options)
    q0 = qual.get("_bundle", {})
    print(f"\ncost at {a.size} px ({a.device}, random weights, in-process Predictor, images at the input size)"
          + (f"; quality on bundle {q0['id']} (members trained at {q0['size']} px), {a.split} split" if q0 else ""))
    head = f"{'option':<26}{'ms/img b1':>10}{'b16':>8}{'÷answer b1':>11}{'b16':>7}{'peak GB':>8}{'+GB':>6}"
    if q0:
        head += (f"{'÷ request':>10}" if served else "") + f"{'pointing':>9}{'untr.':>6}{'deletion':>9}{'rand':>6}{'insert.':>8}{'rand':>6}{'ROAD':>7}{'rand':>7}{'÷ans@' + str(q0['size']):>8}"
    print(head)
    nan = float("nan")
    for name in a.options:
        c = costs.get(name, {})
        line = f"{name:<26}"
        if "error" in c:
            line += f"  failed: {c['error']}"
        else:
            line += (f"{c.get('ms_b1', nan):>10.1f}{c.get('ms_b16', nan):>8.1f}{c.get('ratio_b1', nan):>11.2f}"
                     f"{c.get('ratio_b16', nan):>7.2f}{c.get('peak_gb_b16', nan):>8.2f}{c.get('maps_gb_b16', nan):>6.2f}")
        if served:
            line += f"{served[name]:>10.2f}"
        if q0:
            q = qual[name]
            pt = q["perturbation"] or {}
            g = lambda m, k: (pt.get(m) or {}).get(k, nan)  # noqa: E731
            line += (f"{q['pointing']:>9.3f}{q['untrained']:>6.2f}{g('deletion', 'map'):>9.3f}{g('deletion', 'random'):>6.3f}"
                     f"{g('insertion', 'map'):>8.3f}{g('insertion', 'random'):>6.3f}{g('road', 'map'):>7.3f}"
                     f"{g('road', 'random'):>7.3f}{q['ratio_b1']:>8.2f}")
        print(line, flush=True)
    if q0:
        n = next(iter(v["images"] for k, v in qual.items() if k != "_bundle"))
        m = next(iter(v["perturb_images"] for k, v in qual.items() if k != "_bundle"))
        print(f"(pointing on {n} images with masks, one standard error about "
              f"{(0.25 / max(n, 1)) ** 0.5:.3f}; maps that know less: centre {q0['centre']:.3f}, colour contrast "
              f"{q0['contrast']:.3f}; deletion (lower is better), insertion and ROAD (higher) on {m} images, "
              "beside a random map)")
    print("(targets: the default ≤ 3× the answer at 224 px on the CPU and ≤ 4 GB at batch 16; the demo's option "
          "pointing ≥ 0.80 and, where one does, a request with the map ≤ 4× one without)")
