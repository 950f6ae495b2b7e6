"""Headless Chromium through the journey pages (issue 15 item 6), with a real ``carepost serve``.

An administrator builds a journey from an empty canvas in the editor: adds a send step, a wait
and an exit from the palette, picks the template in the side panel, connects the send step to
the wait by dragging its output onto the wait (Drawflow) and the wait to the exit with the side
panel's "Next" picker; the server's validation puts a zero wait's error next to the wait step;
fixing the duration clears it; the draft is saved and published. The running view shows the
counts per step; when patients book appointments (the event recorded as the events API does)
and the journey engine's tick moves their runs, the counts change on the page without a reload. The patient's
contact page shows the journey and the steps the run went through. A starter opens in the editor
and names its missing templates. No page loads anything from another host and the browser logs
no error (a Content-Security-Policy violation would be one).

The live server is another process: this module arranges its own organization and never empties
the database under it.
"""

from __future__ import annotations

import re
import secrets

import pytest
from playwright.sync_api import expect

from tests.fixtures.accounts import add_staff, ui_login

pytestmark = pytest.mark.ui
expect.set_options(timeout=15000)  # a shared, loaded machine


@pytest.fixture(scope="module")
def clinic(live_server):
    from types import SimpleNamespace

    from carepost.accounts.service import create_organization
    from carepost.content import service as content
    from carepost.content.schemas import TemplateIn
    from carepost.core import clock
    from carepost.core.database import org_session, system_session
    from carepost.delivery import service as delivery
    from carepost.patients import service as patients

    with system_session() as s:
        org = create_organization(s, f"Journey Clinic {secrets.token_hex(2)}")
        admin = add_staff(s, org.id, "admin")
        s.commit()
        org_id = org.id
    with org_session(org_id) as s:
        domain = delivery.create_sending_domain(s, org_id, f"{secrets.token_hex(3)}.journeys-ui.example")
        domain.verified_at = clock.now()
        delivery.update_delivery_settings(s, org_id, {"default_purpose": "treatment"})
        t = content.create_template(s, org_id, TemplateIn(
            name="Visit reminder", subject="Your visit is coming up", purpose="treatment", contains_phi=False,
            html="<p>Hello {{ first_name }}, see you soon.</p>", language="en"))
        refill = content.create_template(s, org_id, TemplateIn(
            name="Refill due", subject="Your prescription can be refilled", purpose="refill_reminder",
            contains_phi=False, html="<p>Hello {{ first_name }}, your refill is due.</p>", language="en"))
        patient = patients.save_contact(s, org_id, {"given_name": "Imelda", "family_name": "Varga",
                                                    "email": f"imelda.{secrets.token_hex(3)}@patients.example"}).contact
        other = patients.save_contact(s, org_id, {"given_name": "Oskar", "family_name": "Lind",
                                                  "email": f"oskar.{secrets.token_hex(3)}@patients.example"}).contact
        s.commit()
        return SimpleNamespace(org_id=org_id, admin=admin, template=t.id, refill=refill.id, patient=patient.id,
                               other=other.id)


def _book(org_id: str, contact_id: str, *, then_days: int = 0) -> None:
    """The patient books an appointment (the event as ``POST /api/v1/events`` records it); the
    journey engine's tick then runs the steps that are due — now, and ``then_days`` later."""
    from datetime import timedelta

    from carepost.core import clock
    from carepost.core.database import org_session
    from carepost.journeys import engine
    from carepost.tracking.conversions import record_event

    with org_session(org_id) as s:
        record_event(s, org_id, name="appointment.booked", contact_id=contact_id)
        s.commit()
    engine.run_tick(org_id, enqueue=False)
    if then_days:
        engine.run_tick(org_id, now=clock.now() + timedelta(days=then_days), enqueue=False)


def _set(page, selector: str, value: str) -> None:
    """Type into a side panel field and leave it (the editor reads it on change)."""
    page.fill(selector, value)
    page.press(selector, "Tab")


def test_build_validate_fix_save_publish_watch_counts_and_timeline(browser, live_server, clinic):
    ctx = browser.new_context(base_url=live_server.url, viewport={"width": 1366, "height": 900})
    page = ctx.new_page()
    page.set_default_timeout(20000)
    foreign: list[str] = []
    console_errors: list[str] = []
    page.on("request", lambda req: foreign.append(req.url)
            if not req.url.startswith((live_server.url, "data:", "about:")) else None)
    page.on("console", lambda msg: console_errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: console_errors.append(str(exc)))
    try:
        ui_login(page, clinic.admin)
        page.get_by_test_id("main-nav").get_by_role("link", name="Journeys", exact=True).click()
        expect(page.get_by_test_id("starter")).to_have_count(6)
        page.get_by_test_id("new-journey").click()
        expect(page.get_by_test_id("journey-editor")).to_have_attribute("data-ready", "true")
        expect(page.get_by_test_id("panel-title")).to_have_text("Journey settings")
        page.fill("#journey-name", "Visit reminders")

        # three steps from the palette; the first becomes the start
        page.get_by_test_id("add-send").click()
        expect(page.get_by_test_id("panel-title")).to_have_text("Send email · s1")
        page.select_option("#f-template", f"{clinic.template}:1")
        page.get_by_test_id("add-wait").click()
        expect(page.get_by_test_id("panel-title")).to_have_text("Wait · s2")
        _set(page, "#f-duration", "0d")
        page.get_by_test_id("add-exit").click()
        expect(page.get_by_test_id("step-node")).to_have_count(3)
        expect(page.locator("[data-step=s1] [data-testid=start-badge]")).to_be_visible()

        # connect s1 -> s2 on the canvas: drag the send step's output onto the wait step's input
        page.get_by_test_id("output-s1-1").drag_to(page.get_by_test_id("input-s2"))
        expect(page.locator("#journey-canvas .connection")).to_have_count(1)
        # s2 -> s3 with the side panel's picker
        page.locator("[data-step=s2] .jstep-summary").click()
        expect(page.get_by_test_id("panel-title")).to_have_text("Wait · s2")
        page.select_option("#next-s2-0", "s3")
        expect(page.locator("#journey-canvas .connection")).to_have_count(2)

        # the server's validation: the zero wait, next to its step and in the list
        expect(page.get_by_test_id("validation-status")).to_have_attribute("data-valid", "false")
        expect(page.get_by_test_id("step-errors-s2")).to_be_visible()
        expect(page.locator("[data-step=s2]")).to_have_class(re.compile(r"\bhas-error\b"))
        expect(page.get_by_test_id("validation-error").filter(has_text="steps.s2.duration")).to_have_count(1)
        expect(page.get_by_test_id("step-errors-s1")).to_have_count(0)
        # a branch added and left unconnected: unreachable, and no default — then removed again
        page.get_by_test_id("add-branch").click()
        expect(page.get_by_test_id("panel-title")).to_have_text("Branch · s4")
        expect(page.get_by_test_id("step-errors-s4")).to_be_visible()
        expect(page.get_by_test_id("validation-error").filter(has_text="steps.s4.default")).to_have_count(1)
        expect(page.get_by_test_id("branch-case")).to_have_count(1)
        page.get_by_test_id("delete-step").click()
        expect(page.get_by_test_id("step-node")).to_have_count(3)
        expect(page.get_by_test_id("validation-error").filter(has_text="steps.s4")).to_have_count(0)
        expect(page.get_by_test_id("step-errors-s2")).to_be_visible()  # the zero wait is still wrong
        # fix it
        page.locator("[data-step=s2] .jstep-summary").click()
        _set(page, "#f-duration", "2d")
        expect(page.get_by_test_id("validation-status")).to_have_attribute("data-valid", "true")
        expect(page.get_by_test_id("validation-status")).to_have_text("Valid")
        expect(page.get_by_test_id("step-errors-s2")).to_have_count(0)
        expect(page.get_by_test_id("validation-error")).to_have_count(0)

        # save the draft (the page moves to the saved journey's editor), then publish
        page.get_by_test_id("save-draft").click()
        page.wait_for_url(re.compile(r".*/app/journeys/[0-9a-f]{32}/edit\?saved=1$"))
        journey_id = page.url.split("/")[-2]
        expect(page.get_by_test_id("step-node")).to_have_count(3)
        expect(page.get_by_test_id("validation-status")).to_have_text("Valid")
        page.get_by_test_id("publish").click()
        page.wait_for_url(re.compile(rf".*/app/journeys/{journey_id}\?done=published$"))
        expect(page.get_by_test_id("journey-status")).to_have_text("live")

        # the running view: counts per step, then runs appear and the counts change without a reload
        expect(page.get_by_test_id("journey-view")).to_have_attribute("data-ready", "true")
        expect(page.get_by_test_id("total-entered")).to_have_text("0")
        expect(page.get_by_test_id("node-count-s2")).to_contain_text("now 0")
        page.evaluate("window.__notReloaded = true")
        _book(clinic.org_id, clinic.other, then_days=3)  # sent, waited, sent again, exited
        _book(clinic.org_id, clinic.patient)  # sent, now waiting two days before the next step
        expect(page.get_by_test_id("total-entered")).to_have_text("2", timeout=30000)
        expect(page.get_by_test_id("total-active")).to_have_text("1")
        expect(page.get_by_test_id("total-exited")).to_have_text("1")
        expect(page.get_by_test_id("exit-reason")).to_have_text(["exit_step: 1"])
        expect(page.get_by_test_id("count-executed-s1")).to_have_text("2")
        expect(page.get_by_test_id("count-executed-s3")).to_have_text("1")
        expect(page.get_by_test_id("node-count-s2")).to_contain_text("now 1")  # waiting in the wait
        assert page.evaluate("window.__notReloaded") is True
        # read-only: a step's settings by the keyboard-friendly chooser, nothing editable
        page.select_option("#f-choose-step", "s1")
        expect(page.get_by_test_id("panel-title")).to_have_text("Send email · s1")
        expect(page.locator("#f-template")).to_be_disabled()
        expect(page.get_by_test_id("delete-step")).to_have_count(0)

        # the patient's contact page: the journey and the steps of the run
        page.goto(f"/app/contacts/{clinic.patient}")
        section = page.get_by_test_id("section-journeys")
        expect(section).to_contain_text(re.compile(r"Visit reminders \(version 1\): waiting until .*, then step s3"))
        expect(section).to_contain_text("step s2 (Wait) — done")
        expect(section).to_contain_text("step s1 (Send email) — sent")
        section.get_by_role("link", name=re.compile("Visit reminders")).click()
        page.wait_for_url(re.compile(rf".*/app/journeys/{journey_id}$"))

        # a second version of the live journey: publishing asks what happens to the runs in it
        page.get_by_test_id("edit-journey").click()
        expect(page.get_by_test_id("journey-editor")).to_have_attribute("data-ready", "true")
        expect(page.get_by_test_id("mode-drain")).to_be_checked()
        page.locator("[data-step=s2] .jstep-summary").click()
        _set(page, "#f-duration", "3d")
        expect(page.get_by_test_id("validation-status")).to_have_text("Valid")
        page.get_by_test_id("mode-migrate").check()
        page.get_by_test_id("publish").click()  # saves the changed draft first, then publishes
        page.wait_for_url(re.compile(rf".*/app/journeys/{journey_id}\?done=published$"))
        expect(page.get_by_test_id("version-row")).to_have_text([re.compile(r"Version 1: published .*\(drain\)$"),
                                                                 re.compile(r"Version 2: published .*\(migrate\) — live")])
        expect(page.get_by_test_id("node-count-s2")).to_contain_text("now 1")  # the waiting run moved along

        # a starter opens in the editor with its steps laid out and its missing templates named
        page.goto("/app/journeys")
        page.get_by_test_id("use-starter-appointment_reminder").click()
        expect(page.get_by_test_id("starter-note")).to_be_visible()
        expect(page.get_by_test_id("step-node")).to_have_count(7)
        expect(page.get_by_test_id("validation-status")).to_have_attribute("data-valid", "false")
        expect(page.get_by_test_id("step-errors-remind_7d")).to_be_visible()
        page.locator("[data-step=remind_7d] .jstep-summary").click()
        expect(page.get_by_test_id("template-picker")).to_be_visible()
        expect(page.get_by_test_id("side-panel")).to_contain_text("Suggested: Reminder: your appointment is in a week")

        # phone width: the list and the running view fit without scrolling sideways
        page.set_viewport_size({"width": 390, "height": 844})
        for url in ("/app/journeys", f"/app/journeys/{journey_id}"):
            page.goto(url)
            assert page.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth + 1"), url
    finally:
        ctx.close()
    assert not foreign, f"loaded from other hosts: {foreign}"
    assert not console_errors, console_errors


def test_starter_step_panels_branch_split_and_settings(browser, live_server, clinic):
    """The side panel of each kind of step, on the refill reminder starter: templates chosen, the
    branch's engagement case edited and a second case added and removed (its output with it), an
    A/B split whose weights do not add up, the journey's entry and goal; saved and reloaded."""
    ctx = browser.new_context(base_url=live_server.url, viewport={"width": 1366, "height": 900})
    page = ctx.new_page()
    page.set_default_timeout(20000)
    console_errors: list[str] = []
    page.on("console", lambda msg: console_errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: console_errors.append(str(exc)))
    try:
        ui_login(page, clinic.admin)
        page.goto("/app/journeys/new?starter=refill_reminder")
        expect(page.get_by_test_id("journey-editor")).to_have_attribute("data-ready", "true")
        expect(page.get_by_test_id("step-node")).to_have_count(5)
        for sid in ("remind", "remind_again"):
            page.locator(f"[data-step={sid}] .jstep-summary").click()
            expect(page.get_by_test_id("panel-title")).to_have_text(f"Send email · {sid}")
            page.select_option("#f-template", f"{clinic.refill}:1")
            expect(page.locator(f"[data-step={sid}] .jstep-summary")).to_have_text("Refill due — v1")
        expect(page.get_by_test_id("validation-status")).to_have_text("Valid")

        # the branch: its engagement case, a second case with its own output, removed again
        page.locator("[data-step=opened] .jstep-summary").click()
        expect(page.get_by_test_id("panel-title")).to_have_text("Branch · opened")
        expect(page.locator("#c0-kind")).to_have_value("engagement")
        expect(page.locator("#c0-step")).to_have_value("remind")
        expect(page.locator("#c0-is")).to_have_value("not_opened")
        page.select_option("#c0-is", "clicked")
        expect(page.locator("#journey-canvas [data-step=opened] .outputs .output")).to_have_count(2)
        page.get_by_test_id("add-case").click()
        expect(page.get_by_test_id("branch-case")).to_have_count(2)
        expect(page.locator("#journey-canvas [data-step=opened] .outputs .output")).to_have_count(3)
        expect(page.get_by_test_id("validation-error").filter(has_text="steps.opened.cases[1]")).not_to_have_count(0)
        page.select_option("#c1-field", "sex")
        page.select_option("#c1-op", "eq")
        page.fill("#c1-value", "female")
        page.press("#c1-value", "Tab")
        page.select_option("#next-opened-1", "remind_again")
        expect(page.get_by_test_id("validation-status")).to_have_text("Valid")
        page.get_by_test_id("remove-case").nth(1).click()
        expect(page.locator("#journey-canvas [data-step=opened] .outputs .output")).to_have_count(2)
        expect(page.get_by_test_id("validation-status")).to_have_text("Valid")

        # an A/B split whose weights add up to 90: named at the split; then deleted
        page.get_by_test_id("add-split").click()
        expect(page.get_by_test_id("panel-title")).to_have_text("A/B split · s1")
        page.fill("#v1-weight", "40")
        page.press("#v1-weight", "Tab")
        expect(page.get_by_test_id("split-total")).to_have_text("Total: 90%")
        expect(page.get_by_test_id("step-errors-s1")).to_be_visible()
        page.get_by_test_id("delete-step").click()
        expect(page.get_by_test_id("validation-status")).to_have_text("Valid")

        # the journey's settings: a goal
        page.locator("[data-step=remind] .jstep-summary").click()
        page.get_by_test_id("show-settings").click()
        expect(page.get_by_test_id("panel-title")).to_have_text("Journey settings")
        expect(page.locator("#f-entry-field")).to_have_value("refill_due")
        expect(page.locator("#f-entry-offset")).to_have_value("-7d")
        page.fill("#f-goal-event", "refill.picked_up")
        page.press("#f-goal-event", "Tab")
        expect(page.locator("#f-goal-days")).to_have_value("30")
        page.fill("#f-goal-event", "no.such_event")
        page.press("#f-goal-event", "Tab")
        expect(page.get_by_test_id("validation-error").filter(has_text="goal.event")).to_have_count(1)
        page.fill("#f-goal-event", "refill.picked_up")
        page.press("#f-goal-event", "Tab")
        expect(page.get_by_test_id("validation-status")).to_have_text("Valid")
        page.get_by_test_id("save-draft").click()
        page.wait_for_url(re.compile(r".*/app/journeys/[0-9a-f]{32}/edit\?saved=1$"))
        expect(page.locator("#f-goal-event")).to_have_value("refill.picked_up")
        expect(page.locator("#f-purpose")).to_have_value("refill_reminder")
        expect(page.get_by_test_id("step-node")).to_have_count(5)
    finally:
        ctx.close()
    assert not console_errors, console_errors
