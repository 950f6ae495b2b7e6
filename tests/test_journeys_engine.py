"""The journeys engine (issue 15 items 1, 2 and 4): entries, steps, goals, exits, re-entry,
eligibility at send time, tenant isolation and duplicate events — on both databases, with the
real consent, content, delivery (message store) and tracking pieces. The kill -9 test with a real
worker and SMTP server is in tests/test_journeys_engine_crash.py."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from carepost.core import clock
from carepost.core.database import org_session
from carepost.delivery.models import Message
from carepost.journeys import engine, entries
from carepost.journeys.models import (
    Journey,
    JourneyRun,
    JourneyRunStep,
    JourneyVersion,
    step_key,
)
from tests.test_campaigns_planning import make_contact, make_template


def make_journey(s, org_id, definition, *, published_ago=timedelta(hours=2), status="live") -> tuple[str, str]:
    """A live journey with its published version 1 (written directly: the definitions helper's
    service and validation have their own tests)."""
    j = Journey(org_id=org_id, name="Test journey", status=status, current_version=1)
    s.add(j)
    s.flush()
    v = JourneyVersion(org_id=org_id, journey_id=j.id, version=1, definition=definition,
                       published_at=clock.now() - published_ago)
    s.add(v)
    s.flush()
    return j.id, v.id


def definition(template_version, *, entry=None, steps=None, purpose="treatment", **extra) -> dict:
    tid, number = template_version
    out = {
        "purpose": purpose,
        "entry": entry or {"type": "event", "event": "appointment.booked"},
        "reentry": {"mode": "never"},
        "start": "s1",
        "steps": steps or {
            "s1": {"type": "send", "template_id": tid, "template_version": number, "next": "s2"},
            "s2": {"type": "wait", "duration": "2d", "next": "s3"},
            "s3": {"type": "branch", "cases": [
                {"when": {"kind": "engagement", "step": "s1", "is": "clicked"}, "next": "s4"}], "default": "s5"},
            "s4": {"type": "send", "template_id": tid, "template_version": number, "next": "s6"},
            "s5": {"type": "send", "template_id": tid, "template_version": number, "next": "s6"},
            "s6": {"type": "exit"},
        },
    }
    out.update(extra)
    return out


def template_ref(s, org_id, purpose="treatment") -> tuple[str, int]:
    from carepost.content.models import MessageTemplateVersion

    vid = make_template(s, org_id, purpose=purpose, blocks=False)
    v = s.get(MessageTemplateVersion, vid)
    return v.template_id, v.version


def record(org_id, contact_id, name="appointment.booked", key=None, at=None):
    from carepost.tracking import conversions

    with org_session(org_id) as s:
        event, created = conversions.record_event(s, org_id, name=name, contact_id=contact_id, idempotency_key=key,
                                                  request_hash="h" if key else None, occurred_at=at)
        s.commit()
        return event.id, created


def runs(org_id, journey_id=None):
    with org_session(org_id) as s:
        q = select(JourneyRun).where(JourneyRun.org_id == org_id)
        if journey_id:
            q = q.where(JourneyRun.journey_id == journey_id)
        return list(s.scalars(q.order_by(JourneyRun.entered_at, JourneyRun.id)))


def steps_of(org_id, run_id):
    with org_session(org_id) as s:
        return [(r.step_id, r.status, r.reason, r.message_id) for r in s.scalars(
            select(JourneyRunStep).where(JourneyRunStep.run_id == run_id).order_by(JourneyRunStep.seq))]


def tick(org_id, now=None):
    return engine.run_tick(org_id, now=now, enqueue=False)


@pytest.fixture(autouse=True)
def _fresh_definitions():
    engine.forget_definitions()
    yield
    engine.forget_definitions()


def _click(org_id, message_id):
    """A human click as tracking records it (its classified engagement row)."""
    from carepost.delivery.models import MessageRecipient
    from carepost.tracking.models import EngagementEvent

    with org_session(org_id) as s:
        rid = s.scalar(select(MessageRecipient.id).where(MessageRecipient.message_id == message_id))
        s.add(EngagementEvent(org_id=org_id, message_id=message_id, recipient_id=rid, type="clicked",
                              classification="human", rule="test"))
        s.commit()


# --------------------------------------------------------------------------- event entry, send, wait, branch


def test_event_entry_send_wait_branch_on_a_human_click_then_send(sender, session):
    org_id = sender.org_id
    with org_session(org_id) as s:
        ref = template_ref(s, org_id)
        jid, vid = make_journey(s, org_id, definition(ref))
        clicker = make_contact(s, org_id, "clicker@valid.test")
        quiet = make_contact(s, org_id, "quiet@valid.test")
        s.commit()

    record(org_id, clicker, key="k-1")
    record(org_id, clicker, key="k-1")  # the same event again (idempotency key): nothing new
    record(org_id, clicker, key="k-2")  # another event while the run is open: no second run
    record(org_id, quiet)
    assert sorted(r.contact_id for r in runs(org_id, jid)) == sorted([clicker, quiet])

    report = tick(org_id)
    assert report.sent == 2 and report.runs == 2
    by_contact = {r.contact_id: r for r in runs(org_id, jid)}
    for r in by_contact.values():
        assert r.state == "waiting" and r.step_id == "s3"
        assert clock.aware(r.wake_at) > clock.now() + timedelta(days=1, hours=23)
    first = {cid: steps_of(org_id, r.id) for cid, r in by_contact.items()}
    assert [x[:2] for x in first[clicker]] == [("s1", "sent"), ("s2", "done")]
    with org_session(org_id) as s:
        m = s.get(Message, first[clicker][0][3])
        assert m.source == "journey" and m.journey_step_id == step_key(vid, "s1") and m.purpose == "treatment"

    assert tick(org_id).runs == 0  # nothing due before the wait is over
    _click(org_id, first[clicker][0][3])
    later = clock.now() + timedelta(days=2, minutes=1)
    report = tick(org_id, now=later)
    assert report.sent == 2
    done = {r.contact_id: r for r in runs(org_id, jid)}
    assert all(r.state == "completed" and r.exit_reason == "exit_step" and r.active_key is None for r in done.values())
    assert [x[0] for x in steps_of(org_id, done[clicker].id)] == ["s1", "s2", "s3", "s4", "s6"]
    assert [x[0] for x in steps_of(org_id, done[quiet].id)] == ["s1", "s2", "s3", "s5", "s6"]
    with org_session(org_id) as s:
        sent = s.scalars(select(Message.journey_step_id).where(Message.source == "journey")).all()
    assert sorted(sent) == sorted([step_key(vid, "s1")] * 2 + [step_key(vid, "s4"), step_key(vid, "s5")])


# --------------------------------------------------------------------------- eligibility at send time


def test_a_send_honours_eligibility_with_campaigns_reason_codes(sender, session):
    org_id = sender.org_id
    with org_session(org_id) as s:
        ref = template_ref(s, org_id, purpose="marketing")
        jid, _ = make_journey(s, org_id, definition(ref, purpose="marketing"))
        signed = make_contact(s, org_id, "signed@valid.test", sign=True)
        unsigned = make_contact(s, org_id, "unsigned@valid.test")
        s.commit()
    record(org_id, signed)
    record(org_id, unsigned)
    report = tick(org_id)
    assert report.sent == 1 and report.excluded == 1
    by_contact = {r.contact_id: r for r in runs(org_id, jid)}
    assert by_contact[signed].state == "waiting"
    bad = by_contact[unsigned]
    assert bad.state == "exited" and bad.exit_reason == "failed:no_authorization"
    assert steps_of(org_id, bad.id) == [("s1", "excluded", "no_authorization", None)]


# --------------------------------------------------------------------------- goals and exits


def test_goal_ends_the_run_as_a_conversion(sender, session):
    org_id = sender.org_id
    with org_session(org_id) as s:
        ref = template_ref(s, org_id)
        jid, _ = make_journey(s, org_id, definition(ref, entry={"type": "event", "event": "patient.discharged"},
                                                    goal={"event": "appointment.booked", "within_days": 30}))
        cid = make_contact(s, org_id, "goal@valid.test")
        s.commit()
    record(org_id, cid, name="patient.discharged")
    tick(org_id)
    record(org_id, cid, name="appointment.booked")
    (run,) = runs(org_id, jid)
    assert run.state == "completed" and run.exit_reason == "goal" and run.converted_at is not None
    assert tick(org_id, now=clock.now() + timedelta(days=3)).runs == 0  # ended: never advanced again


def test_unsubscribe_and_revocation_exit_the_run(sender, session):
    from carepost.consent import authorizations
    from carepost.consent import service as consent
    from carepost.consent.models import Authorization

    org_id = sender.org_id
    with org_session(org_id) as s:
        ref = template_ref(s, org_id, purpose="marketing")
        jid, _ = make_journey(s, org_id, definition(ref, purpose="marketing"))
        leaver = make_contact(s, org_id, "leaver@valid.test", sign=True)
        revoker = make_contact(s, org_id, "revoker@valid.test", sign=True)
        s.commit()
    record(org_id, leaver)
    record(org_id, revoker)
    assert tick(org_id).sent == 2
    with org_session(org_id) as s:
        consent.unsubscribe_contact(s, org_id, leaver, None, source="test")
        auth_id = s.scalar(select(Authorization.id).where(Authorization.contact_id == revoker))
        authorizations.revoke_authorization(s, org_id, auth_id, by_type="staff", by=None, method="test")
        s.commit()
    by_contact = {r.contact_id: r for r in runs(org_id, jid)}
    assert (by_contact[leaver].state, by_contact[leaver].exit_reason) == ("exited", "unsubscribe")
    assert (by_contact[revoker].state, by_contact[revoker].exit_reason) == ("exited", "revocation")
    assert tick(org_id, now=clock.now() + timedelta(days=3)).sent == 0


def test_an_opt_out_from_all_marketing_ends_marketing_runs_not_treatment_runs(sender, session):
    """Unsubscribing from all marketing stops what the send-time check would refuse (a marketing
    journey), not an appointment reminder, whose next send stays eligible."""
    from carepost.consent import service as consent

    org_id = sender.org_id
    with org_session(org_id) as s:
        marketing = make_journey(s, org_id, definition(template_ref(s, org_id, purpose="marketing"),
                                                       purpose="marketing"))[0]
        treatment = make_journey(s, org_id, definition(template_ref(s, org_id), purpose="treatment"))[0]
        cid = make_contact(s, org_id, "both@valid.test", sign=True)
        s.commit()
    record(org_id, cid)
    assert tick(org_id).sent == 2
    with org_session(org_id) as s:
        consent.unsubscribe_contact(s, org_id, cid, None, source="test")
        s.commit()
    (m,), (t,) = runs(org_id, marketing), runs(org_id, treatment)
    assert (m.state, m.exit_reason) == ("exited", "unsubscribe")
    assert t.exit_reason is None and t.state not in ("exited", "completed", "failed")


# --------------------------------------------------------------------------- re-entry


@pytest.mark.parametrize("mode", ["never", "after", "always"])
def test_reentry_rules(sender, session, mode):
    org_id = sender.org_id
    steps = {"s1": {"type": "exit"}}
    with org_session(org_id) as s:
        ref = template_ref(s, org_id)
        jid, _ = make_journey(s, org_id, definition(ref, steps=steps, reentry={"mode": mode, "days": 30}))
        cid = make_contact(s, org_id, "again@valid.test")
        s.commit()
    record(org_id, cid)
    tick(org_id)
    assert [r.state for r in runs(org_id, jid)] == ["completed"]
    record(org_id, cid)  # the previous run ended a moment ago
    expected = {"never": 1, "after": 1, "always": 2}[mode]
    assert len(runs(org_id, jid)) == expected
    if mode == "after":  # 31 days later the contact may enter again
        with org_session(org_id) as s:
            for r in s.scalars(select(JourneyRun).where(JourneyRun.journey_id == jid)):
                r.entered_at = clock.now() - timedelta(days=31)
            s.commit()
        record(org_id, cid)
        assert len(runs(org_id, jid)) == 2


# --------------------------------------------------------------------------- tenant isolation


def test_events_for_another_organizations_patient_start_nothing(sender, session):
    from carepost.accounts import service as accounts
    from carepost.core.errors import NotFound, ValidationFailed

    org_id = sender.org_id
    with org_session(org_id) as s:
        ref = template_ref(s, org_id)
        _jid, _ = make_journey(s, org_id, definition(ref))
        s.commit()
    other_id = accounts.create_organization(session, "Other Clinic").id
    session.commit()
    with org_session(other_id) as s:
        foreign = make_contact(s, other_id, "foreign@valid.test")
        s.commit()
    # The other organization's event for its own patient: journeys of this organization do not hear it.
    record(other_id, foreign)
    assert runs(org_id) == [] and runs(other_id) == []
    # This organization naming the other's patient: refused, nothing stored, nothing started.
    with pytest.raises((NotFound, ValidationFailed)):
        record(org_id, foreign)
    assert runs(org_id) == []


# --------------------------------------------------------------------------- date-relative entries


def test_date_relative_entry_48_hours_before_an_appointment(sender, session):
    from carepost.patients.models import Appointment

    org_id = sender.org_id
    now = clock.now()
    with org_session(org_id) as s:
        ref = template_ref(s, org_id)
        jid, _ = make_journey(s, org_id, definition(
            ref, entry={"type": "date", "field": "appointment.start", "offset": "-48h"}))
        due = make_contact(s, org_id, "due@valid.test")
        soon = make_contact(s, org_id, "soon@valid.test")
        past = make_contact(s, org_id, "past@valid.test")
        cancelled = make_contact(s, org_id, "cancelled@valid.test")
        for cid, hours, status in ((due, 47, "booked"), (soon, 60, "booked"), (past, 30, "booked"),
                                   (cancelled, 47, "cancelled")):
            s.add(Appointment(org_id=org_id, contact_id=cid, status=status, start_at=now + timedelta(hours=hours)))
        s.commit()
    assert entries.evaluate_due(org_id, now=now) == 2
    assert entries.evaluate_due(org_id, now=now, force=True) == 0  # the same window again: nothing twice
    by_contact = {r.contact_id: r for r in runs(org_id, jid)}
    assert set(by_contact) == {due, soon}  # 30 h away was already inside 48 h when the journey was published
    assert clock.aware(by_contact[due].wake_at) <= now
    assert abs(clock.aware(by_contact[soon].wake_at) - (now + timedelta(hours=12))) < timedelta(seconds=1)
    report = tick(org_id, now=now)
    assert report.sent == 1
    assert tick(org_id, now=now + timedelta(hours=12, seconds=1)).sent == 1


def test_date_relative_entry_on_each_birthday(sender, session):
    from datetime import date, datetime
    from datetime import time as dtime

    org_id = sender.org_id
    now = clock.now()
    tomorrow = (now + timedelta(days=1)).date()
    with org_session(org_id) as s:
        ref = template_ref(s, org_id)
        jid, _ = make_journey(s, org_id, definition(
            ref, entry={"type": "date", "field": "birth_date", "anniversary": True, "at": "09:00"}))
        born = date(1984, tomorrow.month, tomorrow.day)  # 1984: a leap year, 29 February included
        birthday = make_contact(s, org_id, "bday@valid.test", birth_date=born)
        other = make_contact(s, org_id, "other@valid.test",
                             birth_date=born + timedelta(days=100))
        s.commit()
    from carepost.consent.service import consent_settings
    from carepost.journeys.steps import UTC, zone

    with org_session(org_id) as s:
        tz = zone(consent_settings(s, org_id).get("default_time_zone"), UTC)
    # An hour before 09:00 on the birthday in the organization's zone (never before now): the
    # horizon (a day ahead) covers 09:00, which has not passed, whatever the time of day the test runs.
    nine = datetime.combine(tomorrow, dtime(9, 0), tzinfo=tz)
    later = max(now, nine - timedelta(hours=1))
    entries.evaluate_due(org_id, now=later)
    got = runs(org_id, jid)
    assert [r.contact_id for r in got] == [birthday]
    assert other not in [r.contact_id for r in got]
    wake = clock.aware(got[0].wake_at).astimezone(tz)  # 09:00 on the birthday, in the organization's zone
    assert (wake.date(), wake.hour, wake.minute) == (tomorrow, 9, 0)
    assert got[0].state == "waiting"
    assert entries.evaluate_due(org_id, now=later, force=True) == 0


# --------------------------------------------------------------------------- split, wait_until, wait_event


def test_split_is_deterministic_and_wait_event_times_out_or_resumes(sender, session):
    org_id = sender.org_id
    steps = {
        "s1": {"type": "split", "variants": [{"name": "A", "weight": 50, "next": "s2"},
                                             {"name": "B", "weight": 50, "next": "s2"}]},
        "s2": {"type": "wait_event", "event": "form.submitted", "timeout": "3d", "next": "s3", "timeout_next": "s4"},
        "s3": {"type": "exit"},
        "s4": {"type": "wait_until", "time": "09:00", "weekdays": [1, 2, 3, 4, 5], "next": "s3"},
    }
    with org_session(org_id) as s:
        ref = template_ref(s, org_id)
        jid, _ = make_journey(s, org_id, definition(ref, steps=steps))
        a = make_contact(s, org_id, "a@valid.test", time_zone="America/Chicago")
        b = make_contact(s, org_id, "b@valid.test", time_zone="Europe/Paris")
        s.commit()
    record(org_id, a)
    record(org_id, b)
    tick(org_id)
    by_contact = {r.contact_id: r for r in runs(org_id, jid)}
    from carepost.journeys.steps import split_variant

    for r in by_contact.values():
        assert r.variants["s1"] == split_variant(r.id, "s1", steps["s1"]["variants"])["name"]
        assert r.state == "waiting" and r.waiting_event == "form.submitted"
    record(org_id, a, name="form.submitted")  # a answers: it goes on at once
    tick(org_id)
    ra = {r.contact_id: r for r in runs(org_id, jid)}[a]
    assert ra.state == "completed"
    assert [x[:3] for x in steps_of(org_id, ra.id)][-2:] == [("s2", "done", "event"), ("s3", "done", None)]
    later = clock.now() + timedelta(days=3, minutes=1)
    tick(org_id, now=later)  # b times out and waits for 09:00 on a weekday in Paris
    rb = {r.contact_id: r for r in runs(org_id, jid)}[b]
    assert rb.state == "waiting" and rb.step_id == "s3"
    from zoneinfo import ZoneInfo

    local = clock.aware(rb.wake_at).astimezone(ZoneInfo("Europe/Paris"))
    assert (local.hour, local.minute) == (9, 0) and local.isoweekday() <= 5
    assert ("s2", "done", "timeout") in [x[:3] for x in steps_of(org_id, rb.id)]


def test_a_paused_journey_advances_nothing_and_a_migrated_run_takes_the_new_versions_step(sender, session):
    org_id = sender.org_id
    steps = {"s1": {"type": "wait", "duration": "1h", "next": "s2"}, "s2": {"type": "exit"}}
    with org_session(org_id) as s:
        ref = template_ref(s, org_id)
        jid, _vid = make_journey(s, org_id, definition(ref, steps=steps))
        cid = make_contact(s, org_id, "paused@valid.test")
        s.commit()
    record(org_id, cid)
    tick(org_id)
    with org_session(org_id) as s:
        s.get(Journey, jid).status = "paused"
        s.commit()
    assert tick(org_id, now=clock.now() + timedelta(hours=2)).runs == 0
    # Version 2 (migrate): s2 now sends before leaving; the run moves to it.
    new_steps = {"s1": {"type": "wait", "duration": "1h", "next": "s2"},
                 "s2": {"type": "send", "template_id": ref[0], "template_version": ref[1], "next": "s3"},
                 "s3": {"type": "exit"}}
    with org_session(org_id) as s:
        v2 = JourneyVersion(org_id=org_id, journey_id=jid, version=2, definition=definition(ref, steps=new_steps),
                            published_at=clock.now(), migration_mode="migrate")
        s.add(v2)
        s.flush()
        j = s.get(Journey, jid)
        j.status, j.current_version = "live", 2
        for r in s.scalars(select(JourneyRun).where(JourneyRun.journey_id == jid)):
            r.version, r.version_id = 2, v2.id  # what service.publish does for "migrate"
        s.commit()
    report = tick(org_id, now=clock.now() + timedelta(hours=2))
    assert report.sent == 1
    (run,) = runs(org_id, jid)
    assert run.state == "completed" and [x[0] for x in steps_of(org_id, run.id)] == ["s1", "s2", "s3"]


# --------------------------------------------------------------------------- update, notify, webhook


def test_update_notify_and_webhook_steps(sender, session, make_user):
    from carepost.audit.models import AuditEvent
    from carepost.patients.models import Contact

    org_id = sender.org_id
    staff = make_user(org_id, role="marketer")
    steps = {
        "s1": {"type": "update", "action": "set_field", "field": "preferred_language", "value": "es", "next": "s2"},
        "s2": {"type": "notify", "role": "marketer", "text": "A patient finished the discharge follow-up.",
               "next": "s3"},
        "s3": {"type": "webhook", "event": "journey.step", "next": "s4"},
        "s4": {"type": "exit"},
    }
    with org_session(org_id) as s:
        ref = template_ref(s, org_id)
        jid, _ = make_journey(s, org_id, definition(ref, steps=steps))
        cid = make_contact(s, org_id, "update@valid.test")
        s.commit()
    record(org_id, cid)
    report = tick(org_id)
    assert report.steps == 4
    (run,) = runs(org_id, jid)
    assert run.state == "completed"
    assert [x[:3] for x in steps_of(org_id, run.id)] == [
        ("s1", "done", "set_field"), ("s2", "done", "notified:1"), ("s3", "done", None), ("s4", "done", None)]
    with org_session(org_id) as s:
        assert s.get(Contact, cid).preferred_language == "es"
        assert s.scalar(select(AuditEvent.id).where(AuditEvent.action == "journey.update",
                                                   AuditEvent.target_id == cid)) is not None
        notices = [m for m in s.scalars(select(Message).where(Message.org_id == org_id))
                   if "account:journey_notice" in (m.tags or [])]
    assert len(notices) == 1 and notices[0].contains_phi is False
    _ = staff


# --------------------------------------------------------------------------- segment entry, segment branch, refill


def test_segment_entry_admits_members_once_and_a_branch_tests_membership(sender, session):
    from tests.test_campaigns_planning import make_segment

    org_id = sender.org_id
    with org_session(org_id) as s:
        ref = template_ref(s, org_id)
        springfield = make_segment(s, org_id)  # city = Springfield
        shelby = make_segment(s, org_id, query="city = Shelbyville", name="Shelbyville")
        steps = {"s1": {"type": "branch", "cases": [{"when": {"kind": "segment", "segment_id": shelby}, "next": "s2"}],
                        "default": "s3"},
                 "s2": {"type": "exit"}, "s3": {"type": "wait", "duration": "1d", "next": "s2"}}
        jid, _ = make_journey(s, org_id, definition(ref, steps=steps,
                                                    entry={"type": "segment", "segment_id": springfield}))
        member = make_contact(s, org_id, "member@valid.test")
        outsider = make_contact(s, org_id, "outsider@valid.test", city="Shelbyville")
        s.commit()
    assert entries.evaluate_due(org_id) == 1
    assert entries.evaluate_due(org_id, force=True) == 0  # still a member, reentry never: not again
    (run,) = runs(org_id, jid)
    assert run.contact_id == member and outsider not in [r.contact_id for r in runs(org_id)]
    tick(org_id)
    (run,) = runs(org_id, jid)
    assert run.state == "waiting" and steps_of(org_id, run.id)[0][2] == "default"


def test_refill_due_entry_seven_days_before(sender, session):
    from carepost.patients.models import Medication

    org_id = sender.org_id
    today = clock.now().date()
    with org_session(org_id) as s:
        ref = template_ref(s, org_id)
        jid, _ = make_journey(s, org_id, definition(
            ref, entry={"type": "date", "field": "refill_due", "offset": "-7d"}), published_ago=timedelta(days=2))
        due = make_contact(s, org_id, "refill@valid.test")
        later = make_contact(s, org_id, "later@valid.test")
        s.add(Medication(org_id=org_id, contact_id=due, code_system="rxnorm", code="197361", status="active",
                         next_refill_due=today + timedelta(days=7)))
        s.add(Medication(org_id=org_id, contact_id=later, code_system="rxnorm", code="197361", status="active",
                         next_refill_due=today + timedelta(days=30)))
        s.commit()
    assert entries.evaluate_due(org_id) == 1
    (run,) = runs(org_id, jid)
    assert run.contact_id == due and run.entry_key.startswith("refill:")
    assert tick(org_id).sent == 1


def test_segment_entry_is_a_join_leaving_and_coming_back_joins_again(sender, session):
    from carepost.patients.models import Contact
    from tests.test_campaigns_planning import make_segment

    org_id = sender.org_id
    with org_session(org_id) as s:
        ref = template_ref(s, org_id)
        seg = make_segment(s, org_id)  # city = Springfield
        jid, _ = make_journey(s, org_id, definition(ref, steps={"s1": {"type": "exit"}},
                                                    entry={"type": "segment", "segment_id": seg},
                                                    reentry={"mode": "always"}))
        cid = make_contact(s, org_id, "mover@valid.test")
        s.commit()
    assert entries.evaluate_due(org_id) == 1
    tick(org_id)  # the run ends at once
    assert entries.evaluate_due(org_id, force=True) == 0  # still a member: no new join, even with "always"

    def move(city):
        with org_session(org_id) as s:
            s.get(Contact, cid).city = city
            s.commit()

    move("Shelbyville")
    assert entries.evaluate_due(org_id, force=True) == 0  # left
    move("Springfield")
    assert entries.evaluate_due(org_id, force=True) == 1  # joined again: a new run
    assert [r.state for r in runs(org_id, jid)] == ["completed", "active"]
