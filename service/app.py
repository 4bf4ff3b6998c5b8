"""The ingress deployment and the typed application builder.

`Ensemble` is the FastAPI ingress (its routes: service.v1 and service.v2, over one service.dataplane);
each bundle member is its own deployment (service.members). The ingress's per-request settings are its
Serve `user_config` (`reconfigure`): set under the Serve config's `deployments: [{name: Ensemble,
user_config: ...}]`, a new API key, degraded mode, time-out, latency budget or canary share is applied to
the running replica in place (Serve hashes an application's `args` into its code version, so a change
there restarts every replica). The builder's arguments give their defaults.
"""
import hmac
import logging
import os
import time
import uuid
from typing import Any, Dict, Optional

from fastapi import FastAPI, Request
from ray import serve

from . import v1, v2
from .config import AppArgs, IngressSettings
from .errors import ApiError, error_response, install_handlers
from .members import member_deployments

logger = logging.getLogger("ray.serve")

OPEN_ROUTES = ("/healthz", "/v2/health/live", "/v2/health/ready")  # liveness and readiness probes: no API key

api = FastAPI(title="skinray", version="1",
              description="Six-class skin-lesion ensemble with Grad-CAM. Decision support, not a diagnosis.")
install_handlers(api)
api.include_router(v1.router)
api.include_router(v2.router)


@api.middleware("http")
async def _request_context(request: Request, call_next):
    """Every request: its id, the API key, its metrics and a log line. Serve serves a frozen copy of `api`
    made when the ingress class is defined, so this asks Serve for the replica's ingress object (as Serve's
    own class-based views do) rather than holding one."""
    return await serve.get_replica_context().servable_object.handle(request, call_next)


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
@serve.ingress(api)
class Ensemble(v1.V1Routes, v2.V2Routes):
    def __init__(self, bundle: str, members: Dict[str, Any], candidate_bundle: Optional[str] = None,
                 candidate: Optional[Dict[str, Any]] = None, defaults: Optional[Dict[str, Any]] = None,
                 parallel: float = 1.0, records: Optional[Dict[str, Any]] = None) -> None:
        import torch
        from .dataplane import DataPlane, Variant
        from .metrics import AppMetrics
        torch.set_num_threads(1)
        stable = Variant("stable", bundle, members, 0.5)
        other = Variant("candidate", candidate_bundle, candidate, 0.5) if candidate_bundle and candidate else None
        self.metrics = AppMetrics(stable.bundle.member_names)
        self.plane = DataPlane(stable, other, self.metrics)
        if records is not None:
            from .records import RecordWriter
            self.plane.records = RecordWriter(records.get("url"), records.get("photos_dir"),
                                              on_change=self.metrics.records)
        self.defaults, self.parallel = dict(defaults or {}), parallel
        self.api_key: Optional[str] = None
        self.reconfigure({})

    async def handle(self, request: Request, call_next):
        rid = request.headers.get("X-Request-ID") or uuid.uuid4().hex[:16]  # Serve's proxy sets it
        request.state.request_id = rid
        t0 = time.perf_counter()
        if self.api_key and request.url.path not in OPEN_ROUTES and not self._authorized(request):
            response = error_response(request, 401, "unauthorized", "missing or wrong API key: send it as the "
                                      "X-API-Key header (or Authorization: Bearer <key>)")
        elif request.method == "POST" and request.url.path == "/v1/predict":
            response = await self._admitted(request, call_next)
        else:
            response = await call_next(request)
        ms = (time.perf_counter() - t0) * 1000
        self.metrics.request(request.url.path, response.status_code, ms)
        logger.info("request_id=%s %s %s -> %s in %.1f ms", rid, request.method, request.url.path,
                    response.status_code, ms)  # never image bytes
        return response

    async def _admitted(self, request: Request, call_next):
        """/v1/predict through admission before its body is read: refused (503 busy) at once or after a short
        wait for room, or admitted and its ticket released whatever the route does with it."""
        try:
            ticket = await self.plane.admit(v1.predict_kind(request))
        except ApiError as e:
            return error_response(request, e.status, e.code, e.message, e.retry_after_s)
        request.state.ticket = ticket
        try:
            return await call_next(request)
        finally:
            self.plane.release(ticket, answered=False)  # a no-op when the answer released it

    def reconfigure(self, config: Dict[str, Any]) -> None:
        """The per-request settings (Serve user_config, over the builder's arguments), applied in place; an
        unknown or invalid setting fails the update with pydantic's message naming it."""
        settings = IngressSettings.model_validate(self.defaults | dict(config or {}))
        self.api_key = settings.api_key or os.environ.get("SKINRAY_API_KEY") or None
        self.plane.configure(settings, self.parallel)

    def _authorized(self, request: Request) -> bool:
        given = request.headers.get("X-API-Key", "")
        auth = request.headers.get("Authorization", "")
        if not given and auth.lower().startswith("bearer "):
            given = auth[7:]
        return bool(given) and hmac.compare_digest(given.encode(), self.api_key.encode())


def build_app(args: AppArgs):
    """Typed application builder: `serve run serve_app:app bundle=...` or a Serve config file."""
    from ray.serve.config import BackpressureConfig
    from skin.bundle import Bundle
    if isinstance(args, dict):
        args = AppArgs.model_validate(args)
    bundle = Bundle.load(args.bundle)  # fail at deploy time, with the reason, on a bad bundle
    handles = member_deployments(bundle, args.members, "")
    candidate, candidate_dir = None, None
    if args.candidate:
        other = Bundle.load(args.candidate.bundle)
        bundle.classes.check_same(other.classes, "class maps of the stable and the candidate bundle")
        candidate = member_deployments(other, args.candidate.members, "candidate-")
        candidate_dir = str(other.root.resolve())
    ingress_opts: Dict[str, Any] = {"num_cpus": args.ingress_cpus}
    if args.ingress_resources:
        ingress_opts["resources"] = dict(args.ingress_resources)
    records = {"url": args.records_url, "photos_dir": args.photos_dir} if args.records else None
    init = dict(bundle=str(bundle.root.resolve()), candidate_bundle=candidate_dir,
                defaults=args.settings().model_dump(), parallel=args.parallel(bundle.member_names), records=records)
    return Ensemble.options(
        num_replicas=args.ingress_replicas, ray_actor_options=ingress_opts,
        max_ongoing_requests=args.max_ongoing_requests, max_queued_requests=args.max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=args.retry_after_s),
        user_config=args.settings().model_dump(),
    ).bind(members=handles, candidate=candidate, **init)


app = build_app  # `serve run serve_app:app bundle=...`
