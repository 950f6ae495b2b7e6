"""The journey page's flow diagram (issue 15 item 5) in headless Chromium, with a real
``carepost serve``: twelve patients enter a journey (wait 1 day, then exit), three of them reach
its goal while waiting; after the engine's ticks the page's server-drawn SVG shows Entered 12,
each step with the runs that reached it, the links between them with their counts, and how runs
ended (Finished 9, Reached the goal 3). An analyst (no ``phi:read_unmasked``) sees the goal's 3
as "<11". Nothing is loaded from another host (the diagram is SVG drawn by the server).

The live server is another process: this module arranges its own organization and never empties
the database under it."""

from __future__ import annotations

import secrets
from datetime import timedelta

import pytest
from playwright.sync_api import expect

from tests.fixtures.accounts import add_staff, ui_login

pytestmark = pytest.mark.ui
expect.set_options(timeout=30000)  # a shared, loaded machine


@pytest.fixture(scope="module")
def flow_clinic(live_server):
    from types import SimpleNamespace

    from carepost.accounts.service import create_organization
    from carepost.core import clock
    from carepost.core.database import org_session, system_session
    from carepost.journeys import engine
    from carepost.patients import service as patients
    from carepost.tracking.conversions import record_event
    from tests.test_journeys_engine import make_journey

    with system_session() as s:
        org = create_organization(s, f"Flow Clinic {secrets.token_hex(2)}")
        admin = add_staff(s, org.id, "admin")
        analyst = add_staff(s, org.id, "analyst")
        s.commit()
        org_id = org.id
    with org_session(org_id) as s:
        journey_id, _ = make_journey(s, org_id, {
            "purpose": "treatment", "reentry": {"mode": "never"}, "start": "w",
            "entry": {"type": "event", "event": "appointment.booked"},
            "goal": {"event": "appointment.attended", "within_days": 7},
            "steps": {"w": {"type": "wait", "duration": "1d", "next": "x"}, "x": {"type": "exit"}}})
        contacts = [patients.save_contact(s, org_id, {
            "given_name": f"P{i}", "email": f"flow{i}.{secrets.token_hex(3)}@patients.example"}).contact.id
            for i in range(12)]
        s.commit()
    with org_session(org_id) as s:
        for cid in contacts:
            record_event(s, org_id, name="appointment.booked", contact_id=cid)
        s.commit()
    engine.run_tick(org_id, enqueue=False)
    with org_session(org_id) as s:
        for cid in contacts[:3]:
            record_event(s, org_id, name="appointment.attended", contact_id=cid)
        s.commit()
    engine.run_tick(org_id, now=clock.now() + timedelta(days=2), enqueue=False)
    return SimpleNamespace(org_id=org_id, admin=admin, analyst=analyst, journey_id=journey_id)


def _open(browser, live_server, user, journey_id):
    ctx = browser.new_context(base_url=live_server.url, viewport={"width": 1366, "height": 900})
    page = ctx.new_page()
    page.set_default_timeout(60000)
    foreign: list[str] = []
    page.on("request", lambda req: foreign.append(req.url)
            if not req.url.startswith((live_server.url, "data:", "about:")) else None)
    ui_login(page, user)
    page.goto(f"/app/journeys/{journey_id}")
    return ctx, page, foreign


def test_the_flow_diagram_shows_counts(browser, live_server, flow_clinic):
    ctx, page, foreign = _open(browser, live_server, flow_clinic.admin, flow_clinic.journey_id)
    try:
        flow = page.get_by_test_id("journey-flow")
        expect(flow).to_be_visible()
        node = (lambda key: flow.locator(f'g.flow-node[data-node="{key}"]'))
        expect(node("entered")).to_have_attribute("data-count", "12")
        expect(node("entered")).to_contain_text("12 runs")
        expect(node("step:w")).to_have_attribute("data-count", "12")
        expect(node("step:x")).to_have_attribute("data-count", "9")
        expect(node("end:exit_step")).to_have_attribute("data-count", "9")
        expect(node("end:goal")).to_have_attribute("data-count", "3")
        expect(node("end:goal")).to_contain_text("Reached the goal")
        link = (lambda a, b: flow.locator(f'g.flow-link[data-from="{a}"][data-to="{b}"]'))
        expect(link("entered", "step:w")).to_have_attribute("data-count", "12")
        expect(link("step:w", "step:x")).to_have_attribute("data-count", "9")
        expect(link("step:w", "end:goal")).to_have_attribute("data-count", "3")
        expect(link("step:x", "end:exit_step")).to_have_attribute("data-count", "9")
        assert foreign == []
    finally:
        ctx.close()


def test_small_counts_are_masked_without_phi_read_unmasked(browser, live_server, flow_clinic):
    ctx, page, _ = _open(browser, live_server, flow_clinic.analyst, flow_clinic.journey_id)
    try:
        flow = page.get_by_test_id("journey-flow")
        expect(flow).to_be_visible()
        expect(flow.locator('g.flow-node[data-node="entered"]')).to_have_attribute("data-count", "12")
        expect(flow.locator('g.flow-node[data-node="end:goal"]')).to_have_attribute("data-count", "<11")
        expect(flow.locator('g.flow-node[data-node="step:x"]')).to_have_attribute("data-count", "<11")
        expect(flow.locator('g.flow-link[data-from="step:w"][data-to="end:goal"]')).to_have_attribute(
            "data-count", "<11")
        assert "3" not in (flow.locator('g.flow-node[data-node="end:goal"]').text_content() or "")
    finally:
        ctx.close()


def _run_counts(org_id, journey_id):
    from collections import Counter

    from sqlalchemy import select

    from carepost.core.database import read_only_session
    from carepost.journeys.models import JourneyRun

    with read_only_session(org_id) as s:
        rows = s.execute(select(JourneyRun.step_id, JourneyRun.state).where(JourneyRun.journey_id == journey_id)).all()
    return Counter(r[0] for r in rows), Counter(r[1] for r in rows)


def test_the_runs_list_filters_by_step_and_state(browser, live_server, flow_clinic):
    by_step, by_state = _run_counts(flow_clinic.org_id, flow_clinic.journey_id)
    assert sum(by_step.values()) == 12
    ctx, page, foreign = _open(browser, live_server, flow_clinic.admin, flow_clinic.journey_id)
    try:
        page.get_by_test_id("runs-link").click()
        rows = page.get_by_test_id("run-row")
        expect(rows).to_have_count(12)
        for step in ("w", "x"):  # the current step of a run: the step it runs next (or ended at)
            page.select_option("[data-testid=runs-step]", step)
            page.get_by_test_id("runs-filter").click()
            if by_step[step]:
                expect(rows).to_have_count(by_step[step])
                expect(page.locator(f'[data-testid=run-row]:not([data-step="{step}"])')).to_have_count(0)
            else:
                expect(page.get_by_test_id("runs-empty")).to_be_visible()
        page.select_option("[data-testid=runs-step]", "")
        state = by_state.most_common(1)[0][0]
        page.select_option("[data-testid=runs-state]", state)
        page.get_by_test_id("runs-filter").click()
        expect(rows).to_have_count(by_state[state])
        page.select_option("[data-testid=runs-state]", "active")
        page.get_by_test_id("runs-filter").click()
        expect(page.get_by_test_id("runs-empty")).to_be_visible()
        assert foreign == []
    finally:
        ctx.close()
