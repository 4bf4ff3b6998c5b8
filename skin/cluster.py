"""Finding and planning the Ray cluster a job runs on: joining it (with its token), what its nodes and
autoscaler offer, a resource plan for a job's worker groups (skin.plan), and waiting for requested
nodes. Nothing here imports the training stack; the jobs turn a ClusterError into its exit code.

    init_ray(num_cpus)                                   # RAY_ADDRESS's cluster, else a private local Ray
    plan = plan_cluster("train.py", [Group("resnet50", 2, 4, 1)], dry_run=a.dry_run)
"""
from __future__ import annotations

import argparse
import os


class ClusterError(Exception):
    """The job cannot run on this cluster (or reach it); the message says why and how to fix it.
    `code`: the exit code the jobs return (2: bad plan or access, 3: nodes did not come)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def add_cluster_arguments(parser: argparse.ArgumentParser, dry_run_help: str) -> None:
    """--num-cpus, --dry-run, --node-types, --scale-timeout: the same on every job."""
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local Ray this job starts when RAY_ADDRESS is "
                        "unset (a job submitted to a cluster gets RAY_ADDRESS from Ray; set RAY_ADDRESS=auto to "
                        "join a running local cluster)")
    parser.add_argument("--dry-run", action="store_true", help=dry_run_help)
    parser.add_argument("--verbose", action="store_true", help="Ray's own output too: every worker's log lines and "
                        "Ray's INFO messages (by default they stay in Ray's log files and the job prints its progress)")
    parser.add_argument("--node-types", metavar="FILE", help="the cluster's autoscaling node types: a `ray up` YAML "
                        "or a KubeRay manifest (default: what the cluster's autoscaler reports). Workers that do not "
                        "fit the nodes running now are placed on node types the autoscaler can start, and those "
                        "nodes are requested")
    parser.add_argument("--scale-timeout", type=float, default=900,
                        help="seconds to wait for requested nodes (default 900)")


def init_ray(num_cpus: int | None = None, verbose: bool = False) -> None:
    """Join the cluster named by RAY_ADDRESS (set by Ray for a submitted job, or by the user, e.g.
    `auto`); otherwise start a private local Ray, never attaching to a stale or foreign one.
    Quiet unless `verbose`: workers' output stays in Ray's log files (the jobs print their own progress,
    skin.progress) and Ray's INFO lines are not shown. A cluster that refuses this client's token raises
    ClusterError with one line saying how to fix it."""
    address = os.environ.get("RAY_ADDRESS")
    if not address:
        # a private local Ray in single-machine mode: its node is 127.0.0.1 and every port it opens is on
        # loopback (without it Ray takes the machine's network address and listens on every interface). Its
        # daemons read the switch from the environment they inherit; this process, which may have imported
        # ray already (where Ray reads it), is given the node's address below.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    from ray.exceptions import AuthenticationError
    if ray.is_initialized():
        return
    import logging
    quiet = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.WARNING}
    try:
        if address:
            ray.init(**quiet)
        else:
            if os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0":
                from ray._private import ray_constants  # Ray reads the switch once, at `import ray`, maybe already done
                ray_constants.ENABLE_RAY_CLUSTER = False
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **quiet)
    except (AuthenticationError, ConnectionError) as e:
        fix = ("set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH=<file> (or RAY_AUTH_TOKEN) to the cluster's token "
               "(the local head's: `source <(bash cluster/local.sh env)`)")
        if isinstance(e, AuthenticationError):
            raise ClusterError(f"the Ray cluster at {address or 'localhost'} needs a token and none was found; "
                               f"{fix}") from None
        # Ray retries a refused token until it gives up with a ConnectionError
        given = "RAY_AUTH_TOKEN" if os.environ.get("RAY_AUTH_TOKEN") else os.environ.get("RAY_AUTH_TOKEN_PATH")
        raise ClusterError(f"could not connect to the Ray cluster at {address}: it refused this client's token "
                           f"({given or 'none'}; 'InvalidAuthToken' above) or is not running there (`ray status`); "
                           f"{fix}") from None


def cluster_nodes(node_types: str | None = None):
    """Shapes of the connected cluster's alive nodes by their *free* resources now (a Serve app
    or another job may hold some), plus the node types an autoscaler may still start: those in
    `node_types` (a `ray up` YAML or a KubeRay manifest), else in the `ray up` head's own config."""
    import ray
    from .plan import merge_autoscaler_types, nodes_from_file, nodes_from_resources
    alive = [n for n in ray.nodes() if n.get("Alive")]
    free = free_per_node(alive)
    per_node = []
    for n in alive:
        res = free.get(n["NodeID"], n.get("Resources", {}))
        per_node.append((n.get("NodeManagerAddress", "node") + ("(head)" if "node:__internal_head__" in
                                                                   n.get("Resources", {}) else ""), res))
    nodes = nodes_from_resources(per_node)
    path = node_types_file(node_types)
    types = nodes_from_file(path) if path else []
    return merge_autoscaler_types(nodes, types) if types else nodes


# where `ray up` leaves the cluster's config on the head, for its autoscaler (a submitted job runs there)
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"


def node_types_file(given: str | None) -> str | None:
    """The autoscaling node types' file: `--node-types` when given, else the `ray up` head's own config when
    there is one (None: no autoscaler known; a KubeRay cluster that autoscales names its manifest)."""
    if given:
        return given
    from pathlib import Path
    own = Path(BOOTSTRAP_CONFIG).expanduser()
    return str(own) if own.is_file() else None


def free_per_node(alive: list[dict] | None = None) -> dict:
    """node id -> free resources now of the `alive` nodes (`ray.nodes()` entries; default: every alive node),
    from Ray's public APIs; {} when they cannot say (totals are used then).
    One node: `ray.available_resources()`. Several: each node's total less what is held there, by Ray's state
    API (it needs the cluster's dashboard): the bundles of created placement groups, and the live actors and
    running tasks outside them (an actor without num_cpus holds none, as in the scheduler)."""
    import ray
    if alive is None:
        alive = [n for n in ray.nodes() if n.get("Alive")]
    if len(alive) == 1:
        return {alive[0]["NodeID"]: ray.available_resources()}
    from collections import Counter
    try:
        from ray.util.state import list_actors, list_placement_groups, list_tasks
        many = {"detail": True, "limit": 10_000, "raise_on_missing_output": False}
        held: dict[str, Counter] = {}
        for pg in list_placement_groups(filters=[("state", "=", "CREATED")], **many):
            for b in pg.bundles or []:
                if b.get("node_id"):
                    held.setdefault(b["node_id"], Counter()).update(b.get("unit_resources") or {})
        running = list_actors(filters=[("state", "=", "ALIVE")], **many) + \
            list_tasks(filters=[("state", "=", "RUNNING"), ("type", "=", "NORMAL_TASK")], **many)
        for r in running:
            if r.node_id and not r.placement_group_id:
                held.setdefault(r.node_id, Counter()).update(r.required_resources or {})
    except Exception as e:  # noqa: BLE001 - no dashboard (the state API's server) or it did not answer
        import sys
        print(f"free resources per node unknown (Ray's state API: {str(e).splitlines()[0][:160]}); "
              "planning on the nodes' totals", file=sys.stderr)
        return {}
    return {n["NodeID"]: {k: max(0.0, v - held.get(n["NodeID"], {}).get(k, 0.0)) for k, v in n["Resources"].items()}
            for n in alive}


def start_job(prog: str, args: argparse.Namespace, groups):
    """Every job's start-up: join or start Ray (init_ray, with the job's --num-cpus and --verbose), plan its
    worker `groups` against the cluster's nodes (plan_cluster, with --node-types, --dry-run, --scale-timeout).
    Returns the plan, or the exit code the job returns at once: 0 after a dry run, a ClusterError's code with
    its one line on stderr."""
    import sys
    try:
        init_ray(args.num_cpus, args.verbose)
        plan = plan_cluster(prog, groups, args.node_types, args.dry_run, args.scale_timeout)
    except ClusterError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return e.code
    return 0 if args.dry_run else plan


def plan_cluster(prog: str, groups, node_types: str | None = None, dry_run: bool = False,
                 scale_timeout_s: float = 900):
    """The plan for `groups` on the connected cluster, printed. ClusterError (exit 2) when a worker
    fits no node; with `dry_run` only printed; when the autoscaler must add nodes, asks for them
    (`request_resources`) and waits up to `scale_timeout_s` for them to join (ClusterError, exit 3,
    when they do not)."""
    from .plan import PlanError, plan_workers
    try:
        nodes = cluster_nodes(node_types)
        plan = plan_workers(nodes, groups)
    except PlanError as e:
        raise ClusterError(str(e)) from None
    print("resource plan (nodes: " + "; ".join(n.describe() for n in nodes) + ")\n" + plan.describe(), flush=True)
    if plan.new_nodes and not dry_run:
        wait_for_nodes(plan, scale_timeout_s, prog)
    return plan


def wait_for_nodes(plan, timeout_s: float, prog: str) -> None:
    """Ask the autoscaler for every worker's bundle and wait until the cluster can hold them."""
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
            request_resources(bundles=[])
            raise ClusterError(f"the autoscaler did not add {want} within {timeout_s:.0f}s; check `ray status` and "
                               "the autoscaler's log (quota, instance type, max_workers), or raise --scale-timeout",
                               code=3)
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
