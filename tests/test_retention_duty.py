"""The retention purge's duty cycle (issue 16, speed): a purge works at most ``duty`` of the wall
time — after a chunk that took ``t`` seconds it rests ``t * (1 - duty) / duty`` — so sending keeps
its pace during the nightly purge. Refused values name the setting."""

from __future__ import annotations

import time

import pytest
from pydantic import ValidationError

from carepost.core.config import Settings
from carepost.core.database import org_session
from carepost.retention import purge, service
from carepost.retention.service import Actor
from tests.test_retention import SYSTEM, _counts, _month_start, make_messages


def _expired(org_id: str, n: int) -> list[str]:
    with org_session(org_id) as s:
        ids = make_messages(s, org_id, _month_start(20), n)
        service.set_schedule(s, org_id, "messages", min_days=30, max_days=365, actor=SYSTEM)
        s.commit()
    return ids


class _Timeline:
    """Records, on the real clock, when each chunk was committed (the purge's progress callback)
    and each rest the purge took (the real ``time.sleep``, wrapped)."""

    def __init__(self, monkeypatch) -> None:
        self.events: list[tuple] = []  # ("chunk", committed at, total) or ("rest", at, seconds, ended at)
        real_sleep = time.sleep

        def sleep(seconds: float) -> None:
            start = time.monotonic()
            real_sleep(seconds)
            self.events.append(("rest", start, seconds, time.monotonic()))

        monkeypatch.setattr(purge.time, "sleep", sleep)

    def progress(self, record_class: str, total: int) -> None:
        self.events.append(("chunk", time.monotonic(), float(total)))


def test_a_purge_at_duty_one_quarter_rests_three_times_each_chunks_work(org, monkeypatch):
    ids = _expired(org.id, 12)
    timeline = _Timeline(monkeypatch)
    run = purge.run_purge(org.id, Actor("system", "duty-test"), chunk=3, duty=0.25, progress=timeline.progress)
    assert run["status"] == "finished" and run["progress"]["messages"]["count"] == 12
    assert _counts(org.id, ids) == (0, 0, 0)

    chunks = [e for e in timeline.events if e[0] == "chunk"]
    rests = [e for e in timeline.events if e[0] == "rest"]
    assert [int(c[2]) for c in chunks] == [3, 6, 9, 12] and len(rests) == len(chunks)
    # Each rest follows its chunk and is three times ((1 - 0.25) / 0.25) the chunk's work. From the
    # second chunk on, a chunk starts when the rest before it ends, and its work is measured up to
    # a moment between its commit and its rest: so the rest lies between three times those spans
    # (less a scheduling delay between one rest's end and the next chunk's start, under load).
    previous_end = None
    for (_, committed, _), (_, rest_at, rest, ended) in zip(chunks, rests, strict=True):
        assert committed <= rest_at and ended >= rest_at + rest
        if previous_end is not None:
            assert 3 * (committed - previous_end) - 0.1 <= rest <= 3 * (rest_at - previous_end) + 0.001
        previous_end = ended
    assert all(r[2] > 0 for r in rests)


def test_duty_one_never_rests_and_bad_duties_are_refused_naming_the_setting(org, monkeypatch):
    ids = _expired(org.id, 4)
    timeline = _Timeline(monkeypatch)
    for bad in (0, -0.5, 1.5):
        with pytest.raises(ValueError, match="duty"):
            purge.run_purge(org.id, SYSTEM, duty=bad)
    run = purge.run_purge(org.id, SYSTEM, chunk=2, duty=1.0, progress=timeline.progress)
    assert run["progress"]["messages"]["count"] == 4 and _counts(org.id, ids) == (0, 0, 0)
    assert not [e for e in timeline.events if e[0] == "rest"]

    for bad in ("0", "1.01", "-1", "half"):
        with pytest.raises(ValidationError, match="retention_purge_duty"):
            Settings(retention_purge_duty=bad)
    assert Settings().retention_purge_duty == 0.5
