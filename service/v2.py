"""The same model through the Open Inference Protocol (KServe v2), so Triton's and KServe's clients work
unchanged: health, server and model metadata, and infer, unversioned or for a version the metadata lists
(the version is a bundle id: asking for one pins that bundle, the stable one or a canary beside it).

An infer request carries one input, `image`: BYTES of shape [1], the photograph's file bytes, base64 in
JSON `data` or raw with the binary tensor extension. Errors are the protocol's `{"error": "<message>"}`
(service.errors)."""
import base64
import json
import struct
import time
from typing import Any, Dict, Optional, Tuple

from fastapi import APIRouter, Request

from . import canary
from .errors import V2_ERRORS, ApiError

MODEL = "skinray"
OUTPUTS = ("probabilities", "class", "uncertain", "gradcam")
router = APIRouter()
MODEL_ERRORS = {s: V2_ERRORS[s] for s in (401, 404)}


def parse_infer(body: bytes, header_length: Optional[str]) -> Tuple[Dict[str, Any], bytes]:
    """An infer request -> (its JSON, the image's bytes). The image is the one BYTES element of input
    "image": base64 in JSON `data`, or raw with the binary tensor extension (the JSON's length in the
    Inference-Header-Content-Length header, then each element as a 4-byte little-endian length and its
    bytes). Anything else is an ApiError saying what is expected."""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            n = -1
        if not 0 < n <= len(body):
            raise ApiError(400, "invalid_request", f"Inference-Header-Content-Length {header_length!r} does not fit "
                           f"the {len(body)}-byte body")
        head, binary = body[:n], body[n:]
    else:
        head, binary = body, b""
    try:
        req = json.loads(head)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "invalid_request", "the infer request is not JSON (KServe v2 / Open Inference "
                       "Protocol: {\"inputs\": [{\"name\": \"image\", \"datatype\": \"BYTES\", "
                       "\"shape\": [1], \"data\": [\"<base64>\"]}]})") from None
    inputs = req.get("inputs") if isinstance(req, dict) else None
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict) \
            or inputs[0].get("name") != "image":
        raise ApiError(422, "invalid_request", "send exactly one input named 'image' (datatype BYTES, shape [1]): "
                       "one photograph per request")
    inp = inputs[0]
    if inp.get("datatype") != "BYTES" or inp.get("shape") not in ([1], [1, 1]):
        raise ApiError(422, "invalid_request", f"input 'image' must be BYTES of shape [1], got "
                       f"{inp.get('datatype')!r} {inp.get('shape')!r}")
    size = (inp.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size != len(binary) or size < 4:
            raise ApiError(400, "invalid_request", f"binary_data_size {size!r} does not match the "
                           f"{len(binary)} bytes after the JSON")
        (length,) = struct.unpack("<I", binary[:4])
        if length != size - 4:
            raise ApiError(400, "invalid_request", "the binary 'image' tensor holds more or less than one element")
        return req, binary[4:]
    data = inp.get("data")
    if not isinstance(data, list) or len(data) != 1 or not isinstance(data[0], str):
        raise ApiError(422, "invalid_request", "input 'image' needs `data`: one base64 string of the file's bytes "
                       "(or the binary tensor extension)")
    try:
        return req, base64.b64decode(data[0], validate=True)
    except ValueError:
        raise ApiError(400, "invalid_request", "input 'image' is not valid base64") from None


def model_metadata(plane, version: Optional[str] = None) -> Dict[str, Any]:
    variants = plane.variants() if version is None else [canary.by_version(plane.variants(), MODEL, version)]
    bundle = variants[0].bundle
    c = len(bundle.classes)
    from skin.trust import bundle_verdict
    verdict = bundle_verdict(bundle.metrics)
    return {"name": MODEL, "versions": [v.bundle.id for v in variants], "platform": "skinray",
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                        "parameters": {"content": "one photograph's file bytes (JPEG, PNG, WebP, HEIC/HEIF); "
                                       "base64 in JSON, raw with the binary tensor extension"}}],
            "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [c]},
                        {"name": "class", "datatype": "BYTES", "shape": [1]},
                        {"name": "uncertain", "datatype": "BOOL", "shape": [1]},
                        {"name": "gradcam", "datatype": "FP32", "shape": [-1, -1]}],
            "parameters": {"classes": list(bundle.classes), "bundle": bundle.id,
                           "gradcam": "the ensemble map of the answered class at the members' input size, "
                                      "[0, 1]; only when asked for (an `outputs` entry or parameter cam=true)",
                           "explanation_verdict": verdict["sentence"],
                           "explanation_shown": verdict["shown"]}}


class V2Routes:
    """The Open Inference Protocol's routes over `self.plane`."""

    @router.get("/v2/health/live")
    async def oip_live(self) -> Dict[str, bool]:
        return {"live": True}

    @router.get("/v2/health/ready")
    async def oip_ready(self) -> Dict[str, bool]:
        return {"ready": True}

    @router.get("/v2")
    async def oip_server(self) -> Dict[str, Any]:
        return {"name": "skinray", "version": "1", "extensions": ["binary_tensor_data"]}

    @router.get("/v2/models/{model}", responses=MODEL_ERRORS)
    async def oip_model(self, model: str) -> Dict[str, Any]:
        _check_model(model)
        return model_metadata(self.plane)

    @router.get("/v2/models/{model}/versions/{version}", responses=MODEL_ERRORS)
    async def oip_model_version(self, model: str, version: str) -> Dict[str, Any]:
        _check_model(model)
        return model_metadata(self.plane, version)

    @router.get("/v2/models/{model}/ready", responses=MODEL_ERRORS)
    async def oip_model_ready(self, model: str) -> Dict[str, Any]:
        _check_model(model)
        return {"name": MODEL, "ready": True}

    @router.get("/v2/models/{model}/versions/{version}/ready", responses=MODEL_ERRORS)
    async def oip_model_version_ready(self, model: str, version: str) -> Dict[str, Any]:
        _check_model(model)
        canary.by_version(self.plane.variants(), MODEL, version)
        return {"name": MODEL, "version": version, "ready": True}

    @router.post("/v2/models/{model}/infer", responses=V2_ERRORS)
    async def oip_infer(self, model: str, request: Request) -> Dict[str, Any]:
        return await self._oip_infer(model, None, request)

    @router.post("/v2/models/{model}/versions/{version}/infer", responses=V2_ERRORS)
    async def oip_infer_version(self, model: str, version: str, request: Request) -> Dict[str, Any]:
        return await self._oip_infer(model, version, request)

    async def _oip_infer(self, model: str, version: Optional[str], request: Request) -> Dict[str, Any]:
        t0 = time.perf_counter()
        _check_model(model)
        plane = self.plane
        if version is None:
            variant, pinned = plane.choose(request.headers.get("X-Skinray-Bundle"))
        else:
            variant, pinned = canary.by_version(plane.variants(), MODEL, version), True
        body = await request.body()
        if len(body) > plane.limits.max_bytes * 4 // 3 + 65536:  # base64 in JSON: 4/3 of the file
            raise ApiError(413, "too_large", f"the request is {len(body)} bytes; the image may be at most "
                           f"{plane.limits.max_bytes} bytes")
        req, data = parse_infer(body, request.headers.get("inference-header-content-length"))
        names = {o.get("name") for o in req.get("outputs") or [] if isinstance(o, dict)}
        unknown = names - set(OUTPUTS)
        if unknown:
            raise ApiError(422, "invalid_request", f"unknown output(s) {sorted(unknown)}; the outputs are "
                           f"{', '.join(OUTPUTS)}")
        params = req.get("parameters") or {}
        cam = "gradcam" in names or params.get("cam") is True
        ticket = await plane.admit((("route", "v2"), ("bundle", variant.bundle.id), ("cam", str(cam).lower())))
        answer = await plane.answer(variant, pinned, data, t0, ticket, cam=cam, render=False,
                                    request_id=request.state.request_id, route="v2",
                                    consent=params.get("consent") is True)
        classes = variant.bundle.classes
        probs = [answer["probabilities"][c] for c in classes]
        outputs = [{"name": "probabilities", "datatype": "FP32", "shape": [len(probs)], "data": probs},
                   {"name": "class", "datatype": "BYTES", "shape": [1], "data": [answer["class"]]},
                   {"name": "uncertain", "datatype": "BOOL", "shape": [1], "data": [bool(answer["uncertain"])]}]
        if cam:
            m = answer["gradcam"]["map"]
            outputs.append({"name": "gradcam", "datatype": "FP32", "shape": list(m.shape),
                            "data": [round(float(v), 6) for v in m.ravel()]})
        if names:
            outputs = [o for o in outputs if o["name"] in names]
        return {"model_name": MODEL, "model_version": answer["bundle"], "id": str(req.get("id", "")),
                "outputs": outputs, "parameters": {"bundle": answer["bundle"], "degraded": bool(answer["degraded"]),
                                                   "explained_class": (answer.get("gradcam") or {}).get("class", ""),
                                                   "request_id": request.state.request_id,
                                                   "photo_kept": bool(answer.get("photo_kept"))}}


def _check_model(model: str) -> None:
    if model != MODEL:
        raise ApiError(404, "not_found", f"model {model!r} is not served here; the model is {MODEL!r}")
