"""The retention page in headless Chromium (issue 16 item 3): one compliance officer places a
legal hold on a patient through the form, cannot approve it herself, a second compliance officer
approves it; the hold shows as active and the patient's contact page marks the patient as held."""

from __future__ import annotations

import pytest

from tests.fixtures.accounts import add_staff, ui_login

pytestmark = pytest.mark.ui


@pytest.fixture(scope="module")
def clinic(live_server):
    from types import SimpleNamespace

    from carepost.accounts.service import create_organization
    from carepost.core.database import org_session, system_session
    from carepost.patients.schemas import ContactIn
    from carepost.patients.service import save_contact

    with system_session() as s:
        org = create_organization(s, "Holds Clinic")
        s.commit()
        placer, approver = add_staff(s, org.id, "compliance_officer"), add_staff(s, org.id, "compliance_officer")
        s.commit()
    with org_session(org.id) as s:
        contact = save_contact(s, org.id, ContactIn(given_name="Hal", family_name="Dunn",
                                                    email="hal.dunn@example.test")).contact
        s.commit()
        contact_id = contact.id
    return SimpleNamespace(org_id=org.id, placer=placer, approver=approver, contact_id=contact_id)


def test_place_a_hold_and_a_second_officer_approves_it(page, clinic):
    ui_login(page, clinic.placer)
    page.goto("/app/compliance/retention")
    form = page.get_by_test_id("hold-form")
    form.locator("#scope").select_option("patient")
    form.locator("#matter").fill("Dunn v. Holds Clinic")
    form.locator("#reason").fill("Notice of litigation received")
    form.locator("#contact_id").fill(clinic.contact_id)
    form.get_by_role("button", name="Place hold").click()
    row = page.get_by_test_id("holds").locator("tr[data-hold-id]").first
    assert row.get_attribute("data-status") == "pending"
    assert row.get_by_test_id("held").inner_text() == "protecting"
    # the one who placed it cannot approve it
    row.get_by_role("button", name="Approve hold").click()
    assert "second person" in page.locator("p.field-error").first.inner_text()
    page.context.clear_cookies()

    ui_login(page, clinic.approver)
    page.goto("/app/compliance/retention")
    row = page.get_by_test_id("holds").locator("tr[data-hold-id]").first
    row.get_by_role("button", name="Approve hold").click()
    page.wait_for_url("**/app/compliance/retention#holds")
    row = page.get_by_test_id("holds").locator("tr[data-hold-id]").first
    assert row.get_attribute("data-status") == "active"
    assert clinic.approver.id in row.inner_text()
    page.goto(f"/app/contacts/{clinic.contact_id}")
    assert "HELD — legal hold \"Dunn v. Holds Clinic\"" in page.content().replace("&#34;", '"').replace("&quot;", '"')
