"""Redis restarted mid-campaign (issue 17 item 3): no campaign task is lost for good.

The queue and the limits shared across workers are a ``redis-server`` of this test's own, without
persistence. A campaign of ``CONTACTS`` recipients (cap: one marketing message per contact per
day, so the cap's places in Redis are lost too) is planned and sent by a real ``carepost worker``
(one task thread) in batches of five, one batch per sending task
(``CAREPOST_CAMPAIGN_SEND_SLICE_SECONDS=0``: each task queues the campaign's next one behind the
delivery task of its batch). Redis is killed once ``KILL_AT`` of its messages are made and stays
down until the worker's task thread is back in its loop failing to read the queue — the run in
progress, whichever it was, has ended — and at least two seconds; then it starts again empty.
So whatever the machine's speed, the campaign's next sending task is gone: it was either in
Redis, or the run in progress could not queue it (nor its delivery task; a delivery run cannot
take the cap's places). The delivery tasks of messages already materialized and the lease-expiry
schedules are gone too.

How nothing is lost: the campaign's heartbeat and its rows, and the messages and their
recipients, are in the database. Both minute sweeps keep a mark in the queue's store; when the
mark is gone the store lost what it held, and each sweep queues again at once what may have lost
its task — ``campaigns.sweep`` every campaign planning or sending (otherwise only one without
progress for ``CAREPOST_CAMPAIGN_STALE_SECONDS``), ``delivery.deliver_due`` every queued
recipient. The test runs both sweeps once itself rather than wait up to a minute for the
worker's. The frequency cap's places come back from the database: a message accepted before the
restart takes its place again at delivery.

What must hold, counted by Message-ID at the SMTP server: every contact gets exactly one message,
each Message-ID arrives once (the database never went away: no outcome was unrecorded), the
campaign completes, nothing is stuck.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest
from sqlalchemy import select

from tests.faults import (
    all_delivered,
    assert_each_sent_once_or_flagged,
    start_worker,
    stop,
    wait_for_recipients,
)
from tests.faults.services import private_redis_queue as private_redis

pytestmark = pytest.mark.slow

CONTACTS = 120
BATCH = 5
KILL_AT = 20  # messages made when Redis goes down
LEASE_SECONDS = 8
IDLE = b"Error reading from queue"  # huey's worker thread, between tasks, when Redis is down


@pytest.fixture
def private_redis_queue(delivery_queue, tmp_path):
    with private_redis(tmp_path, delivery_batch_size=BATCH, campaign_send_batch=BATCH) as server:
        yield server


def test_redis_restarted_mid_campaign(storage, delivery_env, sender, private_redis_queue, session, tmp_path,
                                      monkeypatch):
    from carepost.campaigns import tasks as campaign_tasks
    from carepost.campaigns.models import Campaign
    from carepost.consent.service import set_consent_settings
    from carepost.core.database import org_session
    from carepost.core.queue import huey
    from carepost.delivery.models import Message
    from carepost.delivery.tasks import deliver_due
    from tests.test_campaigns_planning import (
        make_campaign,
        make_contact,
        make_segment,
        make_template,
    )

    redis_server = private_redis_queue
    mx = delivery_env.mx["valid"]
    original = mx.recorder.handle_DATA
    arrivals = []

    async def data(server, smtp_session, envelope):
        arrivals.append(envelope.rcpt_tos[0])
        await asyncio.sleep(0.05)  # a real server's latency
        return await original(server, smtp_session, envelope)

    monkeypatch.setattr(mx.recorder, "handle_DATA", data)
    org_id = sender.org_id
    with org_session(org_id) as s:
        set_consent_settings(s, org_id, {"frequency_cap_daily": 1})
        version = make_template(s, org_id, blocks=False)
        seg = make_segment(s, org_id)
        addresses = {make_contact(s, org_id, f"c{i}@valid.test", sign=True): f"c{i}@valid.test"
                     for i in range(CONTACTS)}
        campaign_id = make_campaign(s, org_id, seg, version).id
        s.commit()
    campaign_tasks.sweep.call_local()  # the sweeps' marks, as a running installation has them
    deliver_due.call_local()
    campaign_tasks.plan_campaign(org_id, campaign_id)  # queued in Redis

    log_path = tmp_path / "worker.log"
    started = time.monotonic()
    worker = start_worker(storage, log_path, periodic=False, delivery_lease_seconds=LEASE_SECONDS,
                          delivery_concurrency=2, delivery_batch_size=BATCH, campaign_send_batch=BATCH,
                          campaign_send_slice_seconds=0)

    def campaign_messages() -> list[str]:
        session.rollback()
        return list(session.scalars(select(Message.id).where(Message.campaign_id == campaign_id)))

    try:
        deadline = time.monotonic() + 120  # a worker's start-up on a loaded machine
        while True:  # Redis goes down while the campaign's messages are being made
            assert worker.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, f"only {len(arrivals)} arrived"
            session.rollback()
            if session.scalar(select(Campaign.materialized_count).where(Campaign.id == campaign_id)) >= KILL_AT:
                break
            time.sleep(0.01)
        killed_at_byte = log_path.stat().st_size
        redis_server.stop()
        down_at = time.monotonic()
        # Down until the one task thread is idle (the run in progress ended without Redis) ...
        while IDLE not in log_path.read_bytes()[killed_at_byte:]:
            assert worker.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() - down_at < 120, "the worker's run in progress did not end with Redis down"
            time.sleep(0.05)
        time.sleep(max(0.0, 2 - (time.monotonic() - down_at)))  # ... and at least two seconds
        redis_server.start()
        assert huey.pending_count() == 0  # every queued task is gone

        # What was running finishes or fails; then nothing moves: the tasks that would are gone.
        quiet_since, seen = time.monotonic(), (len(arrivals), len(campaign_messages()))
        while time.monotonic() - quiet_since < 4:
            assert worker.poll() is None, log_path.read_text()[-3000:]
            now_seen = (len(arrivals), len(campaign_messages()))
            if now_seen != seen:
                quiet_since, seen = time.monotonic(), now_seen
            assert time.monotonic() - down_at < 90, "the campaign kept moving without its tasks?"
            time.sleep(0.3)
        session.rollback()
        stalled = session.get(Campaign, campaign_id)
        made_before, arrived_before = stalled.materialized_count, len(arrivals)
        assert stalled.status == "sending" and made_before < CONTACTS, \
            f"the campaign's task was not lost: {stalled.status}, {made_before} made"

        # The worker's minute sweeps, run now: both find their marks gone.
        assert campaign_tasks.resume_stalled() == 0  # not stale yet by its heartbeat alone ...
        campaign_tasks.sweep.call_local()  # ... but the queue's store was emptied: queued again
        deliver_due.call_local()

        deadline = time.monotonic() + 120
        while True:
            assert worker.poll() is None, log_path.read_text()[-3000:]
            session.rollback()
            if session.get(Campaign, campaign_id).status == "completed":
                break
            assert time.monotonic() < deadline, f"the campaign did not complete: {len(arrivals)} arrived"
            time.sleep(0.3)
        ids = campaign_messages()
        wait_for_recipients(session, ids, all_delivered, "not all delivered after the sweeps",
                            timeout=LEASE_SECONDS + 60, worker=worker, log_path=log_path)
        recovered_in = time.monotonic() - down_at
        time.sleep(1)  # anything sent twice would arrive now
    finally:
        stop(worker)

    verdict = assert_each_sent_once_or_flagged(session, [m.data for m in mx.recorder.messages], ids)
    assert verdict["twice"] == 0, verdict
    received = Counter(rcpt for m in mx.recorder.messages for rcpt in m.rcpt_tos)
    assert received == Counter(set(addresses.values())), "each contact exactly once"
    print(f"Redis down after {KILL_AT}/{CONTACTS} made: the campaign stopped at {made_before} made, "
          f"{arrived_before} arrived; after the sweeps {verdict}; "
          f"campaign completed, all delivered {recovered_in:.1f} s after the kill, "
          f"{time.monotonic() - started:.1f} s in all")
