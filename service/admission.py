"""Admission sized to capacity: a request that cannot finish within its latency budget is refused at once
(503 + Retry-After), before it waits anywhere.

Each kind of request (which bundle, with or without maps, which explanation settings) has its own cost:
`alone`, its latency when nothing else was in flight (what it costs an idle service). The work in flight is
the sum of the `alone` of the requests admitted and not yet answered. A request is admitted when the work
in flight plus its own fits the current limit; an empty service admits any request, and a kind not yet
measured is admitted only into an empty service (so it is measured alone first).

The limit follows the latencies it causes (a gradient controller, as Envoy's adaptive concurrency filter
and Netflix's concurrency-limits): every `window` answers it compares their slowdown (latency ÷ the kind's
`alone`; the 95th percentile of the kind that fares worst) with the budget (default 2: twice an idle service's latency) and scales the
limit by the square root of budget ÷ slowdown (damped, at most x2 or ÷2 a step; grown only when the limit
was nearly reached, so a quiet period does not inflate it). Whatever lets requests run at once (members' batching, several replicas, the
ingress decoding one upload while members compute another) shows up as a slowdown below the budget and
raises the limit; a costly explanation counts as more work than a cheap one. No setting is tuned by hand.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Hashable

MAX_STEP = 2.0  # the most the limit changes in one window (x2 or ÷2)


@dataclass
class Ticket:
    """One admitted request: what it was admitted as, and whether another request was in flight at any
    time beside it (then its latency is not an idle service's)."""
    kind: Hashable
    cost: float
    shared: bool
    start: float


class Busy(Exception):
    """The service cannot start this request within its budget; retry after `retry_after_s`."""

    def __init__(self, retry_after_s: int, in_flight: int) -> None:
        super().__init__(f"the service is at capacity ({in_flight} request(s) in progress fill its latency "
                         f"budget); retry in {retry_after_s} s")
        self.retry_after_s, self.in_flight = retry_after_s, in_flight


class Admission:
    """Admission by latency budget (see the module's docstring). Thread-safe; one per ingress replica.

        ticket = admission.admit(kind)          # or raises Busy at once
        try: ... finally: admission.done(ticket, answered=...)
    """

    def __init__(self, budget: float = 2.0, parallel: float = 1.0, window: int = 8, weight: float = 0.3,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        if budget < 1:
            raise ValueError(f"the latency budget is a multiple of an idle request's latency, at least 1; got {budget}")
        self.budget, self.parallel, self.window, self.weight = float(budget), float(parallel), window, weight
        self.clock = clock
        self.alone: dict[Hashable, float] = {}  # kind -> latency on an idle service (EWMA), seconds
        self.limit: float | None = None  # seconds of idle-service work admitted at once; None until measured
        self.in_flight: list[Ticket] = []
        self.peak = 0  # the most requests admitted at once since the last configure
        self._slowdowns: list[tuple[Hashable, float]] = []
        self._reached = False  # the limit refused or nearly bound a request during this window
        self._lock = threading.Lock()

    def configure(self, budget: float, parallel: float) -> None:
        with self._lock:
            if self.limit is not None:  # what was learnt carries over, scaled to the new budget and replicas
                self.limit *= (budget / self.budget) * (parallel / self.parallel)
            self.budget, self.parallel = float(budget), float(parallel)
            self.peak = len(self.in_flight)

    def work(self) -> float:
        return sum(t.cost for t in self.in_flight)

    def admit(self, kind: Hashable) -> Ticket:
        with self._lock:
            n, ahead = len(self.in_flight), self.work()
            cost = self.alone.get(kind)
            if n and (cost is None or self.limit is None or ahead + cost > self.limit):
                self._reached = True
                raise Busy(self._retry_after(), n)
            if n and self.limit is not None and ahead + cost > 0.75 * self.limit:
                self._reached = True
            for t in self.in_flight:
                t.shared = True
            ticket = Ticket(kind, math.inf if cost is None else cost, shared=n > 0, start=self.clock())
            self.in_flight.append(ticket)
            self.peak = max(self.peak, len(self.in_flight))
            return ticket

    def done(self, ticket: Ticket, answered: bool = True) -> None:
        """The request ended; an answer's latency teaches the costs and the limit (a request that failed
        or was refused further on leaves them as they were)."""
        latency = self.clock() - ticket.start
        with self._lock:
            self.in_flight.remove(ticket)
            if not answered:
                return
            known = self.alone.get(ticket.kind)
            if not ticket.shared:
                self.alone[ticket.kind] = latency if known is None else (1 - self.weight) * known + self.weight * latency
            if self.limit is None:
                self.limit = self.budget * self.parallel * max(self.alone.values())
                return
            if known is None:
                return
            self._slowdowns.append((ticket.kind, latency / known))
            if len(self._slowdowns) >= self.window:
                self._adjust()

    def _adjust(self) -> None:
        by_kind: dict[Hashable, list[float]] = {}
        for kind, r in self._slowdowns:
            by_kind.setdefault(kind, []).append(r)
        # the kind that fares worst decides (each judged against its own idle latency)
        p95 = max(sorted(rs)[min(len(rs) - 1, int(0.95 * len(rs)))] for rs in by_kind.values())
        step = min(MAX_STEP, max(1 / MAX_STEP, math.sqrt(self.budget / max(p95, 1e-9))))
        if step > 1 and not self._reached:
            step = 1.0  # the limit was not what bounded the load: no evidence that more fits
        floor = max(self.alone.values())  # one request of the costliest kind beside nothing else
        self.limit = max(floor, self.limit * step)
        self._slowdowns, self._reached = [], False

    def _retry_after(self) -> int:
        """Seconds by which the requests in flight should be answered: their budget (at least 1)."""
        known = [t.cost for t in self.in_flight if math.isfinite(t.cost)]
        return max(1, math.ceil(self.budget * max(known, default=1.0)))

    def snapshot(self) -> dict:
        """What /v1/info shows: the budget, the limit, what is in flight, each kind's measured cost."""
        with self._lock:
            return {"budget": self.budget, "parallel": self.parallel,
                    "limit_s": None if self.limit is None else round(self.limit, 4),
                    "in_flight": len(self.in_flight), "peak_in_flight": self.peak,
                    "kinds": [{"kind": str(k), "alone_ms": round(v * 1e3, 1)} for k, v in self.alone.items()]}
