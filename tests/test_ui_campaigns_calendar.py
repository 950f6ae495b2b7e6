"""Headless Chromium through the campaign calendar (issue 14 item 2) with a real ``carepost serve``.

An organization in Chicago time: two campaigns to the same patients two days apart in a coming
month, one the month after, and a journey whose runs wait to send. The marketer pages month by
month: weeks by days, each campaign on its Chicago day with its time, the journey's scheduled
sends on theirs (their count masked as "fewer than 11"), the overlap warning with its masked
count and both campaigns marked; at 390 px the grid gives way to a list of the days, nothing
clipped.
"""

from __future__ import annotations

import re
import secrets
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from playwright.sync_api import expect

from tests.fixtures.accounts import add_staff, ui_login
from tests.test_ui_campaigns import CLIPPED

pytestmark = pytest.mark.ui
expect.set_options(timeout=15000)
CHICAGO = ZoneInfo("America/Chicago")


def _add_months(first, n):
    index = first.year * 12 + first.month - 1 + n
    return first.replace(year=index // 12, month=index % 12 + 1, day=1)


@pytest.fixture(scope="module")
def clinic(live_server):
    from types import SimpleNamespace

    from carepost.accounts.service import create_organization
    from carepost.campaigns import service as campaigns
    from carepost.consent.service import set_consent_settings
    from carepost.core import clock
    from carepost.core.database import org_session, system_session
    from carepost.journeys import engine
    from carepost.journeys.models import JourneyRun
    from tests.test_campaigns_service import make_contact, make_segment, make_template, person, values
    from tests.test_journeys_engine import definition, make_journey, record, template_ref

    with system_session() as s:
        org = create_organization(s, f"Calendar Clinic {secrets.token_hex(2)}")
        marketer = add_staff(s, org.id, "marketer")
        s.commit()
        org_id = org.id
    owner = person(org_id, "owner")
    month = _add_months(clock.now().astimezone(CHICAGO).date().replace(day=1), 1)
    after = _add_months(month, 1)
    with org_session(org_id) as s:
        set_consent_settings(s, org_id, {"default_time_zone": "America/Chicago"})
        contacts = [make_contact(s, org_id, f"cal{i}@valid.test") for i in range(3)]
        seg, ver = make_segment(s, org_id, name="Springfield"), make_template(s, org_id, purpose="treatment")
        made = {}
        # 23:30 in Chicago is the next day in UTC: the calendar shows the Chicago day
        for name, day, hour, minute in (("Flu clinic", month.replace(day=10), 23, 30),
                                        ("Flu clinic reminder", month.replace(day=12), 9, 0),
                                        ("Spring newsletter", after.replace(day=3), 8, 15)):
            at = datetime.combine(day, datetime.min.time()).replace(hour=hour, minute=minute)
            made[name] = campaigns.create_campaign(s, org_id, values(seg, ver, name=name, purpose="treatment",
                                                                     schedule_kind="at", time_zone="America/Chicago",
                                                                     send_at=at), owner).id
        ref = template_ref(s, org_id)
        tid, number = ref
        journey_id, _ = make_journey(s, org_id, definition(ref, start="w", steps={
            "w": {"type": "wait", "duration": "3d", "next": "s"},
            "s": {"type": "send", "template_id": tid, "template_version": number, "next": "x"},
            "x": {"type": "exit"}}))
        s.commit()
    engine.forget_definitions()
    for c in contacts:
        record(org_id, c)
    engine.run_tick(org_id, enqueue=False)
    with org_session(org_id) as s:
        from sqlalchemy import select

        wakes = [clock.aware(w) for w in s.scalars(select(JourneyRun.wake_at).where(JourneyRun.journey_id == journey_id))]
    assert len(wakes) == 3
    journey_day = max(wakes).astimezone(CHICAGO).date()
    assert min(wakes).astimezone(CHICAGO).date() == journey_day
    return SimpleNamespace(org_id=org_id, marketer=marketer, month=month, after=after, made=made,
                           journey_id=journey_id, journey_day=journey_day)


def test_month_view_with_overlaps_journey_sends_and_a_list_on_a_phone(page, clinic):
    ui_login(page, clinic.marketer)
    page.get_by_test_id("main-nav").get_by_role("link", name="Campaigns", exact=True).click()
    calendar = page.get_by_test_id("campaign-calendar")
    expect(calendar.get_by_test_id("calendar-grid")).to_be_visible()
    expect(calendar.get_by_test_id("calendar-list")).to_be_hidden()
    expect(calendar).to_contain_text("Days in America/Chicago")

    # the month of the journey's sends (this month or the next)
    page.goto(f"/app/campaigns?month={clinic.journey_day.strftime('%Y-%m')}")
    cell = calendar.locator(f'[data-day="{clinic.journey_day.isoformat()}"]')
    expect(cell.get_by_test_id("calendar-journey")).to_have_text("Test journey — s fewer than 11 sends")
    expect(cell.get_by_test_id("calendar-journey").get_by_role("link")).to_have_attribute(
        "href", f"/app/journeys/{clinic.journey_id}")

    # next month by its link: weeks by days, the two campaigns on their Chicago days, the overlap
    page.goto("/app/campaigns")
    if clinic.journey_day.month != clinic.month.month:
        page.get_by_test_id("calendar-next").click()
    expect(page.get_by_test_id("calendar-month")).to_have_text(f"Calendar: {clinic.month.strftime('%B %Y')}")
    weeks = calendar.locator("tbody tr")
    assert 4 <= weeks.count() <= 6 and calendar.locator("thead th").count() == 7
    assert calendar.locator("tbody tr").first.locator("td").count() == 7
    tenth = calendar.locator(f'[data-day="{clinic.month.replace(day=10).isoformat()}"]')
    expect(tenth.get_by_test_id("calendar-entry")).to_have_text(re.compile(r"^23:30 Flu clinic\s*overlap$"))
    expect(calendar.locator(f'[data-day="{clinic.month.replace(day=11).isoformat()}"]')
           .get_by_test_id("calendar-entry")).to_have_count(0)  # not on the UTC day
    twelfth = calendar.locator(f'[data-day="{clinic.month.replace(day=12).isoformat()}"]')
    expect(twelfth.get_by_test_id("calendar-entry")).to_contain_text("09:00 Flu clinic reminder")
    expect(calendar.get_by_test_id("overlap-warning")).to_have_count(1)
    expect(calendar.get_by_test_id("overlap-warning")).to_contain_text(
        "“Flu clinic” and “Flu clinic reminder” reach fewer than 11 of the same patients 1.4 days apart (within 7 days)")
    expect(calendar.get_by_test_id("calendar-overlap")).to_have_count(2)
    assert "cal0@" not in page.content() and "Pat" not in calendar.inner_text()  # counts only, no patient

    # a narrower window: no warning; the month after: the newsletter alone
    page.fill("#c-overlap_days", "1")
    page.get_by_role("button", name="Show").click()
    expect(calendar.get_by_test_id("calendar-entry")).to_have_count(2)
    expect(calendar.get_by_test_id("overlap-warning")).to_have_count(0)
    page.get_by_test_id("calendar-next").click()
    expect(page.get_by_test_id("calendar-month")).to_have_text(f"Calendar: {clinic.after.strftime('%B %Y')}")
    expect(calendar.get_by_test_id("calendar-entry")).to_have_text(["08:15 Spring newsletter"])
    assert page.evaluate(CLIPPED) == []
    page.get_by_test_id("calendar-prev").click()
    expect(page.get_by_test_id("calendar-month")).to_have_text(f"Calendar: {clinic.month.strftime('%B %Y')}")

    # a phone: the list of days instead of the grid, nothing clipped
    page.set_viewport_size({"width": 390, "height": 844})
    expect(calendar.get_by_test_id("calendar-grid")).to_be_hidden()
    listing = calendar.get_by_test_id("calendar-list")
    expect(listing).to_be_visible()
    expect(listing.get_by_test_id("calendar-list-entry")).to_have_count(2)
    expect(listing.get_by_test_id("calendar-list-entry").first).to_contain_text("Flu clinic")
    expect(listing).to_contain_text(f"{clinic.month.replace(day=10).strftime('%A')} 10 {clinic.month.strftime('%B')}")
    assert page.evaluate(CLIPPED) == []
    listing.get_by_role("link", name="Flu clinic reminder").click()
    page.wait_for_url(re.compile(rf".*/app/campaigns/{clinic.made['Flu clinic reminder']}$"))
