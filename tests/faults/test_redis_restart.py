"""Redis restarted mid-send (issue 17 item 3).

The queue (and the limits shared across workers) is a ``redis-server`` of this test's own,
without persistence (the suite's shared Redis is never restarted). Messages are accepted through
the API in tasks of five; a real ``carepost worker`` delivers them. While the SMTP server holds
one message's final ".", Redis is killed, stays down two seconds and starts again empty: every
task still queued is gone, and so are the lease-expiry tasks the claims scheduled.

How no task is lost: the messages and their recipients are rows in the database, committed
before any task was queued. ``delivery.deliver_due`` (the worker's minute sweep) queues again
every recipient still ``queued`` whose task may be lost; it keeps a mark in the queue's store,
and when the mark is gone — the store lost what it held — every queued recipient is due at once
(otherwise after ``pipeline.REQUEUE_AFTER``, ten minutes). The test runs that sweep once itself
rather than wait up to a minute for the worker's; the worker itself reconnects to the restarted
Redis on its own. The run in progress needs Redis only for its pooled connections' slots (a
failure there is ignored; the slot's lease runs out).

What must hold, counted by Message-ID at the SMTP server: every message arrives exactly once, or
twice with ``possible_duplicate`` and the reason; nothing is stuck.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.faults import (
    all_delivered,
    assert_each_sent_once_or_flagged,
    start_worker,
    stop,
    wait_for_recipients,
)
from tests.faults.services import private_redis_queue as private_redis

pytestmark = pytest.mark.slow

COUNT = 30
BATCH = 5
CONCURRENCY = 2
LEASE_SECONDS = 8
KILL_AT = 8  # the arrival whose final "." is held while Redis goes down


@pytest.fixture
def private_redis_queue(delivery_queue, tmp_path):
    """The test's queue (``delivery_queue``: a name of its own) on a private Redis, which also
    holds the limits shared across workers; delivery tasks of ``BATCH`` messages."""
    with private_redis(tmp_path, delivery_batch_size=BATCH) as server:
        yield server


def test_redis_restarted_mid_send(storage, delivery_env, sender, private_redis_queue, session, tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from carepost.app import create_app
    from carepost.core.queue import huey
    from carepost.delivery.tasks import deliver_due

    redis_server = private_redis_queue
    mx = delivery_env.mx["valid"]
    original = mx.recorder.handle_DATA
    arrivals = []
    killed = asyncio.Event()

    async def data(server, smtp_session, envelope):
        arrivals.append(envelope.rcpt_tos[0])
        if len(arrivals) == KILL_AT:
            await asyncio.to_thread(redis_server.stop)
            killed.set()
        await asyncio.sleep(0.05)  # a real server's latency
        return await original(server, smtp_session, envelope)

    monkeypatch.setattr(mx.recorder, "handle_DATA", data)
    key = sender.key()
    batch = [{"from": "Bar Clinic <care@bar.example>", "to": [f"patient{i}@valid.test"],
              "subject": "From your care team", "text": f"Dear patient {i}: your results are in the portal."}
             for i in range(COUNT)]
    with TestClient(create_app(), base_url="http://localhost:8000") as client:  # built on this test's settings
        r = client.post("/api/v1/messages/batch", json={"messages": batch}, headers=key)
    assert r.status_code == 202, r.text
    ids = r.json()["ids"]
    assert huey.pending_count() >= COUNT // BATCH  # the tasks are in Redis

    log_path = tmp_path / "worker.log"
    started = time.monotonic()
    worker = start_worker(storage, log_path, periodic=True, delivery_lease_seconds=LEASE_SECONDS,
                          delivery_concurrency=CONCURRENCY, delivery_batch_size=BATCH)
    try:
        deadline = time.monotonic() + 120  # a worker's start-up on a loaded machine
        while not killed.is_set():
            assert worker.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, f"only {len(arrivals)} arrived"
            time.sleep(0.01)
        down_at = time.monotonic()
        time.sleep(2)
        redis_server.start()
        assert huey.pending_count() == 0  # every queued task is gone
        # The worker's delivery runs in progress finish; what was queued is lost until the sweep.
        rows = wait_for_recipients(session, ids, lambda rows: all(r.lease_owner is None for r in rows),
                                   "the run in progress did not finish", timeout=60, worker=worker, log_path=log_path)
        lost = sum(r.status == "queued" for r in rows)
        assert lost, "nothing was left queued: the kill came too late"

        deliver_due.call_local()  # the worker's minute sweep, run now
        wait_for_recipients(session, ids, all_delivered, "not all delivered after the sweep",
                            timeout=LEASE_SECONDS + 60, worker=worker, log_path=log_path)
        recovered_in = time.monotonic() - down_at
    finally:
        stop(worker)

    verdict = assert_each_sent_once_or_flagged(session, [m.data for m in mx.recorder.messages], ids)
    assert verdict["twice"] == 0, verdict  # the database never went away: no outcome went unrecorded
    print(f"Redis down at arrival {KILL_AT}/{COUNT}: {lost} recipients left queued with their tasks lost; {verdict}; "
          f"all delivered {recovered_in:.1f} s after the kill, {time.monotonic() - started:.1f} s in all")
