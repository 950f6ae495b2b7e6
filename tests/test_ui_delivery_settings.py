"""Headless Chromium on the delivery settings page (issue 10 item 9) with a real ``carepost
serve``: an owner changes the organization's security mode and default purpose and sees the new
mode applied (the security preview starts from it); bad input is refused next to its field and
changes nothing."""

from __future__ import annotations

import secrets

import pytest
from playwright.sync_api import expect

from tests.fixtures.accounts import ui_login

pytestmark = pytest.mark.ui


@pytest.fixture(scope="module")
def owner(live_server):
    from carepost.accounts.service import create_organization
    from carepost.core.database import system_session
    from tests.fixtures.accounts import add_staff

    with system_session() as s:
        org = create_organization(s, f"Settings UI {secrets.token_hex(3)}")
        user = add_staff(s, org.id, "owner", email=f"own-{secrets.token_hex(4)}@example.test", display_name="Olive Owner")
        s.commit()
        return user


def _org_settings(org_id: str) -> dict:
    from carepost.core.database import system_session
    from carepost.delivery.settings import delivery_settings

    with system_session() as s:
        s.info.pop("scope", None)
        s.info["org_id"] = org_id
        return delivery_settings(s, org_id)


def test_owner_changes_the_security_mode_and_sees_it_applied_bad_input_is_refused(page, owner):
    ui_login(page, owner)
    page.get_by_role("link", name="Delivery settings").first.click()
    page.wait_for_url("**/app/delivery-settings")
    expect(page.get_by_test_id("mode-tls_required")).to_be_checked()
    expect(page.get_by_test_id("relay")).to_be_visible()

    # Change the mode and the default purpose.
    page.get_by_test_id("mode-secure").check()
    page.select_option("#default_purpose", "treatment")
    page.get_by_test_id("save-settings").click()
    expect(page.get_by_test_id("settings-saved")).to_be_visible()
    expect(page.get_by_test_id("mode-secure")).to_be_checked()
    expect(page.locator("#default_purpose")).to_have_value("treatment")
    assert _org_settings(owner.org_id) == {"security_mode": "secure", "default_purpose": "treatment", "relay": None, "engagement_privacy": False}

    # Applied: the security preview starts from the organization's new mode.
    page.goto("/app/security-preview")
    expect(page.locator("main")).to_contain_text("Your organization's mode is secure")

    # Lowering to opportunistic without the acknowledgement: refused next to the field, nothing changed.
    page.goto("/app/delivery-settings")
    page.get_by_test_id("mode-opportunistic").check()
    page.get_by_test_id("save-settings").click()
    expect(page.get_by_test_id("error-confirm_opportunistic")).to_contain_text("clear text")
    expect(page.locator("#confirm_opportunistic")).to_have_attribute("aria-invalid", "true")
    assert _org_settings(owner.org_id)["security_mode"] == "secure"

    # A value that is no security mode (a tampered form): the error names the security mode.
    page.goto("/app/delivery-settings")
    page.evaluate("document.querySelector('[data-testid=mode-tls_exclusive]').value = 'plaintext'")
    page.get_by_test_id("mode-tls_exclusive").check()
    page.get_by_test_id("save-settings").click()
    expect(page.get_by_test_id("error-security_mode")).to_contain_text("Unknown security mode")
    assert _org_settings(owner.org_id) == {"security_mode": "secure", "default_purpose": "treatment", "relay": None, "engagement_privacy": False}


def test_owner_sets_the_organization_relay_and_sees_password_set_never_the_password(page, owner):
    secret = "ui-relay-pw-" + secrets.token_hex(4)
    ui_login(page, owner)
    page.goto("/app/delivery-settings")
    expect(page.get_by_test_id("org-relay-password")).to_contain_text("No password set")

    # A bad host: refused next to the host field, nothing stored.
    page.get_by_test_id("relay_host").fill("relay example")
    page.get_by_test_id("relay_username").fill("clinic")
    page.get_by_test_id("relay_password").fill(secret)
    page.get_by_test_id("save-settings").click()
    expect(page.get_by_test_id("error-relay_host")).to_be_visible()
    expect(page.get_by_test_id("relay_host")).to_have_attribute("aria-invalid", "true")
    expect(page.get_by_test_id("relay_password")).to_have_value("")
    assert _org_settings(owner.org_id)["relay"] is None

    page.get_by_test_id("relay_host").fill("smtp.relay.example:2525")
    page.get_by_test_id("relay_password").fill(secret)
    page.get_by_test_id("relay_enforces_tls").check()
    page.get_by_test_id("save-settings").click()
    expect(page.get_by_test_id("settings-saved")).to_be_visible()
    expect(page.get_by_test_id("org-relay-password")).to_contain_text("Password set")
    expect(page.get_by_test_id("org-relay-password")).to_contain_text("Leave blank to keep")
    expect(page.get_by_test_id("relay_host")).to_have_value("smtp.relay.example:2525")
    expect(page.get_by_test_id("relay_password")).to_have_value("")
    expect(page.get_by_test_id("relay_enforces_tls")).to_be_checked()
    assert secret not in page.content()
    assert _org_settings(owner.org_id)["relay"] == {"host": "smtp.relay.example:2525", "port": 2525,
                                                    "username": "clinic", "password_set": True, "enforces_tls": True}

    # Saved again with the password left blank: kept. Host emptied: the relay is removed.
    page.get_by_test_id("save-settings").click()
    expect(page.get_by_test_id("org-relay-password")).to_contain_text("Password set")
    page.get_by_test_id("relay_host").fill("")
    page.get_by_test_id("save-settings").click()
    expect(page.get_by_test_id("settings-saved")).to_be_visible()
    expect(page.get_by_test_id("org-relay-password")).to_contain_text("No password set")
    assert _org_settings(owner.org_id)["relay"] is None
