"""Ray Train glue: the training loop's runtime inside a Ray Train worker, and one TorchTrainer per
member. Ray is imported here only, so the rest of `skin` works without it."""
from __future__ import annotations

import dataclasses
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from .train import SCORE, SingleWorker, TrainConfig, train_member


@dataclass
class RayRuntime:
    """The loop's view of a Ray Train worker (Train V2 API)."""

    def __post_init__(self) -> None:
        import ray
        import ray.train
        import ray.train.torch
        ctx = ray.train.get_context()
        self.world_size = ctx.get_world_size()
        self.rank = ctx.get_world_rank()
        self.device = ray.train.torch.get_device()
        self.cpus = float(ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0))
        self.node = ray.get_runtime_context().get_node_id()[:12]

    def prepare_model(self, model):
        import ray.train.torch
        return ray.train.torch.prepare_model(model) if self.world_size > 1 else model.to(self.device)

    def prepare_loader(self, loader):
        import ray.train.torch
        return ray.train.torch.prepare_data_loader(loader, move_to_device=False) if self.world_size > 1 else loader

    def sync_buffers(self, model):
        """Rank 0's buffers (BN running statistics) on every rank; DDP broadcasts them only at the
        start of each training forward, so after the last step each rank holds its own."""
        if self.world_size > 1:
            import torch.distributed as dist
            for b in model.buffers():
                dist.broadcast(b.data, src=0)

    def gather(self, obj):
        """Every rank's `obj`, in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def report(self, metrics, checkpoint_dir):
        import ray.train
        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt)

    def latest_checkpoint(self):
        import ray.train
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        return ckpt.to_directory()  # local copy, works for remote storage too


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster named by RAY_ADDRESS (set by Ray for a submitted job, or by the user, e.g.
    `auto`); otherwise start a private local Ray, never attaching to a stale or foreign one.
    A cluster that refuses this client's token ends the job here with one line saying how to fix it."""
    import os
    import sys
    import ray
    from ray.exceptions import AuthenticationError
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    try:
        if address:
            ray.init()
        else:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)
    except (AuthenticationError, ConnectionError) as e:
        prog = Path(sys.argv[0]).name
        fix = ("set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH=<file> (or RAY_AUTH_TOKEN) to the cluster's token "
               "(the local head's: `source <(bash cluster/local.sh env)`)")
        if isinstance(e, AuthenticationError):
            print(f"{prog}: the Ray cluster at {address or 'localhost'} needs a token and none was found; {fix}",
                  file=sys.stderr)
        else:  # Ray retries a refused token until it gives up with a ConnectionError
            given = "RAY_AUTH_TOKEN" if os.environ.get("RAY_AUTH_TOKEN") else os.environ.get("RAY_AUTH_TOKEN_PATH")
            print(f"{prog}: could not connect to the Ray cluster at {address}: it refused this client's token "
                  f"({given or 'none'}; 'InvalidAuthToken' above) or is not running there (`ray status`); {fix}",
                  file=sys.stderr)
        raise SystemExit(2) from None


@dataclass
class TuneRuntime(SingleWorker):
    """The loop's view of a Ray Tune function trial that is its own single worker: reports and
    checkpoints go straight to Tune. A TorchTrainer nested in the trial is not used: when ASHA
    stops such a trial, Train V2's placement group outlives it and keeps its CPUs until the driver
    exits (ray-project/ray#54305); a one-worker trial needs no inner trainer."""

    cpus: float = 1.0
    world_size: int = 1
    rank: int = 0
    node: str = "tune-trial"

    def __post_init__(self) -> None:
        import ray
        import torch
        self.device = torch.device("cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu")

    def report(self, metrics, checkpoint_dir):
        from ray import tune
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)

    def latest_checkpoint(self):
        from ray import tune
        ckpt = tune.get_checkpoint()
        return ckpt.to_directory() if ckpt is not None else None


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point: a plain dict config in, everything else in `skin.train`."""
    train_member(TrainConfig.from_dict(config), RayRuntime())


@dataclass
class Scaling:
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0


def make_trainer(cfg: TrainConfig, scaling: Scaling, name: str, storage_path: str,
                 max_failures: int = 2, keep: int = 2, loop: Callable[[dict], None] = train_loop_per_worker,
                 extra_config: dict | None = None):
    """One TorchTrainer for one member: best checkpoints by val macro-F1, restarts on failure.
    `loop` and `extra_config` let a caller wrap the worker function (tests inject faults this way)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.gpus_per_worker:
        resources["GPU"] = scaling.gpus_per_worker
    return TorchTrainer(
        loop,
        train_loop_config=dataclasses.asdict(cfg) | (extra_config or {}),
        scaling_config=ScalingConfig(num_workers=scaling.workers, use_gpu=scaling.gpus_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=name, storage_path=storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=keep, checkpoint_score_attribute=SCORE,
                                               checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=max_failures),
        ),
    )


def fit_concurrently(trainers: dict):
    """Run every trainer's fit() at once (threads: each fit() only waits on its controller actor).
    Returns name -> Result, or raises the first failure after all have finished."""
    results, errors = {}, {}

    def run(name, trainer):
        try:
            results[name] = trainer.fit()
        except BaseException as e:  # noqa: BLE001 - collected and re-raised below
            errors[name] = e

    threads = [threading.Thread(target=run, args=item, name=f"fit-{item[0]}") for item in trainers.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        name, err = next(iter(errors.items()))
        raise RuntimeError(f"training of {sorted(errors)} failed; first error ({name}): {err}") from err
    return results


@contextmanager
def best_checkpoint_dir(result) -> Iterator[tuple[Path, str]]:
    """The best checkpoint by val macro-F1 of a finished run: (a local folder, its storage path).
    On local or NFS storage the folder is the checkpoint itself; on remote storage (s3://...)
    a temporary download that is removed on exit."""
    ckpt = result.get_best_checkpoint(metric=SCORE, mode="max")
    if ckpt is None:
        raise RuntimeError(f"run {result.path} reported no checkpoint")
    with ckpt.as_directory() as folder:
        yield Path(folder), ckpt.path


# --------------------------------------------------------------------------- resource plan on a live cluster
def cluster_nodes(node_types_file: str | None = None):
    """Shapes of the connected cluster's alive nodes by their *free* resources now (a Serve app
    or another job may hold some), plus the node types an autoscaler may still start: those the
    autoscaler reported to the GCS (autoscaler v2, KubeRay), or those in `node_types_file` (a
    `ray up` YAML or a KubeRay manifest) when given."""
    import ray
    from .plan import merge_autoscaler_types, nodes_from_file, nodes_from_resources
    free = _free_per_node()
    per_node = []
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        res = free.get(n["NodeID"], n.get("Resources", {}))
        per_node.append((n.get("NodeManagerAddress", "node") + ("(head)" if "node:__internal_head__" in
                                                                   n.get("Resources", {}) else ""), res))
    nodes = nodes_from_resources(per_node)
    types = nodes_from_file(node_types_file) if node_types_file else _autoscaler_types()
    return merge_autoscaler_types(nodes, types) if types else nodes


def _autoscaler_types():
    """Node types the cluster's autoscaler reported to the GCS (as Ray Data reads them)."""
    from .plan import NodeType
    try:
        from ray._private.state import state
        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - a private API; no autoscaler information then
        return []
    if not config:
        return []
    out = []
    for g in config.node_group_configs:
        r = dict(g.resources)
        if g.max_count == 0 or not r:
            continue
        out.append(NodeType(g.name, float(r.get("CPU", 0)), float(r.get("GPU", 0)), g.min_count,
                            g.max_count if g.max_count >= 0 else 10**6))
    return out


def _free_per_node() -> dict:
    """node id -> free resources; {} when this Ray does not say (then totals are used)."""
    try:
        from ray._private.state import available_resources_per_node
        return available_resources_per_node()
    except Exception:  # noqa: BLE001 - a private API: fall back to totals rather than fail the plan
        return {}


def plan_or_exit(prog: str, groups, node_types_file: str | None, dry_run: bool, scale_timeout_s: float):
    """The plan for `groups` on the connected cluster, printed. Exits 2 (one line) when a worker
    fits no node; with --dry-run exits 0 after printing; when the autoscaler must add nodes,
    asks for them (`request_resources`) and waits up to `scale_timeout_s` for them to join."""
    import sys
    from .plan import PlanError, plan_workers
    try:
        nodes = cluster_nodes(node_types_file)
        plan = plan_workers(nodes, groups)
    except PlanError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print("resource plan (nodes: " + "; ".join(n.describe() for n in nodes) + ")\n" + plan.describe(), flush=True)
    if dry_run:
        raise SystemExit(0)
    if plan.new_nodes:
        wait_for_nodes(plan, scale_timeout_s, prog)
    return plan


def wait_for_nodes(plan, timeout_s: float, prog: str) -> None:
    """Ask the autoscaler for every worker's bundle and wait until the cluster can hold them."""
    import sys
    import time
    from ray.autoscaler.sdk import request_resources
    from .plan import PlanError, plan_workers
    request_resources(bundles=plan.bundles())
    want = ", ".join(f"{n} x {k}" for k, n in plan.new_nodes.items())
    print(f"{prog}: asked the autoscaler for {want}; waiting up to {timeout_s:.0f}s for the nodes to join "
          "(--scale-timeout to change)", flush=True)
    t0 = time.time()
    last = 0.0
    while True:
        try:
            now = plan_workers(cluster_nodes(None), plan.groups)
        except PlanError:  # no node of the needed shape has joined yet
            now = None
        if now is not None and not now.queued and not now.new_nodes:
            print(f"{prog}: nodes joined after {time.time() - t0:.0f}s", flush=True)
            return
        if time.time() - t0 > timeout_s:
            print(f"{prog}: the autoscaler did not add {want} within {timeout_s:.0f}s; check `ray status` and the "
                  "autoscaler's log (quota, instance type, max_workers), or raise --scale-timeout", file=sys.stderr)
            request_resources(bundles=[])
            raise SystemExit(3)
        if time.time() - last > 30:
            print(f"{prog}: waiting for nodes ({time.time() - t0:.0f}s): "
                  f"{'; '.join(n.describe() for n in cluster_nodes(None))}", flush=True)
            last = time.time()
        time.sleep(5)


def release_nodes() -> None:
    """Withdraw this job's `request_resources` so the autoscaler may scale idle nodes down."""
    try:
        from ray.autoscaler.sdk import request_resources
        request_resources(bundles=[])
    except Exception:  # noqa: BLE001 - no autoscaler (a local cluster): nothing to withdraw
        pass
