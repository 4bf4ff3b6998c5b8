"""Admission sized to capacity: a request that cannot finish within its latency budget is refused (503 +
Retry-After) at once, or after waiting at most WAIT_S for room, before it waits anywhere else.

Each kind of request (which route and bundle, with or without maps, which explanation options) has its own
cost, `alone`: its latency when nothing else was in flight, what it takes an idle service. A request that
arrives finds work in flight (the sum of the `alone` of the requests admitted and not yet answered); its
*level* is how many requests of its own kind that work and itself amount to (2: one of its kind ahead, or
half a costlier one). For each level the ingress keeps the slowdown it measured (latency ÷ the kind's
`alone`, a moving average of the requests answered at that level; between two levels it interpolates),
and admits a request when the slowdown at its level, with a 5% margin, is within the budget (default 2:
twice an idle service's latency). A level not measured yet is judged by the one below it scaled as if
nothing ran in parallel (level n costs n/(n-1) of level n-1), so the service tries one more request at once
only when that could fit, and learns from the answer; a level measured over the budget is refused, but
tried again with one request once its last measurement is ten seconds old (one slow answer does not shut it
for good; a level still over the budget costs one slow answer in ten seconds). Whatever lets requests run at
once (members' batching, several replicas, the ingress decoding one upload while the members compute
another) shows up as slowdowns below their level and lets more in; a costly explanation counts as more work
than a cheap one. An empty service admits any request, and a kind not measured yet is admitted only into an
empty service (so it is measured alone first). Nothing is tuned by hand.

A request refused on arrival may wait a little for room instead (`admit_waiting`): up to WAIT_S, and no longer
than the budget leaves once it would run alone, when a request in flight is expected to end within that wait
(at its level's measured slowdown), one waiting place per such request; a fresh arrival does not pass a
waiting one, and the rest are refused at once. Without it an answer that ends just before the next arrival
leaves its room idle: at the capacity, evenly spaced arrivals lost a fifth of it and a Poisson stream more (the
loss of a system with no queue). A request that still finds no room is refused when its wait ends, within
WAIT_S.
"""
from __future__ import annotations

import asyncio
import math
import threading
import time
from dataclasses import dataclass
from typing import Callable, Hashable

MARGIN = 1.05  # the measured slowdown at a level, times this, must be within the budget
WAIT_S = 0.06  # the longest a request waits for room before it is refused (a refusal comes within 0.1 s)
STEP_S = 0.005  # how often a waiting request looks for room
PROBE_S = 10.0  # a level refused since its last answer this long ago (or 50 of its requests' latency) is tried again


@dataclass
class Ticket:
    """One admitted request: its kind, its cost, the level it was admitted at, and whether another request
    was in flight at any time beside it (then its latency is not an idle service's)."""
    kind: Hashable
    cost: float
    level: int
    shared: bool
    start: float
    ended: bool = False
    probe: bool = False


class Busy(Exception):
    """The service cannot start this request within its budget; retry after `retry_after_s`."""

    def __init__(self, retry_after_s: int, in_flight: int) -> None:
        super().__init__(f"the service is at capacity ({in_flight} request(s) in progress fill its latency "
                         f"budget); retry in {retry_after_s} s")
        self.retry_after_s, self.in_flight = retry_after_s, in_flight


class Admission:
    """Admission by latency budget (see the module's docstring). Thread-safe; one per ingress replica.

        ticket = admission.admit(kind)                # or raises Busy at once
        ticket = await admission.admit_waiting(kind)  # or raises Busy within WAIT_S
        try: ... finally: admission.done(ticket, answered=...)
    """

    def __init__(self, budget: float = 2.0, parallel: float = 1.0, weight: float = 0.2,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        if budget < 1:
            raise ValueError(f"the latency budget is a multiple of an idle request's latency, at least 1; got {budget}")
        self.budget, self.parallel, self.weight = float(budget), float(parallel), weight
        self.clock = clock
        self.alone: dict[Hashable, float] = {}  # kind -> latency on an idle service (moving average), seconds
        self.slowdown: dict[int, float] = {1: 1.0}  # level -> measured latency ÷ alone (moving average)
        self.measured_at: dict[int, float] = {}  # level -> when it was last measured
        self.in_flight: list[Ticket] = []
        self.waiting = 0  # requests in the waiting room
        self.peak = 0  # the most requests admitted at once since the last configure
        self._lock = threading.Lock()

    def configure(self, budget: float, parallel: float) -> None:
        with self._lock:
            if parallel != self.parallel:
                self.slowdown = {1: 1.0}  # another number of replicas: measured again
            self.budget, self.parallel = float(budget), float(parallel)
            self.peak = len(self.in_flight)

    def expected(self, level: int) -> float:
        """The slowdown expected at a level: measured, or the highest measured level below scaled as if
        nothing more ran in parallel (divided by `parallel`, the replicas that surely answer at once)."""
        if level in self.slowdown:
            return self.slowdown[level]
        below = max(k for k in self.slowdown if k < level)
        return self.slowdown[below] * max(1.0, level / max(below, self.parallel))

    def admit(self, kind: Hashable, waited: float = 0.0, queued: bool = False) -> Ticket:
        """Admit a request of this kind now, or raise Busy. `waited`: how long it has waited already (its
        latency budget is what is left); `queued`: it is in the waiting room (a fresh arrival does not pass
        a request waiting there)."""
        with self._lock:
            n = len(self.in_flight)
            cost = self.alone.get(kind)
            level, probe = 1, False
            if n:
                ahead = sum(t.cost for t in self.in_flight)
                if cost is None or not math.isfinite(ahead):
                    raise Busy(self._retry_after(), n)  # measured alone first; nothing joins an unmeasured one
                if self.waiting and not queued:
                    raise Busy(self._retry_after(), n)  # a fresh arrival does not pass one waiting for room
                where = (ahead + cost) / cost  # between two levels: the slowdown interpolated between them
                level = max(2, round(where))
                lo = max(1, math.floor(where))
                expect = self.expected(lo) + (where - lo) * (self.expected(lo + 1) - self.expected(lo))
                margin = MARGIN if level in self.slowdown else 1.0  # a level not tried yet is tried when it could fit
                probe = False
                if expect * margin + waited / cost > self.budget:
                    probe = level in self.slowdown and not any(t.probe for t in self.in_flight) and \
                        self.clock() - self.measured_at.get(level, 0.0) > max(PROBE_S, 50 * cost)
                    if not probe:
                        raise Busy(self._retry_after(), n)
            for t in self.in_flight:
                t.shared = True
            ticket = Ticket(kind, math.inf if cost is None else cost, level, shared=n > 0, start=self.clock(),
                            probe=n > 0 and probe)
            self.in_flight.append(ticket)
            self.peak = max(self.peak, len(self.in_flight))
            return ticket

    def may_wait(self, kind: Hashable, waited: float, queued: bool) -> bool:
        """Whether a refused request may wait STEP_S more for room (taking a place in the waiting room if it
        has none yet: `queued`); when False it is refused, and leaves the room with `left_room` if it had one.
        A place is taken only while fewer wait than requests in flight are expected to end within the wait
        (each at its admission level's measured slowdown), so at overload the rest are refused at once."""
        with self._lock:
            cost = self.alone.get(kind)
            if cost is None:
                return False
            left = min(WAIT_S, (self.budget / MARGIN - 1.0) * cost) - waited
            if left < STEP_S:
                return False
            if not queued:
                now = self.clock()
                ending = sum(1 for t in self.in_flight
                             if math.isfinite(t.cost) and t.start + t.cost * self.expected(t.level) - now <= left)
                if self.waiting >= ending:
                    return False
                self.waiting += 1
            return True

    def left_room(self) -> None:
        with self._lock:
            self.waiting -= 1

    async def admit_waiting(self, kind: Hashable, sleep=asyncio.sleep) -> Ticket:
        """`admit`, or wait in the waiting room for room (see the module's docstring); Busy when none came."""
        start, queued = self.clock(), False
        try:
            while True:
                try:
                    return self.admit(kind, self.clock() - start, queued)
                except Busy:
                    if not self.may_wait(kind, self.clock() - start, queued):
                        raise
                    queued = True
                await sleep(STEP_S)
        finally:
            if queued:
                self.left_room()

    def done(self, ticket: Ticket, answered: bool = True) -> None:
        """The request ended; an answer's latency teaches its kind's cost and its level's slowdown (a request
        that failed or was refused further on teaches nothing)."""
        latency = self.clock() - ticket.start
        with self._lock:
            if ticket.ended:  # once only, whoever ends it first (the answer, or the middleware after an error)
                return
            ticket.ended = True
            self.in_flight.remove(ticket)
            if not answered:
                return
            known = self.alone.get(ticket.kind)
            if not ticket.shared:  # quicker down than up: a first request's warm-up does not linger as the idle cost
                w = 0.5 if known is not None and latency < known else self.weight
                self.alone[ticket.kind] = latency if known is None else (1 - w) * known + w * latency
            elif known is not None and ticket.level > 1:
                r = latency / known
                old = self.slowdown.get(ticket.level)
                w = 0.5 if ticket.probe else self.weight  # a probe's answer counts more: it is all there is
                self.slowdown[ticket.level] = r if old is None else (1 - w) * old + w * r
                self.measured_at[ticket.level] = self.clock()

    def _retry_after(self) -> int:
        """Seconds by which the requests in flight should be answered: their budget (at least 1)."""
        known = [t.cost for t in self.in_flight if math.isfinite(t.cost)]
        return max(1, math.ceil(self.budget * max(known, default=1.0)))

    def snapshot(self) -> dict:
        """What /v1/info shows: the budget, what is in flight, the slowdowns measured, each kind's cost."""
        with self._lock:
            return {"budget": self.budget, "parallel": self.parallel, "in_flight": len(self.in_flight),
                    "waiting": self.waiting,
                    "peak_in_flight": self.peak,
                    "slowdown_by_level": {str(k): round(v, 3) for k, v in sorted(self.slowdown.items())},
                    "kinds": [{"kind": str(k), "alone_ms": round(v * 1e3, 1)} for k, v in self.alone.items()]}
