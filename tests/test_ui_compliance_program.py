"""The compliance program in headless Chromium (issue 16 items 5 and 10):

* a compliance officer opens a breach incident for a message sent to the wrong address, sees the
  affected patient and the clock, goes through the guided four-factor assessment one factor at a
  time (a low rating without a reason is refused, naming the field), reaches the conclusion and
  drafts the notice in the patient's language (Spanish);
* the acknowledgement gate: once a policy is published, a person opening PHI is sent to the
  acknowledgement page, is refused without confirming, acknowledges, and is taken back to PHI.
"""

from __future__ import annotations

import re
from datetime import date, timedelta

import pytest

from tests.fixtures.accounts import ui_login
from tests.test_bounces import make_sent

pytestmark = pytest.mark.ui


def test_breach_register_guided_assessment(page, session, org, make_user):
    from carepost.core.database import org_session
    from carepost.delivery.models import MessageRecipient
    from carepost.patients.schemas import ContactIn
    from carepost.patients.service import save_contact

    with org_session(org.id) as s:
        lucia = save_contact(s, org.id, ContactIn(given_name="Lucía", family_name="Ferrán", email="lucia@example.org",
                                                  preferred_language="es", state="AZ")).contact.id
        s.commit()
    sent = make_sent(session, org.id, "stranger@example.net")
    with org_session(org.id) as s:
        s.get(MessageRecipient, sent.recipient_id).contact_id = lucia
        s.commit()
    officer = make_user(org, role="compliance_officer")

    ui_login(page, officer)
    page.goto("/app/compliance/breaches")
    page.fill("#title", "Lab reminder to a wrong address")
    page.select_option("#kind", "misdirected_message")
    page.fill("#discovered_on", (date.today() - timedelta(days=10)).isoformat())
    page.fill("#message_ids", "0" * 32)  # not a message of this organization: refused, naming the field
    page.get_by_role("button", name="Open incident").click()
    assert "no record" in page.locator("#message_ids-error").inner_text()
    page.fill("#message_ids", sent.message_id)
    page.fill("#notice_contact", "1-800-555-0199")
    page.get_by_role("button", name="Open incident").click()
    page.wait_for_url(re.compile(r".*/app/compliance/breaches/[0-9a-f]{32}$"))
    assert "1 affected" in page.get_by_test_id("affected-count").inner_text()
    assert "AZ 1" in page.get_by_test_id("breach-summary").inner_text()
    clock = page.get_by_test_id("breach-clock").inner_text()
    assert "50 days left" in clock and "fewer than 500" in clock and "not required" in clock

    # Factor 1: a low rating must say why.
    form = page.get_by_test_id("factor-form")
    assert "nature and extent" in form.inner_text()
    form.locator("input[name=rating][value=low]").check()
    form.get_by_role("button", name="Save factor").click()
    assert page.locator("#notes-error").inner_text().startswith("Say why")
    page.get_by_test_id("factor-form").locator("input[name=rating][value=medium]").check()
    page.fill("#notes", "Name and the lab test ordered")
    page.get_by_role("button", name="Save factor").click()
    for factor, rating, notes in (("unauthorized person", "medium", "A member of the public"),
                                  ("actually acquired", "high", "The stranger replied"),
                                  ("mitigated", "medium", "Asked to delete")):
        form = page.get_by_test_id("factor-form")
        assert factor in form.inner_text()
        form.locator(f"input[name=rating][value={rating}]").check()
        page.fill("#notes", notes)
        page.get_by_role("button", name="Save factor").click()
        page.wait_for_url(re.compile(r".*#assessment$"))
    assert page.get_by_test_id("factor-form").count() == 0
    assert "notifiable breach" in page.get_by_test_id("conclusion").inner_text()
    assert page.get_by_test_id("breach-status").inner_text() == "assessed"

    page.get_by_role("button", name="Draft notices").click()
    notice = page.get_by_test_id("notice")
    assert notice.get_attribute("data-language") == "es"
    assert "Estimado/a Lucía Ferrán" in notice.inner_text() and "1-800-555-0199" in notice.inner_text()


def test_acknowledgement_gate(page, session, org, make_user):
    from carepost.compliance import accounting, training
    from carepost.core.database import org_session
    from carepost.patients.schemas import ContactIn
    from carepost.patients.service import save_contact

    with org_session(org.id) as s:
        contact_id = save_contact(s, org.id, ContactIn(given_name="Wilhelmina", family_name="Stroud",
                                                       email="wil@example.org")).contact.id
        req_id = accounting.create_request(s, org.id, contact_id=contact_id, received_on=date.today(), period_start=None,
                                           period_end=None, actor={"actor_type": "system", "actor_id": None}).id
        training.publish(s, org.id, key="hipaa-training", kind="training", title="HIPAA basics",
                         body="Minimum necessary: open only the records your work needs. Report incidents at once.",
                         actor={"actor_type": "system", "actor_id": None})
        s.commit()
    owner = make_user(org, role="owner")

    ui_login(page, owner)
    # The printable accounting shows the patient's name: unmasked PHI.
    page.goto(f"/app/compliance/accounting-requests/{req_id}/document")
    page.wait_for_url(re.compile(r".*/app/compliance/acknowledge\?next=.*"))
    assert page.get_by_test_id("gate-notice").is_visible()
    assert "HIPAA basics" in page.content() and "missing" in page.get_by_test_id("state-hipaa-training").inner_text()
    page.get_by_role("button", name="Acknowledge").click()  # not confirmed
    assert page.locator("#confirm-error").inner_text().startswith("Tick the box")
    page.check("input[name=confirm]")
    page.get_by_role("button", name="Acknowledge").click()
    page.wait_for_url(re.compile(rf".*/app/compliance/accounting-requests/{req_id}/document$"))
    assert "Wilhelmina Stroud" in page.content()
    page.goto("/app/compliance/acknowledge")
    assert page.get_by_test_id("ack-current").is_visible()
    assert page.get_by_test_id("state-hipaa-training").inner_text() == "ok"
