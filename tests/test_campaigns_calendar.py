"""The campaign calendar's data (issue 14 item 2): campaigns on their day in the organization's
time zone, and the journeys' scheduled sends — runs waiting to reach a send step — counted per
journey, step and day in one grouped statement (``journeys/calendar.py``). The month page and its
overlap warnings: tests/test_campaigns_pages.py and tests/test_ui_campaigns_calendar.py."""

from __future__ import annotations

from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from carepost.core import clock
from carepost.core.database import org_session
from carepost.journeys import calendar as journey_calendar
from carepost.journeys import engine
from carepost.journeys.models import Journey
from tests.test_campaigns_service import person
from tests.test_journeys_engine import definition, make_journey, record, runs, template_ref, tick


def test_scheduled_journey_sends_are_counted_per_step_and_day_of_the_zone(sender, session):
    org_id = sender.org_id
    engine.forget_definitions()
    with org_session(org_id) as s:
        ref = template_ref(s, org_id)
        tid, number = ref
        # wait 2 days, then send: the waiting runs are scheduled sends on the day they wake
        to_send, _ = make_journey(s, org_id, definition(ref, start="w", steps={
            "w": {"type": "wait", "duration": "2d", "next": "s"},
            "s": {"type": "send", "template_id": tid, "template_version": number, "next": "x"},
            "x": {"type": "exit"}}))
        # wait 2 days, then a branch: not a send that day
        to_branch, _ = make_journey(s, org_id, definition(ref, start="w", entry={"type": "event", "event": "visit"},
                                                          steps={
            "w": {"type": "wait", "duration": "2d", "next": "b"},
            "b": {"type": "branch", "cases": [], "default": "x"},
            "x": {"type": "exit"}}))
        from tests.test_campaigns_planning import make_contact

        contacts = [make_contact(s, org_id, f"j{i}@valid.test") for i in range(3)]
        s.commit()
    for c in contacts:
        record(org_id, c)
        record(org_id, c, name="visit")
    now = clock.now()
    tick(org_id, now=now)
    assert {(r.journey_id, r.state, r.step_id) for r in runs(org_id)} == {(to_send, "waiting", "s"),
                                                                          (to_branch, "waiting", "b")}
    zone = "Pacific/Kiritimati"  # UTC+14: the wake day there is not the UTC day for most of the day
    wake = max(clock.aware(r.wake_at) for r in runs(org_id, to_send))
    day = wake.astimezone(ZoneInfo(zone)).date()
    with org_session(org_id) as s:
        found = journey_calendar.scheduled_sends(s, org_id, day - timedelta(days=3), day + timedelta(days=3), zone)
        assert [(e["day"], e["journey_id"], e["step_id"], e["count"]) for e in found] == \
            [(day.isoformat(), to_send, "s", 3)]
        assert journey_calendar.scheduled_sends(s, org_id, day + timedelta(days=1), day + timedelta(days=9), zone) == []
        # the page's entries: for a viewer who may read journeys, with a link to the journey
        entries = journey_calendar.calendar_entries(s, person(org_id, "marketer"), day, day, zone)
        assert entries == [{"day": day.isoformat(), "kind": "journey", "label": "Test journey — s", "count": 3,
                            "link": f"/app/journeys/{to_send}"}]
        assert journey_calendar.calendar_entries(s, person(org_id, "developer"), day, day, zone) == []  # no journeys:read
        # a paused journey sends nothing: not on the calendar
        s.get(Journey, to_send).status = "paused"
        s.flush()
        assert journey_calendar.scheduled_sends(s, org_id, day, day, zone) == []
        s.rollback()


def test_campaigns_are_on_their_day_in_the_organizations_zone(sender, session):
    from carepost.campaigns import service
    from tests.test_campaigns_service import make_contact, make_segment, make_template, values

    org_id = sender.org_id
    owner = person(org_id, "owner")
    auckland = ZoneInfo("Pacific/Auckland")
    day = (clock.now().astimezone(auckland) + timedelta(days=5)).date()
    with org_session(org_id) as s:
        seg, ver = make_segment(s, org_id), make_template(s, org_id, purpose="treatment")
        make_contact(s, org_id, "both@valid.test")  # in both audiences
        early = service.create_campaign(s, org_id, values(seg, ver, name="Early", purpose="treatment",
                                                          schedule_kind="at", time_zone="Pacific/Auckland",
                                                          send_at=datetime.combine(day, datetime.min.time())
                                                          .replace(hour=0, minute=15)), owner)
        local = service.create_campaign(s, org_id, values(seg, ver, name="Local", purpose="treatment",
                                                          schedule_kind="local", local_time="09:00",
                                                          local_date=day), owner)
        s.commit()
        utc_day = clock.aware(early.send_at).astimezone(ZoneInfo("UTC")).date()
        assert utc_day == day - timedelta(days=1)  # 00:15 in Auckland is the day before in UTC
        cal = service.calendar(s, org_id, day, day, owner, time_zone="Pacific/Auckland")
        # by send time: "Early" at 00:15 Auckland, "Local" at 09:00 UTC+14 (its earliest instant)
        assert [(c["name"], c["day"], c["time"]) for c in cal["campaigns"]] == [("Early", day.isoformat(), "00:15"),
                                                                               ("Local", day.isoformat(), "09:00")]
        assert cal["time_zone"] == "Pacific/Auckland"
        assert {c["name"] for c in service.calendar(s, org_id, utc_day, utc_day, owner)["campaigns"]} == {"Early"}
        assert [(w["campaigns"], w["overlap"]) for w in cal["overlaps"]] == [([early.id, local.id], 1)]
