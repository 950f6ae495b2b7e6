"""A compliance officer tracks an accounting-of-disclosures request in headless Chromium: from the
compliance center, track it, record a disclosure made outside CarePost, extend once with a reason,
see the accounting and mark it fulfilled (issue 16 item 4)."""

from __future__ import annotations

import re
from datetime import date, timedelta

import pytest

from tests.fixtures.accounts import ui_login

pytestmark = pytest.mark.ui


def test_officer_tracks_a_request_to_fulfilment(page, session, org, make_user):
    from carepost.core.database import org_session
    from carepost.patients.schemas import ContactIn
    from carepost.patients.service import save_contact

    with org_session(org.id) as s:
        contact = save_contact(s, org.id, ContactIn(given_name="Philippa", family_name="Strand",
                                                    email="philippa@example.org")).contact
        s.commit()
        contact_id = contact.id
    officer = make_user(org, role="compliance_officer")

    ui_login(page, officer)
    page.get_by_role("link", name="Compliance center").first.click()
    page.wait_for_url(re.compile(r".*/app/compliance$"))
    page.fill("#contact_id", contact_id)
    page.fill("#received_on", (date.today() - timedelta(days=5)).isoformat())
    page.get_by_role("button", name="Track request").click()
    page.wait_for_url(re.compile(r".*/app/compliance/accounting-requests/[0-9a-f]+$"))
    assert "55 days left" in page.get_by_test_id("request-status").inner_text()
    assert "Philippa Strand" in page.get_by_test_id("accounting-document").inner_text()

    page.fill("#disclosed_at", (date.today() - timedelta(days=20)).isoformat())
    page.fill("#recipient_name", "Lakeside Law Offices")
    page.fill("#description", "Discharge summary")
    page.fill("#purpose", "Court order")
    page.get_by_role("button", name="Record disclosure").click()
    page.wait_for_url(re.compile(r".*/app/compliance/accounting-requests/[0-9a-f]+#disclosures$"))
    entries = page.get_by_test_id("accounting-entries").inner_text()
    assert "Lakeside Law Offices" in entries and "Court order" in entries

    page.get_by_role("button", name="Extend once").click()  # no reason: refused, naming the field
    assert page.locator("#reason-error").inner_text().startswith("Required")
    page.fill("#reason", "We are gathering records from an archived system.")
    page.get_by_role("button", name="Extend once").click()
    page.wait_for_url(re.compile(r".*/app/compliance/accounting-requests/[0-9a-f]+$"))
    assert "archived system" in page.get_by_test_id("accounting-request").inner_text()
    assert "85 days left" in page.get_by_test_id("request-status").inner_text()

    page.select_option("#delivery_method", "mail")
    page.get_by_role("button", name="Mark fulfilled").click()
    page.wait_for_url(re.compile(r".*/app/compliance/accounting-requests/[0-9a-f]+$"))
    assert "fulfilled" in page.get_by_test_id("request-status").inner_text()
    assert "1 entries" in page.get_by_test_id("accounting-request").inner_text()
