"""The skinray Ray Serve application: one deployment per ensemble member behind an ensemble ingress.

    serve run serve_app:app bundle=/path/to/bundle            # local, one command
    serve deploy cluster/serve_config.yaml                     # on a running cluster

HTTP API (OpenAPI at /docs): POST /v1/predict, GET /v1/info, GET /healthz; the same model through the Open
Inference Protocol (KServe v2) under /v2. The application lives in the `service` package, one concern per
module (its docstring lists them); this file is the entry point a Serve config names.
"""
from service import AppArgs, Autoscaling, CandidateArgs, Ensemble, MemberModel, MemberOptions, app, build_app

__all__ = ["AppArgs", "Autoscaling", "CandidateArgs", "Ensemble", "MemberModel", "MemberOptions", "app", "build_app"]
