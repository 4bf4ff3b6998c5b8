"""One Serve deployment per ensemble member: probabilities and, when asked, every class's map, for a
batch of prepared inputs (`@serve.batch`), through the one member-inference path (skin.inference).

A member's only per-request setting, `fault_drill`, is its Serve `user_config`: changed in place.
"""
import logging
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from ray import serve

from .config import DEFAULT_MEMBER_CPUS, MemberOptions

logger = logging.getLogger("ray.serve")

# What a member computes for a plain image: (maps, no change to the bundle's Explanation). The second item is
# otherwise a request's skin.explanation.Overrides for this member (hashable: its derived runner's key).
DEFAULT_OPTIONS: Tuple[bool, Any] = (True, None)


@serve.deployment(ray_actor_options={"num_cpus": DEFAULT_MEMBER_CPUS}, max_ongoing_requests=32)
class MemberModel:
    """One ensemble member: probabilities + all-class Grad-CAM maps for a batch of inputs."""

    def __init__(self, bundle_dir: str, name: str, num_cpus: float = DEFAULT_MEMBER_CPUS,
                 max_batch_size: int = 8, batch_wait_timeout_s: float = 0.0, threads: Optional[int] = None,
                 amp: str = "off", graphs: str = "auto") -> None:
        import torch
        from skin.bundle import Bundle
        from skin.inference import MemberRunner
        from skin.presets import eval_pixels
        torch.set_num_threads(threads or max(1, int(round(num_cpus))))  # Ray sets 1 thread for fractional CPUs
        self.torch, self.amp = torch, amp
        bundle = Bundle.load(bundle_dir)
        self.name = name
        from skin.device import default_device
        self.device = default_device()
        self.runs = {None: MemberRunner.from_bundle(bundle, name, self.device, amp, graphs=graphs)}  # as `skin predict`
        captured = self.runs[None].warm_up(max_batch_size)  # the first request pays no compile
        if captured:
            logger.info("member %s: compiled passes for batch sizes %s on %s", name, captured, self.device)
        self.pixels = eval_pixels(self.runs[None].member.data_config)  # the ingress sends the resized uint8 image
        if amp == "bf16" and not self.runs[None].bf16:
            logger.warning("member %s: amp=bf16 asked for, but this CPU has no native bf16: running fp32", name)
        self.fault_drill = False
        self.predict.set_max_batch_size(max_batch_size)
        self.predict.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def reconfigure(self, config: Dict[str, Any]) -> None:
        self.fault_drill = bool((config or {}).get("fault_drill", False))

    def _runner(self, overrides):
        """The member with the bundle's Explanation and a request's Overrides (None: none); built once per
        setting asked for, sharing the member's weights (the answer never depends on it)."""
        if overrides not in self.runs:
            self.runs[overrides] = self.runs[None].with_explanation(overrides)
        return self.runs[overrides]

    def _run(self, batch: np.ndarray, options: Tuple[bool, Any] = DEFAULT_OPTIONS):
        """(probabilities, maps or None, ms) of a batch; `options` = (cam, explanation overrides)."""
        t0 = time.perf_counter()
        cam, explain = options
        x = self.pixels(self.torch.from_numpy(batch).to(self.device))
        probs, maps = self._runner(explain)(x, cam=cam)  # skin.inference: as `skin predict` / `skin explain`
        return probs, None if maps is None else maps.numpy().astype(np.float32), (time.perf_counter() - t0) * 1e3

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def predict(self, inputs: List[Any]) -> List[Dict[str, np.ndarray]]:
        """Each input: the resized uint8 image (answer and the bundle's maps), or (image, (cam, overrides)):
        no maps, or maps made otherwise (a request's skin.explanation.Overrides for this member)."""
        if self.fault_drill:
            raise RuntimeError(f"fault drill: member {self.name} is set to fail")
        # Computed on this replica's user-code event loop, not in a worker thread: Serve forms the next
        # batch as soon as this one *starts*, so with the loop free every queued request became a batch
        # of one (measured: batch 1 at 16 concurrent requests). Holding the loop until the batch is done
        # makes the next batch everything that arrived meanwhile (6-8 under load; no added wait when idle).
        # Serve's own loop (health checks, routing) runs in another thread and stays responsive.
        items = [x if isinstance(x, tuple) else (x, DEFAULT_OPTIONS) for x in inputs]
        out: List[Any] = [None] * len(items)
        for options in dict.fromkeys(o for _, o in items):  # one pass per setting asked for in this batch
            idx = [i for i, (_, o) in enumerate(items) if o == options]
            probs, maps, ms = self._run(np.stack([items[i][0] for i in idx]), options)
            for j, i in enumerate(idx):
                out[i] = {"probs": probs[j], "maps": None if maps is None else maps[j], "compute_ms": ms,
                          "batch": len(idx)}
        return out


    async def probs(self, views: np.ndarray, chunk: int = 32) -> np.ndarray:
        """Probabilities (N, C) of a stack of uint8 images at this member's input size (an occlusion map's
        image and views, skin.occlusion.member_views), in chunks; no maps. On the event loop, as `predict`."""
        if self.fault_drill:
            raise RuntimeError(f"fault drill: member {self.name} is set to fail")
        return np.concatenate([self._run(views[s:s + chunk], (False, None))[0] for s in range(0, len(views), chunk)])


def member_deployments(bundle, options: Dict[str, MemberOptions], prefix: str) -> Dict[str, Any]:
    """One MemberModel deployment per bundle member (named `prefix` + member), bound to its options.
    Each member's queue is bounded (Serve's max_queued_requests: a full queue refuses at once with
    BackPressureError, which the ingress answers as 503 busy), behind the ingress's latency budget."""
    unknown = set(options) - set(bundle.member_names)
    if unknown:
        raise ValueError(f"members {sorted(unknown)} are not in the bundle; it has {bundle.member_names}")
    handles = {}
    for name in bundle.member_names:
        o = options.get(name, MemberOptions())
        opts: Dict[str, Any] = {"num_cpus": o.num_cpus}
        if o.num_gpus:
            opts["num_gpus"] = o.num_gpus
        if o.resources:
            opts["resources"] = dict(o.resources)
        scale: Dict[str, Any] = ({"autoscaling_config": o.autoscaling.model_dump()} if o.autoscaling
                                 else {"num_replicas": o.replicas})
        init = dict(bundle_dir=str(bundle.root.resolve()), name=name, num_cpus=o.num_cpus,
                    max_batch_size=o.max_batch_size, batch_wait_timeout_s=o.batch_wait_timeout_s, threads=o.threads,
                    amp=o.amp, graphs=o.graphs)
        handles[name] = MemberModel.options(
            name=prefix + name, ray_actor_options=opts, **scale,
            max_ongoing_requests=2 * o.max_batch_size, max_queued_requests=4 * o.max_batch_size,
            user_config={"fault_drill": o.fault_drill},
        ).bind(**init)
    return handles
