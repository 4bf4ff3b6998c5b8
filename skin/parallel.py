"""`fn` over a list in worker processes (or in this one), in order, with a progress line."""
from __future__ import annotations

import time
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Iterable, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def map_progress(fn: Callable[[T], R], items: Sequence[T], workers: int, what: str, unit: str, every: int,
                 progress: bool = True, chunksize: int = 16) -> list[R]:
    """Results of `fn` for every item, in order; `workers` > 1 runs them in that many processes.
    With `progress`, a line "<what>: n/total <unit> (rate/s)" every `every` items and at the end."""
    t0, out = time.perf_counter(), []

    def tick(results: Iterable[R]) -> None:
        for n, r in enumerate(results, 1):
            out.append(r)
            if progress and (n == len(items) or n % every == 0):
                rate = n / max(time.perf_counter() - t0, 1e-9)
                print(f"\r{what}: {n}/{len(items)} {unit} ({rate:.0f}/s)", end="\n" if n == len(items) else "", flush=True)

    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            tick(pool.map(fn, items, chunksize=chunksize))
    else:
        tick(map(fn, items))
    return out
