"""Resource plan: from a cluster's node shapes and a job's settings to each worker's resources.

Pure functions, no Ray: `jobs/train.py`, `jobs/tune.py` and `jobs/evaluate.py` read the node
shapes (from the connected cluster, a Ray cluster-launcher YAML or a KubeRay manifest) and ask
`plan_workers` what each worker gets and where it can run. The plan answers before anything
starts: every worker must fit a node that runs now or a node type the autoscaler can start, or
the job stops with a message naming what was asked for and the shapes there are.

Placement is first-fit decreasing onto the nodes running now, then onto new nodes of the
smallest node type that holds the worker, within each type's `max_count` (Ray places a
worker's bundle on one node, as this does).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import yaml


class PlanError(ValueError):
    """The job's workers cannot be placed on this cluster; the message says what to change."""


@dataclass(frozen=True)
class NodeType:
    """A node shape: `count` nodes of it run now; the autoscaler may run up to `max_count`."""

    name: str
    cpus: float
    gpus: float = 0.0
    count: int = 1
    max_count: int | None = None  # None: no more than `count` (no autoscaling for this type)

    @property
    def can_add(self) -> int:
        return max(0, (self.max_count if self.max_count is not None else self.count) - self.count)

    def describe(self) -> str:
        scale = f", up to {self.max_count}" if self.max_count is not None and self.max_count != self.count else ""
        gpu = f" + {self.gpus:g} GPU" if self.gpus else ""
        return f"{self.name}: {self.count}{scale} x ({self.cpus:g} CPU{gpu})"


@dataclass(frozen=True)
class Group:
    """Workers that ask for the same resources: one member's Train workers, one Tune trial, a
    Ray Data actor pool. `cpus` None: the plan picks the largest share that lets all start at once."""

    name: str
    workers: int
    cpus: float | None = None
    gpus: float = 0.0


@dataclass
class Plan:
    groups: list[Group]  # with the CPUs the plan chose
    placement: dict[str, list[str]]  # group -> node each worker lands on ("<type>#<i>", new ones marked +)
    new_nodes: dict[str, int] = field(default_factory=dict)  # node type -> nodes the autoscaler must add
    queued: list[str] = field(default_factory=list)  # workers that fit a node but not all at once

    def resources(self, group: str) -> dict[str, float]:
        g = next(g for g in self.groups if g.name == group)
        return {"CPU": g.cpus or 0.0, **({"GPU": g.gpus} if g.gpus else {})}

    def bundles(self) -> list[dict[str, float]]:
        """Every worker's resources, for `ray.autoscaler.sdk.request_resources(bundles=...)`."""
        return [self.resources(g.name) for g in self.groups for _ in range(g.workers)]

    def describe(self) -> str:
        lines = []
        for g in self.groups:
            where = ", ".join(self.placement.get(g.name, [])) or "waits"
            lines.append(f"  {g.name:<16} {g.workers} worker(s) x {g.cpus:g} CPU"
                         f"{f' + {g.gpus:g} GPU' if g.gpus else ''} -> {where}")
        if self.new_nodes:
            lines.append("  the autoscaler must start: " + ", ".join(f"{n} x {k}" for k, n in self.new_nodes.items()))
        if self.queued:
            lines.append(f"  {len(self.queued)} worker(s) fit a node but not all at once: they start when others finish")
        return "\n".join(lines)


def _round_down(x: float, step: float = 0.1) -> float:
    return math.floor(x / step + 1e-9) * step


def _fits(cpus: float, gpus: float, node: NodeType) -> bool:
    return cpus <= node.cpus + 1e-9 and gpus <= node.gpus + 1e-9


def _slots(node_cpus: float, node_gpus: float, cpus: float, gpus: float) -> int:
    by_cpu = math.floor(node_cpus / cpus + 1e-9) if cpus > 0 else 10**6
    by_gpu = math.floor(node_gpus / gpus + 1e-9) if gpus > 0 else 10**6
    return min(by_cpu, by_gpu)


def default_cpus(nodes: list[NodeType], workers: int, gpus: float) -> float:
    """The largest CPU share (a multiple of 0.1) with which all `workers` start at once on the
    nodes (running now, plus those the autoscaler may add). When no share lets them all start
    at once (fewer GPUs than workers), a GPU's share of its node's CPUs: the rest queue."""
    usable = [(n.cpus, n.gpus, n.count + n.can_add) for n in nodes if n.gpus + 1e-9 >= gpus]
    if not usable:
        return 0.1
    hi = _round_down(max(c for c, _, _ in usable))
    c = hi
    while c > 0.1 + 1e-9:
        if sum(k * _slots(nc, ng, c, gpus) for nc, ng, k in usable) >= workers:
            return round(c, 1)
        c = _round_down(c - 0.1)
    per_gpu = [nc / max(1, math.floor(ng / gpus + 1e-9)) if gpus else nc for nc, ng, _ in usable]
    return max(0.1, round(_round_down(max(per_gpu)), 1))


def plan_workers(nodes: list[NodeType], groups: list[Group]) -> Plan:
    """Place every worker of every group; raise PlanError when a worker fits no node type."""
    if not nodes:
        raise PlanError("the cluster reports no nodes; is it up? (ray status)")
    for g in groups:
        if g.workers < 1:
            raise PlanError(f"{g.name}: workers must be at least 1, got {g.workers}")
        if (g.cpus is not None and g.cpus <= 0) or g.gpus < 0:
            raise PlanError(f"{g.name}: CPUs per worker must be > 0 and GPUs >= 0")
    total = sum(g.workers for g in groups if g.cpus is None)
    resolved = []
    for g in groups:
        cpus = g.cpus if g.cpus is not None else default_cpus(nodes, total or g.workers, g.gpus)
        resolved.append(Group(g.name, g.workers, cpus, g.gpus))
    shapes = "; ".join(n.describe() for n in nodes)
    for g in resolved:
        if not any(_fits(g.cpus, g.gpus, n) for n in nodes):
            raise PlanError(
                f"each {g.name} worker asks for {g.cpus:g} CPU{f' + {g.gpus:g} GPU' if g.gpus else ''}, more than "
                f"any node has ({shapes}); lower --cpus-per-worker/--gpus-per-worker or --workers, "
                f"or add a node type that large (an autoscaling cluster: --node-types with its `ray up` YAML "
                f"or KubeRay manifest)")

    # free capacity of each node running now, then new nodes as needed
    free = [[n, i, n.cpus, n.gpus] for n in nodes for i in range(n.count)]
    added = {n.name: 0 for n in nodes}
    placement: dict[str, list[str]] = {g.name: [] for g in resolved}
    queued = []
    order = sorted(((g, k) for g in resolved for k in range(g.workers)), key=lambda t: (-t[0].gpus, -t[0].cpus))
    for g, k in order:
        slot = next((s for s in free if s[2] + 1e-9 >= g.cpus and s[3] + 1e-9 >= g.gpus), None)
        if slot is None:
            startable = sorted((n for n in nodes if n.can_add > added[n.name] and _fits(g.cpus, g.gpus, n)),
                               key=lambda n: (n.gpus, n.cpus))
            if startable:
                n = startable[0]
                slot = [n, f"+{added[n.name]}", n.cpus, n.gpus]
                added[n.name] += 1
                free.append(slot)
        if slot is None:
            queued.append(f"{g.name}[{k}]")
            continue
        slot[2] -= g.cpus
        slot[3] -= g.gpus
        placement[g.name].append(f"{slot[0].name}#{slot[1]}")
    return Plan(resolved, placement, {k: v for k, v in added.items() if v}, queued)


# --------------------------------------------------------------------------- node shapes
_QUANTITY = re.compile(r"^([0-9.]+)(m?)$")


def _k8s_cpu(value) -> float:
    """Kubernetes CPU quantity ("4", 4, "500m") -> CPUs."""
    m = _QUANTITY.match(str(value).strip())
    if not m:
        raise PlanError(f"cannot read the CPU quantity {value!r} (expected e.g. 4 or 500m)")
    return float(m.group(1)) / (1000 if m.group(2) else 1)


def _pod_shape(spec: dict, name: str, count: int, max_count: int | None) -> NodeType:
    """A KubeRay group's Ray resources: rayStartParams num-cpus/num-gpus win over the container's
    limits (what KubeRay passes to `ray start`)."""
    params = spec.get("rayStartParams") or {}
    containers = spec.get("template", {}).get("spec", {}).get("containers") or [{}]
    res = containers[0].get("resources") or {}
    limits = {**(res.get("requests") or {}), **(res.get("limits") or {})}
    cpus = float(params["num-cpus"]) if "num-cpus" in params else _k8s_cpu(limits.get("cpu", 0))
    gpus = float(params["num-gpus"]) if "num-gpus" in params else float(limits.get("nvidia.com/gpu", 0))
    return NodeType(name, cpus, gpus, count, max_count)


def nodes_from_kuberay(doc: dict) -> list[NodeType]:
    """Node types of a RayCluster, RayJob or RayService manifest (autoscaling bounds included)."""
    spec = doc.get("spec") or {}
    cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
    if "headGroupSpec" not in cluster:
        raise PlanError(f"{doc.get('kind', 'manifest')}: no headGroupSpec found")
    autoscaling = bool(cluster.get("enableInTreeAutoscaling"))
    nodes = [_pod_shape(cluster["headGroupSpec"], "head", 1, None)]
    for g in cluster.get("workerGroupSpecs") or []:
        replicas = int(g.get("replicas", g.get("minReplicas", 0)))
        nodes.append(_pod_shape(g, g.get("groupName", "workers"), replicas,
                                int(g.get("maxReplicas", replicas)) if autoscaling else None))
    return nodes


def nodes_from_launcher(doc: dict) -> list[NodeType]:
    """Node types of a Ray cluster-launcher YAML (`ray up`): min_workers run at start."""
    types = doc.get("available_node_types") or {}
    head = doc.get("head_node_type")
    nodes = []
    for name, t in types.items():
        r = t.get("resources") or {}
        if name == head:
            nodes.append(NodeType(name, float(r.get("CPU", 0)), float(r.get("GPU", 0)), 1, None))
        else:
            nodes.append(NodeType(name, float(r.get("CPU", 0)), float(r.get("GPU", 0)),
                                  int(t.get("min_workers", 0)), int(t.get("max_workers", doc.get("max_workers", 0)))))
    if not nodes:
        raise PlanError("the cluster config has no available_node_types")
    return nodes


def nodes_from_file(path: str | Path) -> list[NodeType]:
    """Node shapes from a cluster-launcher YAML or a KubeRay manifest."""
    p = Path(path)
    if not p.is_file():
        raise PlanError(f"no cluster config at {p}")
    try:
        doc = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise PlanError(f"{p} is not YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(doc, dict):
        raise PlanError(f"{p} is not a cluster config (a mapping)")
    if "available_node_types" in doc:
        return nodes_from_launcher(doc)
    if doc.get("kind") in ("RayCluster", "RayJob", "RayService"):
        return nodes_from_kuberay(doc)
    raise PlanError(f"{p} is neither a Ray cluster-launcher YAML nor a KubeRay manifest")


def nodes_from_resources(per_node: Iterable[tuple[str, dict]]) -> list[NodeType]:
    """Node shapes of a running cluster from each node's (label, resources), alike ones grouped."""
    shapes: dict[tuple, list] = {}
    for label, res in per_node:
        key = (round(float(res.get("CPU", 0)), 3), round(float(res.get("GPU", 0)), 3))
        shapes.setdefault(key, []).append(label)
    return [NodeType(labels[0] if len(labels) == 1 else f"{len(labels)} nodes", c, g, len(labels))
            for (c, g), labels in sorted(shapes.items())]


def merge_autoscaler_types(running: list[NodeType], types: list[NodeType]) -> list[NodeType]:
    """Running nodes plus the node types an autoscaler may still start (from a config file).
    A type's running nodes are counted against its `max_count` by shape."""
    out = list(running)
    for t in types:
        if t.max_count is None or t.max_count == 0:
            continue
        running_like = sum(n.count for n in running if (n.cpus, n.gpus) == (t.cpus, t.gpus))
        room = t.max_count - running_like
        if room > 0:
            out.append(NodeType(f"{t.name} (autoscaler)", t.cpus, t.gpus, 0, room))
    return out
