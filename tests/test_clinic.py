"""The clinic's loop as a team would run it, end to end (`make test-all`: it trains a bundle): answers kept
with the patients' consent, reviewers' corrections, the queue, the export, a dataset scanned from it with
the answering bundle's class map, a bundle fine-tuned from the one that answered (--init-from), evaluated
on the reviewed cases against it (--reviewed), and served beside it as the canary. The page's part of the
loop (an answer, a correction, the queue) runs in Chromium in tests/test_ui.py."""
import json

import pytest
import requests

from conftest import PHOTOS, STATE, deploy, wait_until as _wait
from skin.bundle import Bundle
from skin.synth import jpeg_bytes, make_sample

CLASSES = ["Enfeksiyonel", "Ekzama", "Akne", "Pigment", "Benign", "Malign"]


@pytest.mark.slow
def test_answer_correct_export_retrain_and_serve_the_next_bundle(api, random_bundle, tmp_path):
    import jobs.evaluate as evaluate
    import jobs.train as train
    from skin.cli import main as skin
    # 1. answers with consent, each corrected (or confirmed) to its synthetic lesion's class
    reviewed = []
    for i in range(24):
        label = (2, 5)[i % 2]  # Akne and Malign
        data = jpeg_bytes(make_sample(label, 11, i, 128), 11, i)
        r = requests.post(api + "/v1/predict", files={"file": (f"c{i}.jpg", data, "image/jpeg")},
                          params={"cam": "false", "consent": "true"}, timeout=60)
        assert r.status_code == 200 and r.json()["photo_kept"], r.text[:300]
        a = r.json()
        truth = CLASSES[label]
        body = {"confirmed": True} if a["class"] == truth else {"right_class": truth}
        f = requests.post(api + "/v1/feedback", json={"request_id": a["request_id"], "reviewer": "dr-loop", **body},
                          timeout=30)
        assert f.status_code == 200, f.text
        reviewed.append(a["request_id"])
    queue = requests.get(api + "/v1/review-queue", params={"why": "disputed", "limit": 500}, timeout=30).json()
    assert {q["request_id"] for q in queue["queue"]} & set(reviewed)  # the corrected ones wait there
    # 2. the export, and a dataset scanned from it that keeps the answering bundle's six classes
    export = tmp_path / "export"
    assert skin(["records", "export", "--db", f"sqlite:///{STATE / 'records.sqlite'}", "--photos", str(PHOTOS),
                 "--out", str(export)]) == 0
    manifest = export / "manifest.csv"
    import pandas as pd
    m = pd.read_csv(manifest)
    assert set(reviewed) <= set(m["request_id"]) and set(m[m["request_id"].isin(reviewed)]["label"]) == {"Akne", "Malign"}
    data = tmp_path / "data"
    assert skin(["data", "scan", str(manifest), "--classes", str(export / "classes.json"), "--out", str(data),
                 "--quiet", "--workers", "1"]) == 0
    assert json.loads((data / "classes.json").read_text())["classes"] == CLASSES
    # 3. the next bundle, fine-tuned from the one that answered, and how it does on the reviewed cases
    out = tmp_path / "train"
    assert train.main(["--data", str(data), "--out", str(out), "--smoke", "--name", "loop", "--image-size", "64",
                       "--init-from", str(random_bundle)]) == 0
    new = Bundle.load(out / "bundle")
    assert new.classes.names == tuple(CLASSES)
    assert evaluate.main(["--bundle", str(out / "bundle"), "--data", str(data), "--out", str(tmp_path / "eval"),
                          "--reviewed", str(manifest), "--perturb", "0", "--no-store"]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["reviewed"]["images"] >= 1
    assert "On reviewed cases" in (tmp_path / "eval" / "report.md").read_text()
    # 4. served beside the bundle that answered, as the canary
    try:
        deploy(random_bundle, candidate={"bundle": str(out / "bundle"), "share": 0.0})
        _wait(lambda: requests.get(api + "/v1/info", timeout=5).json().get("candidate") is not None)
        photo = jpeg_bytes(make_sample(2, 11, 99, 128), 11, 99)
        r = requests.post(api + "/v1/predict", files={"file": ("next.jpg", photo, "image/jpeg")},
                          headers={"X-Skinray-Bundle": "candidate"}, params={"cam": "false"}, timeout=60)
        assert r.status_code == 200 and r.json()["bundle"] == new.id
    finally:
        deploy(random_bundle)
        _wait(lambda: requests.get(api + "/v1/info", timeout=5).json().get("candidate") is None)
