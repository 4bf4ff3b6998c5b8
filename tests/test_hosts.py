"""Ray across a real network on this machine: hosts are network namespaces on a private /24
(cluster/hosts.py). A head in host A, workers in B and C joining over the bridge, a client in D;
token auth between hosts. Everything started here is stopped and removed by the test itself."""
import json
import re
import subprocess
import sys

import pytest

from cluster.hosts import IP, Hosts, available

WHY = available()
# slow: in `make test-all` (about a minute: four namespaces, two `ray start`s, the Ray Client's retries)
pytestmark = [pytest.mark.skipif(WHY is not None, reason=f"no network namespaces here: {WHY}"), pytest.mark.slow,
              pytest.mark.ray]

NODES = """
import json, ray, socket
ray.init(address="{head}")
@ray.remote(num_cpus=1)
def where():
    return ray.util.get_node_ip_address()
print(json.dumps({{"nodes": sorted((n["NodeManagerAddress"], n["Resources"].get("CPU", 0)) for n in ray.nodes()
                                   if n["Alive"]),
                  "tasks": sorted(set(ray.get([where.remote() for _ in range(8)])))}}))
"""


def test_a_cluster_of_hosts_with_token_auth_between_them(tmp_path):
    """Workers in B and C join A's head over the network with their declared CPUs; D with the token
    sees the three nodes and runs tasks on B and C; without it, D's driver, the Jobs API, `ray job
    submit` and the Ray Client port are refused. Torn down: no namespace of the run is left."""
    import secrets
    token = tmp_path / "token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    with Hosts(4) as hosts:
        a, b, c, _ = hosts.addresses
        head = hosts.ray_head(0, str(token))
        hosts.ray_worker(1, head, str(token), num_cpus=1)
        hosts.ray_worker(2, head, str(token), num_cpus=1)
        r = hosts.run(3, [sys.executable, "-c", NODES.format(head=head)], env=hosts.env(str(token)), timeout=180)
        seen = json.loads(r.stdout.strip().splitlines()[-1])
        assert seen["nodes"] == [[a, 0], [b, 1.0], [c, 1.0]], seen
        assert set(seen["tasks"]) <= {b, c} and seen["tasks"], seen  # tasks ran on the workers' hosts
        # no token: the driver's connection to the GCS, the Jobs API and the Ray Client port are refused
        r = hosts.run(3, [sys.executable, "-c", f"import ray; ray.init(address='{head}')"], env=hosts.env(None),
                      check=False, timeout=120)
        assert r.returncode != 0 and "Connected to Ray cluster" not in r.stderr
        jobs = f"http://{a}:8265/api/jobs/"
        probe = ("import sys, requests; h = {'Authorization': 'Bearer ' + sys.argv[2]} if len(sys.argv) > 2 else {}; "
                 "print(requests.get(sys.argv[1], headers=h, timeout=20).status_code)")
        r = hosts.run(3, [sys.executable, "-c", probe, jobs], env=hosts.env(None))
        assert r.stdout.strip() == "401", r.stdout
        r = hosts.run(3, [sys.executable, "-c", probe, jobs, token.read_text()], env=hosts.env(None))
        assert r.stdout.strip() == "200", r.stdout
        r = hosts.run(3, [sys.executable, "-c", f"import ray; ray.init('ray://{a}:10001')"], env=hosts.env(None),
                      check=False, timeout=120)
        assert r.returncode != 0
        # `ray job submit` without the token is refused; with it the job runs
        submit = [hosts.ray(), "job", "submit", "--address", f"http://{a}:8265", "--", "echo", "submitted"]
        r = hosts.run(3, submit, env=hosts.env(None), check=False, timeout=120)
        assert r.returncode != 0 and "submitted" not in r.stdout, r.stdout[-2000:]
        r = hosts.run(3, submit, env=hosts.env(str(token)), timeout=180)
        assert "submitted" in r.stdout, r.stdout[-2000:]
        names = list(hosts.names) + [hosts.switch]
    left = subprocess.run([IP, "netns", "list"], capture_output=True, text=True).stdout
    assert not any(n in left for n in names), left


def _token(tmp_path):
    import secrets
    token = tmp_path / "token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    return str(token)


def test_ddp_training_across_hosts_submitted_to_the_heads_jobs_api(scanned, tmp_path):
    """jobs/train.py --workers 2 from client D through A's Jobs API: one DDP rank on B, one on C, gloo
    over the bridge (the gradients cross B's link), every val row scored once."""
    from skin.data import load_classes, load_manifest, training_split
    from skin.registry import create_model
    from cluster.simcluster import LineLog
    from skin.checkpoint import load_tensors
    token = _token(tmp_path)
    out = tmp_path / "out"
    with Hosts(4) as hosts:
        _, b, c, _ = hosts.addresses
        head = hosts.ray_head(0, token)
        hosts.ray_worker(1, head, token, num_cpus=1)
        hosts.ray_worker(2, head, token, num_cpus=1)
        before = sum(hosts.counters(1))
        proc = hosts.submit(3, token, ["jobs/train.py", "--data", str(scanned), "--out", str(out), "--smoke",
                                       "--members", "mobilenetv2", "--workers", "2", "--cpus-per-worker", "1",
                                       "--epochs", "2", "--storage-path", str(out / "store")])
        log = LineLog(proc)
        assert proc.wait(timeout=600) == 0, log.text()[-4000:]
        moved = sum(hosts.counters(1)) - before
    log.thread.join(5)
    ranks = dict(re.findall(r"\(ip=([\d.]+), pid=\d+\) world_rank=(\d)", log.text()))
    assert set(ranks) == {b, c} and sorted(ranks.values()) == ["0", "1"], log.text()[-3000:]
    rows = len(load_manifest(scanned, "val", load_classes(scanned)))
    assert load_tensors(out / "val_probs.safetensors")["labels"].shape[0] == rows
    grad = sum(p.numel() * 4 for p in create_model("mobilenetv2", 6, pretrained="none", input_size=32).parameters())
    # each rank's steps: its half of the training rows (DistributedSampler pads to ceil(n / 2)), whole batches
    # of 16, at most the smoke's 3; a ring all-reduce over 2 ranks sends and receives the gradient once each
    n_train = len(load_manifest(scanned, training_split(scanned), load_classes(scanned)))
    steps = min(3, (-(-n_train // 2)) // 16)
    assert steps >= 1
    assert moved > 0.95 * 2 * steps * 2 * grad, (moved, grad, steps)


PREDICT = """
import json, sys, requests
url, path, key = sys.argv[1:4]
files = lambda: {"file": ("x.jpg", open(path, "rb").read(), "image/jpeg")}
ok = requests.post(url + "/v1/predict", files=files(), headers={"X-API-Key": key}, timeout=60)
print(json.dumps({"status": ok.status_code, "body": ok.json(),
                  "no_key": requests.post(url + "/v1/predict", files=files(), timeout=60).status_code,
                  "wrong_key": requests.post(url + "/v1/predict", files=files(), headers={"X-API-Key": "x"},
                                             timeout=60).status_code,
                  "healthz": requests.get(url + "/healthz", timeout=10).status_code}))
"""


def test_serving_across_hosts_answers_as_the_single_host_app(api, random_bundle, tmp_path):
    """The ingress and proxy on A, the members on B and C (custom resources), deployed from D with an API
    key: D's answer equals the single-host app's; without the key (or with a wrong one) the proxy refuses."""
    import requests
    from skin.registry import DEFAULT_MEMBERS
    from skin.synth import jpeg_bytes, make_sample
    image = tmp_path / "x.jpg"
    image.write_bytes(jpeg_bytes(make_sample(1, 0, 0, 96), 0, 0))
    local = requests.post(api + "/v1/predict", files={"file": ("x.jpg", image.read_bytes(), "image/jpeg")},
                          timeout=60).json()
    token = _token(tmp_path)
    with Hosts(4) as hosts:
        a, b, c, _ = hosts.addresses
        head = hosts.ray_head(0, token, num_cpus=1, resources=json.dumps({"host_a": 1}))
        for i in (1, 2):
            hosts.ray_worker(i, head, token, num_cpus=2, resources=json.dumps({"member_host": 2}))
        url = hosts.deploy(3, head, token, str(random_bundle), list(DEFAULT_MEMBERS), api_key="k3y")
        got = json.loads(hosts.run(3, [sys.executable, "-c", PREDICT, url, str(image), "k3y"], env=hosts.env(None),
                                   timeout=200).stdout.strip().splitlines()[-1])
        placed = hosts.actors(3, head, token)
    assert got["status"] == 200 and (got["no_key"], got["wrong_key"], got["healthz"]) == (401, 401, 200), got
    assert got["body"]["class"] == local["class"]
    for name, p in local["probabilities"].items():
        assert abs(got["body"]["probabilities"][name] - p) < 1e-6, (name, got["body"]["probabilities"], local)
    assert placed["ServeReplica:skinray:Ensemble"] == [a]
    for m in DEFAULT_MEMBERS:
        assert set(placed[f"ServeReplica:skinray:{m}"]) <= {b, c}, placed
