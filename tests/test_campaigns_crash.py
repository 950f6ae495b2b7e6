"""Crash safety of a campaign (issue 14 item 5): a real ``carepost worker`` killed with SIGKILL in
the middle of planning, a second one killed in the middle of sending, a third that finishes;
every Message-ID counted at a real SMTP server (verified TLS, the local MX of the fixtures).

What must hold: every eligible recipient receives the campaign exactly once — a copy that
arrived twice was in flight at the kill (at most ``CAREPOST_DELIVERY_CONCURRENCY``) and is
flagged ``possible_duplicate`` — no excluded contact receives anything, nobody is skipped, and
no recipient was planned or materialized twice (one message per recipient row).
"""

from __future__ import annotations

import asyncio
import email
import signal
import subprocess
import time
from collections import Counter
from email import policy as email_policy

import pytest
from sqlalchemy import func, select

from carepost.campaigns.models import Campaign, CampaignExclusion, CampaignRecipient
from carepost.core.database import org_session, read_only_session
from carepost.delivery.models import Message, MessageRecipient
from tests.faults import start_worker, stop
from tests.test_campaigns_planning import (
    make_campaign,
    make_contact,
    make_segment,
    make_template,
)

pytestmark = pytest.mark.slow

ELIGIBLE = 240
UNAUTHORIZED = 30
CONCURRENCY = 8
LEASE_SECONDS = 5


def _worker(storage, log_path) -> subprocess.Popen:
    return start_worker(storage, log_path, periodic=True, delivery_lease_seconds=LEASE_SECONDS,
                        delivery_concurrency=CONCURRENCY, delivery_batch_size=50, campaign_plan_chunk=4,
                        campaign_send_batch=25, campaign_stale_seconds=1)


def _kill(proc) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)


def test_kill_9_mid_plan_and_mid_send_sends_every_eligible_recipient_once(
        storage, delivery_env, sender, delivery_queue, session, tmp_path, monkeypatch):
    from carepost.campaigns import tasks

    mx = delivery_env.mx["valid"]
    original = mx.recorder.handle_DATA

    async def slow_data(server, smtp_session, envelope):
        await asyncio.sleep(0.03)  # a real server's latency: the kill lands while messages are in flight
        return await original(server, smtp_session, envelope)

    monkeypatch.setattr(mx.recorder, "handle_DATA", slow_data)
    org_id = sender.org_id
    with org_session(org_id) as s:
        seg = make_segment(s, org_id)
        version = make_template(s, org_id, blocks=False)
        for i in range(ELIGIBLE):
            make_contact(s, org_id, f"patient{i}@valid.test", sign=True)
        for i in range(UNAUTHORIZED):
            make_contact(s, org_id, f"nosign{i}@valid.test")
        camp_id = make_campaign(s, org_id, seg, version).id
        s.commit()

    def state():
        # A read that takes no write lock: an org_session would BEGIN IMMEDIATE on SQLite and queue
        # behind the worker's plan chunks, seeing the count only after planning (and sending) ended.
        with read_only_session(org_id) as s:
            c = s.get(Campaign, camp_id)
            return c.status, c.planned_count + c.excluded_count, c.plan_finished_at is not None

    workers = []
    try:
        workers.append(_worker(storage, tmp_path / "worker-1.log"))
        tasks.plan_campaign(org_id, camp_id)
        deadline = time.monotonic() + 60
        while state()[1] < 8:  # two chunks of four: the kill lands with most of the plan still to do
            assert workers[0].poll() is None, (tmp_path / "worker-1.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "planning did not start"
            time.sleep(0.005)
        _kill(workers[0])
        status, done, finished = state()
        assert status == "planning" and not finished and done < ELIGIBLE + UNAUTHORIZED, \
            "the kill came after planning finished"
        mid_plan = done

        workers.append(_worker(storage, tmp_path / "worker-2.log"))  # resumes the stalled plan when it starts
        deadline = time.monotonic() + 90
        while len(mx.recorder.messages) < ELIGIBLE // 3:
            assert workers[1].poll() is None, (tmp_path / "worker-2.log").read_text()[-3000:]
            assert time.monotonic() < deadline, f"only {len(mx.recorder.messages)} arrived"
            time.sleep(0.01)
        _kill(workers[1])
        killed_at = time.monotonic()
        arrived_at_kill = len(mx.recorder.messages)
        assert arrived_at_kill < ELIGIBLE, "the kill came after everything was sent"

        workers.append(_worker(storage, tmp_path / "worker-3.log"))
        deadline = killed_at + LEASE_SECONDS + 60 + 30  # the lease, then delivery's minute sweep
        while True:
            assert workers[2].poll() is None, (tmp_path / "worker-3.log").read_text()[-3000:]
            session.rollback()
            delivered = session.scalar(select(func.count()).select_from(MessageRecipient).join(
                Message, Message.id == MessageRecipient.message_id).where(
                Message.campaign_id == camp_id, MessageRecipient.status == "delivered"))
            if delivered == ELIGIBLE and state()[0] == "completed":
                break
            if time.monotonic() >= deadline:
                pytest.fail(f"not all delivered after the kill: {delivered} delivered, campaign {state()}")
            time.sleep(0.5)
        recovered_in = time.monotonic() - killed_at
    finally:
        for proc in workers:
            stop(proc)

    received = Counter(rcpt for m in mx.recorder.messages for rcpt in m.rcpt_tos)
    expected = {f"patient{i}@valid.test" for i in range(ELIGIBLE)}
    assert set(received) == expected, f"missing: {sorted(expected - set(received))[:10]}; " \
                                      f"unexpected: {sorted(set(received) - expected)[:10]}"
    twice = {address for address, n in received.items() if n > 1}
    assert all(n <= 2 for n in received.values())
    assert len(twice) <= CONCURRENCY, f"{len(twice)} duplicates, more than could be in flight"
    # one Message-ID per recipient: a copy sent again is the same message, never a second one
    ids_by_rcpt: dict[str, set[str]] = {}
    for m in mx.recorder.messages:
        parsed = email.message_from_bytes(m.data, policy=email_policy.default)
        ids_by_rcpt.setdefault(m.rcpt_tos[0], set()).add(str(parsed["Message-ID"]))
    assert all(len(ids) == 1 for ids in ids_by_rcpt.values())
    assert len({i for ids in ids_by_rcpt.values() for i in ids}) == ELIGIBLE

    session.rollback()
    rows = session.scalars(select(CampaignRecipient).where(CampaignRecipient.campaign_id == camp_id)).all()
    assert len(rows) == ELIGIBLE and {r.status for r in rows} == {"materialized"}
    assert len({r.message_id for r in rows}) == ELIGIBLE
    assert session.scalar(select(func.count()).select_from(Message).where(Message.campaign_id == camp_id)) == ELIGIBLE
    reasons = Counter(session.scalars(select(CampaignExclusion.reason).where(CampaignExclusion.campaign_id == camp_id)))
    assert reasons == {"no_authorization": UNAUTHORIZED}
    c = session.get(Campaign, camp_id)
    assert (c.planned_count, c.excluded_count, c.materialized_count) == (ELIGIBLE, UNAUTHORIZED, ELIGIBLE)
    from carepost.core.crypto import get_keyring

    ring = get_keyring()
    recs = session.scalars(select(MessageRecipient).join(Message, Message.id == MessageRecipient.message_id)
                           .where(Message.campaign_id == camp_id)).all()
    flagged = {ring.decrypt_text(session, r.org_id, MessageRecipient.__tablename__, "address", r.id, r.address_enc)
               for r in recs if r.possible_duplicate}
    assert twice <= flagged, f"duplicates not flagged: {sorted(twice - flagged)}"
    print(f"kill -9 mid-plan after {mid_plan}/{ELIGIBLE + UNAUTHORIZED} planned, mid-send after "
          f"{arrived_at_kill}/{ELIGIBLE} arrived: {len(twice)} duplicates, {len(flagged)} flagged, "
          f"all delivered {recovered_in:.1f} s after the second kill")
