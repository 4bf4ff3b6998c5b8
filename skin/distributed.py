"""Ray Train and Tune glue: the training loop's runtime inside a Ray Train worker or a Tune trial, and
one TorchTrainer per member. Cluster discovery and planning are skin.cluster's."""
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
        return local_copy(ray.train.get_checkpoint())

    copies_checkpoints = True  # skin.train.restore removes the copy once it has read it


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
        from .device import default_device
        self.device = default_device(bool(ray.get_gpu_ids()))

    def report(self, metrics, checkpoint_dir):
        from ray import tune
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)

    def latest_checkpoint(self):
        from ray import tune
        return local_copy(tune.get_checkpoint())

    copies_checkpoints = True


RESUME_PREFIX = "skinray-resume-"


def local_copy(ckpt) -> str | None:
    """A local copy of a Train/Tune checkpoint (works for remote storage too), in a temporary folder
    of its own (RESUME_PREFIX) that the resuming loop removes: one per resume, each a member's
    weights and optimizer state, would otherwise pile up in the workers' /tmp."""
    if ckpt is None:
        return None
    import tempfile
    return ckpt.to_directory(tempfile.mkdtemp(prefix=RESUME_PREFIX))


def bind_collectives_to_node_ip() -> None:
    """In each Train worker before its process group forms: point gloo and NCCL's bootstrap at the interface that holds
    the node's Ray address, unless the host already says which (GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME).
    Gloo otherwise listens on what the host name resolves to, which on many hosts is 127.0.x.1
    (/etc/hosts): every peer is then told to connect to its own loopback and DDP across hosts fails
    with "connectFullMesh failed ... Connection refused, remote=[127.0.0.1]"."""
    import os

    import psutil
    import ray
    ip = ray.util.get_node_ip_address()
    iface = next((name for name, addrs in psutil.net_if_addrs().items()
                  if any(a.address == ip for a in addrs)), None)
    if iface and not ip.startswith("127."):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", iface)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", iface)


def torch_config():
    """TorchConfig whose workers bind their collectives to the node's Ray address first (above)."""
    from ray.train.torch import TorchConfig
    from ray.train.torch.config import _TorchBackend  # the process-group setup we precede

    class Backend(_TorchBackend):
        def on_start(self, worker_group, backend_config):
            worker_group.execute(bind_collectives_to_node_ip)
            super().on_start(worker_group, backend_config)

    class NodeAddressTorchConfig(TorchConfig):
        @property
        def backend_cls(self):
            return Backend

    return NodeAddressTorchConfig()


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point: a plain dict config in, everything else in `skin.train`; its progress lines go
    to the driver's terminal through `config["_say"]` (skin.progress) when the driver asked for them."""
    train_member(TrainConfig.from_dict(config), RayRuntime(), log=config.get("_say") or print)


@dataclass
class Scaling:
    """Each member's Train workers: `workers` of them, or elastic between `min_workers` and `workers`
    (Ray Train starts with what fits, goes on with fewer after a loss, grows back when it can)."""
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    min_workers: int | None = None

    @property
    def elastic(self) -> bool:
        return self.min_workers is not None and self.min_workers < self.workers

    @property
    def num_workers(self) -> int | tuple[int, int]:
        return (self.min_workers, self.workers) if self.elastic else self.workers


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
        torch_config=torch_config(),
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.gpus_per_worker > 0,
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
