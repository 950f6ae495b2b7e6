"""Crash safety of the journeys tick (issue 15 item 2): a real ``carepost worker`` killed with
SIGKILL while it advances runs through two send steps, a second worker that finishes; every
Message-ID counted at a real SMTP server (the local MX of the fixtures).

What must hold: every run sends each of its two messages exactly once — one ``Message`` per
(run, send step), one step row per (run, step) — nobody is skipped, and every message arrives
(a copy that arrived twice was in flight at the kill and is the same Message-ID)."""

from __future__ import annotations

import email
import signal
import subprocess
import time
from collections import Counter
from email import policy as email_policy

import pytest
from sqlalchemy import func, select

from carepost.core import clock
from carepost.core.database import org_session, read_only_session
from carepost.delivery.models import Message, MessageRecipient
from carepost.journeys import engine, entries
from carepost.journeys.models import JourneyRun, JourneyRunStep
from tests.faults import start_worker, stop
from tests.test_campaigns_planning import make_contact
from tests.test_journeys_engine import definition, make_journey, template_ref

pytestmark = pytest.mark.slow

PATIENTS = 120
CHUNK = 4


def _worker(storage, log_path) -> subprocess.Popen:
    return start_worker(storage, log_path, delivery_lease_seconds=5, delivery_concurrency=4, delivery_batch_size=50,
                        journey_tick_chunk=CHUNK)


def test_kill_9_mid_tick_neither_skips_nor_repeats_a_send(storage, delivery_env, sender, delivery_queue, session,
                                                          tmp_path):
    from carepost.journeys import tasks

    engine.forget_definitions()
    mx = delivery_env.mx["valid"]
    org_id = sender.org_id
    steps = None
    with org_session(org_id) as s:
        ref = template_ref(s, org_id)
        steps = {"s1": {"type": "send", "template_id": ref[0], "template_version": ref[1], "next": "s2"},
                 "s2": {"type": "send", "template_id": ref[0], "template_version": ref[1], "next": "s3"},
                 "s3": {"type": "exit"}}
        jid, vid = make_journey(s, org_id, definition(ref, steps=steps))
        contacts = [make_contact(s, org_id, f"patient{i}@valid.test") for i in range(PATIENTS)]
        defn = definition(ref, steps=steps)
        now = clock.now()
        assert entries.start_runs(s, org_id, jid, 1, vid, defn, [(c, "test", now) for c in contacts], now) == PATIENTS
        s.commit()

    def advanced():
        # A read that takes no write lock: an org_session would BEGIN IMMEDIATE on SQLite and
        # queue behind the worker's chunks, seeing the count only after the tick had finished.
        with read_only_session(org_id) as s:
            return s.scalar(select(func.count()).select_from(JourneyRun).where(
                JourneyRun.journey_id == jid, JourneyRun.seq > 0))

    workers = []
    try:
        workers.append(_worker(storage, tmp_path / "worker-1.log"))
        tasks.advance(org_id)
        deadline = time.monotonic() + 90
        while advanced() < 3 * CHUNK:
            assert workers[0].poll() is None, (tmp_path / "worker-1.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the tick did not start"
            time.sleep(0.005)
        workers[0].send_signal(signal.SIGKILL)
        workers[0].wait(10)
        at_kill = advanced()
        assert at_kill < PATIENTS, "the kill came after the tick finished"

        workers.append(_worker(storage, tmp_path / "worker-2.log"))
        tasks.advance(org_id)
        deadline = time.monotonic() + 240  # the advance, then the minute tick hands lost messages to delivery again
        while True:
            assert workers[1].poll() is None, (tmp_path / "worker-2.log").read_text()[-3000:]
            session.rollback()
            delivered = session.scalar(select(func.count()).select_from(MessageRecipient).join(
                Message, Message.id == MessageRecipient.message_id).where(
                Message.source == "journey", MessageRecipient.status == "delivered"))
            open_runs = session.scalar(select(func.count()).select_from(JourneyRun).where(
                JourneyRun.journey_id == jid, JourneyRun.state != "completed"))
            if delivered == 2 * PATIENTS and open_runs == 0:
                break
            if time.monotonic() >= deadline:
                pytest.fail(f"after the kill: {delivered} delivered, {open_runs} runs not completed")
            time.sleep(0.5)
    finally:
        for proc in workers:
            stop(proc)

    session.rollback()
    # The database: one message per (run, send step), one step row per (run, step).
    assert session.scalar(select(func.count()).select_from(Message).where(Message.source == "journey")) == 2 * PATIENTS
    rows = session.execute(select(JourneyRunStep.run_id, JourneyRunStep.step_id, JourneyRunStep.message_id)
                           .where(JourneyRunStep.journey_id == jid)).all()
    assert Counter((r, st) for r, st, _ in rows) == {(r, st): 1 for r in {x[0] for x in rows} for st in ("s1", "s2", "s3")}
    assert len({m for _, _, m in rows if m}) == 2 * PATIENTS
    assert len({x[0] for x in rows}) == PATIENTS
    # The SMTP server: every patient got two different messages; a second copy is the same Message-ID.
    ids_by_rcpt: dict[str, set[str]] = {}
    for m in mx.recorder.messages:
        parsed = email.message_from_bytes(m.data, policy=email_policy.default)
        for rcpt in m.rcpt_tos:
            ids_by_rcpt.setdefault(rcpt, set()).add(str(parsed["Message-ID"]))
    assert set(ids_by_rcpt) == {f"patient{i}@valid.test" for i in range(PATIENTS)}
    assert all(len(ids) == 2 for ids in ids_by_rcpt.values())
    print(f"kill -9 mid-tick after {at_kill}/{PATIENTS} runs advanced; every patient got both messages once")


def test_an_event_reaches_the_patient_through_a_real_worker(storage, delivery_env, sender, delivery_queue, session,
                                                            tmp_path):
    """The whole path with no tick called by the test: an event recorded (as POST /api/v1/events
    does) starts the run and queues ``journeys.advance`` when its transaction commits; the worker
    runs the send step and delivers the message to the SMTP server; the run waits at the next step."""
    from carepost.tracking import conversions

    engine.forget_definitions()
    mx = delivery_env.mx["valid"]
    org_id = sender.org_id
    with org_session(org_id) as s:
        ref = template_ref(s, org_id)
        steps = {"s1": {"type": "send", "template_id": ref[0], "template_version": ref[1], "next": "s2"},
                 "s2": {"type": "wait", "duration": "2d", "next": "s3"}, "s3": {"type": "exit"}}
        jid, _ = make_journey(s, org_id, definition(ref, steps=steps))
        cid = make_contact(s, org_id, "event-patient@valid.test")
        s.commit()
    worker = _worker(storage, tmp_path / "worker.log")
    try:
        with org_session(org_id) as s:
            conversions.record_event(s, org_id, name="appointment.booked", contact_id=cid)
            s.commit()
        deadline = time.monotonic() + 120
        while not mx.recorder.messages:
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "nothing arrived"
            time.sleep(0.2)
    finally:
        stop(worker)
    assert [m.rcpt_tos for m in mx.recorder.messages] == [["event-patient@valid.test"]]
    session.rollback()
    (run,) = session.scalars(select(JourneyRun).where(JourneyRun.journey_id == jid)).all()
    assert run.state == "waiting" and run.step_id == "s3"
