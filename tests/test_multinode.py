"""Scale-out on a real multi-node Ray cluster on this machine (cluster/simcluster.py): DDP across
nodes with whole-split validation, a node killed mid-run, and resource plans that fit the node
shapes of the shipped cluster configs. Each cluster runs in a child process (the test
process's own Ray is already initialised)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from skin.plan import Group, NodeType, PlanError, nodes_from_file, plan_workers

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"


# --------------------------------------------------------------------------- the plan, pure
def test_the_old_default_that_never_scheduled_now_fits_the_rayjob_pods():
    """RayJob: 4-CPU head + three 8-CPU/1-GPU pods; 3 members x 1 GPU worker. The old default
    (free CPUs / workers = 9.3 CPUs + 1 GPU) fit no pod; the plan gives each worker one pod."""
    nodes = nodes_from_file(CLUSTER / "kuberay" / "rayjob-train.yaml")
    plan = plan_workers(nodes, [Group(m, 1, None, 1.0) for m in ("a", "b", "c")])
    assert [g.cpus for g in plan.groups] == [8.0, 8.0, 8.0]
    assert sorted(w for ws in plan.placement.values() for w in ws) == ["gpu#0", "gpu#1", "gpu#2"]
    assert not plan.queued and not plan.new_nodes
    # the same RayJob's evaluate.py step: one scorer actor, 1 CPU (default) + 1 GPU (--gpus-per-actor 1)
    assert "--gpus-per-actor" in _entrypoint_args(CLUSTER / "kuberay" / "rayjob-train.yaml", "jobs/evaluate.py")
    assert plan_workers(nodes, [Group("scorer", 1, 1.0, 1.0)]).placement["scorer"] == ["gpu#0"]
    with pytest.raises(PlanError, match=r"asks for 9.3 CPU \+ 1 GPU, more than any node has \(head: 1 x \(4 CPU\); "
                                        r"gpu: 3 x \(8 CPU \+ 1 GPU\)\)"):
        plan_workers(nodes, [Group("a", 1, 9.3, 1.0)])


def test_cpu_share_lets_every_worker_start_at_once():
    nodes = [NodeType("head", 0, 0, 1), NodeType("w", 1, 0, 2)]
    plan = plan_workers(nodes, [Group(m, 1, None, 0.0) for m in "abc"])
    assert [g.cpus for g in plan.groups] == [0.5, 0.5, 0.5]  # 0.6 each would leave one waiting
    assert not plan.queued
    two = plan_workers(nodes, [Group("a", 2, None, 0.0)])
    assert two.groups[0].cpus == 1.0 and sorted(two.placement["a"]) == ["w#0", "w#1"]


def test_autoscaler_node_types_are_places_to_run_not_refusals():
    nodes = nodes_from_file(CLUSTER / "cluster.yaml")  # gpu_worker: min 0, max 4
    plan = plan_workers(nodes, [Group(m, 1, None, 1.0) for m in ("a", "b", "c")])
    assert plan.new_nodes == {"gpu_worker": 3} and not plan.queued
    assert plan.bundles() == [{"CPU": 4.0, "GPU": 1.0}] * 3
    with pytest.raises(PlanError, match="more than any node has"):
        plan_workers(nodes, [Group("a", 1, None, 2.0)])


def test_rayservice_members_fit_its_pods():
    """The RayService's own serve config (members on fractional GPUs) fits its worker pods."""
    doc = yaml.safe_load((CLUSTER / "kuberay" / "rayservice.yaml").read_text())
    nodes = nodes_from_file(CLUSTER / "kuberay" / "rayservice.yaml")
    app = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"][0]["args"]
    groups = [Group(name, o.get("autoscaling", {}).get("min_replicas", o.get("replicas", 1)),
                    o["num_cpus"], o.get("num_gpus", 0.0)) for name, o in app["members"].items()]
    groups.append(Group("ingress", app.get("ingress_replicas", 1), app["ingress_cpus"], 0.0))
    plan = plan_workers(nodes, groups)
    assert not plan.queued and not plan.new_nodes, plan.describe()
    assert all(g.gpus > 0 for g in groups[:-1])  # members on the GPU pods


def test_node_types_come_from_the_flag_else_the_ray_up_heads_own_config(tmp_path, monkeypatch):
    from skin import cluster
    monkeypatch.setattr(cluster, "BOOTSTRAP_CONFIG", str(tmp_path / "ray_bootstrap_config.yaml"))
    assert cluster.node_types_file(None) is None  # no autoscaler known
    (tmp_path / "ray_bootstrap_config.yaml").write_text((CLUSTER / "cluster.yaml").read_text())
    assert cluster.node_types_file(None) == str(tmp_path / "ray_bootstrap_config.yaml")
    assert cluster.node_types_file("given.yaml") == "given.yaml"


# --------------------------------------------------------------------------- on simulated clusters
def _sim(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "cluster.simcluster", *args], cwd=ROOT, env=env, timeout=timeout,
                          capture_output=True, text=True)


def _entrypoint_args(manifest: Path, script: str) -> list[str]:
    entry = yaml.safe_load(manifest.read_text())["spec"]["entrypoint"]
    cmd = entry.split("&&")
    part = next(c for c in cmd if script in c)
    return part.split(script, 1)[1].replace('"', "").split()


def _runs(stdout: str) -> list[tuple[int, str, str]]:
    """(returncode, stdout, stderr) of each dry run printed by `simcluster plan`."""
    import re
    out = []
    for part in re.split(r"^### run \d+ ", stdout, flags=re.M)[1:]:
        head, _, rest = part.partition("\n")
        so, _, se = rest.partition("### stderr\n")
        out.append((int(head.split("=")[1]), so, se))
    return out


@pytest.mark.ray
def test_shipped_entrypoints_plan_on_clusters_of_their_shape():
    """Real clusters of the shipped shapes, the shipped entrypoints' own train.py arguments, --dry-run:
    1. RayJob (4-CPU head + three 8-CPU nodes declaring 1 GPU): exit 0, 8 CPUs + 1 GPU per worker.
    2. A worker too large for any node: exit 2, one line naming the ask and the shapes.
    3. cluster.yaml's autoscaling node types on a cluster with one GPU node up: the plan counts the
       gpu_worker nodes the autoscaler can start instead of refusing."""
    import shlex
    args = " ".join(shlex.quote(x) for x in _entrypoint_args(CLUSTER / "kuberay" / "rayjob-train.yaml", "jobs/train.py"))
    r = _sim("plan", "--head-cpus", "4", "--node", "8:1", "--node", "8:1", "--node", "8:1", "--args", args,
             "--args", args + " --cpus-per-worker 12",
             "--args", f"--data /nonexistent --out /tmp/x --gpus-per-worker 1 --node-types {CLUSTER / 'cluster.yaml'} "
                       "--members mobilenetv2 efficientnet_b1 resnet50 --workers 2")
    runs = _runs(r.stdout)
    assert len(runs) == 3, r.stdout[-2000:] + r.stderr[-3000:]
    (rc0, out0, err0), (rc1, out1, err1), (rc2, out2, err2) = runs
    assert rc0 == 0, out0 + err0[-2000:]
    assert out0.count("1 worker(s) x 8 CPU + 1 GPU") == 3, out0
    assert rc1 == 2
    last = err1.strip().splitlines()[-1]
    assert "asks for 12 CPU + 1 GPU" in last and "8 CPU + 1 GPU" in last and "Traceback" not in err1
    assert rc2 == 0, out2 + err2[-2000:]  # 6 GPU workers: 3 nodes up, 3 more the autoscaler can start
    assert "the autoscaler must start: 3 x gpu_worker (autoscaler)" in out2, out2


@pytest.mark.ray
def test_plans_count_only_what_is_free_on_each_node():
    """Another job's actor holds one GPU node of three (8 CPU + 1 GPU each): the plan sees that node with
    nothing free (Ray's public state API), gives two members the other two and queues the third."""
    args = "--data /nonexistent --out /tmp/x --gpus-per-worker 1 --members mobilenetv2 efficientnet_b1 resnet50"
    r = _sim("plan", "--head-cpus", "4", "--node", "8:1", "--node", "8:1", "--node", "8:1", "--hold", "8:1",
             "--args", args)
    runs = _runs(r.stdout)
    assert len(runs) == 1, r.stdout[-2000:] + r.stderr[-3000:]
    rc, out, err = runs[0]
    assert rc == 0, out + err[-2000:]
    assert "1 x (0 CPU)" in out and "2 x (8 CPU + 1 GPU)" in out, out
    assert "-> waits" in out and out.count("x 8 CPU + 1 GPU ->") == 3, out


@pytest.mark.ray
def test_ddp_across_two_nodes_survives_a_node_and_validates_every_row(scanned, tmp_path):
    """One member, 2 DDP workers (1 CPU each) on a cluster of a 0-CPU head and three 1-CPU nodes.
    The node of one worker is killed after the first checkpoint: Train restarts the group on the
    two nodes left, resumes from the checkpoint and finishes with a bundle. Validation covered
    every val row once: the best checkpoint's val probabilities and metrics equal one process
    evaluating that checkpoint."""
    import torch
    from torch.utils.data import DataLoader
    from skin.bundle import Bundle
    from skin.cache import ManifestDataset, cache_side, skip_none_collate
    from skin.checkpoint import load_member, load_tensors
    from skin.data import load_classes, load_manifest
    from skin.presets import eval_preset
    from skin.train import evaluate_loader

    out = tmp_path / "train"
    r = _sim("drill", "--data", str(scanned), "--out", str(out), "--epochs", "5", "--json", str(tmp_path / "r.json"),
             timeout=600)
    report = json.loads((tmp_path / "r.json").read_text()) if (tmp_path / "r.json").is_file() else {}
    assert r.returncode == 0, (report.get("log_tail") or r.stdout[-3000:]) + r.stderr[-2000:]
    assert report["worker_nodes_before"] == 2 and report["worker_nodes_after"] == 2  # one worker per node
    assert report["resumed"], report["log_tail"]
    assert len(report["rank_nodes"][str(0)] + report["rank_nodes"][str(1)]) >= 4  # two groups of two ranks
    print(f"node killed {report['killed']['at_s']:.1f}s into the run; training resumed "
          f"{report['kill_to_resumed_s']:.1f}s later")
    Bundle.load(out / "bundle")

    summary = json.loads((out / "summary.json").read_text())
    ckpt = Path(summary["mobilenetv2"]["checkpoint"])
    member, meta = load_member(ckpt)
    stored = load_tensors(ckpt / "val_probs.safetensors")
    classes = load_classes(scanned)
    val = load_manifest(scanned, "val", classes)
    ds = ManifestDataset(val, eval_preset(member.data_config), str(scanned), "val",
                         cache_side(member.data_config.input_size))
    torch.set_num_threads(2)
    metrics, probs, labels = evaluate_loader(member, DataLoader(ds, 32, collate_fn=skip_none_collate),
                                             torch.device("cpu"), classes, amp=False)
    assert len(stored["labels"]) == len(val)  # every row once: no shard, no padding
    np.testing.assert_array_equal(stored["labels"].numpy(), labels)
    np.testing.assert_allclose(stored["probs"].numpy(), probs, atol=1e-5)
    for k, v in metrics.items():
        assert abs(meta["metrics"][k] - v) < 1e-5, k


@pytest.mark.slow
@pytest.mark.ray
def test_serving_scales_out_and_survives_a_node(tmp_path):
    """benchmarks/serve_multinode.py, short: ResNet50's replicas grow under load with no request
    lost and spread over the worker nodes, shrink when idle; the node holding the most member
    replicas is killed under load: failures are 503s, none hangs past the member timeout, and
    answers are whole again within 30 s."""
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve_multinode.py"), "--load-s", "40",
                        "--idle-s", "60", "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    f = json.loads(out.read_text())
    assert f["scale"]["errors"] == 0 and f["scale"]["scaled_up_at_s"] is not None, f["scale"]
    assert max(n for _, n, _ in f["scale"]["timeline"]) >= 2
    assert f["scale"]["shrunk_after_idle_s"] is not None
    loss = f["node_loss"]
    assert set(loss["statuses"]) <= {503}, loss
    assert loss["slowest_s"] < 10 + 5  # member_timeout_s + the answer's own time
    assert loss["whole_again_after_kill_s"] is not None and loss["whole_again_after_kill_s"] <= 30, loss
