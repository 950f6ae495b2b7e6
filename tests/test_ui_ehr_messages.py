"""The EHR error queue page (issue 15) in headless Chromium, with a real ``carepost serve``: HL7
messages for a patient CarePost does not know wait in the queue with their reason (never the
message); the list pages 50 at a time; after the patient is imported an administrator retries one
and it is recorded; another is discarded and shows under "discarded"; an analyst (no
``phi:write``) sees the queue without the buttons. Nothing is loaded from another host.

The live server is another process: this module arranges its own organization and never empties
the database under it."""

from __future__ import annotations

import secrets

import pytest
from playwright.sync_api import expect

from tests.fixtures.accounts import add_staff, ui_login

pytestmark = pytest.mark.ui
expect.set_options(timeout=30000)  # a shared, loaded machine


@pytest.fixture(scope="module")
def queue_clinic(live_server):
    from types import SimpleNamespace

    from carepost.accounts.service import create_organization
    from carepost.core.database import org_session, system_session
    from carepost.ehr import service
    from tests.ehr_messages import adt

    with system_session() as s:
        org = create_organization(s, f"Queue Clinic {secrets.token_hex(2)}")
        admin = add_staff(s, org.id, "admin")
        analyst = add_staff(s, org.id, "analyst")
        s.commit()
        org_id = org.id
    with org_session(org_id) as s:
        _, token = service.create_connection(s, org_id, name="ADT feed", sending_facilities=["NORTHCLINIC"])
        s.commit()
    frames = [(adt(token, "A04", f"Q-{i:03d}", "MRN-LATER").encode(), "127.0.0.1") for i in range(52)]
    answers = service.ingest_batch(frames)
    assert all(b"MSA|AE|" in a for a in answers)
    return SimpleNamespace(org_id=org_id, admin=admin, analyst=analyst)


def _page(browser, live_server, user):
    ctx = browser.new_context(base_url=live_server.url, viewport={"width": 1366, "height": 900})
    page = ctx.new_page()
    page.set_default_timeout(60000)
    foreign: list[str] = []
    page.on("request", lambda req: foreign.append(req.url)
            if not req.url.startswith((live_server.url, "data:", "about:")) else None)
    ui_login(page, user)
    return ctx, page, foreign


def test_list_page_retry_and_discard(browser, live_server, queue_clinic):
    from carepost.core.database import org_session
    from carepost.patients import service as patients

    ctx, page, foreign = _page(browser, live_server, queue_clinic.admin)
    try:
        page.get_by_test_id("main-nav").get_by_role("link", name="EHR messages", exact=True).click()
        rows = page.get_by_test_id("ehr-message")
        expect(rows).to_have_count(50)
        expect(rows.first.get_by_test_id("reason")).to_contain_text("patient_not_found")
        expect(rows.first.get_by_test_id("reason")).to_contain_text("No patient of this organization has the MRN")
        assert "MRN-LATER" not in page.content()  # the message itself is never shown
        page.get_by_test_id("older").click()
        expect(rows).to_have_count(2)
        page.get_by_test_id("newest").click()
        expect(rows).to_have_count(50)

        with org_session(queue_clinic.org_id) as s:
            patients.save_contact(s, queue_clinic.org_id, {"given_name": "Later", "mrn": "MRN-LATER",
                                                           "email": f"later.{secrets.token_hex(3)}@patients.example"})
            s.commit()
        first_id = rows.first.get_attribute("data-id")
        rows.first.get_by_test_id("retry").click()
        expect(page.get_by_test_id("notice")).to_have_text("The message was recorded.")
        expect(page.locator(f'[data-testid=ehr-message][data-id="{first_id}"]')).to_have_count(0)
        second_id = rows.first.get_attribute("data-id")
        rows.first.get_by_test_id("discard").click()
        expect(page.get_by_test_id("notice")).to_contain_text("discarded")
        expect(page.locator(f'[data-testid=ehr-message][data-id="{second_id}"]')).to_have_count(0)

        page.select_option("[data-testid=status-filter]", "discarded")
        page.get_by_test_id("filter").click()
        expect(page.locator(f'[data-testid=ehr-message][data-id="{second_id}"]')).to_have_attribute(
            "data-status", "discarded")
        page.select_option("[data-testid=status-filter]", "recorded")
        page.get_by_test_id("filter").click()
        expect(page.locator(f'[data-testid=ehr-message][data-id="{first_id}"]')).to_have_attribute(
            "data-status", "recorded")
        assert foreign == []
    finally:
        ctx.close()


def test_without_phi_write_no_buttons(browser, live_server, queue_clinic):
    ctx, page, _ = _page(browser, live_server, queue_clinic.analyst)
    try:
        page.goto("/app/ehr/messages")
        expect(page.get_by_test_id("ehr-message").first).to_be_visible()
        expect(page.get_by_test_id("retry")).to_have_count(0)
        expect(page.get_by_test_id("discard")).to_have_count(0)
    finally:
        ctx.close()
