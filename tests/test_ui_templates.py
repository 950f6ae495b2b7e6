"""Headless Chromium: message templates in the UI (issue 14 item 1). A marketer writes a template
with an English and a Spanish variant, saves a second version, compares the two (the diff page
shows the changed subject), and previews the message as a Spanish-speaking contact at desktop
and phone widths: the contact's language, merge values masked (a marketer holds phi:read_masked
only), the preview audited."""

from __future__ import annotations

import secrets

import pytest
from playwright.sync_api import expect
from sqlalchemy import select

from carepost.core.database import system_session
from tests.fixtures.accounts import add_staff, ui_login

pytestmark = [pytest.mark.ui, pytest.mark.slow]


@pytest.fixture(scope="module")
def arranged(live_server):
    from carepost.accounts.service import create_organization
    from carepost.patients.service import save_contact

    with system_session() as s:
        org = create_organization(s, f"Templates UI {secrets.token_hex(3)}")
        user = add_staff(s, org.id, "marketer")
        contact = save_contact(s, org.id, {"given_name": "Rosa", "family_name": "Díaz", "preferred_language": "es",
                                           "time_zone": "America/Mexico_City"}).contact
        s.commit()
        return user, contact.id


def test_versions_diff_and_preview_as_a_contact(page, arranged):
    from carepost.audit.models import AuditEvent

    user, contact_id = arranged
    ui_login(page, user)
    page.goto("/app/templates/new")
    page.fill("input[name=name]", "Visit reminder")
    page.select_option("select[name=purpose]", "treatment")
    page.fill("input[name=subject]", "Your upcoming visit")
    page.fill("textarea[name=html]", "<p style=\"color:#064\">Hello {{ first_name }}. Please bring your insurance card "
                                     "and the list of medicines you take; call us to change the time.</p>")
    page.click("summary")
    page.fill("input[name=es_subject]", "Su próxima visita")
    page.fill("textarea[name=es_html]", "<p>Hola {{ first_name }}. Traiga su tarjeta del seguro y la lista de sus "
                                        "medicinas; llámenos para cambiar la hora.</p>")
    page.click("[data-testid=save]")
    expect(page.locator("h1")).to_contain_text("version 1")

    # A PHI category beyond the purpose is refused, naming the field; nothing is saved.
    page.select_option("select[name=purpose]", "marketing")
    page.fill("textarea[name=html]", "<p>{{ last_observation(\"loinc:4548-4\").value }}</p>")
    page.click("[data-testid=save]")
    expect(page.locator("[data-testid=error]")).to_contain_text("template.html")
    expect(page.locator("[data-testid=error]")).to_contain_text("last_observation")

    page.goto(page.url if "/new" not in page.url else page.url)
    template_url = page.url
    page.select_option("select[name=purpose]", "treatment")
    page.fill("textarea[name=html]", "<p>Hello {{ first_name }}. Please bring your insurance card and the list of "
                                     "medicines you take; call us to change the time.</p>")
    page.fill("input[name=subject]", "Your next visit")
    page.click("[data-testid=save]")
    expect(page.locator("h1")).to_contain_text("version 2")
    expect(page.locator("[data-testid=versions] tbody tr")).to_have_count(2)

    page.click("[data-testid=diff-link]")
    subject = page.locator("[data-testid=diff-part][data-part='en.subject']")
    expect(subject.locator(".del")).to_have_text("-Your upcoming visit")
    expect(subject.locator(".add")).to_have_text("+Your next visit")

    page.goto(template_url.rstrip("/") + "/preview")
    page.fill("[data-testid=contact-id]", contact_id)
    page.click("[data-testid=preview-form] button[type=submit]")
    expect(page.locator("[data-testid=preview-meta]")).to_contain_text("language es")
    expect(page.locator("[data-testid=preview-meta]")).to_contain_text("masked")
    expect(page.locator("[data-testid=preview-subject]")).to_have_text("Su próxima visita")
    assert page.locator("[data-testid=preview-desktop]").bounding_box()["width"] == 640
    assert page.locator("[data-testid=preview-phone]").bounding_box()["width"] == 375
    for frame in ("preview-desktop", "preview-phone"):
        body = page.frame_locator(f"[data-testid={frame}]").locator("body")
        expect(body).to_contain_text("Hola ***.")
        expect(body).not_to_contain_text("Rosa")
    with system_session() as s:
        events = s.scalars(select(AuditEvent).where(AuditEvent.org_id == user.org_id,
                                                    AuditEvent.action == "template.preview")).all()
        assert [(e.target_id, e.details["masked"]) for e in events] == [(contact_id, True)]
