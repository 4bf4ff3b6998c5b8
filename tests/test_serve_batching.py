"""The member deployment's batching, without Ray: requests reach the replica's user-code event loop
from another thread (as Serve's own loop hands them over), so this reproduces how batches form."""
import asyncio
import threading
import time

import numpy as np
import torch
from serve_app import MemberModel
from skin.bundle import Bundle
from skin.presets import eval_geometry
from skin.synth import make_sample


def test_requests_that_arrive_during_a_batch_form_the_next_batch(random_bundle, monkeypatch):
    import ray.serve.batching
    # the only part of @serve.batch that needs a live replica: a warning that reads its config
    monkeypatch.setattr(ray.serve.batching._BatchQueue, "_warn_if_max_batch_size_exceeds_max_ongoing_requests",
                        lambda self: None)
    threads = torch.get_num_threads()
    member = MemberModel.func_or_class(str(random_bundle), "mobilenetv2", num_cpus=1.0)
    torch.set_num_threads(threads)  # the replica sets its threads; this process keeps its own
    x = eval_geometry(Bundle.load(random_bundle).entry("mobilenetv2").data_config)(
        make_sample(1, 0, 0, 64).image).numpy()
    first_started, release = threading.Event(), threading.Event()
    run = member._run

    def gated_run(batch, *rest):  # the first batch holds until the other requests have been handed over
        if not first_started.is_set():
            first_started.set()
            release.wait(30)
        return run(batch, *rest)
    member._run = gated_run

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        futures = [asyncio.run_coroutine_threadsafe(member.predict(x), loop)]
        assert first_started.wait(30)
        for _ in range(7):  # arriving one by one while the first batch runs
            futures.append(asyncio.run_coroutine_threadsafe(member.predict(x), loop))
            time.sleep(0.02)
        threading.Timer(0.2, release.set).start()
        outs = [f.result(60) for f in futures]
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
    assert [o["batch"] for o in outs] == [1] + [7] * 7  # one batch of everything that queued meanwhile
    for o in outs:
        assert o["probs"].shape == (6,) and abs(float(o["probs"].sum()) - 1) < 1e-5
        assert o["maps"].ndim == 3 and o["maps"].shape[0] == 6
    np.testing.assert_allclose(outs[1]["probs"], outs[0]["probs"], atol=1e-5)  # batching changes nothing


def test_member_computes_maps_only_when_asked(random_bundle, monkeypatch):
    """A plain image gets the bundle's maps; (image, (cam, explain)) gets none without `cam`, or maps at
    another stride / smoothed over the flips; the answer never changes."""
    import ray.serve.batching
    monkeypatch.setattr(ray.serve.batching._BatchQueue, "_warn_if_max_batch_size_exceeds_max_ongoing_requests",
                        lambda self: None)
    threads = torch.get_num_threads()
    member = MemberModel.func_or_class(str(random_bundle), "efficientnet_b1", num_cpus=1.0)
    torch.set_num_threads(threads)
    x = eval_geometry(Bundle.load(random_bundle).entry("efficientnet_b1").data_config)(
        make_sample(2, 0, 0, 64).image).numpy()[None]
    probs, maps, _ = member._run(x)
    assert maps.shape[:2] == (1, 6)
    from skin.explanation import Overrides
    for options, shape in (((False, None), None), ((True, Overrides(stride=8)), (1, 6, 8, 8)),
                           ((True, Overrides(smooth="flips")), maps.shape)):
        p, m, _ = member._run(x, options)
        np.testing.assert_allclose(p, probs, atol=1e-6)
        assert (m is None) if shape is None else m.shape == shape, options
    smoothed = member._run(x, (True, Overrides(smooth="flips")))[1]
    assert not np.allclose(smoothed, maps)
