"""The skinray service on Ray Serve, one concern per module (the top-level serve_app.py re-exports it):

| module | what |
|---|---|
| `config` | typed builder arguments (`AppArgs`) and the ingress's per-request settings (its `user_config`) |
| `members` | one deployment per ensemble member; deployment versions |
| `admission` | admission by latency budget: refuse at once what cannot finish in time |
| `dataplane` | one request's path, protocol-independent: admit, decode, fan out, answer |
| `canary` | which bundle answers (stable, candidate, a pin, a model version) |
| `v1` | /v1/predict, /v1/info, /healthz and their data models |
| `v2` | the Open Inference Protocol (KServe v2) |
| `errors` | each protocol's error shape |
| `metrics` | the app's Prometheus metrics |
| `app` | the ingress deployment and the builder |
"""
from .app import Ensemble, api, app, build_app
from .config import AppArgs, Autoscaling, CandidateArgs, IngressSettings, MemberOptions
from .members import MemberModel

__all__ = ["AppArgs", "Autoscaling", "CandidateArgs", "Ensemble", "IngressSettings", "MemberModel",
           "MemberOptions", "api", "app", "build_app"]
