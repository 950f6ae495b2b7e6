"""Headless Chromium on the patient pages: the unsubscribe page (a GET that changes nothing, then
"all marketing") and the preference center, by keyboard, with no CSP violations and nothing
loaded from another host."""

from __future__ import annotations

import secrets

import pytest
from playwright.sync_api import expect

from carepost.core.database import system_session

pytestmark = pytest.mark.ui


@pytest.fixture(scope="module")
def patient(live_server):
    from carepost.accounts.service import create_organization
    from carepost.consent import authorizations, service
    from carepost.delivery.models import Message, MessageRecipient
    from carepost.patients import service as patients

    tag = secrets.token_hex(3)
    with system_session() as s:
        org = create_organization(s, f"Unsubscribe Clinic {tag}")
        s.info.pop("scope")
        s.info["org_id"] = org.id
        c = patients.save_contact(s, org.id, {"given_name": "Noa", "email": f"noa-{tag}@example.org"}).contact
        topic = service.create_topic(s, org.id, key="screenings", name="Screening reminders")
        service.create_topic(s, org.id, key="news", name="Newsletter")
        authorizations.record_authorization(s, org.id, contact_id=c.id, purpose="marketing", method="api",
                                            signature_name="Noa Example", send_copy=False)
        m = Message(org_id=org.id, from_address="care@bar.example", subject_enc=b"x", security="tls_required",
                    purpose="marketing", tags=["topic:screenings"])
        s.add(m)
        s.flush()
        r = MessageRecipient(org_id=org.id, message_id=m.id, address_enc=b"x", domain_index="d", contact_id=c.id,
                             address_index=service.address_index(s, org.id, f"noa-{tag}@example.org"), status="delivered")
        s.add(r)
        s.flush()
        unsub = service.unsubscribe_url(s, org.id, r.id, topic.id).replace(live_server.url, "")
        prefs = service.preferences_url(s, org.id, r.id).replace(live_server.url, "")
        s.commit()
        return {"org_id": org.id, "contact_id": c.id, "topic_id": topic.id, "unsub": unsub, "prefs": prefs}


def _state(patient, topic=None):
    from carepost.consent.eligibility import check_eligibility

    with system_session() as s:
        return check_eligibility(s, [patient["contact_id"]], "marketing", topic, "email",
                                 org_id=patient["org_id"])[patient["contact_id"]]


def test_unsubscribe_page_and_preference_center(page, patient):
    csp_errors: list[str] = []
    page.on("console", lambda msg: csp_errors.append(msg.text) if "Content Security Policy" in msg.text else None)

    page.goto(patient["unsub"])
    expect(page.get_by_role("heading", name="Unsubscribe")).to_be_visible()
    expect(page.get_by_test_id("unsubscribe-topic")).to_contain_text("Screening reminders")
    assert _state(patient, patient["topic_id"]) == "eligible"  # opening the page changed nothing

    page.get_by_role("link", name="Manage your email preferences").click()
    expect(page.get_by_role("heading", name="Email preferences")).to_be_visible()
    screenings = page.get_by_label("Screening reminders")
    expect(screenings).to_be_checked()
    screenings.focus()
    page.keyboard.press("Space")  # by keyboard
    expect(screenings).not_to_be_checked()
    page.get_by_label("How often").select_option("weekly")
    page.get_by_test_id("save-preferences").click()
    expect(page.get_by_test_id("preferences-saved")).to_be_visible()
    assert _state(patient, patient["topic_id"]) == "unsubscribed_topic"
    assert _state(patient) == "eligible"

    page.goto(patient["unsub"])
    page.get_by_test_id("unsubscribe-all").click()
    expect(page.get_by_test_id("unsubscribed")).to_be_visible()
    expect(page.get_by_role("status")).to_contain_text("no longer receive marketing")
    assert _state(patient) == "unsubscribed_all"
    assert not csp_errors, csp_errors
