"""The /v1 API: POST /v1/predict (multipart upload), GET /v1/info, GET /healthz; its data models.

Routes are methods of `V1Routes`, which the ingress deployment inherits (Serve's class-based FastAPI
views find routes through the class's bases); they reach the dataplane as `self.plane`."""
import asyncio
import time
from typing import Any, Dict, List, Optional

from fastapi import APIRouter, File, Query, Request, Response, UploadFile
from pydantic import BaseModel, Field

from .errors import V1_ERRORS, ApiError

router = APIRouter()


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
    method: Optional[str] = Field(None, description="\"occlusion\" when asked for (cam_method=occlusion); absent "
                                  "for the bundle's own maps (/v1/info says which)")
    forwards: Optional[int] = Field(None, description="occlusion: forwards of every member the map took")


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
    request_id: str = Field("", description="this answer's id on record (also the X-Request-ID header): what "
                            "POST /v1/feedback names")
    photo_kept: bool = Field(False, description="the photograph was kept (the deployment keeps photographs and "
                             "the request said consent=true); otherwise only its SHA-256 is on record")


class Feedback(BaseModel):
    model_config = {"extra": "forbid"}
    request_id: str = Field(..., min_length=1, description="the answer's request id (its X-Request-ID)")
    reviewer: str = Field(..., min_length=1, description="who reviewed it")
    confirmed: bool = Field(False, description="true: the answer was right")
    right_class: Optional[str] = Field(None, description="the class it should have been (instead of confirmed)")
    note: str = Field("", max_length=4000)


def info(plane, settings) -> Dict[str, Any]:
    """What /v1/info says of the bundles served, their explanations, metrics and limits."""
    from skin.explanation import COST_NOTE
    from skin.gradcam import method_name
    from skin.registry import get_spec
    from skin.trust import bundle_verdict
    stable = plane.stable
    b = stable.bundle
    limits = plane.limits
    return {"bundle": b.id, "classes": list(b.classes), "untrained": b.untrained,
            "members": [{"name": e.name, "backbone": e.backbone, "weight": w, "temperature": e.temperature,
                         "input_size": e.data_config.input_size, "output_stride": e.output_stride}
                        | {"explanation": e.explanation.describe(e.output_stride, get_spec(e.backbone).cam_layer)}
                        for e, w in zip(b.members, b.weights)],
            "explanation": method_name([e.explanation.method for e in b.members],
                                       [e.explanation.smooth for e in b.members]),
            "explanation_cost": COST_NOTE,
            "explanation_trust": bundle_verdict(b.metrics),
            "weights": stable.ensemble.weights, "ensemble_temperature": b.ensemble_temperature,
            "metrics": b.metrics, "provenance": b.provenance,
            "limits": {"max_upload_bytes": limits.max_bytes, "max_pixels": limits.max_pixels,
                       "min_side": limits.min_side, "formats": sorted(limits.formats)},
            "allow_degraded": settings.allow_degraded, "uncertain_below": settings.uncertain_below,
            "admission": plane.admission.snapshot(),
            "records": None if plane.records is None else plane.records.snapshot(),
            "bundles": [v.bundle.id for v in plane.variants()],
            "candidate": None if plane.candidate is None else {
                "bundle": plane.candidate.bundle.id, "share": settings.candidate_share,
                "members": plane.candidate.bundle.member_names, "weights": plane.candidate.ensemble.weights,
                "metrics": plane.candidate.bundle.metrics, "untrained": plane.candidate.bundle.untrained}}


# query parameters that change what a /v1/predict request costs (admission keeps a cost per kind)
COST_PARAMS = ("cam", "all_classes", "cam_stride", "cam_layer", "cam_method", "cam_smooth")


def predict_kind(request) -> tuple:
    """The kind of a /v1/predict request, from its query and headers only: admitted (or refused) before its
    body is read, so a refusal costs the service next to nothing."""
    query = tuple(sorted((k, v) for k, v in request.query_params.multi_items() if k in COST_PARAMS))
    return (("route", "v1"), ("bundle", request.headers.get("X-Skinray-Bundle", "")), ("cam", dict(query).get("cam", "true")),
            ("query", query))


class V1Routes:
    """The /v1 routes and the liveness probe, over `self.plane` (service.dataplane.DataPlane)."""

    @router.get("/healthz")
    async def healthz(self) -> Dict[str, str]:
        return {"status": "ok"}

    @router.get("/v1/info", responses={401: V1_ERRORS[401]})
    async def info(self) -> Dict[str, Any]:
        return info(self.plane, self.plane.settings)

    @router.post("/v1/predict", response_model=PredictResponse, response_model_by_alias=True,
                 responses={s: V1_ERRORS[s] for s in (400, 401, 413, 415, 422, 503)})
    async def predict(self, request: Request,
                      file: UploadFile = File(..., description="JPEG, PNG, WebP or HEIC/HEIF photograph"),
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
                                                        "(default: the bundle's, per member); or occlusion: the "
                                                        "ensemble's own drop in probability as each patch is greyed "
                                                        "(226 forwards of every member: for a reviewer, where the "
                                                        "bundle's map is not shown to follow the model)"),
                      cam_smooth: Optional[str] = Query(None, description="flips: each member's maps averaged over the "
                                                        "image's four flips (4x the maps' cost); none: the image's own "
                                                        "maps (default: the bundle's, per member); the answer does not "
                                                        "change"),
                      consent: bool = Query(False, description="the patient consented to keeping this photograph: "
                                            "kept only where the deployment keeps photographs (photos_dir); "
                                            "otherwise only its SHA-256 is recorded"),
                      record: bool = Query(True, description="false: not an answer to keep (a reviewer re-drawing "
                                           "a recorded photograph's overlay); not recorded")):
        from skin.explanation import ExplanationError, parse_layers, requested
        from skin.occlusion import OCCLUSION
        t0 = time.perf_counter()
        variant, pinned = self.plane.choose(request.headers.get("X-Skinray-Bundle"))
        occlusion = cam_method == OCCLUSION
        if occlusion and (cam_stride or cam_layer or cam_smooth or all_classes or not cam):
            raise ApiError(422, "invalid_request", "cam_method=occlusion makes one map from the ensemble's answers: "
                           "drop cam_stride, cam_layer, cam_smooth, all_classes and cam=false")
        try:
            explain = {} if occlusion else requested(variant.bundle.member_names, stride=cam_stride, method=cam_method, smooth=cam_smooth,
                                layers=parse_layers(cam_layer))
            await asyncio.to_thread(variant.check_layers, explain)
        except ExplanationError as e:
            raise ApiError(422, "invalid_request", str(e)) from None
        if class_name is not None and class_name not in variant.bundle.classes.names:
            raise ApiError(422, "invalid_request", f"unknown class {class_name!r}; one of {list(variant.bundle.classes)}")
        form = await request.form()  # already parsed for `file`; Starlette caches it
        if len(form.getlist("file")) > 1:
            raise ApiError(422, "invalid_request", "send exactly one image per request in the 'file' field "
                           "(several images: one request each)")
        data = await file.read(self.plane.limits.max_bytes + 1)
        rid = request.state.request_id
        consent = consent and record
        if not record:
            rid = ""  # the answer carries no record id: nothing refers to it later
        if occlusion:
            out = await self.plane.occlusion(variant, data, t0, request.state.ticket, alpha=alpha,
                                             class_name=class_name, request_id=rid, consent=consent)
        else:
            out = await self.plane.answer(variant, pinned, data, t0, request.state.ticket, cam=cam, alpha=alpha,
                                          all_classes=all_classes, class_name=class_name, explain=explain,
                                          request_id=rid, consent=consent)
        return out | {"request_id": rid}

    @router.post("/v1/feedback", responses={s: V1_ERRORS[s] for s in (401, 404, 422, 503)})
    async def feedback(self, review: Feedback) -> Dict[str, Any]:
        """A reviewer's word on an answer: confirmed, or the class it should have been (skin.records)."""
        from skin.records import RecordError
        writer = self._writer()
        await asyncio.to_thread(writer.flush, 5.0)  # the answer reviewed may still be on its way to the store
        try:
            store = await asyncio.to_thread(writer.store)
            saved = await asyncio.to_thread(store.review, review.request_id, review.reviewer, review.confirmed,
                                            review.right_class, review.note, list(self.plane.stable.bundle.classes))
        except RecordError as e:
            raise ApiError(e.status, "not_found" if e.status == 404 else "invalid_request" if e.status == 422
                           else "records_unavailable", str(e)) from None
        self.plane.metrics.review(saved["answer_class"], saved["agreed"])
        return saved

    @router.get("/v1/records/{request_id}/photo", responses={s: V1_ERRORS[s] for s in (401, 404, 503)},
                response_class=Response)
    async def record_photo(self, request_id: str) -> Response:
        """A recorded answer's photograph, where it was kept with consent (to re-draw its overlay for a
        review: POST it to /v1/predict?record=false); 404 when there is no such answer or no photograph."""
        from skin.records import RecordError
        writer = self._writer()
        try:
            store = await asyncio.to_thread(writer.store)
            row = await asyncio.to_thread(store.answer, request_id)
        except RecordError as e:
            raise ApiError(503, "records_unavailable", str(e)) from None
        if row is None:
            raise ApiError(404, "not_found", f"no answer with request id {request_id!r} on record")
        path = writer.photos.path(row["photo"]) if row.get("photo") and writer.photos else None
        if path is None or not path.is_file():
            raise ApiError(404, "not_found", f"the photograph of {request_id!r} was not kept (no consent, or "
                           "this deployment keeps no photographs); only its SHA-256 is on record")
        data = await asyncio.to_thread(path.read_bytes)
        types = {".jpg": "image/jpeg", ".png": "image/png", ".webp": "image/webp", ".heic": "image/heic"}
        return Response(data, media_type=types.get(path.suffix, "application/octet-stream"))

    @router.get("/v1/review-queue", responses={s: V1_ERRORS[s] for s in (401, 503)})
    async def review_queue(self, limit: int = Query(50, ge=1, le=500),
                           why: Optional[str] = Query(None, pattern="^(uncertain|disputed)$",
                                                      description="only these: uncertain or disputed")
                           ) -> Dict[str, Any]:
        """Uncertain answers no review settled and disputed ones, oldest first, with their reviews; and the
        agreement of reviewers with the model per answered class."""
        from skin.records import RecordError
        writer = self._writer()
        try:
            store = await asyncio.to_thread(writer.store)
            queue = await asyncio.to_thread(store.queue, limit, why)
            agreement = await asyncio.to_thread(store.agreement)
        except RecordError as e:
            raise ApiError(503, "records_unavailable", str(e)) from None
        return {"queue": [_jsonable(q) for q in queue], "agreement": agreement}

    def _writer(self):
        if self.plane.records is None:
            raise ApiError(404, "not_found", "this deployment records no answers (records: false in its config)")
        return self.plane.records


def _jsonable(row: Dict[str, Any]) -> Dict[str, Any]:
    """A record for JSON: times as ISO strings, the photo's content address left out (not an URL)."""
    out = {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in row.items() if k != "photo"}
    out["has_photo"] = bool(row.get("photo"))
    if "reviews" in row:
        out["reviews"] = [_jsonable(r) for r in row["reviews"]]
    return out
