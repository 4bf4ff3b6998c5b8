"""Score unlabelled photographs with a bundle: Ray Data batch inference, streaming and resumable.

    python jobs/predict.py --bundle OUT/bundle --input PHOTOS --out SCORES [--cam] [--workers 2]
    ray job submit --working-dir . -- python jobs/predict.py --bundle ... --input ... --out ...

--input is a folder (recursive; .jpg .jpeg .png .webp .heic .heif), a CSV/Parquet manifest with a `path`
column (relative paths from the manifest's folder), or a URI pyarrow resolves (s3://bucket/prefix,
gs://..., file:///...). Paths stream through `map_batches` over a pool of predictor actors (each
loads the bundle once; members on GPUs when --gpus-per-worker is set, fractional allowed); each
actor decodes, applies the eval preset and answers through the same path as `skin predict`.

Writes OUT/predictions.csv and OUT/predictions.parquet: one row per input file in input order,
with path, class, confidence, p_<class> for every class, top_<member>, uncertain and its reasons,
and error (the HTTP API's message for a file that cannot be scored; such a file never stops the
job). --cam also writes each overlay under OUT/cam/, mirroring the input tree.

Re-running with the same OUT scores only the files not yet in it: a killed job loses at most the
batches in flight. OUT is bound to one bundle (OUT/run.json): another bundle refuses to append.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from skin.cluster import add_cluster_arguments
from skin.args import add_amp_argument, add_explanation_arguments, at_least, explanation_request, fraction


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True, help="bundle folder (readable from every node)")
    p.add_argument("--input", required=True, metavar="SRC", help="folder, CSV/Parquet manifest with a `path` column, or URI")
    p.add_argument("--out", required=True, help="output folder (predictions.csv/.parquet, run.json, summary.json, cam/)")
    p.add_argument("--cam", action="store_true", help="also write each Grad-CAM overlay PNG under OUT/cam/")
    p.add_argument("--alpha", type=fraction, default=0.4, help="overlay opacity with --cam (default 0.4)")
    add_explanation_arguments(p)
    p.add_argument("--workers", type=at_least(1), default=1, help="predictor actors (default 1; one per GPU on a cluster)")
    p.add_argument("--cpus-per-worker", type=float, default=None,
                   help="CPUs per actor, its torch threads follow (default: what the plan gives, up to the node)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per actor (fractions share a GPU)")
    p.add_argument("--batch-size", type=at_least(1), default=16, help="images per batch (default 16)")
    p.add_argument("--uncertain-below", type=fraction, default=0.5, help="flag answers under this confidence")
    add_amp_argument(p)
    p.add_argument("--progress-every", type=at_least(1), default=500, help="a progress line every N files (default 500)")
    add_cluster_arguments(p, "list the inputs, print the resource plan and exit")
    return p.parse_args(argv)


class Progress:
    """A line every `every` files: done/total, images/s over this run, ETA."""

    def __init__(self, total: int, every: int) -> None:
        self.total, self.every, self.done, self.t0, self.next = total, every, 0, time.perf_counter(), every

    def add(self, n: int) -> None:
        self.done += n
        if self.done >= self.next or self.done == self.total:
            rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            print(f"predict: {self.done}/{self.total} files, {rate:.1f} images/s, ETA {eta:.0f}s", flush=True)
            while self.next <= self.done:
                self.next += self.every


def main(argv=None) -> int:
    a = parse_args(argv)
    from skin.batch import InputError, PredictionStore, format_summary, list_inputs, summary
    from skin.bundle import Bundle
    from skin.checkpoint import CheckpointError
    from skin.explanation import ExplanationError
    from skin.images import SERVE_SUFFIXES
    try:
        bundle = Bundle.load(a.bundle)
        explain = explanation_request(a, bundle.member_names)
        inputs = list_inputs(a.input)
        if not inputs.paths:
            raise InputError(f"no images in {a.input} (looked for {' '.join(SERVE_SUFFIXES)})")
        store = PredictionStore(a.out, bundle)
        done = store.open(write=not a.dry_run)
    except (InputError, CheckpointError, ExplanationError, FileNotFoundError) as e:
        print(f"predict.py: {e}", file=sys.stderr)
        return 2
    todo = [p for p in inputs.paths if p not in done]
    print(f"predict: bundle {bundle.id}; {len(inputs.paths)} files in {a.input}, {len(done)} already scored in "
          f"{a.out}, {len(todo)} to score", flush=True)
    t0 = time.time()
    if todo:
        import ray
        from skin.batch import BatchPredictor
        from skin.cluster import start_job
        from skin.plan import Group
        plan = start_job("predict.py", a, [Group("predictor", a.workers, a.cpus_per_worker, a.gpus_per_worker)])
        if isinstance(plan, int):
            return plan
        cpus = a.cpus_per_worker or plan.groups[0].cpus
        if not a.verbose:
            from skin.progress import quiet_ray_data
            quiet_ray_data()  # its own progress lines below
        ds = ray.data.from_items([{"path": p} for p in todo],
                                 override_num_blocks=max(1, min(len(todo) // a.batch_size, 1000)))
        scored = ds.map_batches(
            BatchPredictor, batch_size=a.batch_size, batch_format="numpy",
            fn_constructor_kwargs={"bundle_dir": str(bundle.root.resolve()), "threads": max(1, int(cpus)),
                                   "amp": a.amp, "graphs": a.graphs, "max_batch": a.batch_size,
                                   "uncertain_below": a.uncertain_below, "alpha": a.alpha,
                                   "cam_dir": str(Path(a.out, "cam").resolve()) if a.cam else None,
                                   "cam_root": inputs.root, "explain": explain},
            compute=ray.data.ActorPoolStrategy(size=a.workers), num_cpus=cpus, num_gpus=a.gpus_per_worker or None)
        progress = Progress(len(todo), a.progress_every)
        for batch in scored.iter_batches(batch_size=None, batch_format="pandas"):
            store.append(batch)  # flushed: a killed job loses at most the batches in flight
            progress.add(len(batch))
    elif a.dry_run:
        print("predict: nothing to score")
        return 0
    df = store.finish(inputs.paths)
    s = summary(df, time.time() - t0, len(todo))
    Path(a.out, "summary.json").write_text(json.dumps(s, indent=2) + "\n")
    print(f"predict: {format_summary(s)}\npredict: {store.csv} and {Path(a.out, 'predictions.parquet')}"
          + (f"; overlays under {Path(a.out, 'cam')}" if a.cam else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
