"""Organization branding in headless Chromium (issue 10 item 16): an owner sets the name shown
to patients, the colours and a logo on /app/branding; the unsubscribe page, the preference
center, the secure portal and a hosted form then show that name (not CarePost's), load the
logo from this host (naturalWidth > 0) and use the colours (computed styles); a bad colour is
refused on the page naming the field. With no branding set the pages still carry the
organization's name and CarePost's default colours. The live server caches keys, so these
tests never empty the database under it (no ``db`` fixture)."""

from __future__ import annotations

import re
import secrets

import pytest
from playwright.sync_api import expect

from carepost.core.database import system_session
from tests.test_branding import png
from tests.test_ui_layout import make_owner
from tests.fixtures.accounts import ui_login

pytestmark = pytest.mark.ui

PRIMARY, PRIMARY_RGB = "#7a1f5c", "rgb(122, 31, 92)"
ACCENT, ACCENT_RGB = "#e0a800", "rgb(224, 168, 0)"
DEFAULT_BRAND_RGB = "rgb(11, 92, 173)"  # CarePost's --brand, #0b5cad


def _arrange_patient_pages(org_id: str, base_url: str) -> dict:
    """An unsubscribe link, a preferences link, a portal message link and a published form."""
    from carepost.consent import service as consent
    from carepost.delivery.models import Message, MessageRecipient
    from carepost.forms import service as forms
    from carepost.forms.schemas import FormIn
    from carepost.patients import service as patients
    from tests.fixtures.portal import arrange

    tag = secrets.token_hex(3)
    with system_session() as s:
        s.info.pop("scope")
        s.info["org_id"] = org_id
        c = patients.save_contact(s, org_id, {"given_name": "Noa", "email": f"noa-{tag}@example.org"}).contact
        topic = consent.create_topic(s, org_id, key=f"screenings{tag}", name="Screening reminders")
        m = Message(org_id=org_id, from_address="care@bar.example", subject_enc=b"x", security="tls_required",
                    purpose="marketing")
        s.add(m)
        s.flush()
        r = MessageRecipient(org_id=org_id, message_id=m.id, address_enc=b"x", domain_index="d", contact_id=c.id,
                             address_index=consent.address_index(s, org_id, f"noa-{tag}@example.org"), status="delivered")
        s.add(r)
        s.flush()
        unsub = consent.unsubscribe_url(s, org_id, r.id, topic.id).replace(base_url, "")
        prefs = consent.preferences_url(s, org_id, r.id).replace(base_url, "")
        form = forms.create_form(s, org_id, FormIn(name="Intake", fields=[
            {"key": "note", "type": "text", "label": "Anything we should know?"}]))
        forms.publish(s, form)
        form_path = f"/f/{form.public_id}"
        s.commit()
    with system_session() as s:
        portal_token = arrange(s, org_id).token
    return {"unsub": unsub, "prefs": prefs, "portal": f"/p/{portal_token}", "form": form_path}


@pytest.fixture(scope="module")
def clinic(live_server):
    from carepost.accounts.service import create_organization

    with system_session() as s:
        org = create_organization(s, f"Harbor Clinic {secrets.token_hex(2)}")
        s.commit()
        org_id, name = org.id, org.name
    return {"org_id": org_id, "name": name, "owner": make_owner(org_id),
            "pages": _arrange_patient_pages(org_id, live_server.url)}


def _logo_loaded(page, test_id: str = "org-logo") -> None:
    logo = page.get_by_test_id(test_id).first
    expect(logo).to_be_visible()
    src = logo.get_attribute("src")
    assert re.fullmatch(r"/b/[0-9a-f]{32}/logo\?v=[0-9a-f]+", src), src  # this host, ids only
    page.wait_for_function("el => el.complete && el.naturalWidth > 0", arg=logo.element_handle())
    assert logo.evaluate("el => el.naturalWidth") == 40


def _colour(page, selector: str, prop: str) -> str:
    return page.locator(selector).first.evaluate(f"(el) => getComputedStyle(el).{prop}")


def test_defaults_show_the_organization_name_and_carepost_colours(page, clinic):
    page.goto(clinic["pages"]["unsub"])
    brand = page.get_by_test_id("org-brand")
    expect(brand).to_have_text(clinic["name"])
    expect(page.get_by_test_id("org-logo")).to_have_count(0)
    assert _colour(page, "[data-testid=unsubscribe-topic]", "backgroundColor") == DEFAULT_BRAND_RGB
    assert "CarePost" not in page.locator("body").inner_text()
    page.goto(clinic["pages"]["portal"])
    expect(page.get_by_test_id("portal-org")).to_have_text(clinic["name"])
    page.goto(clinic["pages"]["form"])
    expect(page.get_by_test_id("org-brand")).to_have_text(clinic["name"])


def test_owner_sets_branding_and_every_patient_page_carries_it(page, clinic, live_server):
    ui_login(page, clinic["owner"])
    page.get_by_role("link", name="Branding").click()
    page.wait_for_url(re.compile(r".*/app/branding$"))

    # a colour that is not #rrggbb is refused, naming the field, and nothing is saved
    page.fill("#display_name", "Harbor Family Health")
    page.fill("#primary_color", "#7a1f5c;}")  # maxlength 7 cuts it to "#7a1f5c" …
    page.evaluate("document.querySelector('#accent_color').removeAttribute('pattern')")
    page.fill("#accent_color", "blue")  # … this one is refused by the server
    page.evaluate("document.querySelector('[data-testid=branding-form]').noValidate = true")
    page.get_by_test_id("save-branding").click()
    expect(page.get_by_test_id("branding-error")).to_contain_text("six hexadecimal digits")
    expect(page.locator("#accent_color")).to_have_attribute("aria-invalid", "true")

    page.fill("#primary_color", PRIMARY)
    page.fill("#accent_color", ACCENT)
    page.set_input_files("#logo", files=[{"name": "logo.png", "mimeType": "image/png", "buffer": png(40, 20)}])
    page.get_by_test_id("save-branding").click()
    expect(page.get_by_test_id("branding-saved")).to_be_visible()
    _logo_loaded(page, "current-logo")  # the preview on the settings page

    pages = clinic["pages"]
    # unsubscribe page
    page.goto(pages["unsub"])
    expect(page.get_by_test_id("org-brand")).to_contain_text("Harbor Family Health")
    _logo_loaded(page)
    assert _colour(page, "[data-testid=unsubscribe-topic]", "backgroundColor") == PRIMARY_RGB
    assert _colour(page, "[data-testid=org-brand]", "borderBottomColor") == ACCENT_RGB
    assert "CarePost" not in page.locator("body").inner_text()
    assert "Harbor Family Health" in page.title()

    # preference center
    page.goto(pages["prefs"])
    expect(page.get_by_test_id("org-brand")).to_contain_text("Harbor Family Health")
    _logo_loaded(page)
    assert _colour(page, "[data-testid=save-preferences]", "backgroundColor") == PRIMARY_RGB
    assert "CarePost" not in page.locator("body").inner_text()

    # secure portal (sign-in step)
    page.goto(pages["portal"])
    expect(page.get_by_test_id("portal-org")).to_have_text("Harbor Family Health")
    _logo_loaded(page)
    assert _colour(page, "[data-testid=portal-org]", "color") == PRIMARY_RGB
    assert _colour(page, ".portal-bar", "borderTopColor") == ACCENT_RGB
    assert "CarePost" not in page.locator("body").inner_text()

    # hosted form
    page.goto(pages["form"])
    expect(page.get_by_test_id("org-brand")).to_contain_text("Harbor Family Health")
    _logo_loaded(page)
    assert _colour(page, "button[type=submit]", "backgroundColor") == PRIMARY_RGB
    assert _colour(page, "[data-testid=org-brand]", "borderBottomColor") == ACCENT_RGB
    assert "CarePost" not in page.locator("body").inner_text()

    # at phone width the branded header fits
    page.set_viewport_size({"width": 390, "height": 844})
    for path in pages.values():
        page.goto(path)
        assert page.evaluate("document.documentElement.scrollWidth") <= 390, path
