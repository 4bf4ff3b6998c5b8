"""Cluster configs: launcher schema, KubeRay drift, and a real local head with the Jobs API."""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_passes_rays_schema():
    import jsonschema
    import ray.autoscaler
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(yaml.safe_load((ROOT / "cluster" / "cluster.yaml").read_text()), schema)


def test_rayservice_embeds_the_serve_config():
    service = yaml.safe_load((ROOT / "cluster" / "kuberay" / "rayservice.yaml").read_text())
    serve_config = yaml.safe_load((ROOT / "cluster" / "serve_config.yaml").read_text())
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == serve_config


def test_serve_config_matches_the_builder():
    from serve_app import AppArgs
    cfg = yaml.safe_load((ROOT / "cluster" / "serve_config.yaml").read_text())
    app = cfg["applications"][0]
    assert app["import_path"] == "serve_app:app"
    AppArgs.model_validate(app["args"])  # every key is a known builder argument


def test_rayjob_is_a_kuberay_rayjob():
    job = yaml.safe_load((ROOT / "cluster" / "kuberay" / "rayjob-train.yaml").read_text())
    assert job["kind"] == "RayJob" and "jobs/train.py" in job["spec"]["entrypoint"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A real Ray head on 127.0.0.1 with free ports and its own temp dir; stopped by PID."""
    tmp_path = tmp_path_factory.mktemp("head")
    gcs, dash = _free_port(), _free_port()
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(ROOT),
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    log = open(tmp_path / "head.log", "w")
    temp_dir = tempfile.mkdtemp(prefix="rayh", dir="/tmp")  # AF_UNIX socket paths must stay < 108 bytes
    proc = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
                             "--node-ip-address=127.0.0.1", f"--port={gcs}", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={dash}", "--include-dashboard=true", "--num-cpus=3",
                             f"--temp-dir={temp_dir}", "--disable-usage-stats"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        for _ in range(120):
            try:
                if requests.get(url + "/api/version", timeout=1).ok:
                    break
            except requests.RequestException:
                pass
            assert proc.poll() is None, (tmp_path / "head.log").read_text()
            time.sleep(1)
        yield url, env
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)


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


def test_submit_train_job_then_deploy_and_predict(head, scanned, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient
    url, env = head
    client = JobSubmissionClient(url)
    out = tmp_path / "train"
    job_id = _submit(client, f"python jobs/train.py --data {scanned} --out {out} --smoke --name cluster")
    status = _wait(client, job_id)
    assert status == JobStatus.SUCCEEDED, client.get_job_logs(job_id)[-5000:]  # the job's logs, on failure
    assert (out / "bundle" / "bundle.json").is_file()
    assert list((out / "ray_results").glob("cluster-*"))  # checkpoints in the storage path

    api_port = _free_port()
    cfg = yaml.safe_load((ROOT / "cluster" / "serve_config.yaml").read_text())
    cfg["http_options"]["port"] = api_port
    cfg["applications"][0]["args"]["bundle"] = str(out / "bundle")
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
    assert abs(sum(r.json()["probabilities"].values()) - 1) < 1e-6


def test_killed_driver_resumes_on_resubmit(head, scanned, tmp_path):
    """Stop (kill) the driver of a submitted training job once a checkpoint exists, resubmit with
    the same run name and storage: it resumes from the last checkpoint and finishes."""
    from ray.job_submission import JobStatus, JobSubmissionClient
    url, _ = head
    client = JobSubmissionClient(url)
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
    print(f"driver killed after epoch {done_before}; resubmitted run resumed and reached epoch 6")
