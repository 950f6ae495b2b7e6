"""The organization's postal address (CAN-SPAM, issue 10 item 1) in headless Chromium: an owner
fills it in on the consent settings page; a too-short address is refused with the reason next to
the field; the saved address is what the footer of marketing mail carries (read back through the
same settings the pipeline reads), at desktop and phone width."""

from __future__ import annotations

import re

import pytest

from tests.fixtures.accounts import ui_login

pytestmark = pytest.mark.ui


def test_owner_sets_the_postal_address(page, live_server, org, make_user):
    from carepost.consent.service import consent_settings
    from carepost.core.database import org_session

    owner = make_user(org, role="owner")
    ui_login(page, owner)
    page.goto("/app/consent/settings")
    field = page.get_by_role("textbox", name="Postal address")
    assert field.is_visible()
    assert "no postal address" in page.content()  # the page says marketing waits for it

    field.fill("Oak")
    page.get_by_role("button", name="Save").click()
    error = page.locator("#postal_address-error")
    assert "full postal address" in error.inner_text()
    assert field.get_attribute("aria-invalid") == "true"

    field.fill("Bar Clinic\n1 Main Street\nSpringfield, IL 62701")
    page.get_by_role("button", name="Save").click()
    page.wait_for_url(re.compile(r".*/app/consent/settings(\?.*)?$"))
    assert page.get_by_role("status").inner_text().strip() == "Saved."
    assert page.get_by_role("textbox", name="Postal address").input_value() == "Bar Clinic\n1 Main Street\nSpringfield, IL 62701"
    for width in (1366, 390):  # desktop and phone width: the field is whole on screen
        page.set_viewport_size({"width": width, "height": 800})
        page.reload()
        box = page.get_by_role("textbox", name="Postal address").bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= width
    with org_session(org.id) as s:
        assert consent_settings(s, org.id)["postal_address"] == "Bar Clinic\n1 Main Street\nSpringfield, IL 62701"
