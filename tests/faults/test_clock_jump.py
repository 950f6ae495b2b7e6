"""The wall clock jumps, forward and backward, under a scheduled campaign and a quiet-hours
deferral (issue 17 item 3).

CarePost reads the time through one function, ``carepost.core.clock.now`` (the clock tests move
with ``clock.advance``); the queue (Huey) reads it through ``huey.utils.utcnow`` — for the delays
and ETAs of scheduled tasks. A process's wall clock cannot be moved without moving the machine's,
so the worker runs in this process: its queue is the test's real queue, drained task by task
(``huey.dequeue`` / ``huey.execute``, as the consumer does), its minute sweeps
(``delivery.deliver_due``, ``campaigns.sweep``) called at each step, and both clocks jumped
together. The messages go to a real SMTP server (verified TLS).

The story, on the product's clock (quiet hours 21:00-08:00 UTC; a marketing campaign to 20
authorized contacts scheduled for 22:00):

1. 19:00 the campaign is launched: planned, nothing sent; its sending task waits.
2. back to 17:00; forward to 21:59: nothing sent, nothing materialized (not early).
3. 22:01: the messages are made and deferred by the quiet hours to 08:00; nothing sent.
4. back to 20:00; forward to 07:59: nothing sent (not early).
5. 08:00:30: the sweep releases them; while the first copies are at the SMTP server the clock
   jumps forward an hour — past the sending run's lease — and a second run claims the
   recipients (the sweep finds them due again). The first run must send nothing the second
   sends (a copy it had marked as being sent, the second sends again flagged
   ``possible_duplicate``).
6. back to 05:00: nothing is sent again; the campaign is completed.

What must hold, counted by Message-ID at the SMTP server: each message arrived exactly once, or
twice flagged with the reason; none arrived before 08:00 (nor before 22:00); nothing is stuck.
"""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select

from carepost.campaigns.models import Campaign, CampaignRecipient
from carepost.core import clock
from carepost.core.database import org_session
from carepost.delivery.models import Message
from tests.faults import assert_each_sent_once_or_flagged, recipient_rows
from tests.test_campaigns_planning import (
    make_campaign,
    make_contact,
    make_segment,
    make_template,
)

pytestmark = pytest.mark.slow

COUNT = 20
CONCURRENCY = 4


def _set_clock(when: datetime) -> None:
    """Jump the wall clock (the product's and the queue's) to ``when``."""
    clock.advance(when - clock.now())


def _run_worker() -> list[str]:
    """One pass of a worker over the queue: due scheduled tasks enqueued, then every queued task
    run (a task for later goes to the schedule), as Huey's consumer does; the names run."""
    from carepost.core.queue import huey

    names = []
    for _ in range(500):
        for task in huey.read_schedule():
            huey.enqueue(task)
        task = huey.dequeue()
        if task is None:
            return names
        names.append(task.name)
        huey.execute(task)
    raise AssertionError(f"the queue never emptied: {names[-10:]}")


def _sweeps() -> None:
    """The worker's minute sweeps."""
    from carepost.campaigns.tasks import sweep
    from carepost.delivery.tasks import deliver_due

    deliver_due.call_local()
    sweep.call_local()


def test_clock_jumps_neither_send_early_nor_twice_nor_leave_anything_stuck(
        storage, delivery_env, sender, delivery_queue, session, monkeypatch):
    import huey.api
    import huey.utils

    from carepost.consent.service import set_consent_settings
    from carepost.core.config import reset_settings
    from carepost.delivery import pipeline

    monkeypatch.setenv("CAREPOST_DELIVERY_CONCURRENCY", str(CONCURRENCY))
    monkeypatch.setenv("CAREPOST_DELIVERY_BATCH_SIZE", "50")
    monkeypatch.setenv("CAREPOST_SMTP_TIMEOUT", "30")  # the copies held at the server must not time out
    reset_settings()
    pipeline.reset()

    def queue_now() -> datetime:
        return clock.now().astimezone(UTC).replace(tzinfo=None)

    monkeypatch.setattr(huey.api, "utcnow", queue_now)  # the queue's clock is the wall clock too
    monkeypatch.setattr(huey.utils, "utcnow", queue_now)

    mx = delivery_env.mx["valid"]
    original = mx.recorder.handle_DATA
    arrived_at: list[datetime] = []
    gate = threading.Event()
    gate.set()
    held: list[str] = []

    async def data(server, smtp_session, envelope):
        arrived_at.append(clock.now())
        if not gate.is_set() and len(held) < CONCURRENCY:
            held.append(envelope.rcpt_tos[0])
            while not gate.is_set():  # the copy is at the server, its answer not yet given
                await asyncio.sleep(0.01)
        return await original(server, smtp_session, envelope)

    monkeypatch.setattr(mx.recorder, "handle_DATA", data)

    org_id = sender.org_id
    with org_session(org_id) as s:
        set_consent_settings(s, org_id, {"quiet_hours_start": "21:00", "quiet_hours_end": "08:00",
                                         "default_time_zone": "UTC"})
        seg = make_segment(s, org_id)
        version = make_template(s, org_id, blocks=False)
        for i in range(COUNT):
            make_contact(s, org_id, f"patient{i}@valid.test", sign=True)
        s.commit()

    day = (clock.now() + timedelta(days=2)).date()  # well after the authorizations were signed

    def at(hour: int, minute: int = 0, second: int = 0, days: int = 0) -> datetime:
        return datetime(day.year, day.month, day.day, hour, minute, second, tzinfo=UTC) + timedelta(days=days)

    def campaign() -> Campaign:
        with org_session(org_id) as s:
            return s.get(Campaign, camp_id)

    def materialized() -> int:
        session.rollback()
        return session.scalar(select(func.count()).select_from(Message).where(Message.campaign_id == camp_id))

    def nothing_sent(step: str) -> None:
        assert not mx.recorder.messages, f"{step}: {len(mx.recorder.messages)} sent early"

    # 1. 19:00: launched, planned, waiting for 22:00.
    _set_clock(at(19))
    with org_session(org_id) as s:
        camp_id = make_campaign(s, org_id, seg, version, schedule_kind="at", send_at=at(22), launched_at=clock.now(),
                                status="planning").id
        s.commit()
    from carepost.campaigns.tasks import plan_campaign

    plan_campaign(org_id, camp_id)
    names = _run_worker()
    assert names[:2] == ["campaigns.plan_campaign", "campaigns.send_campaign"], names
    assert campaign().status == "sending" and campaign().planned_count == COUNT
    nothing_sent("19:00")

    # 2. Back two hours, then forward to a minute before the send time: still nothing.
    for when in (at(17), at(21, 59)):
        _set_clock(when)
        _sweeps()
        _run_worker()
        nothing_sent(when.strftime("%H:%M"))
        assert materialized() == 0, f"{when:%H:%M}: materialized before 22:00"

    # 3. 22:01: the messages are made, and deferred by the quiet hours to 08:00.
    _set_clock(at(22, 1))
    _sweeps()
    _run_worker()
    assert materialized() == COUNT
    message_ids = [m for m in session.scalars(select(Message.id).where(Message.campaign_id == camp_id))]
    rows = recipient_rows(session, message_ids)
    assert {(r.status, r.reason) for r in rows} == {("deferred", "quiet_hours")}
    assert {clock.aware(r.next_attempt_at) for r in rows} == {at(8, days=1)}
    nothing_sent("22:01")

    # 4. Back to 20:00, forward to 07:59: nothing yet.
    for when in (at(20), at(7, 59, days=1)):
        _set_clock(when)
        _sweeps()
        _run_worker()
        nothing_sent(when.strftime("%H:%M"))

    # 5. 08:00:30: released. The clock jumps an hour while the first copies are at the server.
    _set_clock(at(8, 0, 30, days=1))
    gate.clear()
    _sweeps()
    first = threading.Thread(target=_run_worker, name="first-run")
    first.start()
    deadline = time.monotonic() + 60
    while len(held) < CONCURRENCY:
        assert first.is_alive() and time.monotonic() < deadline, f"only {len(held)} copies reached the server"
        time.sleep(0.01)
    _set_clock(at(9, 0, 30, days=1))  # past the first run's lease (CAREPOST_DELIVERY_LEASE_SECONDS, 900 s)
    lease_ends = clock.now()
    _sweeps()  # due again: the lease expired

    def second_run() -> None:
        from carepost.delivery.tasks import deliver_messages

        deliver_messages.call_local(message_ids)

    second = threading.Thread(target=second_run, name="second-run")
    second.start()
    while True:  # until the second run holds every recipient
        rows = recipient_rows(session, message_ids)
        if all(r.lease_until and clock.aware(r.lease_until) > lease_ends for r in rows):
            break
        assert second.is_alive() and time.monotonic() < deadline, "the second run claimed nothing"
        time.sleep(0.01)
    gate.set()
    first.join(120)
    second.join(120)
    assert not first.is_alive() and not second.is_alive()
    _run_worker()  # what the sweep queued

    # 6. Back to 05:00: nothing again; the campaign completed.
    _set_clock(at(5, days=1))
    _sweeps()
    _run_worker()
    _set_clock(at(9, 30, days=1))
    _sweeps()
    _run_worker()

    verdict = assert_each_sent_once_or_flagged(session, [m.data for m in mx.recorder.messages], message_ids)
    assert verdict["twice"] <= CONCURRENCY, verdict  # only the copies held at the server when the clock jumped
    assert min(arrived_at) >= at(8, days=1), f"sent before the quiet hours ended: {min(arrived_at)}"
    assert campaign().status == "completed"
    session.rollback()
    left = session.scalar(select(func.count()).select_from(CampaignRecipient).where(
        CampaignRecipient.campaign_id == camp_id, CampaignRecipient.status != "materialized"))
    assert left == 0
    print(f"clock jumps: {verdict}; first arrival at {min(arrived_at):%Y-%m-%d %H:%M:%S} on the product's clock")


def test_clock_set_back_across_a_worker_killed_mid_send_leaves_nothing_stuck(
        storage, delivery_env, sender, delivery_queue, session, tmp_path, monkeypatch):
    """The wall clock set back an hour across a kill -9 (issue 17 item 3).

    A real ``carepost worker`` (the machine's clock) sends a marketing campaign to 30 contacts;
    while two copies are at the SMTP server it is killed with SIGKILL: its recipients keep leases
    that end ``CAREPOST_DELIVERY_LEASE_SECONDS`` (900 s) after the real time, and the campaign
    a heartbeat of the real time. Then the clock is set back an hour — into the quiet hours,
    which end 15 minutes before the kill — and the worker that takes over is this process (its
    clock moved with ``clock.advance``, the queue's with it), draining the same real queue, with
    its minute sweeps. A second campaign is scheduled for 20 minutes after the kill.

    Before, the dead worker's leases and the campaign's heartbeat lay an hour and a quarter
    ahead of the clock: its recipients and the rest of its campaign were stuck until the clock
    caught up. Now a lease or heartbeat further ahead than any is written counts as run out
    (``pipeline.lease_free``, ``sending.stalled``).

    What must hold: nothing is sent in the quiet hours (everything the new worker takes is
    deferred to their end), nothing before the second campaign's time, nothing is stuck, and
    each Message-ID arrives once, or twice flagged ``possible_duplicate`` for the copies that
    were at the server at the kill. Those copies, deferred by the quiet hours before they are
    sent again, keep their being-sent mark through the deferral (``pipeline.record``), so the
    send after the quiet hours flags them."""
    import signal

    import huey.api
    import huey.utils

    from carepost.campaigns.tasks import plan_campaign
    from carepost.consent.service import set_consent_settings
    from carepost.core.config import reset_settings
    from carepost.delivery import pipeline
    from tests.faults import start_worker, stop

    monkeypatch.setenv("CAREPOST_DELIVERY_CONCURRENCY", "2")
    monkeypatch.setenv("CAREPOST_DELIVERY_BATCH_SIZE", "5")
    monkeypatch.setenv("CAREPOST_CAMPAIGN_SEND_BATCH", "5")
    monkeypatch.setenv("CAREPOST_SMTP_TIMEOUT", "30")
    reset_settings()
    pipeline.reset()

    def queue_now() -> datetime:
        return clock.now().astimezone(UTC).replace(tzinfo=None)

    monkeypatch.setattr(huey.api, "utcnow", queue_now)
    monkeypatch.setattr(huey.utils, "utcnow", queue_now)

    mx = delivery_env.mx["valid"]
    original = mx.recorder.handle_DATA
    arrived_at: list[datetime] = []
    gate = threading.Event()
    gate.set()
    held: list[str] = []
    hold_after = 6

    async def data(server, smtp_session, envelope):
        arrived_at.append(clock.now())  # the MX runs in this process: the product's clock
        if len(arrived_at) > hold_after and gate.is_set() and not held:
            gate.clear()
        if not gate.is_set() and len(held) < 2:
            held.append(envelope.rcpt_tos[0])
            while not gate.is_set():
                await asyncio.sleep(0.01)
        return await original(server, smtp_session, envelope)

    monkeypatch.setattr(mx.recorder, "handle_DATA", data)

    t0 = clock.now().replace(second=0, microsecond=0)
    quiet_start, quiet_end = t0 - timedelta(minutes=75), t0 - timedelta(minutes=15)
    org_id = sender.org_id
    # The authorizations are signed three hours before: an authorization signed after the time
    # the clock is set back to does not yet exist then (excluded, no_authorization).
    _set_clock(t0 - timedelta(hours=3))
    with org_session(org_id) as s:
        set_consent_settings(s, org_id, {"quiet_hours_start": f"{quiet_start:%H:%M}",
                                         "quiet_hours_end": f"{quiet_end:%H:%M}", "default_time_zone": "UTC"})
        version = make_template(s, org_id, blocks=False)
        seg_now = make_segment(s, org_id)
        seg_later = make_segment(s, org_id, "city = Shelbyville", "Shelbyville")
        for i in range(30):
            make_contact(s, org_id, f"now{i}@valid.test", sign=True)
        for i in range(5):
            make_contact(s, org_id, f"later{i}@valid.test", sign=True, city="Shelbyville")
        now_id = make_campaign(s, org_id, seg_now, version, name="Now").id
        later_id = make_campaign(s, org_id, seg_later, version, name="Later", schedule_kind="at",
                                 send_at=t0 + timedelta(minutes=20)).id
        s.commit()
    clock.reset()  # the machine's clock again, as the worker's
    plan_campaign(org_id, now_id)
    plan_campaign(org_id, later_id)

    log_path = tmp_path / "worker.log"
    worker = start_worker(storage, log_path, periodic=False)
    try:
        deadline = time.monotonic() + 180
        while len(held) < 2:
            assert worker.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, f"only {len(arrived_at)} arrived"
            time.sleep(0.01)
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
    finally:
        stop(worker)
    killed_at = clock.now()
    sent_before = len(arrived_at)
    gate.set()  # the server answers the copies of the dead worker

    # The clock is set back an hour: into the quiet hours. This process is the worker now.
    _set_clock(killed_at - timedelta(hours=1))
    assert quiet_start < clock.now() < quiet_end
    _sweeps()
    _run_worker()

    def campaign_messages(campaign_id: str) -> list[str]:
        session.rollback()
        return list(session.scalars(select(Message.id).where(Message.campaign_id == campaign_id)))

    rows = recipient_rows(session, campaign_messages(now_id))
    assert len(rows) == 30, "the killed worker's campaign was not taken over"
    open_rows = [r for r in rows if r.status != "delivered"]
    assert open_rows and all((r.status, r.reason) == ("deferred", "quiet_hours") and not r.lease_owner
                             for r in open_rows), {(r.status, r.reason, bool(r.lease_owner)) for r in open_rows}
    assert {clock.aware(r.next_attempt_at) for r in open_rows} == {quiet_end}
    assert len(arrived_at) == sent_before, "sent in the quiet hours"
    assert not campaign_messages(later_id)

    # Forward past the quiet hours, then past the second campaign's time.
    for when in (quiet_end + timedelta(seconds=30), t0 + timedelta(minutes=21)):
        _set_clock(when)
        _sweeps()
        _run_worker()
    ids = campaign_messages(now_id) + campaign_messages(later_id)
    verdict = assert_each_sent_once_or_flagged(session, [m.data for m in mx.recorder.messages], ids)
    assert verdict["twice"] <= 2, verdict
    assert verdict["flagged"] >= len(held), verdict  # the copies at the server at the kill: it may have them
    after = arrived_at[sent_before:]
    assert all(a >= quiet_end for a in after), f"sent in the quiet hours: {min(after)}"
    later_rows = recipient_rows(session, campaign_messages(later_id))
    assert len(later_rows) == 5
    with org_session(org_id) as s:
        assert {s.get(Campaign, c).status for c in (now_id, later_id)} == {"completed"}
    print(f"clock set back 1 h across a kill -9 after {sent_before} arrivals: {verdict}; the rest deferred to the "
          f"end of the quiet hours and sent then")
