"""Ray across a real network on this machine: hosts are network namespaces on a private /24
(cluster/hosts.py). A head in host A, workers in B and C joining over the bridge, a client in D;
token auth between hosts. Everything started here is stopped and removed by the test itself."""
import json
import subprocess
import sys

import pytest

from cluster.hosts import IP, Hosts, available

WHY = available()
# slow: in `make test-all` (about a minute: four namespaces, two `ray start`s, the Ray Client's retries)
pytestmark = [pytest.mark.skipif(WHY is not None, reason=f"no network namespaces here: {WHY}"), pytest.mark.slow]

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
    sees the three nodes and runs tasks on B and C; without it, D's driver, the Jobs API and the Ray
    Client port are refused. Torn down: no namespace of the run is left."""
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
        names = list(hosts.names) + [hosts.switch]
    left = subprocess.run([IP, "netns", "list"], capture_output=True, text=True).stdout
    assert not any(n in left for n in names), left
