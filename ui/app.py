"""skinray page: a Streamlit client of the Ray Serve API (HTTP only; no model, no torch, no skin).

    SKINRAY_API_URL=http://127.0.0.1:8000 streamlit run ui/app.py --server.address 127.0.0.1
"""
from __future__ import annotations

import base64
import io
import json
import os

import numpy as np
import pandas as pd
import requests
import streamlit as st
from PIL import Image, ImageOps

try:  # HEIC/HEIF photographs (iPhones) for the page's own preview; the API decodes them regardless
    import pillow_heif
    pillow_heif.register_heif_opener()
except ImportError:  # pragma: no cover - pillow-heif ships with skinray's dependencies
    pass

DEFAULT_API = os.environ.get("SKINRAY_API_URL", "http://127.0.0.1:8000")
TIMEOUT_S = float(os.environ.get("SKINRAY_API_TIMEOUT", "60"))
# file name suffixes of the API's formats (its /v1/info lists the formats; this is the fallback)
SUFFIXES = {"JPEG": ["jpg", "jpeg"], "PNG": ["png"], "WEBP": ["webp"], "HEIF": ["heic", "heif"]}
NOTICE = ("Decision support, not a diagnosis: the answer and its heat map help a clinician look "
          "again; they do not replace examination or histopathology.")


class ApiProblem(Exception):
    """Anything that went wrong talking to the API, as a sentence a person can act on."""


def _headers(key: str) -> dict:
    return {"X-API-Key": key} if key else {}


def _explain(resp: requests.Response) -> str:
    try:
        err = resp.json()["error"]
        return f"{err['message']} (HTTP {resp.status_code}, {err['code']})"
    except (ValueError, KeyError, TypeError):
        return f"the API answered HTTP {resp.status_code}"


def call(method: str, url: str, key: str, **kw) -> dict:
    try:
        resp = requests.request(method, url, headers=_headers(key), timeout=TIMEOUT_S, **kw)
    except requests.ConnectionError:
        raise ApiProblem(f"cannot reach the API at {url.rsplit('/v1', 1)[0]}: is the service running? "
                         "Check the address in the sidebar.") from None
    except requests.Timeout:
        raise ApiProblem(f"the API did not answer within {TIMEOUT_S:.0f} s; try again in a moment.") from None
    if resp.status_code != 200:
        raise ApiProblem(_explain(resp))
    try:
        return resp.json()
    except ValueError:
        raise ApiProblem("the API answered with something that is not JSON; check the address") from None


@st.cache_data(ttl=30, show_spinner=False)
def fetch_info(api: str, key: str) -> dict:
    return call("GET", f"{api}/v1/info", key)


@st.cache_data(max_entries=64, show_spinner=False)
def fetch_prediction(api: str, key: str, name: str, data: bytes, mime: str, consent: bool = False) -> dict:
    """One request per (server, file, consent): moving the opacity slider or changing class re-blends
    locally from the raw maps in this answer. `consent`: the patient agreed to the photograph being kept
    (the server keeps it only where its deployment keeps photographs)."""
    return call("POST", f"{api}/v1/predict", key, files={"file": (name, data, mime)},
                params={"cam": "true", "all_classes": "true"} | ({"consent": "true"} if consent else {}))


def decode_png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def blend(image: Image.Image, grey_map: Image.Image, alpha: float) -> Image.Image:
    """Jet-coloured map over the photograph at the chosen opacity (same blend as the server)."""
    import matplotlib
    base = image.convert("RGB")
    m = np.asarray(grey_map.convert("L").resize(base.size, Image.Resampling.BILINEAR), np.float32) / 255.0
    heat = matplotlib.colormaps["jet"](m)[..., :3]
    out = (1 - alpha) * (np.asarray(base, np.float32) / 255.0) + alpha * heat
    return Image.fromarray((out * 255 + 0.5).clip(0, 255).astype(np.uint8), "RGB")


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def sidebar() -> tuple[str, str, float, dict | None]:
    st.sidebar.title("skinray")
    api = st.sidebar.text_input("API address", DEFAULT_API).rstrip("/")
    key = st.sidebar.text_input("API key (if the server needs one)", type="password")
    alpha = st.sidebar.slider("Heat-map opacity", 0.0, 1.0, 0.4, 0.05)
    info = None
    try:
        info = fetch_info(api, key)
    except ApiProblem as e:
        st.sidebar.error(str(e))
    if info:
        st.sidebar.markdown(f"**Model bundle** `{info['bundle']}`")
        if info.get("untrained"):
            st.sidebar.warning("This bundle has random weights (a test/demo bundle): its answers mean nothing.")
        members = ", ".join(f"{m['name']} ({m['weight']:.2f})" for m in info["members"])
        st.sidebar.caption(f"Members and weights: {members}")
        ens = (info.get("metrics") or {}).get("ensemble")
        if ens:
            split = info["metrics"].get("split", "test")
            st.sidebar.markdown(f"**{split} metrics (ensemble)**")
            st.sidebar.table(pd.DataFrame({"value": [ens["accuracy"], ens["balanced_accuracy"], ens["f1_macro"]]},
                                          index=["accuracy", "balanced accuracy", "macro-F1"]).round(4))
        else:
            st.sidebar.caption("No evaluation metrics stored in this bundle yet.")
    return api, key, alpha, info


def faithfulness_caption(info: dict | None) -> str:
    """How far to trust the map, from the bundle's stored measurements (jobs/evaluate.py): first the verdict
    of the test that needs no masks (skin.trust: the map against random, untrained, centre and colour-contrast
    maps, with 95% intervals), then the pointing game on lesions with masks. No sentence claims more than
    the intervals do."""
    info = info or {}
    trust = info.get("explanation_trust") or {}
    f = (info.get("metrics") or {}).get("faithfulness")
    verdict = trust.get("sentence") or "Not measured: how closely this map follows the model has not been tested."
    if trust.get("split") and trust.get("images"):
        verdict = verdict.replace(" images", f" images of the {trust['split']} split", 1)
    if not f:
        return verdict + " How well these maps point at lesions has not been measured for this bundle."
    return (verdict + f" Pointing game {f['pointing']:.2f} on {f.get('masks', 'lesions with known masks')} "
            f"({f['images']} images; the map's peak fell inside the lesion that often"
            + "); not measured on real photographs." + baseline_caption(f.get("baseline") or {}))


def explanation_name(info: dict | None) -> str:
    """What the maps are, as the server names them (/v1/info "explanation": Grad-CAM, LayerCAM or both,
    flip-averaged or not)."""
    return (info or {}).get("explanation") or "Grad-CAM"


def baseline_caption(b: dict) -> str:
    """What maps that know less scored on the same images (older bundles store only the centre map)."""
    parts = [f"{what}: {b[k]:.2f}" for k, what in (
        ("centre_pointing", "a map fixed on the image centre"),
        ("contrast_pointing", "a colour-contrast map with no model"),
        ("untrained_pointing", "the same maps from untrained models")) if k in b]
    return f" For comparison, {'; '.join(parts)}." if parts else ""


def show_result(name: str, image: Image.Image, result: dict, alpha: float, info: dict | None = None) -> None:
    st.subheader(name)
    if result.get("uncertain"):
        st.warning("Uncertain answer: " + "; ".join(result.get("uncertain_reasons") or ["low confidence"]))
    c1, c2 = st.columns(2)
    c1.metric("Predicted class", result["class"], f"{result['confidence']:.1%} confidence", delta_color="off")
    probs = pd.DataFrame({"probability": result["probabilities"]})
    c2.bar_chart(probs, horizontal=True, height=220)

    gc = result.get("gradcam") or {}
    maps = gc.get("maps_png") or ({gc["class"]: gc["map_png"]} if gc else {})
    overlay = None
    left, right = st.columns(2)
    left.image(image, caption="uploaded photograph", width="stretch")
    if maps:
        classes = list(maps)
        default = classes.index(gc["class"]) if gc.get("class") in classes else 0
        shown = right.selectbox(f"{explanation_name(info)} of class", classes, index=default, key=f"cls-{name}")
        overlay = blend(image, decode_png(maps[shown]), alpha)
        right.image(overlay, caption=f"where the ensemble looked for {shown}", width="stretch")
        right.caption(faithfulness_caption(info))
    else:
        right.info("No Grad-CAM in this answer.")

    st.markdown("**Each model's view** (disagreement lowers trust)")
    rows = {m: {**v["probabilities"], "top class": v["top_class"], "weight": v["weight"]}
            for m, v in result["members"].items()}
    st.dataframe(pd.DataFrame(rows).T, width="stretch")
    d1, d2 = st.columns(2)
    if overlay is not None:
        d1.download_button("Download overlay (PNG)", png_bytes(overlay), f"{name}-gradcam.png", "image/png",
                           key=f"png-{name}")
    slim = {k: v for k, v in result.items() if k != "gradcam"}
    d2.download_button("Download result (JSON)", json.dumps(slim, indent=2), f"{name}-result.json",
                       "application/json", key=f"json-{name}")


def review_box(api: str, key: str, name: str, result: dict, info: dict | None) -> None:
    """Under an answer: Right, or Wrong and the right class, with a note, sent to POST /v1/feedback under the
    reviewer's name (the sidebar's). The answer is on record by its request id."""
    rid = result.get("request_id")
    if not rid:
        return
    classes = (info or {}).get("classes") or list(result["probabilities"])
    with st.form(f"review-{name}"):
        st.markdown("**Review this answer**")
        verdict = st.radio("The answer is", ["Right", "Wrong"], horizontal=True, key=f"verdict-{name}")
        others = [c for c in classes if c != result["class"]]
        right = st.selectbox("If wrong, the right class", others, key=f"right-{name}")
        note = st.text_input("Note (optional)", key=f"note-{name}")
        sent = st.form_submit_button("Send review")
    if sent:
        reviewer = st.session_state.get("reviewer", "").strip()
        if not reviewer:
            st.error("Enter your name as the reviewer in the sidebar first; the review was not sent.")
            return
        body = {"request_id": rid, "reviewer": reviewer, "note": note,
                **({"confirmed": True} if verdict == "Right" else {"right_class": right})}
        try:
            call("POST", f"{api}/v1/feedback", key, json=body)
        except ApiProblem as e:
            st.error(f"The review was not saved: {e}")
            return
        st.success("Review saved: " + ("confirmed." if verdict == "Right" else f"corrected to {right}."))


def fetch_photo(api: str, key: str, request_id: str) -> bytes:
    """A recorded answer's photograph (kept with consent), from GET /v1/records/{id}/photo."""
    try:
        resp = requests.get(f"{api}/v1/records/{request_id}/photo", headers=_headers(key), timeout=TIMEOUT_S)
    except requests.RequestException:
        raise ApiProblem(f"cannot reach the API at {api}: is the service running?") from None
    if resp.status_code != 200:
        raise ApiProblem(_explain(resp))
    return resp.content


def review_queue(api: str, key: str, alpha: float = 0.4, info: dict | None = None) -> None:
    """Answers that wait for a specialist (uncertain and not reviewed, or disputed), oldest first, and how
    often reviewers agreed with the model per class; the overlay of one whose photograph was kept, re-drawn
    on demand (not recorded as a new answer)."""
    st.title("Review queue")
    shown = st.radio("Show", ["all waiting", "disputed", "uncertain"], horizontal=True, key="queue-why")
    params = {"limit": 200} | ({} if shown == "all waiting" else {"why": shown})
    try:
        data = call("GET", f"{api}/v1/review-queue", key, params=params)
    except ApiProblem as e:
        st.error(str(e))
        return
    if not data["queue"]:
        st.info("Nothing waits for review: no uncertain answer is unreviewed and no answer is disputed.")
    else:
        st.dataframe(pd.DataFrame([{
            "time": q["at"], "request id": q["request_id"], "why": q["why"], "answered": q["answer_class"],
            "confidence": max(q["probabilities"].values()), "reviews": "; ".join(
                f"{r['reviewer']}: {r['right_class']}" for r in q["reviews"]) or "none",
            "photo kept": q["has_photo"]} for q in data["queue"]]), width="stretch", hide_index=True)
    if data["agreement"]:
        st.markdown("**Reviewers' agreement with the model, by answered class**")
        st.dataframe(pd.DataFrame(data["agreement"]).T, width="stretch")
    kept = [q["request_id"] for q in data["queue"] if q["has_photo"]]
    if kept:
        rid = st.selectbox("Re-draw the overlay of (photographs kept with consent)", kept, key="redraw")
        if st.button("Re-draw overlay", key="redraw-go"):
            try:
                photo = fetch_photo(api, key, rid)
                result = call("POST", f"{api}/v1/predict", key, files={"file": (rid, photo, "application/octet-stream")},
                              params={"cam": "true", "all_classes": "true", "record": "false"})
            except ApiProblem as e:
                st.error(str(e))
                return
            show_result(rid, ImageOps.exif_transpose(Image.open(io.BytesIO(photo))).convert("RGB"), result, alpha, info)


def main() -> None:
    st.set_page_config(page_title="skinray", layout="wide")
    st.set_option("client.toolbarMode", "viewer")  # a clinician's page: no Deploy / Rerun / Clear cache
    api, key, alpha, info = sidebar()
    st.sidebar.text_input("Reviewer (your name, for reviews)", key="reviewer")
    if st.sidebar.radio("View", ["Classify", "Review queue"], key="view") == "Review queue":
        review_queue(api, key, alpha, info)
        return
    st.title("Skin-lesion classifier")
    st.info(NOTICE)
    formats = ((info or {}).get("limits") or {}).get("formats") or list(SUFFIXES)
    types = [x for f in formats for x in SUFFIXES.get(f, [f.lower()])]
    consent = st.checkbox("The patient consented to keeping these photographs (for review and the next training "
                          "run); otherwise only a fingerprint (SHA-256) of each is kept", key="consent")
    files = st.file_uploader(f"Upload one or more photographs ({', '.join(t.upper() for t in types)})", type=types,
                             accept_multiple_files=True)
    if not files:
        st.caption("The page sends each image to the API and shows the answer with its Grad-CAM explanation.")
        return
    answers, images = {}, {}
    for f in files:
        data = f.getvalue()
        name = f.name
        try:
            images[name] = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")  # as the API turns it
        except Exception:  # noqa: BLE001 - the API gives the authoritative reason below
            images[name] = None
        with st.spinner(f"Classifying {name}..."):
            try:
                answers[name] = fetch_prediction(api, key, name, data, f.type or "application/octet-stream",
                                                 consent)
            except ApiProblem as e:
                answers[name] = e
    table = pd.DataFrame([
        {"file": n, "class": a["class"], "confidence": round(a["confidence"], 4), "uncertain": a["uncertain"]}
        if isinstance(a, dict) else {"file": n, "class": "error", "confidence": None, "uncertain": None}
        for n, a in answers.items()])
    if len(files) > 1:
        st.dataframe(table, width="stretch", hide_index=True)
    for name, a in answers.items():
        if isinstance(a, ApiProblem):
            st.error(f"{name}: {a}")
        elif images[name] is not None:
            show_result(name, images[name], a, alpha, info)
            review_box(api, key, name, a, info)
        st.divider()


main()
