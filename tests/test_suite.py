"""The suite's own machinery: `make test` runs the Ray tests in turn on one pytest-xdist worker (group "ray")
and the Ray-free tests beside them. If the grouping silently stopped (pytest-xdist's loadgroup does not group
on pytest 9.2: pytest-dev/pytest-xdist#1386, hence pytest 9.1.1 in constraints.txt), two Ray clusters would
run at once on the two cores and the Ray tests would time out."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CONFTEST = f'''
import importlib.util
spec = importlib.util.spec_from_file_location("skinray_conftest", {str(ROOT / "tests" / "conftest.py")!r})
suite = importlib.util.module_from_spec(spec)
spec.loader.exec_module(suite)
pytest_collection_modifyitems = suite.pytest_collection_modifyitems
'''

TESTS = '''
import os
import pytest


def seen(name):
    with open(os.environ["SKINRAY_GROUP_LOG"], "a") as f:
        f.write(f"{{name}} {{os.environ['PYTEST_XDIST_WORKER']}}\\n")


@pytest.fixture
def ray_local():
    yield


@pytest.fixture
def head():
    yield


def test_{m}_session_ray(ray_local):
    seen("ray")


def test_{m}_head(head):
    seen("ray")


@pytest.mark.ray
def test_{m}_own_ray():
    seen("ray")


@pytest.mark.parametrize("i", range(6))
def test_{m}_ray_free(i):
    seen("free")
'''


def test_ray_tests_run_in_turn_on_one_worker_and_the_rest_beside_them(tmp_path):
    (tmp_path / "conftest.py").write_text(CONFTEST)
    for m in ("a", "b", "c"):
        (tmp_path / f"test_{m}.py").write_text(TESTS.format(m=m))
    log = tmp_path / "seen.txt"
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadgroup", "-p", "no:cacheprovider",
                        "-o", "markers=ray", str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, SKINRAY_GROUP_LOG=str(log)))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    rows = [line.split() for line in log.read_text().splitlines()]
    assert len(rows) == 27
    ray_workers = {w for kind, w in rows if kind == "ray"}
    assert len(ray_workers) == 1, f"the Ray tests ran on {sorted(ray_workers)}: the xdist group did not hold"
    assert {w for kind, w in rows if kind == "free"} - ray_workers  # the other worker ran Ray-free tests
