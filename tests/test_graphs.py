"""Members' passes compiled (skin.graphs): the same answers and maps as the eager path, whatever the
batch size (padded up to the captured sizes and sliced back), each size compiled once.

On this CPU the compiled path runs through torch.compile with the eager backend (Dynamo's tracing
and guards, and the padding and slicing code of the GPU path, without inductor's compile time) in
`make test`,
and through inductor itself in `make test-all`; CUDA graphs proper are measured on a GPU by
benchmarks/gpu.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import skin.graphs as graphs
from skin.explanation import Explanation
from skin.graphs import Compiled, bucket, check_graphs, use_graphs
from skin.inference import MemberRunner
from skin.registry import create_model


def test_batches_are_served_by_power_of_two_sizes():
    assert [bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 16, 17)] == [1, 2, 4, 4, 8, 8, 16, 16, 32]
    assert use_graphs(torch.device("cpu"), "auto") is False and use_graphs(torch.device("cuda"), "auto") is True
    assert use_graphs(torch.device("cpu"), "on") and not use_graphs(torch.device("cuda"), "off")
    with pytest.raises(ValueError, match="graphs must be one of auto, on, off, got 'yes'"):
        check_graphs("yes")


def _member(size=32):
    torch.manual_seed(0)
    return create_model("mobilenetv2", 6, pretrained="none", input_size=size).eval()


def _compare(backend, monkeypatch, explanation):
    monkeypatch.setitem(graphs.COMPILE, "backend", backend)
    member = _member()
    eager = MemberRunner(member, temperature=1.7, explanation=explanation)
    fast = MemberRunner(member, temperature=1.7, explanation=explanation, graphs="on")
    assert fast.compiled and not eager.compiled
    assert fast.warm_up(1) == [1]
    x = torch.randn(3, 3, 32, 32)
    for n in (1, 3):  # 3 is padded to 4: the real rows' answers are their own
        p, m = fast(x[:n], cam=True)
        q, w = eager(x[:n], cam=True)
        np.testing.assert_allclose(p, q, atol=1e-4, rtol=0)
        torch.testing.assert_close(m, w, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(fast(x[:n])[0], q, atol=1e-4, rtol=0)
    assert fast._compiled["answer"].sizes == {1, 4}
    return fast, eager, x


def test_compiled_passes_answer_and_explain_as_the_eager_path(monkeypatch):
    """The answer pass and the one-pass maps' feature passes (the trained stride's and a stride-16 dense
    copy's) through torch.compile equal the eager runner's to 1e-4 at padded and unpadded sizes; a runner
    derived with another explanation shares the compiled passes and adds only the new stride's."""
    fast, eager, x = _compare("eager", monkeypatch, Explanation(stride=16))
    assert set(fast._compiled) == {"answer", "features", 16}
    other = fast.with_explanation(stride=8)
    assert other._compiled is fast._compiled and set(fast._compiled) == {"answer", "features", 16, 8}
    general = fast.with_explanation(layer="backbone.blocks.3")  # another layer: the maps stay eager
    torch.testing.assert_close(general(x[:1], cam=True)[1],
                               eager.with_explanation(layer="backbone.blocks.3")(x[:1], cam=True)[1])


def test_padding_never_reaches_an_answer(monkeypatch):
    """A padded batch's rows are the images' own: padding rows are zeros and are cut off."""
    monkeypatch.setitem(graphs.COMPILE, "backend", "eager")
    seen = []
    c = Compiled(lambda x: seen.append(x.shape[0]) or x * 2, torch.device("cpu"))
    x = torch.randn(3, 2)
    out = c(x)
    assert seen == [4] and out.shape == (3, 2)
    torch.testing.assert_close(out, x * 2)


def test_warm_up_captures_the_sizes_asked_for_and_backends_are_checked(monkeypatch):
    monkeypatch.setitem(graphs.COMPILE, "backend", "eager")
    seen = []
    c = Compiled(lambda x: seen.append(x.shape[0]) or x + 1, torch.device("cpu"))
    assert c.warm_up((2,), 8) == [1, 2, 4, 8] and seen == [1, 2, 4, 8]
    assert c.warm_up((2,), 8, sizes=[3, 1, 16]) == [1, 4, 16] and c.sizes == {1, 2, 4, 8, 16}
    monkeypatch.setitem(graphs.COMPILE, "backend", "tensorrt")
    with pytest.raises(ValueError, match="compile backend must be one of inductor, cudagraphs, eager "
                                         r"\(SKINRAY_COMPILE_BACKEND\), got 'tensorrt'"):
        Compiled(lambda x: x, torch.device("cpu"))


@pytest.mark.slow
def test_inductor_compiled_member_answers_as_the_eager_path(monkeypatch):
    """The same comparison through inductor (the backend the GPU path uses), on this CPU."""
    _compare("inductor", monkeypatch, Explanation(stride=16))
