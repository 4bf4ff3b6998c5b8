"""The service's typed settings: what `serve run serve_app:app bundle=...` and a Serve config's `args` take.

Two kinds of setting, kept apart because Ray Serve treats them differently:

- what a replica is built from (the bundles, each member's resources, batching, precision): a change
  restarts the replicas it concerns (each deployment's `version` is a hash of it and of the code);
- what the ingress only consults per request (`IngressSettings`: the API key, degraded mode, time-outs,
  upload limits, the latency budget, the canary's share): sent as the ingress's Serve `user_config`,
  so a change is applied in place (`reconfigure`) without restarting a replica.
"""
from typing import Dict, List, Literal, Optional

from pydantic import BaseModel, Field

from skin.images import ImageLimits  # torch-free: the one definition of the upload limits

_LIMITS = ImageLimits()
DEFAULT_MEMBER_CPUS = 0.5  # Serve replicas default to 1 CPU: three of them never fit 2 cores


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

    @property
    def parallel(self) -> int:
        """Replicas that answer at once (the autoscaler's floor: what is surely there)."""
        return self.autoscaling.min_replicas if self.autoscaling else self.replicas


class CandidateArgs(BaseModel):
    """A second bundle served beside the stable one (a canary): its own member deployments."""
    bundle: str = Field(..., description="the candidate bundle's folder (the same class map as the stable one)")
    share: float = Field(0.0, ge=0, le=1, description="share of the requests without a pin that the candidate "
                         "answers; pin one with the header X-Skinray-Bundle: stable|candidate|<bundle id>")
    members: Dict[str, MemberOptions] = Field(default_factory=dict, description="per-member overrides by name")


class IngressSettings(BaseModel):
    """What the ingress consults per request: its Serve `user_config`, changed in place on redeploy. A
    user_config gives any of these; the rest keep the builder's arguments (`AppArgs`)."""
    model_config = {"extra": "forbid"}
    api_key: Optional[str] = None
    allow_degraded: bool = False
    retry_after_s: float = 2.0
    member_timeout_s: float = 30.0
    occlusion_timeout_s: float = 300.0
    uncertain_below: float = 0.5
    overlay_max_side: int = 1024
    max_upload_bytes: int = _LIMITS.max_bytes
    max_pixels: int = _LIMITS.max_pixels
    min_side: int = _LIMITS.min_side
    latency_budget: float = 2.0
    candidate_share: float = 0.0

    def limits(self) -> ImageLimits:
        return ImageLimits(max_bytes=self.max_upload_bytes, max_pixels=self.max_pixels, min_side=self.min_side)


class AppArgs(BaseModel):
    bundle: str = Field(..., description="bundle folder (must be readable from every node)")
    members: Dict[str, MemberOptions] = Field(default_factory=dict, description="per-member overrides by name")
    candidate: Optional[CandidateArgs] = Field(None, description="a candidate bundle beside this one (canary)")
    ingress_cpus: float = Field(0.25, gt=0)
    ingress_replicas: int = Field(1, ge=1)
    latency_budget: float = Field(2.0, ge=1, description="admission: a request is refused within 0.1 s (503 + Retry-After) "
                                  "unless the work already admitted lets it finish within this multiple of its own "
                                  "latency on an idle service, measured per kind of request (service.admission)")
    max_ongoing_requests: int = Field(64, ge=1, description="requests an ingress replica holds at once (admitted or "
                                      "being refused); a backstop behind the latency budget")
    max_queued_requests: int = Field(64, ge=1, description="requests waiting for an ingress replica beyond "
                                     "max_ongoing_requests; past that Serve answers 503 with Retry-After at once")
    retry_after_s: float = Field(2.0, ge=0, description="the Retry-After of Serve's own overload 503 (the latency "
                                 "budget's 503s give the time the admitted work needs)")
    ingress_resources: Dict[str, float] = Field(default_factory=dict, description="custom Ray resources of the "
                                                "ingress, to pin it (e.g. to the head: {head: 0.01})")
    records_url: Optional[str] = Field(None, description="where every answer is recorded (skin.records): any "
                                       "SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db for several ingress "
                                       "replicas on several nodes; default SQLite in the state folder "
                                       "($SKINRAY_STATE_DIR, else ~/.local/state/skinray/records.sqlite)")
    records: bool = Field(True, description="record every answer (no image bytes: the photograph's SHA-256)")
    photos_dir: Optional[str] = Field(None, description="keep the photograph of a request that says the patient "
                                      "consented (consent=true), content-addressed in this folder; unset: no "
                                      "photograph is ever kept")
    max_upload_bytes: int = Field(_LIMITS.max_bytes, gt=0, description="default: skin.images.ImageLimits")
    max_pixels: int = Field(_LIMITS.max_pixels, gt=0)
    min_side: int = Field(_LIMITS.min_side, ge=1)
    api_key: Optional[str] = Field(None, description="require X-API-Key (or Bearer) on every route but the probes; "
                                   "default: $SKINRAY_API_KEY when set")
    allow_degraded: bool = Field(False, description="answer from the remaining members when one fails")
    member_timeout_s: float = Field(30.0, gt=0)
    uncertain_below: float = Field(0.5, ge=0, le=1)
    overlay_max_side: int = Field(1024, ge=64, description="overlay/map PNGs are at most this size (aspect kept)")

    def settings(self) -> IngressSettings:
        """The ingress's per-request settings as these arguments give them (its user_config's defaults)."""
        shared = {k: getattr(self, k) for k in IngressSettings.model_fields if k in type(self).model_fields}
        return IngressSettings(**shared, candidate_share=self.candidate.share if self.candidate else 0.0)

    def parallel(self, members: List[str]) -> float:
        """The members' replicas that surely answer at once, per ingress replica (service.admission)."""
        return min(self.members[n].parallel if n in self.members else 1 for n in members) / self.ingress_replicas


# AppArgs fields that are the ingress's per-request settings (IngressSettings), and its Serve deployment options
# that Serve changes in place: neither is what replicas are built from
RUNTIME_ARGS = tuple(k for k in IngressSettings.model_fields if k in AppArgs.model_fields)
INGRESS_OPTIONS = ("max_ongoing_requests", "max_queued_requests")


def serve_application(args: AppArgs, members: List[str], candidate_members: Optional[List[str]] = None,
                      name: str = "skinray", route_prefix: str = "/") -> dict:
    """The Serve config's application entry for `args` (what `serve deploy` takes), split so that a redeploy
    changing only per-request settings is applied in place: `args` holds what the replicas are built from;
    the ingress's settings and the members' fault drills go in `deployments` as their `user_config`, beside
    the ingress's queue bounds (Serve hashes `args` into the application's code version: any change there
    restarts every replica). `members` / `candidate_members`: the bundles' member names."""
    built = args.model_dump(exclude=set(RUNTIME_ARGS) | set(INGRESS_OPTIONS), exclude_defaults=True)
    for opts in [*built.get("members", {}).values(), *(built.get("candidate") or {}).get("members", {}).values()]:
        opts.pop("fault_drill", None)
    if built.get("candidate"):
        built["candidate"].pop("share", None)
    ingress = {"name": "Ensemble", "max_ongoing_requests": args.max_ongoing_requests,
               "max_queued_requests": args.max_queued_requests,
               "backpressure_config": {"status_code": 503, "retry_after_s": args.retry_after_s},
               "user_config": args.settings().model_dump()}
    deployments = [ingress]
    for prefix, names, options in (("", members, args.members),
                                   ("candidate-", candidate_members or [], args.candidate.members if args.candidate else {})):
        deployments += [{"name": prefix + n, "user_config": {"fault_drill": options.get(n, MemberOptions()).fault_drill}}
                        for n in names]
    return {"name": name, "route_prefix": route_prefix, "import_path": "serve_app:app", "args": built,
            "deployments": deployments}
