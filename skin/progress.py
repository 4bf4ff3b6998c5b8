"""Progress a person can follow from a Ray job: what the job's workers say (one line per member and epoch,
a batch scored...) reaches the driver's terminal through a small Ray actor, while Ray's own output (worker
logs, its INFO lines) stays in Ray's log files (`--verbose` on the jobs brings it back).

    board = ProgressBoard.start()          # in the driver: an actor, and a thread printing what arrives
    say = board.sender()                   # pass `say` to the workers (it pickles); say("...") there
    ...
    board.stop()                           # prints what is left
"""
from __future__ import annotations

import contextlib
import io
import sys
import threading
import time
from typing import Callable, Iterator


def elapsed(t0: float) -> str:
    s = int(time.time() - t0)
    return f"{s // 60}:{s % 60:02d}"


@contextlib.contextmanager
def quiet(verbose: bool = False) -> Iterator[None]:
    """Hold what a library prints to stdout inside the block (Ray Tune's experiment box and hints) unless
    `verbose`; if the block fails, what it printed goes to stderr, so nothing is lost where it matters."""
    if verbose:
        yield
        return
    held = io.StringIO()
    try:
        with contextlib.redirect_stdout(held):
            yield
    except BaseException:
        sys.stderr.write(held.getvalue())
        raise


def quiet_ray_data() -> None:
    """Ray Data without its progress bars and INFO/WARNING lines on the terminal (they stay in the session's
    ray-data log file): for a job that prints its own progress, unless it runs with --verbose."""
    import logging

    import ray.data
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)


class _Board:
    """The actor: lines in, in arrival order; `take` hands over what arrived since the last call."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def put(self, line: str) -> None:
        self.lines.append(line)

    def take(self) -> list[str]:
        out, self.lines = self.lines, []
        return out


class Sender:
    """What workers call: `say(line)`; a picklable handle on the board (or plain print without Ray)."""

    def __init__(self, actor=None) -> None:
        self.actor = actor

    def __call__(self, line: str) -> None:
        print(line, flush=True)  # the worker's own log file keeps every line
        if self.actor is not None:
            self.actor.put.remote(line)


class ProgressBoard:
    def __init__(self, actor, out: Callable[[str], None] = print, every_s: float = 0.5) -> None:
        self.actor, self.out, self.every_s = actor, out, every_s
        self.t0 = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress", daemon=True)
        self._thread.start()

    @classmethod
    def start(cls, out: Callable[[str], None] = print) -> "ProgressBoard":
        import ray
        actor = ray.remote(num_cpus=0)(_Board).remote()
        return cls(actor, out)

    def sender(self) -> Sender:
        return Sender(self.actor)

    def _flush(self) -> None:
        import ray
        for line in ray.get(self.actor.take.remote()):
            self.out(f"  [{elapsed(self.t0)}] {line}")

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self._flush()
            except Exception:  # noqa: BLE001 - progress is best effort; the job's result is not
                pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self._flush()
        except Exception:  # noqa: BLE001
            pass
