"""Shared fixtures. Nothing here touches the network: the hub is offline, usage stats are off."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("RAY_metrics_report_interval_ms", "2000")  # the metrics test reads them sooner (default 10 s)
# Local means local: the tests' Ray keeps its node at 127.0.0.1 so every port it opens is on loopback
# (see cluster/local.sh; tests/test_reliability.py checks with ss)
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Ray's token auth stays on in the tests too: one token for the session, in a file of its own.
os.environ["RAY_AUTH_MODE"] = "token"
if not os.environ.get("RAY_AUTH_TOKEN_PATH"):
    import atexit
    import secrets
    import shutil
    import tempfile
    _token_dir = tempfile.mkdtemp(prefix="skinray-test-token-")
    atexit.register(shutil.rmtree, _token_dir, True)  # nothing of the tests' is left in /tmp
    _token = os.path.join(_token_dir, "ray_token")
    with open(os.open(_token, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
        f.write(secrets.token_hex(32))
    os.environ["RAY_AUTH_TOKEN_PATH"] = _token

from pathlib import Path  # noqa: E402

# The service's state (its answer records, the photographs kept with consent) in a folder of the session's
# own, which the Serve replicas inherit through the environment of the Ray the tests start
if not os.environ.get("SKINRAY_STATE_DIR"):
    import atexit
    import shutil
    import tempfile
    os.environ["SKINRAY_STATE_DIR"] = tempfile.mkdtemp(prefix="skinray-test-state-")
    atexit.register(shutil.rmtree, os.environ["SKINRAY_STATE_DIR"], True)
STATE = Path(os.environ["SKINRAY_STATE_DIR"])
PHOTOS = STATE / "photos"  # the session's app keeps photographs with consent here

ROOT = Path(__file__).resolve().parents[1]
# Ray workers (Serve replicas, Train workers) import serve_app and jobs from the repository root.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)

import socket  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402
import requests  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


# Tests that start or use a Ray cluster run in turn on one pytest-xdist worker (group "ray": the session's
# Ray, the local head, the simulated clusters never run at once); the Ray-free tests run beside them on the
# other worker (`make test` runs `pytest -n 2 --dist loadgroup`). A test is in the group when it needs one of
# RAY_FIXTURES or is marked `@pytest.mark.ray` (a Ray of its own, started in the test or a subprocess).
RAY_FIXTURES = {"ray_local", "head"}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    ray_items = [it for it in items if RAY_FIXTURES & set(it.fixturenames) or it.get_closest_marker("ray")]
    for it in ray_items:  # xdist hands out the largest group first: its worker starts on it at once
        it.add_marker(pytest.mark.xdist_group("ray"))


@pytest.fixture(autouse=True)
def _ray_free_tests_start_no_ray(request):
    """A test outside the "ray" group that leaves Ray initialised in this process would share the worker's
    cores with the group's Ray unseen: fail it with what to do."""
    import sys

    def ray_up() -> bool:
        ray = sys.modules.get("ray")
        return ray is not None and ray.is_initialized()
    before = ray_up()
    yield
    if "xdist_group" not in request.node.keywords and not before and ray_up():
        pytest.fail("this test started Ray: mark it @pytest.mark.ray (see tests/conftest.py)", pytrace=False)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """A small synthetic dataset in layout (a), with masks."""
    from skin.synth import write_dataset
    return write_dataset(tmp_path_factory.mktemp("synth"), per_class=12, size=96, seed=1, progress=False)


@pytest.fixture(scope="session")
def scanned(synth_dir, tmp_path_factory) -> Path:
    from skin.data import ScanOptions, balance, scan
    out = tmp_path_factory.mktemp("scanned")
    scan(synth_dir, out, ScanOptions(workers=1), progress=False)
    balance(out, per_class=10, seed=0)
    return out


@pytest.fixture(scope="session")
def random_bundle(tmp_path_factory) -> Path:
    """A random-weight bundle of the three default members at 64 px."""
    from skin.bundle import write_bundle
    from skin.classes import ClassMap
    from skin.registry import DEFAULT_MEMBERS, create_model
    torch.manual_seed(0)
    members = {n: create_model(n, 6, pretrained="none", input_size=64) for n in DEFAULT_MEMBERS}
    root = tmp_path_factory.mktemp("bundles") / "random"
    write_bundle(root, ClassMap(), members, untrained=True)
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


METRICS_PORT = _free_port()  # Ray's Prometheus endpoint of the session's local Ray
DASHBOARD_PORT = _free_port()  # its dashboard: the REST API `serve deploy` talks to
API_PORT = _free_port()  # the Serve app's HTTP port


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (127.0.0.1, its dashboard for `serve deploy`). 4 logical CPUs on
    the 2-core machine so the Serve app (1.75 CPUs) and Train smoke runs (3 x 0.6) can coexist."""
    import ray
    if not ray.is_initialized():
        # address="local": a private Ray even when /tmp/ray names another (or a stale) cluster
        ray.init(address="local", num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1",
                 dashboard_port=DASHBOARD_PORT, _node_ip_address="127.0.0.1", log_to_driver=False,
                 configure_logging=False, _metrics_export_port=METRICS_PORT)
    yield ray
    try:
        from ray import serve
        serve.shutdown()
    except Exception:  # noqa: BLE001 - best effort at teardown
        pass
    ray.shutdown()


def wait_until(cond, timeout: float = 90) -> None:
    """Poll `cond` until it holds (an HTTP error counts as not yet), else AssertionError."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if cond():
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise AssertionError("condition not reached in time")


def deploy(bundle, **overrides):
    """Deploy the app as `serve deploy` does (the dashboard's REST API, a Serve config as a user writes it):
    what the replicas are built from in `args`, the ingress's per-request settings and the members' fault
    drills as `user_config` in `deployments` (service.config.serve_application), so a redeploy changing
    only those is applied to the running replicas in place."""
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient
    from service.config import AppArgs, serve_application
    from skin.bundle import Bundle
    args = AppArgs(bundle=str(bundle), **({"photos_dir": str(PHOTOS)} | overrides))
    candidate = Bundle.load(args.candidate.bundle).member_names if args.candidate else None
    app = serve_application(args, Bundle.load(bundle).member_names, candidate)
    ServeSubmissionClient(f"http://127.0.0.1:{DASHBOARD_PORT}").deploy_applications(
        {"http_options": {"host": "127.0.0.1", "port": API_PORT}, "applications": [app]})


@pytest.fixture(scope="session")
def api(ray_local, random_bundle):
    """Base URL of the session's Serve app (random-weight bundle, 127.0.0.1, free port)."""
    deploy(random_bundle)
    url = f"http://127.0.0.1:{API_PORT}"
    deadline = time.time() + 180
    while True:
        try:
            if requests.get(url + "/healthz", timeout=2).status_code == 200:
                break
        except requests.RequestException:  # the proxy may accept before the app is up
            pass
        if time.time() > deadline:
            pytest.fail(f"the Serve app at {url} did not answer /healthz within 180 s")
        time.sleep(0.5)
    yield url
    from ray import serve
    serve.delete("skinray")


@pytest.fixture(scope="session")
def trained(ray_local, scanned, tmp_path_factory):
    """The smoke training job, run once: three members concurrently through Ray Train."""
    import jobs.train as job
    out = tmp_path_factory.mktemp("train")
    # 10 smoke epochs (a flag over --smoke): each member's training phase outlasts the spread of the
    # three workers' start-up on 2 cores, so the members' epochs overlap (test_members_ran_concurrently)
    assert job.main(["--data", str(scanned), "--out", str(out), "--smoke", "--name", "t", "--epochs", "10"]) == 0
    return out
