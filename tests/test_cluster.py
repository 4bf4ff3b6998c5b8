"""Cluster configs: launcher schema, KubeRay drift, and a real local head with the Jobs API."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_demo_refuses_an_output_folder_that_every_job_would_upload(tmp_path):
    """`ray job submit --working-dir .` uploads the repository minus what git ignores: the demo
    refuses, in one line and before starting anything, an output folder inside it that is not
    ignored (every job would upload the synthetic images and checkpoints, and Ray gives up)."""
    if subprocess.run(["git", "rev-parse", "--git-dir"], cwd=ROOT, capture_output=True).returncode:
        pytest.skip("not a git checkout: the demo cannot tell what git ignores")
    inside = ROOT / "not-ignored-demo-output"
    try:
        r = subprocess.run(["bash", "cluster/demo.sh", str(inside)], cwd=ROOT, capture_output=True, text=True, timeout=60)
        left_behind = inside.exists()
    finally:
        shutil.rmtree(inside, ignore_errors=True)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "not git-ignored" in r.stderr and "demo-NAME/" in r.stderr
    assert not (inside / "state").exists() and not left_behind  # nothing started, nothing written
    ignored = subprocess.run(["git", "check-ignore", "-q", "demo-x/"], cwd=ROOT)
    excludes = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())["excludes"]
    assert ignored.returncode == 0 and "demo-*/" in excludes  # what the message offers is ignored


def test_cluster_yaml_passes_rays_schema():
    import jsonschema
    import ray.autoscaler
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(yaml.safe_load((ROOT / "cluster" / "cluster.yaml").read_text()), schema)


CRDS = ROOT.parent / "shared" / "kuberay-crds"
# What the RayService's serve config may change from cluster/serve_config.yaml, per member.
CLUSTER_MEMBER_KEYS = {"num_cpus", "num_gpus", "amp", "threads", "replicas", "autoscaling"}


@pytest.mark.parametrize("manifest,crd", [("rayjob-train.yaml", "ray.io_rayjobs.yaml"),
                                          ("rayservice.yaml", "ray.io_rayservices.yaml")])
def test_kuberay_manifests_validate_against_the_crds(manifest, crd):
    import jsonschema
    if not CRDS.is_dir():
        pytest.fail(f"{CRDS} is missing: the KubeRay CRD schemas live in ../shared/kuberay-crds")
    doc = yaml.safe_load((ROOT / "cluster" / "kuberay" / manifest).read_text())
    crd_doc = yaml.safe_load((CRDS / crd).read_text())
    schema = next(v for v in crd_doc["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    assert crd_doc["spec"]["names"]["kind"] == doc["kind"] and doc["apiVersion"] == "ray.io/v1"
    jsonschema.validate(doc, schema)
    cluster = doc["spec"].get("rayClusterSpec") or doc["spec"].get("rayClusterConfig")
    assert cluster["authOptions"]["mode"] == "token"  # Ray's token auth on, from a Secret
    bad = json.loads(json.dumps(doc))
    (bad["spec"].get("rayClusterSpec") or bad["spec"].get("rayClusterConfig"))["authOptions"]["mode"] = "tokens"
    with pytest.raises(jsonschema.ValidationError):  # the schema check has teeth
        jsonschema.validate(bad, schema)


def test_rayservice_is_the_serve_config_with_the_cluster_differences_only():
    service = yaml.safe_load((ROOT / "cluster" / "kuberay" / "rayservice.yaml").read_text())
    local = yaml.safe_load((ROOT / "cluster" / "serve_config.yaml").read_text())
    remote = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert remote["http_options"]["host"] == "0.0.0.0" and local["http_options"]["host"] == "127.0.0.1"
    assert {k: v for k, v in remote["http_options"].items() if k != "host"} == \
        {k: v for k, v in local["http_options"].items() if k != "host"}
    assert {k: v for k, v in remote.items() if k not in ("http_options", "applications")} == \
        {k: v for k, v in local.items() if k not in ("http_options", "applications")}
    (ra,), (la,) = remote["applications"], local["applications"]
    assert {k: v for k, v in ra.items() if k != "args"} == {k: v for k, v in la.items() if k != "args"}
    assert ra["deployments"] == la["deployments"]  # the same per-request settings
    rargs, largs = dict(ra["args"]), dict(la["args"])
    rmem, lmem = rargs.pop("members"), largs.pop("members")
    assert rargs == largs  # bundle, limits, degraded mode, ingress: the same application
    assert set(rmem) == set(lmem)
    for name in rmem:
        drift = {k for k in set(rmem[name]) | set(lmem[name]) if rmem[name].get(k) != lmem[name].get(k)}
        assert drift <= CLUSTER_MEMBER_KEYS, f"{name}: {drift - CLUSTER_MEMBER_KEYS} differ"
        assert 0 < rmem[name]["num_gpus"] < 1  # members share the GPU pods' GPUs
    from serve_app import AppArgs
    AppArgs.model_validate(rargs | {"members": rmem})
    env = [e["name"] for c in (service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"])
           for e in c.get("env", [])]
    assert "SKINRAY_API_KEY" in env  # the proxy is on the pod network: the API key is required


def test_serve_config_matches_the_builder():
    from serve_app import AppArgs
    from service.config import IngressSettings
    cfg = yaml.safe_load((ROOT / "cluster" / "serve_config.yaml").read_text())
    app = cfg["applications"][0]
    assert app["import_path"] == "serve_app:app"
    AppArgs.model_validate(app["args"])  # every key is a known builder argument
    (ingress,) = [d for d in app["deployments"] if d["name"] == "Ensemble"]
    IngressSettings.model_validate(ingress["user_config"])  # every per-request setting is one the ingress knows
    with pytest.raises(ValueError, match="latency_budgt"):
        IngressSettings.model_validate({"latency_budgt": 2})  # a misspelt one fails the update, named
    import typing
    from serve_app import MemberOptions
    from skin.device import AMP_CHOICES
    # serve_app stays torch-free at import (the proxy imports it), so it spells the choices out: keep them equal
    assert set(typing.get_args(MemberOptions.model_fields["amp"].annotation)) == set(AMP_CHOICES)


def test_rayjob_is_a_kuberay_rayjob():
    job = yaml.safe_load((ROOT / "cluster" / "kuberay" / "rayjob-train.yaml").read_text())
    assert job["kind"] == "RayJob" and "jobs/train.py" in job["spec"]["entrypoint"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_local_head(state: Path, num_cpus: int = 3) -> tuple[str, dict]:
    """cluster/local.sh start, as the demo runs it, on free ports; the session's token is the head's."""
    state.mkdir(parents=True, exist_ok=True)
    token = state / "ray_token"
    shutil.copy(os.environ["RAY_AUTH_TOKEN_PATH"], token)
    dash = _free_port()
    env = dict(os.environ, RAY_PORT=str(_free_port()), RAY_DASHBOARD_PORT=str(dash), RAY_CLIENT_PORT=str(_free_port()),
               RAY_DASHBOARD_AGENT_PORT=str(_free_port()),
               RAY_NUM_CPUS=str(num_cpus), PYTHONPATH=str(ROOT), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    r = subprocess.run(["bash", str(ROOT / "cluster" / "local.sh"), "start", str(state)], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr + (state / "ray-head.log").read_text()[-3000:]
    return f"http://127.0.0.1:{dash}", dict(env, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))


def _stop_local_head(state: Path, env: dict) -> None:
    subprocess.run(["bash", str(ROOT / "cluster" / "local.sh"), "stop", str(state)], env=env, cwd=ROOT,
                   capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """The local head of cluster/local.sh (token auth on, 127.0.0.1, its own temp dir); stopped by PID."""
    state = tmp_path_factory.mktemp("head") / "state"
    url, env = _start_local_head(state)
    try:
        yield url, env
    finally:
        _stop_local_head(state, env)


def test_jobs_api_refuses_a_client_without_the_token(head):
    url, env = head
    assert requests.get(url + "/api/jobs/", timeout=10).status_code == 401
    wrong = requests.get(url + "/api/jobs/", headers={"Authorization": "Bearer " + "0" * 64}, timeout=10)
    assert wrong.status_code in (401, 403)
    token = Path(env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    assert requests.get(url + "/api/jobs/", headers={"Authorization": f"Bearer {token}"}, timeout=10).status_code == 200
    no_token = dict(env, RAY_AUTH_TOKEN_PATH="", HOME=str(Path(env["RAY_AUTH_TOKEN_PATH"]).parent / "home"))
    r = subprocess.run([str(Path(sys.executable).parent / "ray"), "job", "list", "--address", url], env=no_token,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0


@pytest.mark.ray
def test_serve_run_works_after_the_local_head_is_stopped(tmp_path, monkeypatch):
    """The README's `serve run` after `make demo-stop`: the stopped head left nothing in Ray's temp folder
    naming it, so `serve run` starts its own Ray instead of retrying a dead GCS forever (the shipped
    config, narrowed to a one-member bundle: the app's size is not what this checks). Ray's temp folder
    (/tmp/ray unless RAY_TMPDIR) is one of the test's own, so a marker another crashed Ray left on the
    machine cannot decide it."""
    import tempfile
    from skin.bundle import write_bundle
    from skin.classes import ClassMap
    from skin.registry import create_model
    bundle = write_bundle(tmp_path / "bundle", ClassMap(), {"mobilenetv2": create_model(
        "mobilenetv2", 6, pretrained="none", input_size=64)}, untrained=True).root
    raytmp = Path(tempfile.mkdtemp(prefix="skr-", dir="/tmp"))  # short: Ray's socket paths live under it
    monkeypatch.setenv("RAY_TMPDIR", str(raytmp))
    marker = raytmp / "ray" / "ray_current_cluster"
    state = tmp_path / "state"
    url, env = _start_local_head(state, num_cpus=1)
    _stop_local_head(state, env)
    assert not marker.exists()
    assert not (state / "ray-temp-dir").exists() and not (state / "ray-head.pid").exists()
    port = _free_port()
    cfg = yaml.safe_load((ROOT / "cluster" / "serve_config.yaml").read_text())
    cfg["http_options"]["port"] = port
    app = cfg["applications"][0]["args"]
    app["bundle"], app["members"] = str(bundle), {"mobilenetv2": app["members"]["mobilenetv2"]}
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(cfg))
    run_env = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}
    log = open(tmp_path / "serve_run.log", "w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "serve"), "run", str(tmp_path / "serve.yaml")],
                            env=run_env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, ok = time.time() + 180, False
        while time.time() < deadline and proc.poll() is None and not ok:
            try:
                ok = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
            except requests.RequestException:
                time.sleep(1)
        assert ok, (tmp_path / "serve_run.log").read_text()[-3000:]
    finally:
        import signal
        try:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=60)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(raytmp, ignore_errors=True)


def _submit(client, entrypoint: str) -> str:
    for _ in range(60):  # the job agent comes up a little after the dashboard answers
        try:
            return client.submit_job(
                entrypoint=entrypoint,
                runtime_env={"working_dir": str(ROOT), "excludes": [".venv/", "demo/", ".git/", "**/__pycache__/"],
                             "env_vars": {"HF_HUB_OFFLINE": "1"}})
        except RuntimeError as e:
            if "No available agent" not in str(e):
                raise
            time.sleep(2)
    raise AssertionError("the head's job agent never became available")


def _wait(client, job_id, timeout=600):
    from ray.job_submission import JobStatus
    deadline = time.time() + timeout
    while (status := client.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.time() < deadline, client.get_job_logs(job_id)[-3000:]
        time.sleep(2)
    return status


def test_submitted_training_survives_its_driver_then_deploys_and_predicts(head, scanned, tmp_path):
    """`ray job submit` of jobs/train.py to the token-auth head; its driver is stopped (killed) once a
    checkpoint exists and the job resubmitted with the same run name and storage: it resumes from the
    last checkpoint and finishes with a bundle, which `serve deploy` of the shipped Serve config (its
    members narrowed to the bundle's) serves. One member: three at once are tested by tests/test_train.py."""
    from ray.job_submission import JobStatus, JobSubmissionClient
    url, env = head
    client = JobSubmissionClient(url)  # the token comes from RAY_AUTH_TOKEN_PATH, as for `ray job submit`
    out = tmp_path / "train"
    cmd = (f"python jobs/train.py --data {scanned} --out {out} --smoke --epochs 6 --members mobilenetv2 "
           f"--name resume")
    first = _submit(client, cmd)
    ckpts = out / "ray_results" / "resume-mobilenetv2"
    deadline = time.time() + 300
    snapshot = ckpts / "checkpoint_manager_snapshot.json"  # what Train V2 restores from
    while not (snapshot.is_file() and "checkpoint_" in snapshot.read_text()):
        assert time.time() < deadline and client.get_job_status(first) in {JobStatus.PENDING, JobStatus.RUNNING}, \
            client.get_job_logs(first)[-3000:]
        time.sleep(0.5)
    client.stop_job(first)
    assert _wait(client, first) == JobStatus.STOPPED
    done_before = max(json.loads(p.read_text())["epoch"] for p in ckpts.glob("checkpoint_*/state.json"))
    assert done_before < 6
    second = _submit(client, cmd)
    assert _wait(client, second) == JobStatus.SUCCEEDED, client.get_job_logs(second)[-5000:]
    logs = client.get_job_logs(second)
    assert "resumed from epoch" in logs, logs[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mobilenetv2"]["best_epoch"] >= 1
    epochs = sorted(json.loads(p.read_text())["epoch"] for p in ckpts.glob("checkpoint_*/state.json"))
    assert epochs[-1] == 6
    assert (out / "bundle" / "bundle.json").is_file()
    print(f"driver killed after epoch {done_before}; resubmitted run resumed and reached epoch 6")

    api_port = _free_port()
    cfg = yaml.safe_load((ROOT / "cluster" / "serve_config.yaml").read_text())
    cfg["http_options"]["port"] = api_port
    app = cfg["applications"][0]["args"]
    app["bundle"] = str(out / "bundle")
    app["members"] = {"mobilenetv2": app["members"]["mobilenetv2"]}
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(cfg))
    serve_env = dict(env, PYTHONPATH=str(ROOT))
    subprocess.run([str(Path(sys.executable).parent / "serve"), "deploy", str(tmp_path / "serve.yaml"),
                    "-a", url], env=serve_env, check=True, cwd=ROOT, timeout=120)
    from skin.synth import jpeg_bytes, make_sample
    data = jpeg_bytes(make_sample(1, 0, 0, 96), 0, 0)
    deadline, status_code = time.time() + 240, None
    while time.time() < deadline:
        try:
            r = requests.post(f"http://127.0.0.1:{api_port}/v1/predict", files={"file": ("x.jpg", data, "image/jpeg")},
                              timeout=30)
            status_code = r.status_code
            if status_code == 200:
                break
        except requests.RequestException:
            pass
        time.sleep(2)
    assert status_code == 200, subprocess.run([str(Path(sys.executable).parent / "serve"), "status", "-a", url],
                                              capture_output=True, text=True, env=serve_env).stdout
    body = r.json()
    assert abs(sum(body["probabilities"].values()) - 1) < 1e-6 and list(body["members"]) == ["mobilenetv2"]


@pytest.mark.ray
def test_a_jobs_private_ray_is_on_loopback_even_when_ray_was_imported_first(tmp_path):
    """A job that imports ray before skin.cluster.init_ray (jobs/evaluate.py does) still gets a private Ray
    whose node is 127.0.0.1 and whose daemons listen on loopback only (Ray reads its single-machine switch
    at import: init_ray sets it for this process as well as for the daemons it starts)."""
    code = ("import ray, subprocess, os, psutil\n"
            "from skin.cluster import init_ray\n"
            "init_ray(1)\n"
            "pids = {p.pid for p in psutil.Process().children(recursive=True)} | {os.getpid()}\n"
            "out = subprocess.run(['ss', '-ltnpH'], capture_output=True, text=True).stdout\n"
            "ours = [l.split()[3] for l in out.splitlines() if any(f'pid={p},' in l for p in pids)]\n"
            "print(ray.util.get_node_ip_address(), ' '.join(ours))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                         cwd=tmp_path).stdout.split()
    node, sockets = out[0], out[1:]
    assert node == "127.0.0.1" and len(sockets) >= 4, out
    assert all(a.rsplit(":", 1)[0] in ("127.0.0.1", "[::ffff:127.0.0.1]") for a in sockets), sockets
