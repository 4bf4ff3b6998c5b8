"""Which bundle answers a request: the stable one, or a candidate served beside it (a canary).

A request pins one with the header `X-Skinray-Bundle: stable | candidate | <bundle id>` (or, on the Open
Inference Protocol, by asking for a model version: the version is the bundle id); otherwise the candidate
answers its share of the requests."""
import random
from typing import Optional, Sequence, Tuple, TypeVar

from .errors import ApiError

V = TypeVar("V")  # a Variant: has .role and .bundle.id


def choose(variants: Sequence[V], pin: Optional[str], share: float,
           rng: random.Random = random._inst) -> Tuple[V, bool]:  # type: ignore[attr-defined]
    """(the variant that answers, whether the request pinned it). `variants[0]` is the stable one."""
    if pin:
        for v in variants:
            if pin in (v.role, v.bundle.id):
                return v, True
        raise ApiError(422, "invalid_request", f"X-Skinray-Bundle {pin!r} names no bundle served here; one of "
                       + ", ".join(f"{v.role} ({v.bundle.id})" for v in variants))
    if len(variants) > 1 and rng.random() < share:
        return variants[1], False
    return variants[0], False


def by_version(variants: Sequence[V], model: str, version: str) -> V:
    """The variant whose bundle id is the Open Inference Protocol model version asked for (404 otherwise)."""
    for v in variants:
        if v.bundle.id == version:
            return v
    raise ApiError(404, "not_found", f"model {model!r} has no version {version!r}; its versions are "
                   + ", ".join(v.bundle.id for v in variants))
