"""Ray Serve application: one deployment per ensemble member behind an ensemble ingress.

    serve run serve_app:app bundle=/path/to/bundle            # local, one command
    serve deploy cluster/serve_config.yaml                     # on a running cluster

Each member deployment loads its member from the bundle and answers, for a batch of prepared
inputs (`@serve.batch`), temperature-scaled probabilities plus every class's Grad-CAM map at
feature resolution (one forward pass: skin.gradcam). The ensemble deployment is the FastAPI
ingress: it validates and decodes the upload once (skin.images), applies the resize half of each
member's eval preset (uint8; the member normalises), fans out to the members concurrently through
DeploymentHandles, averages with the bundle's weights, builds the ensemble Grad-CAM and overlay,
and answers.

HTTP API (OpenAPI at /docs): POST /v1/predict, GET /v1/info, GET /healthz; the same model through the Open
Inference Protocol (KServe v2): GET /v2/health/live|ready, GET /v2/models/skinray, POST /v2/models/skinray/infer.
"""
import asyncio
import base64
import hmac
import logging
import os
import time
import uuid
from typing import Any, Dict, List, Literal, Optional, Tuple

import numpy as np
from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from skin.images import ImageLimits  # torch-free: the one definition of the upload limits

_LIMITS = ImageLimits()

logger = logging.getLogger("ray.serve")

DEFAULT_MEMBER_CPUS = 0.5  # Serve replicas default to 1 CPU: three of them never fit 2 cores
DEFAULT_OPTIONS = (True, ())  # what a member computes for a plain image: (maps, no change to the bundle's Explanation)


# --------------------------------------------------------------------------- typed builder args
class Autoscaling(BaseModel):
    """Serve's autoscaling of one member's replicas (its `autoscaling_config`)."""
    min_replicas: int = Field(1, ge=1)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(4.0, gt=0, description="requests per replica Serve aims for; a batch "
                                           "is up to max_batch_size, so half a batch keeps replicas busy")
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)

    def model_post_init(self, _context) -> None:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) must be at least min_replicas ({self.min_replicas})")


class MemberOptions(BaseModel):
    replicas: int = Field(1, ge=1, description="replicas of this member (fixed; see autoscaling)")
    autoscaling: Optional[Autoscaling] = Field(None, description="let Serve scale this member's replicas with load "
                                               "(replaces `replicas`)")
    num_cpus: float = Field(DEFAULT_MEMBER_CPUS, gt=0, description="CPUs per replica (torch threads follow)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica; fractional lets members share a GPU")
    resources: Dict[str, float] = Field(default_factory=dict, description="custom Ray resources per replica, to "
                                        "place it on nodes that declare them (e.g. {member_node: 0.01})")
    threads: Optional[int] = Field(None, ge=1, description="torch threads (default: the CPU share, at least 1); "
                                   "more than the share trades throughput under load for latency when idle")
    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.0, ge=0, description="wait this long for a batch to fill; 0 takes "
                                        "what is queued (under load, requests queue while a batch runs)")
    amp: Literal["off", "auto", "bf16"] = Field("off", description="backbone precision: off = fp32; auto = bf16 on a "
                                                "GPU; bf16 = also on a CPU with native bf16 (else fp32, logged). "
                                                "`skin predict --amp` gives the same answers in-process")
    graphs: Literal["auto", "on", "off"] = Field("auto", description="run the answer pass and the one-pass maps "
                                                  "compiled, as CUDA graphs on a GPU, each batch size captured at "
                                                  "start-up (auto: on a GPU only; skin.graphs)")
    fault_drill: bool = Field(False, description="this member fails every call (to rehearse alerts/degraded mode)")


class CandidateArgs(BaseModel):
    """A second bundle served beside the stable one (a canary): its own member deployments."""
    bundle: str = Field(..., description="the candidate bundle's folder (the same class map as the stable one)")
    share: float = Field(0.0, ge=0, le=1, description="share of the requests without a pin that the candidate "
                         "answers; pin one with the header X-Skinray-Bundle: stable|candidate|<bundle id>")
    members: Dict[str, MemberOptions] = Field(default_factory=dict, description="per-member overrides by name")


class AppArgs(BaseModel):
    bundle: str = Field(..., description="bundle folder (must be readable from every node)")
    members: Dict[str, MemberOptions] = Field(default_factory=dict, description="per-member overrides by name")
    candidate: Optional[CandidateArgs] = Field(None, description="a candidate bundle beside this one (canary)")
    ingress_cpus: float = Field(0.25, gt=0)
    ingress_replicas: int = Field(1, ge=1)
    max_ongoing_requests: int = Field(64, ge=1, description="requests an ingress replica works on at once")
    max_queued_requests: int = Field(64, ge=1, description="requests waiting for an ingress replica beyond "
                                     "max_ongoing_requests; past that the app answers 503 with Retry-After at once "
                                     "instead of queueing without bound")
    retry_after_s: float = Field(2.0, ge=0, description="the Retry-After of an overload 503")
    ingress_resources: Dict[str, float] = Field(default_factory=dict, description="custom Ray resources of the "
                                                "ingress, to pin it (e.g. to the head: {head: 0.01})")
    max_upload_bytes: int = Field(_LIMITS.max_bytes, gt=0, description="default: skin.images.ImageLimits")
    max_pixels: int = Field(_LIMITS.max_pixels, gt=0)
    min_side: int = Field(_LIMITS.min_side, ge=1)
    api_key: Optional[str] = Field(None, description="require X-API-Key (or Bearer) on every route but /healthz; "
                                   "default: $SKINRAY_API_KEY when set")
    allow_degraded: bool = Field(False, description="answer from the remaining members when one fails")

    member_timeout_s: float = Field(30.0, gt=0)
    uncertain_below: float = Field(0.5, ge=0, le=1)
    overlay_max_side: int = Field(1024, ge=64, description="overlay/map PNGs are at most this size (aspect kept)")


# --------------------------------------------------------------------------- member deployment
@serve.deployment(ray_actor_options={"num_cpus": DEFAULT_MEMBER_CPUS}, max_ongoing_requests=32)
class MemberModel:
    """One ensemble member: probabilities + all-class Grad-CAM maps for a batch of inputs."""

    def __init__(self, bundle_dir: str, name: str, num_cpus: float = DEFAULT_MEMBER_CPUS,
                 max_batch_size: int = 8, batch_wait_timeout_s: float = 0.0, threads: Optional[int] = None,
                 amp: str = "off", graphs: str = "auto") -> None:
        import torch
        from skin.bundle import Bundle
        from skin.inference import MemberRunner
        from skin.presets import eval_pixels
        torch.set_num_threads(threads or max(1, int(round(num_cpus))))  # Ray sets 1 thread for fractional CPUs
        self.torch, self.amp = torch, amp
        bundle = Bundle.load(bundle_dir)
        self.name = name
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.runs = {(): MemberRunner.from_bundle(bundle, name, self.device, amp, graphs=graphs)}  # as `skin predict`
        captured = self.runs[()].warm_up(max_batch_size)  # the first request pays no compile
        if captured:
            logger.info("member %s: compiled passes for batch sizes %s on %s", name, captured, self.device)
        self.pixels = eval_pixels(self.runs[()].member.data_config)  # the ingress sends the resized uint8 image
        if amp == "bf16" and not self.runs[()].bf16:
            logger.warning("member %s: amp=bf16 asked for, but this CPU has no native bf16: running fp32", name)
        self.fault_drill = False
        self.predict.set_max_batch_size(max_batch_size)
        self.predict.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def reconfigure(self, config: Dict[str, Any]) -> None:
        self.fault_drill = bool((config or {}).get("fault_drill", False))

    def _runner(self, explain: Tuple[Tuple[str, Any], ...]):
        """The member with the bundle's Explanation overridden by `explain` ((option, value) pairs);
        built once per setting asked for, sharing the member's weights (the answer never depends on it)."""
        if explain not in self.runs:
            self.runs[explain] = self.runs[()].with_explanation(**dict(explain))
        return self.runs[explain]

    def _run(self, batch: np.ndarray, options: Tuple[bool, Tuple[Tuple[str, Any], ...]] = DEFAULT_OPTIONS):
        """(probabilities, maps or None, ms) of a batch; `options` = (cam, explanation overrides)."""
        t0 = time.perf_counter()
        cam, explain = options
        x = self.pixels(self.torch.from_numpy(batch).to(self.device))
        probs, maps = self._runner(explain)(x, cam=cam)  # skin.inference: as `skin predict` / `skin explain`
        return probs, None if maps is None else maps.numpy().astype(np.float32), (time.perf_counter() - t0) * 1e3

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def predict(self, inputs: List[Any]) -> List[Dict[str, np.ndarray]]:
        """Each input: the resized uint8 image (answer and the bundle's maps), or (image, (cam, explain)):
        no maps, or maps made otherwise (explain: (option, value) pairs over the bundle's Explanation)."""
        if self.fault_drill:
            raise RuntimeError(f"fault drill: member {self.name} is set to fail")
        # Computed on this replica's user-code event loop, not in a worker thread: Serve forms the next
        # batch as soon as this one *starts*, so with the loop free every queued request became a batch
        # of one (measured: batch 1 at 16 concurrent requests). Holding the loop until the batch is done
        # makes the next batch everything that arrived meanwhile (6-8 under load; no added wait when idle).
        # Serve's own loop (health checks, routing) runs in another thread and stays responsive.
        items = [x if isinstance(x, tuple) else (x, DEFAULT_OPTIONS) for x in inputs]
        out: List[Any] = [None] * len(items)
        for options in dict.fromkeys(o for _, o in items):  # one pass per setting asked for in this batch
            idx = [i for i, (_, o) in enumerate(items) if o == options]
            probs, maps, ms = self._run(np.stack([items[i][0] for i in idx]), options)
            for j, i in enumerate(idx):
                out[i] = {"probs": probs[j], "maps": None if maps is None else maps[j], "compute_ms": ms,
                          "batch": len(inputs)}
        return out


# --------------------------------------------------------------------------- metrics
ROUTES = ("/v1/predict", "/v1/info", "/healthz", "/docs", "/openapi.json", "/v2/health/live", "/v2/health/ready",
          "/v2/models/skinray", "/v2/models/skinray/ready", "/v2/models/skinray/infer")
OPEN_ROUTES = ("/healthz", "/v2/health/live", "/v2/health/ready")  # liveness and readiness probes: no API key
LATENCY_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000]


class AppMetrics:
    """The app's own metrics, through ray.serve.metrics (so they reach Ray's Prometheus endpoint with
    the deployment, replica and application tags): requests by route and status, latencies end to end,
    per member and of the explanation, answers by class, and the uncertain and degraded ones. Names
    carry Ray's `ray_` prefix on the endpoint (`ray_skinray_requests_total`)."""

    def __init__(self, members: List[str]) -> None:
        from ray.serve import metrics
        self.requests = metrics.Counter("skinray_requests_total", description="HTTP requests by route and status",
                                        tag_keys=("route", "status"))
        self.latency = metrics.Histogram("skinray_request_latency_ms", description="end-to-end latency in the "
                                         "ingress, by route", boundaries=LATENCY_MS, tag_keys=("route",))
        self.member_latency = metrics.Histogram("skinray_member_compute_ms", description="a member's compute time "
                                                "for the batch that held the request", boundaries=LATENCY_MS,
                                                tag_keys=("member",))
        self.explanation = metrics.Histogram("skinray_explanation_ms", description="ensemble map, overlay and "
                                             "response after the members answered", boundaries=LATENCY_MS)
        self.answers = metrics.Counter("skinray_answers_total", description="answers by predicted class (the "
                                       "class mix: watch it for drift)", tag_keys=("class",))
        self.uncertain = metrics.Counter("skinray_uncertain_total", description="answers flagged uncertain")
        self.degraded = metrics.Counter("skinray_degraded_total", description="answers from fewer than all members")
        self.members = set(members)

    def request(self, path: str, status: int, ms: float) -> None:
        route = path if path in ROUTES else "other"  # bounded label values
        self.requests.inc(1, tags={"route": route, "status": str(status)})
        self.latency.observe(ms, tags={"route": route})

    def answer(self, answer: Dict[str, Any], member_ms: Dict[str, float], explanation_ms: Optional[float]) -> None:
        self.answers.inc(1, tags={"class": answer["class"]})
        if answer.get("uncertain"):
            self.uncertain.inc(1)
        if answer.get("degraded"):
            self.degraded.inc(1)
        for name, ms in member_ms.items():
            self.member_latency.observe(ms, tags={"member": name})
        if explanation_ms is not None:
            self.explanation.observe(explanation_ms)


# --------------------------------------------------------------------------- Open Inference Protocol
OIP_MODEL = "skinray"
OIP_OUTPUTS = ("probabilities", "class", "uncertain", "gradcam")


def oip_parse(body: bytes, header_length: Optional[str]) -> Tuple[Dict[str, Any], bytes]:
    """An OIP infer request -> (its JSON, the image's bytes). The image is the one BYTES element of input
    "image": base64 in JSON `data`, or raw with the binary tensor extension (the JSON's length in the
    Inference-Header-Content-Length header, then each element as a 4-byte little-endian length and its
    bytes). Anything else is an ApiError saying what is expected."""
    import json
    import struct
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


# --------------------------------------------------------------------------- ingress
class Variant:
    """One bundle the ingress serves (the stable one, or a candidate beside it): its ensemble's arithmetic
    (skin.ensemble.Predictor.remote: weights, temperature, the maps' work size) and its member deployments."""

    def __init__(self, role: str, bundle_dir: str, handles: Dict[str, DeploymentHandle], uncertain_below: float) -> None:
        from skin.bundle import Bundle
        from skin.ensemble import Predictor
        self.role = role
        self.bundle = Bundle.load(bundle_dir)
        self.handles = dict(handles)
        self.ensemble = Predictor.remote(self.bundle, uncertain_below)
        self.data_configs = {e.name: e.data_config for e in self.bundle.members}
        self.checked = set()  # (member, layer) pairs a request named that exist

    def check_layers(self, explain: Dict[str, Dict[str, Any]]) -> None:
        """The layers a request names exist in their members (ExplanationError), checked once per pair."""
        new = {n: o for n, o in explain.items() if o.get("layer") and (n, o["layer"]) not in self.checked}
        if new:
            self.bundle.check_explain(new)
            self.checked |= {(n, o["layer"]) for n, o in new.items()}


api = FastAPI(title="skinray", version="1",
              description="Six-class skin-lesion ensemble with Grad-CAM. Decision support, not a diagnosis.")


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        self.status, self.code, self.message = status, code, message


def _error(status: int, code: str, message: str, request_id: str = "") -> JSONResponse:
    # Serve's proxy echoes (or assigns) X-Request-ID on every response; we only quote it.
    return JSONResponse({"error": {"code": code, "message": message, "request_id": request_id}},
                        status_code=status)


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError):
    return _error(exc.status, exc.code, exc.message, getattr(request.state, "request_id", ""))


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    parts = []
    for e in exc.errors():
        where = ".".join(str(p) for p in e.get("loc", ()) if p not in ("body",))
        parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
    msg = "; ".join(parts) or "invalid request"
    if any(e.get("loc", (None, None))[-1] == "file" for e in exc.errors()):
        msg += " (send the image as multipart/form-data field 'file')"
    return _error(422, "invalid_request", msg, getattr(request.state, "request_id", ""))


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    codes = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}
    return _error(exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail),
                  getattr(request.state, "request_id", ""))


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception):
    rid = getattr(request.state, "request_id", "")
    logger.exception("request %s failed", rid)
    return _error(500, "internal_error", f"the server failed on this request; quote request id {rid} "
                  "when reporting it", rid)


class MemberView(BaseModel):
    probabilities: Dict[str, float]
    top_class: str
    weight: float


class GradcamView(BaseModel):
    model_config = {"populate_by_name": True}
    class_: str = Field(..., alias="class")
    overlay_png: str = Field(..., description="base64 PNG: the map blended on the upload (aspect kept)")
    map_png: str = Field(..., description="base64 8-bit grey PNG of the raw [0,1] map, for re-blending")
    maps_png: Optional[Dict[str, str]] = Field(None, description="every class's raw map (all_classes=true)")


class PredictResponse(BaseModel):
    model_config = {"populate_by_name": True}
    class_: str = Field(..., alias="class")
    class_index: int
    confidence: float
    probabilities: Dict[str, float]
    members: Dict[str, MemberView]
    uncertain: bool
    uncertain_reasons: List[str]
    degraded: bool = False
    missing_members: List[str] = []
    gradcam: Optional[GradcamView] = None
    bundle: str
    timings_ms: Dict[str, float]
    batch_sizes: Dict[str, int] = Field(default_factory=dict, description="per member: how many requests it "
                                        "computed together with this one (@serve.batch)")


class ErrorBody(BaseModel):
    code: str
    message: str
    request_id: str = ""


class ErrorResponse(BaseModel):
    error: ErrorBody


ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 404, 413, 415, 422, 503)}
V1_ERRORS = {s: ERRORS[s] for s in (400, 401, 413, 415, 422, 503)}


def prepare_inputs(data_configs: Dict[str, Any], image) -> Dict[str, np.ndarray]:
    """What the ingress sends each member: the resize half of its eval preset (uint8 CHW), once per
    distinct data config; the member applies the other half (skin.presets.eval_pixels)."""
    from skin.presets import eval_geometry
    prepared: Dict[Any, np.ndarray] = {}
    for cfg in data_configs.values():
        if cfg not in prepared:
            prepared[cfg] = eval_geometry(cfg)(image).numpy()
    return {name: prepared[cfg] for name, cfg in data_configs.items()}


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
@serve.ingress(api)
class Ensemble:
    def __init__(self, args: AppArgs, members: Dict[str, DeploymentHandle],
                 candidate: Optional[Dict[str, DeploymentHandle]] = None) -> None:
        import torch
        torch.set_num_threads(1)
        self.args = args  # validated once, by build_app
        self.stable = Variant("stable", self.args.bundle, members, self.args.uncertain_below)
        self.candidate = (Variant("candidate", self.args.candidate.bundle, candidate, self.args.uncertain_below)
                          if self.args.candidate and candidate else None)
        self.bundle = self.stable.bundle
        self.metrics = AppMetrics(self.bundle.member_names)
        self.limits = ImageLimits(max_bytes=self.args.max_upload_bytes, max_pixels=self.args.max_pixels,
                                  min_side=self.args.min_side)
        self.api_key = self.args.api_key or os.environ.get("SKINRAY_API_KEY") or None

        # Registered here, not at module level: Serve serves a frozen copy of `api` whose module-level
        # functions are pickled by value, so a module-level middleware cannot see this replica's key
        # (tried: the key was not enforced). A closure over `self` travels with the replica.
        @api.middleware("http")
        async def _request_context(request: Request, call_next):
            rid = request.headers.get("X-Request-ID") or uuid.uuid4().hex[:16]  # Serve's proxy sets it
            request.state.request_id = rid
            t0 = time.perf_counter()
            if self.api_key and request.url.path not in OPEN_ROUTES and not self._authorized(request):
                response = _error(401, "unauthorized", "missing or wrong API key: send it as the X-API-Key "
                                  "header (or Authorization: Bearer <key>)", rid)
            else:
                response = await call_next(request)
            ms = (time.perf_counter() - t0) * 1000
            self.metrics.request(request.url.path, response.status_code, ms)
            logger.info("request_id=%s %s %s -> %s in %.1f ms", rid, request.method, request.url.path,
                        response.status_code, ms)  # never image bytes
            return response

    def _authorized(self, request: Request) -> bool:
        given = request.headers.get("X-API-Key", "")
        auth = request.headers.get("Authorization", "")
        if not given and auth.lower().startswith("bearer "):
            given = auth[7:]
        return bool(given) and hmac.compare_digest(given.encode(), self.api_key.encode())

    @api.get("/healthz")
    async def healthz(self) -> Dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/info", responses={401: ERRORS[401]})
    async def info(self) -> Dict[str, Any]:
        from skin.explanation import COST_NOTE
        from skin.gradcam import method_name
        from skin.registry import get_spec
        b = self.bundle
        return {"bundle": b.id, "classes": list(b.classes), "untrained": b.untrained,
                "members": [{"name": e.name, "backbone": e.backbone, "weight": w, "temperature": e.temperature,
                             "input_size": e.data_config.input_size, "output_stride": e.output_stride}
                            | {f"cam_{k}": v for k, v in e.explanation.describe(
                                e.output_stride, get_spec(e.backbone).cam_layer).items() if k != "name"}
                            | {"explanation": e.explanation.describe(e.output_stride, get_spec(e.backbone).cam_layer)}
                            for e, w in zip(b.members, b.weights)],
                "explanation": method_name([e.explanation.method for e in b.members],
                                           [e.explanation.smooth for e in b.members]),
                "explanation_cost": COST_NOTE,
                "weights": self.stable.ensemble.weights, "ensemble_temperature": b.ensemble_temperature, "metrics": b.metrics, "provenance": b.provenance,
                "limits": {"max_upload_bytes": self.limits.max_bytes, "max_pixels": self.limits.max_pixels,
                           "min_side": self.limits.min_side, "formats": sorted(self.limits.formats)},
                "allow_degraded": self.args.allow_degraded, "uncertain_below": self.args.uncertain_below,
                "bundles": [v.bundle.id for v in self.variants()],
                "candidate": None if self.candidate is None else {
                    "bundle": self.candidate.bundle.id, "share": self.args.candidate.share,
                    "members": self.candidate.bundle.member_names, "weights": self.candidate.ensemble.weights,
                    "metrics": self.candidate.bundle.metrics, "untrained": self.candidate.bundle.untrained}}

    @api.post("/v1/predict", response_model=PredictResponse, response_model_by_alias=True, responses=V1_ERRORS)
    async def predict(self, request: Request, file: UploadFile = File(..., description="JPEG, PNG, WebP or HEIC/HEIF photograph"),
                      cam: bool = Query(True, description="include the Grad-CAM overlay"),
                      alpha: float = Query(0.4, ge=0.0, le=1.0, description="overlay opacity"),
                      all_classes: bool = Query(False, description="include every class's raw map"),
                      class_name: Optional[str] = Query(None, alias="class", description="explain this class instead"),
                      cam_stride: Optional[int] = Query(None, description="resolution of the Grad-CAM maps: 8, 16 "
                                                        "or 32 px of the member's input per map cell (default: the "
                                                        "bundle's, per member); the answer does not change"),
                      cam_layer: List[str] = Query([], description="MEMBER=LAYER: that member's maps at this layer "
                                                   "(e.g. resnet50=backbone.layer1; repeatable; default: the bundle's)"),
                      cam_method: Optional[str] = Query(None, description="gradcam or layercam, every member "
                                                        "(default: the bundle's, per member)"),
                      cam_smooth: Optional[str] = Query(None, description="flips: each member's maps averaged over the "
                                                        "image's four flips (4x the maps' cost); none: the image's own "
                                                        "maps (default: the bundle's, per member); the answer does not "
                                                        "change")):
        from skin.explanation import ExplanationError, parse_layers, requested
        t0 = time.perf_counter()
        variant, pinned = self._choose(request)
        try:
            explain = requested(variant.bundle.member_names, stride=cam_stride, method=cam_method, smooth=cam_smooth,
                                layers=parse_layers(cam_layer))
            await asyncio.to_thread(variant.check_layers, explain)
        except ExplanationError as e:
            raise ApiError(422, "invalid_request", str(e)) from None
        if class_name is not None and class_name not in self.bundle.classes.names:
            raise ApiError(422, "invalid_request", f"unknown class {class_name!r}; one of {list(self.bundle.classes)}")
        form = await request.form()  # already parsed for `file`; Starlette caches it
        if len(form.getlist("file")) > 1:
            raise ApiError(422, "invalid_request", "send exactly one image per request in the 'file' field "
                           "(several images: one request each)")
        data = await file.read(self.limits.max_bytes + 1)
        return await self._routed(variant, pinned, data, t0, cam=cam, alpha=alpha, all_classes=all_classes,
                                  class_name=class_name, explain=explain)

    def variants(self) -> List["Variant"]:
        return [self.stable] + ([self.candidate] if self.candidate else [])

    def _choose(self, request: Request) -> Tuple["Variant", bool]:
        """The bundle that answers: the one the X-Skinray-Bundle header pins (stable, candidate or a bundle
        id), else the candidate for its share of requests; (variant, pinned)."""
        import random
        pin = request.headers.get("X-Skinray-Bundle")
        if pin:
            for v in self.variants():
                if pin in (v.role, v.bundle.id):
                    return v, True
            raise ApiError(422, "invalid_request", f"X-Skinray-Bundle {pin!r} names no bundle served here; one of "
                           + ", ".join(f"{v.role} ({v.bundle.id})" for v in self.variants()))
        if self.candidate and random.random() < self.args.candidate.share:
            return self.candidate, False
        return self.stable, False

    async def _routed(self, variant: "Variant", pinned: bool, data: bytes, t0: float, **kwargs) -> Dict[str, Any]:
        """The chosen bundle's answer; a candidate that cannot answer an unpinned request leaves it to the
        stable bundle (its failure never fails a stable answer)."""
        try:
            return await self._predict(variant, data, t0, **kwargs)
        except ApiError as e:
            if variant is self.stable or pinned or e.status != 503:
                raise
            logger.warning("candidate %s failed (%s); answering with the stable bundle", variant.bundle.id, e.message)
            kwargs["explain"] = {}  # the options were checked against the candidate's members
            return await self._predict(self.stable, data, t0, **kwargs)

    async def _predict(self, variant: "Variant", data: bytes, t0: float, cam: bool = True, alpha: float = 0.4,
                       all_classes: bool = False, class_name: Optional[str] = None,
                       explain: Optional[Dict[str, Dict[str, Any]]] = None, render: bool = True) -> Dict[str, Any]:
        """One upload's answer by `variant`'s bundle (the /v1/predict JSON); `render=False` keeps the raw
        ensemble map and makes no PNGs (the /v2 route returns the map as a tensor)."""
        from skin.images import ImageError, load_image
        explain = explain or {}
        try:
            image = await asyncio.to_thread(load_image, data, self.limits)
        except ImageError as e:
            raise ApiError(e.status, e.code, str(e)) from None
        t_decode = time.perf_counter()
        inputs = await asyncio.to_thread(prepare_inputs, variant.data_configs, image)
        # without `cam` the members compute no maps; `explain` overrides each one's stored Explanation
        options = {n: (cam, tuple(sorted(explain.get(n, {}).items()))) for n in inputs}
        results, missing = await self._fan_out(variant, {n: x if options[n] == DEFAULT_OPTIONS else (x, options[n])
                                                         for n, x in inputs.items()})
        t_members = time.perf_counter()
        # maps, overlay and PNG encoding off the event loop, so other requests keep flowing
        answer = await asyncio.to_thread(self._answer, variant, results, missing, image, cam, alpha, all_classes,
                                         class_name, render)
        t_end = time.perf_counter()
        answer["batch_sizes"] = {n: int(r["batch"]) for n, r in results.items()}
        answer["timings_ms"] = {"decode": (t_decode - t0) * 1e3, "members": (t_members - t_decode) * 1e3,
                                "gradcam_and_response": (t_end - t_members) * 1e3, "total": (t_end - t0) * 1e3,
                                **{f"{n}_compute": r["compute_ms"] for n, r in results.items()}}
        self.metrics.answer(answer, {n: r["compute_ms"] for n, r in results.items()},
                            (t_end - t_members) * 1e3 if cam else None)
        return answer

    # ------------------------------------------------------------------ Open Inference Protocol (KServe v2)
    @api.get("/v2/health/live")
    async def oip_live(self) -> Dict[str, bool]:
        return {"live": True}

    @api.get("/v2/health/ready")
    async def oip_ready(self) -> Dict[str, bool]:
        return {"ready": True}

    @api.get("/v2")
    async def oip_server(self) -> Dict[str, Any]:
        return {"name": "skinray", "version": "1", "extensions": ["binary_tensor_data"]}

    @api.get("/v2/models/{model}", responses={s: ERRORS[s] for s in (401, 404)})
    async def oip_model(self, model: str) -> Dict[str, Any]:
        self._oip_check_model(model)
        c = len(self.bundle.classes)
        return {"name": OIP_MODEL, "versions": [self.bundle.id], "platform": "skinray",
                "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                            "parameters": {"content": "one photograph's file bytes (JPEG, PNG, WebP, HEIC/HEIF); "
                                           "base64 in JSON, raw with the binary tensor extension"}}],
                "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [c]},
                            {"name": "class", "datatype": "BYTES", "shape": [1]},
                            {"name": "uncertain", "datatype": "BOOL", "shape": [1]},
                            {"name": "gradcam", "datatype": "FP32", "shape": [-1, -1]}],
                "parameters": {"classes": list(self.bundle.classes), "bundle": self.bundle.id,
                               "gradcam": "the ensemble map of the answered class at the members' input size, "
                                          "[0, 1]; only when asked for (an `outputs` entry or parameter cam=true)"}}

    @api.get("/v2/models/{model}/ready", responses={s: ERRORS[s] for s in (401, 404)})
    async def oip_model_ready(self, model: str) -> Dict[str, Any]:
        self._oip_check_model(model)
        return {"name": OIP_MODEL, "ready": True}

    @api.post("/v2/models/{model}/infer", responses={s: ERRORS[s] for s in ERRORS})
    async def oip_infer(self, model: str, request: Request) -> Dict[str, Any]:
        t0 = time.perf_counter()
        self._oip_check_model(model)
        body = await request.body()
        if len(body) > self.limits.max_bytes * 4 // 3 + 65536:  # base64 in JSON: 4/3 of the file
            raise ApiError(413, "too_large", f"the request is {len(body)} bytes; the image may be at most "
                           f"{self.limits.max_bytes} bytes")
        req, data = oip_parse(body, request.headers.get("inference-header-content-length"))
        names = {o.get("name") for o in req.get("outputs") or [] if isinstance(o, dict)}
        unknown = names - set(OIP_OUTPUTS)
        if unknown:
            raise ApiError(422, "invalid_request", f"unknown output(s) {sorted(unknown)}; the outputs are "
                           f"{', '.join(OIP_OUTPUTS)}")
        params = req.get("parameters") or {}
        cam = "gradcam" in names or params.get("cam") is True
        variant, pinned = self._choose(request)
        answer = await self._routed(variant, pinned, data, t0, cam=cam, render=False)
        probs = [answer["probabilities"][c] for c in self.bundle.classes]
        outputs = [{"name": "probabilities", "datatype": "FP32", "shape": [len(probs)], "data": probs},
                   {"name": "class", "datatype": "BYTES", "shape": [1], "data": [answer["class"]]},
                   {"name": "uncertain", "datatype": "BOOL", "shape": [1], "data": [bool(answer["uncertain"])]}]
        if cam:
            m = answer["gradcam"]["map"]
            outputs.append({"name": "gradcam", "datatype": "FP32", "shape": list(m.shape),
                            "data": [round(float(v), 6) for v in m.ravel()]})
        if names:
            outputs = [o for o in outputs if o["name"] in names]
        return {"model_name": OIP_MODEL, "model_version": answer["bundle"], "id": str(req.get("id", "")),
                "outputs": outputs, "parameters": {"bundle": answer["bundle"], "degraded": bool(answer["degraded"]),
                                                   "explained_class": (answer.get("gradcam") or {}).get("class", "")}}

    def _oip_check_model(self, model: str) -> None:
        if model != OIP_MODEL:
            raise ApiError(404, "not_found", f"model {model!r} is not served here; the model is {OIP_MODEL!r}")

    async def _fan_out(self, variant: "Variant", inputs: Dict[str, np.ndarray]):
        async def call(name):
            return await asyncio.wait_for(variant.handles[name].predict.remote(inputs[name]),
                                          timeout=self.args.member_timeout_s)
        names = list(variant.handles)
        outs = await asyncio.gather(*(call(n) for n in names), return_exceptions=True)
        results, missing = {}, []
        for n, o in zip(names, outs):
            if isinstance(o, BaseException):
                logger.warning("member %s failed: %s: %s", n, type(o).__name__, o)
                missing.append(n)
            else:
                results[n] = o
        if missing and (not self.args.allow_degraded or not results):
            raise ApiError(503, "member_unavailable",
                           f"model member(s) {missing} did not answer; retry shortly. The service is "
                           "restarting them" + ("" if self.args.allow_degraded else
                                                " (degraded answers are disabled on this server)"))
        return results, missing

    def _answer(self, variant, results, missing, image, cam, alpha, all_classes, class_name, render=True) -> Dict[str, Any]:
        import torch
        from skin.images import display_copy
        from skin.render import map_image, overlay, png_bytes

        def b64(img) -> str:
            return base64.b64encode(png_bytes(img)).decode("ascii")
        disp = display_copy(image, self.args.overlay_max_side) if cam and render else None
        size = ((disp.size[1], disp.size[0]) if render else variant.ensemble.work) if cam else None
        out = variant.ensemble.answer({n: r["probs"] for n, r in results.items()},
                                   member_maps={n: torch.from_numpy(r["maps"]) for n, r in results.items()} if cam else None,
                                   size=size, class_name=class_name, all_classes=all_classes, missing=missing)
        if cam and not render:
            return out
        if cam:
            g = out["gradcam"]
            out["gradcam"] = {"class": g["class"], "overlay_png": b64(overlay(disp, g["map"], alpha)),
                              "map_png": b64(map_image(g["map"]))}
            if all_classes:
                out["gradcam"]["maps_png"] = {c: b64(map_image(m)) for c, m in g["maps"].items()}
        return out


# --------------------------------------------------------------------------- builder
def build_app(args: AppArgs):
    """Typed application builder: `serve run serve_app:app bundle=...` or a Serve config file."""
    from skin.bundle import Bundle
    if isinstance(args, dict):
        args = AppArgs.model_validate(args)
    bundle = Bundle.load(args.bundle)  # fail at deploy time, with the reason, on a bad bundle
    handles = _member_deployments(bundle, args.members, "")
    candidate = None
    if args.candidate:
        other = Bundle.load(args.candidate.bundle)
        bundle.classes.check_same(other.classes, "class maps of the stable and the candidate bundle")
        candidate = _member_deployments(other, args.candidate.members, "candidate-")
    ingress_opts: Dict[str, Any] = {"num_cpus": args.ingress_cpus}
    if args.ingress_resources:
        ingress_opts["resources"] = dict(args.ingress_resources)
    from ray.serve.config import BackpressureConfig
    return Ensemble.options(num_replicas=args.ingress_replicas, ray_actor_options=ingress_opts,
                            max_ongoing_requests=args.max_ongoing_requests,
                            max_queued_requests=args.max_queued_requests,
                            backpressure_config=BackpressureConfig(status_code=503, retry_after_s=args.retry_after_s),
                            ).bind(args=args, members=handles, candidate=candidate)


def _member_deployments(bundle, options: Dict[str, "MemberOptions"], prefix: str) -> Dict[str, Any]:
    """One MemberModel deployment per bundle member (named `prefix` + member), bound to its options."""
    unknown = set(options) - set(bundle.member_names)
    if unknown:
        raise ValueError(f"members {sorted(unknown)} are not in the bundle; it has {bundle.member_names}")
    handles = {}
    for name in bundle.member_names:
        o = options.get(name, MemberOptions())
        opts: Dict[str, Any] = {"num_cpus": o.num_cpus}
        if o.num_gpus:
            opts["num_gpus"] = o.num_gpus
        if o.resources:
            opts["resources"] = dict(o.resources)
        scale: Dict[str, Any] = ({"autoscaling_config": o.autoscaling.model_dump()} if o.autoscaling
                                 else {"num_replicas": o.replicas})
        handles[name] = MemberModel.options(
            name=prefix + name, ray_actor_options=opts, **scale,
            user_config={"fault_drill": o.fault_drill},
        ).bind(bundle_dir=str(bundle.root.resolve()), name=name, num_cpus=o.num_cpus, max_batch_size=o.max_batch_size,
               batch_wait_timeout_s=o.batch_wait_timeout_s, threads=o.threads, amp=o.amp, graphs=o.graphs)
    return handles


app = build_app  # `serve run serve_app:app bundle=...`
