"""Members' forward passes under CUDA graphs (`torch.compile(mode="reduce-overhead")`), one switch.

At batch 1 on a GPU a member's eager forward is bound by kernel launches, not arithmetic: on an
H200 the three members take 11.9 ms eager and 2.0 ms replayed as CUDA graphs
(docs/performance.md). `Compiled` wraps a forward (the answer pass, or the feature pass that the
one-pass Grad-CAM needs) so that each batch size it serves is captured once and replayed after:

    answer = Compiled(lambda x: member_logits(member, x), device)
    answer.warm_up((3, 224, 224), max_batch=8)    # capture 1, 2, 4, 8 now, not at the first request
    logits = answer(x)                            # x padded up to the next captured size, sliced back

Batches are padded with zeros up to the next power of two, so a server with `max_batch_size` 8
holds four graphs per pass instead of eight; a member in eval mode treats each image on its own,
so padding never changes a real image's output (tested). Outputs are copied out of the graph's
memory pool, so a later replay never overwrites an answer already handed back.

Each pass is compiled with torch's automatic dynamic shapes: the first batch size it sees is compiled
static (batch 1 at warm-up: the latency that matters most), the next one once more with the batch
dimension symbolic, and every later size reuses that graph (CUDA graphs are still recorded per size).
Two compiles a pass instead of one per size: inductor takes tens of seconds a compile, and a Serve
member replica pays them at start-up.

The compiler backend is `COMPILE["backend"]`, from $SKINRAY_COMPILE_BACKEND (default inductor):
"inductor" (mode "reduce-overhead": inductor's kernels, replayed as CUDA graphs), "cudagraphs"
(torch's own kernels replayed as CUDA graphs, no code generation: a compile takes seconds, not tens of
seconds) or "eager" (Dynamo's tracing alone: the tests' quick path). benchmarks/gpu.py measures the
first two against each other.

`graphs="auto"` turns this on for CUDA devices only: on a CPU the eager path stays (inductor's CPU
compile takes minutes at start-up on 2 cores: the 30 passes of three members at sizes 1..16 did not
finish within 15 minutes here, and there are no CUDA graphs to gain on a CPU).
`graphs="on"` compiles on any device (inductor on a CPU: how the tests run this code path without a
GPU); `"off"` never does.
"""
from __future__ import annotations

import os
from typing import Callable

import torch

GRAPHS_CHOICES = ("auto", "on", "off")
BACKENDS = ("inductor", "cudagraphs", "eager")
COMPILE = {"backend": os.environ.get("SKINRAY_COMPILE_BACKEND", "inductor")}  # see the module's text


def check_graphs(graphs: str) -> str:
    if graphs not in GRAPHS_CHOICES:
        raise ValueError(f"graphs must be one of {', '.join(GRAPHS_CHOICES)}, got {graphs!r}")
    return graphs


def use_graphs(device: torch.device, graphs: str) -> bool:
    """Whether a member on `device` runs its forwards compiled (see the module's rule)."""
    check_graphs(graphs)
    return graphs == "on" or (graphs == "auto" and device.type == "cuda")


def bucket(n: int) -> int:
    """The captured batch size that serves a batch of n: the next power of two."""
    return 1 << max(0, n - 1).bit_length()


def _allow_recompiles(count: int) -> None:
    # every member's forward shares one code object (Member.forward_features), so three members x
    # several batch sizes x (answer, features) are that many compiled entries of it; torch's default
    # limit (8) would silently send the rest back to eager
    import torch._dynamo.config as config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), count))


class Compiled:
    """`fn` (a batch -> tensor forward of a member in eval mode) compiled for `device`."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], device: torch.device) -> None:
        _allow_recompiles(256)
        self.device, self.cuda = device, device.type == "cuda"
        backend = COMPILE["backend"]
        if backend not in BACKENDS:
            raise ValueError(f"compile backend must be one of {', '.join(BACKENDS)} (SKINRAY_COMPILE_BACKEND), "
                             f"got {backend!r}")
        mode = "reduce-overhead" if self.cuda and backend == "inductor" else None
        self.fn = torch.compile(fn, backend=backend, mode=mode, dynamic=None)  # automatic dynamic: see above
        self.sizes: set[int] = set()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = len(x)
        size = bucket(n)
        if size != n:
            x = torch.cat([x, x.new_zeros((size - n, *x.shape[1:]))])
        if self.cuda:
            torch.compiler.cudagraph_mark_step_begin()  # a new replay: the previous outputs were copied out
        out = self.fn(x)
        self.sizes.add(size)
        return out[:n].clone()

    def warm_up(self, shape: tuple[int, ...], max_batch: int, grad: str = "inference",
                sizes: list[int] | None = None) -> list[int]:
        """Capture every size up to `max_batch`'s bucket now (or the buckets of `sizes`), a zero batch of
        `shape` images each, under the grad mode the calls will run in ("inference" or "no_grad");
        the sizes captured, smallest first."""
        ctx = torch.inference_mode if grad == "inference" else torch.no_grad
        wanted = sorted({bucket(n) for n in sizes} if sizes else
                        {1 << k for k in range(bucket(max_batch).bit_length())})
        for s in wanted:
            with ctx():
                for _ in range(3 if self.cuda else 1):  # cudagraph trees record on the third call
                    self(torch.zeros((s, *shape), device=self.device))
        return wanted
