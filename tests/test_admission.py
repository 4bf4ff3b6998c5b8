"""The admission controller (service.admission) against a simulated service, on a fake clock: no Ray,
no timing of this machine. The service shares its capacity among the requests in flight (processor
sharing): `parallel` idle-service requests' worth at once, so n requests each run min(1, parallel / n)
as fast as alone."""
import random

import pytest

from service.admission import STEP_S, WAIT_S, Admission, Busy


def simulate(adm: Admission, parallel: float, offered: float, seconds: float = 120, kinds=(("cheap", 0.2),),
             seed: int = 0, dt: float = 0.002, poisson: bool = True):
    """Requests arrive at `offered` per second (Poisson, or evenly spaced), each of a kind drawn from `kinds` (name, seconds
    alone). Returns (answers [(kind, latency)], refusals, steady-state start)."""
    rng = random.Random(seed)
    clock = [0.0]
    adm.clock = lambda: clock[0]
    running, answers, refused = [], [], 0
    gap = (lambda: rng.expovariate(offered)) if poisson else (lambda: 1 / offered)
    next_arrival = gap()
    t = 0.0
    while t < seconds:
        while next_arrival <= t:
            kind, alone = rng.choice(kinds)
            try:
                running.append([adm.admit(kind), alone, kind])
            except Busy as e:
                refused += 1
                assert e.retry_after_s >= 1
            next_arrival += gap()
        if running:
            speed = min(1.0, parallel / len(running))
            for r in running:
                r[1] -= speed * dt
            for r in [r for r in running if r[1] <= 0]:
                running.remove(r)
                answers.append((r[2], clock[0] - r[0].start))
                adm.done(r[0])
        t += dt
        clock[0] = t
    return answers, refused


@pytest.mark.parametrize("parallel,load,share", [(1.0, 4, 0.8), (1.0, 16, 0.9), (3.0, 4, 0.9), (3.0, 16, 0.9)])
def test_overload_is_shed_and_what_is_admitted_stays_within_budget(parallel, load, share):
    """At 4x and 16x the capacity: the admitted requests' 95th-percentile latency stays within the budget
    (twice alone, with a small tolerance) and their throughput near the capacity; the rest is refused.
    With 3x the capacity the controller learns it (it is told 1x). A service that runs nothing in
    parallel fits one request at a time in a budget of 2x (two at once take 2x each, at the budget's edge):
    at 4x the capacity the gaps between an answer and the next admitted arrival cost a fifth of it."""
    alone = 0.2
    capacity = parallel / alone  # requests per second at full use
    adm = Admission(budget=2.0, parallel=1.0)
    seconds = 120
    answers, refused = simulate(adm, parallel, load * capacity, seconds)
    late = [lat for _, lat in answers[len(answers) // 4:]]  # after the controller has measured its levels
    p95 = sorted(late)[int(0.95 * len(late))]
    assert p95 <= 2.0 * alone * 1.15, (load, p95)
    assert len(answers) / seconds >= share * capacity, (load, len(answers) / seconds, capacity)
    assert refused > 0


def test_a_service_slower_than_it_was_said_to_be_is_learnt():
    """Told the members have 4 replicas when one answers, the controller first admits up to 4 at once, then
    learns their slowdowns and keeps to the budget."""
    adm = Admission(budget=2.0, parallel=4.0)
    answers, _ = simulate(adm, 1.0, 20.0, 120)
    late = [lat for _, lat in answers[len(answers) // 4:]]
    assert sorted(late)[int(0.95 * len(late))] <= 2.0 * 0.2 * 1.15
    assert adm.slowdown[4] > 2.0  # measured, and refused from then on


def test_costly_requests_count_as_more_work():
    """Cheap (0.1 s) and costly (1.0 s) requests mixed at 8x the capacity: both kinds are answered and
    each kind's admitted latency stays near its own budget (a cheap request admitted beside costly ones
    shares the service with them: within 1.4x the budget here, where a homogeneous load keeps 1.15x)."""
    adm = Admission(budget=2.0)
    answers, _ = simulate(adm, 2.0, 16.0, 240, kinds=(("cheap", 0.1), ("costly", 1.0)))
    for kind, alone in (("cheap", 0.1), ("costly", 1.0)):
        late = [lat for k, lat in answers[len(answers) // 4:] if k == kind]
        assert len(late) > 20
        assert sorted(late)[int(0.95 * len(late))] <= 2.0 * alone * 1.4, kind


def test_an_idle_service_admits_anything_and_unmeasured_kinds_go_alone():
    adm = Admission(clock=lambda: 0.0)
    first = adm.admit("a")  # nothing measured yet: an empty service takes it
    with pytest.raises(Busy):
        adm.admit("b")  # unmeasured, and the service is not empty
    with pytest.raises(Busy):
        adm.admit("a")  # nothing joins a request whose cost is not known yet
    adm.done(first)
    assert adm.alone["a"] == 0.0


def test_requests_that_never_meet_teach_no_slowdown():
    """One request a second, each 0.2 s: never two at once, so no level above 1 is measured; the first
    time two meet the second is admitted (level 2 may fit: it is tried) and a third is not."""
    adm = Admission(budget=2.0)
    simulate(adm, 4.0, 1.0, 60, poisson=False)
    assert adm.slowdown == {1: 1.0} and adm.alone["cheap"] == pytest.approx(0.2, abs=0.01)
    adm.clock = lambda: 100.0
    adm.admit("cheap")
    adm.admit("cheap")  # level 2, not tried yet: 2 x 1.0 fits a budget of 2
    with pytest.raises(Busy):
        adm.admit("cheap")  # level 3 would be 3x as slow as alone, were nothing parallel


def test_budget_below_one_is_refused_with_a_reason():
    with pytest.raises(ValueError, match="at least 1"):
        Admission(budget=0.5)


def test_a_refused_request_waits_briefly_for_room_and_never_passes_one_waiting():
    """A level measured over the budget: a request that arrives 30 ms before the one in flight is expected to
    end waits (admit_waiting) instead of being refused at once, and is admitted when that answer comes. A
    third arriving meanwhile finds the waiting room full (one place per request expected to end within the
    wait) and is refused at once, as is one arriving when nothing is expected to end soon; a request for
    which the expected room does not come is refused when WAIT_S has passed, not later."""
    import asyncio
    clock = [0.0]
    adm = Admission(budget=2.0, clock=lambda: clock[0])
    adm.alone["cheap"] = 0.2
    adm.slowdown[2], adm.measured_at[2] = 2.5, 0.0  # two at once measured too slow, just now
    first = adm.admit("cheap")  # alone: expected to end at 0.2 s

    async def no_room(s):
        clock[0] += s
    with pytest.raises(Busy):
        asyncio.run(adm.admit_waiting("cheap", sleep=no_room))  # at 0 s: nothing ends within the wait
    assert clock[0] == 0.0 and adm.waiting == 0  # refused at once
    clock[0] = 0.17

    async def sleep(s):
        await asyncio.sleep(0)
        clock[0] += s
        if clock[0] >= 0.2 and not first.ended:
            adm.done(first)

    async def scene():
        waiter = asyncio.create_task(adm.admit_waiting("cheap", sleep=sleep))
        await asyncio.sleep(0)  # it is refused on arrival and takes the waiting room's one place
        assert adm.waiting == 1
        with pytest.raises(Busy):
            await adm.admit_waiting("cheap", sleep=sleep)
        return await waiter

    second = asyncio.run(scene())
    assert second.start == pytest.approx(0.2, abs=STEP_S) and adm.waiting == 0 and adm.in_flight == [second]
    adm.slowdown[2] = 1.2  # now two at once fit; one is waiting (it has the room's place)
    clock[0] = second.start + 0.17
    assert adm.may_wait("cheap", 0.0, queued=False) and adm.waiting == 1
    with pytest.raises(Busy):
        adm.admit("cheap")  # a fresh arrival does not pass it
    adm.done(adm.admit("cheap", 0.01, queued=True))
    adm.left_room()
    adm.slowdown[2], adm.measured_at[2] = 2.5, clock[0]  # too slow again: no room while `second` runs
    clock[0] = second.start + 0.19  # `second` is expected to end in 10 ms, and does not
    t0 = clock[0]
    with pytest.raises(Busy):
        asyncio.run(adm.admit_waiting("cheap", sleep=no_room))
    assert WAIT_S - STEP_S <= clock[0] - t0 <= WAIT_S and adm.waiting == 0
