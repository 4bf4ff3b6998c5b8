"""The real Serve app over HTTP: one app per test session on the shared local Ray."""
import base64
import io
import time
from concurrent.futures import ThreadPoolExecutor

from conftest import deploy as _deploy, wait_until

import numpy as np
import pytest
import requests
from PIL import Image

from skin.bundle import Bundle
from skin.ensemble import Predictor
from skin.images import load_image
from skin.synth import jpeg_bytes, make_sample


def _jpeg(label=2, index=0, size=120) -> bytes:
    return jpeg_bytes(make_sample(label, 9, index, size), 9, index)


def post(url, data: bytes, name="lesion.jpg", ctype="image/jpeg", params=None, headers=None, field="file"):
    return requests.post(url + "/v1/predict", files={field: (name, data, ctype)}, params=params,
                         headers=headers, timeout=60)


def test_predict_matches_in_process(api, random_bundle):
    data = _jpeg()
    r = post(api, data)
    assert r.status_code == 200, r.text
    body = r.json()
    assert abs(sum(body["probabilities"].values()) - 1) < 1e-6
    expected = Predictor(Bundle.load(random_bundle)).predict([load_image(data)])[0]
    for c, p in expected["probabilities"].items():
        assert abs(body["probabilities"][c] - p) < 1e-5
    assert body["class"] == expected["class"] and body["bundle"] == Bundle.load(random_bundle).id
    assert set(body["members"]) == {"mobilenetv2", "efficientnet_b1", "resnet50"}
    assert r.headers["X-Request-ID"]
    assert {"decode", "members", "total"} <= set(body["timings_ms"])


def test_overlay_keeps_the_aspect_ratio(api):
    img = make_sample(5, 3, 1, 160).image.resize((200, 100))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    body = post(api, buf.getvalue(), "wide.png", "image/png", params={"alpha": 0.6, "all_classes": "true"}).json()
    overlay = Image.open(io.BytesIO(base64.b64decode(body["gradcam"]["overlay_png"])))
    raw = Image.open(io.BytesIO(base64.b64decode(body["gradcam"]["map_png"])))
    assert overlay.format == "PNG" and overlay.size == (200, 100) and raw.size == (200, 100)
    assert set(body["gradcam"]["maps_png"]) == set(body["probabilities"])
    assert body["gradcam"]["class"] == body["class"]


def test_occlusion_on_request_is_the_in_process_ensembles_map(api, random_bundle):
    """cam_method=occlusion: the answer of the default path, with the ensemble's occlusion sensitivity made
    through the member deployments, the map skin.ensemble.Predictor.occlusion makes in-process; asked with
    options that do not apply, a 422 that names them."""
    data = _jpeg(4, 2, 96)
    r = post(api, data, params={"cam_method": "occlusion", "class": "Pigment"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["gradcam"]["method"] == "occlusion" and body["gradcam"]["class"] == "Pigment"
    assert body["class"] == post(api, data, params={"cam": "false"}).json()["class"]
    local = Predictor(Bundle.load(random_bundle)).occlusion([load_image(data)], class_name="Pigment")[0]
    assert body["gradcam"]["forwards"] == local["occlusion"]["forwards"] > 100
    served = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["gradcam"]["map_png"]))), np.float32) / 255
    assert served.shape == local["occlusion"]["map"].shape
    assert np.abs(served - local["occlusion"]["map"]).max() < 3 / 255  # the PNG's 8 bits
    bad = post(api, data, params={"cam_method": "occlusion", "cam_stride": 8})
    assert bad.status_code == 422 and "cam_stride" in bad.json()["error"]["message"]


def test_every_answer_is_on_record_and_reviewers_correct_it(api):
    """Each answer is recorded with its request id, bundle, class and the photograph's SHA-256 (the photo
    itself only with the deployment's photos_dir and the request's consent); POST /v1/feedback takes a
    confirmation or a correction, the queue shows what waits, and bad reviews get a clear 4xx."""
    from conftest import PHOTOS, STATE
    from skin.records import Records, sha256
    plain, consented = _jpeg(1, 40), _jpeg(3, 41)
    a = post(api, plain, params={"cam": "false"})
    b = post(api, consented, params={"cam": "false", "consent": "true"})
    assert a.status_code == b.status_code == 200
    a, b = a.json(), b.json()
    assert a["request_id"] and not a["photo_kept"] and b["photo_kept"]
    photo_file = PHOTOS / sha256(consented)[:2] / f"{sha256(consented)}.jpg"
    _wait(lambda: photo_file.is_file())  # written off the answer's path, by the ingress's record writer
    kept = list(PHOTOS.rglob("*.jpg"))
    assert [p.read_bytes() for p in kept if p.stem == sha256(consented)] == [consented]
    assert not any(p.stem == sha256(plain) for p in kept)  # no consent: only the hash is kept
    review = lambda **kw: requests.post(api + "/v1/feedback", json={"reviewer": "dr-a", **kw}, timeout=30)
    r = review(request_id=a["request_id"], right_class="Malign" if a["class"] != "Malign" else "Akne", note="biopsy")
    assert r.status_code == 200 and r.json()["agreed"] is False, r.text
    assert review(request_id=b["request_id"], confirmed=True).json()["agreed"] is True
    row = Records.open(f"sqlite:///{STATE / 'records.sqlite'}").answer(a["request_id"])
    assert row["image_sha256"] == sha256(plain) and row["answer_class"] == a["class"] and row["photo"] is None
    assert row["bundle"] == a["bundle"] and row["reviews"][0]["note"] == "biopsy"
    queue = requests.get(api + "/v1/review-queue", params={"why": "disputed"}, timeout=30).json()
    disputed = [q for q in queue["queue"] if q["request_id"] == a["request_id"]]
    assert disputed and disputed[0]["why"] == "disputed" and not disputed[0]["has_photo"]
    assert {q["why"] for q in queue["queue"]} == {"disputed"}
    assert requests.get(api + "/v1/review-queue", params={"why": "nope"}, timeout=30).status_code == 422
    assert queue["agreement"][b["class"]]["agreed"] >= 1
    for body, status, says in (({"request_id": "no-such-id", "confirmed": True}, 404, "no answer with request id"),
                               ({"request_id": a["request_id"], "right_class": "Mole"}, 422, "unknown class"),
                               ({"request_id": a["request_id"]}, 422, "not both or neither")):
        bad = review(**body)
        assert bad.status_code == status and says in bad.json()["error"]["message"], bad.text
    assert requests.post(api + "/v1/feedback", json={"request_id": "x"}, timeout=10).status_code == 422
    # the kept photograph, to re-draw its overlay for a review; none for the one without consent
    photo = requests.get(f"{api}/v1/records/{b['request_id']}/photo", timeout=10)
    assert photo.status_code == 200 and photo.content == consented and photo.headers["content-type"] == "image/jpeg"
    none = requests.get(f"{api}/v1/records/{a['request_id']}/photo", timeout=10)
    assert none.status_code == 404 and "was not kept" in none.json()["error"]["message"]
    assert requests.get(f"{api}/v1/records/no-such-id/photo", timeout=10).status_code == 404
    redraw = post(api, consented, params={"cam": "false", "record": "false", "consent": "true"}).json()
    assert redraw["request_id"] == "" and not redraw["photo_kept"]  # a re-draw is not a new answer on record
    assert len(list(PHOTOS.rglob("*.jpg"))) == len(kept)


def test_cam_off_and_class_choice(api):
    assert "gradcam" not in post(api, _jpeg(), params={"cam": "false"}).json() or \
        post(api, _jpeg(), params={"cam": "false"}).json()["gradcam"] is None
    body = post(api, _jpeg(), params={"class": "Malign"}).json()
    assert body["gradcam"]["class"] == "Malign"


def test_info_and_health(api):
    info = requests.get(api + "/v1/info", timeout=10).json()
    assert info["classes"][0] == "Enfeksiyonel" and info["weights"]["resnet50"] == 0.4 and info["untrained"]
    # an unevaluated bundle's map is said to be untested, here and in the protocol's metadata
    trust = info["explanation_trust"]
    assert not trust["shown"] and trust["sentence"].startswith("Not measured") and "rule" in trust
    meta = requests.get(api + "/v2/models/skinray", timeout=10).json()["parameters"]
    assert meta["explanation_verdict"] == trust["sentence"] and meta["explanation_shown"] is False
    assert requests.get(api + "/healthz", timeout=10).json() == {"status": "ok"}
    assert requests.get(api + "/openapi.json", timeout=10).json()["info"]["title"] == "skinray"


@pytest.mark.parametrize("case,status,code", [
    ("text", 400, "undecodable_image"),
    ("empty", 400, "undecodable_image"),
    ("gif", 415, "unsupported_image_type"),
    ("big", 413, "image_too_large"),
    ("tiny", 422, "image_too_small"),
    ("nofile", 422, "invalid_request"),
    ("alpha", 422, "invalid_request"),
    ("class", 422, "invalid_request"),
])
def test_errors(api, case, status, code):
    if case == "text":
        r = post(api, b"definitely not a jpeg", "x.jpg")
    elif case == "empty":
        r = post(api, b"", "x.jpg")
    elif case == "gif":
        buf = io.BytesIO()
        make_sample(0, 0, 0, 64).image.save(buf, "GIF")
        r = post(api, buf.getvalue(), "x.gif", "image/gif")
    elif case == "big":
        r = post(api, b"\xff\xd8" + b"0" * (21 * 1024 * 1024), "huge.jpg")
    elif case == "tiny":
        buf = io.BytesIO()
        Image.new("RGB", (1, 1)).save(buf, "PNG")
        r = post(api, buf.getvalue(), "dot.png", "image/png")
    elif case == "nofile":
        r = post(api, _jpeg(), field="image")
    elif case == "alpha":
        r = post(api, _jpeg(), params={"alpha": 3})
    else:
        r = post(api, _jpeg(), params={"class": "Nope"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and len(err["message"]) > 10 and "Traceback" not in r.text
    assert post(api, _jpeg()).status_code == 200  # and the server still answers


def test_twenty_concurrent_requests_are_batched_by_the_members(api, random_bundle):
    """Through the live app, with a latency budget that admits them all (a deployment for throughput):
    20 requests at once all answer, and each member computed some of them together (its @serve.batch
    formed batches > 1 while a batch ran)."""
    payloads = [_jpeg(i % 6, i) for i in range(20)]
    try:
        _deploy(random_bundle, latency_budget=1000)
        _wait(lambda: requests.get(api + "/v1/info", timeout=5).json()["admission"]["budget"] == 1000)
        with ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(lambda d: post(api, d, params={"cam": "false"}), payloads))
    finally:
        _deploy(random_bundle)
        _wait(lambda: requests.get(api + "/v1/info", timeout=5).json()["admission"]["budget"] == 2)
    assert [r.status_code for r in answers] == [200] * 20
    sizes = {n: [r.json()["batch_sizes"][n] for r in answers] for n in answers[0].json()["batch_sizes"]}
    assert set(sizes) == {"mobilenetv2", "efficientnet_b1", "resnet50"}
    for n, got in sizes.items():
        assert all(1 <= b <= 8 for b in got), (n, got)  # max_batch_size 8
        assert max(got) > 1, f"{n} computed every request alone: {got}"


def test_api_key_and_member_failure(api, random_bundle):
    """Redeploys the same app in place (user_config / ingress args only) and restores it."""
    try:
        _deploy(random_bundle, api_key="s3cret")
        _wait(lambda: requests.get(api + "/v1/info", timeout=5).status_code == 401)
        assert requests.get(api + "/healthz", timeout=5).status_code == 200
        assert post(api, _jpeg()).status_code == 401
        assert post(api, _jpeg(), headers={"X-API-Key": "wrong"}).status_code == 401
        review = {"request_id": "x", "reviewer": "dr", "confirmed": True}
        assert requests.post(api + "/v1/feedback", json=review, timeout=10).status_code == 401  # a reviewer, no key
        assert requests.get(api + "/v1/review-queue", timeout=10).status_code == 401
        assert post(api, _jpeg(), headers={"X-API-Key": "s3cret"}).status_code == 200
        assert post(api, _jpeg(), headers={"Authorization": "Bearer s3cret"}).status_code == 200
        # ... on the Open Inference Protocol's model routes too; its probes stay open
        body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                            "data": [base64.b64encode(_jpeg()).decode()]}]}
        assert requests.get(api + "/v2/models/skinray", timeout=5).status_code == 401
        assert requests.post(api + "/v2/models/skinray/infer", json=body, timeout=60).status_code == 401
        assert requests.post(api + "/v2/models/skinray/infer", json=body, timeout=60,
                             headers={"X-API-Key": "s3cret"}).status_code == 200
        assert requests.get(api + "/v2/health/ready", timeout=5).status_code == 200

        _deploy(random_bundle, members={"resnet50": {"fault_drill": True}})
        _wait(lambda: post(api, _jpeg()).status_code == 503)
        err = post(api, _jpeg()).json()["error"]
        assert err["code"] == "member_unavailable" and "resnet50" in err["message"]

        _deploy(random_bundle, members={"resnet50": {"fault_drill": True}}, allow_degraded=True)
        _wait(lambda: post(api, _jpeg()).status_code == 200)
        body = post(api, _jpeg()).json()
        assert body["degraded"] and body["missing_members"] == ["resnet50"] and body["uncertain"]
        assert abs(sum(body["probabilities"].values()) - 1) < 1e-6
    finally:
        _deploy(random_bundle)
        _wait(lambda: post(api, _jpeg()).status_code == 200)


_wait = wait_until


def test_heic_photo_with_exif_rotation_answers_like_its_jpeg_twin(api):
    """An iPhone-style HEIC photograph, rotated by its EXIF orientation, gets the answer of the same
    photograph as a JPEG with the same orientation (lossless HEIC; the JPEG at quality 95)."""
    img = make_sample(3, 9, 5, 160).image.crop((0, 0, 160, 112))  # landscape: the rotation shows in the size
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    heic, jpeg = io.BytesIO(), io.BytesIO()
    img.save(heic, "HEIF", quality=-1, exif=exif.tobytes())
    img.save(jpeg, "JPEG", quality=95, exif=exif.tobytes())
    assert load_image(heic.getvalue()).size == load_image(jpeg.getvalue()).size == (112, 160)  # turned, both
    a = post(api, heic.getvalue(), "phone.heic", "image/heic")
    b = post(api, jpeg.getvalue(), "phone.jpg", "image/jpeg")
    assert a.status_code == 200 and b.status_code == 200, (a.text, b.text)
    a, b = a.json(), b.json()
    assert a["class"] == b["class"]
    assert max(abs(a["probabilities"][c] - b["probabilities"][c]) for c in a["probabilities"]) < 0.02
    overlay = Image.open(io.BytesIO(base64.b64decode(a["gradcam"]["overlay_png"])))
    assert overlay.size == (112, 160)
    info = requests.get(api + "/v1/info", timeout=30).json()
    assert "HEIF" in info["limits"]["formats"]


def test_cam_stride_gives_finer_maps_and_the_same_answer(api):
    data = _jpeg(4, 2, 128)
    a = post(api, data).json()
    b = post(api, data, params={"cam_stride": 8})
    assert b.status_code == 200, b.text
    b = b.json()
    assert a["probabilities"] == b["probabilities"] and a["class"] == b["class"]
    assert a["gradcam"]["map_png"] != b["gradcam"]["map_png"]
    bad = post(api, data, params={"cam_stride": 12})
    assert bad.status_code == 422 and "cam_stride" in bad.json()["error"]["message"]
    c = post(api, data, params={"cam_smooth": "flips"})  # maps averaged over the four flips: same answer
    assert c.status_code == 200, c.text
    c = c.json()
    assert a["probabilities"] == c["probabilities"] and a["gradcam"]["map_png"] != c["gradcam"]["map_png"]
    bad = post(api, data, params={"cam_smooth": "rotations"})
    assert bad.status_code == 422 and "(cam_smooth) must be one of none, flips" in bad.json()["error"]["message"]
    plain = post(api, data, params={"cam": "false"}).json()  # no maps asked for: none computed, the same answer
    assert plain.get("gradcam") is None and plain["class"] == a["class"]
    assert max(abs(plain["probabilities"][k] - p) for k, p in a["probabilities"].items()) < 1e-6
    members = requests.get(api + "/v1/info", timeout=30).json()["members"]
    assert all(m["explanation"]["stride"] == m["output_stride"] == 32 for m in members)  # one shape: resolved
    assert {m["name"]: m["explanation"]["layer"] for m in members}["resnet50"] == "backbone.layer4"  # pooled layer
    assert {m["explanation"]["method"] for m in members} == {"gradcam"}
    assert {m["explanation"]["smooth"] for m in members} == {"none"} and not any("cam_stride" in m for m in members)


def test_explanation_options_per_request(api):
    """cam_layer (MEMBER=LAYER) and cam_method per request: the same answer, other maps; bad values get 422
    with one line naming the option."""
    data = _jpeg(3, 1, 128)
    a = post(api, data).json()
    b = post(api, data, params={"cam_layer": ["resnet50=backbone.layer2", "mobilenetv2=backbone.blocks.3"],
                                "cam_method": "layercam"})
    assert b.status_code == 200, b.text
    b = b.json()
    assert a["probabilities"] == b["probabilities"] and a["gradcam"]["map_png"] != b["gradcam"]["map_png"]
    for params, words in (({"cam_layer": "resnet50"}, "MEMBER=LAYER"),
                          ({"cam_layer": "vgg16=backbone.layer2"}, "does not have"),
                          ({"cam_layer": "resnet50=backbone.nope"}, "has no layer 'backbone.nope'"),
                          ({"cam_method": "scorecam"}, "(cam_method) must be one of gradcam, layercam")):
        bad = post(api, data, params=params)
        assert bad.status_code == 422 and words in bad.json()["error"]["message"], (params, bad.text)


def test_admission_at_the_shipped_defaults_refuses_what_cannot_finish_in_time(api):
    """The app as deployed with no setting touched: a burst of 24 requests gets only 200s and 503s; each
    503 says the service is busy (never a member) with a Retry-After; fewer than all were admitted at once
    (/v1/info's admission peak; service.admission's own tests check the limit against a simulated
    service), for maps and without; then a normal answer."""
    data = _jpeg(4, 7, 96)
    for params in ({}, {"cam": "false"}):
        assert post(api, data, params=params).status_code == 200  # this kind measured alone
        requests.get(api + "/v1/info", timeout=10)
        with ThreadPoolExecutor(24) as pool:
            got = list(pool.map(lambda _: post(api, data, params=params), range(24)))
        codes = [r.status_code for r in got]
        assert set(codes) <= {200, 503} and 200 in codes and 503 in codes, codes
        for r in got:
            if r.status_code == 503:
                err = r.json()["error"]
                assert err["code"] == "busy" and "capacity" in err["message"] and int(r.headers["Retry-After"]) >= 1
        info = requests.get(api + "/v1/info", timeout=10).json()["admission"]
        assert info["budget"] == 2.0 and info["peak_in_flight"] < 24, info
        assert post(api, data, params=params).status_code == 200


def test_overload_answers_503_with_retry_after_at_once(api, random_bundle):
    """The backstop behind the latency budget: past the ingress's max_ongoing + max_queued requests (Serve's
    own bound; here with a budget that admits everything) the app answers 503 with Retry-After straight away
    (no unbounded queue), every other request 200, and afterwards it answers normally."""
    data = _jpeg(5, 2, 96)
    try:
        _deploy(random_bundle, max_ongoing_requests=1, max_queued_requests=1, retry_after_s=3, latency_budget=1000)
        _wait(lambda: requests.get(api + "/v1/info", timeout=5).json()["admission"]["budget"] == 1000)
        _wait(lambda: post(api, data).status_code == 200)

        def one(_):
            t0 = time.perf_counter()
            r = post(api, data)
            return r.status_code, r.headers.get("Retry-After"), time.perf_counter() - t0, r.text[:150]
        with ThreadPoolExecutor(12) as pool:
            got = list(pool.map(one, range(12)))
        codes = [c for c, *_ in got]
        assert set(codes) <= {200, 503} and codes.count(200) >= 2 and codes.count(503) >= 1, got
        rejected = [(h, s) for c, h, s, _ in got if c == 503]
        assert all(h == "3" for h, _ in rejected), rejected
        fastest_ok = min(s for c, _, s, _ in got if c == 200)
        assert min(s for _, s in rejected) < fastest_ok, got  # refused at once, not after queueing
    finally:
        _deploy(random_bundle)
        _wait(lambda: requests.get(api + "/v1/info", timeout=5).json()["admission"]["budget"] == 2)
    assert post(api, data).status_code == 200


def _scrape(name: str, **tags) -> float:
    """The sum of a metric's samples on Ray's Prometheus endpoint whose labels include `tags`."""
    from conftest import METRICS_PORT
    text = requests.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line[len(name) + 1:].rsplit("} ", 1)
            if all(f'{k}="{v}"' in labels for k, v in tags.items()):
                total += float(value)
    return total


def test_metrics_reach_rays_prometheus_endpoint(api):
    """The app's metrics (ray.serve.metrics) are on Ray's metrics endpoint with the right counts: requests
    by route and status, answers by class, latency histograms of the ingress and the members."""
    data = _jpeg(2, 6, 96)
    body = post(api, data).json()  # the class this image gets

    def now() -> dict:
        return {"ok": _scrape("ray_skinray_requests_total", route="/v1/predict", status="200"),
                "bad": _scrape("ray_skinray_requests_total", route="/v1/predict", status="422"),
                "cls": _scrape("ray_skinray_answers_total", **{"class": body["class"]}),
                "lat": _scrape("ray_skinray_request_latency_ms_count", route="/v1/predict"),
                "res": _scrape("ray_skinray_member_compute_ms_count", member="resnet50")}
    # Ray exports metrics every few seconds: the baseline once the earlier requests have all arrived
    before, same, deadline = now(), 0, time.time() + 60
    while same < 3 and time.time() < deadline:
        time.sleep(2)
        current = now()
        same, before = (same + 1, before) if current == before and current["ok"] > 0 else (0, current)
    for _ in range(3):
        assert post(api, data).status_code == 200
    assert post(api, data, params={"cam_stride": 12}).status_code == 422
    want = {"ok": 3, "bad": 1, "cls": 3, "lat": 4, "res": 3}
    deadline = time.time() + 60
    while (got := {k: v - before[k] for k, v in now().items()}) != want and time.time() < deadline:
        time.sleep(2)
    assert got == want
    assert _scrape("ray_skinray_explanation_ms_count") > 0


def test_open_inference_protocol_with_tritons_client(api):
    """The model through the Open Inference Protocol (KServe v2), driven by an independent client
    (tritonclient.http, the binary tensor extension for the upload): health, metadata, and an infer
    whose probabilities and class equal /v1/predict's; JSON with base64 too; the ensemble map on request."""
    import numpy as np
    import tritonclient.http as triton
    data = _jpeg(4, 3, 128)
    v1 = post(api, data).json()
    client = triton.InferenceServerClient(url=api.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("skinray")
    meta = client.get_model_metadata("skinray")
    assert meta["inputs"][0]["name"] == "image" and meta["inputs"][0]["datatype"] == "BYTES"
    assert {o["name"]: o["datatype"] for o in meta["outputs"]} == {
        "probabilities": "FP32", "class": "BYTES", "uncertain": "BOOL", "gradcam": "FP32"}
    image = triton.InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([data], dtype=object))  # binary_data: the raw bytes after the JSON
    out = client.infer("skinray", [image], outputs=[triton.InferRequestedOutput(n, binary_data=False)
                                                    for n in ("probabilities", "class", "uncertain", "gradcam")])
    probs = out.as_numpy("probabilities")
    np.testing.assert_allclose(probs, [v1["probabilities"][c] for c in v1["probabilities"]], atol=1e-6)
    assert out.as_numpy("class")[0] in (v1["class"], v1["class"].encode())
    assert bool(out.as_numpy("uncertain")[0]) == v1["uncertain"]
    cam = out.as_numpy("gradcam")
    assert cam.shape == (64, 64) and 0 <= cam.min() and cam.max() <= 1 and cam.max() > 0.5
    assert out.get_response()["model_version"] == v1["bundle"]
    # the same infer as plain JSON (base64 data), outputs not named: no map computed
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                        "data": [base64.b64encode(data).decode()]}]}
    r = requests.post(api + "/v2/models/skinray/infer", json=body, timeout=60)
    assert r.status_code == 200, r.text
    got = {o["name"]: o for o in r.json()["outputs"]}
    assert set(got) == {"probabilities", "class", "uncertain"} and got["class"]["data"] == [v1["class"]]
    np.testing.assert_allclose(got["probabilities"]["data"], probs, atol=1e-6)
    for bad, status, words in ((b"not json", 400, "not JSON"), (b'{"inputs": []}', 422, "exactly one input"),
                               (b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": [1]}]}',
                                422, "BYTES"),
                               (b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["%%"]}]}',
                                400, "base64")):
        r = requests.post(api + "/v2/models/skinray/infer", data=bad, timeout=60)
        assert r.status_code == status and words in r.json()["error"], (bad, r.text)  # the protocol's {"error": msg}
    r = requests.post(api + "/v2/models/other/infer", json=body, timeout=60)
    assert r.status_code == 404 and "not served here" in r.json()["error"] and r.headers["X-Request-ID"]
    r = requests.post(api + "/v2/models/skinray/infer", json=body | {"outputs": [{"name": "logits"}]}, timeout=60)
    assert r.status_code == 422 and "logits" in r.json()["error"]


def test_open_inference_protocol_errors_and_versions_as_tritons_client_reads_them(api):
    """Errors on /v2 are the protocol's `{"error": "<message>"}`: tritonclient's InferenceServerException
    carries the message (its str() and message()) and the status; a model version the metadata lists
    answers (the version is the bundle id), any other is a 404; /v1 keeps its richer shape."""
    import numpy as np
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException
    client = triton.InferenceServerClient(url=api.removeprefix("http://"))
    version = client.get_model_metadata("skinray")["versions"][0]
    assert version == requests.get(api + "/v1/info", timeout=10).json()["bundle"]
    assert client.get_model_metadata("skinray", model_version=version)["versions"] == [version]
    assert client.is_model_ready("skinray", model_version=version)
    image = triton.InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([_jpeg(2, 5, 96)], dtype=object))
    out = client.infer("skinray", [image], model_version=version)
    assert out.get_response()["model_version"] == version and out.as_numpy("probabilities").shape == (6,)
    for call, status, words in (
            (lambda: client.get_model_metadata("other"), "404", "is not served here"),
            (lambda: client.get_model_metadata("skinray", model_version="sk-000000000000"), "404", "has no version"),
            (lambda: client.infer("skinray", [image], model_version="sk-000000000000"), "404", "has no version"),
            (lambda: client.infer("skinray", [image], outputs=[triton.InferRequestedOutput("logits")]), "422",
             "unknown output")):
        with pytest.raises(InferenceServerException) as caught:
            call()
        e = caught.value
        assert isinstance(e.message(), str) and words in e.message() and words in str(e), str(e)
        assert e.status() == status
    bad = triton.InferInput("image", [1], "BYTES")
    bad.set_data_from_numpy(np.array([b"not an image"], dtype=object))
    with pytest.raises(InferenceServerException) as caught:
        client.infer("skinray", [bad])
    assert caught.value.status() == "400" and "not a readable image" in str(caught.value)
    v1 = post(api, b"not an image")
    assert v1.status_code == 400 and v1.json()["error"]["code"] == "undecodable_image"  # /v1's shape stays


def test_a_canary_bundle_beside_the_stable_one(api, random_bundle, tmp_path_factory):
    """Two bundles at once: the candidate answers its share of unpinned requests (within a binomial
    tolerance), a header pins either, every answer names its bundle, /v1/info lists both, and a
    failing candidate never fails a stable answer (its unpinned share falls back to the stable bundle).
    The candidate stores stride-16 maps: a request pinned to it that sets only cam_smooth or cam_method
    keeps that stride (the request's other options come from the bundle it answers with, not from the
    defaults)."""
    from skin.bundle import derive_bundle
    src = Bundle.load(random_bundle)
    cand = derive_bundle(src, tmp_path_factory.mktemp("canary") / "b", weights=(0.5, 0.25, 0.25),
                         explanations=dict.fromkeys(src.member_names, {"stride": 16}))
    data = _jpeg(0, 8, 96)
    canary = {"bundle": str(cand.root), "share": 0.3}
    try:
        _deploy(random_bundle, candidate=canary)
        _wait(lambda: requests.get(api + "/v1/info", timeout=5).json().get("candidate") is not None)
        info = requests.get(api + "/v1/info", timeout=5).json()
        assert info["bundles"] == [src.id, cand.id] and info["candidate"]["share"] == 0.3

        def map_of(**params):
            r = post(api, data, params=params, headers={"X-Skinray-Bundle": "candidate"})
            assert r.status_code == 200 and r.json()["bundle"] == cand.id, r.text[:200]
            return r.json()["gradcam"]["map_png"]
        for option in ({"cam_smooth": "flips"}, {"cam_method": "layercam"}):
            assert map_of(**option) == map_of(**option, cam_stride=16), option  # the bundle's stride kept
            assert map_of(**option) != map_of(**option, cam_stride=32), option
        ids = [post(api, data, params={"cam": "false"}).json()["bundle"] for _ in range(60)]  # the share: no maps
        n = ids.count(cand.id)
        assert set(ids) == {src.id, cand.id} and 8 <= n <= 30, n  # 60 x 0.3 = 18, about +-3 standard deviations
        for pin, want in (("candidate", cand.id), ("stable", src.id), (cand.id, cand.id)):
            r = post(api, data, headers={"X-Skinray-Bundle": pin})
            assert r.status_code == 200 and r.json()["bundle"] == want, (pin, r.text[:200])
        bad = post(api, data, headers={"X-Skinray-Bundle": "sk-000000000000"})
        assert bad.status_code == 422 and "names no bundle" in bad.json()["error"]["message"]
        # the candidate fails: stable answers are untouched, unpinned requests all get the stable bundle
        _deploy(random_bundle, candidate=canary | {"members": {"resnet50": {"fault_drill": True}}})
        _wait(lambda: post(api, data, headers={"X-Skinray-Bundle": "candidate"}).status_code == 503)
        answers = [post(api, data, params={"cam": "false"}) for _ in range(12)]
        assert all(r.status_code == 200 and r.json()["bundle"] == src.id for r in answers)
        assert post(api, data, headers={"X-Skinray-Bundle": "stable"}).status_code == 200
    finally:
        _deploy(random_bundle)
        _wait(lambda: requests.get(api + "/v1/info", timeout=5).json().get("candidate") is None)
