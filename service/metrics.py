"""The app's own metrics, through ray.serve.metrics (so they reach Ray's Prometheus endpoint with the
deployment, replica and application tags): requests by route and status, latencies end to end, per
member and of the explanation, answers by class, the uncertain and degraded ones, and requests refused
by admission. Names carry Ray's `ray_` prefix on the endpoint (`ray_skinray_requests_total`)."""
from typing import Any, Dict, List, Optional

V2_MODEL = "/v2/models/skinray"
ROUTES = ("/v1/predict", "/v1/info", "/v1/feedback", "/v1/review-queue", "/healthz", "/docs", "/openapi.json", "/v2", "/v2/health/live",
          "/v2/health/ready", V2_MODEL, V2_MODEL + "/ready", V2_MODEL + "/infer")
LATENCY_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000]


def route_label(path: str) -> str:
    """A bounded label for a path: the route it matched, versioned OIP routes folded onto theirs."""
    if path.startswith(V2_MODEL + "/versions/"):
        rest = path[len(V2_MODEL + "/versions/"):].partition("/")[2]
        path = V2_MODEL + ("/" + rest if rest else "")
    return path if path in ROUTES else "other"


class AppMetrics:
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
        self.refused = metrics.Counter("skinray_refused_total", description="requests refused within 0.1 s because the "
                                       "admitted work fills the latency budget (503 busy)", tag_keys=("cam",))
        self.in_flight = metrics.Gauge("skinray_admitted_in_flight", description="requests admitted and not yet "
                                       "answered by this ingress replica")
        self.records_failed = metrics.Counter("skinray_records_failed_total", description="attempts to write "
                                              "answer records that failed (the rows stay pending and are retried)")
        self.records_lost = metrics.Counter("skinray_records_lost_total", description="answer records given up "
                                            "past the writer's max_pending while the store was down")
        self.records_pending = metrics.Gauge("skinray_records_pending", description="answer records waiting to "
                                             "be written by this ingress replica")
        self.reviews = metrics.Counter("skinray_reviews_total", description="reviews by the answered class and "
                                       "whether the reviewer agreed with it (agreement per class over time)",
                                       tag_keys=("class", "agreed"))
        self.members = set(members)

    def records(self, what: str, n: int) -> None:
        """The record writer's news (service.records): failed attempts, rows lost, rows pending."""
        if what == "failed":
            self.records_failed.inc(n)
        elif what == "lost":
            self.records_lost.inc(n)
        else:
            self.records_pending.set(n)

    def review(self, answered: str, agreed: bool) -> None:
        self.reviews.inc(1, tags={"class": answered, "agreed": str(agreed).lower()})

    def request(self, path: str, status: int, ms: float) -> None:
        route = route_label(path)
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
