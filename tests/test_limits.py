"""Limits shared across processes (issue 17 item 2): the Redis implementation of core.limits
against a real Redis, driven from several processes at once, and the in-process one behind the
same interface. The proof with real workers and an SMTP sink is tests/test_topology.py."""

from __future__ import annotations

import itertools
import multiprocessing
import os
import time
import uuid

import pytest

from carepost.core import limits as L

REDIS_URL = os.environ.get("CAREPOST_TEST_REDIS_URL")


def _redis_limits(namespace: str) -> L.RedisLimits:
    return L.RedisLimits(L._redis_client(REDIS_URL), namespace)


def _grab_slots(namespace: str, key: str, limit: int, tries: int, out) -> None:
    limits = _redis_limits(namespace)
    got = sum(1 for _ in range(tries) if limits.acquire_slot(key, limit, 30) is not None)
    out.put(got)


def _reserve_many(namespace: str, key: str, n: int, out) -> None:
    limits = _redis_limits(namespace)
    out.put([limits.reserve(key, 0.01, 5.0) for _ in range(n)])


def _backends():
    yield pytest.param("local", id="in-process")
    yield pytest.param("redis", id="redis", marks=pytest.mark.skipif(not REDIS_URL, reason="needs CAREPOST_TEST_REDIS_URL"))


@pytest.fixture(params=list(_backends()))
def limits(request):
    if request.param == "local":
        return L.LocalLimits()
    return _redis_limits("t" + uuid.uuid4().hex[:10])


def test_reserve_lends_tokens_at_the_rate_and_refuses_past_max_wait(limits):
    waits = [limits.reserve("domain:a.test", 1.0, 5.0) for _ in range(8)]
    assert waits[:5] == [0.0] * 5  # the burst
    # then one a second: each waits for the one before it (less the moments between the calls)
    assert all(abs(w - want) < 0.2 for w, want in zip(waits[5:], (1, 2, 3))), waits
    assert limits.reserve("domain:a.test", 1.0, 5.0, max_wait=2) is None  # would wait ~4 s: refused
    assert abs(limits.reserve("domain:a.test", 1.0, 5.0) - 4) < 0.3  # the refusal took nothing
    assert limits.reserve("domain:b.test", 1.0, 5.0) == 0.0  # another key, another bucket


def test_slots_are_counted_released_and_expire(limits):
    a = limits.acquire_slot("conn:a.test", 2, 30)
    b = limits.acquire_slot("conn:a.test", 2, 0.3)
    assert a and b and limits.acquire_slot("conn:a.test", 2, 30) is None
    assert limits.slots_held("conn:a.test") == 2
    limits.release_slot("conn:a.test", a)
    c = limits.acquire_slot("conn:a.test", 2, 30)
    assert c is not None and limits.acquire_slot("conn:a.test", 2, 30) is None
    time.sleep(0.4)  # b's lease ran out (a process killed while holding it)
    assert limits.acquire_slot("conn:a.test", 2, 30) is not None


def test_a_lock_is_held_by_one_holder_until_released_or_expired(limits):
    token = limits.try_lock("campaign-throttle:x", 0.3)
    assert token and limits.try_lock("campaign-throttle:x", 0.3) is None
    limits.unlock("campaign-throttle:x", "not-the-holder")
    assert limits.try_lock("campaign-throttle:x", 0.3) is None
    limits.unlock("campaign-throttle:x", token)
    assert limits.try_lock("campaign-throttle:x", 0.3) is not None
    time.sleep(0.4)
    assert limits.try_lock("campaign-throttle:x", 0.3) is not None


@pytest.mark.skipif(not REDIS_URL, reason="needs CAREPOST_TEST_REDIS_URL")
def test_redis_limits_hold_across_processes():
    """Four processes race for 3 slots and for tokens: together they get exactly the limit."""
    namespace = "t" + uuid.uuid4().hex[:10]
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_grab_slots, args=(namespace, "conn:z.test", 3, 5, out)) for _ in range(4)]
    for p in procs:
        p.start()
    got = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
    assert sum(got) == 3
    procs = [ctx.Process(target=_reserve_many, args=(namespace, "domain:z.test", 5, out)) for _ in range(4)]
    for p in procs:
        p.start()
    waits = sorted(w for _ in procs for w in out.get(timeout=60))
    for p in procs:
        p.join(30)
    # 20 reservations, a burst of 5 and one token per 100 s: exactly 5 go at once, whichever
    # process asks; the others are queued behind them, 100 s apart
    assert waits[:5] == [0.0] * 5 and waits[5] > 90
    assert all(b - a > 90 for a, b in itertools.pairwise(waits[5:]))


def test_admissions_count_members_in_sliding_windows_in_order(limits):
    """The frequency cap's places (consent.eligibility.hold_cap_places): in order, a member
    already holding a place keeps it, a window at its cap refuses, old places leave the window."""
    day, week = 86400.0, 7 * 86400.0
    now = 1_800_000_000.0
    windows = [(day, 1), (week, 2)]
    got = limits.admit_many([("fcap:o:c1", "m1", now), ("fcap:o:c1", "m2", now), ("fcap:o:c2", "m3", now)], now, windows)
    assert got == [True, False, True]  # two for one contact in one call: the first takes the place
    assert limits.admit_many([("fcap:o:c1", "m1", now)], now + 5, windows) == [True]  # held: kept
    assert set(limits.admitted("fcap:o:c1")) == {"m1"}
    # A day later the daily window is free; the weekly one holds two.
    later = now + day + 1
    assert limits.admit_many([("fcap:o:c1", "m4", later)], later, windows) == [True]
    assert limits.admit_many([("fcap:o:c1", "m5", later + day + 1)], later + day + 1, windows) == [False]
    limits.forget("fcap:o:c1", ["m1"])
    assert limits.admit_many([("fcap:o:c1", "m5", later + day + 1)], later + day + 1, windows) == [True]
    # After the longest window every place is gone.
    assert limits.admit_many([("fcap:o:c1", "m6", now + 30 * day)], now + 30 * day, windows) == [True]
    assert set(limits.admitted("fcap:o:c1")) == {"m6"}


def _admit_from_a_process(namespace: str, members: list[str], out) -> None:
    limits = _redis_limits(namespace)
    now = 1_800_000_000.0
    out.put([m for m in members if limits.admit_many([("fcap:o:shared", m, now)], now, [(86400.0, 3)])[0]])


@pytest.mark.skipif(not REDIS_URL, reason="needs CAREPOST_TEST_REDIS_URL")
def test_admissions_hold_across_processes():
    namespace = "t" + uuid.uuid4().hex[:10]
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_admit_from_a_process, args=(namespace, [f"p{p}m{i}" for i in range(20)], out))
             for p in range(4)]
    for p in procs:
        p.start()
    admitted = [m for _ in procs for m in out.get(timeout=60)]
    for p in procs:
        p.join(30)
    assert len(admitted) == 3, admitted  # 80 tries from 4 processes: exactly the cap
